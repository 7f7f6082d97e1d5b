"""The campaign manager's overhead per shard against the shard's compute time, and the speedup of 2
workers over 1, measured in the same run on the same simulated set.

Usage: python benchmarks/campaign.py [--batches 4] [--events-per-batch 200000] [--models linefit]
                                     [--workdir DIR] [--resume 2000 [--runs 3]]

1. A simulated set of --batches Kaggle batch files is written once in --workdir (reused when there;
   not timed). The default shard is one Kaggle batch: 200,000 events.
2. Timed, on a LocalCluster with 1 worker process (1 thread): the full campaign (preprocess every batch,
   then infer every model on every shard) into a fresh store. ``compute`` is the time spent inside the
   shard functions (measured on the worker around the call); with one worker everything else in the
   wall time — submitting, scheduling, moving results, the manager's bookkeeping and store checks — is
   the manager's overhead. Reported per shard task and as a fraction of the mean compute per task.
3. The same campaign into another fresh store with 2 worker processes: speedup = wall(1) / wall(2).
4. The manager's floor: 200 empty tasks through the same manager on the 1-worker pool (per-task cost
   when there is nothing to compute).
Workers are warmed up (stage modules imported) before each timed run, so one-off imports are not
counted as per-shard overhead. Goal: overhead below 1% of compute at the default shard size.

``--resume N``: instead, the resume of a finished campaign of N small shards (``--events-per-batch``,
default here 50) with the analysis on. The store is built once in --workdir, quickly and not timed
(preprocess and linefit called directly, 2 processes); then `icegrid reprocess` (a fresh process, the
local profile, 1 worker) runs on it ``--runs`` + 1 times: the first run analyses (the analysis of the
finished store), every later one finds every shard and the analysis done. Goal (issue 13): <= 5 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from pathlib import Path

from icegrid.campaign import CampaignSpec, Manager, ShardTask, plan
from icegrid.clusters import load_profile, open_pool, wait_for_workers
from icegrid.models.registry import expand
from icegrid.preprocess import find_geometry
from icegrid.simulate import write_dataset
from icegrid.store import EventStore


def _warm_up() -> None:
    import icegrid.inference  # noqa: F401  (torch and the model registry: seconds, once per worker)
    import icegrid.preprocess  # noqa: F401


def timed_campaign(data: Path, store: Path, models: list[str], workers: int) -> tuple[float, float, int]:
    """(wall seconds of the manager's run, compute seconds summed over tasks, tasks) for one campaign."""
    shutil.rmtree(store, ignore_errors=True)
    spec = CampaignSpec(inputs=[str(data)], store=str(store), models=models, analysis=False)
    EventStore.create(store, find_geometry(data))
    tasks = plan(spec, models)
    pool = open_pool("local", load_profile("local", {"workers": workers, "dashboard_address": ":0"}),
                     store.parent / f"campaign-{workers}")
    try:
        pool.scale(workers)
        assert wait_for_workers(pool.client, workers, 120) == workers
        pool.client.run(_warm_up)
        summary = Manager([pool], progress=False).run(tasks)
    finally:
        pool.close()
    if not summary.ok:
        raise SystemExit(f"campaign failed: {summary.failures}")
    compute = sum(stage.compute_s for stage in summary.stages.values())
    return summary.wall_s, compute, len(tasks)


def manager_floor(n_tasks: int = 200) -> float:
    """Seconds per empty task through the manager on one worker."""
    pool = open_pool("local", load_profile("local", {"workers": 1, "dashboard_address": ":0"}),
                     Path(tempfile.gettempdir()) / "icegrid-bench-floor")
    try:
        pool.scale(1)
        wait_for_workers(pool.client, 1, 120)
        # The worker cannot import this script: give it a module with an empty shard function.
        pool.client.run(_install_empty_module)
        tasks = [ShardTask(key=f"empty/{i}", stage="empty", shard=str(i), func="benchmarks_campaign_empty:empty_task")
                 for i in range(n_tasks)]
        summary = Manager([pool], progress=False).run(tasks)
    finally:
        pool.close()
    return summary.wall_s / n_tasks


def _install_empty_module() -> None:
    """Make an importable module holding ``empty_task`` inside the worker process."""
    import sys
    import types

    module = types.ModuleType("benchmarks_campaign_empty")
    module.empty_task = lambda: {}
    sys.modules["benchmarks_campaign_empty"] = module


def _build_shard(item: tuple[str, str, tuple[int, int] | None]) -> None:
    from icegrid.inference import infer_shard
    from icegrid.preprocess import preprocess_shard, shard_name_for

    batch, store, rows = item
    preprocess_shard(batch, store, meta_rows=rows)
    infer_shard(store, shard_name_for(Path(batch)), "linefit")


def finished_store(data: Path, store: Path) -> None:
    """Every shard of ``data`` preprocessed, with linefit predictions, in ``store`` (not timed)."""
    from multiprocessing import get_context

    from icegrid.grid.plan import list_inputs, split_meta_index

    EventStore.create(store, find_geometry(data))
    batches = list_inputs([str(data)])
    _, rows = split_meta_index(batches)
    with get_context("spawn").Pool(2) as workers:
        workers.map(_build_shard, [(str(b), str(store), rows.get(b)) for b in batches], chunksize=20)


def many_small_batches(data: Path, batches: int, events: int) -> None:
    """``batches`` Kaggle batch files of ``events`` events each, cut from one simulated batch of 20 times
    ``events`` (simulating each on its own costs seconds apiece), batch i from piece i mod 20 under new
    event_ids; one meta row group per batch, as the simulator writes."""
    import numpy as np
    import pyarrow.parquet as pq

    from icegrid.geometry import icecube86, write_geometry_csv
    from icegrid.kaggle import KaggleBatch, meta_table, write_pulses
    from icegrid.simulate import simulate_batch

    pieces = min(batches, 20)
    whole = simulate_batch(1, pieces * events, seed=2024)
    (data / "train").mkdir(parents=True, exist_ok=True)
    write_geometry_csv(icecube86(), data / "sensor_geometry.csv")
    offsets = whole.offsets
    tmp = data / ".train_meta.parquet.partial"
    writer = None
    for index in range(batches):
        first, last = (index % pieces) * events, (index % pieces + 1) * events
        a, b = int(offsets[first]), int(offsets[last])
        part = KaggleBatch(batch_id=index + 1, source="", event_id=np.arange(events, dtype=np.int64) + index * events,
                           n_pulses=whole.n_pulses[first:last], sensor_id=whole.sensor_id[a:b],
                           time=whole.time[a:b], charge=whole.charge[a:b], auxiliary=whole.auxiliary[a:b],
                           **{k: getattr(whole, k)[first:last] for k in ("azimuth", "zenith", "energy", "shape")})
        write_pulses(part, data / "train" / f"batch_{index + 1}.parquet")
        table = meta_table(part)
        writer = writer or pq.ParquetWriter(tmp, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=max(1, table.num_rows))
    writer.close()
    tmp.replace(data / "train_meta.parquet")


def resume_figure(args) -> None:
    import subprocess
    import sys
    import time

    data = args.workdir / f"sim-{args.resume}x{args.events_per_batch}"
    if not (data / "train_meta.parquet").exists():
        print(f"simulating {args.resume} x {args.events_per_batch} events into {data} (not timed) ...", flush=True)
        many_small_batches(data, args.resume, args.events_per_batch)
    store = args.workdir / f"store-{args.resume}x{args.events_per_batch}.zarr"
    if len(EventStore.create(store, find_geometry(data)).shards()) < args.resume:
        print(f"building the finished store {store} (not timed) ...", flush=True)
        finished_store(data, store)
    shutil.rmtree(Path(f"{store}.campaign"), ignore_errors=True)
    command = [sys.executable, "-m", "icegrid", "reprocess", "--input", str(data), "--store", str(store),
               "--models", "linefit", "--cluster", "local", "--jobs", "1", "--no-progress"]
    walls = []
    for run in range(args.runs + 1):
        load = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"icegrid reprocess failed: {done.stderr.strip() or done.stdout.strip()}")
        skipped = "analysis: skipped" in done.stderr
        print(f"run {run}: {walls[-1]:6.2f} s, load average {load:.1f} at its start, analysis "
              f"{'skipped (cached)' if skipped else 'computed'}", flush=True)
    later = sorted(walls[1:])
    print(f"resume of a finished {args.resume}-shard campaign (analysis on): median {later[len(later) // 2]:.2f} s "
          f"over {len(later)} runs (goal <= 5 s); the first run, analysing, {walls[0]:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--events-per-batch", type=int, default=None, help="[200000; 50 with --resume]")
    parser.add_argument("--resume", type=int, default=0, metavar="N", help="Time the resume of N finished shards.")
    parser.add_argument("--runs", type=int, default=3, help="With --resume: timed resumes.")
    parser.add_argument("--models", default="linefit")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icegrid-bench-campaign")
    args = parser.parse_args()
    if args.events_per_batch is None:
        args.events_per_batch = 50 if args.resume else 200_000
    if args.resume:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f} before the run (other work shares the cores)")
        resume_figure(args)
        return
    models = expand(args.models)

    data = args.workdir / f"sim-{args.batches}x{args.events_per_batch}"
    if not (data / "train_meta.parquet").exists():
        print(f"simulating {args.batches} x {args.events_per_batch:,} events into {data} (not timed) ...", flush=True)
        write_dataset(data, batches=args.batches, events_per_batch=args.events_per_batch, seed=2024)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} before the run (other work shares the cores); "
          f"{args.batches} shards x {args.events_per_batch:,} events; models {', '.join(models)}")
    wall1, compute1, tasks = timed_campaign(data, args.workdir / "store-1.zarr", models, workers=1)
    wall2, compute2, _ = timed_campaign(data, args.workdir / "store-2.zarr", models, workers=2)
    floor = manager_floor()

    per_task_compute = compute1 / tasks
    overhead = max(wall1 - compute1, 0.0) / tasks
    print(f"1 worker : wall {wall1:7.2f} s, compute {compute1:7.2f} s over {tasks} shard tasks "
          f"({per_task_compute:.3f} s per task)")
    print(f"           manager overhead per shard task {overhead * 1e3:8.1f} ms = "
          f"{100 * overhead / per_task_compute:.2f} % of its compute (goal < 1 %)")
    print(f"2 workers: wall {wall2:7.2f} s, compute {compute2:7.2f} s -> speedup {wall1 / wall2:.2f}x over 1 worker "
          f"(ideal 2x on 2 free cores; compute grows {compute2 / compute1:.2f}x when both cores are busy)")
    print(f"manager floor: {floor * 1e3:.1f} ms per empty task (200 tasks, 1 worker)")


if __name__ == "__main__":
    main()
