"""Authentication by default: no scheduler icegrid starts takes work from a client without the campaign's
credentials, and another user of the machine cannot reach a local campaign's.

Real processes: a local campaign (`icegrid reprocess`), `icegrid scheduler`/`worker` as glidein mode
runs them, clients that try their luck (none, self-made credentials, plain TCP), and `nobody` through
`runuser`. The condor and slurm campaigns' schedulers get the same intruder in tests/test_condor.py and
tests/test_slurm.py (:func:`assert_intruders_refused`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_clusters import stop_process, wait_for

ICEGRID = [sys.executable, "-m", "icegrid"]
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------- the intruder
def intrude(address: str, marker: str, private_files: list[str] = ()) -> list[str]:
    """Try to run ``os.mkdir(marker)`` on the scheduler at ``address`` without its campaign's credentials,
    and to read ``private_files``. One line per attempt; "refused ..." is the only good answer."""
    from distributed import Client
    from distributed.security import Security

    host_port = address.split("://", 1)[-1]
    attempts = {"plain tcp": (f"tcp://{host_port}", None),
                "self-made credentials": (f"tls://{host_port}", Security.temporary())}
    lines = []
    for label, (target, security) in attempts.items():
        try:
            client = Client(target, security=security, timeout="6s", set_as_default=False)
        except Exception as err:  # what a refused peer sees: the connection never comes up
            lines.append(f"refused {label}: {type(err).__name__}")
            continue
        try:
            client.submit(os.mkdir, marker, pure=False).result(timeout=20)
            lines.append(f"RAN a task with {label}")
        except Exception as err:
            lines.append(f"CONNECTED with {label} ({type(err).__name__})")
        finally:
            client.close()
    for path in private_files:
        try:
            Path(path).read_bytes()
            lines.append(f"READ {path}")
        except PermissionError:
            lines.append(f"refused reading {path}")
    return lines


def assert_intruders_refused(address: str, marker: Path, private_files: list[Path] = (), user: str | None = None):
    """Run :func:`intrude` in a fresh process (as ``user`` through runuser), assert every attempt failed."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_security import intrude; "
            "lines = intrude(sys.argv[1], sys.argv[2], sys.argv[3:]); print('\\n'.join(lines)); "
            "sys.exit(any(not l.startswith('refused') for l in lines))")
    cmd = [sys.executable, "-c", code, address, str(marker), *map(str, private_files)]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd="/")
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 2 + len(private_files), run.stdout + run.stderr[-3000:]
    assert not Path(marker).exists()
    return lines


def intruder_thread(scheduler_file: Path, marker: Path):
    """:func:`assert_intruders_refused` in a thread (a pool test's fault sequence goes on meanwhile), on a
    campaign's scheduler file, which must be 0600; ``.result`` is "refused" or what went wrong."""
    import threading

    def knock():
        try:
            assert mode(scheduler_file) == 0o600, oct(mode(scheduler_file))
            assert_intruders_refused(json.loads(scheduler_file.read_text())["address"], marker)
            thread.result = "refused"
        except BaseException as err:
            thread.result = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=knock, daemon=True)
    thread.result = "not finished"
    thread.start()
    return thread


def run_as_owner(address: str, security, marker: Path) -> None:
    """The control: with the credentials a client does run a task there."""
    from distributed import Client

    with Client(address, security=security, timeout="60s", set_as_default=False) as client:
        client.submit(os.mkdir, str(marker), pure=False).result(timeout=120)
    assert marker.is_dir()


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def listening(pid: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


# ----------------------------------------------------------------------------------------- a local campaign
@pytest.fixture(scope="module")
def local_campaign():
    """A local campaign held mid-shard, under a folder every user may traverse (so only the files' own
    modes keep `nobody` out). Yields (campaign folder, scheduler address)."""
    from faults import hold_preload
    from icegrid.simulate import write_dataset

    base = Path(tempfile.mkdtemp(prefix="icegrid-security-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    write_dataset(base / "sim", batches=1, events_per_batch=100, seed=5)
    hold = hold_preload(base, 300)   # the shard waits: the scheduler stays up while the test knocks
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(hold)])}
    log = open(base / "manager.log", "w")
    manager = subprocess.Popen(ICEGRID + ["reprocess", "--input", str(base / "sim"), "--store", str(base / "s.zarr"),
                                          "--models", "linefit", "--jobs", "1", "--no-analysis", "--no-progress",
                                          "--set", "dashboard_address=:0"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    campaign = base / "s.zarr.campaign"
    try:
        info = campaign / "scheduler-local.json"
        wait_for(info.exists, 120, "the local campaign's scheduler file")
        yield campaign, json.loads(info.read_text())["address"]
    finally:
        if manager.poll() is None:
            os.killpg(manager.pid, signal.SIGTERM)
        try:
            manager.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(manager.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def test_a_local_campaign_takes_no_work_without_its_credentials(local_campaign):
    from icegrid.security import campaign_security

    campaign, address = local_campaign
    assert address.startswith("tls://127.0.0.1:")
    assert mode(campaign / "scheduler-local.json") == 0o600
    assert mode(campaign / "tls") == 0o700 and all(mode(f) == 0o600 for f in (campaign / "tls").iterdir())
    run_as_owner(address, campaign_security(campaign / "tls"), campaign / "owner-ran")
    assert_intruders_refused(address, campaign / "intruder-ran")


def test_another_local_user_cannot_submit_to_a_local_campaign(local_campaign):
    if os.geteuid() != 0:
        pytest.skip("needs root, to act as another user (nobody) through runuser")
    probe = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", "import distributed, icegrid"],
                           capture_output=True, text=True, timeout=120, cwd="/",
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run this virtualenv: {probe.stderr.strip().splitlines()[-1:]}")
    campaign, address = local_campaign
    private = [campaign / "scheduler-local.json", campaign / "tls" / "key.pem"]
    lines = assert_intruders_refused(address, campaign / "nobody-ran", private, user="nobody")
    assert lines[-2:] == [f"refused reading {path}" for path in private]


# ----------------------------------------------------------------------------------------- icegrid scheduler
def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(ICEGRID + args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_icegrid_scheduler_refuses_to_run_unauthenticated_and_insecure_means_loopback(tmp_path):
    refused = subprocess.run(ICEGRID + ["scheduler", "--scheduler-file", str(tmp_path / "s.json")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and not (tmp_path / "s.json").exists()
    assert refused.stderr.strip().splitlines() == [
        "icegrid: error: icegrid scheduler needs --tls-dir DIR (workers and campaigns then need the same "
        "credentials); --insecure runs it without TLS on 127.0.0.1 only"]
    wide = subprocess.run(ICEGRID + ["scheduler", "--scheduler-file", str(tmp_path / "s.json"), "--insecure",
                                     "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert wide.returncode == 2 and len(wide.stderr.strip().splitlines()) == 1 and "--host 0.0.0.0" in wide.stderr

    info = tmp_path / "insecure.json"
    scheduler = start(["scheduler", "--scheduler-file", str(info), "--insecure", "--dashboard-address", ":0"],
                      tmp_path / "scheduler.log")
    try:
        wait_for(info.exists, 120, "the scheduler file")
        assert json.loads(info.read_text())["address"].startswith("tcp://127.0.0.1:")
        assert mode(info) == 0o600
        wait_for(lambda: len(listening(scheduler.pid)) > 0, 30, "listening sockets")
        assert listening(scheduler.pid) == {"127.0.0.1"}     # the scheduler's port and the dashboard's
    finally:
        stop_process(scheduler)
    assert "warning: --insecure" in (tmp_path / "scheduler.log").read_text()
    assert not info.exists()      # removed when the scheduler stops


@pytest.fixture
def glidein_scheduler(tmp_path):
    """`icegrid scheduler --tls-dir` with one worker, as glidein mode runs them."""
    info, tls = tmp_path / "scheduler.json", tmp_path / "tls"
    processes = [start(["scheduler", "--scheduler-file", str(info), "--tls-dir", str(tls), "--dashboard-address", ":0"],
                       tmp_path / "scheduler.log")]
    try:
        wait_for(info.exists, 120, "the scheduler file")
        processes.append(start(["worker", "--scheduler-file", str(info), "--tls-dir", str(tls), "--no-nanny"],
                               tmp_path / "worker.log"))
        yield info, tls, processes[0]
    finally:
        for process in reversed(processes):
            stop_process(process)


def test_a_glidein_scheduler_takes_no_work_without_its_credentials(glidein_scheduler, tmp_path):
    from icegrid.security import campaign_security

    info, tls, scheduler = glidein_scheduler
    address = json.loads(info.read_text())["address"]
    assert address.startswith("tls://") and mode(info) == 0o600
    run_as_owner(address, campaign_security(tls), tmp_path / "owner-ran")   # waits for the worker too
    assert_intruders_refused(address, tmp_path / "intruder-ran")
    # Its dashboard is on loopback; only the scheduler's own (TLS) port listens beyond.
    import psutil

    ports = {c.laddr.port: c.laddr.ip for c in psutil.Process(scheduler.pid).net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN}
    tls_port = int(address.rsplit(":", 1)[1])
    assert {ip for port, ip in ports.items() if port != tls_port} == {"127.0.0.1"}


def test_mismatched_transport_is_one_line_for_workers_and_campaigns(glidein_scheduler, tmp_path):
    """Plain against TLS and TLS against plain: `icegrid worker` and a glidein campaign say so in one line."""
    from icegrid.simulate import write_dataset

    info, tls, _ = glidein_scheduler
    host_port = json.loads(info.read_text())["address"].split("://", 1)[1]
    plain_info = tmp_path / "plain.json"
    plain = start(["scheduler", "--scheduler-file", str(plain_info), "--insecure", "--dashboard-address", ":0"],
                  tmp_path / "plain.log")
    write_dataset(tmp_path / "sim", batches=1, events_per_batch=50, seed=2)
    try:
        wait_for(plain_info.exists, 120, "the plain scheduler file")
        plain_address = json.loads(plain_info.read_text())["address"]
        runs = {
            "worker plain->tls": ["worker", "--scheduler", f"tcp://{host_port}", "--death-timeout", "10s"],
            "worker tls->plain": ["worker", "--scheduler", plain_address.replace("tcp://", "tls://"),
                                  "--tls-dir", str(tls), "--death-timeout", "10s"],
            "campaign plain->tls": ["reprocess", "--input", str(tmp_path / "sim"), "--store", str(tmp_path / "a.zarr"),
                                    "--models", "linefit", "--no-analysis", "-q", "--cluster", "glidein",
                                    "--scheduler-file", str(info)],
            "campaign tls->plain": ["reprocess", "--input", str(tmp_path / "sim"), "--store", str(tmp_path / "b.zarr"),
                                    "--models", "linefit", "--no-analysis", "-q", "--cluster", "glidein",
                                    "--scheduler-file", str(plain_info), "--tls-dir", str(tls)],
        }
        for label, args in runs.items():
            run = subprocess.run(ICEGRID + args, capture_output=True, text=True, timeout=120)
            lines = run.stderr.strip().splitlines()
            assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("icegrid: error: scheduler "), \
                f"{label}: {run.stderr[-2000:]}"
    finally:
        stop_process(plain)


def test_a_glidein_campaign_refuses_a_plain_scheduler_beyond_loopback(tmp_path):
    """A scheduler without TLS that anyone on the network reaches (a bare `dask scheduler`): refused."""
    from icegrid.simulate import write_dataset

    info = tmp_path / "dask.json"
    bare = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(info),
                             "--no-dashboard", "--port", "0"], stdout=open(tmp_path / "dask.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    write_dataset(tmp_path / "sim", batches=1, events_per_batch=50, seed=2)
    try:
        wait_for(info.exists, 120, "the scheduler file")
        address = json.loads(info.read_text())["address"]
        if address.startswith("tcp://127."):
            pytest.skip("this machine has no interface but loopback")
        run = subprocess.run(ICEGRID + ["reprocess", "--input", str(tmp_path / "sim"), "--store", str(tmp_path / "s.zarr"),
                                        "--models", "linefit", "--no-analysis", "-q", "--cluster", "glidein",
                                        "--scheduler-file", str(info)], capture_output=True, text=True, timeout=120)
    finally:
        stop_process(bare)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"icegrid: error: scheduler {address} ({info}) has no TLS and listens beyond this machine: anyone who "
        "reaches it can run code on its workers; restart it with `icegrid scheduler --tls-dir DIR` and give the "
        "campaign --tls-dir DIR"]


def test_private_files_are_written_0600_whatever_the_umask(tmp_path):
    from icegrid.security import create_credentials, write_private

    old = os.umask(0)
    try:
        path = write_private(tmp_path / "scheduler.json", "{}")
        (tmp_path / "wide.json").write_text("old")
        os.chmod(tmp_path / "wide.json", 0o666)
        write_private(tmp_path / "wide.json", "new")      # replaces a wide file: the new one is private
        folder = create_credentials(tmp_path / "tls")
    finally:
        os.umask(old)
    assert mode(path) == 0o600 and mode(tmp_path / "wide.json") == 0o600
    assert (tmp_path / "wide.json").read_text() == "new"
    assert mode(folder) == 0o700 and {f.name: mode(f) for f in folder.iterdir()} == \
        {"ca.pem": 0o600, "cert.pem": 0o600, "key.pem": 0o600}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scheduler.json", "tls", "wide.json"]   # no leftovers


def test_a_readable_key_is_refused_in_one_line(tmp_path):
    from icegrid.security import SecurityError, campaign_security, create_credentials

    folder = create_credentials(tmp_path / "tls")
    os.chmod(folder / "key.pem", 0o644)
    with pytest.raises(SecurityError, match=r"key.pem: private key readable by other users \(mode 644\)"):
        campaign_security(folder)


def test_dashboards_bind_loopback_unless_a_host_is_asked_for(tmp_path):
    from icegrid.security import create_credentials, dashboard_address, dashboard_tls_config

    assert [dashboard_address(a) for a in (None, ":8787", ":0", "8787", "0.0.0.0:8787")] == \
        ["127.0.0.1:8787", "127.0.0.1:8787", "127.0.0.1:0", "127.0.0.1:8787", "0.0.0.0:8787"]
    folder = create_credentials(tmp_path / "tls")
    assert dashboard_tls_config("127.0.0.1:8787", folder) == {} and dashboard_tls_config("0.0.0.0:1", None) == {}
    assert dashboard_tls_config("0.0.0.0:8787", folder)["distributed.scheduler.dashboard.tls.cert"] == \
        str(folder.resolve() / "cert.pem")
