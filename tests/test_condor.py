"""End to end on a real HTCondor pool: `icegrid reprocess --cluster condor`, with faults.

Every Dask worker is an HTCondor job sent with condor_submit by the campaign, which runs as the
unprivileged submit user (HTCondor will not queue jobs for root). One campaign is disturbed on
purpose — a worker SIGKILLed mid-shard twice, a running worker job condor_rm'ed (the manager must
resubmit it), then the manager itself SIGKILLed — and the same command is run again: it must redo no
shard that was complete, and the predictions must be byte-identical to an undisturbed run.

Skips, saying why, where no pool answers; fails instead under ICEGRID_REQUIRE_POOLS=1 (CI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from test_clusters import (ICEGRID, as_submit_user, assert_every_event_predicted, reference_store,
                           require_pool, run_icegrid, scheduler_client, scratch_dir, submit_user, wait_for)

pytestmark = [pytest.mark.condor, pytest.mark.slow]

MODELS = ["linefit"]
BATCHES, EVENTS_PER_BATCH = 8, 400
SPEC = """\
name: condor-ci
inputs: [sim]
store: store.zarr
models: {models}
analysis: false
hold_seconds: 1.5        # each shard task holds 1.5 s first: a window to kill its worker mid-shard
cluster:
  profile: condor
  jobs: 2
  memory: 1GiB
  disk: 1GiB
  poll_seconds: 2
  dashboard_address: ":0"
"""


def done_tasks(store_path, models) -> set[str]:
    """Task keys the store says are complete (the manager's own completion record)."""
    from icegrid.store import EventStore

    if not (store_path / "zarr.json").exists():
        return set()
    store = EventStore(store_path)
    done = set()
    for shard in store.shards():
        done.add(f"preprocess/{shard}")
        done.update(f"{m}/{shard}" for m in models if store.has_predictions(shard, m))
    return done


def busy_worker(client, min_busy_s: float = 0.4) -> str:
    """Address of a worker that has been running a shard task for a little while."""
    def find():
        busy = [w for w, keys in client.processing().items() if keys]
        return busy[0] if busy else None
    worker = wait_for(find, 120, "a worker running a shard")
    time.sleep(min_busy_s)  # well inside hold_seconds: the shard has started and is not finished
    return worker


def condor_job_of(client, worker: str) -> str:
    """ClusterId.ProcId of the HTCondor job a worker runs in (read from the job ad in its sandbox)."""
    def job_ad_ids():
        import os as _os
        ad = open(_os.environ["_CONDOR_JOB_AD"]).read().splitlines()
        values = dict(line.split(" = ", 1) for line in ad if " = " in line)
        return f"{values['ClusterId'].strip()}.{values['ProcId'].strip()}"
    return client.run(job_ad_ids, workers=[worker])[worker]


def kill_worker_process(client, worker: str) -> int:
    pid = client.run(os.getpid, workers=[worker])[worker]
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.fixture
def condor_work(tmp_path):
    require_pool("condor")
    work = scratch_dir("condor", tmp_path)
    yield work
    # Leave no job behind: the killed manager's workers would otherwise wait out their death-timeout.
    subprocess.run(as_submit_user(["condor_rm", submit_user()]), capture_output=True)


def test_condor_campaign_survives_worker_kills_condor_rm_and_manager_kill(condor_work, tmp_path):
    work = condor_work
    sim = run_icegrid(["simulate", "--out", "sim", "--batches", str(BATCHES), "--events-per-batch",
                       str(EVENTS_PER_BATCH), "--seed", "11"], cwd=work)
    assert sim.returncode == 0, sim.stderr
    reference = reference_store(work / "sim", MODELS, tmp_path / "reference.zarr")
    (work / "campaign.yaml").write_text(SPEC.format(models=json.dumps(MODELS)))
    campaign_dir = work / "store.zarr.campaign"
    store_path = work / "store.zarr"
    all_tasks = BATCHES * (1 + len(MODELS))

    # ---- run 1: disturbed, then the manager is SIGKILLed
    log1 = open(work / "run1.log", "w")
    manager = subprocess.Popen(as_submit_user(ICEGRID + ["reprocess", "campaign.yaml", "--no-progress"]),
                               cwd=work, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = scheduler_client(campaign_dir, "condor", tls=True)
        try:
            killed = []
            for _ in range(2):
                worker = busy_worker(client)
                killed.append(kill_worker_process(client, worker))
                time.sleep(1.0)
            worker = busy_worker(client)
            job = condor_job_of(client, worker)
            removed = subprocess.run(as_submit_user(["condor_rm", job]), capture_output=True, text=True)
            assert removed.returncode == 0, removed.stderr
            # The manager notices the job left the queue and submits a replacement.
            wait_for(lambda: "left the queue; submitting replacements" in (work / "run1.log").read_text(),
                     60, "the manager to replace the removed job")
            before = len(done_tasks(store_path, MODELS))
            wait_for(lambda: len(done_tasks(store_path, MODELS)) > before, 120, "progress after the faults")
        finally:
            client.close()
        assert manager.poll() is None, "the campaign finished before the manager could be killed"
        os.killpg(manager.pid, signal.SIGKILL)
        manager.wait(timeout=30)
    finally:
        if manager.poll() is None:
            os.killpg(manager.pid, signal.SIGKILL)
        log1.close()
    complete_before_rerun = done_tasks(store_path, MODELS)
    assert 0 < len(complete_before_rerun) < all_tasks

    # ---- run 2: the same command finishes the campaign, redoing nothing that was complete
    rerun = run_icegrid(["reprocess", "campaign.yaml", "--no-progress"], cwd=work, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = json.loads((campaign_dir / "summary.json").read_text())
    assert summary["ok"] and not summary["failures"]
    assert set(summary["ran"]).isdisjoint(complete_before_rerun), "a completed shard was redone"
    assert complete_before_rerun <= set(summary["skipped"])
    assert len(summary["ran"]) + len(summary["skipped"]) == all_tasks
    assert "all shards done" in rerun.stdout

    # ---- the result: every event has predictions from every model, identical to the undisturbed run
    assert_every_event_predicted(store_path, reference, MODELS)
    assert len(killed) == 2
