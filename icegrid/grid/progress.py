"""Campaign progress: one :class:`icegrid.progress.Meter` per stage (a tqdm bar on a terminal, plain
lines on a log file: stage, shards done/total, events, events/s over the stage's own active time, ETA).
Rates count from a stage's first submitted shard, so a stage that queued behind another reports the
rate it runs at.
"""

from __future__ import annotations

from icegrid.grid.summary import StageSummary
from icegrid.progress import Meter


class Progress:
    def __init__(self, stages: dict[str, StageSummary], totals: dict[str, int], enabled: bool, stream=None):
        width = max(len(s) for s in stages) if stages else 10
        self.meters = {
            stage: Meter(stage, summary.total, "shards", events_total=totals.get(stage, 0), initial=summary.skipped,
                         enabled=enabled, stream=stream, start=False, label=f"{stage:<{width}}", position=position)
            for position, (stage, summary) in enumerate(stages.items())}

    def started(self, stage: str) -> None:
        self.meters[stage].start()

    def rate(self, stage: str) -> float:
        return self.meters[stage].rate()

    def update(self, stage: str, events: int, summary: StageSummary, retried: int) -> None:
        fields = {"retried": retried} if retried else {}
        self.meters[stage].update(0, events, done=summary.finished,
                                  final=summary.finished + summary.failed >= summary.total, **fields)

    def close(self) -> None:
        for meter in self.meters.values():
            if meter.bar is not None:
                meter.bar.close()
