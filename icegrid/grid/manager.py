"""The manager: drives shard tasks through one or more Dask pools until each is done or failed.

* The **store is the completion record**: tasks the store has are skipped, so killing the manager
  (or the scheduler, or any worker) and rerunning the same command redoes no completed shard.
* A shard whose worker **vanished** (preempted glidein, ``condor_rm``, SIGKILL, walltime) is normal,
  not a failure: distributed reschedules it, and when distributed gives up (``KilledWorker``) the
  manager resubmits it under a new key, up to ``lost_worker_retries`` times.
* A shard whose function **raised** is retried ``error_retries`` times, then reported with its
  reason; the shards depending on it are reported as blocked. Bad input (``InputError``) is reported
  at once, since a retry would only repeat it. Its traceback goes to the pool's ``shard-errors.log``.
* A shard running past ``task_timeout_s`` has a stuck worker: the worker is retired and the shard
  requeued; a pool with no worker (or no shard moving) for ``idle_timeout_s`` ends the campaign in
  one line (see :mod:`icegrid.grid.liveness`).
* Several pools (one scheduler per site) pull from one ready list, each keeping just enough tasks in
  flight to feed its workers, so a fast pool takes more shards and a dead one takes none; a task that
  asks for a resource (GPU) goes only to a pool whose workers offer it.
* A shard whose worker was **killed for memory** is reported as out of memory and retried on a larger
  worker where the pool allows it (:mod:`icegrid.grid.oom`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

from icegrid.grid.capacity import missing_resource, pool_capacity
from icegrid.grid.liveness import Liveness, check
from icegrid.grid.oom import OutOfMemory
from icegrid.grid.plan import ShardTask
from icegrid.grid.progress import Progress
from icegrid.grid.summary import CampaignSummary, StageSummary
from icegrid.grid.task import ATTEMPT_TOPIC, error_line, future_exception, is_lost_worker, run_shard_task

log = logging.getLogger("icegrid.grid")


class CampaignError(RuntimeError):
    """A campaign that cannot go on (no worker can join, every pool lost); one line, naming the pool."""


class Manager(OutOfMemory):
    """The state of one campaign run, and the loop that advances it.

    ``on_change(manager)`` is called every couple of seconds while the run goes (the campaign writes
    the state file for `icegrid status` from it); ``error_dir`` is where each pool's shard-errors.log
    goes (``<campaign>/<pool>/``); ``resource_timeout_s`` bounds the wait for a worker offering a
    resource some ready task asks for; ``task_timeout_s`` and ``idle_timeout_s`` are the liveness
    limits (None: none).
    """

    def __init__(self, pools: list, *, lost_worker_retries: int = 10, error_retries: int = 1,
                 memory_retries: int = 2, progress: bool = True, in_flight_per_thread: int = 2,
                 error_dir: Path | None = None,
                 resource_timeout_s: float | None = None, on_change: Callable[["Manager"], None] | None = None,
                 task_timeout_s: float | None = None, idle_timeout_s: float | None = None):
        if not pools:
            raise ValueError("a campaign needs at least one pool")
        self.pools = pools
        self.lost_worker_retries, self.error_retries = lost_worker_retries, error_retries
        self.show_progress, self.in_flight_per_thread = progress, in_flight_per_thread
        self.error_dir, self.resource_timeout_s, self.on_change = error_dir, resource_timeout_s, on_change
        self.task_timeout_s, self.idle_timeout_s = task_timeout_s, idle_timeout_s
        self.run_id = uuid.uuid4().hex[:8]
        self._events: queue.Queue = queue.Queue()
        self._attempts: Counter = Counter()
        self._attempt_lock = threading.Lock()
        self._init_memory(memory_retries)

    # ------------------------------------------------------------------------------------ the loop
    def run(self, tasks: list[ShardTask]) -> CampaignSummary:
        self._begin(tasks)
        try:
            while self.remaining > 0:
                self._watch_pools()       # once a second: capacity, lost schedulers, dead pools
                self._watch_memory()      # shards on workers killed for memory: retried larger, or failed
                self._fill_pools()        # submit ready tasks up to each pool's capacity
                self._take_result(0.5)    # one finished task: record it, release its dependents
        finally:
            self._end()
        return self.summary

    # ------------------------------------------------------------------------------------ setup
    def _begin(self, tasks: list[ShardTask]) -> None:
        self.started, self.started_wall = time.perf_counter(), time.time()
        self.summary = CampaignSummary()
        self.by_key = {t.key: t for t in tasks}
        if len(self.by_key) != len(tasks):
            raise ValueError("duplicate task keys in a campaign")
        self.stages: dict[str, StageSummary] = self.summary.stages
        totals: Counter = Counter()
        self.done_keys: set[str] = set()
        for task in tasks:
            stage = self.stages.setdefault(task.stage, StageSummary())
            stage.total += 1
            if task.done is not None and task.done():
                stage.skipped += 1
                self.done_keys.add(task.key)
                self.summary.skipped.append(task.key)
            else:
                totals[task.stage] += task.events
        self.waiting: dict[str, list[ShardTask]] = {}
        self.ready: deque[ShardTask] = deque()
        todo = [t for t in tasks if t.key not in self.done_keys]
        for task in todo:
            if task.after and task.after not in self.done_keys:
                if task.after not in self.by_key:
                    raise ValueError(f"task {task.key} waits for unknown task {task.after}")
                self.waiting.setdefault(task.after, []).append(task)
            else:
                self.ready.append(task)
        self.remaining = len(todo)
        self.lost: Counter = Counter()
        self.errors: Counter = Counter()
        self.in_flight: dict[str, tuple[ShardTask, Any, Any]] = {}  # dask key -> (task, pool, future)
        self.capacity = {pool.name: 0 for pool in self.pools}
        self.offered: dict[str, set[str]] = {pool.name: set() for pool in self.pools}
        self.workers_seen: dict[str, int] = {pool.name: 0 for pool in self.pools}
        self.checked_at = self.changed_at = 0.0
        self.missing_since: dict[str, float] = {}
        self.progress = Progress(self.stages, totals, self.show_progress)
        self.liveness = Liveness(self.pools, self.task_timeout_s, self.idle_timeout_s)
        for pool in self.pools:
            self.summary.dashboards[pool.name] = pool.dashboard_link
            pool.client.subscribe_topic(ATTEMPT_TOPIC, self._on_attempt)
            self._begin_memory(pool)
            self.summary.per_pool.setdefault(pool.name, 0)

    def _end(self) -> None:
        self.progress.close()
        for _, _, future in self.in_flight.values():
            future.cancel()
        for pool in self.pools:
            try:
                pool.client.unsubscribe_topic(ATTEMPT_TOPIC)
            except Exception:  # the pool may be gone already
                pass
            self._end_memory(pool)
        with self._attempt_lock:
            self.summary.restarts = sum(max(0, n - 1) for n in self._attempts.values())
        self.summary.wall_s = time.perf_counter() - self.started
        for stage in self.stages.values():
            stage.in_flight = 0
        self._changed(force=True)

    def _on_attempt(self, event) -> None:
        """Attempts seen on workers (also the ones distributed retried by itself)."""
        _, msg = event
        with self._attempt_lock:
            self._attempts[str(msg.get("key", "")).split("|")[0]] += 1
        held = self.in_flight.get(str(msg.get("key", "")))
        self.liveness.attempt(str(msg.get("key", "")), str(msg.get("worker", "")), held[1].name if held else None)
        self._memory_attempt(msg)

    # ------------------------------------------------------------------------------------ pools
    def _watch_pools(self) -> None:
        now = time.monotonic()
        if now - self.checked_at <= 1.0:
            return
        self.checked_at = now
        for pool in self.pools:
            self.capacity[pool.name], self.offered[pool.name], self.workers_seen[pool.name] = self._capacity(pool)
        reasons = [pool.dead_reason() for pool in self.pools]
        if all(reasons):
            raise CampaignError("; ".join(reasons))
        # A pool that lost its scheduler: what it held goes back to the shared list now, not when its
        # client gives up reconnecting.
        for dask_key, (task, pool, _) in list(self.in_flight.items()):
            if pool.client.status != "running":
                del self.in_flight[dask_key]
                self.stages[task.stage].in_flight -= 1
                self._requeue_lost(task, f"pool {pool.name} lost its scheduler")
        self._check_resources(now)
        self._check_liveness(now)
        self._changed()

    def _capacity(self, pool) -> tuple[int, set[str], int]:
        return pool_capacity(pool, self.in_flight_per_thread, single_pool=len(self.pools) == 1)

    def _check_resources(self, now: float) -> None:
        line = missing_resource(self, now)
        if line:
            raise CampaignError(line)

    def _check_liveness(self, now: float) -> None:
        """Stuck workers out, failed local workers back, and one line when the pools stay idle."""
        line = check(self, now)
        if line:
            raise CampaignError(line)

    def _fill_pools(self) -> None:
        """Fill each pool up to its capacity, in turn, from the shared ready list, with the tasks its
        workers can run (with several pools a GPU task never waits in a pool that has no GPU)."""
        for pool in self.pools:
            mine = sum(1 for _, p, _ in self.in_flight.values() if p is pool)
            passed_over: list[ShardTask] = []
            route = len(self.pools) > 1
            while self.ready and mine < self.capacity[pool.name] and pool.client.status == "running" \
                    and len(passed_over) < 1000:
                task = self.ready.popleft()
                if route and not set(self._resources_of(task)) <= self.offered[pool.name]:
                    passed_over.append(task)
                    continue
                self._submit(task, pool)
                mine += 1
            self.ready.extendleft(reversed(passed_over))

    def _submit(self, task: ShardTask, pool) -> None:
        attempt = self.lost[task.key] + self.errors[task.key] + self.memory_used[task.key]
        dask_key = f"{task.key}|{self.run_id}|{attempt}"
        future = pool.client.submit(run_shard_task, task.func, task.args, task.kwargs, key=dask_key,
                                    resources=self._resources_of(task) or None, pure=False, retries=0)
        self.in_flight[dask_key] = (task, pool, future)
        self.stages[task.stage].in_flight += 1
        self.progress.started(task.stage)
        self.liveness.submitted(dask_key)
        future.add_done_callback(lambda f, k=dask_key: self._events.put(k))

    # ------------------------------------------------------------------------------------ results
    def _take_result(self, timeout: float) -> None:
        try:
            dask_key = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        if dask_key not in self.in_flight:
            return
        task, pool, future = self.in_flight.pop(dask_key)
        self.stages[task.stage].in_flight -= 1
        self.liveness.finished(dask_key, pool.name)
        status = future.status
        if status == "finished":
            result = future.result()
            future.release()
            if "_error" in result:
                self._shard_raised(task, pool, result)
            else:
                self._record_done(task, pool, result)
            return
        exc = future_exception(future)
        future.release()
        if is_lost_worker(status, exc):
            if not self._memory_lost(dask_key, task, pool, exc):
                self._requeue_lost(task, repr(exc))
        else:  # an error of Dask itself (e.g. the arguments would not unpickle): retried like a raise
            self._shard_raised(task, pool, {"_error": error_line(exc), "_bad_input": False})

    def _record_done(self, task: ShardTask, pool, result: dict) -> None:
        self.remaining -= 1
        stage = self.stages[task.stage]
        stage.done += 1
        stage.events += task.events
        stage.compute_s += float(result.get("_compute_s", 0.0))
        self.summary.ran.append(task.key)
        self.summary.placements[task.key] = str(result.get("_worker", ""))
        self.summary.per_pool[pool.name] += 1
        self.done_keys.add(task.key)
        # Dependents first: a shard's inference starts as soon as the shard exists, so GPU workers
        # are fed while CPU workers are still preprocessing.
        self.ready.extendleft(reversed(self.waiting.pop(task.key, [])))
        self.progress.update(task.stage, task.events, stage,
                             self.summary.retried_lost + self.summary.retried_errors)

    def _shard_raised(self, task: ShardTask, pool, result: dict) -> None:
        self.errors[task.key] += 1
        self._log_traceback(task, pool, result)
        if self.errors[task.key] > self.error_retries or result.get("_bad_input"):
            self._fail(task, result["_error"])
        else:
            self.summary.retried_errors += 1
            self.ready.appendleft(task)

    def _requeue_lost(self, task: ShardTask, why: str) -> None:
        """The task's worker or pool vanished: normal on opportunistic resources, up to a limit."""
        self.lost[task.key] += 1
        if self.lost[task.key] > self.lost_worker_retries:
            self._fail(task, f"lost {self.lost[task.key]} workers while running it (last: {why:.200})")
        else:
            self.summary.retried_lost += 1
            self.ready.appendleft(task)

    def _fail(self, task: ShardTask, reason: str) -> None:
        self.summary.failures[task.key] = reason
        self.stages[task.stage].failed += 1
        self.remaining -= 1
        for dependent in self.waiting.pop(task.key, []):
            self._fail(dependent, f"not run: {task.key} failed")

    def _log_traceback(self, task: ShardTask, pool, result: dict) -> None:
        if self.error_dir is None or not result.get("_traceback"):
            return
        path = Path(self.error_dir) / pool.name / "shard-errors.log"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write(f"=== {stamp} {task.key} (attempt {self.errors[task.key]}) on "
                             f"{result.get('_worker', '?')}\n{result['_traceback']}\n")
        except OSError as err:   # a full disk: the shard's one-line reason is kept all the same
            log.warning("cannot write %s (%s)", path, err.strerror or err)
            return
        self.summary.error_logs[pool.name] = str(path)

    def _changed(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_change is not None and (force or now - self.changed_at >= 2.0):
            self.changed_at = now
            try:
                self.on_change(self)
            except Exception as err:  # a state file that cannot be written must not stop the campaign
                log.warning("campaign state: %s", err)

