"""What runs on a worker for every shard task (announce the attempt, run the shard function, time it),
and how the manager reads a task's outcome.

A shard function that raises does not raise through Dask: its error comes back as data (one line,
whether it is bad input, and the traceback), so the manager decides about retries, the user reads one
line, and the traceback goes to the pool's log file instead of a "Compute Failed" block on stderr.
"""

from __future__ import annotations

import os
import time
import traceback

ATTEMPT_TOPIC = "icegrid-attempt"


def error_line(err: BaseException) -> str:
    from icegrid.errors import first_line

    return f"{type(err).__name__}: {first_line(err) if str(err).strip() else ''}"[:500]


def run_shard_task(func: str, args: tuple, kwargs: dict) -> dict:
    """Executed on a worker. ``func`` is "module:function", imported here (not pickled)."""
    import importlib

    from distributed import get_worker

    worker = get_worker()
    key = worker.get_current_task()
    # The worker's name and memory limit: a memory kill of this worker names the shard and its limit.
    worker.log_event(ATTEMPT_TOPIC, {"key": str(key), "worker": worker.address, "pid": os.getpid(),
                                     "name": str(worker.name),
                                     "memory_limit": int(worker.memory_manager.memory_limit or 0)})
    module_name, _, name = func.partition(":")
    function = getattr(importlib.import_module(module_name), name)
    start = time.perf_counter()
    try:
        result = function(*args, **kwargs)
    except Exception as err:
        from icegrid.kaggle import InputError

        return {"_error": error_line(err), "_bad_input": isinstance(err, InputError),
                "_traceback": traceback.format_exc(), "_worker": worker.address}
    out = dict(result) if isinstance(result, dict) else {"result": result}
    out["_compute_s"] = time.perf_counter() - start
    out["_worker"] = worker.address
    return out


def future_exception(future):
    try:
        return future.exception(timeout=10)
    except Exception as err:  # cancelled futures raise instead of returning their exception
        return err


def is_lost_worker(status: str, exc) -> bool:
    """A worker (or the whole pool) vanished under the task, as opposed to the shard function failing."""
    from distributed.scheduler import KilledWorker

    if status == "cancelled" or isinstance(exc, KilledWorker):
        return True
    return type(exc).__name__ in ("CancelledError", "CommClosedError", "FutureCancelledError")
