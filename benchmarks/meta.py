"""What each preprocess task pays to find its batch's rows in the split's meta file, at 100 and 2,000
batches: before (the footer parsed by every task, row groups picked by their batch_id statistics) and
after (the planner's row range, the footer parsed once per worker process).

Usage: python benchmarks/meta.py [--batches 100,2000] [--events-per-batch 200] [--tasks 50] [--workdir DIR]

The meta files are written as icegrid's simulator writes them (one row group per batch, zstd; not
timed), with 6 columns. Per split size: the planner's one look (``meta_row_ranges``), then ``--tasks``
batches spread over the split, each read with ``read_meta`` as a preprocess task does; ms per task is the
median. "after" counts the one footer parse a worker makes on its first task separately.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from icegrid import kaggle_meta
from icegrid.kaggle import read_meta
from icegrid.kaggle_meta import meta_row_ranges


def write_meta(path: Path, batches: int, events: int) -> None:
    rng = np.random.default_rng(0)
    offsets = np.arange(events + 1, dtype=np.int64) * 30
    writer = None
    for batch in range(1, batches + 1):
        table = pa.table({"batch_id": np.full(events, batch, np.int64),
                          "event_id": np.arange(events, dtype=np.int64) + batch * events,
                          "first_pulse_index": offsets[:-1], "last_pulse_index": offsets[1:] - 1,
                          "azimuth": rng.uniform(0, 2 * np.pi, events), "zenith": rng.uniform(0, np.pi, events)})
        writer = writer or pq.ParquetWriter(path.with_suffix(".partial"), table.schema, compression="zstd")
        writer.write_table(table, row_group_size=events)
    writer.close()
    path.with_suffix(".partial").replace(path)


def per_task_ms(meta: Path, sample: list[int], n_rows: int, ranges: dict | None) -> list[float]:
    out = []
    for batch in sample:
        if ranges is None:
            kaggle_meta._FOOTERS.clear()     # before: nothing kept from one task to the next
        started = time.perf_counter()
        read_meta(meta, meta.parent / "train" / f"batch_{batch}.parquet", n_rows,
                  rows=None if ranges is None else ranges[batch])
        out.append((time.perf_counter() - started) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="100,2000")
    parser.add_argument("--events-per-batch", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icegrid-bench-meta")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} before the run; {args.events_per_batch} events per batch, "
          f"median over {args.tasks} tasks")
    for batches in (int(b) for b in args.batches.split(",")):
        meta = args.workdir / f"meta-{batches}x{args.events_per_batch}.parquet"
        if not meta.exists():
            write_meta(meta, batches, args.events_per_batch)
        sample = sorted(set(np.linspace(1, batches, min(args.tasks, batches)).astype(int).tolist()))
        n_rows = args.events_per_batch * 30
        before = per_task_ms(meta, sample, n_rows, None)
        kaggle_meta._FOOTERS.clear()
        started = time.perf_counter()
        ranges = meta_row_ranges(meta)                   # the planner, once per split
        planner = (time.perf_counter() - started) * 1e3
        kaggle_meta._FOOTERS.clear()                     # a worker's first task parses the footer
        started = time.perf_counter()
        kaggle_meta.meta_footer(meta)
        first = (time.perf_counter() - started) * 1e3
        after = per_task_ms(meta, sample, n_rows, ranges)
        print(f"{batches:>6} batches: before {statistics.median(before):6.2f} ms per task; after "
              f"{statistics.median(after):6.2f} ms per task (+ {first:.1f} ms once per worker process, "
              f"planner {planner:.1f} ms once per split); {statistics.median(before) / statistics.median(after):.0f}x")


if __name__ == "__main__":
    main()
