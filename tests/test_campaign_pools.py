"""Several pools (one scheduler per site) draining one shard list, and a site that dies mid-campaign.

Two `icegrid scheduler` processes, one worker each, one campaign driving both through the glidein
profile. Site A's scheduler is SIGKILLed once it has completed some shards: its in-flight shards go
back to the shared list and site B finishes the campaign, every shard exactly once in the store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from faults import hold_preload
from test_clusters import stop_process, wait_for

ICEGRID = [sys.executable, "-m", "icegrid"]
BATCHES, EVENTS_PER_BATCH = 6, 200


def test_a_dead_site_scheduler_leaves_the_other_site_to_finish(tmp_path):
    from icegrid.simulate import write_dataset
    from icegrid.store import EventStore

    write_dataset(tmp_path / "sim", batches=BATCHES, events_per_batch=EVENTS_PER_BATCH, seed=31)
    processes = {}

    def start(args, name):
        processes[name] = subprocess.Popen(ICEGRID + args, stdout=open(tmp_path / f"{name}.log", "w"),
                                           stderr=subprocess.STDOUT, start_new_session=True)

    spec = tmp_path / "two-sites.yaml"
    spec.write_text(f"""\
inputs: [{tmp_path / 'sim'}]
store: {tmp_path / 'store.zarr'}
models: [linefit]
analysis: false
pools:
  - {{profile: glidein, name: site-a, scheduler_file: {tmp_path / 'a.json'}}}
  - {{profile: glidein, name: site-b, scheduler_file: {tmp_path / 'b.json'}}}
""")
    hold = hold_preload(tmp_path, 0.8)   # each shard holds 0.8 s: site A dies with shards in flight
    try:
        for site in ("a", "b"):
            start(["scheduler", "--scheduler-file", str(tmp_path / f"{site}.json"), "--insecure", "--dashboard-address", ":0"],
                  f"scheduler-{site}")
            wait_for((tmp_path / f"{site}.json").exists, 60, f"site {site}'s scheduler")
            start(["worker", "--scheduler-file", str(tmp_path / f"{site}.json"), "--no-nanny",
                   "--death-timeout", "5s", "--preload", str(hold)], f"worker-{site}")
        start(["reprocess", str(spec), "--no-progress"], "manager")
        store_path = tmp_path / "store.zarr"

        def published():
            return len(EventStore(store_path).shards()) if (store_path / "zarr.json").exists() else 0
        wait_for(lambda: published() >= 2, 120, "the first shards")
        os.kill(processes["scheduler-a"].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert processes["manager"].wait(timeout=300) == 0, (tmp_path / "manager.log").read_text()[-3000:]
    finally:
        for process in processes.values():
            stop_process(process)
    summary = json.loads((tmp_path / "store.zarr.campaign" / "summary.json").read_text())
    assert summary["ok"] and len(summary["ran"]) == len(set(summary["ran"])) == 2 * BATCHES
    assert summary["per_pool"]["site-a"] >= 1 and summary["per_pool"]["site-b"] > summary["per_pool"]["site-a"]
    # Site A's shards were requeued at once, not after its client's 60 s of reconnecting.
    assert time.monotonic() - killed_at < 45 and summary["wall_s"] < 50
    store = EventStore(tmp_path / "store.zarr")
    ids = np.concatenate([store.read_event_arrays(s, ("event_id",))["event_id"] for s in store.shards()])
    assert ids.size == np.unique(ids).size == BATCHES * EVENTS_PER_BATCH
    assert all(store.prediction_models(s) == ["linefit"] for s in store.shards())
