"""Where shard functions run: cluster profiles on dask-jobqueue and distributed.

Profiles (defaults in ``config/clusters.yaml``, overridden by a campaign spec's ``cluster:`` section):

``local``    a LocalCluster on this machine (the default).
``condor``   an HTCondorCluster: every Dask worker is an HTCondor job sent with ``condor_submit``
             (request_gpus, memory, disk, requirements and extra submit lines from the profile).
``slurm``    a SLURMCluster: every worker is an ``sbatch`` job (GPUs through ``--gres``).
``glidein``  no jobs are submitted: the campaign connects to a running ``icegrid scheduler`` (scheduler
             file or address) and workers join it from any batch system with ``icegrid worker``
             (``condor/worker.sub``, ``condor/glidein.sh``), arriving late and leaving at will.

Work is routed by worker *resources*: a profile's ``resources: {GPU: 1}`` starts workers that
advertise ``GPU=1``, and a campaign stage that asks for ``GPU: 1`` runs only on them, so one scheduler
can mix CPU preprocessing workers and GPU inference workers.

Batch jobs that leave the queue (held, removed, preempted, walltime, or a worker that never connected
— dask-jobqueue forgets nothing and so never replaces them) are noticed by :class:`JobReplacer`, which
forgets the job and submits a replacement while the campaign still wants workers.
"""

from __future__ import annotations

import copy
import getpass
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from icegrid.config import ConfigError, load_section

log = logging.getLogger(__name__)

PROFILES = ("local", "condor", "slurm", "glidein")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerSettings(_Strict):
    """What every profile's workers share."""

    resources: dict[str, float] = Field(default_factory=dict,
                                        description="worker resources advertised, e.g. {GPU: 1}")
    threads: int = Field(1, ge=1, description="threads per worker (shard functions parallelise inside)")
    lifetime: str | None = Field(None, description="worker leaves gracefully after this long, e.g. '50m'")
    lifetime_stagger: str | None = Field(None, description="random spread on lifetime so workers do not leave together")
    dashboard_address: str = Field(":8787", description="scheduler dashboard; ':0' picks a free port")


class LocalSettings(WorkerSettings):
    workers: int | None = Field(None, ge=1, description="worker processes; null: one per core")
    memory: str | None = Field(None, description="memory limit per worker; null: share the machine's")


class BatchSettings(WorkerSettings):
    """Settings shared by the batch-system profiles (condor, slurm)."""

    jobs: int = Field(2, ge=1, description="worker jobs kept in the queue while work remains")
    cores: int = Field(1, ge=1, description="cores requested per job")
    memory: str = Field("4GiB", description="memory requested per job")
    gpus: int = Field(0, ge=0, description="GPUs requested per job")
    python: str | None = Field(None, description="python on the execute nodes; null: this interpreter "
                                                 "(a shared filesystem holds the virtualenv)")
    log_directory: str | None = Field(None, description="job stdout/stderr; null: <campaign>/logs")
    tls: bool = Field(True, description="scheduler and workers talk TLS with per-campaign credentials")
    max_replacements: int = Field(20, ge=0, description="jobs resubmitted after leaving the queue, at most")
    poll_seconds: float = Field(5.0, gt=0, description="how often the job queue is checked")
    prologue: list[str] = Field(default_factory=list, description="shell lines run before the worker starts")


class CondorSettings(BatchSettings):
    disk: str = Field("4GiB", description="scratch disk requested per job")
    requirements: str | None = Field(None, description="HTCondor requirements expression")
    submit_extra: dict[str, str] = Field(default_factory=dict, description="extra submit-description lines")


class SlurmSettings(BatchSettings):
    walltime: str = Field("01:00:00", description="job time limit")
    partition: str | None = None
    account: str | None = None
    sbatch_extra: list[str] = Field(default_factory=list, description="extra '#SBATCH' options, e.g. --qos=x")


class GlideinSettings(_Strict):
    scheduler_file: str | None = Field(None, description="written by `icegrid scheduler`")
    scheduler: str | None = Field(None, description="scheduler address, instead of a file")
    tls_dir: str | None = Field(None, description="the campaign's TLS credentials (icegrid scheduler --tls-dir)")


class ClustersConfig(_Strict):
    local: LocalSettings = Field(default_factory=LocalSettings)
    condor: CondorSettings = Field(default_factory=CondorSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    glidein: GlideinSettings = Field(default_factory=GlideinSettings)


def load_profile(name: str, overrides: dict[str, Any] | None = None):
    """Settings of one profile: config/clusters.yaml merged with ``overrides`` (a spec's cluster section)."""
    if name not in PROFILES:
        raise ConfigError(f"unknown cluster profile '{name}' (have {', '.join(PROFILES)})")
    config = load_section("clusters", ClustersConfig, {name: overrides or {}})
    return getattr(config, name)


def worker_args(settings: WorkerSettings) -> list[str]:
    """``dask worker`` flags for a profile's resources and lifetime."""
    args = []
    if settings.resources:
        args += ["--resources", " ".join(f"{k}={v:g}" for k, v in sorted(settings.resources.items()))]
    if settings.lifetime:
        args += ["--lifetime", settings.lifetime]
        if settings.lifetime_stagger:
            args += ["--lifetime-stagger", settings.lifetime_stagger]
    return args


class Pool:
    """One scheduler with its workers: what the campaign submits shard tasks to.

    ``client`` talks to the scheduler; ``cluster`` is the Dask cluster object when icegrid started the
    scheduler itself (local, condor, slurm) and None for glidein.
    """

    def __init__(self, name: str, profile: str, client, cluster=None, replacer: "JobReplacer | None" = None,
                 log_directory: Path | None = None):
        self.name = name
        self.profile = profile
        self.client = client
        self.cluster = cluster
        self.replacer = replacer
        self.log_directory = log_directory

    @property
    def scheduler_address(self) -> str:
        return self.client.scheduler.address

    @property
    def dashboard_link(self) -> str | None:
        try:
            return self.client.dashboard_link
        except Exception:  # no bokeh on the scheduler, or glidein scheduler without a dashboard
            return None

    def dead_reason(self) -> str | None:
        """Why this pool will never get a worker again (its scheduler is gone, or all job replacements
        are spent and none connected), or None."""
        if self.client.status in ("closing", "closed"):
            return f"pool {self.name}: lost its scheduler"
        if self.replacer is None or not self.replacer.exhausted:
            return None
        if self.client.scheduler_info(n_workers=-1)["workers"]:
            return None
        return (f"pool {self.name}: every worker job left the queue before connecting "
                f"({self.replacer.replaced} replaced; last: {self.replacer.last_problem or 'no reason given'}; "
                f"job logs in {self.log_directory})")

    def job_script(self) -> str | None:
        return self.cluster.job_script() if hasattr(self.cluster, "job_script") else None

    def scale(self, jobs: int) -> None:
        """Keep ``jobs`` batch jobs (or local workers) alive; glidein pools are not ours to scale."""
        if self.cluster is None:
            return
        if self.replacer is not None:
            self.replacer.target = jobs
            self.cluster.scale(jobs=jobs)
        elif self.profile == "local":
            self.cluster.scale(jobs)

    def close(self) -> None:
        if self.replacer is not None:
            self.replacer.stop()
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def open_pool(profile: str, settings, campaign_dir: Path, name: str | None = None,
              security=None) -> Pool:
    """Start (or, for glidein, connect to) the scheduler of one pool. Workers are started by ``scale``."""
    from distributed import Client

    name = name or profile
    campaign_dir = Path(campaign_dir)
    if profile == "local":
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=0, threads_per_worker=settings.threads, processes=True,
                               memory_limit=settings.memory or "auto", resources=settings.resources or None,
                               dashboard_address=settings.dashboard_address,
                               worker_dashboard_address=None, security=security)
        return Pool(name, profile, Client(cluster, security=security), cluster)
    if profile == "glidein":
        return Pool(name, profile, connect_glidein(settings))
    if profile in ("condor", "slurm"):
        cluster = batch_cluster(profile, settings, campaign_dir, security)
        client = Client(cluster, security=security)
        replacer = JobReplacer(cluster, profile, settings)
        replacer.start()
        return Pool(name, profile, client, cluster, replacer,
                    log_directory=Path(settings.log_directory or campaign_dir / "logs"))
    raise ConfigError(f"unknown cluster profile '{profile}' (have {', '.join(PROFILES)})")


def connect_glidein(settings: GlideinSettings):
    from distributed import Client

    from icegrid.security import campaign_security

    security = campaign_security(settings.tls_dir) if settings.tls_dir else None
    if settings.scheduler_file:
        if not Path(settings.scheduler_file).exists():
            raise ConfigError(f"{settings.scheduler_file}: no scheduler file; start one with "
                              "`icegrid scheduler --scheduler-file FILE`")
        return Client(scheduler_file=settings.scheduler_file, security=security, timeout="60s")
    if settings.scheduler:
        return Client(settings.scheduler, security=security, timeout="60s")
    raise ConfigError("cluster profile 'glidein' needs scheduler_file or scheduler")


def batch_cluster(profile: str, settings: BatchSettings, campaign_dir: Path, security=None):
    """The dask-jobqueue cluster of a condor or slurm profile (no jobs submitted yet)."""
    log_dir = Path(settings.log_directory or campaign_dir / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    common = dict(
        cores=settings.cores, processes=1, memory=settings.memory,
        # Batch jobs find the system python first (HTCondor jobs get a minimal PATH): name ours.
        python=settings.python or sys.executable,
        log_directory=str(log_dir), worker_extra_args=worker_args(settings),
        job_script_prologue=list(settings.prologue) or None,
        security=security, protocol="tls://" if security else None,
        scheduler_options={"dashboard_address": settings.dashboard_address},
    )
    if settings.threads != settings.cores:
        # jobqueue gives a worker as many threads as cores; a shard function may use the cores itself.
        common["worker_extra_args"] = common["worker_extra_args"] + ["--nthreads", str(settings.threads)]
    if profile == "condor":
        from dask_jobqueue import HTCondorCluster

        extra = dict(settings.submit_extra)
        if settings.gpus:
            extra.setdefault("request_gpus", str(settings.gpus))
        if settings.requirements:
            extra.setdefault("requirements", settings.requirements)
        return HTCondorCluster(disk=settings.disk, job_extra_directives=extra, **common)
    from dask_jobqueue import SLURMCluster

    extra = list(settings.sbatch_extra)
    if settings.gpus:
        extra.append(f"--gres=gpu:{settings.gpus}")
    return SLURMCluster(walltime=settings.walltime, queue=settings.partition, account=settings.account,
                        job_extra_directives=extra, **common)


def queued_jobs(profile: str) -> tuple[set[str], dict[str, str]] | None:
    """(ids of this user's jobs still queued or running, {id: reason} of held/failed ones), or None when
    the queue cannot be read."""
    if profile == "condor":
        # JobStatus 1 idle, 2 running, 6 transferring, 7 suspended; held (5) jobs never start by themselves.
        cmd = ["condor_q", "-allusers", "-constraint", f'Owner == "{getpass.getuser()}"',
               "-af:t", "ClusterId", "ProcId", "JobStatus", "HoldReason"]
        alive = {"1", "2", "6", "7"}
    else:
        cmd = ["squeue", "-h", "-u", getpass.getuser(), "-o", "%i\t%t\t%r"]
        alive = {"PD", "R", "CF", "S", "RQ", "RF", "RS"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    jobs, problems = set(), {}
    for line in out.splitlines():
        fields = line.split("\t")
        if profile == "condor" and len(fields) >= 3:
            job_id, status, reason = f"{fields[0]}.{fields[1]}", fields[2], " ".join(fields[3:])
        elif profile == "slurm" and len(fields) >= 2:
            job_id, status, reason = fields[0], fields[1], " ".join(fields[2:])
        else:
            continue
        if status in alive:
            jobs.add(job_id)
        elif reason and reason != "undefined":
            problems[job_id] = reason
    return jobs, problems


class JobReplacer:
    """Resubmit batch jobs that left the queue, keeping ``target`` worker jobs alive.

    dask-jobqueue records a worker as soon as its job is submitted and never checks the queue again:
    a job that is held, removed, preempted or killed at walltime before (or after) its worker
    connected stays counted, so the cluster silently shrinks. Every ``poll_seconds`` this looks at the
    queue; a job missing from it twice in a row is forgotten and ``scale`` submits a new one.
    """

    def __init__(self, cluster, profile: str, settings: BatchSettings):
        self.cluster = cluster
        self.profile = profile
        self.poll_seconds = settings.poll_seconds
        self.max_replacements = settings.max_replacements
        self.target = 0
        self.replaced = 0
        self.last_problem: str | None = None   # e.g. the hold reason of the last job that left
        self._suspects: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"icegrid-{profile}-replacer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_seconds + 35)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception as err:  # keep watching: a failed check must not end the campaign
                log.warning("job replacer (%s): %s", self.profile, err)

    def check(self) -> list[str]:
        """One look at the queue; returns the worker names whose jobs were replaced."""
        if self.target <= 0:
            return []
        submitted = {name: job.job_id for name, job in list(self.cluster.workers.items())
                     if getattr(job, "job_id", None)}
        if not submitted:
            return []
        answer = queued_jobs(self.profile)
        if answer is None:
            return []
        queued, problems = answer
        for name, job_id in submitted.items():
            if job_id in problems:
                self.last_problem = f"job {job_id}: {problems[job_id]}"
        missing = {name for name, job_id in submitted.items() if job_id not in queued}
        gone = sorted(missing & self._suspects)
        self._suspects = missing - set(gone)
        if not gone:
            return []
        budget = self.max_replacements - self.replaced
        if budget <= 0:
            log.warning("%s: %d worker jobs left the queue; not replacing (max_replacements=%d reached)",
                        self.profile, len(gone), self.max_replacements)
            return []
        gone = gone[:budget]
        if self.last_problem:
            log.warning("%s: %s", self.profile, self.last_problem)
        self.replaced += len(gone)
        log.info("%s: jobs %s left the queue; submitting replacements",
                 self.profile, ", ".join(submitted[n] for n in gone))
        self.cluster.loop.add_callback(self._replace, gone)
        return gone

    @property
    def exhausted(self) -> bool:
        return self.replaced >= self.max_replacements

    def _replace(self, names: list[str]) -> None:
        # On the cluster's event loop: SpecCluster state is not thread-safe.
        if self.target <= 0 or self.cluster.status.name in ("closing", "closed"):
            return
        for name in names:
            self.cluster.worker_spec.pop(name, None)
            # A fresh name: SpecCluster would hand out the forgotten one again (it only skips names
            # still in worker_spec), which it still holds as a live job and so would never start.
            base = re.sub(r"-r\d+$", "", str(name))
            self.cluster.worker_spec[f"{base}-r{self.replaced}"] = copy.deepcopy(self.cluster.new_spec)
        # Same size: scale() only reconciles — condor_rm/scancel the forgotten jobs, submit the new ones.
        self.cluster.scale(jobs=len(self.cluster.worker_spec))


def wait_for_workers(client, n: int, timeout: float) -> int:
    """Wait until ``n`` workers are connected or ``timeout`` passes; returns how many are."""
    deadline = time.monotonic() + timeout
    while True:
        count = len(client.scheduler_info(n_workers=-1)["workers"])
        if count >= n or time.monotonic() > deadline:
            return count
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------- glidein
def serve_scheduler(scheduler_file: Path, tls_dir: Path | None = None, host: str | None = None, port: int = 0,
                    dashboard_address: str = ":8787", echo=print) -> None:
    """Run a scheduler until interrupted; write its address to ``scheduler_file`` for workers and campaigns.

    With ``tls_dir`` the scheduler listens on tls:// and requires the campaign's credentials (created
    there if missing) from every worker and client.
    """
    import asyncio

    from distributed import Scheduler

    security = None
    if tls_dir is not None:
        from icegrid.security import campaign_security, create_credentials

        security = campaign_security(create_credentials(tls_dir))
    scheduler_file = Path(scheduler_file)
    scheduler_file.parent.mkdir(parents=True, exist_ok=True)

    async def serve() -> None:
        async with Scheduler(host=host, port=port, dashboard_address=dashboard_address, security=security,
                             protocol="tls://" if security else None,
                             scheduler_file=str(scheduler_file)) as scheduler:
            echo(f"scheduler at {scheduler.address} (file {scheduler_file}); "
                 f"dashboard {_dashboard(scheduler)}; TLS {'on: ' + str(tls_dir) if security else 'off'}")
            await scheduler.finished()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


def _dashboard(scheduler) -> str:
    port = scheduler.services.get("dashboard").port if "dashboard" in scheduler.services else None
    return f"http://{scheduler.address.split('://')[-1].rsplit(':', 1)[0]}:{port}/status" if port else "unavailable"


def worker_command(scheduler_file: Path | None = None, address: str | None = None, tls_dir: Path | None = None,
                   nthreads: int = 1, memory_limit: str = "auto", resources: str = "", lifetime: str | None = None,
                   lifetime_stagger: str | None = None, death_timeout: str = "120s", name: str | None = None,
                   nanny: bool = True) -> list[str]:
    """The ``dask worker`` command line an ``icegrid worker`` runs."""
    cmd = [sys.executable, "-m", "distributed.cli.dask_worker"]
    cmd += ["--scheduler-file", str(scheduler_file)] if scheduler_file else [address]
    cmd += ["--nthreads", str(nthreads), "--memory-limit", str(memory_limit), "--death-timeout", death_timeout,
            "--nanny" if nanny else "--no-nanny", "--no-dashboard"]
    if resources:
        cmd += ["--resources", resources]
    if lifetime:
        cmd += ["--lifetime", lifetime]
        if lifetime_stagger:
            cmd += ["--lifetime-stagger", lifetime_stagger]
    if name:
        cmd += ["--name", name]
    if tls_dir is not None:
        from icegrid.security import campaign_security, worker_tls_args

        campaign_security(tls_dir)  # one-line error now rather than a TLS traceback later
        cmd += worker_tls_args(tls_dir)
    return cmd


def exec_worker(**kwargs) -> None:
    """Replace this process with the Dask worker (signals from the batch system reach it directly)."""
    import os

    cmd = worker_command(**kwargs)
    # As distributed's nanny does for the workers it spawns: one math thread per task thread, so tasks
    # do not oversubscribe the slot's cores and give the same bytes on every worker.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    os.execv(cmd[0], cmd)
