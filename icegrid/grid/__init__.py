"""The distributed layer, shaped like dask-jobqueue: one small class per batch system over a shared core.

    profiles/    local | condor | slurm | glidein over one Profile base (base.py; batch.py is the
                 dask-jobqueue core of condor and slurm): a new batch system is one module there
    spec.py      the campaign file (and the same from flags)
    plan.py      shards × stages as shard tasks, and what the store says is done
    manager.py   the run loop as a state object: submit, requeue lost work, record, report
    replacer.py  resubmits batch jobs that left the queue (dask-jobqueue never does)
    preflight.py what can be known wrong before a shard starts, in one line
    campaign.py  run_campaign / dry_run: preflight, pools, manager, analysis
    state.py     the state file the manager keeps and `icegrid status` reads
    worker.py    `icegrid scheduler` and `icegrid worker` (glidein mode)
    task.py      what runs on a worker for every shard task
    commands.py  the grid commands of the CLI (reprocess, status, scheduler, worker)
"""

from icegrid.grid.manager import CampaignError, Manager
from icegrid.grid.plan import PREPROCESS, ShardTask, plan
from icegrid.grid.spec import CampaignSpec, PoolSpec, load_spec, spec_from_flags
from icegrid.grid.summary import CampaignSummary, StageSummary


def run_campaign(*args, **kwargs):
    """See :func:`icegrid.grid.campaign.run_campaign` (imported on use: it pulls in Dask)."""
    from icegrid.grid.campaign import run_campaign as run

    return run(*args, **kwargs)


__all__ = ["PREPROCESS", "CampaignError", "CampaignSpec", "CampaignSummary", "Manager", "PoolSpec", "ShardTask",
           "StageSummary", "load_spec", "plan", "run_campaign", "spec_from_flags"]
