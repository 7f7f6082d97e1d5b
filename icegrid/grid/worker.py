"""Glidein mode's two processes: `icegrid scheduler` (a scheduler late workers and campaigns connect to)
and `icegrid worker` (one Dask worker that joins it from any batch system, NAT'd or not).

A worker checks what it can before it starts: the credentials load, the scheduler's transport (tls://
or tcp://) matches whether credentials were given, and a TLS scheduler accepts them — each mistake is
one line instead of a worker traceback.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
from pathlib import Path

from icegrid.grid.profiles.base import NANNY_ENV_VARIABLE, WORKER_MALLOC_ENV, nanny_environ_value
from icegrid.security import SecurityError


def serve_scheduler(scheduler_file: Path, tls_dir: Path | None = None, host: str | None = None, port: int = 0,
                    dashboard_address: str = ":8787", echo=print, tls_days: int = 30) -> None:
    """Run a scheduler until interrupted; write its address to ``scheduler_file`` for workers and campaigns.

    With ``tls_dir`` the scheduler listens on tls:// and requires the campaign's credentials (created
    there if missing, valid ``tls_days``) from every worker and client."""
    import asyncio

    from distributed import Scheduler

    from icegrid.grid.preflight import check_credentials

    security = None
    if tls_dir is not None:
        from icegrid.security import campaign_security, create_credentials

        security = campaign_security(create_credentials(tls_dir, valid_days=tls_days))
        expires = check_credentials(tls_dir, warn=lambda line: echo(f"warning: {line}"))
    scheduler_file = Path(scheduler_file)
    scheduler_file.parent.mkdir(parents=True, exist_ok=True)

    async def serve() -> None:
        async with Scheduler(host=host, port=port, dashboard_address=dashboard_address, security=security,
                             protocol="tls://" if security else None,
                             scheduler_file=str(scheduler_file)) as scheduler:
            tls = f"on: {tls_dir} (valid until {expires:%Y-%m-%d %H:%M} UTC)" if security else "off"
            echo(f"scheduler at {scheduler.address} (file {scheduler_file}); dashboard {_dashboard(scheduler)}; TLS {tls}")
            await scheduler.finished()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


def _dashboard(scheduler) -> str:
    port = scheduler.services.get("dashboard").port if "dashboard" in scheduler.services else None
    return f"http://{scheduler.address.split('://')[-1].rsplit(':', 1)[0]}:{port}/status" if port else "unavailable"


def scheduler_address(scheduler_file: Path | None, address: str | None) -> str | None:
    """The address a worker will dial (None when a scheduler file is not there yet: the worker waits)."""
    if address:
        return address
    try:
        return json.loads(Path(scheduler_file).read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def check_tls(address: str | None, tls_dir: Path | None, timeout: float = 10.0) -> None:
    """One-line SecurityError for a TLS mistake: credentials missing for a tls:// scheduler, given for a
    tcp:// one, or not the scheduler's campaign (its certificate is not signed by our CA, or it refuses
    ours). Unreachable schedulers are left to the worker's own --death-timeout."""
    if address is None:
        return
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if scheme == "tls" and tls_dir is None:
        raise SecurityError(f"scheduler {address} requires TLS: give the campaign's credentials with --tls-dir")
    if scheme != "tls" and tls_dir is not None:
        raise SecurityError(f"scheduler {address} does not use TLS; drop --tls-dir {tls_dir} (or start the "
                            "scheduler with --tls-dir)")
    if scheme != "tls":
        return
    from icegrid.security import CA_FILE, CERT_FILE, KEY_FILE

    folder = Path(tls_dir)
    context = ssl.create_default_context(cafile=str(folder / CA_FILE))
    context.check_hostname = False   # the campaign CA's signature is the check, as in distributed
    context.load_cert_chain(str(folder / CERT_FILE), str(folder / KEY_FILE))
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw) as tls:
                tls.settimeout(2.0)
                try:
                    if tls.recv(1) == b"":   # TLS 1.3: a refused client certificate arrives as the first read
                        raise SecurityError(f"scheduler {address} refused the credentials in {folder} "
                                            "(another campaign's?)")
                except (socket.timeout, TimeoutError):
                    pass                     # accepted: the scheduler waits for the worker to speak
    except ssl.SSLCertVerificationError:
        raise SecurityError(f"scheduler {address} is not the campaign of {folder}: its certificate is not "
                            "signed by that folder's ca.pem") from None
    except ssl.SSLError as err:
        raise SecurityError(f"scheduler {address} refused the credentials in {folder} ({err.reason or err})") from None
    except OSError:
        return


def worker_command(scheduler_file: Path | None = None, address: str | None = None, tls_dir: Path | None = None,
                   nthreads: int = 1, memory_limit: str = "auto", resources: str = "", lifetime: str | None = None,
                   lifetime_stagger: str | None = None, death_timeout: str = "120s", name: str | None = None,
                   nanny: bool = True, nworkers: int = 1, contact_address: str | None = None,
                   listen_address: str | None = None, interface: str | None = None,
                   local_directory: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The ``dask worker`` command line an ``icegrid worker`` runs (``extra``: passed on as they are)."""
    cmd = [sys.executable, "-m", "distributed.cli.dask_worker"]
    cmd += ["--scheduler-file", str(scheduler_file)] if scheduler_file else [address]
    cmd += ["--nthreads", str(nthreads), "--memory-limit", str(memory_limit), "--death-timeout", death_timeout,
            "--nanny" if nanny else "--no-nanny", "--no-dashboard"]
    options = {"--resources": resources or None, "--lifetime": lifetime,
               "--lifetime-stagger": lifetime_stagger if lifetime else None, "--name": name,
               "--nworkers": str(nworkers) if nworkers != 1 else None, "--contact-address": contact_address,
               "--listen-address": listen_address, "--interface": interface,
               "--local-directory": local_directory or default_local_directory()}
    for flag, value in options.items():
        if value:
            cmd += [flag, value]
    if tls_dir is not None:
        from icegrid.security import campaign_security, worker_tls_args

        campaign_security(tls_dir)  # one-line error now rather than a TLS traceback later
        cmd += worker_tls_args(tls_dir)
    return cmd + list(extra)


def default_local_directory() -> str | None:
    """The slot's scratch: HTCondor's ``$_CONDOR_SCRATCH_DIR``; elsewhere Dask's default (``$TMPDIR``)."""
    return os.environ.get("_CONDOR_SCRATCH_DIR") or None


def worker_environment(nanny: bool) -> dict[str, str]:
    """The environment a worker starts with: WORKER_MALLOC_ENV for the process the nanny spawns (or, with
    no nanny, the worker itself: glibc reads it at start), one math thread per task thread."""
    env = {NANNY_ENV_VARIABLE: nanny_environ_value()}
    if not nanny:
        env.update(WORKER_MALLOC_ENV)
    # As distributed's nanny does for the workers it spawns: tasks do not oversubscribe the slot's cores.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[variable] = os.environ.get(variable, "1")
    return env


def exec_worker(**kwargs) -> None:
    """Check, then replace this process with the Dask worker (signals from the batch system reach it)."""
    if kwargs.get("tls_dir") is not None:
        from icegrid.security import campaign_security

        campaign_security(kwargs["tls_dir"])
    check_tls(scheduler_address(kwargs.get("scheduler_file"), kwargs.get("address")), kwargs.get("tls_dir"))
    cmd = worker_command(**kwargs)
    for variable, value in worker_environment(kwargs.get("nanny", True)).items():
        os.environ.setdefault(variable, value)   # what the user set stays
    os.execv(cmd[0], cmd)
