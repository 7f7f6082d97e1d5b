"""``slurm``: every Dask worker is an ``sbatch`` job (dask-jobqueue's SLURMCluster); GPUs through --gres.

The jobs of a campaign run share one job name (``icegrid-<run>-<pool>``); the queue is read by that
name alone, with ``squeue --json`` where the installed SLURM has it and plain columns otherwise. Ended
jobs are read too (``--states=all``, for MinJobAge): one ended ``OUT_OF_MEMORY`` is reported as such.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from pydantic import Field

from icegrid.grid.profiles.base import log
from icegrid.grid.profiles.batch import BatchProfile, BatchSettings, option_name

ALIVE = {"PD", "R", "CF", "S", "RQ", "RF", "RS", "PENDING", "RUNNING", "CONFIGURING", "SUSPENDED",
         "REQUEUED", "REQUEUE_FED", "RESIZING", "COMPLETING"}


class SlurmSettings(BatchSettings):
    walltime: str | None = Field(None, description="job time limit")
    partition: str | None = None
    account: str | None = None
    sbatch_extra: list[str] = Field(default_factory=list, description="extra '#SBATCH' options, e.g. --qos=x")


class SlurmProfile(BatchProfile):
    name = "slurm"
    Settings = SlurmSettings
    script_name = "worker-job.sh"
    config_name = "slurm"

    jobqueue_module, jobqueue_cluster, jobqueue_job, script_suffix = "dask_jobqueue.slurm", "SLURMCluster", "SLURMJob", ".sh"

    @property
    def job_name(self) -> str:
        return f"icegrid-{self.pool_tag}"

    def system_kwargs(self, site: dict[str, Any]) -> dict[str, Any]:
        out = {"job_name": self.job_name}
        if "name" in site:
            self.warn(f"icegrid names its jobs {self.job_name} (to find them in the queue); "
                      f"jobqueue.slurm.name={site['name']} of your dask config is not used")
        for setting, key in (("walltime", "walltime"), ("partition", "queue"), ("account", "account")):
            value = self.pick(setting, key, site)
            if value is not None:
                out[key] = value
        return out

    def directives(self, site: dict[str, Any]) -> list[str]:
        mine = [f"--gres=gpu:{self.settings.gpus}"] if self.settings.gpus else []
        mine += list(self.settings.sbatch_extra)
        ours = {option_name(d) for d in mine}
        kept = []
        for directive in site.get("job-extra-directives") or []:
            if option_name(directive) in ours:
                self.warn(f"the campaign's {option_name(directive)} replaces '{directive}' in "
                          "jobqueue.slurm.job-extra-directives of your dask config")
            else:
                kept.append(directive)
        return kept + mine

    def queue(self, job_ids: set[str]) -> tuple[set[str], dict[str, str]] | None:
        rows = _squeue_json(self.job_name)
        if rows is None:
            rows = _squeue_text(self.job_name)
        if rows is None:
            return None
        alive, problems = set(), {}
        for job_id, state, reason in rows:
            if state in ALIVE:
                alive.add(job_id)
            elif state in ("OUT_OF_MEMORY", "OOM"):   # SLURM ended it for memory (icegrid/grid/oom.py)
                problems[job_id] = "OUT_OF_MEMORY"
            elif reason and reason not in ("None", "undefined"):
                problems[job_id] = reason
        return alive, problems


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("%s: %s", cmd[0], err)
        return None


def _squeue_json(name: str) -> list[tuple[str, str, str]] | None:
    out = _run(["squeue", "--name", name, "--states=all", "--json"])
    try:
        jobs = json.loads(out)["jobs"] if out else None
    except (ValueError, KeyError):
        return None
    if jobs is None:
        return None
    rows = []
    for job in jobs:
        state = job.get("job_state")
        state = state[0] if isinstance(state, list) and state else state
        rows.append((str(job.get("job_id")), str(state or ""), str(job.get("state_reason") or "")))
    return rows


def _squeue_text(name: str) -> list[tuple[str, str, str]] | None:
    out = _run(["squeue", "-h", "--name", name, "--states=all", "-o", "%i\t%T\t%r"])
    if out is None:
        return None
    return [tuple((line.split("\t") + ["", ""])[:3]) for line in out.splitlines() if line.strip()]


PROFILE = SlurmProfile
