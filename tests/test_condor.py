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

from icegrid.models.registry import expand

from faults import hold_dask_config
from test_security import intruder_thread
from test_clusters import (ICEGRID, as_submit_user, assert_every_event_predicted, executing_worker,
                           frozen_checkpoints, reference_store, remove_scratch_unless_failed, require_pool,
                           run_icegrid, scheduler_client, scratch_dir, submit_user, wait_for)

pytestmark = [pytest.mark.condor, pytest.mark.slow]

# Every model of the registry (line-fit and the four networks with their shipped small checkpoints).
MODELS = expand("all")
BATCHES, EVENTS_PER_BATCH = 8, 400
SPEC = """\
name: condor-ci
inputs: [sim]
store: store.zarr
models: {models}
checkpoints: {checkpoints}
analysis: false
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


def busy_worker(client) -> str:
    """A worker in the middle of a shard: executing it, and well inside its 1.5 s hold."""
    worker = executing_worker(client)
    time.sleep(0.3)
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
def condor_work(tmp_path, request):
    require_pool("condor")
    work = scratch_dir("condor", tmp_path)
    failures_before = request.session.testsfailed
    yield work
    # Leave no job behind: the killed manager's workers would otherwise wait out their death-timeout.
    subprocess.run(as_submit_user(["condor_rm", submit_user()]), capture_output=True)
    remove_scratch_unless_failed(work, request, failures_before)


def test_condor_campaign_survives_worker_kills_condor_rm_and_manager_kill(condor_work, tmp_path):
    work = condor_work
    sim = run_icegrid(["simulate", "--out", "sim", "--batches", str(BATCHES), "--events-per-batch",
                       str(EVENTS_PER_BATCH), "--seed", "11"], cwd=work)
    assert sim.returncode == 0, sim.stderr
    checkpoints = frozen_checkpoints(MODELS, work / "checkpoints")
    reference = reference_store(work / "sim", MODELS, tmp_path / "reference.zarr", checkpoints)
    (work / "campaign.yaml").write_text(SPEC.format(models=json.dumps(MODELS), checkpoints=json.dumps(checkpoints)))
    campaign_dir = work / "store.zarr.campaign"
    store_path = work / "store.zarr"
    all_tasks = BATCHES * (1 + len(MODELS))

    # ---- run 1: disturbed, then the manager is SIGKILLed. Each shard holds 1.5 s first (a preload the
    # site's dask config gives the worker jobs): a window to kill its worker mid-shard.
    env = hold_dask_config(work / "dask", 1.5)
    log1 = open(work / "run1.log", "w")
    manager = subprocess.Popen(as_submit_user(ICEGRID + ["reprocess", "campaign.yaml", "--no-progress"]),
                               cwd=work, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        client = scheduler_client(campaign_dir, "condor", tls=True)
        # Without the campaign's credentials nothing reaches its scheduler (checked while the faults run).
        intruder = intruder_thread(campaign_dir / "scheduler-condor.json", tmp_path / "intruder-ran")
        try:
            # The job script's prologue gave the worker icegrid's malloc settings (not the nanny's 65536).
            from icegrid.grid.profiles.base import WORKER_MALLOC_ENV

            wait_for(lambda: client.scheduler_info()["workers"], 120, "a worker job")
            environs = client.run(lambda: {k: __import__("os").environ.get(k) for k in WORKER_MALLOC_ENV})
            assert all(env == WORKER_MALLOC_ENV for env in environs.values()), environs
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
            intruder.join()
        assert intruder.result == "refused", intruder.result
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


def test_job_that_leaves_the_queue_before_its_worker_connects_is_replaced(condor_work):
    """The dask-jobqueue gap: a job that ends before its worker connects stays counted as a worker.

    One worker job only, and the first job to start exits before starting its worker (its prologue
    fails once). Without the manager's replacement the campaign would wait forever.
    """
    work = condor_work
    sim = run_icegrid(["simulate", "--out", "sim", "--batches", "2", "--events-per-batch", "200", "--seed", "3"],
                      cwd=work)
    assert sim.returncode == 0, sim.stderr
    marker = work / "first-job-failed"
    prologue = f"test -e {marker} || {{ touch {marker}; exit 3; }}"
    run = run_icegrid(["reprocess", "--input", "sim", "--store", "store.zarr", "--models", "linefit",
                       "--cluster", "condor", "--jobs", "1", "--no-analysis", "--no-progress",
                       "--set", "memory=1GiB", "--set", "disk=1GiB", "--set", "poll_seconds=1",
                       "--set", "dashboard_address=:0", "--set", f"prologue=[{json.dumps(prologue)}]"],
                      cwd=work, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert marker.exists()
    assert "left the queue; submitting replacements" in run.stderr
    assert "all shards done" in run.stdout


def test_scheduler_sub_and_worker_sub_glideins_serve_a_campaign(condor_work):
    """condor/scheduler.sub (the scheduler as a local-universe job) + condor/worker.sub/glidein.sh
    (workers sent to the pool by hand) serve a `--cluster glidein` campaign, with TLS."""
    from test_clusters import REPO

    work = condor_work
    sim = run_icegrid(["simulate", "--out", "sim", "--batches", "2", "--events-per-batch", "200", "--seed", "4"],
                      cwd=work)
    assert sim.returncode == 0, sim.stderr
    (work / "logs").mkdir()
    shutil_chown_tree(work / "logs")
    scheduler = subprocess.run(as_submit_user(["condor_submit", "condor/scheduler.sub", f"CAMPAIGN={work}",
                                               f"PYTHON={ICEGRID[0]}", "DASHBOARD=:0"]),
                               cwd=REPO, capture_output=True, text=True)
    assert scheduler.returncode == 0, scheduler.stderr
    wait_for((work / "scheduler.json").exists, 90, "the scheduler job's scheduler file")
    submitted = subprocess.run(as_submit_user([
        "condor_submit", "condor/worker.sub", f"SCHEDULER_FILE={work / 'scheduler.json'}",
        f"TLS_DIR={work / 'tls'}", f"PYTHON={ICEGRID[0]}", "N=2", "MEMORY=1024", "DISK=1048576",
        "LIFETIME=10m", f"LOGDIR={work / 'logs'}"]), cwd=REPO, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    run = run_icegrid(["reprocess", "--input", "sim", "--store", "store.zarr", "--models", "linefit",
                       "--cluster", "glidein", "--scheduler-file", "scheduler.json", "--tls-dir", "tls",
                       "--no-analysis", "--no-progress"], cwd=work, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    summary = json.loads((work / "store.zarr.campaign" / "summary.json").read_text())
    assert summary["ok"] and len(summary["ran"]) == 4
    glidein_log = "".join(p.read_text() for p in (work / "logs").glob("worker-*.err"))
    assert "glidein.sh:" in glidein_log and "--tls-dir" in glidein_log
    # The fixture's condor_rm stops the scheduler job and the workers.


def shutil_chown_tree(path) -> None:
    if os.geteuid() == 0:
        import shutil
        shutil.chown(path, submit_user(), submit_user())
