"""Glidein mode: a campaign drives a running `icegrid scheduler` whose workers come and go.

Workers are separate processes started with `icegrid worker --lifetime`, as condor/glidein.sh would
start them on a slot: the first joins only after the campaign is already waiting, each leaves on its
own mid-run, and new ones keep arriving. Every event must still be processed exactly once: every
task completed once, every event present once with predictions identical to an undisturbed run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from faults import hold_preload
from test_clusters import assert_every_event_predicted, reference_store, stop_process, wait_for

ICEGRID = [sys.executable, "-m", "icegrid"]
MODELS = ["linefit"]
BATCHES, EVENTS_PER_BATCH = 6, 300


def worker_lifetime_s() -> float:
    """How long each worker lives: at least 8 s, and 3 times what a fresh process needs here to import
    the inference stack. A worker's first shard imports torch (~3 s on a quiet 2-core machine, 10 s and
    more when it is loaded); a life shorter than that leaves shards that no worker can finish."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import icegrid.inference, distributed"], check=True)
    return max(8.0, 3.0 * (time.monotonic() - started))


def test_late_joining_workers_that_leave_process_every_event_exactly_once(tmp_path):
    from icegrid.simulate import write_dataset
    from icegrid.store import EventStore

    write_dataset(tmp_path / "sim", batches=BATCHES, events_per_batch=EVENTS_PER_BATCH, seed=13)
    reference = reference_store(tmp_path / "sim", MODELS, tmp_path / "reference.zarr")
    scheduler_file, tls = tmp_path / "scheduler.json", tmp_path / "tls"
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = []
    lifetime = worker_lifetime_s()
    # Each shard holds 1/8 of a life (1 s on a quiet machine): workers leave with shards in flight.
    hold = str(hold_preload(tmp_path, lifetime / 8))

    def start(args, name):
        process = subprocess.Popen(ICEGRID + args, stdout=open(logs / f"{name}.log", "w"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(process)
        return process

    try:
        start(["scheduler", "--scheduler-file", str(scheduler_file), "--tls-dir", str(tls),
               "--dashboard-address", ":0"], "scheduler")
        wait_for(scheduler_file.exists, 60, "the scheduler file")
        manager = start(["reprocess", "--input", str(tmp_path / "sim"), "--store", str(tmp_path / "store.zarr"),
                         "--models", ",".join(MODELS), "--cluster", "glidein", "--scheduler-file", str(scheduler_file),
                         "--tls-dir", str(tls), "--no-analysis", "--no-progress"], "manager")
        time.sleep(3.0)  # the campaign is up and waiting: the workers join late
        assert manager.poll() is None

        workers: list[tuple[subprocess.Popen, float]] = []
        left_during_run = 0
        deadline = time.monotonic() + 300
        while manager.poll() is None and time.monotonic() < deadline:
            alive = [w for w, _ in workers if w.poll() is None]
            left_during_run = sum(1 for w, _ in workers if w.poll() is not None)
            if len(alive) < 2:
                name = f"worker{len(workers)}"
                worker = start(["worker", "--scheduler-file", str(scheduler_file), "--tls-dir", str(tls),
                                "--lifetime", f"{lifetime:.0f}s", "--lifetime-stagger", "1s", "--no-nanny", "--name", name,
                                "--preload", hold], name)
                workers.append((worker, time.monotonic()))
            time.sleep(0.3)
        assert manager.wait(timeout=5) == 0, (logs / "manager.log").read_text()[-3000:]
    finally:
        for process in reversed(processes):
            stop_process(process)

    # Workers really came and went while the campaign ran.
    assert left_during_run >= 2, f"only {left_during_run} workers left during the run"
    assert len(workers) >= 3
    summary = json.loads((tmp_path / "store.zarr.campaign" / "summary.json").read_text())
    tasks = BATCHES * (1 + len(MODELS))
    assert summary["ok"] and len(summary["ran"]) == len(set(summary["ran"])) == tasks and not summary["skipped"]

    # Every simulated event is in the store exactly once, predicted by every model, like the reference.
    store = EventStore(tmp_path / "store.zarr")
    event_ids = np.concatenate([store.read_event_arrays(s, ("event_id",))["event_id"] for s in store.shards()])
    assert event_ids.size == BATCHES * EVENTS_PER_BATCH == np.unique(event_ids).size
    assert_every_event_predicted(tmp_path / "store.zarr", reference, MODELS)
