"""The campaign manager: shards × models over one or more Dask pools, resumable and fault-tolerant.

A campaign is ``preprocess`` (one input batch -> one store shard) followed by ``infer`` for every model
(one shard × one model -> predictions), then the analysis. Each unit is a pure, deterministic shard
function that publishes atomically into the event store, so:

* the **store is the completion record**: before submitting, the manager asks the store what is done
  and skips it; killing the manager (or the scheduler, or any worker) and rerunning the same command
  redoes no completed shard;
* a shard whose worker **vanished** (preempted glidein, ``condor_rm``, SIGKILL, walltime) is normal, not
  a failure: distributed reschedules it, and when distributed gives up (``KilledWorker`` after its
  ``allowed-failures``) the manager resubmits it under a new key, up to ``retries.lost_worker`` times,
  so preemptions never turn into failures;
* a shard whose function **raised** is retried ``retries.errors`` times elsewhere, then reported with
  its reason; the shards depending on it are reported as blocked. Bad input (``InputError``: a
  malformed batch file, a wrong checkpoint) is reported at once, since a retry would only repeat it.

It can drive several pools at once (one scheduler per site or pool — the multi-collector lesson of
IceCube's cloudburst): every pool pulls from the same ready list, each keeping just enough tasks in
flight to feed its workers, so a fast pool takes more shards and a dead one takes none.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from icegrid.config import ConfigError, read_yaml
from icegrid.errors import first_line

log = logging.getLogger(__name__)

ATTEMPT_TOPIC = "icegrid-attempt"


class CampaignError(RuntimeError):
    """A campaign that cannot go on (no worker can join, every pool lost); one line, naming the pool."""
PREPROCESS = "preprocess"


# ---------------------------------------------------------------------------------------------- tasks
@dataclass
class ShardTask:
    """One unit of work: ``func(*args)`` on a worker, for one shard of one stage."""

    key: str                      # stable across runs: "<stage>/<shard>"
    stage: str                    # "preprocess" or a model name
    shard: str
    func: str                     # "module:function", imported on the worker
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    events: int = 0               # for the progress bars' events/s
    resources: dict[str, float] = field(default_factory=dict)
    after: str | None = None      # key of the task that must finish first
    done: Callable[[], bool] | None = None  # asks storage; True: skip


def run_shard_task(func: str, args: tuple, kwargs: dict, hold_seconds: float = 0.0) -> dict:
    """Executed on a worker: announce the attempt, run the shard function, time it."""
    import importlib

    from distributed import get_worker

    worker = get_worker()
    key = worker.get_current_task()
    worker.log_event(ATTEMPT_TOPIC, {"key": str(key), "worker": worker.address, "pid": os.getpid()})
    module_name, _, name = func.partition(":")
    function = getattr(importlib.import_module(module_name), name)
    if hold_seconds:
        # Testing aid (spec: hold_seconds): a window in which fault tests can kill a busy worker.
        time.sleep(hold_seconds)
    start = time.perf_counter()
    result = function(*args, **kwargs)
    elapsed = time.perf_counter() - start
    out = dict(result) if isinstance(result, dict) else {"result": result}
    out["_compute_s"] = elapsed
    out["_worker"] = worker.address
    return out


# ---------------------------------------------------------------------------------------------- results
@dataclass
class StageSummary:
    total: int = 0
    skipped: int = 0          # already in the store when the campaign started
    done: int = 0             # completed by this run
    failed: int = 0
    events: int = 0           # events processed by this run
    compute_s: float = 0.0    # time inside shard functions, summed over workers


@dataclass
class CampaignSummary:
    stages: dict[str, StageSummary] = field(default_factory=dict)
    retried_lost: int = 0                 # resubmitted by the manager after KilledWorker / a lost pool
    retried_errors: int = 0               # resubmitted after the shard function raised
    restarts: int = 0                     # attempts beyond the first, seen on workers (incl. distributed's own)
    failures: dict[str, str] = field(default_factory=dict)   # task key -> reason
    ran: list[str] = field(default_factory=list)             # task keys completed by this run
    skipped: list[str] = field(default_factory=list)         # task keys found done in the store
    per_pool: dict[str, int] = field(default_factory=dict)   # tasks completed per pool
    placements: dict[str, str] = field(default_factory=dict) # task key -> worker that completed it
    wall_s: float = 0.0
    dashboards: dict[str, str | None] = field(default_factory=dict)
    analysis: Any = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def text(self) -> str:
        lines = [f"campaign finished in {self.wall_s:.1f} s: "
                 + ("all shards done" if self.ok else f"{len(self.failures)} failed")]
        for stage, s in self.stages.items():
            rate = f", {s.events / s.compute_s:,.0f} events/s per worker" if s.compute_s > 0 and s.events else ""
            lines.append(f"  {stage:<22} {s.done:>5} done, {s.skipped:>5} already in store, "
                         f"{s.failed:>3} failed  ({s.events:,} events{rate})")
        lines.append(f"  retried: {self.retried_lost} after lost workers, {self.retried_errors} after errors; "
                     f"{self.restarts} restarts seen on workers")
        if len(self.per_pool) > 1:
            lines.append("  per pool: " + ", ".join(f"{k} {v}" for k, v in self.per_pool.items()))
        if isinstance(self.analysis, dict) and self.analysis:
            lines.append(f"  analysis: {Path(next(iter(self.analysis.values()))).parent}")
        for key, reason in sorted(self.failures.items()):
            lines.append(f"  FAILED {key}: {reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- manager
class _Progress:
    """Per-stage progress in events: tqdm bars on a terminal; on a log file (a manager running as a
    batch job) one plain line per stage every ``ICEGRID_PROGRESS_INTERVAL`` seconds (default 60) and
    when a stage ends, because bars written to a file are carriage returns and cursor codes.

    Rates count from a stage's first submitted shard, not from the campaign's start, so a stage that
    queued behind another reports the rate it runs at."""

    def __init__(self, stages: dict[str, StageSummary], totals: dict[str, int], enabled: bool,
                 stream=None):
        self.bars = {}
        self.stages, self.totals = stages, totals
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.started_at: dict[str, float] = {}
        self.events: Counter = Counter()
        self.interval = float(os.environ.get("ICEGRID_PROGRESS_INTERVAL", 60))
        self.last_line = time.monotonic()
        self.as_bars = enabled and getattr(self.stream, "isatty", lambda: False)()
        if not self.as_bars:
            return
        from tqdm import tqdm

        width = max(len(s) for s in stages) if stages else 10
        for position, (stage, summary) in enumerate(stages.items()):
            self.bars[stage] = tqdm(total=totals[stage], desc=f"{stage:<{width}}", unit="events", unit_scale=True,
                                    position=position, leave=True, dynamic_ncols=True, file=self.stream,
                                    postfix={"shards": f"{summary.skipped}/{summary.total}"})

    def started(self, stage: str) -> None:
        if stage not in self.started_at:
            self.started_at[stage] = time.monotonic()
            bar = self.bars.get(stage)
            if bar is not None:
                bar.reset(total=bar.total)      # restarts tqdm's clock: the rate is this stage's own

    def rate(self, stage: str) -> float:
        elapsed = time.monotonic() - self.started_at.get(stage, time.monotonic())
        return self.events[stage] / elapsed if elapsed > 0 else 0.0

    def update(self, stage: str, events: int, summary: StageSummary, retried: int) -> None:
        self.events[stage] += events
        bar = self.bars.get(stage)
        if bar is not None:
            bar.set_postfix(shards=f"{summary.skipped + summary.done}/{summary.total}", retried=retried,
                            refresh=False)
            bar.update(events)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        stage_over = summary.skipped + summary.done + summary.failed >= summary.total
        if stage_over or now - self.last_line >= self.interval:
            self.last_line = now
            print(f"progress: {stage} {summary.skipped + summary.done}/{summary.total} shards, "
                  f"{self.events[stage]:,} events, {self.rate(stage):,.0f} events/s", file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class Manager:
    """Drives shard tasks through one or more pools until every task is done or failed."""

    def __init__(self, pools: list, *, lost_worker_retries: int = 10, error_retries: int = 1,
                 hold_seconds: float = 0.0, progress: bool = True, in_flight_per_thread: int = 2):
        if not pools:
            raise ValueError("a campaign needs at least one pool")
        self.pools = pools
        self.lost_worker_retries = lost_worker_retries
        self.error_retries = error_retries
        self.hold_seconds = hold_seconds
        self.progress = progress
        self.in_flight_per_thread = in_flight_per_thread
        self.run_id = uuid.uuid4().hex[:8]
        self._events: queue.Queue = queue.Queue()
        self._attempts: Counter = Counter()
        self._attempt_lock = threading.Lock()

    # -- attempts seen on workers (also the ones distributed retried by itself)
    def _on_attempt(self, event) -> None:
        _, msg = event
        task_key = str(msg.get("key", "")).split("|")[0]
        with self._attempt_lock:
            self._attempts[task_key] += 1

    def run(self, tasks: list[ShardTask]) -> CampaignSummary:
        started = time.perf_counter()
        summary = CampaignSummary()
        by_key = {t.key: t for t in tasks}
        if len(by_key) != len(tasks):
            raise ValueError("duplicate task keys in a campaign")
        stages: dict[str, StageSummary] = {}
        totals: Counter = Counter()
        done_keys: set[str] = set()
        for task in tasks:
            stage = stages.setdefault(task.stage, StageSummary())
            stage.total += 1
            if task.done is not None and task.done():
                stage.skipped += 1
                done_keys.add(task.key)
                summary.skipped.append(task.key)
            else:
                totals[task.stage] += task.events
        summary.stages = stages
        for pool in self.pools:
            summary.dashboards[pool.name] = pool.dashboard_link
            pool.client.subscribe_topic(ATTEMPT_TOPIC, self._on_attempt)
            summary.per_pool.setdefault(pool.name, 0)

        todo = [t for t in tasks if t.key not in done_keys]
        waiting: dict[str, list[ShardTask]] = {}
        ready: deque[ShardTask] = deque()
        for task in todo:
            if task.after and task.after not in done_keys:
                if task.after not in by_key:
                    raise ValueError(f"task {task.key} waits for unknown task {task.after}")
                waiting.setdefault(task.after, []).append(task)
            else:
                ready.append(task)
        lost: Counter = Counter()
        errors: Counter = Counter()
        in_flight: dict[str, tuple[ShardTask, Any, Any]] = {}  # dask key -> (task, pool, future)
        capacity = {pool.name: 0 for pool in self.pools}
        offered: dict[str, set[str] | None] = {pool.name: None for pool in self.pools}
        capacity_checked = 0.0
        progress = _Progress(stages, totals, self.progress)
        remaining = len(todo)

        def requeue_lost(task: ShardTask, why: str) -> None:
            """The task's worker or pool vanished: normal on opportunistic resources, up to a limit."""
            lost[task.key] += 1
            if lost[task.key] > self.lost_worker_retries:
                fail(task, f"lost {lost[task.key]} workers while running it (last: {why:.200})")
            else:
                summary.retried_lost += 1
                ready.appendleft(task)

        def fail(task: ShardTask, reason: str) -> None:
            nonlocal remaining
            summary.failures[task.key] = reason
            stages[task.stage].failed += 1
            remaining -= 1
            for dependent in waiting.pop(task.key, []):
                fail(dependent, f"not run: {task.key} failed")

        try:
            while remaining > 0:
                now = time.monotonic()
                if now - capacity_checked > 1.0:
                    for pool in self.pools:
                        capacity[pool.name], offered[pool.name] = self._capacity(pool)
                    capacity_checked = now
                    reasons = [getattr(pool, "dead_reason", lambda: None)() for pool in self.pools]
                    if all(reasons):
                        raise CampaignError("; ".join(reasons))
                    # A pool that lost its scheduler: what it held goes back to the shared list now,
                    # not when its client gives up reconnecting.
                    for dask_key, (task, pool, future) in list(in_flight.items()):
                        if pool.client.status != "running":
                            del in_flight[dask_key]
                            requeue_lost(task, f"pool {pool.name} lost its scheduler")
                # Fill each pool up to its capacity, in turn, from the shared ready list, with the
                # tasks its workers can run (a GPU task never waits in a pool that has no GPU).
                for pool in self.pools:
                    mine = sum(1 for _, p, _ in in_flight.values() if p is pool)
                    passed_over: list[ShardTask] = []
                    while ready and mine < capacity[pool.name] and pool.client.status == "running" \
                            and len(passed_over) < 1000:
                        task = ready.popleft()
                        if offered[pool.name] is not None and not set(task.resources) <= offered[pool.name]:
                            passed_over.append(task)
                            continue
                        self._submit(task, pool, in_flight, lost[task.key] + errors[task.key])
                        progress.started(task.stage)
                        mine += 1
                    ready.extendleft(reversed(passed_over))
                try:
                    dask_key = self._events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if dask_key not in in_flight:
                    continue
                task, pool, future = in_flight.pop(dask_key)
                status = future.status
                if status == "finished":
                    result = future.result()
                    future.release()
                    remaining -= 1
                    stage = stages[task.stage]
                    stage.done += 1
                    stage.events += task.events
                    stage.compute_s += float(result.get("_compute_s", 0.0))
                    summary.ran.append(task.key)
                    summary.placements[task.key] = str(result.get("_worker", ""))
                    summary.per_pool[pool.name] += 1
                    done_keys.add(task.key)
                    # Dependents first: a shard's inference starts as soon as the shard exists, so
                    # GPU workers are fed while CPU workers are still preprocessing.
                    ready.extendleft(reversed(waiting.pop(task.key, [])))
                    progress.update(task.stage, task.events, stage, summary.retried_lost + summary.retried_errors)
                    continue
                exc = _future_exception(future)
                future.release()
                if _is_lost_worker(status, exc):
                    requeue_lost(task, repr(exc))
                else:
                    errors[task.key] += 1
                    if errors[task.key] > self.error_retries or _is_bad_input(exc):
                        fail(task, f"{type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}"[:500])
                    else:
                        summary.retried_errors += 1
                        ready.appendleft(task)
        finally:
            progress.close()
            for _, _, future in in_flight.values():
                future.cancel()
            for pool in self.pools:
                try:
                    pool.client.unsubscribe_topic(ATTEMPT_TOPIC)
                except Exception:  # the pool may be gone already
                    pass
        with self._attempt_lock:
            summary.restarts = sum(max(0, n - 1) for n in self._attempts.values())
        summary.wall_s = time.perf_counter() - started
        return summary

    def _capacity(self, pool) -> tuple[int, set[str] | None]:
        """(tasks to keep in flight on a pool, resources its workers offer).

        A few tasks per worker thread, so workers never wait for the manager, while the rest stay in
        the shared list for whichever pool frees up first. With one pool every task goes there and
        waits for a fitting worker (glideins arrive late): offered resources are then None (any)."""
        if pool.client.status != "running":
            return 0, set()  # reconnecting to a lost scheduler, or given up on it: submit nothing there
        try:
            workers = pool.client.scheduler_info(n_workers=-1)["workers"]
        except Exception:  # scheduler unreachable for now: submit nothing there
            return 0, set()
        threads = sum(w.get("nthreads", 1) for w in workers.values())
        if len(self.pools) == 1:
            return max(1, self.in_flight_per_thread * threads), None
        offered = {name for w in workers.values() for name, amount in (w.get("resources") or {}).items() if amount}
        return self.in_flight_per_thread * threads, offered

    def _submit(self, task: ShardTask, pool, in_flight: dict, attempt: int) -> None:
        dask_key = f"{task.key}|{self.run_id}|{attempt}"
        future = pool.client.submit(run_shard_task, task.func, task.args, task.kwargs, self.hold_seconds,
                                    key=dask_key, resources=task.resources or None, pure=False, retries=0)
        in_flight[dask_key] = (task, pool, future)
        future.add_done_callback(lambda f, k=dask_key: self._events.put(k))


def _future_exception(future):
    try:
        return future.exception(timeout=10)
    except Exception as err:  # cancelled futures raise instead of returning their exception
        return err


def _is_bad_input(exc) -> bool:
    """The shard's input (a batch file, a checkpoint) is wrong: rerunning elsewhere gives the same error."""
    from icegrid.kaggle import InputError

    return isinstance(exc, InputError)


def _is_lost_worker(status: str, exc) -> bool:
    """A worker (or the whole pool) vanished under the task, as opposed to the shard function failing."""
    from distributed.scheduler import KilledWorker

    if status == "cancelled" or isinstance(exc, KilledWorker):
        return True
    name = type(exc).__name__
    return name in ("CancelledError", "CommClosedError", "FutureCancelledError")


# ---------------------------------------------------------------------------------------------- spec
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Retries(_Strict):
    lost_worker: int = Field(10, ge=0, description="resubmissions of a shard whose worker vanished")
    errors: int = Field(1, ge=0, description="retries elsewhere of a shard whose function raised")


class StageResources(_Strict):
    preprocess: dict[str, float] = Field(default_factory=dict)
    inference: dict[str, float] | None = Field(None, description="null: {GPU: 1} when device is cuda")


class PoolSpec(BaseModel):
    """One pool: a cluster profile name plus overrides of config/clusters.yaml for it."""

    model_config = ConfigDict(extra="allow")
    profile: Literal["local", "condor", "slurm", "glidein"] = "local"
    name: str | None = None

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CampaignSpec(_Strict):
    """A campaign file in workflows/ (YAML), or the same built from flags."""

    name: str = "campaign"
    inputs: list[str] = Field(..., min_length=1, description="simulation sets / Kaggle roots or split folders")
    store: str
    models: list[str] = Field(default_factory=lambda: ["linefit"], description="model names, or ['all']")
    checkpoints: dict[str, str] = Field(default_factory=dict, description="model -> checkpoint file")
    device: Literal["cpu", "cuda"] = "cpu"
    cluster: PoolSpec | None = None
    pools: list[PoolSpec] = Field(default_factory=list, description="several pools draining one list")
    resources: StageResources = Field(default_factory=StageResources)
    retries: Retries = Field(default_factory=Retries)
    analysis: bool = True
    analysis_dir: str | None = Field(None, description="null: <campaign_dir>/analysis")
    campaign_dir: str | None = Field(None, description="TLS credentials, logs, summary; null: <store>.campaign")
    hold_seconds: float = Field(0.0, ge=0, description="testing: each shard task waits this long first")
    timeout_workers_s: float = Field(600, gt=0, description="give up if no worker joins within this")

    @model_validator(mode="after")
    def _one_pool_list(self):
        if self.cluster is not None and self.pools:
            raise ValueError("give either 'cluster' or 'pools', not both")
        if self.cluster is None and not self.pools:
            self.cluster = PoolSpec()
        return self

    def pool_list(self) -> list[PoolSpec]:
        return list(self.pools) if self.pools else [self.cluster]

    def resolve(self, base: Path) -> "CampaignSpec":
        """Relative paths in a spec file are relative to the file's folder."""
        def fix(p: str | None) -> str | None:
            return None if p is None else str((base / Path(p).expanduser()).resolve())
        return self.model_copy(update={
            "inputs": [fix(p) for p in self.inputs], "store": fix(self.store),
            "checkpoints": {m: fix(p) for m, p in self.checkpoints.items()},
            "analysis_dir": fix(self.analysis_dir), "campaign_dir": fix(self.campaign_dir)})

    @property
    def campaign_path(self) -> Path:
        return Path(self.campaign_dir) if self.campaign_dir else Path(f"{self.store}.campaign")


def _clean(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Flags not given (None) are dropped; paths become strings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in (overrides or {}).items() if v is not None}


def _with_pool(data: dict[str, Any], pool: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """Apply cluster flags (``--cluster``, ``--jobs``, ``--set k=v``) to the spec's single pool."""
    import yaml

    pool = _clean(pool)
    pool = {k: (yaml.safe_load(v) if isinstance(v, str) and k not in ("profile", "scheduler_file", "tls_dir",
                                                                      "scheduler") else v)
            for k, v in pool.items()}
    if not pool:
        return data
    if data.get("pools"):
        raise ConfigError(f"{where}: the campaign lists several pools; edit them in the file, not with flags")
    current = dict(data.get("cluster") or {})
    if "profile" in pool and pool["profile"] != current.get("profile", "local"):
        current = {}  # another profile: the file's settings were for the old one
    # --jobs means worker processes on a local pool and worker jobs on a batch system; which one is
    # known only here, once the profile (from the flag or from the file) is.
    if "jobs" in pool and pool.get("profile", current.get("profile", "local")) == "local":
        pool["workers"] = pool.pop("jobs")
    current.update(pool)
    return {**data, "cluster": current}


def _validate(data: dict[str, Any], where: str) -> CampaignSpec:
    from pydantic import ValidationError

    from icegrid.clusters import load_profile

    try:
        spec = CampaignSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "campaign"
        raise ConfigError(f"{where}: {loc}: {first['msg']}") from None
    for pool in spec.pool_list():
        try:
            settings = load_profile(pool.profile, pool.overrides())
            if pool.profile == "glidein" and not (settings.scheduler_file or settings.scheduler):
                raise ConfigError("glidein needs scheduler_file (--scheduler-file) or scheduler")
        except ConfigError as err:
            # Name the campaign file first; the profile defaults it was merged with come second.
            raise ConfigError(f"{where}: cluster '{pool.name or pool.profile}': {err}") from None
    return spec


def load_spec(path: Path | str, overrides: dict[str, Any] | None = None,
              pool: dict[str, Any] | None = None) -> CampaignSpec:
    """Read and validate a campaign file, with flags applied on top.

    Relative paths in the file are relative to the current directory (campaigns are started from
    the project folder, like every other icegrid command)."""
    from icegrid.config import deep_merge

    path = Path(path)
    data = _with_pool(deep_merge(read_yaml(path), _clean(overrides)), pool, str(path))
    return _validate(data, str(path)).resolve(Path.cwd())


def spec_from_flags(overrides: dict[str, Any], pool: dict[str, Any] | None = None) -> CampaignSpec:
    """The campaign a plain `icegrid reprocess --input ... --store ...` describes."""
    data = _with_pool(_clean(overrides), pool, "reprocess flags")
    if not data.get("inputs") or not data.get("store"):
        raise ConfigError("reprocess: give a campaign file, or --input and --store")
    return _validate(data, "reprocess flags").resolve(Path.cwd())


# ---------------------------------------------------------------------------------------------- planning
def list_inputs(inputs: list[str]) -> list[Path]:
    """Every batch file of every input (a root with splits, or a split folder), in a stable order."""
    from icegrid.preprocess import discover_batches

    return [batch for entry in inputs for batch in discover_batches(Path(entry))]


def batch_event_counts(batches: list[Path]) -> dict[Path, int]:
    """Events per batch from the split's meta file (one column read per split)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from icegrid.kaggle import batch_id_of, meta_path_for

    counts: dict[Path, int] = {}
    by_meta: dict[Path, list[Path]] = {}
    for batch in batches:
        by_meta.setdefault(meta_path_for(batch), []).append(batch)
    for meta, members in by_meta.items():
        try:
            ids = pq.read_table(meta, columns=["batch_id"]).column("batch_id")
            values, freq = pc.value_counts(ids).flatten()
            per_batch = dict(zip(values.to_pylist(), freq.to_pylist()))
        except Exception:  # unreadable meta: the preprocess task reports it properly
            per_batch = {}
        for batch in members:
            counts[batch] = int(per_batch.get(batch_id_of(batch), 0))
    return counts


def plan(spec: CampaignSpec, models: list[str]) -> list[ShardTask]:
    """preprocess every input batch, then infer every model on every shard (the store must exist)."""
    from icegrid.preprocess import shard_name_for
    from icegrid.store import EventStore

    batches = list_inputs(spec.inputs)
    names = [shard_name_for(b) for b in batches]
    duplicates = [n for n, c in Counter(names).items() if c > 1]
    if duplicates:
        raise ConfigError(f"{spec.store}: inputs give two batches the same shard name ({duplicates[0]}); "
                          "list each simulation set once")
    counts = batch_event_counts(batches)
    store_path = str(spec.store)
    infer_resources = spec.resources.inference
    if infer_resources is None:
        infer_resources = {"GPU": 1.0} if spec.device == "cuda" else {}

    # One handle for every check: each is then a stat() of the published marker, cheap for 10^5 tasks.
    store = EventStore(store_path)

    def has_shard(name):
        return lambda: store.has_shard(name)

    def has_predictions(name, model):
        return lambda: store.has_predictions(name, model)

    tasks = []
    for batch, name in zip(batches, names):
        pre_key = f"{PREPROCESS}/{name}"
        tasks.append(ShardTask(key=pre_key, stage=PREPROCESS, shard=name, func="icegrid.preprocess:preprocess_shard",
                               args=(str(batch), store_path), events=counts[batch],
                               resources=dict(spec.resources.preprocess), done=has_shard(name)))
        for model in models:
            tasks.append(ShardTask(
                key=f"{model}/{name}", stage=model, shard=name, func="icegrid.inference:infer_shard",
                args=(store_path, name, model),
                kwargs={"checkpoint": spec.checkpoints.get(model), "device": spec.device},
                events=counts[batch], resources=dict(infer_resources), after=pre_key,
                done=has_predictions(name, model)))
    return tasks


# ---------------------------------------------------------------------------------------------- running
def open_pools(spec: CampaignSpec, echo: Callable[[str], None] = print) -> list:
    """Start (or connect to) every pool of the campaign, with TLS where the profile asks for it."""
    from icegrid.clusters import load_profile, open_pool

    campaign_dir = spec.campaign_path
    campaign_dir.mkdir(parents=True, exist_ok=True)
    pools = []
    try:
        for index, pool_spec in enumerate(spec.pool_list()):
            name = pool_spec.name or (pool_spec.profile if len(spec.pool_list()) == 1
                                      else f"{pool_spec.profile}{index}")
            settings = load_profile(pool_spec.profile, pool_spec.overrides())
            security = None
            if getattr(settings, "tls", False):
                from icegrid.security import campaign_security, create_credentials

                security = campaign_security(create_credentials(campaign_dir / "tls"))
            pool = open_pool(pool_spec.profile, settings, campaign_dir / name, name=name, security=security)
            pools.append(pool)
            _write_scheduler_file(pool, campaign_dir / f"scheduler-{name}.json")
            echo(f"pool {name} ({pool.profile}): scheduler {pool.scheduler_address}, "
                 f"dashboard {pool.dashboard_link or 'unavailable'}")
            script = pool.job_script()
            if script:
                # What every worker job is, for the user to read (and `condor_submit`/`sbatch` by hand).
                path = campaign_dir / name / ("worker-job.sub" if pool.profile == "condor" else "worker-job.sh")
                path.write_text(script)
                echo(f"pool {name}: worker jobs are {path}; job logs in {pool.log_directory}")
            if pool.cluster is not None:
                jobs = getattr(settings, "jobs", None) or getattr(settings, "workers", None) or os.cpu_count() or 1
                pool.scale(jobs)
    except BaseException:
        for pool in pools:
            pool.close()
        raise
    return pools


def _write_scheduler_file(pool, path: Path) -> None:
    """Where the scheduler is, for watchers and tests (`Client(scheduler_file=...)`)."""
    info = {"address": pool.scheduler_address, "dashboard": pool.dashboard_link, "profile": pool.profile,
            "pid": os.getpid()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def run_campaign(spec: CampaignSpec, progress: bool = True, echo: Callable[[str], None] = print,
                 pools: list | None = None) -> CampaignSummary:
    """preprocess -> inference for every model -> analysis. Returns the summary (also written as JSON)."""
    from icegrid.models.registry import expand

    try:
        models = expand(spec.models)
    except ValueError as err:
        raise ConfigError(f"campaign '{spec.name}': {err}") from None
    _ensure_store(spec)
    tasks = plan(spec, models)
    own_pools = pools is None
    if own_pools:
        pools = open_pools(spec, echo)
    try:
        if any(not t.done() for t in tasks):
            _wait_for_any_worker(pools, spec)
        manager = Manager(pools, lost_worker_retries=spec.retries.lost_worker, error_retries=spec.retries.errors,
                          hold_seconds=spec.hold_seconds, progress=progress)
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
    if spec.analysis and summary.ok and not models:
        echo("analysis: skipped (no model in the campaign, nothing to score)")
    elif spec.analysis and summary.ok:
        try:
            paths = _analyse(spec, models, echo)
            summary.analysis = {label: str(path) for label, path in (paths or {}).items()}
        except Exception as err:  # the shards are safe in the store; report, rerun only the analysis
            summary.failures["analysis"] = f"{type(err).__name__}: {first_line(err) if str(err).strip() else ''}"
    out = spec.campaign_path / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary.to_json(), indent=1, default=str))
    return summary


def _wait_for_any_worker(pools: list, spec: CampaignSpec) -> None:
    """Block until some pool has a worker; fail early, with the batch system's reason, when none can."""
    deadline = time.monotonic() + spec.timeout_workers_s
    while True:
        if any(p.client.scheduler_info(n_workers=-1)["workers"] for p in pools):
            return
        reasons = [p.dead_reason() for p in pools]
        if all(reasons):
            raise CampaignError("; ".join(reasons))
        if time.monotonic() > deadline:
            raise CampaignError(f"campaign '{spec.name}': no worker joined any pool within "
                               f"{spec.timeout_workers_s:.0f} s (job logs: {spec.campaign_path}/<pool>/logs)")
        time.sleep(1.0)


def _ensure_store(spec: CampaignSpec) -> None:
    """Create the store from the first input's geometry, so workers only ever add shards to it."""
    from icegrid.preprocess import find_geometry
    from icegrid.store import EventStore

    EventStore.create(spec.store, find_geometry(Path(spec.inputs[0])))


def _analyse(spec: CampaignSpec, models: list[str], echo: Callable[[str], None]):
    from icegrid.analysis import analyze_store

    out_dir = Path(spec.analysis_dir) if spec.analysis_dir else spec.campaign_path / "analysis"
    return analyze_store(spec.store, models, out_dir, echo=echo)
