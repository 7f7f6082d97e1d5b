"""Campaign progress that suits a terminal and a log file alike.

On a terminal: one tqdm bar per stage. Otherwise (a manager running as a batch job, stderr piped to a
file): one plain line per stage every ``ICEGRID_PROGRESS_INTERVAL`` seconds (default 60) and when a
stage ends — stage, shards done/total, events/s over the stage's own active time, and an ETA — never
carriage returns or cursor codes. Rates count from a stage's first submitted shard, so a stage that
queued behind another reports the rate it runs at.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

from icegrid.grid.summary import StageSummary


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, stages: dict[str, StageSummary], totals: dict[str, int], enabled: bool, stream=None):
        self.bars = {}
        self.stages, self.totals = stages, totals
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.started_at: dict[str, float] = {}
        self.events: Counter = Counter()
        self.interval = float(os.environ.get("ICEGRID_PROGRESS_INTERVAL", 60))
        self.last_line = time.monotonic()
        self.as_bars = enabled and getattr(self.stream, "isatty", lambda: False)()
        if not self.as_bars:
            return
        from tqdm import tqdm

        width = max(len(s) for s in stages) if stages else 10
        for position, (stage, summary) in enumerate(stages.items()):
            self.bars[stage] = tqdm(total=totals[stage], desc=f"{stage:<{width}}", unit="events", unit_scale=True,
                                    position=position, leave=True, dynamic_ncols=True, file=self.stream,
                                    postfix={"shards": f"{summary.skipped}/{summary.total}"})

    def started(self, stage: str) -> None:
        if stage not in self.started_at:
            self.started_at[stage] = time.monotonic()
            bar = self.bars.get(stage)
            if bar is not None:
                bar.reset(total=bar.total)      # restarts tqdm's clock: the rate is this stage's own

    def rate(self, stage: str) -> float:
        elapsed = time.monotonic() - self.started_at.get(stage, time.monotonic())
        return self.events[stage] / elapsed if elapsed > 0 else 0.0

    def line(self, stage: str, summary: StageSummary) -> str:
        rate = self.rate(stage)
        left = max(0, self.totals.get(stage, 0) - self.events[stage])
        eta = _eta(left / rate) if rate > 0 else "?"
        return (f"progress: {stage} {summary.finished}/{summary.total} shards, {self.events[stage]:,} events, "
                f"{rate:,.0f} events/s, ETA {eta if left else '0m00s'}")

    def update(self, stage: str, events: int, summary: StageSummary, retried: int) -> None:
        self.events[stage] += events
        bar = self.bars.get(stage)
        if bar is not None:
            bar.set_postfix(shards=f"{summary.finished}/{summary.total}", retried=retried, refresh=False)
            bar.update(events)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        stage_over = summary.finished + summary.failed >= summary.total
        if stage_over or now - self.last_line >= self.interval:
            self.last_line = now
            print(self.line(stage, summary), file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
