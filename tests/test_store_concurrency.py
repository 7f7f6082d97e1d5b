"""Concurrent writers and cleaners on one store, as real processes: nothing published is ever undone.

The race of issue 11: a cleaner (the end of a campaign) removing staging entries while other writers
rename theirs into ``shards/``. With the store of commit 11c428e every run below leaves husks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from icegrid import staging
from icegrid.kaggle import read_batch
from icegrid.store import EventStore

WRITER = r"""
import sys
import numpy as np
from icegrid.kaggle import read_batch
from icegrid.store import EventStore
store_path, batch_path, n = sys.argv[1:4]
store, batch = EventStore(store_path), read_batch(batch_path)
angles = np.linspace(0.1, 3.0, batch.n_events)
errors = 0
for k in range(int(n)):
    for attempt in range(5):  # retried like a campaign task, so what stays in the store is what counts
        try:
            store.write_shard(f"s{k:03d}", batch)
            store.write_predictions(f"s{k:03d}", "race", angles, angles[::-1])
            break
        except Exception as err:
            errors += 1
            print(f"s{k:03d}: {type(err).__name__}: {str(err)[:150]}", file=sys.stderr)
sys.exit(3 if errors else 0)
"""

CLEANER = r"""
import os, sys
from icegrid.store import EventStore
store = EventStore(sys.argv[1])
while not os.path.exists(sys.argv[2]):
    store.clean_staging()
"""

HOLDER = r"""
import sys, time
from icegrid.staging import Lease
with Lease(sys.argv[1], "held") as entry:
    entry.mkdir()
    (entry / "half-written").write_bytes(b"x")
    print(entry, flush=True)
    time.sleep(600)
"""


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def batch_path(small_dataset) -> Path:
    return small_dataset / "train" / "batch_1.parquet"


@pytest.fixture
def reference(tmp_path, small_store, batch_path) -> dict[str, bytes]:
    """The bytes of the shard (with predictions) written alone, with no other process around."""
    store = EventStore.create(tmp_path / "reference.zarr", EventStore(small_store).geometry())
    batch = read_batch(batch_path)
    angles = np.linspace(0.1, 3.0, batch.n_events)
    store.write_shard("s000", batch)
    store.write_predictions("s000", "race", angles, angles[::-1])
    return _tree(store.path / "shards" / "s000")


@pytest.mark.timeout(120)
def test_two_writers_and_a_cleaner_leave_every_shard_complete(tmp_path, small_store, batch_path, reference):
    """Two writer processes publish the same 12 shards (+ predictions) while a third cleans in a loop."""
    n = 12
    store = EventStore.create(tmp_path / "race.zarr", EventStore(small_store).geometry())
    stop = tmp_path / "stop"
    cleaner = subprocess.Popen([sys.executable, "-c", CLEANER, str(store.path), str(stop)])
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(store.path), str(batch_path), str(n)],
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [w.communicate(timeout=100)[1] for w in writers]
    stop.touch()
    cleaner.wait(timeout=30)
    assert EventStore(store.path).shards() == [f"s{k:03d}" for k in range(n)]
    for k in range(n):
        assert _tree(store.path / "shards" / f"s{k:03d}") == reference, f"shard s{k:03d} differs from the reference"
    assert [w.returncode for w in writers] == [0, 0], errors   # and no writer ever saw an error
    assert EventStore(store.path).clean_staging() == 0
    assert not (store.path / ".staging").exists()


@pytest.mark.timeout(60)
def test_a_live_writers_entry_survives_cleaning_and_a_dead_ones_goes(tmp_path):
    root = tmp_path / ".staging"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        entry = Path(holder.stdout.readline().strip())
        assert staging.clean(root) == 0
        assert (entry / "half-written").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert staging.clean(root) == 1          # the kernel dropped the dead writer's flock
    assert not root.exists()


def _foreign_entry(root: Path, host: str, age_s: float) -> Path:
    """A lease + entry as a writer on another host leaves them (its lock is not visible from here)."""
    root.mkdir(exist_ok=True)
    entry = root / f"train_batch_000001+{host}+4242+0123456789ab"
    (entry / "events").mkdir(parents=True)
    lease = Path(f"{entry}{staging.LEASE}")
    lease.write_text("{}")
    then = time.time() - age_s
    os.utime(lease, (then, then))
    return entry


def test_another_hosts_entry_goes_only_once_its_heartbeat_is_stale(tmp_path):
    root = tmp_path / ".staging"
    fresh = _foreign_entry(root, "node-a.example.org", 10.0)
    stale = _foreign_entry(root, "node-b.example.org", staging.STALE_S + 60)
    assert staging.clean(root) == 1
    assert fresh.exists() and not stale.exists()
    assert not Path(f"{stale}{staging.LEASE}").exists()


def test_leaseless_and_trash_entries(tmp_path):
    root = tmp_path / ".staging"
    young, old = root / "train_batch_000001.123.abc", root / "train_batch_000002.124.abd"
    trash = root / f"x.1234abcd{staging.TRASH}"
    for path in (young, old, trash):
        (path / "c").mkdir(parents=True)
    then = time.time() - staging.LEGACY_STALE_S - 60
    os.utime(old, (then, then))
    assert staging.clean(root) == 2
    assert young.exists() and not old.exists() and not trash.exists()


def test_heartbeat_keeps_a_long_write_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "HEARTBEAT_S", 0.05)
    root = tmp_path / ".staging"
    with staging.Lease(root, "slow") as entry:
        lease = Path(f"{entry}{staging.LEASE}")
        then = time.time() - 3600
        os.utime(lease, (then, then))
        time.sleep(0.3)
        assert time.time() - lease.stat().st_mtime < 60
    assert not root.exists()
