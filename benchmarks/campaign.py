"""The campaign manager's overhead per shard against the shard's compute time, and the speedup of 2
workers over 1, measured in the same run on the same simulated set.

Usage: python benchmarks/campaign.py [--batches 4] [--events-per-batch 200000] [--models linefit]
                                     [--workdir DIR]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--events-per-batch", type=int, default=200_000)
    parser.add_argument("--models", default="linefit")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icegrid-bench-campaign")
    args = parser.parse_args()
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
