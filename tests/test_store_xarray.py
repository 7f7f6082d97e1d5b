"""The store as the ecosystem sees it: xarray opens every group with named dimensions and the exact
values icegrid reads, and one event's pulses are one chunk of each array (counted at the store)."""

from __future__ import annotations

import re
import warnings
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import xarray as xr
import zarr
from zarr.storage import LocalStore, WrapperStore

from icegrid.linefit import linefit_directions
from icegrid.preprocess import discover_batches, find_geometry, preprocess_shard, shard_name_for
from icegrid.store import PULSE_COLUMNS, EventStore

CHUNK = 64           # events per chunk: 400-event shards become 7 chunks, 6 of them padded


class CountingStore(WrapperStore):
    """A real local store that records every key read through it."""

    def __init__(self, store):
        super().__init__(store)
        self.reads: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        self.reads.append(key)
        return await super().get(key, prototype, byte_range)

    def chunk_reads(self) -> Counter:
        """Chunk reads per array (``<array>/c/<index>`` keys)."""
        return Counter(key.rsplit("/c/", 1)[0] for key in self.reads if "/c/" in key)


@pytest.fixture(scope="module")
def chunked(small_dataset, tmp_path_factory):
    """The small dataset preprocessed with 64-event chunks, plus line-fit predictions."""
    path = tmp_path_factory.mktemp("xr") / "events.zarr"
    store = EventStore.create(path, find_geometry(small_dataset), chunk_events=CHUNK)
    for batch in discover_batches(small_dataset):
        preprocess_shard(batch, path)
    shard = store.shards()[0]
    azimuth, zenith = linefit_directions(store.read_shard(shard), store.geometry())
    store.write_predictions(shard, "linefit", azimuth, zenith, kappa=np.ones(azimuth.shape, np.float32))
    return store, shard


def _open(path, group):
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # no consolidated-metadata or stray-directory warnings
        return xr.open_zarr(path, group=group, consolidated=False)


def test_every_group_opens_with_named_dimensions_and_exact_values(chunked, small_dataset):
    store, shard = chunked
    base = f"shards/{shard}"
    events, pulses = _open(store.path, f"{base}/events"), _open(store.path, f"{base}/pulses")
    n = int(store.shard_attrs(shard)["n_events"])
    assert dict(events.sizes) == {"event": n, "event_edge": n + 1}
    assert {name: events[name].dims for name in ("event_id", "n_pulses", "pulse_start", "zenith", "offset")} == {
        "event_id": ("event",), "n_pulses": ("event",), "pulse_start": ("event",), "zenith": ("event",),
        "offset": ("event_edge",)}
    assert set(pulses.data_vars) == set(PULSE_COLUMNS) and pulses["time"].dims == ("pulse",)
    assert pulses["time"].chunks[0][0] == store.shard_attrs(shard)["chunk_pulses"]

    data = store.read_shard(shard)
    parquet = pq.read_table(small_dataset / "train" / "batch_1.parquet")
    start, count = events["pulse_start"].values, events["n_pulses"].values
    real = np.repeat(start - data.offset[:-1], count) + np.arange(int(count.sum()))   # padding skipped
    padding = np.setdiff1d(np.arange(pulses.sizes["pulse"]), real)
    assert padding.size > 0 and (pulses["sensor_id"].values[padding] == -1).all()
    for column in PULSE_COLUMNS:
        values = pulses[column].values[real]
        assert values.dtype == parquet[column].type.to_pandas_dtype()
        assert np.array_equal(values, parquet[column].to_numpy()) and np.array_equal(values, data.pulses[column])
    assert np.array_equal(events["event_id"].values, data.event_id)
    assert np.array_equal(events["zenith"].values, data.truth["zenith"])

    predictions = _open(store.path, f"{base}/predictions/linefit")
    assert predictions["direction"].dims == ("event", "xyz") and predictions["kappa"].dims == ("event",)
    assert np.array_equal(predictions["azimuth"].values, store.read_predictions(shard, "linefit")["azimuth"])
    geometry = _open(store.path, "geometry")
    assert dict(geometry.sizes) == {"sensor": 5160} and np.array_equal(geometry["z"].values, store.geometry().z)


def test_open_datatree_sees_the_whole_store(chunked):
    store, shard = chunked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(store.path, engine="zarr", consolidated=False)
    assert tree.attrs["icegrid_store_version"] == 3
    assert sorted(tree.children) == ["geometry", "shards"] and not (store.path / ".staging").exists()
    shards = tree["shards"]
    assert sorted(shards.children) == store.shards()
    assert shards[shard]["pulses"].dataset.sizes["pulse"] >= store.shard_attrs(shard)["n_pulses"]
    assert shards[shard]["predictions/linefit"]["direction"].dims == ("event", "xyz")


def test_one_event_reads_one_chunk_per_array(chunked):
    store, shard = chunked
    attrs = store.shard_attrs(shard)
    events = store.read_event_arrays(shard, ("pulse_start", "n_pulses"))
    start, count = events["pulse_start"], events["n_pulses"]
    # Boundaries: every event lies inside the pulse chunk numbered like its event chunk.
    index = np.arange(start.size)
    assert np.array_equal(start // attrs["chunk_pulses"], index // CHUNK)
    assert np.array_equal((start + count - 1) // attrs["chunk_pulses"], index // CHUNK)

    counting = CountingStore(LocalStore(store.path, read_only=True))
    pulses = xr.open_zarr(counting, group=f"shards/{shard}/pulses", consolidated=False)
    reader = store.shard_reader(shard)
    group = zarr.open_group(counting, path=f"shards/{shard}/pulses", mode="r")
    reader.arrays = {c: group[c] for c in PULSE_COLUMNS}     # icegrid's reader, through the same counter
    expected = Counter({f"shards/{shard}/pulses/{c}": 1 for c in PULSE_COLUMNS})
    for event in (0, CHUNK - 1, CHUNK, 5 * CHUNK + 7, start.size - 1):    # chunk edges and the last event
        chunk_key = {str(event // CHUNK)}
        reads = []
        for read in (lambda: pulses.isel(pulse=slice(int(start[event]), int(start[event] + count[event]))).load(),
                     lambda: reader.read(event, event + 1).pulses):      # xarray's read, then icegrid's
            counting.reads.clear()
            reads.append(read())
            assert counting.chunk_reads() == expected
            assert {re.sub(r".*/c/", "", key) for key in counting.reads if "/c/" in key} == chunk_key
        for column in PULSE_COLUMNS:
            assert np.array_equal(reads[0][column].values, reads[1][column])
    full = store.read_shard(shard)
    across = reader.read(CHUNK - 3, 3 * CHUNK + 2)                         # three chunk boundaries
    first, last = full.offset[CHUNK - 3], full.offset[3 * CHUNK + 2]
    assert np.array_equal(across.pulses["time"], full.pulses["time"][first:last])
    assert np.array_equal(across.offset, full.offset[CHUNK - 3:3 * CHUNK + 3] - first)


def test_chunk_setting_from_the_environment(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("ICEGRID_CHUNK_EVENTS", "150")
    store = EventStore.create(tmp_path / "env.zarr", find_geometry(small_dataset))
    batch = discover_batches(small_dataset)[0]
    preprocess_shard(batch, store.path)
    attrs = store.shard_attrs(shard_name_for(batch))
    assert attrs["chunk_events"] == 150 and zarr.open_group(store.path / "shards" / shard_name_for(batch),
                                                            mode="r")["events/event_id"].chunks == (150,)
    monkeypatch.setenv("ICEGRID_CHUNK_EVENTS", "lots")
    with pytest.raises(Exception) as info:
        EventStore.create(tmp_path / "bad.zarr", find_geometry(small_dataset))
    assert "ICEGRID_CHUNK_EVENTS='lots'" in str(info.value) and "\n" not in str(info.value)
