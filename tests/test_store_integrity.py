"""Integrity of the store: husks are seen and repaired, damaged chunks are one-line errors, bad ids refused.

Every damage here is done to real files of a real store, the way a killed writer, a racing cleaner, a
bad disk or a hand edit would leave them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from click.testing import CliRunner

from icegrid.cli import main
from icegrid.geometry import icecube86
from icegrid.inference import infer_shard
from icegrid.kaggle import InputError, read_batch
from icegrid.preprocess import discover_batches, preprocess_shard, shard_name_for
from icegrid.store import EventStore, StoreError

SHARD = "train_batch_000001"
CHUNK = "pulses/time/c/0"


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_line(err: BaseException, *parts: str) -> str:
    message = str(err)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


@pytest.fixture
def store(tmp_path, small_store) -> EventStore:
    shutil.copytree(small_store, tmp_path / "events.zarr")
    return EventStore(tmp_path / "events.zarr")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _empty_attrs(path: Path) -> None:
    """What zarr leaves when it re-creates a group whose zarr.json a cleaner removed (issue 11)."""
    path.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))


HUSKS = {
    "deleted chunk": lambda shard: (shard / CHUNK).unlink(),
    "truncated chunk": lambda shard: _truncate(shard / CHUNK),
    "re-created group, no attributes": lambda shard: _empty_attrs(shard / "zarr.json"),
    "corrupt zarr.json": lambda shard: (shard / "zarr.json").write_text('{"zarr_format": 3, "node_'),
    "no zarr.json, half the files": lambda shard: [(shard / "zarr.json").unlink(),
                                                   shutil.rmtree(shard / "pulses")],
}


@pytest.mark.parametrize("damage", list(HUSKS))
def test_a_husk_is_not_published_and_the_next_run_repairs_it(store, small_dataset, small_store, damage):
    HUSKS[damage](store.path / "shards" / SHARD)
    assert not store.has_shard(SHARD)
    assert SHARD not in store.shards() and SHARD in store.damaged_shards()
    summary = store.summary()                                    # no KeyError: 'n_events'
    assert summary["shards"] == 2 and summary["events"] == 800 and summary["damaged"] == [SHARD]
    with pytest.raises(StoreError) as info:
        store.read_shard(SHARD)
    _one_line(info.value, SHARD, "damaged")
    result = preprocess_shard(small_dataset / "train" / "batch_1.parquet", store.path)
    assert not result["skipped"]
    assert _tree(store.path / "shards" / SHARD) == _tree(small_store / "shards" / SHARD)
    assert not (store.path / ".staging").exists()


def _cli(*args: str):
    """The real command line, in this process (the imports are paid once)."""
    return CliRunner().invoke(main, list(args))


def test_icegrid_info_on_a_husk_reports_the_complete_shards(store):
    _empty_attrs(store.path / "shards" / SHARD / "zarr.json")
    info = _cli("info", str(store.path))
    assert info.exit_code == 0, info.output
    assert "2 shard(s), 800 events" in info.stdout


def test_a_predictions_husk_is_rewritten(store):
    angles = np.linspace(0.2, 2.0, 400)
    assert store.write_predictions(SHARD, "husk", angles, angles)
    group = store.path / "shards" / SHARD / "predictions" / "husk"
    reference = _tree(group)
    (group / "zarr.json").unlink()                 # the group the issue saw: write_predictions said False forever
    assert not store.has_predictions(SHARD, "husk") and "husk" not in store.prediction_models(SHARD)
    assert store.write_predictions(SHARD, "husk", angles, angles)
    assert _tree(group) == reference
    assert not store.write_predictions(SHARD, "husk", angles, angles)   # complete now: kept


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_chunk_is_a_one_line_error_and_no_prediction(store, damage):
    chunk = store.path / "shards" / SHARD / CHUNK
    {"flip": _flip, "truncate": _truncate, "delete": Path.unlink}[damage](chunk)
    with pytest.raises(StoreError) as info:
        store.read_shard(SHARD)
    message = _one_line(info.value, SHARD, CHUNK if damage != "flip" else "pulses/time' chunk c/0")
    if damage == "flip":
        assert "checksum" in message
    with pytest.raises(StoreError):
        infer_shard(store.path, SHARD, "linefit")
    assert not (store.path / "shards" / SHARD / "predictions" / "linefit").exists()


def test_infer_cli_on_a_flipped_byte_is_one_line(store):
    _flip(store.path / "shards" / SHARD / CHUNK)
    run = _cli("infer", "--store", str(store.path), "--models", "linefit", "--shard", SHARD)
    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and SHARD in lines[0] and "chunk c/0" in lines[0], run.stderr


def _strip_to_version_1(path: Path) -> None:
    """Make a store look like one written before markers: no icegrid_complete, store version 1."""
    for meta in path.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        doc.get("attributes", {}).pop("icegrid_complete", None)
        if meta.parent == path:
            doc["attributes"]["icegrid_store_version"] = 1
        meta.write_text(json.dumps(doc))


def test_a_version_1_store_stays_readable_and_writable(store, small_dataset):
    _strip_to_version_1(store.path)
    old = EventStore(store.path)
    assert old.version == 1 and len(old.shards()) == 3
    assert old.read_shard(SHARD).n_events == 400
    assert old.write_predictions(SHARD, "after-upgrade", np.zeros(400), np.ones(400))
    assert old.has_predictions(SHARD, "after-upgrade")
    _empty_attrs(store.path / "shards" / SHARD / "zarr.json")      # the old husk: no n_events
    assert old.damaged_shards() == {SHARD: "no n_events attribute"}
    assert not preprocess_shard(small_dataset / "train" / "batch_1.parquet", store.path)["skipped"]
    assert old.shards() == sorted(shard_name_for(b) for b in discover_batches(small_dataset))


def test_an_unknown_store_version_is_refused_in_one_line(store):
    meta = store.path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["icegrid_store_version"] = 7
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError) as info:
        EventStore(store.path)
    _one_line(info.value, "store version 7", "reads versions 1, 2")
    meta.write_text('{"zarr_format": 3, "node_type": "gr')
    with pytest.raises(StoreError) as info:
        EventStore(store.path)
    _one_line(info.value, "unreadable store metadata zarr.json")


def test_store_path_that_is_another_directory_is_one_line(tmp_path, small_dataset):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    run = _cli("preprocess", "--input", str(small_dataset), "--store", str(other), "--no-progress")
    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "exists and is not an icegrid event store" in lines[0], run.stderr
    assert sorted(p.name for p in other.iterdir()) == ["cat.jpg"]


WRITE_LIMITED = r"""
import resource, signal, sys
from icegrid.kaggle import read_batch
from icegrid.store import EventStore, StoreError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit fails with EFBIG, like ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    EventStore(sys.argv[1]).write_shard("full", read_batch(sys.argv[2]))
except StoreError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""


def test_a_failed_write_is_one_line_and_leaves_nothing(store, small_dataset):
    run = subprocess.run([sys.executable, "-c", WRITE_LIMITED, str(store.path),
                          str(small_dataset / "train" / "batch_1.parquet")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "cannot write shard 'full'" in run.stderr
    assert not (store.path / "shards" / "full").exists() and not (store.path / ".staging").exists()


def test_a_full_disk_is_one_line_and_leaves_no_empty_file(tmp_path, small_dataset):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        store = EventStore.create(disk / "events.zarr", icecube86())
        with pytest.raises(StoreError) as info:
            store.write_shard("full", read_batch(small_dataset / "train" / "batch_1.parquet"))
        _one_line(info.value, "cannot write shard 'full'", "No space left on device")
        assert not (store.path / "shards" / "full").exists() and not (store.path / ".staging").exists()
        assert [p for p in store.path.rglob("*") if p.is_file() and p.stat().st_size == 0] == []
        assert EventStore(store.path).shards() == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def read_only_store(store):
    """The store on a read-only path: a read-only bind mount as root (root ignores modes), else chmod."""
    if os.geteuid() != 0:
        for path in [store.path, *store.path.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        yield store
        for path in [store.path, *store.path.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
        return
    mount = store.path.parent / "ro.zarr"
    mount.mkdir()
    if subprocess.run(["mount", "--bind", str(store.path), str(mount)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], check=True, capture_output=True)
        yield EventStore(mount)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_infer_on_a_read_only_store_is_one_line(read_only_store):
    with pytest.raises(StoreError) as info:
        infer_shard(read_only_store.path, SHARD, "linefit")
    _one_line(info.value, "cannot write predictions of 'linefit'", SHARD)


# ---- input ids ------------------------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path, small_dataset) -> Path:
    shutil.copytree(small_dataset, tmp_path / "data")
    return tmp_path / "data"


def _rewrite(path: Path, name: str, change) -> None:
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index(name), name, change(table[name])), path)


def _fresh_store(tmp_path, small_store) -> EventStore:
    return EventStore.create(tmp_path / "fresh.zarr", EventStore(small_store).geometry())


@pytest.mark.parametrize("file_name, column", [("batch_1.parquet", "time"), ("batch_1.parquet", "event_id"),
                                               ("train_meta.parquet", "event_id")])
def test_uint64_beyond_int64_is_refused(dataset, tmp_path, small_store, file_name, column):
    path = dataset / ("train" if file_name.startswith("batch") else "") / file_name
    big = np.uint64(2**63 + 5)
    _rewrite(path, column, lambda col: pa.array(col.to_numpy().astype(np.uint64) + big))
    with pytest.raises(InputError) as info:
        preprocess_shard(dataset / "train" / "batch_1.parquet", _fresh_store(tmp_path, small_store).path)
    _one_line(info.value, file_name, f"column '{column}' is uint64", "beyond the int64 range")


def test_uint64_within_int64_is_read_exactly(dataset, tmp_path, small_store):
    _rewrite(dataset / "train" / "batch_1.parquet", "time", lambda col: pc.cast(col, pa.uint64()))
    store = _fresh_store(tmp_path, small_store)
    preprocess_shard(dataset / "train" / "batch_1.parquet", store.path)
    assert np.array_equal(store.read_shard(SHARD).pulses["time"],
                          EventStore(small_store).read_shard(SHARD).pulses["time"])


def test_duplicate_event_id_within_a_batch(dataset, tmp_path, small_store):
    def duplicate(col):
        ids = col.to_numpy().copy()
        ids[1] = ids[0]
        return pa.array(ids)

    _rewrite(dataset / "train_meta.parquet", "event_id", duplicate)
    with pytest.raises(InputError) as info:
        preprocess_shard(dataset / "train" / "batch_1.parquet", _fresh_store(tmp_path, small_store).path)
    _one_line(info.value, "train_meta.parquet", "appears more than once in batch_id 1")


def test_duplicate_event_id_across_batches_of_a_split(dataset, tmp_path, small_store):
    meta = pq.read_table(dataset / "train_meta.parquet").to_pandas()
    taken = int(meta.loc[meta.batch_id == 1, "event_id"].iloc[0])
    victim = int(meta.loc[meta.batch_id == 2, "event_id"].iloc[0])
    _rewrite(dataset / "train_meta.parquet", "event_id", lambda col: pa.array(
        np.where(col.to_numpy() == victim, taken, col.to_numpy())))
    _rewrite(dataset / "train" / "batch_2.parquet", "event_id", lambda col: pa.array(
        np.where(col.to_numpy() == victim, taken, col.to_numpy())))
    store = _fresh_store(tmp_path, small_store)
    preprocess_shard(dataset / "train" / "batch_1.parquet", store.path)
    with pytest.raises(InputError) as info:
        preprocess_shard(dataset / "train" / "batch_2.parquet", store.path)
    _one_line(info.value, "batch_2.parquet", f"event_id {taken} is already in shard '{SHARD}'")
    assert store.shards() == [SHARD]
