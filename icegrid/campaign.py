"""Moved to :mod:`icegrid.grid` (spec, plan, manager, campaign); these names stay importable from here."""

from icegrid.grid.campaign import dry_run, open_pools, run_campaign
from icegrid.grid.manager import CampaignError, Manager
from icegrid.grid.plan import PREPROCESS, ShardTask, batch_event_counts, list_inputs, plan
from icegrid.grid.progress import Progress
from icegrid.grid.spec import CampaignSpec, PoolSpec, Retries, StageResources, load_spec, spec_from_flags
from icegrid.grid.summary import CampaignSummary, StageSummary
from icegrid.grid.task import ATTEMPT_TOPIC, run_shard_task

__all__ = ["ATTEMPT_TOPIC", "PREPROCESS", "CampaignError", "CampaignSpec", "CampaignSummary", "Manager", "PoolSpec",
           "Progress", "Retries", "ShardTask", "StageResources", "StageSummary", "batch_event_counts", "dry_run",
           "list_inputs", "load_spec", "open_pools", "plan", "run_campaign", "run_shard_task", "spec_from_flags"]
