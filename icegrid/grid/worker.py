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
                    dashboard_address: str = "127.0.0.1:8787", echo=print, tls_days: int = 30) -> None:
    """Run a scheduler until interrupted; write its address to ``scheduler_file`` (mode 600) for workers
    and campaigns, and remove the file when it stops.

    With ``tls_dir`` the scheduler listens on tls:// and requires the campaign's credentials (created
    there if missing, valid ``tls_days``) from every worker and client; without, the caller has checked
    ``host`` (:func:`unauthenticated_host`). The dashboard binds loopback unless given a host."""
    import asyncio

    import dask
    from distributed import Scheduler

    from icegrid.grid.preflight import check_credentials
    from icegrid.security import dashboard_address as loopback_default, dashboard_tls_config, write_private

    security = None
    if tls_dir is not None:
        from icegrid.security import campaign_security, create_credentials

        security = campaign_security(create_credentials(tls_dir, valid_days=tls_days))
        expires = check_credentials(tls_dir, warn=lambda line: echo(f"warning: {line}"))
    scheduler_file = Path(scheduler_file)
    scheduler_file.parent.mkdir(parents=True, exist_ok=True)
    dashboard = loopback_default(dashboard_address)
    written = []

    async def serve() -> None:
        # distributed would write the scheduler file itself, with the umask's mode (0644): written here instead.
        with dask.config.set(dashboard_tls_config(dashboard, tls_dir)):
            scheduler = Scheduler(host=host, port=port, dashboard_address=dashboard, security=security,
                                  protocol="tls://" if security else None)
        async with scheduler:
            write_private(scheduler_file, json.dumps(scheduler.identity(), indent=2, default=str))
            written.append(scheduler_file)
            tls = f"on: {tls_dir} (valid until {expires:%Y-%m-%d %H:%M} UTC)" if security else "off"
            echo(f"scheduler at {scheduler.address} (file {scheduler_file}); dashboard "
                 f"{_dashboard(scheduler)}; TLS {tls}")
            await scheduler.finished()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    finally:   # the address is stale once this scheduler is gone (another one's file is left alone)
        for path in written:
            path.unlink(missing_ok=True)


def unauthenticated_host(host: str | None, insecure: bool) -> str:
    """Where a scheduler without TLS may listen: nowhere unless ``insecure``, and then loopback only
    (any process that reaches it can run code as its user). SecurityError otherwise."""
    from icegrid.security import LOOPBACK, is_loopback

    if not insecure:
        raise SecurityError("icegrid scheduler needs --tls-dir DIR (workers and campaigns then need the same "
                            "credentials); --insecure runs it without TLS on 127.0.0.1 only")
    if host and not is_loopback(host):
        raise SecurityError(f"--insecure listens on 127.0.0.1 only, not --host {host}: anyone who reaches an "
                            "unauthenticated scheduler can run code as you; use --tls-dir DIR")
    return host or LOOPBACK


def _dashboard(scheduler) -> str:
    server = scheduler.services.get("dashboard")
    if server is None:
        return "unavailable"
    import dask

    scheme = "https" if dask.config.get("distributed.scheduler.dashboard.tls.cert", None) else "http"
    host = getattr(server, "address", None) or scheduler.address.split("://")[-1].rsplit(":", 1)[0]
    return f"{scheme}://{host}:{server.port}/status"


def scheduler_address(scheduler_file: Path | None, address: str | None) -> str | None:
    """The address a worker will dial (None when a scheduler file is not there yet: the worker waits)."""
    if address:
        return address
    try:
        return json.loads(Path(scheduler_file).read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def check_tls(address: str | None, tls_dir: Path | None, timeout: float = 10.0) -> None:
    """One-line SecurityError for a TLS mistake: credentials missing for a TLS scheduler, given for a
    plain one (whatever the address's scheme says: a plain tcp:// address is probed), or not the
    scheduler's campaign (its certificate is not signed by our CA, or it refuses ours). Unreachable
    schedulers are left to the worker's own --death-timeout."""
    if address is None:
        return
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if scheme == "tls" and tls_dir is None:
        raise SecurityError(f"scheduler {address} requires TLS: give the campaign's credentials with --tls-dir")
    if scheme != "tls" and tls_dir is not None:
        raise SecurityError(f"scheduler {address} does not use TLS; drop --tls-dir {tls_dir} (or start the "
                            "scheduler with --tls-dir)")
    if scheme not in ("tls", "tcp"):
        return
    host, port = address.split("://", 1)[-1].rsplit(":", 1)
    host = host.strip("[]")
    if scheme == "tcp":
        if speaks_tls(host, int(port), timeout):
            raise SecurityError(f"scheduler {address} uses TLS (tls://{host}:{port}): give the campaign's "
                                "credentials with --tls-dir")
        return
    _check_campaign(address, host, int(port), Path(tls_dir), timeout)


def _check_campaign(address: str, host: str, port: int, folder: Path, timeout: float) -> None:
    from icegrid.security import CA_FILE, CERT_FILE, KEY_FILE

    context = ssl.create_default_context(cafile=str(folder / CA_FILE))
    context.check_hostname = False   # the campaign CA's signature is the check, as in distributed
    context.load_cert_chain(str(folder / CERT_FILE), str(folder / KEY_FILE))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
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
        if not _tls_answer(err):
            raise SecurityError(f"scheduler {address} does not speak TLS (a plain scheduler? its address "
                                f"would be tcp://{host}:{port}); drop --tls-dir") from None
        raise SecurityError(f"scheduler {address} refused the credentials in {folder} ({err.reason or err})") from None
    except OSError:
        return


def _tls_answer(err: ssl.SSLError) -> bool:
    """Whether a handshake error came from a TLS peer (an alert) rather than from plain bytes."""
    reason = (err.reason or str(err)).upper()
    return "ALERT" in reason or "CERTIFICATE" in reason


def speaks_tls(host: str, port: int, timeout: float = 10.0) -> bool:
    """Whether the server at host:port answers a TLS handshake (a plain Dask scheduler sends its own
    handshake bytes instead). Unreachable: False (left to the caller's own timeout)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE   # only asking whether it is TLS at all, nothing is sent after
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw):
                return True
    except ssl.SSLError as err:
        return _tls_answer(err)
    except OSError:
        return False


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
