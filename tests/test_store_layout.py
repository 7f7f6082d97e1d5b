"""Store layout version 3: event-aligned chunks with padding, the same bytes from memory and from the
streaming reader, stores of versions 1 and 2 still read (and upgraded when written to), exact codecs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from icegrid import integrity
from icegrid.kaggle import SHAPES, read_batch
from icegrid.preprocess import discover_batches, find_geometry, preprocess_shard, shard_name_for
from icegrid.shard_arrays import plan_chunks
from icegrid.store import PULSE_COLUMNS, EventStore, StoreError


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_chunk_plan_puts_every_event_in_its_chunk():
    n_pulses = np.array([3, 1, 7, 2, 2, 9, 1, 4, 5, 1])
    offset = np.concatenate([[0], np.cumsum(n_pulses)])
    plan = plan_chunks(offset, 4)
    # Chunks of 13, 16 and 6 pulses: 16 per stored chunk, 3 of padding after the first.
    assert (plan.n_chunks, plan.chunk_pulses, plan.stored_pulses) == (3, 16, 2 * 16 + 6)
    assert plan.pulse_start().tolist() == [0, 3, 4, 11, 16, 18, 27, 28, 32, 37]
    assert plan.slices(3, 9) == [(11, 13, 11), (16, 32, 13), (32, 37, 29)]
    single = plan_chunks(offset, 10)
    assert not single.padded and single.stored_pulses == 35 and np.array_equal(single.pulse_start(), offset[:-1])
    empty = plan_chunks(np.zeros(1, np.int64), 4)
    assert (empty.n_chunks, empty.stored_pulses, empty.pulse_start().size) == (0, 0, 0)


@pytest.fixture(scope="module")
def chunked_store(small_dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("layout") / "events.zarr"
    EventStore.create(path, find_geometry(small_dataset), chunk_events=50)
    for batch in discover_batches(small_dataset):
        preprocess_shard(batch, path)
    return EventStore(path)


def test_streamed_shard_equals_the_in_memory_write_byte_for_byte(chunked_store, small_dataset, tmp_path):
    batch_path = discover_batches(small_dataset)[1]
    name = shard_name_for(batch_path)
    memory = EventStore.create(tmp_path / "memory.zarr", chunked_store.geometry(), chunk_events=50)
    memory.write_shard(name, read_batch(batch_path), attrs={"split": "train"})
    streamed, written = _files(chunked_store.path / "shards" / name), _files(memory.path / "shards" / name)
    assert streamed.keys() == written.keys() and len([k for k in streamed if k.startswith("pulses/time/c/")]) == 8
    for key in streamed:
        if key != "zarr.json":      # the marker is identical too, but the group documents differ in source
            assert streamed[key] == written[key], key
    assert json.loads(streamed["zarr.json"])["attributes"]["icegrid_complete"] == \
        json.loads(written["zarr.json"])["attributes"]["icegrid_complete"]


def test_padded_round_trip_is_exact(chunked_store, small_dataset):
    for batch_path in discover_batches(small_dataset):
        data = chunked_store.read_shard(shard_name_for(batch_path))
        parquet = pq.read_table(batch_path)
        assert data.attrs["chunk_events"] == 50 and data.attrs["chunk_pulses"] > 0
        assert np.array_equal(np.repeat(data.event_id, data.n_pulses), parquet["event_id"].to_numpy())
        for column in PULSE_COLUMNS:
            assert data.pulses[column].dtype == parquet[column].type.to_pandas_dtype()
            assert np.array_equal(data.pulses[column], parquet[column].to_numpy()), column


def test_codecs_are_standard_zarr_and_zstd_for_time_and_charge(chunked_store):
    shard = chunked_store.shards()[0]
    group = zarr.open_group(chunked_store.path / "shards" / shard, mode="r")
    names = {c: [codec.cname.value for codec in group[f"pulses/{c}"].compressors if isinstance(codec, BloscCodec)]
             for c in PULSE_COLUMNS}
    assert names == {"sensor_id": ["lz4"], "time": ["zstd"], "charge": ["zstd"], "auxiliary": ["lz4"]}
    assert all(isinstance(group[f"pulses/{c}"].compressors[-1], Crc32cCodec) for c in PULSE_COLUMNS)
    assert not group["pulses/time"].filters


# ---- stores written by earlier versions --------------------------------------------------------------
def _version_2_store(path: Path, batch, geometry) -> None:
    """A store as icegrid wrote it with layout version 2: one chunk per array up to 2**21 pulses,
    Blosc lz4 + crc32c, no dimension names, no chunk attributes, no pulse_start, a completeness marker."""
    def write(group, name, data, chunk):
        group.create_array(name, data=np.ascontiguousarray(data), chunks=(max(1, min(chunk, len(data))),),
                           compressors=[BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"), Crc32cCodec()],
                           config={"write_empty_chunks": True})

    root = zarr.open_group(path, mode="w", attributes={"icegrid_store_version": 2, "shape_codes": list(SHAPES)})
    geo = root.create_group("geometry")
    write(geo, "sensor_id", np.arange(geometry.n_sensors, dtype=np.int16), 1 << 18)
    for axis in ("x", "y", "z"):
        write(geo, axis, getattr(geometry, axis), 1 << 18)
    shard = root.create_group("shards").create_group("old")
    shard.attrs.update({"n_events": batch.n_events, "n_pulses": int(batch.offsets[-1]), "batch_id": 1,
                        "source": "batch_1.parquet", "has_truth": True, "split": "train",
                        "event_id_range": [int(batch.event_id.min()), int(batch.event_id.max())]})
    for name, values in (("event_id", batch.event_id), ("offset", batch.offsets), ("n_pulses", batch.n_pulses),
                         ("zenith", batch.zenith), ("azimuth", batch.azimuth)):
        write(shard, f"events/{name}", values, 1 << 18)
    for column in PULSE_COLUMNS:
        write(shard, f"pulses/{column}", getattr(batch, column), 1 << 21)
    shard.create_group("predictions")
    integrity.seal(shard, path / "shards" / "old")


def test_a_version_2_store_is_read_and_upgraded_when_a_shard_is_added(small_dataset, tmp_path):
    batches = discover_batches(small_dataset)
    batch = read_batch(batches[0])
    path = tmp_path / "v2.zarr"
    _version_2_store(path, batch, find_geometry(small_dataset))
    old = EventStore(path)
    assert old.version == 2 and old.shards() == ["old"]
    data = old.read_shard("old")
    for column in PULSE_COLUMNS:
        assert np.array_equal(data.pulses[column], getattr(batch, column))
    reader = old.shard_reader("old")
    assert np.array_equal(reader.read(10, 20).pulses["time"], batch.time[batch.offsets[10]:batch.offsets[20]])
    assert old.write_predictions("old", "zeros", np.zeros(400), np.ones(400))

    preprocess_shard(batches[1], path)                                   # a version-3 shard joins
    root = json.loads((path / "zarr.json").read_text())["attributes"]
    assert (root["icegrid_store_version"], root["icegrid_store_upgraded_from"]) == (3, 2)
    upgraded = EventStore(path)
    assert upgraded.shards() == ["old", shard_name_for(batches[1])]
    assert np.array_equal(upgraded.read_shard("old").pulses["charge"], batch.charge)
    assert np.array_equal(upgraded.read_predictions("old", "zeros")["zenith"], np.ones(400))


def test_an_upgraded_version_1_store_keeps_its_unmarked_shards(small_dataset, tmp_path):
    batches = discover_batches(small_dataset)
    path = tmp_path / "v1.zarr"
    _version_2_store(path, read_batch(batches[0]), find_geometry(small_dataset))
    for meta in path.rglob("zarr.json"):                                 # before markers: version 1
        doc = json.loads(meta.read_text())
        doc.get("attributes", {}).pop(integrity.MARKER, None)
        if meta.parent == path:
            doc["attributes"]["icegrid_store_version"] = 1
        meta.write_text(json.dumps(doc))
    assert EventStore(path).shards() == ["old"]
    preprocess_shard(batches[1], path)
    upgraded = EventStore(path)
    assert upgraded.version == 3 and upgraded.shards() == ["old", shard_name_for(batches[1])]


def test_a_newer_icegrid_refuses_an_upgraded_store_in_one_line(chunked_store, tmp_path):
    copy = tmp_path / "future.zarr"
    shutil.copytree(chunked_store.path, copy)
    doc = json.loads((copy / "zarr.json").read_text())
    doc["attributes"]["icegrid_store_version"] = 4
    (copy / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError) as info:
        EventStore(copy)
    assert "\n" not in str(info.value) and "store version 4; this icegrid reads versions 1, 2, 3" in str(info.value)


def test_an_empty_shard_round_trips(tmp_path, small_dataset):
    batch = read_batch(discover_batches(small_dataset)[0])
    empty = type(batch)(batch_id=1, source="empty", event_id=np.zeros(0, np.int64), n_pulses=np.zeros(0, np.int64),
                        sensor_id=np.zeros(0, np.int16), time=np.zeros(0, np.int64), charge=np.zeros(0),
                        auxiliary=np.zeros(0, bool))
    store = EventStore.create(tmp_path / "e.zarr", find_geometry(small_dataset), chunk_events=50)
    assert store.write_shard("empty", empty)
    data = store.read_shard("empty")
    assert data.n_events == 0 and data.offset.tolist() == [0] and data.pulses["time"].size == 0
    assert store.shard_reader("empty").read(0, 0).pulses["charge"].size == 0


def test_streamed_inference_reads_padded_chunks_exactly(chunked_store, tmp_path):
    """Inference chunks of 30 events against store chunks of 50: ranges straddle the padding."""
    from icegrid.inference import infer_shard
    from icegrid.linefit import linefit_directions

    copy = tmp_path / "infer.zarr"
    shutil.copytree(chunked_store.path, copy)
    shard = chunked_store.shards()[0]
    infer_shard(copy, shard, "linefit", chunk_events=30)
    store = EventStore(copy)
    azimuth, zenith = linefit_directions(store.read_shard(shard), store.geometry())
    stored = store.read_predictions(shard, "linefit")
    assert np.array_equal(stored["azimuth"], azimuth) and np.array_equal(stored["zenith"], zenith)
