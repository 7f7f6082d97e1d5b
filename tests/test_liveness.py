"""Liveness and one-line failures of real `icegrid reprocess` / `icegrid preprocess` processes on local pools.

A frozen worker (SIGSTOP, as under a hung NFS mount) is retired once its shard passes the campaign's
``timeout_task_s``; a pool whose workers all die and cannot restart ends the run in one line after
``timeout_idle_s``; a worker whose restart failed is started again. The limits are the campaign's own
settings, made small here; the faults come from a worker preload (tests/faults.py), not from icegrid.
Then: a full disk under the campaign folder, a non-UTF-8 split name, a short sensor_geometry.csv.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from faults import liveness_preload, pids

ICEGRID = [sys.executable, "-m", "icegrid"]
START_S = 120  # a loaded machine may take this long to start a pool and its first shard
LIMIT = 15     # timeout_task_s: above a shard's time on a loaded 2-core machine, well under the test's budget


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    from icegrid.simulate import write_dataset

    root = tmp_path_factory.mktemp("liveness-sim")
    write_dataset(root, batches=3, events_per_batch=200, seed=11)
    return root


def _campaign(tmp_path: Path, sim: Path, workers: int, **limits) -> Path:
    lines = [f"name: liveness", f"inputs: ['{sim}']", f"store: '{tmp_path / 'events.zarr'}'", "models: []",
             "analysis: false", *(f"{k}: {v}" for k, v in limits.items()),
             f"cluster: {{profile: local, workers: {workers}, threads: 1, dashboard_address: ':0'}}"]
    path = tmp_path / "campaign.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _start(tmp_path: Path, spec: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(ICEGRID + ["reprocess", str(spec), "--no-progress"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"campaign ended early ({proc.returncode}):\n{out}\n{err}")
        time.sleep(0.1)
    _stop(proc)
    pytest.fail("the fault window never opened")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM first: the manager closes its pool (and so its worker processes) on the way out."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("icegrid: error:")]


def _shards(store: Path) -> list[str]:
    from icegrid.store import EventStore

    return EventStore(store).shards()


def test_a_frozen_worker_is_retired_and_its_shard_redone_within_the_task_limit(tmp_path, sim):
    faults = tmp_path / "faults"
    env = liveness_preload(faults, seconds=3.0)
    proc = _start(tmp_path, _campaign(tmp_path, sim, workers=2, timeout_task_s=LIMIT), env)
    frozen = None
    try:
        frozen = min(_wait_for(lambda: pids(faults / "running"), START_S, proc))
        time.sleep(1.0)                      # mid-shard, its attempt announced
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - stopped_at
    finally:
        _stop(proc)
        if frozen is not None and Path(f"/proc/{frozen}").exists():
            os.kill(frozen, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert f"ran past the task limit ({LIMIT} s, timeout_task_s)" in err, err
    assert f"worker process {frozen} killed" in err, err
    # Retired within the limit (plus the manager's one-second check), then the shard redone elsewhere.
    assert took < LIMIT + 30, took
    assert not Path(f"/proc/{frozen}").exists() or "zombie" in Path(f"/proc/{frozen}/status").read_text()
    assert _shards(tmp_path / "events.zarr") == [f"train_batch_{i:06d}" for i in (1, 2, 3)]


def test_a_pool_whose_workers_all_die_for_good_ends_in_one_line(tmp_path, sim):
    faults = tmp_path / "faults"
    env = liveness_preload(faults, seconds=3.0)
    proc = _start(tmp_path, _campaign(tmp_path, sim, workers=2, timeout_idle_s=8), env)
    try:
        _wait_for(lambda: pids(faults / "running"), START_S, proc)
        (faults / "doomed").touch()          # from now on no worker may start
        workers = pids(faults / "workers")
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        _stop(proc)
    assert len(workers) == 2
    assert proc.returncode == 2, err
    errors = _errors(err)
    assert len(errors) == 1, err
    assert errors[0].startswith("icegrid: error: pool local: 0 workers for "), errors
    assert "shard(s) queued (timeout_idle_s 8)" in errors[0]
    assert "Traceback" not in err.split("icegrid: error:")[-1]
    assert took < 8 + 25, took


def test_a_worker_that_failed_to_start_is_started_again(tmp_path, sim):
    faults = tmp_path / "faults"
    env = liveness_preload(faults, seconds=0.0)
    (faults / "fail-starts").write_text("1")   # the pool's only worker dies as it first starts
    proc = _start(tmp_path, _campaign(tmp_path, sim, workers=1, timeout_workers_s=START_S), env)
    try:
        out, err = proc.communicate(timeout=START_S + 60)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err
    assert (faults / "fail-starts").read_text() == "0"
    assert "pool local: 1 worker(s) failed and did not restart; starting them again" in err, err
    assert _shards(tmp_path / "events.zarr") == [f"train_batch_{i:06d}" for i in (1, 2, 3)]


# ------------------------------------------------------------------------------ one line for every failure
def _preprocess(tmp_path: Path, root: Path, store: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(ICEGRID + ["preprocess", "--input", str(root), "--store", str(store), "--no-progress",
                                     "--workers", "1", *extra], cwd=tmp_path, capture_output=True, timeout=300)


def test_a_full_disk_under_the_campaign_folder_still_prints_the_summary_and_says_why_in_one_line(tmp_path, sim):
    folder = tmp_path / "campaign"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        # The campaign's TLS credentials exist already (a rerun): the disk fills up after they were made.
        from icegrid.security import create_credentials

        create_credentials(folder / "tls")
        filler = folder / "filler"
        try:                                    # fill the disk to the last byte
            with open(filler, "wb") as handle:
                while True:
                    handle.write(b"x" * 4096)
                    handle.flush()
        except OSError:
            pass
        run = subprocess.run(ICEGRID + ["reprocess", "--input", str(sim), "--store", str(tmp_path / "e.zarr"),
                                        "--models", "none", "--no-analysis", "--campaign-dir", str(folder),
                                        "--jobs", "1", "--no-progress"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        left = sorted(p.name for p in folder.iterdir())
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    assert run.returncode == 1, run.stderr
    assert "preprocess                 3 done" in run.stdout              # the summary, printed all the same
    assert "Traceback" not in run.stderr, run.stderr
    assert _errors(run.stderr) == [f"icegrid: error: summary.json: cannot write {folder}/summary.json "
                                   "(No space left on device); the summary printed is the only record"]
    assert sum("state.json" in line for line in run.stderr.splitlines()) == 1   # said once, not every 2 s
    assert left == ["filler", "tls"]                                     # no 0-byte summary, no .tmp left


def test_a_split_name_that_is_not_utf8_is_refused_up_front_in_one_line(tmp_path, sim):
    import shutil

    root = tmp_path / "odd"
    shutil.copytree(sim, root)
    odd = os.fsdecode(b"tr\xe9in")                  # latin-1 "tr\u00e9in", as an old file system would hold it
    (root / "train").rename(root / odd)
    (root / "train_meta.parquet").rename(root / f"{odd}_meta.parquet")
    run = _preprocess(tmp_path, root, tmp_path / "e.zarr")
    stderr = run.stderr.decode("utf-8")
    assert run.returncode == 2, stderr
    assert stderr.count("\n") == 1 and "lost" not in stderr, stderr
    assert stderr.startswith(f"icegrid: error: {root}/tr\\xe9in/batch_1.parquet: path is not UTF-8 (byte 0xe9)")
    assert not (tmp_path / "e.zarr").exists()


def test_a_short_geometry_file_is_named_and_a_store_made_from_it_is_fixed_by_a_rerun(tmp_path, sim):
    import shutil

    from icegrid.geometry import Geometry, read_geometry_csv, write_geometry_csv
    from icegrid.store import EventStore

    root = tmp_path / "short"
    shutil.copytree(sim, root)
    good = read_geometry_csv(sim / "sensor_geometry.csv")
    lines = (root / "sensor_geometry.csv").read_text().splitlines()
    (root / "sensor_geometry.csv").write_text("\n".join(lines[:-60]) + "\n")   # the last string lost
    run = _preprocess(tmp_path, root, tmp_path / "e.zarr")
    stderr = run.stderr.decode()
    assert run.returncode == 2 and stderr.count("\n") == 1, stderr
    assert stderr == (f"icegrid: error: {root}/sensor_geometry.csv: 60 of the 5160 sensors missing "
                      "(sensor_id 5100..5159; the file has 5100 rows): is it truncated?\n")
    # A store an older icegrid made from that file: rerunning with the right geometry replaces it.
    store = tmp_path / "old.zarr"
    EventStore.create(store, Geometry(good.x[:5100], good.y[:5100], good.z[:5100]))
    run = _preprocess(tmp_path, sim, store)
    assert run.returncode == 0, run.stderr.decode()
    assert "replaced the store's geometry (5100 sensors) with the inputs' (5160)" in run.stderr.decode()
    assert np.array_equal(EventStore(store).geometry().xyz, good.xyz) and len(EventStore(store).shards()) == 3
    # Once shards were built with a geometry, another one is refused with a line saying what to do.
    write_geometry_csv(Geometry(good.x + 1.0, good.y, good.z), root / "sensor_geometry.csv")
    run = _preprocess(tmp_path, root, store)
    stderr = run.stderr.decode()
    assert run.returncode == 2 and stderr.count("\n") == 1, stderr
    assert "store was built with a different sensor geometry (5160 sensors; the inputs' has 5160) and holds 3 " \
           "shard(s) made with it (first: train_batch_000001): give a new store, or remove its shards/" in stderr
