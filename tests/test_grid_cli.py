"""The grid commands as a user meets them: fail-fast preflight, one line per failure, log-friendly output,
`icegrid status` on a live campaign, TLS mistakes of `icegrid worker`, a worker joining through NAT flags.

Real processes throughout (`icegrid reprocess`, `scheduler`, `worker`, `status`) on this machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from faults import hold_preload
from test_clusters import stop_process, wait_for

ICEGRID = [sys.executable, "-m", "icegrid"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from icegrid.simulate import write_dataset

    root = tmp_path_factory.mktemp("grid-cli") / "sim"
    write_dataset(root, batches=3, events_per_batch=200, seed=3)
    return root


def reprocess(args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(ICEGRID + ["reprocess", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("icegrid: error:")]


def test_preflight_failures_are_one_line_before_any_shard(sim, tmp_path):
    gpu = reprocess(["--input", str(sim), "--store", "gpu.zarr", "--models", "linefit", "--device", "cuda"], tmp_path)
    assert gpu.returncode == 2 and error_lines(gpu.stderr) == gpu.stderr.strip().splitlines()
    assert "asks for resource GPU, which no pool's workers offer (local offers none)" in gpu.stderr
    missing = reprocess(["--input", str(sim), "--store", "ckpt.zarr", "--models", "dynedge",
                         "--checkpoint", "dynedge=missing.pt"], tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"icegrid: error: {tmp_path / 'missing.pt'}: checkpoint file not found"
    # Before the first shard: neither campaign made a store or started a pool.
    assert not (tmp_path / "gpu.zarr").exists() and not (tmp_path / "ckpt.zarr.campaign").exists()


def test_a_bad_batch_is_one_error_line_and_a_log_file_gets_no_cursor_codes(sim, tmp_path):
    import shutil

    data = tmp_path / "sim"
    shutil.copytree(sim, data)
    (data / "train" / "batch_2.parquet").write_bytes(b"not a parquet file")
    run = reprocess(["--input", "sim", "--store", "s.zarr", "--models", "linefit", "--jobs", "2",
                     "--set", "dashboard_address=:0"], tmp_path,
                    env={**os.environ, "ICEGRID_PROGRESS_INTERVAL": "0"})
    assert run.returncode == 1, run.stderr[-2000:]
    errors = error_lines(run.stderr)
    assert len(errors) == 1, run.stderr     # the batch; its inference, which could not run, is counted there
    bad = errors[0]
    assert bad.startswith("icegrid: error: preprocess/train_batch_000002: InputError: ") and "batch_2.parquet" in bad
    assert bad.endswith("; 1 dependent task(s) not run)")
    assert "Traceback" not in run.stderr and "Compute Failed" not in run.stderr
    log = bad.split("(traceback: ")[1].split(";")[0]
    assert "Traceback (most recent call last)" in open(log).read()
    # stderr is a pipe here, as for a manager running as a batch job: plain progress lines only.
    assert "\r" not in run.stderr and "\x1b" not in run.stderr
    assert any(line.startswith("progress: linefit 2/3 shards") and "ETA" in line for line in run.stderr.splitlines())


def test_status_shows_a_live_campaign_then_the_finished_one(sim, tmp_path):
    hold = hold_preload(tmp_path, 1.5)
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(hold)])}
    manager = subprocess.Popen(ICEGRID + ["reprocess", "--input", str(sim), "--store", "s.zarr", "--models", "linefit",
                                          "--jobs", "1", "--no-analysis", "-q", "--set", "dashboard_address=:0"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def in_flight():
            run = subprocess.run(ICEGRID + ["status", "s.zarr"], cwd=tmp_path, capture_output=True, text=True)
            line = next((l for l in run.stdout.splitlines() if l.strip().startswith("preprocess")), "")
            return run.stdout if "running (manager pid" in run.stdout and line.split()[2:3] not in ([], ["0"]) else None
        live = wait_for(in_flight, 120, "`icegrid status` to show a shard in flight")
        out, err = manager.communicate(timeout=300)
    finally:
        stop_process(manager)
    assert manager.returncode == 0, err[-2000:]
    assert "pool local (local): 1 workers" in live
    assert err == ""   # -q: nothing but warnings and errors
    done = subprocess.run(ICEGRID + ["status", "s.zarr"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert "finished, all shards done" in done
    rows = {line.split()[0]: line.split()[1] for line in done.splitlines()[2:4]}
    assert rows == {"preprocess": "3/3", "linefit": "3/3"}


def start(args, log_path):
    return subprocess.Popen(ICEGRID + args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_worker_tls_mistakes_are_one_line(tmp_path):
    from icegrid.security import create_credentials

    scheduler_file = tmp_path / "scheduler.json"
    scheduler = start(["scheduler", "--scheduler-file", str(scheduler_file), "--tls-dir", str(tmp_path / "tls"),
                       "--dashboard-address", ":0"], tmp_path / "scheduler.log")
    try:
        wait_for(scheduler_file.exists, 60, "the scheduler file")
        other = create_credentials(tmp_path / "other")
        cases = {"no --tls-dir": ([], "requires TLS: give the campaign's credentials with --tls-dir"),
                 "missing folder": (["--tls-dir", str(tmp_path / "nope")], "credentials missing or unreadable"),
                 "another campaign": (["--tls-dir", str(other)], "is not the campaign of")}
        for label, (extra, message) in cases.items():
            run = subprocess.run(ICEGRID + ["worker", "--scheduler-file", str(scheduler_file), "--no-nanny", *extra],
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 2, (label, run.stderr)
            assert run.stderr.count("\n") == 1 and message in run.stderr, (label, run.stderr)
    finally:
        stop_process(scheduler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_joins_through_its_contact_address_and_serves_a_campaign(sim, tmp_path):
    """The NAT case on loopback: the worker listens on all interfaces and tells the scheduler to reach
    it at 127.0.0.1 (as a forwarded public address would be given)."""
    from distributed import Client

    scheduler_file, port = tmp_path / "scheduler.json", free_port()
    processes = [start(["scheduler", "--scheduler-file", str(scheduler_file), "--insecure", "--dashboard-address", ":0"],
                       tmp_path / "scheduler.log")]
    try:
        wait_for(scheduler_file.exists, 60, "the scheduler file")
        processes.append(start(["worker", "--scheduler-file", str(scheduler_file), "--no-nanny", "--name", "natted",
                                "--listen-address", f"tcp://0.0.0.0:{port}",
                                "--contact-address", f"tcp://127.0.0.1:{port}"], tmp_path / "worker.log"))
        with Client(scheduler_file=str(scheduler_file), timeout=30, set_as_default=False) as client:
            wait_for(lambda: client.scheduler_info()["workers"], 60, "the worker")
            assert list(client.scheduler_info()["workers"]) == [f"tcp://127.0.0.1:{port}"]
        run = reprocess(["--input", str(sim), "--store", "s.zarr", "--models", "linefit", "--no-analysis",
                         "--cluster", "glidein", "--scheduler-file", str(scheduler_file), "--no-progress"], tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
    finally:
        for process in reversed(processes):
            stop_process(process)
    summary = json.loads((tmp_path / "s.zarr.campaign" / "summary.json").read_text())
    assert summary["ok"] and set(summary["placements"].values()) == {f"tcp://127.0.0.1:{port}"}


def test_inputs_the_workers_cannot_read_are_one_line_before_any_shard(sim, tmp_path, request):
    """Workers that run as another user (as a batch system's would) and cannot read the inputs: the
    campaign stops at once, naming the worker and the path, instead of failing every shard."""
    import pwd
    import shutil

    if os.geteuid() != 0:
        pytest.skip("needs root, to run the workers as another user")
    from test_clusters import submit_user

    try:
        pwd.getpwnam(submit_user())
    except KeyError:
        pytest.skip(f"no user '{submit_user()}' to run the workers as (.ci/pools.sh makes it)")
    import tempfile

    # Not under pytest's tmp_path: root's own folders there are closed to other users.
    base = Path(tempfile.mkdtemp(prefix="icegrid-paths-", dir="/var/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    os.chmod(base, 0o755)
    shared = base / "shared"
    shared.mkdir()
    shutil.chown(shared, submit_user(), submit_user())
    private = base / "private"
    shutil.copytree(sim, private / "sim")
    os.chmod(private, 0o700)                       # readable by the manager (root) alone
    scheduler_file = shared / "scheduler.json"
    as_user = ["runuser", "-u", submit_user(), "--"]
    processes = [subprocess.Popen(as_user + ICEGRID + ["scheduler", "--scheduler-file", str(scheduler_file),
                                                      "--tls-dir", str(shared / "tls"),
                                                      "--dashboard-address", ":0"], cwd=shared,
                                  stdout=open(shared / "scheduler.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)]
    try:
        wait_for(scheduler_file.exists, 60, "the scheduler file")
        processes.append(subprocess.Popen(as_user + ICEGRID + ["worker", "--scheduler-file", str(scheduler_file),
                                                               "--tls-dir", str(shared / "tls"),
                                                               "--no-nanny"], cwd=shared,
                                          stdout=open(shared / "worker.log", "w"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
        run = reprocess(["--input", str(private / "sim"), "--store", str(shared / "s.zarr"), "--models", "linefit",
                         "--cluster", "glidein", "--scheduler-file", str(scheduler_file),
                         "--tls-dir", str(shared / "tls"), "-q"], tmp_path)
    finally:
        for process in reversed(processes):
            stop_process(process)
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("icegrid: error: pool glidein: worker tls://") and \
        f"cannot read {private / 'sim'}; the inputs and the store must be on a filesystem the workers share" in line
    from icegrid.store import EventStore

    assert EventStore(shared / "s.zarr").shards() == []      # stopped before the first shard


def test_glidein_campaign_without_a_gpu_worker_ends_in_one_line(sim, tmp_path):
    """Glidein pools cannot say beforehand what their workers offer: the manager waits
    timeout_resources_s for a worker with a GPU, then says which resource no worker offers."""
    scheduler_file = tmp_path / "scheduler.json"
    tls = tmp_path / "tls"
    processes = [start(["scheduler", "--scheduler-file", str(scheduler_file), "--tls-dir", str(tls),
                        "--dashboard-address", ":0"], tmp_path / "scheduler.log")]
    (tmp_path / "gpu.yaml").write_text(
        f"inputs: [{sim}]\nstore: s.zarr\nmodels: [linefit]\ndevice: cuda\nanalysis: false\ntimeout_resources_s: 5\n"
        f"cluster: {{profile: glidein, scheduler_file: {scheduler_file}, tls_dir: {tls}}}\n")
    try:
        wait_for(scheduler_file.exists, 60, "the scheduler file")
        processes.append(start(["worker", "--scheduler-file", str(scheduler_file), "--tls-dir", str(tls),
                                "--no-nanny"], tmp_path / "w.log"))
        run = reprocess(["gpu.yaml", "-q"], tmp_path, timeout=180)
    finally:
        for process in reversed(processes):
            stop_process(process)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "icegrid: error: no worker offers resource GPU, which stage linefit asks for (waited 5 s; workers: glidein 1)"]
