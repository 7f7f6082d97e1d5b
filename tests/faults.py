"""Fault-test windows, from the tests alone: icegrid's campaign schema and its workers have no testing hook.

:func:`hold_preload` writes a `dask worker --preload` file that makes every shard task wait a while
before its shard function runs, so a test can kill the worker running it mid-shard. Batch-job workers get
it through a site dask config (``jobqueue.yaml`` worker-extra-args, :func:`hold_dask_config`), glidein
workers through `icegrid worker --preload FILE`.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

_PRELOAD = '''"""Written by tests/faults.py: every shard task waits {seconds} s before its shard function runs.

The manager's tasks name ``icegrid.grid.task.run_shard_task`` by reference, so the worker resolves that
name when it unpickles a task and finds this wrapper. Nothing heavy is imported here: a worker restarted
after a kill is back in a second, as an undisturbed one would be."""
import time

import icegrid.grid.task as task


def dask_setup(worker):
    original = task.run_shard_task
    if getattr(original, "icegrid_test_hold", False):
        return

    def held(*args, **kwargs):
        time.sleep({seconds})
        return original(*args, **kwargs)

    held.icegrid_test_hold = True
    task.run_shard_task = held
'''


def hold_preload(folder: Path, seconds: float) -> Path:
    """A preload file (readable by the batch jobs' user) for ``dask worker --preload``."""
    path = Path(folder) / f"hold_{int(seconds * 1000)}ms.py"
    path.write_text(_PRELOAD.format(seconds=seconds))
    os.chmod(path, 0o644)
    return path


def hold_dask_config(folder: Path, seconds: float, systems=("htcondor", "slurm")) -> dict[str, str]:
    """A site dask config in ``folder`` whose batch workers preload the hold; returns the environment
    (DASK_CONFIG) a manager process needs to read it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    preload = hold_preload(folder, seconds)
    config = {"jobqueue": {name: {"worker-extra-args": ["--preload", str(preload)]} for name in systems}}
    (folder / "jobqueue.yaml").write_text(yaml.safe_dump(config))
    return {**os.environ, "DASK_CONFIG": str(folder)}
