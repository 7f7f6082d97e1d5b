"""Running a campaign: preflight, open the pools, drive the plan through the manager, analyse.

``run_campaign`` is what `icegrid reprocess` (and `icegrid preprocess`) call; ``dry_run`` prints the
plan and every pool's worker job script and submits nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable

from icegrid.config import ConfigError
from icegrid.errors import first_line
from icegrid.grid import preflight
from icegrid.grid.manager import CampaignError, Manager
from icegrid.grid.plan import describe, plan
from icegrid.grid.profiles import profile_class
from icegrid.atomic import write_atomic
from icegrid.grid.state import snapshot, write_state
from icegrid.grid.summary import CampaignSummary

log = logging.getLogger("icegrid.grid")


def campaign_id(spec) -> str:
    """A tag for this run's batch jobs: the campaign's name (as a job name allows) and a random part."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', spec.name)[:24]}-{uuid.uuid4().hex[:8]}"


def make_profiles(spec, run_tag: str | None = None) -> list:
    run_tag = run_tag or campaign_id(spec)
    return [profile_class(pool.profile)(spec.pool_settings(i), name, spec.campaign_path / name, run_tag)
            for i, (pool, name) in enumerate(zip(spec.pool_list(), spec.pool_names()))]


def _security(spec, profile):
    """The campaign's TLS credentials (made once, in <campaign>/tls, mode 700), for a profile that wants
    them (every profile that starts its own scheduler: local, condor, slurm)."""
    if not profile.wants_tls():
        return None
    from icegrid.security import campaign_security, create_credentials

    folder = create_credentials(spec.campaign_path / "tls", valid_days=getattr(profile.settings, "tls_days", 30))
    preflight.check_credentials(folder)
    return campaign_security(folder)


def open_pools(spec, echo: Callable[[str], None] = print, profiles: list | None = None) -> list:
    """Start (or connect to) every pool of the campaign; batch pools get their worker jobs submitted."""
    campaign_dir = spec.campaign_path
    campaign_dir.mkdir(parents=True, exist_ok=True)
    pools = []
    try:
        for profile in profiles or make_profiles(spec):
            pool = profile.start(_security(spec, profile))
            pools.append(pool)
            _write_scheduler_file(pool, campaign_dir / f"scheduler-{pool.name}.json")
            echo(f"pool {pool.name} ({pool.profile}): scheduler {pool.scheduler_address}, "
                 f"dashboard {pool.dashboard_link or 'unavailable'}")
            script = pool.job_script()
            if script:
                # What every worker job is, for the user to read (and submit by hand).
                path = profile.pool_dir / profile.script_name
                path.write_text(script)
                echo(f"pool {pool.name}: worker jobs are {path} (each as submitted: {profile.pool_dir / 'jobs'}); "
                     f"job logs in {pool.log_directory}")
            if pool.cluster is not None:
                pool.scale(profile.workers_wanted())
    except BaseException:
        for pool in pools:
            pool.close()
        raise
    return pools


def _write_scheduler_file(pool, path: Path) -> None:
    """Where the scheduler is, for watchers and tests (`Client(scheduler_file=...)`): mode 600, written
    atomically (the scheduler itself also needs the campaign's credentials)."""
    from icegrid.security import write_private

    info = {"address": pool.scheduler_address, "dashboard": pool.dashboard_link, "profile": pool.profile,
            "pid": os.getpid()}
    try:
        write_private(path, json.dumps(info))
    except OSError as err:   # a full disk: the campaign runs on, only watchers lose the file
        log.warning("pool %s: cannot write %s (%s)", pool.name, path, err.strerror or first_line(err))


def _models(spec):
    """(the spec with its checkpoints keyed by canonical names, the models): names and aliases, maybe
    tagged (``2nd@retrained`` -> ``icemix@retrained``), so two checkpoints of one model can run side by side."""
    from icegrid.models.registry import expand_names

    try:
        models = expand_names(spec.models)
        checkpoints = {}
        for key, path in spec.checkpoints.items():
            names = expand_names([key])
            if len(names) != 1:
                raise ValueError(f"checkpoints: '{key}' must name one model")
            checkpoints[names[0]] = path
    except ValueError as err:
        raise ConfigError(f"campaign '{spec.name}': {err}") from None
    return spec.model_copy(update={"checkpoints": checkpoints}), models


def run_campaign(spec, progress: bool = True, echo: Callable[[str], None] = print,
                 pools: list | None = None) -> CampaignSummary:
    """preprocess -> inference for every model -> analysis. Returns the summary (also written as JSON)."""
    spec, models = _models(spec)
    preflight.check_checkpoints(spec, models)
    preflight.check_stored_predictions(spec, models)
    own_pools = pools is None
    profiles = make_profiles(spec) if own_pools else [p.profile_obj for p in pools]
    tasks = plan(spec, models)
    pending = [t for t in tasks if not t.done()]
    preflight.check_resources(pending, profiles)
    _ensure_store(spec)
    if not pending:     # a finished campaign resumed: no pool to start (seconds, or batch jobs, for nothing)
        summary = _nothing_to_run(spec, tasks)
        _finish(spec, models, summary, echo)
        return summary
    if own_pools:
        pools = open_pools(spec, echo, profiles)
    try:
        if any(not t.done() for t in tasks):
            _wait_for_any_worker(pools, spec)
        manager = Manager(pools, lost_worker_retries=spec.retries.lost_worker, error_retries=spec.retries.errors,
                          memory_retries=spec.retries.memory,
                          progress=progress, error_dir=spec.campaign_path,
                          resource_timeout_s=spec.timeout_resources_s or spec.timeout_workers_s,
                          on_change=_state_writer(spec), task_timeout_s=spec.timeout_task_s,
                          idle_timeout_s=spec.timeout_idle_s)
        summary = manager.run(tasks)
    finally:
        if own_pools:
            for pool in pools:
                pool.close()
    # Leftovers of writers killed in this run (or any earlier one). Safe whatever else runs on the store
    # (another campaign, `icegrid infer`, glidein workers we do not own): a live writer's entry is
    # leased and never removed, and removal cannot undo a publication (see icegrid.staging).
    from icegrid.store import EventStore

    EventStore(spec.store).clean_staging()
    _finish(spec, models, summary, echo)
    return summary


def _nothing_to_run(spec, tasks) -> CampaignSummary:
    """The summary and state file of a run that finds every task in the store, as the manager writes them."""
    from types import SimpleNamespace

    from icegrid.grid.summary import StageSummary

    summary = CampaignSummary()
    for task in tasks:
        stage = summary.stages.setdefault(task.stage, StageSummary())
        stage.total += 1
        stage.skipped += 1
        summary.skipped.append(task.key)
    idle = SimpleNamespace(summary=summary, pools=[], workers_seen={}, in_flight={}, started_wall=time.time())
    spec.campaign_path.mkdir(parents=True, exist_ok=True)
    write_state(spec.campaign_path, snapshot(idle, spec, running=False))
    return summary


def _state_writer(spec):
    checked = {"tls": time.monotonic()}

    def write(manager) -> None:
        try:
            write_state(spec.campaign_path, snapshot(manager, spec, running=manager.remaining > 0))
        except OSError as err:   # said once, not every two seconds; the campaign goes on
            if not checked.get("state_failed"):
                checked["state_failed"] = True
                log.warning("cannot write %s (%s); `icegrid status` will not follow this run",
                            spec.campaign_path / "state.json", err.strerror or first_line(err))
        if time.monotonic() - checked["tls"] > 3600 and (spec.campaign_path / "tls").is_dir():
            checked["tls"] = time.monotonic()   # long campaigns: say so well before the credentials expire
            preflight.check_credentials(spec.campaign_path / "tls")
    return write


def _finish(spec, models: list[str], summary: CampaignSummary, echo) -> None:
    if spec.analysis and summary.ok and not models:
        echo("analysis: skipped (no model in the campaign, nothing to score)")
    elif spec.analysis and summary.ok:
        try:
            paths = _analyse(spec, models, echo)
            summary.analysis = {label: str(path) for label, path in (paths or {}).items()}
        except Exception as err:  # the shards are safe in the store; report, rerun only the analysis
            summary.failures["analysis"] = f"{type(err).__name__}: {first_line(err) if str(err).strip() else ''}"
    write_summary(spec, summary)


def write_summary(spec, summary: CampaignSummary) -> None:
    """summary.json, atomically. A failure (a full disk) is one more entry of the summary's failures,
    so the caller still prints the summary and says in one line why the file is missing."""
    out = spec.campaign_path / "summary.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(summary.to_json(), indent=1, default=str))
    except OSError as err:
        summary.failures["summary.json"] = (f"cannot write {out} ({err.strerror or first_line(err)}); "
                                            "the summary printed is the only record")


def _wait_for_any_worker(pools: list, spec) -> None:
    """Block until some pool has a worker; fail early, with the batch system's reason, when none can.
    Every pool with a worker by then has its view of the inputs and the store checked."""
    from icegrid.grid.liveness import Liveness

    deadline = time.monotonic() + spec.timeout_workers_s
    revival = Liveness(pools, None, None)   # a local worker that failed to start is started again
    while True:
        for pool in pools:
            revival.revive(pool, time.monotonic())
        ready = [p for p in pools if p.workers()]
        if ready:
            for pool in ready:
                preflight.check_paths(pool, spec)
            return
        reasons = [p.dead_reason() for p in pools]
        if all(reasons):
            raise CampaignError("; ".join(reasons))
        if time.monotonic() > deadline:
            raise CampaignError(f"campaign '{spec.name}': no worker joined any pool within "
                                f"{spec.timeout_workers_s:.0f} s (job logs: {spec.campaign_path}/<pool>/logs)")
        time.sleep(0.5)


def _ensure_store(spec) -> None:
    """Create the store from the first input's geometry, so workers only ever add shards to it
    (GraphNeT inputs: the geometry their DOM positions match, see icegrid.graphnet)."""
    from icegrid.preprocess import find_geometry
    from icegrid.store import EventStore

    if spec.input_format == "graphnet":
        from icegrid.graphnet import create_store

        create_store(spec.store, spec.inputs, spec.pulsemap, spec.events_per_shard)
        return
    EventStore.create(spec.store, find_geometry(Path(spec.inputs[0])))


def _analyse(spec, models: list[str], echo: Callable[[str], None]):
    from icegrid.analysis import analyze_store

    out_dir = Path(spec.analysis_dir) if spec.analysis_dir else spec.campaign_path / "analysis"
    return analyze_store(spec.store, models, out_dir, echo=echo)


def dry_run(spec, echo: Callable[[str], None] = print) -> None:
    """Print the plan and each pool's worker job script; start and submit nothing."""
    spec, models = _models(spec)
    tasks = plan(spec, models)
    echo(f"campaign {spec.name}: {len(tasks)} shard tasks on {spec.store} "
         f"(models: {', '.join(models) or 'none'}; analysis {'on' if spec.analysis and models else 'off'})")
    for line in describe(tasks):
        echo(line)
    existed = spec.campaign_path.exists()
    try:
        _print_job_scripts(spec, echo)
    finally:
        if not existed:   # dask-jobqueue makes the log folder when it builds a job: leave no trace
            for folder in sorted(spec.campaign_path.glob("**/"), key=lambda p: -len(p.parts)):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


def _print_job_scripts(spec, echo) -> None:
    for profile in make_profiles(spec, "dry-run"):
        script = profile.job_script()
        if script is None:
            echo(f"pool {profile.pool_name} ({profile.name}): no job script "
                 f"({'workers join by themselves' if not profile.owns_workers else 'workers on this machine'})")
            continue
        echo(f"pool {profile.pool_name} ({profile.name}): {profile.workers_wanted()} worker jobs, each:")
        echo(script.rstrip("\n"))
