"""Moved to :mod:`icegrid.grid.profiles` (one module per profile) and :mod:`icegrid.grid.worker`; these
names stay importable from here."""

from __future__ import annotations

from pathlib import Path

from icegrid.grid.profiles import PROFILE_NAMES as PROFILES, load_profile, profile_class
from icegrid.grid.profiles.base import Pool, wait_for_workers, worker_args
from icegrid.grid.replacer import JobReplacer
from icegrid.grid.worker import exec_worker, serve_scheduler, worker_command


def open_pool(profile: str, settings, campaign_dir: Path, name: str | None = None, security=None) -> Pool:
    """Start (or, for glidein, connect to) the scheduler of one pool; ``campaign_dir`` is the pool's folder."""
    return profile_class(profile)(settings, name or profile, Path(campaign_dir)).start(security)


def batch_cluster(profile: str, settings, campaign_dir: Path, security=None):
    """The dask-jobqueue cluster of a condor or slurm profile (no jobs submitted yet)."""
    cls = profile_class(profile)
    instance = cls(settings, profile, Path(campaign_dir))
    instance.log_directory.mkdir(parents=True, exist_ok=True)
    return instance.cluster_class()(name=f"icegrid-{profile}", **instance.job_kwargs(security))


__all__ = ["PROFILES", "JobReplacer", "Pool", "batch_cluster", "exec_worker", "load_profile", "open_pool",
           "serve_scheduler", "wait_for_workers", "worker_args", "worker_command"]
