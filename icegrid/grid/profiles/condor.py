"""``condor``: every Dask worker is an HTCondor job (dask-jobqueue's HTCondorCluster).

Every job of a campaign run carries the ClassAd attribute ``IcegridCampaign``; the queue is read, and
leftover jobs removed, through the HTCondor Python bindings (``htcondor2``) by that tag alone, so the
user's other jobs are never polled or touched.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import Field

from icegrid.grid.profiles.base import log
from icegrid.grid.profiles.batch import BatchProfile, BatchSettings, RecordedJob, same_directive

TAG_ATTRIBUTE = "IcegridCampaign"
# JobStatus 1 idle, 2 running, 6 transferring output, 7 suspended; 5 (held) never starts by itself.
ALIVE = {1, 2, 6, 7}


class CondorSettings(BatchSettings):
    disk: str | None = Field(None, description="scratch disk requested per job")
    requirements: str | None = Field(None, description="HTCondor requirements expression")
    submit_extra: dict[str, str] = Field(default_factory=dict, description="extra submit-description lines")


@cache
def _job_class():
    from dask_jobqueue.htcondor import HTCondorJob

    class IcegridHTCondorJob(RecordedJob, HTCondorJob):
        script_suffix = ".sub"

    return IcegridHTCondorJob


class CondorProfile(BatchProfile):
    name = "condor"
    Settings = CondorSettings
    script_name = "worker-job.sub"
    config_name = "htcondor"

    def cluster_class(self):
        from dask_jobqueue import HTCondorCluster

        return HTCondorCluster

    def job_class(self):
        return _job_class()

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

    # -- the queue, through the bindings
    def _constraint(self) -> str:
        return f'{TAG_ATTRIBUTE} == "{self.pool_tag}"'

    def queue(self, job_ids: set[str]) -> tuple[set[str], dict[str, str]] | None:
        try:
            import htcondor2

            ads = htcondor2.Schedd().query(constraint=self._constraint(),
                                           projection=["ClusterId", "ProcId", "JobStatus", "HoldReason"])
        except Exception as err:  # no schedd answering right now: look again at the next poll
            log.debug("condor queue: %s", err)
            return None
        alive, problems = set(), {}
        for ad in ads:
            job_id = f"{ad['ClusterId']}.{ad['ProcId']}"
            if int(ad.get("JobStatus", 0)) in ALIVE:
                alive.add(job_id)
            elif ad.get("HoldReason"):
                problems[job_id] = str(ad["HoldReason"])
        return alive, problems

    def remove_jobs(self) -> None:
        """Jobs dask-jobqueue lost track of (replaced ones, a manager killed before): removed by tag."""
        try:
            import htcondor2

            htcondor2.Schedd().act(htcondor2.JobAction.Remove, self._constraint(),
                                   reason="icegrid campaign finished")
        except Exception as err:  # nothing to remove, or no schedd: the jobs' death-timeout ends them
            log.debug("condor remove: %s", err)


PROFILE = CondorProfile
