"""Bad input: a one-line error naming the file and the problem, and no shard published."""

import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from icegrid.geometry import icecube86
from icegrid.kaggle import InputError, KaggleBatch, meta_table, pulses_table
from icegrid.preprocess import preprocess_shard
from icegrid.store import EventStore


@pytest.fixture
def dataset(tmp_path, small_dataset):
    root = tmp_path / "data"
    shutil.copytree(small_dataset, root)
    store = EventStore.create(tmp_path / "events.zarr", icecube86())
    return root, store


def _rewrite_pulses(root, change):
    path = root / "train" / "batch_1.parquet"
    pq.write_table(change(pq.read_table(path)), path)


def _rewrite_meta(root, change):
    path = root / "train_meta.parquet"
    pq.write_table(change(pq.read_table(path)), path)


def _set(table, name, values):
    return table.set_column(table.column_names.index(name), name, values)


def _with_value(name, index, value):
    """A table change: element(s) ``index`` of column ``name`` become ``value`` (or ``value(old)``)."""
    def change(table):
        values = table[name].to_numpy().copy()
        values[index] = value(values[index]) if callable(value) else value
        return _set(table, name, pa.array(values))
    return change


def _expect_error(root, store, pattern, file_name):
    with pytest.raises(InputError) as info:
        preprocess_shard(root / "train" / "batch_1.parquet", store.path)
    message = str(info.value)
    assert "\n" not in message
    assert file_name in message
    assert re.search(pattern, message), message
    assert store.shards() == []
    staging = store.path / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_missing_column(dataset):
    root, store = dataset
    _rewrite_pulses(root, lambda t: t.drop_columns(["charge"]))
    _expect_error(root, store, "missing column 'charge'", "batch_1.parquet")


def test_mistyped_column(dataset):
    root, store = dataset
    _rewrite_pulses(root, lambda t: _set(t, "time", t["time"].cast(pa.string())))
    _expect_error(root, store, "column 'time' has type string, expected int", "batch_1.parquet")


def test_meta_ranges_that_do_not_tile_the_batch(dataset):
    root, store = dataset

    def shift(table):
        last = table["last_pulse_index"].to_numpy().copy()
        last[(table["batch_id"].to_numpy() == 1).nonzero()[0][3]] += 1
        return _set(table, "last_pulse_index", pa.array(last))
    _rewrite_meta(root, shift)
    _expect_error(root, store, "pulse ranges of batch_id 1 do not tile", "train_meta.parquet")


def test_meta_event_ids_that_do_not_match(dataset):
    root, store = dataset

    _rewrite_meta(root, _with_value("event_id", [0, 1], lambda ids: ids[::-1]))
    _expect_error(root, store, "do not match event_id", "train_meta.parquet")


def test_sensor_outside_geometry(dataset):
    root, store = dataset

    _rewrite_pulses(root, _with_value("sensor_id", 17, 5160))
    _expect_error(root, store, "sensor_id 5160 outside the geometry", "batch_1.parquet")


def test_truncated_file(dataset):
    root, store = dataset
    path = root / "train" / "batch_1.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _expect_error(root, store, "not a readable parquet pulse batch file", "batch_1.parquet")


def test_not_a_parquet_file(dataset):
    root, store = dataset
    (root / "train" / "batch_1.parquet").write_text("event_id,sensor_id\n1,2\n")
    _expect_error(root, store, "not a readable parquet pulse batch file", "batch_1.parquet")


def test_empty_batch(dataset):
    root, store = dataset
    _rewrite_pulses(root, lambda t: t.slice(0, 0))
    _expect_error(root, store, "empty batch", "batch_1.parquet")


def test_nan_in_truth(dataset):
    root, store = dataset

    _rewrite_meta(root, _with_value("zenith", 5, np.nan))
    _expect_error(root, store, "column 'zenith' has NaN", "train_meta.parquet")


def test_missing_meta_file(dataset):
    root, store = dataset
    (root / "train_meta.parquet").unlink()
    _expect_error(root, store, "meta file does not exist", "train_meta.parquet")


def test_cli_prints_one_line_error_and_exit_code(dataset, tmp_path):
    import subprocess
    import sys

    root, _ = dataset
    _rewrite_pulses(root, lambda t: t.drop_columns(["auxiliary"]))
    proc = subprocess.run([sys.executable, "-m", "icegrid", "preprocess", "--input", str(root), "--store",
                           str(tmp_path / "cli.zarr"), "--workers", "1"], capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("icegrid: error:")]
    assert len(errors) == 1 and "batch_1.parquet: missing column 'auxiliary'" in errors[0]
    # The other two batches were still processed; the bad one was not published.
    assert EventStore(tmp_path / "cli.zarr").shards() == ["train_batch_000002", "train_batch_000003"]


def test_single_pulse_and_huge_events_pass_through(tmp_path):
    n_pulses = np.array([1, 150_000, 1, 3])
    total = int(n_pulses.sum())
    rng = np.random.default_rng(0)
    batch = KaggleBatch(batch_id=4, source="batch_4.parquet", event_id=np.array([10, 11, 12, 13]),
                        n_pulses=n_pulses, sensor_id=rng.integers(0, 5160, total).astype(np.int16),
                        time=np.sort(rng.integers(6000, 20000, total)), charge=rng.random(total) + 0.1,
                        auxiliary=rng.random(total) < 0.5, azimuth=rng.random(4), zenith=rng.random(4),
                        energy=np.full(4, 1e5), shape=np.array([0, 1, 0, 1], np.int8))
    (tmp_path / "test").mkdir()
    pq.write_table(pulses_table(batch), tmp_path / "test" / "batch_4.parquet")
    # A split without truth, like the Kaggle test split.
    pq.write_table(meta_table(batch).drop_columns(["azimuth", "zenith", "energy", "shape"]),
                   tmp_path / "test_meta.parquet")
    store = EventStore.create(tmp_path / "events.zarr", icecube86())
    result = preprocess_shard(tmp_path / "test" / "batch_4.parquet", store.path)
    assert result["n_events"] == 4 and result["n_pulses"] == total
    data = store.read_shard("test_batch_000004")
    assert data.n_pulses.tolist() == n_pulses.tolist()
    assert np.array_equal(data.pulses["time"], batch.time)
    assert data.truth == {} and data.attrs["has_truth"] is False


# ---- found mid-stream: the batch is read in record batches and written chunk by chunk ----------------
@pytest.fixture
def chunked(tmp_path, small_dataset, monkeypatch):
    """The dataset and a store of 50-event chunks, read 4096 pulses at a time: a problem near the end
    of the file is found after several chunks were written to staging."""
    from icegrid import kaggle_stream

    monkeypatch.setattr(kaggle_stream, "BATCH_ROWS", 4096)
    root = tmp_path / "data"
    shutil.copytree(small_dataset, root)
    return root, EventStore.create(tmp_path / "chunked.zarr", icecube86(), chunk_events=50)


def test_bad_sensor_in_the_last_chunk(chunked):
    root, store = chunked

    _rewrite_pulses(root, _with_value("sensor_id", -2, -3))
    _expect_error(root, store, "sensor_id -3 outside the geometry", "batch_1.parquet")


def test_null_values_late_in_the_file(chunked):
    root, store = chunked

    def null_time(table):
        time = table["time"].to_pylist()
        time[len(time) - 100] = None
        return _set(table, "time", pa.array(time, pa.int64()))
    _rewrite_pulses(root, null_time)
    n_rows = pq.read_metadata(root / "train" / "batch_1.parquet").num_rows
    _expect_error(root, store, f"column 'time' has null values \\(the first at pulse row {n_rows - 100}\\)",
                  "batch_1.parquet")


def test_event_id_mismatch_late_in_the_file(chunked):
    root, store = chunked

    _rewrite_pulses(root, _with_value("event_id", -1, lambda last: last + 1))
    _expect_error(root, store, "do not match event_id in batch_1.parquet", "train_meta.parquet")


def test_non_finite_charge(chunked):
    root, store = chunked

    _rewrite_pulses(root, _with_value("charge", -7, np.inf))
    _expect_error(root, store, "column 'charge' has non-finite values", "batch_1.parquet")


def test_a_meta_row_range_of_another_batch(chunked):
    root, store = chunked
    with pytest.raises(InputError) as info:
        preprocess_shard(root / "train" / "batch_1.parquet", store.path, meta_rows=(400, 800))
    message = str(info.value)
    assert "\n" not in message and "train_meta.parquet: rows 400..799 are not all batch_id 1" in message
    with pytest.raises(InputError) as info:
        preprocess_shard(root / "train" / "batch_1.parquet", store.path, meta_rows=(0, 10**6))
    assert "\n" not in str(info.value) and "are not in the file (1200 rows)" in str(info.value)
    assert store.shards() == []


def _flip_in_data_page(path, column):
    """Flip one byte in the middle of ``column``'s first data page (past its header, inside the page)."""
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(column)
    data = bytearray(path.read_bytes())
    end = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size
    data[(chunk.data_page_offset + end) // 2] ^= 0xFF      # without the checksum this reads silently
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file_name, column", [("batch_1.parquet", 1), ("train_meta.parquet", 3)])
def test_a_damaged_page_is_caught_by_its_checksum(dataset, file_name, column):
    root, store = dataset
    path = root / "train" / file_name if file_name.startswith("batch") else root / file_name
    _flip_in_data_page(path, column)
    _expect_error(root, store, "CRC|checksum", file_name)
