"""The grid commands of the `icegrid` CLI: reprocess, status, scheduler, worker (added to the main group
by ``icegrid.cli``). The ``--cluster`` choices are the profile modules in ``icegrid/grid/profiles``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from icegrid.grid.profiles import PROFILE_NAMES


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "warning: " if record.levelno >= logging.WARNING else ""
        return f"{self.formatTime(record, '%H:%M:%S')} icegrid: {level}{record.getMessage()}"


def grid_logging(verbosity: int = 0) -> None:
    """icegrid's own events (jobs replaced, pools lost, overridden settings) on stderr; Dask's only from
    warnings up. ``verbosity`` -1 (-q): warnings and errors only; 1 (-v): also debug lines and Dask's info."""
    icegrid_log = logging.getLogger("icegrid")
    if not any(isinstance(h.formatter, _Format) for h in icegrid_log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Format())
        icegrid_log.addHandler(handler)
    icegrid_log.propagate = False
    icegrid_log.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    dask_level = {-1: logging.ERROR, 0: logging.WARNING}.get(verbosity, logging.INFO)
    for noisy in ("distributed", "dask_jobqueue"):
        logging.getLogger(noisy).setLevel(dask_level)


def _key_value(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"'{pair}': expected NAME=VALUE", param_hint=what)
        out[key.strip()] = value.strip()
    return out


def _model_list(models: str | None) -> list[str] | None:
    """--models: None (the spec's), 'none' (preprocess only) or a comma-separated list."""
    if models is None:
        return None
    if models.strip().lower() == "none":
        return []
    return [m for m in models.split(",") if m.strip()]


def _report(summary, spec) -> None:
    """The summary on stdout; on stderr one line per failed shard, with where its traceback is and how
    many tasks it kept from running (those get no line of their own)."""
    import re

    click.echo(summary.text())
    click.echo(f"summary: {spec.campaign_path / 'summary.json'}")
    logs = sorted(set(summary.error_logs.values()))
    where = f"traceback: {logs[0]}" if len(logs) == 1 else \
        f"tracebacks: {spec.campaign_path}/<pool>/shard-errors.log" if logs else ""
    blocked: dict[str, int] = {}
    for reason in summary.failures.values():
        cause = re.fullmatch(r"not run: (.+) failed", reason)
        if cause:
            blocked[cause.group(1)] = blocked.get(cause.group(1), 0) + 1
    for key, reason in sorted(summary.failures.items()):
        if reason.startswith("not run: ") and reason.endswith(" failed"):
            continue
        notes = [where] if where and key not in ("analysis", "summary.json") else []
        if key in blocked:
            notes.append(f"{blocked[key]} dependent task(s) not run")
        click.echo(f"icegrid: error: {key}: {reason}" + (f" ({'; '.join(notes)})" if notes else ""), err=True)


@click.command()
@click.argument("spec_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--input", "inputs", multiple=True, type=click.Path(path_type=Path),
              help="Simulation set / Kaggle root or split folder (repeatable). Overrides the spec's inputs.")
@click.option("--store", type=click.Path(path_type=Path), help="Event store (.zarr) to fill.")
@click.option("--format", "input_format", type=click.Choice(["kaggle", "graphnet"]),
              help="Input layout (default kaggle); graphnet: GraphNeT SQLite/parquet, with --pulsemap.")
@click.option("--pulsemap", help="graphnet: the pulse-map table to read.")
@click.option("--models", help="Comma-separated model names, 'all', or 'none' (preprocess only).")
@click.option("--checkpoint", "checkpoints", multiple=True, metavar="MODEL=FILE", help="Checkpoint for a model.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Where inference runs.")
@click.option("--cluster", type=click.Choice(PROFILE_NAMES), help="Cluster profile (defaults in icegrid/config/clusters.yaml).")
@click.option("--jobs", type=click.IntRange(min=1), help="condor/slurm: worker jobs; local: worker processes.")
@click.option("--scheduler-file", type=click.Path(path_type=Path), help="glidein: the scheduler to drive.")
@click.option("--tls-dir", type=click.Path(path_type=Path), help="glidein: the campaign's TLS credentials.")
@click.option("--campaign-dir", type=click.Path(path_type=Path), help="Logs, TLS, summary (default <store>.campaign).")
@click.option("--set", "settings", multiple=True, metavar="KEY=YAML",
              help="Override a cluster setting, e.g. --set memory=2GiB --set 'resources={GPU: 1}'.")
@click.option("--analysis/--no-analysis", default=None, help="Run the analysis at the end (default: on).")
@click.option("--progress/--no-progress", default=True, help="Progress bars (a terminal) or lines (a log file) on stderr.")
@click.option("--dry-run", is_flag=True, help="Print the plan and each pool's worker job script; submit nothing.")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (Dask's own info lines too).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr (no progress, no pool lines).")
def reprocess(spec_file, inputs, store, input_format, pulsemap, models, checkpoints, device, cluster, jobs, scheduler_file, tls_dir,
              campaign_dir, settings, analysis, progress, dry_run, verbose, quiet):
    """Run a campaign: preprocess -> inference for every model -> analysis, on any cluster (resumable)."""
    import signal

    from icegrid.grid.campaign import dry_run as print_plan, run_campaign
    from icegrid.grid.manager import CampaignError
    from icegrid.grid.spec import load_spec, spec_from_flags

    overrides = {"inputs": [str(p) for p in inputs] or None, "store": store, "device": device,
                 "input_format": input_format, "pulsemap": pulsemap,
                 "campaign_dir": campaign_dir, "analysis": analysis, "models": _model_list(models),
                 "checkpoints": _key_value(checkpoints, "--checkpoint") or None}
    pool = {"profile": cluster, "scheduler_file": scheduler_file, "tls_dir": tls_dir,
            "jobs": jobs, **_key_value(settings, "--set")}
    spec = load_spec(spec_file, overrides, pool) if spec_file else spec_from_flags(overrides, pool)
    grid_logging(-1 if quiet else verbose)
    if dry_run:
        print_plan(spec, echo=click.echo)
        return
    # SIGTERM (timeout, condor_rm of a manager job, scancel) unwinds like Ctrl-C: the campaign's worker
    # jobs are removed from the queue instead of being left to time out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    echo = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    try:
        summary = run_campaign(spec, progress=progress and not quiet, echo=echo)
    except CampaignError as err:
        click.echo(f"icegrid: error: {err}", err=True)
        sys.exit(2)
    _report(summary, spec)
    if not summary.ok:
        sys.exit(1)


@click.command()
@click.argument("store_path", type=click.Path(path_type=Path))
def status(store_path):
    """Show a running or finished campaign: shards per stage and model, workers per pool, failures."""
    from icegrid.grid.state import read_state, render

    folder, state = read_state(store_path)
    for line in render(folder, state):
        click.echo(line)


@click.command()
@click.option("--scheduler-file", type=click.Path(path_type=Path), required=True,
              help="Where to write the scheduler's address (mode 600; workers and campaigns read it).")
@click.option("--tls-dir", type=click.Path(path_type=Path),
              help="Campaign TLS credentials (created if missing): workers and clients without them are refused.")
@click.option("--tls-days", type=click.IntRange(min=1), default=30, show_default=True,
              help="Lifetime of credentials created now, in days (a warning comes a week before expiry).")
@click.option("--insecure", is_flag=True,
              help="No TLS: anyone who reaches the port can run code as you, so it listens on 127.0.0.1 only.")
@click.option("--host", default=None, help="Interface address to listen on (default: all; with --insecure 127.0.0.1).")
@click.option("--port", type=int, default=0, show_default=True, help="0: any free port.")
@click.option("--dashboard-address", default="127.0.0.1:8787", show_default=True,
              help="A host-less address (:8787) binds 127.0.0.1; another host gets https with the --tls-dir credentials.")
def scheduler(scheduler_file, tls_dir, tls_days, insecure, host, port, dashboard_address):
    """Start a Dask scheduler that late-joining workers (`icegrid worker`) and campaigns connect to."""
    import signal

    from icegrid.grid.worker import serve_scheduler, unauthenticated_host

    # SIGTERM (kill, condor_rm, scancel) ends it like Ctrl-C: the scheduler file is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    if tls_dir is None:
        host = unauthenticated_host(host, insecure)
        echo(f"icegrid: warning: --insecure: no TLS, so any process on this machine can run code as "
             f"{_user()}; listening on {host} only")
    serve_scheduler(scheduler_file, tls_dir, host, port, dashboard_address, echo=echo, tls_days=tls_days)


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "this user"


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--scheduler-file", type=click.Path(path_type=Path), help="Written by `icegrid scheduler`.")
@click.option("--scheduler", "address", help="Scheduler address instead of a file, e.g. tls://host:8786.")
@click.option("--tls-dir", type=click.Path(path_type=Path), help="The campaign's TLS credentials.")
@click.option("--nthreads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--nworkers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes in this slot (each with --nthreads).")
@click.option("--memory-limit", default="auto", show_default=True)
@click.option("--resources", default="", help="Advertised resources, e.g. 'GPU=1'.")
@click.option("--lifetime", help="Leave gracefully after this long (under the slot's walltime), e.g. 50m.")
@click.option("--lifetime-stagger", help="Random spread on --lifetime, e.g. 5m.")
@click.option("--death-timeout", default="120s", show_default=True, help="Give up without a scheduler after this.")
@click.option("--name", help="Worker name (default: chosen by the scheduler).")
@click.option("--nanny/--no-nanny", default=True, show_default=True, help="Restart the worker if it crashes.")
@click.option("--contact-address", help="Address the scheduler reaches this worker at (behind NAT: the "
                                        "forwarded public one), e.g. tcp://203.0.113.5:40000.")
@click.option("--listen-address", help="Address to listen on locally, e.g. tcp://0.0.0.0:40000.")
@click.option("--interface", help="Network interface to listen on, e.g. eth0 or ib0.")
@click.option("--local-directory", help="Worker scratch [default: $_CONDOR_SCRATCH_DIR in an HTCondor slot].")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def worker(scheduler_file, address, tls_dir, nthreads, nworkers, memory_limit, resources, lifetime, lifetime_stagger,
           death_timeout, name, nanny, contact_address, listen_address, interface, local_directory, extra):
    """Join a running scheduler as a Dask worker, from any batch system (glidein mode).

    Any other option (e.g. --preload MODULE) is passed on to `dask worker` as it is."""
    from icegrid.grid.worker import exec_worker

    if bool(scheduler_file) == bool(address):
        raise click.UsageError("give exactly one of --scheduler-file and --scheduler")
    exec_worker(scheduler_file=scheduler_file, address=address, tls_dir=tls_dir, nthreads=nthreads,
                memory_limit=memory_limit, resources=resources, lifetime=lifetime, nworkers=nworkers,
                lifetime_stagger=lifetime_stagger, death_timeout=death_timeout, name=name, nanny=nanny,
                contact_address=contact_address, listen_address=listen_address, interface=interface,
                local_directory=local_directory, extra=tuple(extra))


COMMANDS = (reprocess, status, scheduler, worker)
