"""Out of memory on real local Dask pools: a worker killed by its nanny for memory is reported as out of
memory (naming the shard and the limit), and, where the pool allows growth, the shard completes on a
larger worker started for it. The decisions themselves (growth, the advice line) without a cluster.

The shard here really needs its memory: it fills an array of ``need_mib`` and holds it long enough for
the nanny's 100 ms memory monitor to see it, so the kill is distributed's own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from icegrid.clusters import load_profile, open_pool, wait_for_workers
from icegrid.grid.manager import Manager
from icegrid.grid.oom import GiB, MiB, advice, batch_memory_reason, grown_limit
from icegrid.grid.plan import ShardTask

LIMIT = "300MiB"      # a worker's baseline is ~100 MiB: a 220 MiB shard goes over the nanny's 95 %,
NEED_MIB = 220        # and fits in 1.5x (450 MiB)


def memory_shard(out_dir: str, shard: str, need_mib: int, hold: float = 1.0) -> dict:
    """Hold ``need_mib`` of touched memory for ``hold`` seconds, then publish <out_dir>/<shard>.txt."""
    import numpy as np

    block = np.ones(need_mib * MiB // 8)
    time.sleep(hold)
    target = Path(out_dir, f"{shard}.txt")
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(f"{shard}:{float(block[-1])}\n")
    os.replace(tmp, target)
    return {"shard": shard, "n_events": 1}


def memory_tasks(out_dir: Path, needs: dict[str, int]) -> list[ShardTask]:
    return [ShardTask(key=f"mem/{shard}", stage="mem", shard=shard, func="test_grid_oom:memory_shard",
                      args=(str(out_dir), shard, need), events=1,
                      done=lambda s=shard: Path(out_dir, f"{s}.txt").exists())
            for shard, need in needs.items()]


def local_pool(tmp_path: Path, **settings):
    pool = open_pool("local", load_profile("local", {"workers": 1, "memory": LIMIT, "dashboard_address": ":0",
                                                     **settings}), tmp_path / "campaign")
    pool.scale(1)
    assert wait_for_workers(pool.client, 1, 60) == 1
    return pool


# ------------------------------------------------------------------------------------- pure decisions
def test_growth_is_limit_times_factor_in_whole_mib_up_to_the_cap():
    assert grown_limit(4 * GiB, 1.5, 16 * GiB) == 6 * GiB
    assert grown_limit(12 * GiB, 1.5, 16 * GiB) == 16 * GiB          # capped
    assert grown_limit(16 * GiB, 1.5, 16 * GiB) is None              # the cap reached: no growth
    assert grown_limit(4 * GiB, 1.5, None) is None                    # no cap set: no growth
    assert grown_limit(1000 * MiB + 1, 1.5, 8 * GiB) % MiB == 0


def test_advice_says_what_to_set():
    settings = load_profile("local", {"memory": "1GiB"})
    assert "set memory above 1.00 GiB for pool p, or max_memory" in advice("p", GiB, settings, 1)
    settings = load_profile("local", {"memory": "1GiB", "max_memory": "1GiB"})
    assert "set max_memory (now 1.00 GiB) or memory above 1.00 GiB" in advice("p", GiB, settings, 1)
    assert "retries.memory (0) used up: raise it, or set memory above 1.00 GiB" in advice("p", GiB, settings, 0, 0)
    assert "--memory-limit" in advice("p", GiB, load_profile("glidein", {"scheduler": "tcp://x:1"}), 1)


def test_batch_reasons_for_memory_are_recognised():
    assert batch_memory_reason("OUT_OF_MEMORY")
    assert batch_memory_reason("Error from slot1@node: Job has gone over memory limit of 600 megabytes. "
                               "Peak usage: 1200 megabytes.")
    assert not batch_memory_reason("The job attribute PeriodicHold expression evaluated to TRUE")
    assert not batch_memory_reason("")


def test_grown_condor_job_requests_the_memory_and_keeps_the_pools_resources(tmp_path):
    """The spec of a resubmitted HTCondor job (a real HTCondorCluster, nothing submitted)."""
    htcondor2 = pytest.importorskip("htcondor2")
    from icegrid.clusters import batch_cluster
    from icegrid.grid.oom import batch_job_spec

    settings = load_profile("condor", {"memory": "2GiB", "resources": {"GPU": 1}, "tls": False,
                                       "dashboard_address": ":0"})
    cluster = batch_cluster("condor", settings, tmp_path)
    try:
        spec = batch_job_spec(cluster, 3 * GiB, {"memory_mib": 3072})
        script = spec["cls"](cluster.scheduler.address, name="icegrid-condor-mem3072", **spec["options"]).job_script()
        first = cluster.job_script()
    finally:
        cluster.close()
    grown, before = htcondor2.Submit(script), htcondor2.Submit(first)
    # RequestMemory is floor(MY.DaskWorkerMemory / 1048576): the request the pool matches slots with.
    assert int(grown["MY.DaskWorkerMemory"]) == 3 * GiB and int(before["MY.DaskWorkerMemory"]) == 2 * GiB
    assert "--memory-limit 3.00GiB" in grown["Arguments"] and "--resources GPU=1,memory_mib=3072" in grown["Arguments"]


# ------------------------------------------------------------------------------------- real clusters
def test_shard_over_the_worker_limit_is_reported_as_out_of_memory_in_one_line(tmp_path):
    pool = local_pool(tmp_path)
    try:
        out = tmp_path / "out"
        out.mkdir()
        started = time.monotonic()
        summary = Manager([pool], progress=False).run(memory_tasks(out, {"small": 10, "big": NEED_MIB}))
    finally:
        pool.close()
    assert summary.ran == ["mem/small"]
    reason = summary.failures["mem/big"]
    assert "\n" not in reason and "lost" not in reason, reason
    assert reason.startswith("out of memory in pool local: worker tls://127.0.0.1:") and "killed by its nanny" in reason
    assert "limit 0.29 GiB" in reason and "set memory above 0.29 GiB for pool local, or max_memory" in reason
    assert "FAILED mem/big: out of memory" in summary.text()
    # Taken back at the first kill, not after distributed's allowed-failures restarts.
    assert summary.retried_lost == 0 and time.monotonic() - started < 30


def test_with_growth_allowed_the_shard_completes_on_a_larger_worker(tmp_path, caplog):
    pool = local_pool(tmp_path, max_memory="1GiB", memory_growth=1.5)
    try:
        out = tmp_path / "out"
        out.mkdir()
        with caplog.at_level(logging.WARNING, logger="icegrid.grid"):
            summary = Manager([pool], progress=False).run(memory_tasks(out, {"big": NEED_MIB}))
        grown = {addr: w for addr, w in pool.workers().items() if w.get("resources", {}).get("memory_mib")}
    finally:
        pool.close()
    assert summary.ok, summary.failures
    assert summary.retried_memory == 1 and summary.retried_lost == 0
    assert (out / "big.txt").exists()
    (address, worker), = grown.items()
    assert worker["memory_limit"] == 450 * MiB and worker["resources"]["memory_mib"] == 450
    assert summary.placements["mem/big"] == address
    said = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("mem/big: out of memory in pool local") and \
        "limit 0.29 GiB" in said[0] and said[0].endswith("retrying on a worker with 0.44 GiB"), said


def test_growth_stops_at_max_memory_with_a_line_naming_it(tmp_path):
    pool = local_pool(tmp_path, memory="240MiB", max_memory="300MiB")
    try:
        out = tmp_path / "out"
        out.mkdir()
        summary = Manager([pool], progress=False).run(memory_tasks(out, {"big": NEED_MIB}))
    finally:
        pool.close()
    reason = summary.failures["mem/big"]
    assert summary.retried_memory == 1, reason      # 240 MiB -> 300 MiB (the cap), still too small
    assert "limit 0.29 GiB" in reason and "set max_memory (now 0.29 GiB) or memory above 0.29 GiB" in reason


# ------------------------------------------------------------------------------------- a real SLURM pool
@pytest.mark.slurm
@pytest.mark.slow
def test_on_slurm_the_shard_is_resubmitted_in_a_job_asking_for_more_memory(tmp_path, monkeypatch):
    """One sbatch worker job with 300 MiB: its nanny kills the worker on the 220 MiB shard; the manager
    submits a job asking 1.5x the memory (seen in squeue), and the shard completes there."""
    import subprocess
    import uuid

    from icegrid.grid.profiles import profile_class
    from test_clusters import require_pool

    require_pool("slurm")
    # The jobs run as this user (root may submit to SLURM), on this machine: they import this module.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    settings = load_profile("slurm", {"jobs": 1, "memory": LIMIT, "max_memory": "1GiB", "tls": False,
                                      "poll_seconds": 2, "dashboard_address": ":0"})
    profile = profile_class("slurm")(settings, "slurm", tmp_path / "campaign" / "slurm", f"oom-{uuid.uuid4().hex[:8]}")
    pool = profile.start()
    try:
        pool.scale(1)
        out = tmp_path / "out"
        out.mkdir()
        summary = Manager([pool], progress=False).run(memory_tasks(out, {"big": NEED_MIB}))
        asked = subprocess.run(["squeue", "-h", "--name", profile.job_name, "-o", "%i %m"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
    finally:
        pool.close()
    assert summary.ok and summary.retried_memory == 1, summary.failures
    # The resubmitted job, as SLURM has it queued (the first one may be gone: distributed's
    # lost-worker-timeout cancels a job whose restarted worker is slow to come back).
    assert "450M" in [line.split()[1] for line in asked if line.strip()], asked
    jobs = tmp_path / "campaign" / "slurm" / "jobs"
    first, grown = (jobs / "icegrid-slurm-0.sh").read_text(), (jobs / "icegrid-slurm-mem450.sh").read_text()
    assert "#SBATCH --mem=300M" in first and "--memory-limit 300.00MiB" in first, first
    assert "#SBATCH --mem=450M" in grown and "--memory-limit 450.00MiB" in grown and "memory_mib=450" in grown, grown
