"""Preprocessing: one Kaggle batch file -> one published shard of the event store, mapped over Dask.

``preprocess_shard`` is pure and idempotent (an already published shard is skipped; a rerun writes the same
bytes), so the store itself is the completion record: a killed run simply runs again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from icegrid.geometry import Geometry, icecube86, read_geometry_csv
from icegrid.kaggle import InputError, batch_id_of, find_splits, list_batches, meta_path_for, read_batch
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


@dataclass
class PreprocessReport:
    done: list[dict] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_events(self) -> int:
        return sum(d["n_events"] for d in self.done if not d["skipped"])


def run_preprocess(input_dir: Path, store_path: Path, client, progress: bool = True) -> PreprocessReport:
    """Create the store if needed and map ``preprocess_shard`` over every batch with a Dask client."""
    from distributed import as_completed
    from tqdm import tqdm

    batches = discover_batches(input_dir)
    store = EventStore.create(store_path, find_geometry(input_dir))
    # No writer runs yet: leftovers of a killed run can go.
    store.clean_staging()
    todo = [b for b in batches if not store.has_shard(shard_name_for(b))]
    report = PreprocessReport(done=[{"shard": shard_name_for(b), "n_events": 0, "n_pulses": 0, "skipped": True}
                                    for b in batches if b not in todo])
    futures = client.map(preprocess_shard, [str(b) for b in todo], store_path=str(store_path),
                         key=[f"preprocess-{shard_name_for(b)}" for b in todo], pure=False)
    source_of = {f.key: b for f, b in zip(futures, todo)}
    started = time.perf_counter()
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), unit="shard", desc="preprocess",
               disable=not progress, dynamic_ncols=True)
    with bar:
        for future in as_completed(futures):
            try:
                result = future.result()
            except InputError as err:
                report.failed.append((str(source_of[future.key]), str(err)))
            else:
                report.done.append(result)
            bar.update(1)
            rate = report.n_events / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} events/s")
    return report
