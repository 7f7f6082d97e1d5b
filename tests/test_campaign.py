"""The campaign manager on real local Dask pools: skip-done, dependencies, retries, lost workers, two pools.

The shard functions here are small and deterministic, like the real ones: they publish one file
atomically and skip when it exists, so the file system is the completion record.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import dask
import pytest

from icegrid.clusters import load_profile, open_pool, wait_for_workers
from icegrid.grid.manager import Manager
from icegrid.grid.plan import ShardTask

from test_clusters import executing_worker


def toy_shard(out_dir: str, shard: str, payload: int, fail: bool = False, bad_input: bool = False,
              hold: float = 0.0) -> dict:
    """Publish <out_dir>/<shard>.txt atomically (deterministic content); raise when asked to. ``hold``:
    wait first (the window in which a fault test kills the busy worker)."""
    time.sleep(hold)
    if fail:
        raise ValueError(f"toy shard {shard} is broken")
    if bad_input:
        from icegrid.kaggle import InputError
        raise InputError(f"{out_dir}/{shard}.parquet: missing column 'charge'")
    target = Path(out_dir, f"{shard}.txt")
    if not target.exists():
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(f"{shard}:{payload * payload}\n")
        os.replace(tmp, target)
        with open(Path(out_dir, "executions.log"), "a") as log:
            log.write(f"{shard}\n")
    return {"shard": shard, "n_events": payload}


def toy_tasks(out_dir: Path, n: int, broken: set[str] = frozenset(), stage_two: bool = True,
              bad_input: set[str] = frozenset(), hold: float = 0.0) -> list[ShardTask]:
    tasks = []
    for i in range(n):
        shard = f"s{i:02d}"
        tasks.append(ShardTask(key=f"one/{shard}", stage="one", shard=shard, func="test_campaign:toy_shard",
                               args=(str(out_dir), f"one-{shard}", i),
                               kwargs={"fail": shard in broken, "bad_input": shard in bad_input, "hold": hold},
                               events=10, done=lambda s=shard: Path(out_dir, f"one-{s}.txt").exists()))
        if stage_two:
            tasks.append(ShardTask(key=f"two/{shard}", stage="two", shard=shard, func="test_campaign:toy_shard",
                                   args=(str(out_dir), f"two-{shard}", i + 100), kwargs={"hold": hold},
                                   events=10, after=f"one/{shard}",
                                   done=lambda s=shard: Path(out_dir, f"two-{s}.txt").exists()))
    return tasks


@pytest.fixture
def local_pool(tmp_path):
    settings = load_profile("local", {"workers": 2, "dashboard_address": ":0"})
    pool = open_pool("local", settings, tmp_path / "campaign")
    pool.scale(2)
    assert wait_for_workers(pool.client, 2, 60) == 2
    yield pool
    pool.close()


def executions(out_dir: Path) -> list[str]:
    log = out_dir / "executions.log"
    return log.read_text().split() if log.exists() else []


def test_runs_every_task_once_skips_done_and_respects_order(local_pool, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    toy_shard(str(out), "one-s00", 0)  # done before the campaign: must be skipped, not rerun
    summary = Manager([local_pool], progress=False).run(toy_tasks(out, 5))
    assert summary.ok, summary.failures
    assert summary.stages["one"].skipped == 1 and summary.stages["one"].done == 4
    assert summary.stages["two"].done == 5
    assert "one/s00" in summary.skipped and "one/s00" not in summary.ran
    assert sorted(executions(out)) == sorted({f"{s}-s{i:02d}" for s in ("one", "two") for i in range(5)})
    # A stage-two task ran only after its stage-one task.
    order = summary.ran
    for i in range(1, 5):
        assert order.index(f"one/s{i:02d}") < order.index(f"two/s{i:02d}")
    # Rerunning finds everything in the store and submits nothing.
    again = Manager([local_pool], progress=False).run(toy_tasks(out, 5))
    assert again.ran == [] and len(again.skipped) == 10


def test_failing_shard_is_retried_then_reported_and_blocks_its_dependents(local_pool, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    summary = Manager([local_pool], progress=False, error_retries=1).run(toy_tasks(out, 3, broken={"s01"}))
    assert not summary.ok
    assert summary.failures["one/s01"] == "ValueError: toy shard one-s01 is broken"
    assert summary.failures["two/s01"] == "not run: one/s01 failed"
    assert summary.retried_errors == 1
    assert summary.stages["one"].done == 2 and summary.stages["two"].done == 2
    assert "Failed" in summary.text() or "FAILED one/s01" in summary.text()


def test_bad_input_is_reported_at_once_without_a_retry(local_pool, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    summary = Manager([local_pool], progress=False, error_retries=3).run(
        toy_tasks(out, 2, bad_input={"s00"}, stage_two=False))
    assert summary.failures == {"one/s00": f"InputError: {out}/one-s00.parquet: missing column 'charge'"}
    assert summary.retried_errors == 0 and summary.stages["one"].done == 1


def test_shard_lost_with_its_worker_is_requeued_without_failing(tmp_path):
    """Workers killed mid-shard, more often than distributed's allowed-failures: the campaign completes."""
    out = tmp_path / "out"
    out.mkdir()
    # allowed-failures=0: distributed gives up (KilledWorker) on the first lost worker, so the manager's
    # own requeueing is what must save the shard.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        settings = load_profile("local", {"workers": 1, "dashboard_address": ":0"})
        pool = open_pool("local", settings, tmp_path / "campaign")
        try:
            pool.scale(1)
            assert wait_for_workers(pool.client, 1, 60) == 1
            killed = []

            def kill_busy_worker_twice():
                while len(killed) < 2:
                    busy = executing_worker(pool.client)
                    time.sleep(0.3)  # the shard has announced itself and is inside its 1 s hold
                    pid = pool.client.run(os.getpid, workers=[busy])[busy]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    # the nanny restarts the worker; wait for it before the next kill
                    time.sleep(1.0)
                    wait_for_workers(pool.client, 1, 60)

            killer = threading.Thread(target=kill_busy_worker_twice, daemon=True)
            killer.start()
            summary = Manager([pool], progress=False).run(toy_tasks(out, 3, stage_two=False, hold=1.0))
            killer.join(timeout=30)
        finally:
            pool.close()
    assert len(killed) == 2
    assert summary.ok, summary.failures
    assert summary.retried_lost >= 2
    assert summary.restarts >= 2
    assert sorted(executions(out)) == ["one-s00", "one-s01", "one-s02"]


def test_two_pools_drain_one_shared_list(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pools = []
    try:
        for name in ("site-a", "site-b"):
            settings = load_profile("local", {"workers": 1, "dashboard_address": ":0"})
            pool = open_pool("local", settings, tmp_path / name, name=name)
            pools.append(pool)
            pool.scale(1)
        for pool in pools:
            assert wait_for_workers(pool.client, 1, 60) == 1
        summary = Manager(pools, progress=False).run(toy_tasks(out, 8, stage_two=False, hold=0.2))
    finally:
        for pool in pools:
            pool.close()
    assert summary.ok
    assert summary.per_pool["site-a"] > 0 and summary.per_pool["site-b"] > 0
    assert sum(summary.per_pool.values()) == 8
    assert sorted(executions(out)) == sorted(f"one-s{i:02d}" for i in range(8))


def test_with_several_pools_gpu_tasks_go_only_to_a_pool_that_has_gpu_workers(tmp_path):
    """Pool A has CPU workers only, pool B a worker advertising GPU=1: GPU tasks must not wait in A."""
    out = tmp_path / "out"
    out.mkdir()
    pools = []
    try:
        for name, resources in (("cpu-site", {}), ("gpu-site", {"GPU": 1})):
            settings = load_profile("local", {"workers": 1, "dashboard_address": ":0", "resources": resources})
            pool = open_pool("local", settings, tmp_path / name, name=name)
            pools.append(pool)
            pool.scale(1)
        for pool in pools:
            assert wait_for_workers(pool.client, 1, 60) == 1
        tasks = toy_tasks(out, 4, hold=0.2)
        for task in tasks:
            if task.stage == "two":
                task.resources = {"GPU": 1}
        gpu_site_workers = set(pools[1].client.scheduler_info()["workers"])
        summary = Manager(pools, progress=False).run(tasks)
    finally:
        for pool in pools:
            pool.close()
    assert summary.ok, summary.failures
    assert {summary.placements[k] for k in summary.placements if k.startswith("two/")} <= gpu_site_workers
    assert summary.per_pool["gpu-site"] >= 4 and summary.per_pool["cpu-site"] >= 1
