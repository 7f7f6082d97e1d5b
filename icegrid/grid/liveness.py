"""Liveness: a campaign never waits forever on a pool that lost its workers or on a frozen worker.

* **Task limit** (``timeout_task_s``): a shard that has run longer than this on one worker (counted from
  the attempt its worker announced) is taken as stuck — a frozen process, a hung NFS mount — not slow:
  its worker is retired (a local worker's process is killed, and its nanny starts a fresh one; on a
  remote pool the scheduler drops the worker, and on a batch pool the job that holds it is cancelled too
  — a frozen process would keep its slot until walltime — and replaced, see replacer.py) and the shard
  is requeued like one whose worker vanished.
  A shard that never announced an attempt (the worker froze before it could) is held to twice the
  limit from when the scheduler sent it to a worker (it may wait for one running shard first) — not
  from its submission: a batch pool's replacement job may sit in the queue longer than that. The
  other shards the retired worker had started go back to that rule (the scheduler sends them on).
* **Idle limit** (``timeout_idle_s``): a pool with shards waiting for it that has had no worker, or
  whose in-flight shards none started or finished, for this long is idle. With one pool, or when
  every pool is idle, the campaign ends with one line per pool naming what was seen; otherwise the
  idle pool is named once in a warning and the others go on.
* **Revival**: a local pool's nanny that failed (its worker would not restart, or never started) is
  recreated, at most every :data:`REVIVE_EVERY_S`, so a local pool keeps its size. (Batch pools have
  the job replacer; glidein workers are not ours to start.)

distributed's own ``worker-ttl`` (5 minutes by default) restarts a worker that stops heartbeating, but
that restart may itself wait on the frozen process; the limits here do not depend on the worker.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("icegrid.grid")
REVIVE_EVERY_S = 5.0
UNSTARTED_FACTOR = 2.0


class Liveness:
    """Per-run bookkeeping: when each in-flight task started (and where), and when each pool last moved."""

    def __init__(self, pools: list, task_limit_s: float | None, idle_limit_s: float | None):
        self.task_limit_s, self.idle_limit_s = task_limit_s, idle_limit_s
        self._lock = threading.Lock()
        self._started: dict[str, tuple[float, str]] = {}    # dask key -> (monotonic time, worker address)
        self._submitted: dict[str, float] = {}
        now = time.monotonic()
        self._moved = {pool.name: now for pool in pools}      # last attempt or result seen
        self._idle_since: dict[str, float] = {}
        self._warned: set[str] = set()
        self._revived_at = {pool.name: 0.0 for pool in pools}
        self._suspects: dict[str, set] = {}
        self.revived = {pool.name: 0 for pool in pools}
        self.retired: list[str] = []

    # -- events (the attempt callback runs on the client's event-loop thread)
    def submitted(self, dask_key: str) -> None:
        self._submitted[dask_key] = time.monotonic()

    def attempt(self, dask_key: str, worker: str, pool_name: str | None) -> None:
        with self._lock:
            self._started[dask_key] = (time.monotonic(), worker)
            if pool_name in self._moved:
                self._moved[pool_name] = time.monotonic()

    def sent(self, dask_key: str, ago_s: float) -> None:
        """The scheduler sent an unstarted task to a worker ``ago_s`` ago: its clock starts there."""
        self._submitted[dask_key] = time.monotonic() - ago_s

    def forget_worker(self, worker: str) -> None:
        """The tasks started on a retired worker are unstarted again (the scheduler sends them on)."""
        now = time.monotonic()
        with self._lock:
            gone = [k for k, (_, w) in self._started.items() if w == worker]
            for dask_key in gone:
                del self._started[dask_key]
        for dask_key in gone:
            self._submitted[dask_key] = now

    def finished(self, dask_key: str, pool_name: str) -> None:
        with self._lock:
            self._started.pop(dask_key, None)
            self._moved[pool_name] = time.monotonic()
        self._submitted.pop(dask_key, None)

    # -- checks, once a second from the manager's loop
    def overdue(self, in_flight: dict, now: float) -> list[tuple[str, str | None, str]]:
        """(dask key, worker or None, why) of the in-flight tasks past the task limit."""
        if self.task_limit_s is None:
            return []
        late = []
        with self._lock:
            started = dict(self._started)
        for dask_key in in_flight:
            if dask_key in started:
                began, worker = started[dask_key]
                if now - began > self.task_limit_s:
                    late.append((dask_key, worker, f"ran past the task limit ({self.task_limit_s:g} s, "
                                                   f"timeout_task_s) on {worker}"))
            elif now - self._submitted.get(dask_key, now) > UNSTARTED_FACTOR * self.task_limit_s:
                late.append((dask_key, None, f"sent to a worker that did not start it within "
                                             f"{UNSTARTED_FACTOR:g} x the task limit ({self.task_limit_s:g} s, "
                                             "timeout_task_s)"))
        return late

    def idle(self, pool, workers: int, waiting: int, in_flight: list[str], now: float) -> str | None:
        """Why ``pool`` counts as idle (one line), or None. ``waiting``: shards it could take."""
        if self.idle_limit_s is None:
            return None
        with self._lock:
            started_any = any(k in self._started for k in in_flight)
            moved = self._moved[pool.name]
        if workers == 0 and waiting + len(in_flight) > 0:
            seen = f"0 workers for {{:.0f}} s with {waiting + len(in_flight)} shard(s) queued"
            since = self._idle_since.setdefault(pool.name, now)
        elif workers > 0 and in_flight and not started_any:
            seen = (f"{workers} worker(s) but no shard started or finished for {{:.0f}} s "
                    f"({len(in_flight)} in flight)")
            since = max(moved, self._idle_since.setdefault(pool.name, now))
        else:
            self._idle_since.pop(pool.name, None)
            return None
        if now - since <= self.idle_limit_s:
            return None
        revived = self.revived.get(pool.name, 0)
        note = f"; {revived} failed worker(s) recreated, none stayed" if revived and workers == 0 else ""
        return f"pool {pool.name}: {seen.format(now - since)} (timeout_idle_s {self.idle_limit_s:g}){note}"

    def warn_once(self, line: str, pool_name: str) -> None:
        if pool_name not in self._warned:
            self._warned.add(pool_name)
            log.warning("%s; the other pools go on", line)

    def revive(self, pool, now: float) -> None:
        """Recreate the failed nannies of a local pool (a SpecCluster never does)."""
        cluster = pool.cluster
        if cluster is None or pool.replacer is not None or not hasattr(cluster, "worker_spec"):
            return
        if now - self._revived_at[pool.name] < REVIVE_EVERY_S:
            return
        self._revived_at[pool.name] = now
        cluster.loop.add_callback(_revive, cluster, pool.name, self.revived, self._suspects.setdefault(pool.name, set()))


def check(manager, now: float) -> str | None:
    """The manager's once-a-second liveness step: requeue overdue shards (retiring their workers),
    revive failed local workers; returns the line to end the campaign with when every pool is idle."""
    live = manager.liveness
    for dask_key, worker, why in live.overdue(manager.in_flight, now):
        task, pool, future = manager.in_flight[dask_key]
        if worker is None:
            worker, sent_ago = _processing_on(pool, dask_key)
            if worker is None:   # queued on the scheduler for a free thread: waiting, not stuck
                live.submitted(dask_key)
                continue
            if sent_ago is not None and sent_ago <= UNSTARTED_FACTOR * live.task_limit_s:
                live.sent(dask_key, sent_ago)   # on a worker only since then (e.g. a replacement job's)
                continue
        del manager.in_flight[dask_key]
        manager.stages[task.stage].in_flight -= 1
        future.cancel()
        how = retire(pool, worker)
        live.forget_worker(worker)
        log.warning("%s %s; %s, shard requeued", task.key, why, how)
        live.finished(dask_key, pool.name)
        manager._requeue_lost(task, f"{why}; {how}")
    idle = []
    for pool in manager.pools:
        live.revive(pool, now)
        mine = [k for k, (_, p, _) in manager.in_flight.items() if p is pool]
        line = live.idle(pool, manager.workers_seen[pool.name], len(manager.ready), mine, now)
        if line:
            idle.append((pool, line))
    if idle and len(idle) == len(manager.pools):
        return "; ".join(line for _, line in idle)
    for pool, line in idle:
        live.warn_once(line, pool.name)
    return None


def _revive(cluster, pool_name: str, counts: dict, suspects: set) -> None:
    """On the cluster's event loop (SpecCluster state is not thread-safe): forget the failed nannies that
    are still wanted, and let the cluster start them again. A nanny has failed when it closed (its
    worker would not start) or when, two looks in a row, it runs without a worker process (a worker
    that died while starting: distributed's nanny then neither restarts it nor closes)."""
    import asyncio

    from distributed.core import Status

    if cluster.status in (Status.closing, Status.closed):
        return
    dead, workerless = [], set()
    for name, nanny in cluster.workers.items():
        status = getattr(nanny, "status", None)
        if name not in cluster.worker_spec or status in (Status.init, Status.starting):
            continue
        if status in (Status.closed, Status.failed):
            dead.append(name)
        elif status == Status.running and not nanny.is_alive():
            workerless.add(name)
            if name in suspects:
                dead.append(name)
    suspects.clear()
    suspects.update(workerless - set(dead))
    if not dead:
        return
    for name in dead:
        nanny = cluster.workers.pop(name)
        if nanny.status == Status.running:
            asyncio.ensure_future(nanny.close(reason="icegrid-revive"))
    counts[pool_name] = counts.get(pool_name, 0) + len(dead)
    log.warning("pool %s: %d worker(s) failed and did not restart; starting them again", pool_name, len(dead))
    cluster.scale(len(cluster.worker_spec))


def retire(pool, worker: str) -> str:
    """Take a stuck worker out of its pool; returns how, for the requeue reason."""
    pid = _local_pid(pool, worker)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)   # works on a stopped process too; the nanny starts a fresh one
            return f"worker process {pid} killed"
        except OSError:
            pass
    try:
        name = pool.client.run_on_scheduler(_remove_worker, address=worker)
    except Exception as err:  # the scheduler itself may be gone: the pool checks report that
        from icegrid.errors import first_line

        return f"worker not removed ({first_line(err)})"
    if name is None:
        return "worker already gone from the scheduler"
    # A batch job of ours (not a glidein's): cancelled, or its frozen worker keeps the slot until walltime.
    job = pool.replacer.retire(name) if pool.replacer is not None else None
    return f"worker removed from the scheduler, {job}" if job else "worker removed from the scheduler"


def _local_pid(pool, worker: str) -> int | None:
    """The process of ``worker`` when it is a nanny-run process of our own local cluster."""
    if pool.cluster is None or pool.replacer is not None:
        return None
    for nanny in list(getattr(pool.cluster, "workers", {}).values()):
        if getattr(nanny, "worker_address", None) == worker and getattr(nanny, "pid", None):
            return int(nanny.pid)
    return None


def _processing_on(pool, dask_key: str) -> tuple[str | None, float | None]:
    """(worker the scheduler sent the task to, seconds ago — None: longer than its log goes back), or (None, None)."""
    try:
        return tuple(pool.client.run_on_scheduler(_where, key=dask_key))
    except Exception:
        return None, None


def _where(dask_scheduler=None, key: str = "") -> tuple[str | None, float | None]:
    ts = dask_scheduler.tasks.get(key)
    if ts is None or ts.processing_on is None:
        return None, None
    # When it went to processing, from the transition log (its last distributed.admin.low-level-log-length entries).
    sent = [t.timestamp for t in dask_scheduler.story(key) if t.finish == "processing"]
    return ts.processing_on.address, (time.time() - sent[-1]) if sent else None


async def _remove_worker(dask_scheduler=None, address: str = "") -> str | None:
    """Drop the worker; its name (a batch job's name, or with a process suffix), or None if it is gone."""
    ws = dask_scheduler.workers.get(address)
    name = None if ws is None else str(ws.name)
    # Not retire_workers: that waits for the (frozen) worker to hand over its data.
    await dask_scheduler.remove_worker(address=address, stimulus_id=f"icegrid-task-limit-{time.time()}", close=True)
    return name
