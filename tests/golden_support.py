"""Access to ``../shared/goldens/`` (the authors' own forward passes) for the published-model tests.

The goldens are found at ``$ICEGRID_GOLDENS`` or ``<repo>/../shared/goldens``. Locally a missing
folder skips the tests that need it; in CI (``CI`` set) it fails them, so they can never pass by not
running. Events go through icegrid's own pipeline: Kaggle files -> ``preprocess_shard`` -> a store
shard, exactly as a user's data would.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


def goldens_dir() -> Path:
    path = Path(os.environ.get("ICEGRID_GOLDENS", REPO.parent / "shared" / "goldens"))
    if not (path / "README.md").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path}: golden data missing (set ICEGRID_GOLDENS)")
        pytest.skip(f"{path}: golden data not present")
    return path


def family_dir(family: str) -> Path:
    """``family`` is a goldens folder name: dynedge_graphnet_v1, edgeconv_transformer_1st, icemix_2nd, gpt_3rd."""
    return goldens_dir() / family


def golden_store(family: str, tmp_path: Path) -> tuple[Path, str]:
    """The family's golden events preprocessed by icegrid into a store at ``tmp_path``; (store, shard)."""
    from icegrid.preprocess import discover_batches, find_geometry, preprocess_shard
    from icegrid.store import EventStore

    events = family_dir(family) / "events"
    store = tmp_path / "golden.zarr"
    EventStore.create(store, find_geometry(events))
    (batch,) = discover_batches(events)
    shard = preprocess_shard(batch, store)["shard"]
    return store, shard


def golden_store_shard(family: str, tmp_path: Path):
    """(store path, shard, ShardData, Geometry, event_id) of the family's golden events, via icegrid's preprocessing."""
    from icegrid.store import EventStore

    store_path, shard = golden_store(family, tmp_path)
    store = EventStore(store_path)
    data = store.read_shard(shard, truth=False)
    event_id = store.read_event_arrays(shard, ("event_id",))["event_id"]
    return store_path, shard, data, store.geometry(), event_id


def golden_shard(family: str, tmp_path: Path):
    """(ShardData, Geometry, event_id) of the family's golden events, read back from an icegrid store."""
    return golden_store_shard(family, tmp_path)[2:]


def golden_shard_fixture(family: str, folder: str):
    """A module-scoped ``golden`` fixture: :func:`golden_shard` of ``family``, with torch on one thread
    (the goldens were made single-threaded; more threads change float summation order)."""
    @pytest.fixture(scope="module")
    def golden(tmp_path_factory):
        import torch

        torch.set_num_threads(1)
        return golden_shard(family, tmp_path_factory.mktemp(folder))
    return golden


def features(family: str) -> dict[str, np.ndarray]:
    with np.load(family_dir(family) / "features.npz") as npz:
        return {k: npz[k] for k in npz.files}


def expected(family: str, relpath: str) -> dict[str, np.ndarray]:
    """A golden ``expected*.parquet`` as column -> numpy array (rows sorted by event_id)."""
    table = pq.read_table(family_dir(family) / relpath)
    return {name: table[name].to_numpy() for name in table.column_names}


def align(event_id: np.ndarray, golden_event_id: np.ndarray) -> np.ndarray:
    """Indices into ``event_id`` (icegrid's order) that give ``golden_event_id``'s order."""
    order = np.argsort(event_id)
    position = order[np.searchsorted(event_id, golden_event_id, sorter=order)]
    assert np.array_equal(event_id[position], golden_event_id), "golden events missing from the store"
    return position


def manifest(path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """A ``manifest_*.json``: every state-dict key with its shape, and the authors' parameter count."""
    import json

    data = json.loads(Path(path).read_text())
    return {e["key"]: tuple(e["shape"]) for e in data["state_dict"]}, data["n_parameters"]


def meta_state_dict(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> dict:
    """A state dict of meta tensors with exactly these keys and shapes: a published configuration's
    layout without allocating its (up to hundreds of millions of) parameters."""
    import torch

    return {f"{prefix}{k}": torch.empty(s, device="meta") for k, s in shapes.items()}
