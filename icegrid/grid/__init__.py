"""The distributed layer, shaped like dask-jobqueue: one small class per batch system over a shared core.

    profiles/    local | condor | slurm | glidein over one Profile base (base.py; batch.py is the
                 dask-jobqueue core of condor and slurm): a new batch system is one module there
    spec.py      the campaign file (and the same from flags)
    plan.py      shards × stages as shard tasks, and what the store says is done
    manager.py   the run loop as a state object: submit, requeue lost work, record, report
    replacer.py  resubmits batch jobs that left the queue (dask-jobqueue never does), cancels stuck ones
    preflight.py what can be known wrong before a shard starts, in one line
    campaign.py  run_campaign / dry_run: preflight, pools, manager, analysis
    progress.py  per-stage progress lines or bars (over icegrid.progress.Meter, shared with train/infer)
    state.py     the state file the manager keeps and `icegrid status` reads
    worker.py    `icegrid scheduler` and `icegrid worker` (glidein mode)
    task.py      what runs on a worker for every shard task
    commands.py  the grid commands of the CLI (reprocess, status, scheduler, worker)
"""

# Imported on first use (PEP 562): `icegrid --help` should not pay for pydantic and Dask.
_NAMES = {"CampaignError": "manager", "Manager": "manager", "PREPROCESS": "plan", "ShardTask": "plan", "plan": "plan",
          "CampaignSpec": "spec", "PoolSpec": "spec", "load_spec": "spec", "spec_from_flags": "spec",
          "CampaignSummary": "summary", "StageSummary": "summary", "run_campaign": "campaign", "dry_run": "campaign"}


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'icegrid.grid' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f"icegrid.grid.{_NAMES[name]}"), name)


__all__ = sorted(_NAMES)
