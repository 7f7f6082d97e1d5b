"""What a campaign run did: per-stage counts, retries, failures, placements (written as summary.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageSummary:
    total: int = 0
    skipped: int = 0          # already in the store when the campaign started
    done: int = 0             # completed by this run
    failed: int = 0
    events: int = 0           # events processed by this run
    compute_s: float = 0.0    # time inside shard functions, summed over workers
    in_flight: int = 0        # submitted and not yet back (for `icegrid status`)

    @property
    def finished(self) -> int:
        return self.skipped + self.done


@dataclass
class CampaignSummary:
    stages: dict[str, StageSummary] = field(default_factory=dict)
    retried_lost: int = 0                 # resubmitted by the manager after KilledWorker / a lost pool
    retried_errors: int = 0               # resubmitted after the shard function raised
    retried_memory: int = 0               # resubmitted on a larger worker after an out-of-memory kill
    restarts: int = 0                     # attempts beyond the first, seen on workers (incl. distributed's own)
    failures: dict[str, str] = field(default_factory=dict)   # task key -> reason
    ran: list[str] = field(default_factory=list)             # task keys completed by this run
    skipped: list[str] = field(default_factory=list)         # task keys found done in the store
    per_pool: dict[str, int] = field(default_factory=dict)   # tasks completed per pool
    placements: dict[str, str] = field(default_factory=dict) # task key -> worker that completed it
    wall_s: float = 0.0
    dashboards: dict[str, str | None] = field(default_factory=dict)
    error_logs: dict[str, str] = field(default_factory=dict)  # pool -> file with the failed shards' tracebacks
    analysis: Any = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def text(self) -> str:
        lines = [f"campaign finished in {self.wall_s:.1f} s: "
                 + ("all shards done" if self.ok else f"{len(self.failures)} failed")]
        for stage, s in self.stages.items():
            rate = f", {s.events / s.compute_s:,.0f} events/s per worker" if s.compute_s > 0 and s.events else ""
            lines.append(f"  {stage:<22} {s.done:>5} done, {s.skipped:>5} already in store, "
                         f"{s.failed:>3} failed  ({s.events:,} events{rate})")
        lines.append(f"  retried: {self.retried_lost} after lost workers, {self.retried_errors} after errors, "
                     f"{self.retried_memory} on larger workers after running out of memory; "
                     f"{self.restarts} restarts seen on workers")
        if len(self.per_pool) > 1:
            lines.append("  per pool: " + ", ".join(f"{k} {v}" for k, v in self.per_pool.items()))
        if isinstance(self.analysis, dict) and self.analysis:
            lines.append(f"  analysis: {Path(next(iter(self.analysis.values()))).parent}")
        for key, reason in sorted(self.failures.items()):
            lines.append(f"  FAILED {key}: {reason}")
        return "\n".join(lines)
