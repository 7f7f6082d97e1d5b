#!/usr/bin/env bash
# Install and start the real batch systems the grid tests submit to, on this one machine:
#   * a one-machine HTCondor pool (Debian's minicondor) and
#   * a one-node SLURM cluster (slurm-wlm + munge),
# create the unprivileged submit user (HTCondor refuses to queue jobs for root) and make the project's
# virtualenv and its base interpreter readable by that user (condor and SLURM jobs run as it).
#
# Run as root. Idempotent: on a machine where the packages are installed and the daemons run it only
# checks them (a few seconds). The mirror is copied from the machine's own Debian source: no host name
# lives here.
#
# What it changes on a machine:
#   * packages: minicondor, slurm-wlm, munge and their dependencies. Bookworm has no HTCondor package,
#     so on bookworm they come from trixie: it adds /etc/apt/sources.list.d/icegrid-trixie.sources and
#     /etc/apt/preferences.d/icegrid-trixie. The pin keeps every other package on bookworm, and keeps the
#     system Python (python3, python3-*, libpython3-*, python3.11*) off trixie entirely: /usr/bin/python3
#     stays the interpreter it was (the script checks, and fails if it moved). What trixie's daemons need
#     does come from trixie: libc6 (and base-files, which libc6 requires: /etc/os-release then says
#     trixie), libstdc++6, openssl, ncurses, systemd (slurm's package scripts need its sysusers; no
#     daemon is started through it), libpython3.13 beside 3.11 (condor's own scripts) — about 60
#     upgraded packages instead of the ~150 a plain `-t trixie` install upgrades.
#   * users and files: the submit user, a scratch folder it owns, o+rX on the repository, the virtualenv
#     and the ancestors of its base interpreter; /etc/condor/config.d/90-icegrid-ci.conf,
#     /etc/slurm/slurm.conf, /etc/munge/munge.key; the env file below.
#   * processes: condor_master, munged, slurmctld and slurmd (as root, no systemd).
#
# Writes $ICEGRID_POOLS_ENV (default /var/tmp/icegrid-pools.env) for the tests:
#   ICEGRID_SUBMIT_USER, ICEGRID_POOL_SCRATCH (a folder that user owns), ICEGRID_POOLS=condor,slurm
# The scratch folder is not under /tmp or /var/tmp: HTCondor gives every job private ones
# (MOUNT_UNDER_SCRATCH), so a campaign folder there would be invisible to the workers.
# Exits non-zero, naming the pool, when a pool does not come up.
set -euo pipefail

SUBMIT_USER=${ICEGRID_SUBMIT_USER:-icegrid-ci}
SCRATCH=${ICEGRID_POOL_SCRATCH:-/srv/icegrid-ci}
ENV_FILE=${ICEGRID_POOLS_ENV:-/var/tmp/icegrid-pools.env}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${ICEGRID_VENV:-$REPO/.venv}
log() { echo "pools.sh: $*" >&2; }
die() { echo "pools.sh: error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"

# ---------------------------------------------------------------- packages
system_python=$(readlink -f /usr/bin/python3 2>/dev/null || true)
need_install=()
command -v condor_master >/dev/null || need_install+=(minicondor)
command -v slurmctld >/dev/null || need_install+=(slurm-wlm)
command -v munged >/dev/null || need_install+=(munge)
if ((${#need_install[@]})); then
    . /etc/os-release
    target=() extra=()
    if [[ ${VERSION_CODENAME:-} == bookworm || -f /etc/apt/sources.list.d/icegrid-trixie.sources ]]; then
        if [[ ! -f /etc/apt/sources.list.d/icegrid-trixie.sources ]]; then
            # First "URIs:" of a deb822 source that carries bookworm, else the first bookworm line of sources.list.
            mirror=$(awk '/^URIs:/{u=$2} /^Suites:.*bookworm( |$)/{if(u){print u; exit}}' \
                     /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
            [[ -n $mirror ]] || mirror=$(awk '$1=="deb" && $3=="bookworm"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
            [[ -n $mirror ]] || die "no bookworm source in /etc/apt to copy the Debian mirror from"
            cat > /etc/apt/sources.list.d/icegrid-trixie.sources <<SRC
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        fi
        # Low pin: only what we ask for with -t trixie (and what it cannot do without) comes from trixie.
        # Never the system Python: condor accepts bookworm's python3 (3.11) and its modules, and a
        # trixie python3 would move /usr/bin/python3 to 3.13 and drag ~100 python3-* upgrades along.
        cat > /etc/apt/preferences.d/icegrid-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: python3 python3-* libpython3-* python3.11* libpython3.11*
Pin: release n=trixie
Pin-Priority: -1
PIN
        target=(-t trixie)
        # Trixie's slurm packages declare their user with a sysusers.d line ("u!") that bookworm's
        # systemd-sysusers (252) rejects, failing their postinst: an installed systemd comes along.
        if dpkg-query -W -f '${Status}' systemd 2>/dev/null | grep -q "ok installed"; then extra+=(systemd); fi
    fi
    log "installing ${need_install[*]} ${extra[*]} ${target[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${target[@]}" "${extra[@]}" minicondor slurm-wlm munge \
        >/dev/null
fi
[[ $(readlink -f /usr/bin/python3 2>/dev/null || true) == "$system_python" ]] || \
    die "/usr/bin/python3 moved from $system_python to $(readlink -f /usr/bin/python3); the apt pin failed"

# ---------------------------------------------------------------- submit user and permissions
id "$SUBMIT_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$SUBMIT_USER"
mkdir -p "$SCRATCH"
chown "$SUBMIT_USER": "$SCRATCH"
# Jobs run the virtualenv's python, which links to a base interpreter (pyenv under /root here):
# the user needs to traverse every ancestor and read the interpreter's tree and the repository.
# On a clean clone the virtualenv is made after this script, from the python3 on PATH: open that one.
if [[ -f $VENV/pyvenv.cfg ]]; then
    base_prefix=$(dirname "$(awk -F' = ' '$1=="home"{print $2}' "$VENV/pyvenv.cfg")")
else
    base_prefix=$(python3 -c 'import sys; print(sys.base_prefix)' 2>/dev/null || true)
fi
for tree in "$REPO" "$VENV" "$base_prefix"; do
    [[ -n $tree && -d $tree ]] || continue
    dir=$tree
    while [[ $dir != / ]]; do chmod o+x "$dir"; dir=$(dirname "$dir"); done
    # Only files that are not yet world-readable: keeps reruns fast.
    find "$tree" \( -type d ! -perm -o=rx -o -type f ! -perm -o=r \) -exec chmod o+rX {} +
done

# ---------------------------------------------------------------- HTCondor
# Short daemon intervals: a test pool should match a job in seconds, not the production minutes.
cat > /etc/condor/config.d/90-icegrid-ci.conf <<'CONF'
NEGOTIATOR_INTERVAL = 2
NEGOTIATOR_MIN_INTERVAL = 1
NEGOTIATOR_CYCLE_DELAY = 1
SCHEDD_INTERVAL = 2
SCHEDD_MIN_INTERVAL = 1
UPDATE_INTERVAL = 2
STARTER_UPDATE_INTERVAL = 2
SCHEDD_INTERVAL_TIMESLICE = 0.5
# The CI machine has 2 cores; advertise 4 so a replacement worker can start while a removed job's
# slot is still being cleaned up (the workers are mostly idle waiting on each other in the tests).
NUM_CPUS = 4
# Jobs see the machine's /tmp and /var/tmp (HTCondor's default gives each job private ones): CI may
# clone the repository, and so the virtualenv the workers run, under /tmp.
MOUNT_UNDER_SCRATCH =
CONF
mkdir -p /var/run/condor /var/log/condor /var/lib/condor
chown condor: /var/run/condor /var/log/condor /var/lib/condor 2>/dev/null || true
if ! pgrep -x condor_master >/dev/null; then
    log "starting condor_master"
    condor_master
else
    condor_reconfig >/dev/null 2>&1 || true
fi

# ---------------------------------------------------------------- munge + SLURM
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge: /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged

host=$(hostname -s)
cpus=$(nproc)
# RealMemory a bit under what slurmd measures, or the node is drained as "Low RealMemory".
mem=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') * 9 / 10 ))
conf=$(cat <<CONF
# Written by icegrid .ci/pools.sh: a one-node cluster for the grid tests.
ClusterName=icegrid-ci
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
KillWait=5
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
)
mkdir -p /etc/slurm
if [[ ! -f /etc/slurm/slurm.conf ]] || [[ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]]; then
    echo "$conf" > /etc/slurm/slurm.conf
    if pgrep -x slurmctld >/dev/null; then scontrol reconfigure || true; fi
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

# ---------------------------------------------------------------- wait until both accept work
for _ in $(seq 60); do
    condor_status -af Name 2>/dev/null | grep -q . && break
    sleep 1
done
condor_status -af Name 2>/dev/null | grep -q . || die "HTCondor pool has no slot after 60 s (see /var/log/condor)"
for _ in $(seq 30); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -1)
    [[ $state == idle* || $state == mix* || $state == alloc* ]] && break
    [[ $state == down* || $state == drain* ]] && scontrol update nodename="$host" state=resume 2>/dev/null || true
    sleep 1
done
[[ $state == idle* || $state == mix* || $state == alloc* ]] || die "SLURM node is '$state' after 30 s (see /var/log/slurm)"

cat > "$ENV_FILE" <<ENV
ICEGRID_SUBMIT_USER=$SUBMIT_USER
ICEGRID_POOL_SCRATCH=$SCRATCH
ICEGRID_POOLS=condor,slurm
ENV
chmod 644 "$ENV_FILE"
log "HTCondor and SLURM are up; submit user $SUBMIT_USER, scratch $SCRATCH, env in $ENV_FILE"
