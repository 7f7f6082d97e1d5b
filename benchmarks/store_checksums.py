"""Cost of the store's integrity features on one 200,000-event shard: crc32c chunks and the marker check.

Usage: python benchmarks/store_checksums.py [--events 200000] [--repeats 5] [--workdir DIR]
Writes, then reads, the shard's arrays (same event chunks, same blosc settings as icegrid.store, padding
left out) with and without the crc32c codec, alternating on the same batch (from the page cache), and times the completeness check (one stat per file)
that has_shard/read_shard do, and a full EventStore.write_shard / read_shard.
"""

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from icegrid import integrity
from icegrid.geometry import icecube86
from icegrid.kaggle import read_batch
from icegrid.simulate import write_dataset
from icegrid.shard_arrays import CHUNK_EVENTS, codecs_for, plan_chunks
from icegrid.store import PULSE_COLUMNS, EventStore


def _arrays(batch) -> dict[str, tuple[np.ndarray, int]]:
    events = {"event_id": batch.event_id, "offset": batch.offsets, "n_pulses": batch.n_pulses,
              "azimuth": batch.azimuth, "zenith": batch.zenith, "energy": batch.energy, "shape": batch.shape}
    out = {f"events/{k}": (v, CHUNK_EVENTS) for k, v in events.items() if v is not None}
    pulse_chunk = plan_chunks(batch.offsets, CHUNK_EVENTS).chunk_pulses
    out.update({f"pulses/{c}": (getattr(batch, c), pulse_chunk) for c in PULSE_COLUMNS})
    return out


def _write(path: Path, arrays, checksums: bool) -> tuple[float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    group = zarr.open_group(path, mode="w")
    for key, (data, chunk) in arrays.items():
        codecs = codecs_for(key.rsplit("/", 1)[-1])
        group.create_array(key, data=np.ascontiguousarray(data), chunks=(min(chunk, data.shape[0]),),
                           compressors=codecs if checksums else codecs[:1], config={"write_empty_chunks": True})
    return time.perf_counter() - started, time.process_time() - cpu


def _read(path: Path, arrays) -> tuple[float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    group = zarr.open_group(path, mode="r")
    for key in arrays:
        group[key][...]
    return time.perf_counter() - started, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="icegrid-bench-"))
    data = workdir / "data"
    if not (data / "train" / "batch_1.parquet").exists():
        write_dataset(data, batches=1, events_per_batch=args.events, seed=0)
    batch = read_batch(data / "train" / "batch_1.parquet")
    arrays = _arrays(batch)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{batch.n_events:,} events, {batch.sensor_id.shape[0]:,} pulses")
    configs = {"blosc": False, "blosc+crc32c": True}
    times = {name: {"write": [], "read": []} for name in configs}
    for repeat in range(args.repeats):
        for name, checksums in configs.items():
            path = workdir / f"{name}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            times[name]["write"].append(_write(path, arrays, checksums))
            os.sync()  # so the reads below do not compete with the write-back of these pages
    for repeat in range(args.repeats):
        for name in configs:
            times[name]["read"].append(_read(workdir / f"{name}.zarr", arrays))
    # The best of the repeats: on a shared machine the others mostly measure the neighbours.
    for op in ("write", "read"):
        for index, clock in enumerate(("wall", "cpu")):
            plain, checked = (min(t[index] for t in times[n][op]) for n in configs)
            print(f"{op:5s} {clock:4s}: blosc {plain:.3f} s, blosc+crc32c {checked:.3f} s, "
                  f"overhead {100 * (checked / plain - 1):+.1f}% (best of {args.repeats})")

    shutil.rmtree(workdir / "events.zarr", ignore_errors=True)
    store = EventStore.create(workdir / "events.zarr", icecube86())
    started = time.perf_counter()
    store.write_shard("s", batch)
    write_s = time.perf_counter() - started
    shard_dir = store.path / "shards" / "s"
    checks = []
    for _ in range(20):
        started = time.perf_counter()
        assert integrity.problem(shard_dir) is None
        checks.append(time.perf_counter() - started)
    started = time.perf_counter()
    store.read_shard("s")
    read_s = time.perf_counter() - started
    n_files = sum(1 for p in shard_dir.rglob("*") if p.is_file())
    print(f"EventStore.write_shard {write_s:.3f} s, read_shard {read_s:.3f} s; completeness check "
          f"{1e3 * statistics.median(checks):.2f} ms ({n_files} files)")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
