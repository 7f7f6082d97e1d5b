"""End to end on a real SLURM cluster: `icegrid reprocess --cluster slurm`, every worker an sbatch job.

A running worker job is cancelled with scancel mid-campaign: the manager resubmits it and the
predictions still match an undisturbed run byte for byte. A frozen worker's job is scancel'ed by the
manager itself once its shard passes timeout_task_s, and replaced. Runs as the unprivileged submit user, like
the HTCondor test. Skips, saying why, where no cluster answers; fails instead under
ICEGRID_REQUIRE_POOLS=1 (CI).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from faults import hold_dask_config
from test_security import intruder_thread
from test_clusters import (ICEGRID, as_submit_user, assert_every_event_predicted, reference_store,
                           remove_scratch_unless_failed, require_pool, run_icegrid, run_with_a_frozen_batch_worker,
                           scheduler_client, scratch_dir, submit_user, wait_for)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MODELS = ["linefit"]
BATCHES, EVENTS_PER_BATCH = 4, 400


def slurm_job_of(client, worker: str) -> str:
    def job_id():
        import os
        return os.environ["SLURM_JOB_ID"]
    return client.run(job_id, workers=[worker])[worker]


@pytest.fixture
def slurm_work(tmp_path, request):
    require_pool("slurm")
    work = scratch_dir("slurm", tmp_path)
    failures_before = request.session.testsfailed
    yield work
    subprocess.run(as_submit_user(["scancel", "-u", submit_user()]), capture_output=True)
    remove_scratch_unless_failed(work, request, failures_before)


def test_slurm_campaign_with_sbatch_workers_survives_scancel(slurm_work, tmp_path):
    work = slurm_work
    sim = run_icegrid(["simulate", "--out", "sim", "--batches", str(BATCHES), "--events-per-batch",
                       str(EVENTS_PER_BATCH), "--seed", "12"], cwd=work)
    assert sim.returncode == 0, sim.stderr
    reference = reference_store(work / "sim", MODELS, tmp_path / "reference.zarr")

    log = open(work / "run.log", "w")
    # Plain flags this time (the HTCondor test uses a campaign file): both must mean the same. Each shard
    # holds 1.5 s (a preload from the site's dask config), so the campaign outlasts the cancel.
    manager = subprocess.Popen(
        as_submit_user(ICEGRID + ["reprocess", "--input", "sim", "--store", "store.zarr", "--models", ",".join(MODELS),
                                  "--cluster", "slurm", "--jobs", "2", "--no-analysis", "--no-progress",
                                  "--set", "memory=1GiB", "--set", "poll_seconds=2", "--set", "dashboard_address=:0"]),
        cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=hold_dask_config(work / "dask", 1.5))
    try:
        client = scheduler_client(work / "store.zarr.campaign", "slurm", tls=True)   # TLS by default, as condor
        intruder = intruder_thread(work / "store.zarr.campaign" / "scheduler-slurm.json", tmp_path / "intruder-ran")
        try:
            worker = wait_for(lambda: next((w for w, k in client.processing().items() if k), None), 120,
                              "a worker running a shard")
            job = slurm_job_of(client, worker)
        finally:
            client.close()
            intruder.join()
        assert intruder.result == "refused", intruder.result
        cancelled = subprocess.run(as_submit_user(["scancel", job]), capture_output=True, text=True)
        assert cancelled.returncode == 0, cancelled.stderr
        assert manager.wait(timeout=600) == 0, (work / "run.log").read_text()[-3000:]
    finally:
        if manager.poll() is None:
            manager.kill()
        log.close()
    output = (work / "run.log").read_text()
    summary = json.loads((work / "store.zarr.campaign" / "summary.json").read_text())
    assert summary["ok"] and len(summary["ran"]) == BATCHES * (1 + len(MODELS))
    # The cancelled job was noticed and replaced (hold 1.5 s per task: the campaign outlasts the 2 polls).
    assert f"jobs {job} left the queue; submitting replacements" in output, output[-2000:]
    assert_every_event_predicted(work / "store.zarr", reference, MODELS)


def test_a_pool_whose_jobs_all_die_before_connecting_fails_fast_with_one_line(slurm_work):
    """Every job exits before its worker starts: after max_replacements the campaign stops, saying so."""
    work = slurm_work
    sim = run_icegrid(["simulate", "--out", "sim", "--batches", "1", "--events-per-batch", "100", "--seed", "2"],
                      cwd=work)
    assert sim.returncode == 0, sim.stderr
    run = run_icegrid(["reprocess", "--input", "sim", "--store", "store.zarr", "--models", "linefit",
                       "--cluster", "slurm", "--jobs", "1", "--no-analysis", "--no-progress",
                       "--set", "memory=512MiB", "--set", "poll_seconds=1", "--set", "max_replacements=2",
                       "--set", "dashboard_address=:0", "--set", "prologue=['exit 3']"], cwd=work, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("icegrid: error: pool slurm: every worker job left the queue before connecting "
                            "(2 replaced;"), error
    assert "job logs in" in error and "Traceback" not in run.stderr


def test_a_failing_sbatch_ends_the_campaign_in_one_line(slurm_work):
    """sbatch refuses the job (a partition that does not exist): SLURM's own message, one line, in seconds."""
    import time

    work = slurm_work
    sim = run_icegrid(["simulate", "--out", "sim", "--batches", "1", "--events-per-batch", "50", "--seed", "2"],
                      cwd=work)
    assert sim.returncode == 0, sim.stderr
    started = time.monotonic()
    run = run_icegrid(["reprocess", "--input", "sim", "--store", "store.zarr", "--models", "linefit",
                       "--cluster", "slurm", "--no-analysis", "-q", "--set", "partition=nosuch",
                       "--set", "dashboard_address=:0"], cwd=work, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "icegrid: error: pool slurm: sbatch failed: sbatch: error: invalid partition specified: nosuch"], run.stderr
    assert time.monotonic() - started < 30


def in_slurm_queue(job: str) -> bool:
    """Pending, running or still completing (a cancelled job stays listed, CANCELLED, for MinJobAge)."""
    from icegrid.grid.profiles.slurm import ALIVE

    out = subprocess.run(["squeue", "-h", "-j", job, "--states=all", "-o", "%T"], capture_output=True, text=True,
                         timeout=30).stdout
    return any(state in ALIVE for state in out.split())


def test_a_frozen_worker_job_is_scancelled_and_replaced_within_the_task_limit(slurm_work):
    """As the HTCondor test: a SIGSTOPped worker's job is scancel'ed past timeout_task_s and replaced."""
    work = slurm_work
    sim = run_icegrid(["simulate", "--out", "sim", "--batches", "2", "--events-per-batch", "100", "--seed", "9"],
                      cwd=work)
    assert sim.returncode == 0, sim.stderr
    limit = 10
    run = run_with_a_frozen_batch_worker(work, "slurm", limit, in_slurm_queue)
    assert run["returncode"] == 0, run["log"][-3000:]
    assert f"ran past the task limit ({limit} s, timeout_task_s)" in run["log"], run["log"][-3000:]
    assert f"job {run['job']} removed (scancel), a replacement submitted" in run["log"], run["log"][-3000:]
    assert run["gone_after"] is not None and run["gone_after"] < run["took"], run
    assert run["gone_after"] < limit + 8, run   # not dask-jobqueue's own close, 15 s later (see there)
    summary = json.loads((work / "store.zarr.campaign" / "summary.json").read_text())
    assert summary["ok"] and len(summary["ran"]) == 2, summary
