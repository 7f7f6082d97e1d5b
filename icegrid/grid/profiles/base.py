"""What every cluster profile shares: the settings base, the :class:`Profile` contract and the :class:`Pool`.

A profile is one way of getting Dask workers (one batch system, a local machine, or workers that join
on their own). It owns its settings schema, how its scheduler starts, what its worker jobs look like,
and how its jobs are watched. A :class:`Pool` is one running scheduler with its workers, as the manager
sees it: a client, the profile that made it, and (for batch systems) the job replacer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from icegrid.config import ConfigError

log = logging.getLogger("icegrid.grid")

# distributed's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to every worker, which switches off glibc's
# dynamic mmap threshold: every large tensor is then a fresh mmap/munmap, and forward passes ran
# 1.6-2.2x slower (issue 13); these values ran them 2-2.8x faster than the nanny's
# (benchmarks/worker_malloc.py). Every profile applies this to its workers, in one place.
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": "134217728", "MALLOC_MMAP_THRESHOLD_": "33554432"}
NANNY_ENV_VARIABLE = "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"


def nanny_environ_value() -> str:
    """WORKER_MALLOC_ENV as dask's environment parser reads it (a dict literal; it keeps the keys' case
    and merges the dict into the default pre-spawn-environ, so OMP_NUM_THREADS=1 etc. stay)."""
    return "{" + ", ".join(f"'{k}': '{v}'" for k, v in WORKER_MALLOC_ENV.items()) + "}"


class SettingError(ConfigError):
    """A campaign's pool setting that does not validate: "key: what is wrong" (the caller names the file)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProfileSettings(Strict):
    """A profile's settings. ``user_keys`` are those a campaign file or flag gave (the rest are
    icegrid's defaults from clusters.yaml), for the dask-jobqueue precedence."""

    _user_keys: set[str] = PrivateAttr(default_factory=set)

    @property
    def user_keys(self) -> frozenset[str]:
        return frozenset(self._user_keys)


class WorkerSettings(ProfileSettings):
    """What the workers of every profile that starts them share."""

    resources: dict[str, float] = Field(default_factory=dict,
                                        description="worker resources advertised, e.g. {GPU: 1}")
    threads: int | None = Field(None, ge=1, description="threads per worker; null: the profile's rule")
    lifetime: str | None = Field(None, description="worker leaves gracefully after this long, e.g. '50m'")
    lifetime_stagger: str | None = Field(None, description="random spread on lifetime so workers do not leave together")
    dashboard_address: str | None = Field(None, description="scheduler dashboard; a host-less ':0' (a free "
                                          "port) or ':8787' binds 127.0.0.1")
    # Out of memory (icegrid/grid/oom.py): a shard whose worker was killed for memory is retried on one
    # with memory x memory_growth, up to max_memory (null: never larger than `memory`).
    memory_growth: float = Field(1.5, ge=1.0, description="memory factor for a shard's retry after an out-of-memory kill")
    max_memory: str | None = Field(None, description="largest worker memory a retry may ask for; null: no growth")


def worker_args(settings: WorkerSettings) -> list[str]:
    """``dask worker`` flags for a profile's resources and lifetime."""
    args = []
    if settings.resources:
        # Commas: dask-jobqueue joins the worker command unquoted, so a space would split the value.
        args += ["--resources", ",".join(f"{k}={v:g}" for k, v in sorted(settings.resources.items()))]
    if settings.lifetime:
        args += ["--lifetime", settings.lifetime]
        if settings.lifetime_stagger:
            args += ["--lifetime-stagger", settings.lifetime_stagger]
    return args


class Profile:
    """One way of getting workers. Subclasses set the class attributes and implement :meth:`start`.

    ``pool_dir`` (``<campaign>/<pool>``) holds what the profile writes: job scripts, job logs.
    ``campaign_id`` tags the batch jobs of this run so only they are queried and removed.
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type[ProfileSettings]] = WorkerSettings
    owns_workers: ClassVar[bool] = True          # False: workers join by themselves (not ours to scale)
    script_name: ClassVar[str | None] = None     # the worker job script's file name, if jobs are submitted
    shared_filesystem: ClassVar[bool] = True     # workers must see the inputs and the store at our paths

    def __init__(self, settings: ProfileSettings, pool_name: str, pool_dir: Path, campaign_id: str = "adhoc"):
        self.settings = settings
        self.pool_name = pool_name
        self.pool_dir = Path(pool_dir)
        self.campaign_id = campaign_id
        self.warnings: list[str] = []            # user settings the campaign overrides, said once

    @classmethod
    def load(cls, defaults: dict[str, Any], overrides: dict[str, Any] | None) -> ProfileSettings:
        """Settings from icegrid's defaults with a campaign's ``overrides`` on top (pydantic errors pass)."""
        from icegrid.config import deep_merge

        overrides = overrides or {}
        settings = cls.Settings.model_validate(deep_merge(defaults, overrides))
        settings._user_keys = {k for k, v in overrides.items() if v is not None}
        return settings

    # -- what the manager asks of every profile
    def wants_tls(self) -> bool:
        return bool(getattr(self.settings, "tls", False))

    def workers_wanted(self) -> int:
        """Workers (or worker jobs) to keep while work remains; 0: not ours to start."""
        return 0

    def offered_resources(self) -> set[str] | None:
        """Resources every worker of this pool advertises, when known before any joins (None: unknown)."""
        return {k for k, v in self.settings.resources.items() if v} if self.owns_workers else None

    def start(self, security=None) -> "Pool":
        raise NotImplementedError

    def job_script(self, cluster=None) -> str | None:
        """The script one worker job is submitted with (None: this profile submits no jobs)."""
        return None

    def queue(self, job_ids: set[str]) -> tuple[set[str], dict[str, str]] | None:
        """(ids of ``job_ids`` still queued or running, {id: reason} of held/failed ones), or None when
        the queue cannot be read. Only batch profiles have a queue."""
        return None

    def bigger_worker_spec(self, cluster, memory: int, resources: dict[str, float]) -> dict | None:
        """The SpecCluster spec of one worker (or job) like ``cluster``'s others, but with ``memory``
        bytes per worker and offering ``resources`` too (out-of-memory retries); None: cannot."""
        return None

    def submit_problem(self) -> str | None:
        """Why no job of this pool could be submitted (the batch system's own message), or None."""
        return None

    def remove_jobs(self) -> None:
        """Remove whatever jobs of this campaign run are still queued (batch profiles)."""

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            log.warning("pool %s: %s", self.pool_name, message)


class Pool:
    """One scheduler with its workers: what the campaign submits shard tasks to.

    ``client`` talks to the scheduler; ``cluster`` is the Dask cluster object when icegrid started the
    scheduler itself (local, condor, slurm) and None when workers join on their own (glidein).
    """

    def __init__(self, name: str, profile: Profile, client, cluster=None, replacer=None,
                 log_directory: Path | None = None):
        self.name = name
        self.profile_obj = profile
        self.client = client
        self.cluster = cluster
        self.replacer = replacer
        self.log_directory = log_directory

    @property
    def profile(self) -> str:
        return self.profile_obj.name

    @property
    def scheduler_address(self) -> str:
        return self.client.scheduler.address

    @property
    def dashboard_link(self) -> str | None:
        try:
            return self.client.dashboard_link
        except Exception:  # no bokeh on the scheduler, or a glidein scheduler without a dashboard
            return None

    def workers(self) -> dict[str, dict]:
        return self.client.scheduler_info(n_workers=-1)["workers"]

    def dead_reason(self) -> str | None:
        """Why this pool will never get a worker again, or None: its scheduler is gone, every job
        submission failed, or every job replacement is spent and none connected."""
        if self.client.status in ("closing", "closed"):
            return f"pool {self.name}: lost its scheduler"
        submit = self.profile_obj.submit_problem()
        if submit and not self.workers():
            return f"pool {self.name}: {submit}"
        if self.replacer is None or not self.replacer.exhausted or self.workers():
            return None
        return (f"pool {self.name}: every worker job left the queue before connecting "
                f"({self.replacer.replaced} replaced; last: {self.replacer.last_problem or 'no reason given'}; "
                f"job logs in {self.log_directory})")

    def job_script(self) -> str | None:
        return self.profile_obj.job_script(self.cluster)

    def scale(self, jobs: int) -> None:
        """Keep ``jobs`` batch jobs (or local workers) alive; workers that join by themselves are not
        ours to scale."""
        if self.cluster is None:
            return
        if self.replacer is not None:
            self.replacer.target = jobs
            self.cluster.scale(jobs=jobs)
        else:
            self.cluster.scale(jobs)

    def close(self) -> None:
        if self.replacer is not None:
            self.replacer.stop()
        try:
            self.client.close()
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.close()
            except Exception as err:  # the jobs are removed by tag below anyway; one line, no traceback
                log.warning("pool %s: closing: %s", self.name, err or type(err).__name__)
            finally:
                self.profile_obj.remove_jobs()


def wait_for_workers(client, n: int, timeout: float) -> int:
    """Wait until ``n`` workers are connected or ``timeout`` passes; returns how many are."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        count = len(client.scheduler_info(n_workers=-1)["workers"])
        if count >= n or time.monotonic() > deadline:
            return count
        time.sleep(0.5)
