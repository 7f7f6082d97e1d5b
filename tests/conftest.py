"""Shared fixtures: small simulated datasets in the Kaggle layout and stores preprocessed from them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# A developer's own ~/.config/icegrid must not change what the tests see: an empty user config folder
# (tests of the override set their own).
os.environ["ICEGRID_CONFIG"] = tempfile.mkdtemp(prefix="icegrid-test-config-")
os.chmod(os.environ["ICEGRID_CONFIG"], 0o755)      # pool tests run icegrid as another user


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """3 batches x 400 events of simulated data (Kaggle layout) under a session-wide folder."""
    from icegrid.simulate import write_dataset

    root = tmp_path_factory.mktemp("kaggle")
    write_dataset(root, batches=3, events_per_batch=400, seed=7)
    return root


@pytest.fixture(scope="session")
def small_store(small_dataset, tmp_path_factory) -> Path:
    """The small dataset preprocessed into an event store (serially, no cluster)."""
    from icegrid.preprocess import discover_batches, find_geometry, preprocess_shard
    from icegrid.store import EventStore

    path = tmp_path_factory.mktemp("store") / "events.zarr"
    EventStore.create(path, find_geometry(small_dataset))
    for batch in discover_batches(small_dataset):
        preprocess_shard(batch, path)
    return path
