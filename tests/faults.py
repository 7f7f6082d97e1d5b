"""Fault-test windows, from the tests alone: icegrid's campaign schema and its workers have no testing hook.

:func:`hold_preload` writes a `dask worker --preload` file that makes every shard task wait a while
before its shard function runs, so a test can kill the worker running it mid-shard. Batch-job workers get
it through a site dask config (``jobqueue.yaml`` worker-extra-args, :func:`hold_dask_config`), glidein
workers through `icegrid worker --preload FILE`. :func:`liveness_preload` gives local workers (through
dask's ``distributed.worker.preload`` setting) files to be frozen, killed and refused a restart by.
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


_LIVENESS_PRELOAD = '''"""Written by tests/faults.py: liveness fault windows, driven by files in {folder!r}.

* every worker process writes ``workers/<pid>`` when it starts;
* a worker process dies as it starts while ``doomed`` exists, and as many times as ``fail-starts``
  says (the count goes down by one each time);
* every preprocess shard writes ``running/<pid>`` and waits {seconds} s *after* its attempt was
  announced (the shard counts as started), so a test can freeze or kill the worker mid-shard."""
import os
import time
from pathlib import Path

FOLDER = Path({folder!r})


def dask_setup(worker):
    # A process that dies while it starts (distributed only logs a preload that raises).
    if (FOLDER / "doomed").exists():
        os._exit(3)
    budget = FOLDER / "fail-starts"
    if budget.exists() and int(budget.read_text() or 0) > 0:
        budget.write_text(str(int(budget.read_text()) - 1))
        os._exit(3)
    (FOLDER / "workers").mkdir(exist_ok=True)
    (FOLDER / "workers" / str(os.getpid())).touch()
    import icegrid.preprocess as pre

    original = pre.preprocess_shard
    if getattr(original, "icegrid_test_hold", False):
        return

    def held(*args, **kwargs):
        (FOLDER / "running").mkdir(exist_ok=True)
        marker = FOLDER / "running" / str(os.getpid())
        marker.touch()
        time.sleep({seconds})
        try:
            return original(*args, **kwargs)
        finally:
            marker.unlink(missing_ok=True)

    held.icegrid_test_hold = True
    pre.preprocess_shard = held
'''


def liveness_preload(folder: Path, seconds: float) -> dict[str, str]:
    """A worker preload for the liveness tests (see the template above); returns the environment that
    makes a campaign's local workers load it (dask's own ``distributed.worker.preload`` setting)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "liveness_preload.py"
    path.write_text(_LIVENESS_PRELOAD.format(folder=str(folder), seconds=seconds))
    return {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": f"['{path}']"}


def pids(folder: Path) -> set[int]:
    """The pids a liveness preload wrote into ``folder`` (a test's window: workers/ or running/)."""
    folder = Path(folder)
    return {int(p.name) for p in folder.iterdir()} if folder.is_dir() else set()


def liveness_dask_config(folder: Path, seconds: float, systems=("htcondor", "slurm")) -> dict[str, str]:
    """:func:`liveness_preload` for batch-job workers: a site dask config in ``folder`` whose jobs'
    workers preload it (``worker-extra-args``); returns the manager's environment (DASK_CONFIG). The
    folder must be writable by the jobs' user."""
    folder = Path(folder)
    liveness_preload(folder, seconds)
    preload = folder / "liveness_preload.py"
    config = {"jobqueue": {name: {"worker-extra-args": ["--preload", str(preload)]} for name in systems}}
    (folder / "jobqueue.yaml").write_text(yaml.safe_dump(config))
    return {**os.environ, "DASK_CONFIG": str(folder)}


def batch_job_of(pid: int) -> str:
    """The batch job a process runs in, from its environment: SLURM's job id, or HTCondor's
    ClusterId.ProcId from the job ad in its sandbox (read as root or as the jobs' user)."""
    items = Path(f"/proc/{pid}/environ").read_text().split("\0")
    environ = dict(item.split("=", 1) for item in items if "=" in item)
    if "SLURM_JOB_ID" in environ:
        return environ["SLURM_JOB_ID"]
    lines = Path(environ["_CONDOR_JOB_AD"]).read_text().splitlines()
    ad = dict(line.split(" = ", 1) for line in lines if " = " in line)
    return f"{ad['ClusterId'].strip()}.{ad['ProcId'].strip()}"
