#!/bin/sh
# Start one icegrid (Dask) worker that joins a running `icegrid scheduler` — from any batch system.
#
# This is the pyglidein idea with Dask: the batch job is only a vehicle for a worker, sites differ
# only by the settings below, and the worker leaves on its own before the slot is taken away.
# Used by condor/worker.sub; from SLURM: `sbatch --export=ALL,ICEGRID_SCHEDULER_FILE=... condor/glidein.sh`;
# from cron or ssh: run it directly.
#
# Settings (environment):
#   ICEGRID_SCHEDULER_FILE  required: the file `icegrid scheduler --scheduler-file` wrote (shared filesystem)
#   ICEGRID_TLS_DIR         the campaign's TLS credentials (`icegrid scheduler --tls-dir`); without them a
#                           TLS scheduler refuses the worker
#   ICEGRID_PYTHON          python with icegrid installed (batch jobs rarely see your virtualenv on PATH)
#   ICEGRID_LIFETIME        leave after this long (e.g. 50m); default: 90% of the slot's remaining
#                           time when the batch system tells it (HTCondor glidein GLIDEIN_ToDie, SLURM
#                           time limit), otherwise no limit
#   ICEGRID_LIFETIME_STAGGER  random spread on the lifetime so workers do not leave together (default 1m)
#   ICEGRID_NTHREADS        worker threads (default: the cores the slot was given, else 1)
#   ICEGRID_NWORKERS        worker processes in the slot (default 1)
#   ICEGRID_RESOURCES       advertised resources (default: GPU=<n> when the slot was given n GPUs)
#   ICEGRID_LOCAL_DIRECTORY worker scratch (default: the slot's, $_CONDOR_SCRATCH_DIR, else Dask's)
# Behind NAT (the scheduler cannot dial the slot's own address):
#   ICEGRID_LISTEN_ADDRESS  where the worker listens, e.g. tcp://0.0.0.0:40000
#   ICEGRID_CONTACT_ADDRESS where the scheduler reaches it, e.g. tcp://<public address>:40000 (forwarded)
#   ICEGRID_INTERFACE       network interface to listen on, e.g. ib0
# Arguments given to this script are passed on to `dask worker` (e.g. --preload MODULE).
set -eu

: "${ICEGRID_SCHEDULER_FILE:?set ICEGRID_SCHEDULER_FILE to the file written by icegrid scheduler}"
python=${ICEGRID_PYTHON:-python3}

# Cores and GPUs the batch system assigned to this slot.
nthreads=${ICEGRID_NTHREADS:-${_CONDOR_NPROCS:-${SLURM_CPUS_ON_NODE:-1}}}
gpu_list=${CUDA_VISIBLE_DEVICES:-}
case "$gpu_list" in ""|-1|NoDevFiles) gpus=0 ;; *) gpus=$(echo "$gpu_list" | tr ',' '\n' | grep -c .) ;; esac
resources=${ICEGRID_RESOURCES:-}
if [ -z "$resources" ] && [ "$gpus" -gt 0 ]; then resources="GPU=$gpus"; fi

# Remaining slot time, in seconds, when the batch system says.
remaining=""
if [ -n "${_CONDOR_MACHINE_AD:-}" ] && [ -r "$_CONDOR_MACHINE_AD" ]; then
    to_die=$(sed -n 's/^GLIDEIN_ToDie *= *\([0-9]*\).*/\1/p' "$_CONDOR_MACHINE_AD" | head -n 1)
    if [ -n "$to_die" ]; then remaining=$((to_die - $(date +%s))); fi
elif [ -n "${SLURM_JOB_ID:-}" ] && command -v squeue >/dev/null 2>&1; then
    # %L: time left as [D-]HH:MM:SS, MM:SS, or UNLIMITED
    remaining=$(squeue -h -j "$SLURM_JOB_ID" -o %L | awk -F'[-:]' '
        /UNLIMITED|INVALID/ {exit}
        NF==4 {print $1*86400+$2*3600+$3*60+$4; exit}
        NF==3 {print $1*3600+$2*60+$3; exit}
        NF==2 {print $1*60+$2; exit}')
fi
lifetime=${ICEGRID_LIFETIME:-}
if [ -z "$lifetime" ] && [ -n "$remaining" ] && [ "$remaining" -gt 60 ]; then
    lifetime="$((remaining * 9 / 10))s"
fi

# Built in front of the script's own arguments, which stay last (passed through to `dask worker`).
n_extra=$#
set -- "$@" -m icegrid worker --scheduler-file "$ICEGRID_SCHEDULER_FILE" --nthreads "$nthreads"
if [ -n "${ICEGRID_TLS_DIR:-}" ]; then set -- "$@" --tls-dir "$ICEGRID_TLS_DIR"; fi
if [ -n "$resources" ]; then set -- "$@" --resources "$resources"; fi
if [ -n "$lifetime" ]; then
    set -- "$@" --lifetime "$lifetime" --lifetime-stagger "${ICEGRID_LIFETIME_STAGGER:-1m}"
fi
if [ -n "${ICEGRID_NWORKERS:-}" ]; then set -- "$@" --nworkers "$ICEGRID_NWORKERS"; fi
if [ -n "${ICEGRID_LISTEN_ADDRESS:-}" ]; then set -- "$@" --listen-address "$ICEGRID_LISTEN_ADDRESS"; fi
if [ -n "${ICEGRID_CONTACT_ADDRESS:-}" ]; then set -- "$@" --contact-address "$ICEGRID_CONTACT_ADDRESS"; fi
if [ -n "${ICEGRID_INTERFACE:-}" ]; then set -- "$@" --interface "$ICEGRID_INTERFACE"; fi
scratch=${ICEGRID_LOCAL_DIRECTORY:-${_CONDOR_SCRATCH_DIR:-}}
if [ -n "$scratch" ]; then set -- "$@" --local-directory "$scratch"; fi
# Rotate the script's own arguments (the first n_extra) to the end.
while [ "$n_extra" -gt 0 ]; do
    first=$1; shift; set -- "$@" "$first"; n_extra=$((n_extra - 1))
done
echo "glidein.sh: $python $*" >&2
exec "$python" "$@"
