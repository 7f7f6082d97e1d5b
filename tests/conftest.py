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


NETWORKS = ("dynedge", "edgeconv_transformer", "icemix", "gpt_boost")


@pytest.fixture(scope="session")
def untrained_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Freshly initialised (seed 0) small networks saved as real checkpoints: fast, random weights."""
    import torch

    from icegrid.models import registry

    folder = tmp_path_factory.mktemp("untrained")
    paths = {}
    for name in NETWORKS:
        torch.manual_seed(0)
        paths[name] = folder / f"{name}.pt"
        registry.save_checkpoint(paths[name], registry.checkpoint_payload(registry.build(name, "small"),
                                                                          {"note": "untrained"}))
    return paths


def traced_peak(run) -> int:
    """Peak bytes numpy (and every Python allocation) held while ``run()`` ran, all threads."""
    import tracemalloc

    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def one_line_error(result, *fragments) -> None:
    """A click CliRunner result that failed with exit 2 and exactly one `icegrid: error:` line holding
    every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icegrid: error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
