"""Progress that suits a terminal and a log file alike, for every long-running command (campaigns,
``simulate``, ``train``, ``infer``).

A :class:`Meter` follows one stage of work. On a terminal it is a tqdm bar. Anywhere else (stderr piped
to a file, a manager or training run as a batch job) it prints a plain line every
``ICEGRID_PROGRESS_INTERVAL`` seconds (default 60) and when the stage ends — stage, done/total, events,
events/s over the stage's own active time and an ETA — and never a carriage return or cursor code.
The clock starts at :meth:`Meter.start` (or creation), so a stage that waited behind another, or work
already done before a resume, does not dilute the rate.
"""

from __future__ import annotations

import os
import sys
import time

INTERVAL_ENV = "ICEGRID_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 60.0


def interval_s() -> float:
    """Seconds between plain progress lines: ``$ICEGRID_PROGRESS_INTERVAL``, else 60."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        return max(0.0, float(text)) if text else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def on_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def eta(seconds: float) -> str:
    """'4m05s', '2h07m'; '?' when unknown."""
    if seconds != seconds or seconds == float("inf") or seconds < 0:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Meter:
    """One stage: ``done``/``total`` in ``unit`` (batches, shards, events) and the events behind them.

    ``events_total``: the events this run has to do (then the ETA and a bar count events); without it
    the ETA comes from the units' rate. ``initial``: units done before this run (a resumed epoch), not
    counted in the rate. ``enabled=False``: silent.
    """

    def __init__(self, what: str, total: int, unit: str = "events", *, events_total: int | None = None,
                 initial: int = 0, enabled: bool = True, stream=None, start: bool = True, leave: bool = True,
                 label: str | None = None, position: int | None = None):
        self.what, self.total, self.unit, self.events_total = what, int(total), unit, events_total
        self.done = self.initial = int(initial)
        self.skipped = 0
        self.events = 0
        self.fields: dict[str, object] = {}
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interval = interval_s()
        self.started_at = time.monotonic() if start else None
        self.last_line = time.monotonic()
        self.printed: tuple | None = None
        self.bar = None
        self.counts_events = False
        if enabled and on_terminal(self.stream):
            from tqdm import tqdm

            counts_events = events_total is not None and unit != "events"
            self.bar = tqdm(total=events_total if counts_events else self.total,
                            initial=0 if counts_events else initial, desc=label or what.rstrip(":"),
                            unit="events" if counts_events else unit, unit_scale=counts_events, leave=leave,
                            dynamic_ncols=True, file=self.stream, position=position)
            self.counts_events = counts_events

    def start(self) -> None:
        """Start the stage's clock (once): its rate counts from here."""
        if self.started_at is None:
            self.started_at = time.monotonic()
            if self.bar is not None:
                self.bar.reset(total=self.bar.total)      # restarts tqdm's clock too

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def rate(self) -> float:
        """Events per second of this stage's active time."""
        elapsed = self.elapsed()
        return self.events / elapsed if elapsed > 0 else 0.0

    def eta(self) -> str:
        elapsed = self.elapsed()
        if self.events_total is not None:
            left, speed = max(0, self.events_total - self.events), self.rate()
        else:
            left = max(0, self.total - self.done)
            speed = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        return "0m00s" if left == 0 else eta(left / speed) if speed > 0 else "?"

    def line(self) -> str:
        parts = [f"progress: {self.what} {self.done:,}/{self.total:,} {self.unit}"]
        if self.unit != "events":
            parts.append(f"{self.events:,} events")
        parts.extend(f"{key} {value}" for key, value in self.fields.items())
        parts.append(f"{self.rate():,.0f} events/s")
        parts.append(f"ETA {self.eta()}")
        return ", ".join(parts)

    def update(self, n: int = 1, events: int | None = None, *, done: int | None = None, final: bool = False,
               **fields) -> None:
        """``n`` more units done (or ``done`` in all) and ``events`` more events (default: ``n`` when the
        unit is events); ``fields`` (loss=…) join the line. ``final``: the stage is over, say so now."""
        events = n if events is None and self.unit == "events" else int(events or 0)
        self.done = self.done + n if done is None else int(done)
        self.events += events
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(events if self.counts_events else n)
            postfix = ({self.unit: f"{self.done}/{self.total}"} if self.counts_events else {}) | self.fields
            self.bar.set_postfix({k: str(v) for k, v in postfix.items()}, refresh=False)
            return
        now = time.monotonic()
        if self.enabled and (final or self.done >= self.total or now - self.last_line >= self.interval):
            self._print(now)

    def skip(self, n: int = 1, events: int = 0) -> None:
        """``n`` units that need no work (already there): done, and their events leave the total."""
        self.done += n
        self.skipped += n
        if self.events_total is not None:
            self.events_total = max(0, self.events_total - int(events))
            if self.bar is not None and self.counts_events:
                self.bar.total = self.events_total
        if self.bar is not None and not self.counts_events:
            self.bar.update(n)

    def _print(self, now: float) -> None:
        self.last_line = now
        self.printed = (self.done, self.events)
        print(self.line(), file=self.stream, flush=True)

    def echo(self, text: str, err: bool = False) -> None:
        """A line of output that does not tear a bar on the same terminal."""
        out = sys.stderr if err else sys.stdout
        if self.bar is not None:
            self.bar.write(text, file=out)
        else:
            print(text, file=out, flush=True)

    def close(self) -> None:
        """End the stage: close the bar, or print the last line if the log has not seen this state."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.printed != (self.done, self.events) and \
                (self.events or self.done > self.initial + self.skipped):     # some work to report
            self._print(time.monotonic())

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
