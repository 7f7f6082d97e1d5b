"""Grid-mode TLS: a scheduler started with a campaign's credentials refuses workers (and clients) that
do not present them — none at all, or another campaign's — and accepts the ones that do.

Real processes: `icegrid scheduler` and `icegrid worker`, as a user would start them on a pool.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time

import pytest
from distributed import Client

from icegrid.security import campaign_security, create_credentials
from test_clusters import stop_process

ICEGRID = [sys.executable, "-m", "icegrid"]


def start(args, log_path):
    log = open(log_path, "w")
    return subprocess.Popen(ICEGRID + args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def connected_workers(client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def test_worker_without_the_campaign_credentials_is_refused(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    campaign_tls, other_tls = tmp_path / "campaign-tls", create_credentials(tmp_path / "other-tls")
    processes = []
    try:
        scheduler = start(["scheduler", "--scheduler-file", str(scheduler_file), "--tls-dir", str(campaign_tls),
                           "--dashboard-address", ":0"], tmp_path / "scheduler.log")
        processes.append(scheduler)
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tls://")

        with Client(address, security=campaign_security(campaign_tls), timeout=30, set_as_default=False) as client:
            # Control: with the campaign's credentials a worker joins.
            good = start(["worker", "--scheduler-file", str(scheduler_file), "--tls-dir", str(campaign_tls),
                          "--no-nanny"], tmp_path / "good.log")
            processes.append(good)
            deadline = time.monotonic() + 60
            while connected_workers(client) < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert connected_workers(client) == 1

            # Without credentials, and with another campaign's: refused, and they give up.
            refused = []
            # "ca-only" trusts the scheduler but has no certificate of its own: the scheduler must say no.
            ca_only = ["--tls-ca-file", str(campaign_tls / "ca.pem")]
            for label, extra in (("none", []), ("ca-only", ca_only), ("other", ["--tls-dir", str(other_tls)])):
                worker = start(["worker", "--scheduler-file", str(scheduler_file), "--no-nanny",
                                "--death-timeout", "10s", *extra], tmp_path / f"{label}.log")
                processes.append(worker)
                refused.append(worker)
            for worker in refused:
                assert worker.wait(timeout=60) != 0
            assert connected_workers(client) == 1
            assert good.poll() is None

        # A client is held to the same rule (one without any TLS setup cannot even try: distributed
        # refuses a tls:// address without a context before connecting, so that case proves nothing here).
        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=campaign_security(other_tls), timeout=5, set_as_default=False)
        # Raw TLS that trusts the scheduler but shows no certificate: the scheduler ends the handshake.
        host, port = address.removeprefix("tls://").rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(campaign_tls / "ca.pem"))
        context.check_hostname = False
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"\0" * 8)
                    if tls.recv(1) == b"":  # TLS 1.3: the refusal arrives as the first read
                        raise ConnectionError("closed by the scheduler")
    finally:
        for process in reversed(processes):
            stop_process(process)
    # The scheduler itself turned the certificate-less and foreign peers away at the TLS handshake.
    log = (tmp_path / "scheduler.log").read_text().lower()
    assert "certificate" in log or "ssl" in log, log[-2000:]


def test_credentials_are_private_and_reused(tmp_path):
    folder = create_credentials(tmp_path / "tls")
    assert (folder / "key.pem").stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    first = (folder / "ca.pem").read_bytes()
    assert (create_credentials(folder) / "ca.pem").read_bytes() == first  # same campaign, same authority
    assert (create_credentials(tmp_path / "other") / "ca.pem").read_bytes() != first
