"""What each pool can take and what its workers offer, for the manager's dispatch: tasks to keep in
flight per pool, and the one line when a resource that ready tasks ask for is offered by no worker."""

from __future__ import annotations

import time


def pool_capacity(pool, in_flight_per_thread: int, single_pool: bool) -> tuple[int, set[str], int]:
    """(tasks to keep in flight on a pool, resources its workers offer, workers connected).

    A few tasks per worker thread, so workers never wait for the manager, while the rest stay in
    the shared list for whichever pool frees up first. With one pool every task goes there and
    waits for a fitting worker (glideins arrive late)."""
    if pool.client.status != "running":
        return 0, set(), 0  # reconnecting to a lost scheduler, or given up on it: submit nothing there
    try:
        workers = pool.workers()
    except Exception:  # scheduler unreachable for now: submit nothing there
        return 0, set(), 0
    capacity = in_flight_per_thread * sum(w.get("nthreads", 1) for w in workers.values())
    offered = {name for w in workers.values() for name, amount in (w.get("resources") or {}).items() if amount}
    return (max(1, capacity) if single_pool else capacity), offered, len(workers)


def missing_resource(manager, now: float | None = None) -> str | None:
    """The line, after the manager's ``resource_timeout_s``, naming a resource ready tasks ask for that
    no connected worker of any pool offers (e.g. ``--device cuda`` with no GPU worker); else None."""
    if manager.resource_timeout_s is None:
        return None
    now = time.monotonic() if now is None else now
    offered = set().union(*manager.offered.values())
    waiting = list(manager.ready) + [task for task, _, _ in manager.in_flight.values()]
    asked = {r: t.stage for t in waiting for r in manager._resources_of(t) if r not in offered}
    for name in list(manager.missing_since):
        if name not in asked:
            del manager.missing_since[name]
    for name, stage in asked.items():
        since = manager.missing_since.setdefault(name, now)
        if now - since > manager.resource_timeout_s:
            return (f"no worker offers resource {name}, which stage {stage} asks for (waited "
                    f"{manager.resource_timeout_s:.0f} s; workers: "
                    + ", ".join(f"{p.name} {manager.workers_seen[p.name]}" for p in manager.pools) + ")")
    return None
