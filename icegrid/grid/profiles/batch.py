"""The shared core of the batch-system profiles (condor, slurm), on dask-jobqueue's own terms.

Precedence, as dask-jobqueue has it, highest first:

1. flags (``--jobs``, ``--set key=value``),
2. the campaign file's ``cluster:`` section,
3. the site's dask config (``jobqueue.yaml`` in ``~/.config/dask``, ``/etc/dask`` or ``$DASK_CONFIG``),
4. icegrid's profile defaults (``icegrid/config/clusters.yaml``).

icegrid passes dask-jobqueue only what the campaign needs (its resources, TLS, the job tag, the worker
environment) or what the user set; for everything else it passes nothing, so dask-jobqueue reads the
site's config itself. A site value counts as set when it differs from dask-jobqueue's packaged default.
Lists and mappings (job directives, prologue, worker arguments, scheduler options) are merged: the
site's entries stay, and an entry the campaign replaces is named in a warning.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from icegrid.grid.profiles.base import NANNY_ENV_VARIABLE, Pool, Profile, WorkerSettings, nanny_environ_value, worker_args

# Submission failures, by pool tag: recorded by the job objects on the cluster's event loop, read by
# the manager's thread (a list append is atomic).
SUBMIT_ERRORS: dict[str, list[str]] = {}


class BatchSettings(WorkerSettings):
    """Settings shared by the batch-system profiles. ``None`` leaves a setting to the site's dask config."""

    jobs: int = Field(2, ge=1, description="worker jobs kept in the queue while work remains")
    cores: int | None = Field(None, ge=1, description="cores requested per job")
    memory: str | None = Field(None, description="memory requested per job")
    processes: int | None = Field(None, ge=1, description="worker processes per job")
    gpus: int = Field(0, ge=0, description="GPUs requested per job")
    python: str | None = Field(None, description="python on the execute nodes; null: this interpreter")
    log_directory: str | None = Field(None, description="job stdout/stderr; null: <campaign>/<pool>/logs")
    interface: str | None = Field(None, description="network interface workers (and scheduler) use, e.g. ib0")
    local_directory: str | None = Field(None, description="worker scratch on the execute node, e.g. $TMPDIR")
    tls: bool = Field(True, description="scheduler and workers talk TLS with per-campaign credentials")
    tls_days: int = Field(30, ge=1, description="lifetime of new campaign TLS credentials, in days")
    max_replacements: int = Field(20, ge=0, description="jobs resubmitted after leaving the queue, at most")
    poll_seconds: float = Field(5.0, gt=0, description="how often the job queue is checked")
    prologue: list[str] = Field(default_factory=list, description="shell lines run before the worker starts")


@cache
def packaged_defaults(config_name: str) -> dict[str, Any]:
    """dask-jobqueue's own defaults for one batch system (its shipped jobqueue.yaml)."""
    import dask_jobqueue
    import yaml

    text = (Path(dask_jobqueue.__file__).parent / "jobqueue.yaml").read_text()
    return yaml.safe_load(text)["jobqueue"][config_name]


def site_settings(config_name: str) -> dict[str, Any]:
    """The site's jobqueue settings for one batch system: what its dask config sets beyond the
    packaged defaults (keys as in jobqueue.yaml, e.g. ``log-directory``)."""
    import dask

    shipped = packaged_defaults(config_name)
    current = dask.config.get(f"jobqueue.{config_name}", {}) or {}
    normal = {key.replace("_", "-"): value for key, value in current.items()}
    return {key: value for key, value in normal.items() if value != shipped.get(key) and value is not None}


def option_groups(args: list[str]) -> list[list[str]]:
    """``['--a', '1', '--b', '--c=2']`` -> ``[['--a', '1'], ['--b'], ['--c=2']]``."""
    groups: list[list[str]] = []
    for arg in map(str, args):
        if arg.startswith("-") or not groups:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


def option_name(group: list[str] | str) -> str:
    first = group[0] if isinstance(group, list) else group
    return first.split("=", 1)[0].split(" ", 1)[0]


def submit_error_line(err: BaseException) -> str:
    """The batch system's own message from dask-jobqueue's "Command exited with non-zero exit code"
    error: the first line of its stderr, else of its stdout."""
    text = str(err)
    for section in ("stderr:", "stdout:"):
        if section in text:
            lines = [line.strip() for line in text.split(section, 1)[1].splitlines() if line.strip()]
            if lines and not lines[0].endswith(":"):
                return lines[0][:300]
    from icegrid.errors import first_line

    return first_line(err, 300)


class RecordedJob:
    """Mixin for a dask-jobqueue Job: keeps the script each job was submitted with in ``script_dir``,
    and turns a failing submit command into one recorded line instead of a traceback on the loop."""

    script_suffix = ".sh"

    def __init__(self, *args, script_dir: str | None = None, pool_tag: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.script_dir, self.pool_tag = script_dir, pool_tag
        self.submit_error: str | None = None

    async def start(self):
        if self.script_dir:
            folder = Path(self.script_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{self.name}{self.script_suffix}").write_text(self.job_script())
        try:
            await super().start()
        except RuntimeError as err:  # the submit command said no: keep its message for the pool
            from distributed.core import Status

            self.submit_error = f"{self.submit_command.split()[0]} failed: {submit_error_line(err)}"
            SUBMIT_ERRORS.setdefault(self.pool_tag or "", []).append(self.submit_error)
            self.status = Status.running   # a job without an id, as SpecCluster expects: replaced or reported


@cache
def _recorded_job_class(module: str, job: str, suffix: str) -> type:
    """dask-jobqueue's Job class of a batch system with :class:`RecordedJob` mixed in (made once: the
    cluster pickles nothing, but one class per system keeps isinstance checks and reprs stable)."""
    import importlib

    base = getattr(importlib.import_module(module), job)
    return type(f"Icegrid{job}", (RecordedJob, base), {"script_suffix": suffix, "__module__": __name__})


class BatchProfile(Profile):
    """A profile whose every worker is a batch job submitted by a dask-jobqueue cluster."""

    Settings = BatchSettings
    config_name: ClassVar[str] = ""          # the jobqueue config section: htcondor, slurm, ...
    # icegrid setting -> jobqueue key, for the settings passed as they are
    scalars: ClassVar[dict[str, str]] = {"cores": "cores", "memory": "memory", "processes": "processes",
                                         "python": "python", "interface": "interface",
                                         "local_directory": "local-directory"}

    # -- what a batch system's dask-jobqueue module provides, named by the subclass
    jobqueue_module: ClassVar[str] = ""      # e.g. dask_jobqueue.htcondor
    jobqueue_cluster: ClassVar[str] = ""     # e.g. HTCondorCluster
    jobqueue_job: ClassVar[str] = ""         # e.g. HTCondorJob
    script_suffix: ClassVar[str] = ".sh"     # of the job scripts kept in the campaign folder

    def cluster_class(self):
        import importlib

        return getattr(importlib.import_module(self.jobqueue_module), self.jobqueue_cluster)

    def job_class(self):
        return _recorded_job_class(self.jobqueue_module, self.jobqueue_job, self.script_suffix)

    def directives(self, site: dict[str, Any]):
        """job_extra_directives: the site's, merged with the campaign's."""
        raise NotImplementedError

    def system_kwargs(self, site: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments only this batch system has (disk, walltime, queue, ...)."""
        return {}

    # -- the precedence
    @property
    def pool_tag(self) -> str:
        return f"{self.campaign_id}-{self.pool_name}"

    @property
    def log_directory(self) -> Path:
        mine = self.settings.log_directory
        site = site_settings(self.config_name).get("log-directory")
        if "log_directory" in self.settings.user_keys or not site:
            return Path(mine) if mine else self.pool_dir / "logs"
        return Path(str(site))

    def pick(self, setting: str, key: str, site: dict[str, Any]) -> Any:
        """The value to pass for one setting: the user's, else None where the site sets it (dask-jobqueue
        then reads it), else icegrid's default. A user value replacing the site's is warned about."""
        mine = getattr(self.settings, setting)
        if setting in self.settings.user_keys and mine is not None:
            if key in site and str(site[key]) != str(mine):
                self.warn(f"{setting}={mine} (campaign) replaces jobqueue.{self.config_name}.{key}={site[key]} "
                          "of your dask config")
            return mine
        if key in site:
            return None
        return mine   # icegrid's default (icegrid/config/clusters.yaml)

    def merged_list(self, site_list: list, mine: list, what: str) -> list:
        """Site options first, then the campaign's; a site option the campaign sets too is dropped, named."""
        ours = {option_name(g) for g in option_groups(mine)}
        kept = []
        for group in option_groups(list(site_list or [])):
            if option_name(group) in ours:
                self.warn(f"the campaign's {option_name(group)} replaces '{' '.join(group)}' in "
                          f"jobqueue.{self.config_name}.{what} of your dask config")
            else:
                kept += group
        return kept + list(mine)

    def worker_arguments(self, site: dict[str, Any], security) -> list[str]:
        mine = worker_args(self.settings)
        if self.settings.threads is not None:
            mine += ["--nthreads", str(self.settings.threads)]
        site_args = list(site.get("worker-extra-args") or [])
        if security is not None:  # the campaign's TLS: a site's own protocol or certificates cannot stay
            mine_tls = [g for g in option_groups(site_args) if option_name(g).startswith(("--tls", "--protocol"))]
            for group in mine_tls:
                self.warn(f"the campaign's TLS replaces '{' '.join(group)}' in "
                          f"jobqueue.{self.config_name}.worker-extra-args of your dask config")
            site_args = [a for g in option_groups(site_args) if g not in mine_tls for a in g]
        return self.merged_list(site_args, mine, "worker-extra-args")

    def prologue(self, site: dict[str, Any]) -> list[str]:
        """The site's prologue, then the worker environment, then the campaign's own lines."""
        environ = f'export {NANNY_ENV_VARIABLE}="{nanny_environ_value()}"'
        return list(site.get("job-script-prologue") or []) + [environ] + list(self.settings.prologue)

    def scheduler_options(self, site: dict[str, Any]) -> dict[str, Any]:
        from icegrid.security import dashboard_address

        options = dict(site.get("scheduler-options") or {})
        dashboard = self.settings.dashboard_address
        if dashboard and ("dashboard_address" not in options or "dashboard_address" in self.settings.user_keys):
            options["dashboard_address"] = dashboard
        # A dashboard shows worker addresses, folders and logs: host-less addresses bind loopback.
        options["dashboard_address"] = dashboard_address(options.get("dashboard_address"))
        return options

    def job_kwargs(self, security=None) -> dict[str, Any]:
        """Everything the dask-jobqueue cluster is made with (scheduler and job keywords)."""
        site = site_settings(self.config_name)
        kwargs: dict[str, Any] = {}
        for setting, key in self.scalars.items():
            value = self.pick(setting, key, site)
            if value is not None:
                kwargs[key.replace("-", "_")] = value
        kwargs.update(self.system_kwargs(site))
        kwargs.update(
            log_directory=str(self.log_directory), job_script_prologue=self.prologue(site),
            worker_extra_args=self.worker_arguments(site, security),
            job_extra_directives=self.directives(site), scheduler_options=self.scheduler_options(site),
            security=security, protocol="tls://" if security else None,
            job_cls=self.job_class(), script_dir=str(self.pool_dir / "jobs"), pool_tag=self.pool_tag)
        return kwargs

    # -- the Profile contract
    def workers_wanted(self) -> int:
        return self.settings.jobs

    def start(self, security=None) -> Pool:
        import dask
        from distributed import Client

        from icegrid.grid.replacer import JobReplacer
        from icegrid.security import dashboard_tls_config, security_folder

        self.log_directory.mkdir(parents=True, exist_ok=True)
        SUBMIT_ERRORS.pop(self.pool_tag, None)
        kwargs = self.job_kwargs(security)
        # The scheduler (and its dashboard) starts in this process, inside the constructor.
        with dask.config.set(dashboard_tls_config(kwargs["scheduler_options"]["dashboard_address"],
                                                  security_folder(security))):
            cluster = self.cluster_class()(name=f"icegrid-{self.pool_name}", **kwargs)
        self.cluster = cluster
        try:
            # Never dask's default scheduler: pools close in any order, and a default left behind would
            # send later dask work in the same process (xarray, a notebook) to a closed client.
            client = Client(cluster, security=security, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
        replacer = JobReplacer(cluster, self)
        replacer.start()
        return Pool(self.pool_name, self, client, cluster, replacer, log_directory=self.log_directory)

    def job_script(self, cluster=None) -> str:
        """The script of the first job, exactly as it is submitted (with a placeholder scheduler
        address when no scheduler runs, as in ``--dry-run``)."""
        if cluster is not None:
            kwargs = dict(cluster._job_kwargs)
            address = getattr(cluster.scheduler, "contact_address", None) or cluster.scheduler.address
            name = cluster._new_worker_name(0)
        else:
            kwargs = self.job_kwargs(self._dry_run_security())
            kwargs.pop("scheduler_options")
            kwargs.pop("job_cls")
            kwargs["config_name"] = self.config_name
            address = ("tls" if self.wants_tls() else "tcp") + "://<scheduler-address>:<port>"
            name = f"icegrid-{self.pool_name}-0"
        for key in ("script_dir", "pool_tag"):
            kwargs.pop(key, None)
        return self.job_class()(address, name=name, **kwargs).job_script()

    def _dry_run_security(self):
        """Placeholders where the campaign's credentials will be (nothing is created by a dry run)."""
        if not self.wants_tls():
            return None
        from distributed.security import Security

        folder = self.pool_dir.parent / "tls"
        return Security(tls_ca_file=str(folder / "ca.pem"), tls_worker_cert=str(folder / "cert.pem"),
                        tls_worker_key=str(folder / "key.pem"))

    def bigger_worker_spec(self, cluster, memory: int, resources: dict[str, float]) -> dict:
        from icegrid.grid.oom import batch_job_spec

        return batch_job_spec(cluster, memory, resources)

    def submit_problem(self) -> str | None:
        """Every submission so far failed (none got a job id): the batch system's first message."""
        errors = SUBMIT_ERRORS.get(self.pool_tag)
        cluster = getattr(self, "cluster", None)
        if not errors or cluster is None:
            return None
        if any(getattr(job, "job_id", None) for job in list(cluster.workers.values())):
            return None
        return errors[0]


def same_directive(a: str, b: str) -> bool:
    """HTCondor spells a job attribute ``+Name`` or ``MY.Name``, in any case."""
    def norm(key: str) -> str:
        return re.sub(r"^(\+|my\.)", "my.", key.strip().lower())
    return norm(a) == norm(b)
