"""Out of memory, handled like a grid does (IceProd resubmits with 1.5x the resources).

A worker killed for memory is recognised — the nanny's memory kill (distributed's
``worker-restart-memory`` event), or a batch job that left the queue for memory (HTCondor's hold
reason, SLURM's ``OUT_OF_MEMORY``) — and reported as out of memory, naming the shard and the limit,
instead of as a lost worker. The shard is then retried on a worker with ``memory_growth`` times the
memory (a bigger local worker or a resubmitted batch job, up to the pool's ``max_memory``, at most
``retries.memory`` times) and routed there by the worker resource ``memory_mib``; where the pool cannot
grow, it fails in one line that says what to set.

:class:`OutOfMemory` is the manager's part of this (a mixin, so the run loop gains two calls);
:func:`grown_limit` and :func:`advice` are the pure decisions.
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
from collections import Counter

log = logging.getLogger("icegrid.grid")

MEMORY_TOPIC = "worker-restart-memory"   # logged by distributed's nanny when it kills its worker for memory
RESOURCE = "memory_mib"                  # what a grown worker offers: its memory limit, in MiB
MiB, GiB = 2**20, 2**30
# Batch systems' words for a job they ended for memory (HTCondor hold reasons, SLURM job states).
BATCH_MEMORY = re.compile(r"OUT_OF_MEMORY|\bOOM\b|memory limit|MemoryUsage|exceeded .*memory|over memory",
                          re.IGNORECASE)


def size(n: float | None) -> str:
    return "?" if not n else f"{n / GiB:.2f} GiB"


def parse_size(text: str | None) -> int | None:
    if not text:
        return None
    from dask.utils import parse_bytes

    return int(parse_bytes(str(text)))


def grown_limit(limit: int, growth: float, cap: int | None) -> int | None:
    """The next worker memory limit after one killed at ``limit`` bytes: ``limit * growth`` in whole
    MiB, at most ``cap``; None when that is no more than ``limit`` (no cap set, or the cap reached)."""
    if not limit or cap is None or growth <= 1.0:
        return None
    grown = min(int(math.ceil(limit * growth / MiB)) * MiB, int(cap) // MiB * MiB)
    return grown if grown > limit else None


def advice(pool: str, limit: int, settings, retries_left: int, retries: int = 0) -> str:
    """What to set so the shard gets more memory, for the failure line."""
    if retries_left <= 0:
        return f"retries.memory ({retries}) used up: raise it, or set memory above {size(limit)} for pool {pool}"
    if settings is None or not hasattr(settings, "max_memory"):
        return f"start the workers of pool {pool} with a larger --memory-limit"
    growth, cap = settings.memory_growth, parse_size(settings.max_memory)
    if cap is None:
        return (f"set memory above {size(limit)} for pool {pool}, or max_memory to let it grow "
                f"(memory_growth {growth:g})")
    return f"set max_memory (now {size(cap)}) or memory above {size(limit)} for pool {pool}"


def batch_memory_reason(reason: str) -> bool:
    """Whether a batch system's reason for a job leaving the queue says it ran out of memory."""
    return bool(reason) and bool(BATCH_MEMORY.search(reason))


class OutOfMemory:
    """The manager's handling of memory kills. Needs the manager's ``in_flight``, ``stages``,
    ``ready``, ``summary`` and ``_fail``."""

    def _init_memory(self, retries: int) -> None:
        self.memory_retries = retries
        self.memory_used: Counter = Counter()          # task key -> memory retries spent
        self.memory_need: dict[str, int] = {}           # task key -> MiB its next attempt asks for
        self._memory_kills: queue.Queue = queue.Queue()  # (worker address or name, rss, why) from pools
        self._memory_seen: dict[str, tuple] = {}         # worker -> (rss, why, when), for KilledWorker
        self._ran_on: dict[str, list[tuple[str, str, int]]] = {}  # dask key -> [(address, name, limit)]
        self._ran_lock = threading.Lock()
        self._pruned_at = time.monotonic()

    def _begin_memory(self, pool) -> None:
        pool.client.subscribe_topic(MEMORY_TOPIC, self._on_memory_kill)
        if pool.replacer is not None:   # jobs the batch system ended for memory
            pool.replacer.on_memory = lambda name, why: self._memory_kills.put((name, 0, why))

    def _end_memory(self, pool) -> None:
        try:
            pool.client.unsubscribe_topic(MEMORY_TOPIC)
        except Exception:  # the pool may be gone already
            pass

    def _on_memory_kill(self, event) -> None:
        _, msg = event
        self._memory_kills.put((str(msg.get("worker", "")), int(msg.get("rss") or 0), "killed by its nanny"))

    def _memory_attempt(self, msg: dict) -> None:
        """An attempt started on a worker: remember where, so a kill of that worker names its shard."""
        with self._ran_lock:
            runs = self._ran_on.setdefault(str(msg.get("key", "")), [])
            runs.append((str(msg.get("worker", "")), str(msg.get("name", "")), int(msg.get("memory_limit") or 0)))

    def _resources_of(self, task) -> dict[str, float]:
        need = self.memory_need.get(task.key)
        return {**task.resources, RESOURCE: need} if need else dict(task.resources)

    def _watch_memory(self) -> None:
        """Shards on workers killed for memory: taken back at once (distributed would rerun them on
        workers just as small, each kill costing a restart), then retried larger or failed."""
        self._drain_kills()
        if time.monotonic() - self._pruned_at > 10:   # attempts of tasks no longer in flight: forgotten
            self._pruned_at = time.monotonic()
            with self._ran_lock:
                self._ran_on = {k: v for k, v in self._ran_on.items() if k in self.in_flight}
        if not self._memory_seen:
            return
        for dask_key, (task, pool, future) in list(self.in_flight.items()):
            hit = self._killed_run(dask_key)
            if hit is not None:
                del self.in_flight[dask_key]
                self.stages[task.stage].in_flight -= 1
                future.cancel()
                self._out_of_memory(task, pool, *hit)
        now = time.monotonic()
        self._memory_seen = {w: v for w, v in self._memory_seen.items() if now - v[2] < 120}

    def _drain_kills(self) -> None:
        while True:
            try:
                worker, rss, why = self._memory_kills.get_nowait()
            except queue.Empty:
                return
            self._memory_seen[worker] = (rss, why, time.monotonic())

    def _killed_run(self, dask_key: str, last_worker: str | None = None):
        """(worker, limit, rss, why) when an attempt of ``dask_key`` ran on a worker killed for memory."""
        with self._ran_lock:
            runs = list(self._ran_on.get(dask_key, ()))
        for address, name, limit in reversed(runs):
            for worker in (address, name):
                if worker and worker in self._memory_seen and (last_worker is None or last_worker == address):
                    rss, why, _ = self._memory_seen[worker]
                    return address, limit, rss, why
        return None

    def _memory_lost(self, dask_key: str, task, pool, exc) -> bool:
        """A lost task whose last worker was killed for memory (KilledWorker after the nanny's kills
        outran the manager): handled as out of memory. False: an ordinary lost worker."""
        self._drain_kills()
        last = getattr(getattr(exc, "last_worker", None), "address", None)
        hit = self._killed_run(dask_key, last)
        if hit is None:
            return False
        self._out_of_memory(task, pool, *hit)
        return True

    def _out_of_memory(self, task, pool, worker: str, limit: int, rss: int, why: str) -> None:
        with self._ran_lock:
            for key in [k for k in self._ran_on if k.split("|")[0] == task.key]:
                del self._ran_on[key]
        self.memory_used[task.key] += 1
        line = (f"out of memory in pool {pool.name}: worker {worker} {why} (limit {size(limit)}"
                + (f", using {size(rss)}" if rss else "") + ")")
        settings = getattr(pool.profile_obj, "settings", None)
        retries_left = self.memory_retries - self.memory_used[task.key] + 1
        grown = None
        if retries_left > 0 and settings is not None and hasattr(settings, "max_memory"):
            grown = grown_limit(limit, settings.memory_growth, parse_size(settings.max_memory))
        if grown is not None and start_bigger_worker(pool, grown, {RESOURCE: grown // MiB}):
            self.memory_need[task.key] = grown // MiB
            self.summary.retried_memory += 1
            log.warning("%s: %s; retrying on a worker with %s", task.key, line, size(grown))
            self.ready.appendleft(task)
            return
        self._fail(task, f"{line}; {advice(pool.name, limit, settings, retries_left, self.memory_retries)}")


def start_bigger_worker(pool, memory: int, resources: dict[str, float]) -> bool:
    """One more worker (local) or worker job (batch) like the pool's others but with ``memory`` bytes,
    offering ``resources``; one per size (a second shard needing it waits for it). False where the
    pool cannot start one (glidein workers join by themselves)."""
    cluster = pool.cluster
    spec = pool.profile_obj.bigger_worker_spec(cluster, memory, resources) if cluster is not None else None
    if spec is None:
        return False
    name = f"icegrid-{pool.name}-mem{memory // MiB}"
    if name in cluster.worker_spec:
        return True

    def add() -> None:
        # On the cluster's event loop (SpecCluster state is not thread-safe); the same size reconciles:
        # the new spec is started, nothing is removed.
        from distributed import SpecCluster

        if cluster.status.name in ("closing", "closed"):
            return
        cluster.worker_spec[name] = spec
        SpecCluster.scale(cluster, len(cluster.worker_spec))

    cluster.loop.add_callback(add)
    log.info("pool %s: starting worker %s with a %s memory limit", pool.name, name, size(memory))
    return True


def batch_job_spec(cluster, memory: int, resources: dict[str, float]) -> dict:
    """A dask-jobqueue job spec asking ``memory`` bytes per worker process (the job's request, and the
    workers' --memory-limit with it), its workers offering ``resources`` as well as the pool's."""
    import copy

    from icegrid.grid.profiles.batch import option_groups, option_name

    spec = copy.deepcopy(cluster.new_spec)
    options = spec["options"]
    options["memory"] = f"{memory * cluster._dummy_job.worker_processes // MiB}MiB"
    extra = ",".join(f"{k}={v:g}" for k, v in resources.items())
    groups = option_groups(list(options.get("worker_extra_args") or []))
    have = next((g for g in groups if option_name(g) == "--resources" and len(g) > 1), None)
    if have is not None:
        have[1] = f"{have[1]},{extra}"
    else:
        groups.append(["--resources", extra])
    options["worker_extra_args"] = [arg for group in groups for arg in group]
    return spec
