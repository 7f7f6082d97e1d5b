"""`icegrid verify`: a damaged chunk anywhere in a real store is named in one line; `--repair` and a rerun
give back the untouched store byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from icegrid.cli import main
from icegrid.inference import infer_shard
from icegrid.preprocess import preprocess_shard
from icegrid.store import EventStore
from icegrid.verify import offsets_problem

SHARD = "train_batch_000001"
CHUNK = "pulses/time/c/0"
PREDICTION_CHUNK = "predictions/linefit/azimuth/c/0"


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"delete": Path.unlink, "truncate": lambda p: p.write_bytes(p.read_bytes()[:-100]), "flip": _flip}


@pytest.fixture(scope="module")
def reference(small_store, tmp_path_factory) -> Path:
    """The small store with linefit predictions on every shard, never damaged."""
    path = tmp_path_factory.mktemp("verify") / "events.zarr"
    shutil.copytree(small_store, path)
    for shard in EventStore(path).shards():
        infer_shard(path, shard, "linefit")
    return path


@pytest.fixture
def store(reference, tmp_path) -> Path:
    shutil.copytree(reference, tmp_path / "events.zarr")
    return tmp_path / "events.zarr"


def _verify(store: Path, *flags: str):
    return CliRunner().invoke(main, ["verify", str(store), *flags])


def test_a_clean_store_verifies(store):
    run = _verify(store)
    assert run.exit_code == 0, run.output
    assert run.stdout.strip().splitlines() == ["0 shard(s) to rebuild: none"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_chunk_is_named_and_repaired(store, reference, small_dataset, damage):
    DAMAGE[damage](store / "shards" / SHARD / CHUNK)
    run = _verify(store)
    assert run.exit_code == 1, run.output
    problem, last = run.stdout.strip().splitlines()
    assert problem.startswith(f"{SHARD}: ") and "pulses/time" in problem and "c/0" in problem, problem
    assert last == f"1 shard(s) to rebuild: {SHARD}"

    repaired = _verify(store, "--repair")
    assert repaired.exit_code == 1 and "unpublished 1 group(s)" in repaired.stdout, repaired.output
    assert not (store / "shards" / SHARD).exists() and not (store / ".staging").exists()
    assert _verify(store).exit_code == 0
    for batch in sorted((small_dataset / "train").glob("batch_*.parquet")):
        preprocess_shard(batch, store)            # redoes only the unpublished shard
    for shard in EventStore(store).shards():
        infer_shard(store, shard, "linefit")
    assert _tree(store) == _tree(reference)


def test_damaged_predictions_are_unpublished_alone(store, reference):
    _flip(store / "shards" / SHARD / PREDICTION_CHUNK)
    run = _verify(store)
    assert run.exit_code == 1, run.output
    problem, last = run.stdout.strip().splitlines()
    assert problem.startswith(f"{SHARD}/predictions/linefit: array 'azimuth' chunk c/0"), problem
    assert last == f"1 shard(s) to rebuild: {SHARD}/predictions/linefit"
    assert _verify(store, "--repair").exit_code == 1
    assert (store / "shards" / SHARD / "pulses").is_dir()
    assert not (store / "shards" / SHARD / "predictions" / "linefit").exists()
    infer_shard(store, SHARD, "linefit")
    assert _tree(store) == _tree(reference)


def test_inconsistent_offsets_are_named():
    offset = np.array([0, 3, 5, 9])
    attrs = {"n_events": 3, "n_pulses": 9}
    good = {"events/offset": offset, "events/n_pulses": np.diff(offset), "pulses/time": np.zeros(9)}
    assert offsets_problem(good, attrs) is None
    assert "monotone" in offsets_problem({**good, "events/offset": np.array([0, 5, 3, 9])}, attrs)
    assert "ends at 9" in offsets_problem(good, {**attrs, "n_pulses": 10})
    assert "disagrees" in offsets_problem({**good, "events/n_pulses": np.array([3, 2, 3])}, attrs)
    assert "has 8 pulses" in offsets_problem({**good, "pulses/time": np.zeros(8)}, attrs)
    assert "has 2 entries" in offsets_problem({**good, "events/event_id": np.arange(2)}, attrs)
    padded = {"n_events": 3, "n_pulses": 9, "chunk_events": 2, "chunk_pulses": 5}   # chunk 1 starts at stored 5
    chunked = {**good, "events/pulse_start": np.array([0, 3, 5]), "pulses/time": np.zeros(9)}
    assert offsets_problem(chunked, padded) is None
    assert "pulse_start disagrees" in offsets_problem({**chunked, "events/pulse_start": np.array([0, 3, 6])}, padded)


def test_a_store_of_padded_event_chunks(small_dataset, tmp_path):
    """128-event chunks (padded pulse chunks, pulse_start): clean verifies; a later chunk is named."""
    from icegrid.preprocess import find_geometry

    path = tmp_path / "chunked.zarr"
    EventStore.create(path, find_geometry(small_dataset), chunk_events=128)
    preprocess_shard(small_dataset / "train" / "batch_1.parquet", path)
    assert _verify(path).exit_code == 0
    _flip(path / "shards" / SHARD / "pulses" / "charge" / "c" / "2")
    run = _verify(path)
    assert run.exit_code == 1 and f"{SHARD}: array 'pulses/charge' chunk c/2" in run.stdout, run.output
