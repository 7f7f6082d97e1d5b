"""Fault-test windows, from the tests alone: icegrid's campaign schema and its workers have no testing hook.

:func:`hold_preload` writes a `dask worker --preload` file that makes every shard function (preprocess
and infer) wait a while first, so a test can kill the worker running it mid-shard. Batch-job workers get
it through a site dask config (``jobqueue.yaml`` worker-extra-args, :func:`hold_dask_config`), glidein
workers through `icegrid worker --preload FILE`.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

_PRELOAD = '''"""Written by tests/faults.py: every shard function waits {seconds} s first."""
import time

import icegrid.inference
import icegrid.preprocess


def _held(function):
    def held(*args, **kwargs):
        time.sleep({seconds})
        return function(*args, **kwargs)
    held.icegrid_test_hold = True
    return held


def dask_setup(worker):
    for module, name in ((icegrid.preprocess, "preprocess_shard"), (icegrid.inference, "infer_shard")):
        if not getattr(getattr(module, name), "icegrid_test_hold", False):
            setattr(module, name, _held(getattr(module, name)))
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
