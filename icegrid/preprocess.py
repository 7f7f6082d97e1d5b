"""Preprocessing: one Kaggle batch file -> one published shard of the event store.

``preprocess_shard`` is pure and idempotent (an already published shard is skipped; a rerun writes the same
bytes; a damaged one is rewritten), so the store itself is the completion record: a killed run simply runs
again. The campaign manager (``icegrid.campaign``) maps it over the batches, for `icegrid preprocess` and
`icegrid reprocess` alike. Event ids must be unique within a batch (checked by the reader) and across the
batches of a split (checked here, against the store).

The batch file is streamed (``icegrid.kaggle_stream``): row groups are checked and regrouped into the
store's event chunks, each written as it fills, so a worker holds one chunk of pulses, never the shard.
Only the meta rows of the batch are read: the batch_id filter of the split's meta file, or the row range
a planner got from :func:`icegrid.kaggle_meta.meta_row_ranges` (one read per split).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from icegrid.geometry import Geometry, icecube86, read_geometry_csv
from icegrid.integrity import group_attrs
from icegrid.kaggle import InputError, batch_id_of, find_splits, list_batches, meta_path_for, read_meta
from icegrid.kaggle_stream import PulseFile
from icegrid.store import EventStore


def shard_name_for(batch_path: Path) -> str:
    """``<root>/train/batch_12.parquet`` -> ``train_batch_000012`` (sorts in batch order)."""
    batch_path = Path(batch_path)
    return f"{batch_path.parent.name}_batch_{batch_id_of(batch_path):06d}"


def preprocess_shard(batch_path: str | Path, store_path: str | Path, meta_rows: tuple[int, int] | None = None) -> dict:
    """Validate one batch file and publish it as a shard; skip it if it is already published.

    ``meta_rows``: the batch's row range in its split's meta file (``meta_row_ranges``), so that only
    those rows are read; by default the meta file is filtered on the batch_id.
    """
    batch_path = Path(batch_path)
    store = EventStore(store_path)
    name = shard_name_for(batch_path)
    started = time.perf_counter()
    if store.has_shard(name):
        attrs = store.shard_attrs(name)
        return {"shard": name, "n_events": attrs["n_events"], "n_pulses": attrs["n_pulses"],
                "skipped": True, "seconds": 0.0}
    pulses = PulseFile(batch_path)
    meta_path = meta_path_for(batch_path)
    meta = read_meta(meta_path, batch_path, pulses.n_rows, rows=meta_rows)
    check_new_event_ids(store, name, batch_path, meta.event_id)
    n_sensors = store.n_sensors()
    store.write_events(name, meta, lambda plan: pulses.chunks(plan, meta, meta_path, n_sensors),
                       attrs={"split": batch_path.parent.name})
    return {"shard": name, "n_events": meta.n_events, "n_pulses": pulses.n_rows,
            "skipped": False, "seconds": time.perf_counter() - started}


_RANGES: dict[str, tuple[tuple[int, int], str | None, list[int] | None]] = {}


def _event_id_ranges(store: EventStore, split: str) -> dict[str, list[int] | None]:
    """``event_id_range`` of every shard directory of ``split``, read from its zarr.json alone (cheap
    enough to compare each new batch with all others); None for shards written before ranges existed.
    Each document is parsed once per process and version (inode, mtime): a published group's never
    changes, so the next batch of a 2,000-shard split costs 2,000 stats, not 2,000 JSON parses."""
    ranges = {}
    for document in sorted((store.path / "shards").glob("*/zarr.json")):
        try:
            stat = document.stat()
            version = (stat.st_ino, stat.st_mtime_ns)
            cached = _RANGES.get(str(document))
            if cached is None or cached[0] != version:
                attrs = group_attrs(document.parent)
                cached = _RANGES[str(document)] = (version, attrs.get("split"), attrs.get("event_id_range"))
        except (OSError, ValueError):  # a husk: it holds no events anyone reads
            continue
        if cached[1] == split:
            ranges[document.parent.name] = cached[2]
    return ranges


def check_new_event_ids(store: EventStore, name: str, batch_path: Path, event_id: np.ndarray,
                        split: str | None = None) -> None:
    """Refuse a batch whose event_ids are already in another shard of the same split of the store.

    Only shards whose ``event_id_range`` overlaps the batch's are read (Kaggle and simulated batches
    have disjoint ranges, so normally none is). ``split``: by default the batch's folder name. Two overlapping batches written at the very same time
    are not caught here; shards written before ranges were recorded are not compared.
    """
    if event_id.size == 0:
        return
    low, high = int(event_id.min()), int(event_id.max())
    split = Path(batch_path).parent.name if split is None else split
    for other, bounds in _event_id_ranges(store, split).items():
        if other == name or bounds is None or bounds[1] < low or bounds[0] > high or not store.has_shard(other):
            continue
        common = np.intersect1d(store.read_event_arrays(other, ("event_id",))["event_id"], event_id)
        if common.size:
            source = store.shard_attrs(other).get("source", "?")
            raise InputError(f"{batch_path}: event_id {int(common[0])} is already in shard '{other}' "
                             f"(from {source}) of split '{split}'")


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
