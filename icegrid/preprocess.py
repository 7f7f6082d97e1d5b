"""Preprocessing: one Kaggle batch file -> one published shard of the event store.

``preprocess_shard`` is pure and idempotent (an already published shard is skipped; a rerun writes the same
bytes), so the store itself is the completion record: a killed run simply runs again. The campaign manager
(``icegrid.campaign``) maps it over the batches, for `icegrid preprocess` and `icegrid reprocess` alike.
"""

from __future__ import annotations

import time
from pathlib import Path

from icegrid.geometry import Geometry, icecube86, read_geometry_csv
from icegrid.kaggle import batch_id_of, find_splits, list_batches, meta_path_for, read_batch
from icegrid.store import EventStore


def shard_name_for(batch_path: Path) -> str:
    """``<root>/train/batch_12.parquet`` -> ``train_batch_000012`` (sorts in batch order)."""
    batch_path = Path(batch_path)
    return f"{batch_path.parent.name}_batch_{batch_id_of(batch_path):06d}"


def preprocess_shard(batch_path: str | Path, store_path: str | Path) -> dict:
    """Validate one batch file and publish it as a shard; skip it if it is already published."""
    batch_path = Path(batch_path)
    store = EventStore(store_path)
    name = shard_name_for(batch_path)
    started = time.perf_counter()
    if store.has_shard(name):
        attrs = store.shard_attrs(name)
        return {"shard": name, "n_events": attrs["n_events"], "n_pulses": attrs["n_pulses"],
                "skipped": True, "seconds": 0.0}
    geometry = store.geometry()
    batch = read_batch(batch_path, meta_path_for(batch_path), n_sensors=geometry.n_sensors)
    store.write_shard(name, batch, attrs={"split": batch_path.parent.name})
    return {"shard": name, "n_events": batch.n_events, "n_pulses": int(batch.sensor_id.shape[0]),
            "skipped": False, "seconds": time.perf_counter() - started}


def find_geometry(input_dir: Path) -> Geometry:
    """The input's ``sensor_geometry.csv`` (in the root or beside a split directory), else the built-in one."""
    input_dir = Path(input_dir)
    for candidate in (input_dir / "sensor_geometry.csv", input_dir.parent / "sensor_geometry.csv"):
        if candidate.exists():
            return read_geometry_csv(candidate)
    return icecube86()


def discover_batches(input_dir: Path) -> list[Path]:
    """All batch files of all splits under ``input_dir``, in split then batch order."""
    return [path for split in find_splits(input_dir) for path in list_batches(split)]
