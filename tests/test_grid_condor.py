"""On a real HTCondor pool: a site's jobqueue.yaml reaches the real queued jobs, the campaign's jobs are
found (and removed) by their IcegridCampaign tag through the bindings, a frozen worker's job is
condor_rm'ed and replaced, and a failing condor_submit ends the campaign in one line, fast.

Skips, saying why, where no pool answers; fails instead under ICEGRID_REQUIRE_POOLS=1 (CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import yaml

from test_clusters import (ICEGRID, as_submit_user, remove_scratch_unless_failed, require_pool, run_icegrid,
                           run_with_a_frozen_batch_worker, scratch_dir, submit_user, wait_for)

pytestmark = [pytest.mark.condor, pytest.mark.slow]


@pytest.fixture
def condor_work(tmp_path, request):
    require_pool("condor")
    work = scratch_dir("grid-condor", tmp_path)
    failures_before = request.session.testsfailed
    sim = run_icegrid(["simulate", "--out", "sim", "--batches", "2", "--events-per-batch", "100", "--seed", "9"],
                      cwd=work)
    assert sim.returncode == 0, sim.stderr
    yield work
    subprocess.run(as_submit_user(["condor_rm", submit_user()]), capture_output=True)
    remove_scratch_unless_failed(work, request, failures_before)


FIELDS = ("ClusterId", "ProcId", "IcegridCampaign", "AccountingGroup", "Requirements", "JobStatus")


def campaign_jobs(constraint: str) -> list[dict[str, str]]:
    """The queued jobs' ClassAd attributes, as condor_q shows them (the pip bindings cannot always
    authenticate to an older schedd; icegrid itself falls back the same way)."""
    out = subprocess.run(["condor_q", "-allusers", "-constraint", constraint, "-af:tr", *FIELDS],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [dict(zip(FIELDS, line.split("\t"))) for line in out.splitlines() if line.strip()]


def test_a_site_jobqueue_yaml_reaches_the_queued_jobs_classad(condor_work):
    work = condor_work
    site = work / "dask"
    site.mkdir()
    (site / "jobqueue.yaml").write_text(yaml.safe_dump({"jobqueue": {"htcondor": {
        "memory": "1GiB", "disk": "1GiB",
        "job-extra-directives": {"+AccountingGroup": '"icecube.ml"', "requirements": "(TARGET.Cpus >= 1)"}}}}))
    log = open(work / "run.log", "w")
    manager = subprocess.Popen(as_submit_user(ICEGRID + [
        "reprocess", "--input", "sim", "--store", "store.zarr", "--models", "linefit", "--cluster", "condor",
        "--jobs", "1", "--no-analysis", "--no-progress", "--set", "dashboard_address=:0"]),
        cwd=work, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DASK_CONFIG": str(site)})
    try:
        ads = wait_for(lambda: campaign_jobs(f'Owner == "{submit_user()}" && IcegridCampaign =!= undefined'), 120,
                       "the campaign's job in the queue")
        assert manager.wait(timeout=300) == 0, (work / "run.log").read_text()[-3000:]
    finally:
        if manager.poll() is None:
            manager.kill()
        log.close()
    ad = ads[0]
    assert ad["AccountingGroup"] == '"icecube.ml"'          # raw ClassAd values (condor_q -af:r)
    assert "(TARGET.Cpus >= 1)" in ad["Requirements"]
    tag = ad["IcegridCampaign"].strip('"')
    assert tag.startswith("campaign-") and tag.endswith("-condor")
    # Gone once the campaign is: removed by that tag, nothing else of the user's touched.
    wait_for(lambda: not campaign_jobs(f'IcegridCampaign == "{tag}" && JobStatus != 3'), 60,
             "the campaign's jobs to leave the queue")
    assert "warning" not in (work / "run.log").read_text()   # nothing of the site's was overridden


def test_a_failing_condor_submit_ends_the_campaign_in_one_line(condor_work):
    """Root may not queue jobs (HTCondor: "Cannot allocate a cluster id"): the batch system's own message,
    one line, in seconds — not a traceback and a 600 s wait."""
    if os.geteuid() != 0:
        pytest.skip("needs root: an unprivileged user's condor_submit does not fail here")
    started = time.monotonic()
    run = subprocess.run(ICEGRID + ["reprocess", "--input", "sim", "--store", "root.zarr", "--models", "linefit",
                                    "--cluster", "condor", "--jobs", "1", "--no-analysis", "-q",
                                    "--set", "dashboard_address=:0"], cwd=condor_work, capture_output=True,
                         text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "icegrid: error: pool condor: condor_submit failed: ERROR: Cannot allocate a cluster id"], run.stderr
    assert elapsed < 30


def in_condor_queue(job: str) -> bool:
    """Still in the queue in any state (a removed job stays, as X, until its processes are gone)."""
    out = subprocess.run(["condor_q", "-allusers", job, "-af", "JobStatus"], capture_output=True, text=True,
                         timeout=30).stdout
    return bool(out.strip())


def test_a_frozen_worker_job_is_condor_rmed_and_replaced_within_the_task_limit(condor_work):
    """A SIGSTOPped worker would keep its slot until walltime: past timeout_task_s its job is removed
    (dask-jobqueue's condor_rm with the job id), a replacement job redoes the shard, exit 0."""
    limit = 10
    run = run_with_a_frozen_batch_worker(condor_work, "condor", limit, in_condor_queue)
    assert run["returncode"] == 0, run["log"][-3000:]
    assert f"ran past the task limit ({limit} s, timeout_task_s)" in run["log"], run["log"][-3000:]
    assert f"job {run['job']} removed (condor_rm), a replacement submitted" in run["log"], run["log"][-3000:]
    # Gone from the queue while the campaign still ran (its end removes every job anyway), right after the
    # limit: dask-jobqueue itself closes a lost worker's job only 15 s later (lost-worker-timeout), and then
    # nothing replaced it — the campaign's only job gone, it waited out timeout_idle_s. The replacement
    # finished both shards.
    assert run["gone_after"] is not None and run["gone_after"] < run["took"], run
    assert run["gone_after"] < limit + 8, run
    summary = json.loads((condor_work / "store.zarr.campaign" / "summary.json").read_text())
    assert summary["ok"] and len(summary["ran"]) == 2, summary
