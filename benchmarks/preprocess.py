"""Preprocess events/s for one 200,000-event batch, against a bare pyarrow read of the same file.

Usage: python benchmarks/preprocess.py [--events 200000] [--repeats 3] [--workdir DIR]
Both are measured in the same run, alternating, on the same file; the ratio is preprocess / bare read
(goal: <= 3). preprocess = read + validate against the meta file + write and publish the Zarr shard.
"""

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from icegrid.geometry import icecube86
from icegrid.preprocess import preprocess_shard
from icegrid.simulate import write_dataset
from icegrid.store import EventStore


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="icegrid-bench-"))
    data = workdir / "data"
    if not (data / "train" / "batch_1.parquet").exists():
        write_dataset(data, batches=1, events_per_batch=args.events, seed=0)
    batch = data / "train" / "batch_1.parquet"
    n_pulses = pq.read_metadata(batch).num_rows
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.events:,} events, {n_pulses:,} pulses, {batch.stat().st_size / 1e6:.0f} MB parquet")
    reads, preps = [], []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        pq.read_table(batch)
        reads.append(time.perf_counter() - started)
        store_path = workdir / f"events-{repeat}.zarr"
        shutil.rmtree(store_path, ignore_errors=True)
        EventStore.create(store_path, icecube86())
        started = time.perf_counter()
        preprocess_shard(batch, store_path)
        preps.append(time.perf_counter() - started)
        shutil.rmtree(store_path)
        print(f"run {repeat + 1}: pyarrow read_table {reads[-1]:.3f} s, preprocess_shard {preps[-1]:.3f} s, "
              f"ratio {preps[-1] / reads[-1]:.2f}, {args.events / preps[-1]:,.0f} events/s")
    read, prep = statistics.median(reads), statistics.median(preps)
    print(f"median of {args.repeats}: preprocess {args.events / prep:,.0f} events/s "
          f"({n_pulses / prep / 1e6:.1f} M pulses/s); bare read {read:.3f} s; ratio preprocess/read {prep / read:.2f}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
