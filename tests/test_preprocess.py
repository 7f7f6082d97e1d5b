"""Preprocessing into the event store: exact round trip, atomic publication, resume after SIGKILL,
memory bounded by a chunk, the meta read by row range."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from conftest import traced_peak
from icegrid import kaggle_stream
from icegrid.kaggle import SHAPES, batch_id_of
from icegrid.kaggle_meta import meta_row_ranges
from icegrid.preprocess import discover_batches, find_geometry, preprocess_shard, shard_name_for
from icegrid.store import EventStore


def test_round_trip_is_exact_for_every_event(small_dataset, small_store):
    store = EventStore(small_store)
    meta = pq.read_table(small_dataset / "train_meta.parquet").to_pydict()
    batches = discover_batches(small_dataset)
    assert store.shards() == [shard_name_for(b) for b in batches]
    for batch_path in batches:
        pulses = pq.read_table(batch_path)
        data = store.read_shard(shard_name_for(batch_path))
        for column in ("sensor_id", "time", "charge", "auxiliary"):
            expected = pulses[column].to_numpy()
            assert data.pulses[column].dtype == expected.dtype
            assert np.array_equal(data.pulses[column], expected)
        # Event i owns pulses offset[i]:offset[i+1], which carry its event_id in the parquet file.
        assert np.array_equal(np.repeat(data.event_id, np.diff(data.offset)), pulses["event_id"].to_numpy())
        rows = np.asarray(meta["batch_id"]) == data.attrs["batch_id"]
        assert np.array_equal(data.event_id, np.asarray(meta["event_id"])[rows])
        for column in ("azimuth", "zenith", "energy"):
            assert np.array_equal(data.truth[column], np.asarray(meta[column])[rows])
        shapes = np.asarray(SHAPES)[data.truth["shape"]]
        assert shapes.tolist() == list(np.asarray(meta["shape"], dtype=object)[rows])


def test_store_is_readable_with_plain_zarr(small_store):
    root = zarr.open_group(small_store, mode="r")
    shard = sorted(root["shards"].group_keys())[0]
    group = root["shards"][shard]
    offset = group["events/offset"][:]
    # 400 events: one event chunk, so the pulse arrays are the batch's pulses, unpadded.
    assert offset[0] == 0 and offset[-1] == group["pulses/time"].shape[0]
    assert np.array_equal(group["events/pulse_start"][:], offset[:-1])
    assert group["events/event_id"].shape[0] == group.attrs["n_events"]
    assert group["pulses/time"].metadata.dimension_names == ("pulse",)
    assert root["geometry/x"].shape == (5160,)
    assert list(root.attrs["shape_codes"]) == ["cascade", "track"]


def test_rerun_skips_published_shards(small_dataset, small_store):
    batch = discover_batches(small_dataset)[0]
    result = preprocess_shard(batch, small_store)
    assert result["skipped"] and result["n_events"] == 400


def test_meta_row_ranges_give_the_same_shard_as_the_batch_id_filter(small_dataset, small_store, tmp_path):
    ranges = meta_row_ranges(small_dataset / "train_meta.parquet")
    assert ranges == {1: (0, 400), 2: (400, 800), 3: (800, 1200)}
    store = EventStore.create(tmp_path / "ranged.zarr", EventStore(small_store).geometry())
    for batch in discover_batches(small_dataset):
        preprocess_shard(batch, store.path, meta_rows=ranges[batch_id_of(batch)])
    for shard in store.shards():
        ours, reference = (_tree(path / "shards" / shard) for path in (store.path, small_store))
        assert ours == reference


def test_the_planner_gives_each_preprocess_task_its_meta_rows(small_dataset, tmp_path):
    from icegrid.campaign import CampaignSpec, plan

    spec = CampaignSpec(inputs=[str(small_dataset)], store=str(tmp_path / "none.zarr"), models=["linefit"])
    tasks = {t.key: t for t in plan(spec, ["linefit"])}
    assert tasks["preprocess/train_batch_000002"].kwargs == {"meta_rows": (400, 800)}
    assert tasks["preprocess/train_batch_000002"].events == 400
    assert "meta_rows" not in tasks["linefit/train_batch_000002"].kwargs


def test_meta_row_ranges_without_one_row_group_per_batch(small_dataset, tmp_path):
    """Row groups spanning batches (or no statistics) are read for their batch_id; a batch whose rows
    are split in two is left out (its task filters on batch_id); the footer cache sees the rewrite."""
    meta = pq.read_table(small_dataset / "train_meta.parquet")
    path = tmp_path / "train_meta.parquet"
    pq.write_table(meta, path, row_group_size=300, write_statistics=False)
    assert meta_row_ranges(path) == {1: (0, 400), 2: (400, 800), 3: (800, 1200)}
    order = np.r_[0:100, 400:1200, 100:400]          # batch 1 in two runs
    pq.write_table(meta.take(order), path, row_group_size=500)
    assert meta_row_ranges(path) == {2: (100, 500), 3: (500, 900)}


def _tree(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_preprocess_memory_follows_the_chunk_not_the_batch(tmp_path, monkeypatch):
    """numpy's allocations (traced) while preprocessing: flat in the batch size with 200-event chunks,
    growing with it when the whole batch is one chunk (the earlier, in-memory path)."""
    from icegrid.simulate import write_dataset

    monkeypatch.setattr(kaggle_stream, "BATCH_ROWS", 8192)      # record batches well below a chunk
    peaks = {}
    for n in (800, 3200):
        batch = write_dataset(tmp_path / f"d{n}", batches=1, events_per_batch=n, seed=5)[0]
        for chunk in (200, n):
            store = EventStore.create(tmp_path / f"s{n}-{chunk}.zarr", find_geometry(tmp_path / f"d{n}"),
                                      chunk_events=chunk)
            peaks[n, chunk] = traced_peak(lambda: preprocess_shard(batch, store.path))
    assert peaks[3200, 200] < 1.3 * peaks[800, 200]
    assert peaks[3200, 3200] > 2.5 * peaks[800, 800]
    assert peaks[3200, 200] < 0.3 * peaks[3200, 3200]


def _store_arrays(path):
    store = EventStore(path)
    out = {}
    for shard in store.shards():
        group = zarr.open_group(path / "shards" / shard, mode="r")
        for sub in ("events", "pulses"):
            for name in group[sub].array_keys():
                out[f"{shard}/{sub}/{name}"] = group[sub][name][:]
    return out


@pytest.mark.timeout(300)
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path):
    from icegrid.simulate import write_dataset

    data = tmp_path / "data"
    write_dataset(data, batches=8, events_per_batch=2500, seed=3)
    command = [sys.executable, "-m", "icegrid", "preprocess", "--input", str(data), "--workers", "1"]
    subprocess.run(command + ["--store", str(tmp_path / "clean.zarr")], check=True, capture_output=True)

    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen(command + ["--store", str(killed)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        shard_dir = killed / "shards"
        if shard_dir.is_dir() and any((p / "zarr.json").exists() for p in shard_dir.iterdir()):
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)   # the manager and its Dask workers die together
    proc.wait()
    published = EventStore(killed).shards()
    assert 1 <= len(published) < 8, "the kill must land part-way through the run"

    subprocess.run(command + ["--store", str(killed)], check=True, capture_output=True)
    clean, resumed = _store_arrays(tmp_path / "clean.zarr"), _store_arrays(killed)
    assert clean.keys() == resumed.keys() and len(EventStore(killed).shards()) == 8
    for key in clean:
        assert np.array_equal(clean[key], resumed[key]), key
    assert not (killed / ".staging").exists()   # leftovers of the killed writers cleaned, none left empty


def test_preprocess_cli_reports_and_resumes(small_dataset, tmp_path):
    store = tmp_path / "cli.zarr"
    command = [sys.executable, "-m", "icegrid", "preprocess", "--input", str(small_dataset),
               "--store", str(store), "--workers", "2"]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "3 shard(s) written, 0 already there, 0 failed" in first.stdout
    assert "events/s" in first.stderr          # the progress bar
    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "0 shard(s) written, 3 already there" in second.stdout
    info = subprocess.run([sys.executable, "-m", "icegrid", "info", str(store)], capture_output=True,
                          text=True, check=True)
    assert "3 shard(s), 1,200 events" in info.stdout
