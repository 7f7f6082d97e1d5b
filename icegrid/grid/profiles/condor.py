"""``condor``: every Dask worker is an HTCondor job (dask-jobqueue's HTCondorCluster).

Every job of a campaign run carries the ClassAd attribute ``IcegridCampaign``; the queue is read, and
leftover jobs removed, by that tag alone — through the HTCondor Python bindings (``htcondor2``), or
``condor_q``/``condor_rm`` where the bindings cannot talk to the schedd — so the user's other jobs are
never polled or touched.
"""

from __future__ import annotations

import subprocess
from typing import Any

from pydantic import Field

from icegrid.grid.profiles.base import log
from icegrid.grid.profiles.batch import BatchProfile, BatchSettings, same_directive

TAG_ATTRIBUTE = "IcegridCampaign"
# JobStatus 1 idle, 2 running, 6 transferring output, 7 suspended; 5 (held) never starts by itself.
ALIVE = {1, 2, 6, 7}


class CondorSettings(BatchSettings):
    disk: str | None = Field(None, description="scratch disk requested per job")
    requirements: str | None = Field(None, description="HTCondor requirements expression")
    submit_extra: dict[str, str] = Field(default_factory=dict, description="extra submit-description lines")


class CondorProfile(BatchProfile):
    name = "condor"
    Settings = CondorSettings
    script_name = "worker-job.sub"
    config_name = "htcondor"

    jobqueue_module, jobqueue_cluster, jobqueue_job, script_suffix = "dask_jobqueue.htcondor", "HTCondorCluster", "HTCondorJob", ".sub"

    def system_kwargs(self, site: dict[str, Any]) -> dict[str, Any]:
        disk = self.pick("disk", "disk", site)
        return {"disk": disk} if disk is not None else {}

    def directives(self, site: dict[str, Any]) -> dict[str, str]:
        s = self.settings
        mine = dict(s.submit_extra)
        if s.gpus:
            mine.setdefault("request_gpus", str(s.gpus))
        if s.requirements:
            mine.setdefault("requirements", s.requirements)
        merged: dict[str, Any] = {}
        for key, value in dict(site.get("job-extra-directives") or {}).items():
            replaced = next((k for k in mine if same_directive(k, key)), None)
            if replaced is not None and str(mine[replaced]) != str(value):
                self.warn(f"the campaign's {replaced} = {mine[replaced]} replaces {key} = {value} in "
                          "jobqueue.htcondor.job-extra-directives of your dask config")
            if replaced is None:
                merged[key] = value
        merged.update(mine)
        merged[f"MY.{TAG_ATTRIBUTE}"] = f'"{self.pool_tag}"'
        return merged

    # -- the queue, by tag: through the bindings, else (bindings that cannot talk to this schedd, e.g.
    # newer than its daemons) through condor_q / condor_rm with the same constraint
    def _constraint(self) -> str:
        return f'{TAG_ATTRIBUTE} == "{self.pool_tag}"'

    def queue(self, job_ids: set[str]) -> tuple[set[str], dict[str, str]] | None:
        rows = _query_bindings(self._constraint())
        if rows is None:
            rows = _query_cli(self._constraint())
        if rows is None:
            return None
        alive, problems = set(), {}
        for job_id, status, reason in rows:
            if status in ALIVE:
                alive.add(job_id)
            elif reason and reason != "undefined":
                problems[job_id] = reason
        return alive, problems

    def remove_jobs(self) -> None:
        """Jobs dask-jobqueue lost track of (replaced ones, a manager killed before): removed by tag."""
        try:
            import htcondor2

            htcondor2.Schedd().act(htcondor2.JobAction.Remove, self._constraint(),
                                   reason="icegrid campaign finished")
            return
        except Exception as err:  # see _query_bindings
            log.debug("condor remove (bindings): %s", err)
        try:
            subprocess.run(["condor_rm", "-constraint", self._constraint()], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as err:  # no schedd: the jobs' death-timeout ends them
            log.debug("condor_rm: %s", err)


def _query_bindings(constraint: str) -> list[tuple[str, int, str]] | None:
    try:
        import htcondor2

        ads = htcondor2.Schedd().query(constraint=constraint,
                                       projection=["ClusterId", "ProcId", "JobStatus", "HoldReason"])
    except Exception as err:  # no schedd answering, or one these bindings cannot authenticate to
        log.debug("condor queue (bindings): %s", err)
        return None
    return [(f"{ad['ClusterId']}.{ad['ProcId']}", int(ad.get("JobStatus", 0)), str(ad.get("HoldReason") or ""))
            for ad in ads]


def _query_cli(constraint: str) -> list[tuple[str, int, str]] | None:
    try:
        out = subprocess.run(["condor_q", "-allusers", "-constraint", constraint, "-af:t", "ClusterId", "ProcId",
                              "JobStatus", "HoldReason"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("condor_q: %s", err)
        return None
    rows = []
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[2].isdigit():
            rows.append((f"{fields[0]}.{fields[1]}", int(fields[2]), " ".join(fields[3:])))
    return rows


PROFILE = CondorProfile
