"""Streaming inference: chunked selection, features and predictions equal the whole-shard path,
reruns are byte-identical, no step holds more than a chunk, and a corrupt chunk is one line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import NETWORKS, traced_peak
from icegrid.geometry import icecube86
from icegrid.inference import (SAMPLING_SEED, MemoryShard, StoreShard, infer_shard, predict_events_whole_shard,
                               predict_stream, store_geometry)
from icegrid.kaggle import KaggleBatch
from icegrid.models import registry
from icegrid.models.features import (GPTBoostFeatures, collate, engineered_event_features, order_by_key,
                                     padded_length, select_pulses, select_pulses_whole_shard)
from icegrid.store import EventStore, ShardData, StoreError



def _ragged(n_events: int, seed: int, max_pulses: int = 600):
    """Kaggle-like lengths (some empty events), times mostly ordered within events, a few not."""
    rng = np.random.default_rng(seed)
    n = np.clip(rng.lognormal(3.8, 1.0, n_events).astype(np.int64), 0, max_pulses)
    n[rng.random(n_events) < 0.02] = 0
    offset = np.zeros(n_events + 1, np.int64)
    np.cumsum(n, out=offset[1:])
    event = np.repeat(np.arange(n_events), n)
    time = rng.integers(6000, 20000, int(offset[-1]))
    time = time[np.lexsort((time, event))]
    shuffled = np.flatnonzero(rng.random(n_events) < 0.1)      # events whose pulses are not time-ordered
    for e in shuffled[:20]:                                    # a test setup loop, over 20 events
        time[offset[e]:offset[e + 1]] = rng.permutation(time[offset[e]:offset[e + 1]])
    time[offset[3]:offset[3] + 4] = 9000                       # equal times: index order must break the tie
    return offset, time, rng.random(int(offset[-1])) < 0.4


def _batch(n_events: int, seed: int = 1) -> KaggleBatch:
    offset, time, auxiliary = _ragged(n_events, seed)
    rng = np.random.default_rng(seed + 1)
    total = int(offset[-1])
    return KaggleBatch(batch_id=seed, source="random", event_id=np.arange(n_events) * 3 + 11,
                       n_pulses=np.diff(offset), sensor_id=rng.integers(0, 5160, total).astype(np.int16),
                       time=time.astype(np.int64), charge=rng.uniform(0.1, 5.0, total), auxiliary=auxiliary,
                       azimuth=rng.uniform(0, 6, n_events), zenith=rng.uniform(0, 3, n_events))


def _store(tmp_path, sizes: dict[str, int]):
    path = tmp_path / "stream.zarr"
    store = EventStore.create(path, icecube86())
    for name, n in sizes.items():
        store.write_shard(name, _batch(n, seed=len(name) + n))
    return path


# ---- selection ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["first_in_time", "hlc_first", "random"])
def test_selection_is_the_whole_shard_selection_under_any_chunking(rule):
    offset, time, auxiliary = _ragged(700, seed=4)
    for limit in (None, 1, 48, 300):
        for seed in ((0, 9) if rule == "random" else (0, 9, None)):
            whole = select_pulses_whole_shard(offset, time, auxiliary, limit, rule, seed)
            assert np.array_equal(select_pulses(offset, time, auxiliary, limit, rule, seed).index, whole.index)
            for cuts in ([0, 1, 700], [0, 250, 251, 600, 700]):
                parts = []
                for a, b in zip(cuts[:-1], cuts[1:]):
                    first, last = offset[a], offset[b]
                    part = select_pulses(offset[a:b + 1] - first, time[first:last], auxiliary[first:last], limit,
                                         rule, seed, pulse_start=int(first))
                    assert np.array_equal(part.offset + whole.offset[a], whole.offset[a:b + 1])
                    parts.append(part.index + first)
                assert np.array_equal(np.concatenate(parts), whole.index), (limit, seed, cuts)
    selected = select_pulses(offset, time, auxiliary, 48, rule)
    assert (selected.lengths <= 48).all() and selected.lengths.sum() < offset[-1]


def test_a_tie_in_the_merged_key_falls_back_to_the_exact_order():
    draws = np.array([5, 4, 3, 9, 1], dtype=np.uint64)
    group = np.array([0, 0, 0, 1, 1], dtype=np.int32)
    exact = (draws, group)
    merged = (group.astype(np.uint64) << np.uint64(8)) | draws
    assert order_by_key(merged, exact).tolist() == np.lexsort(exact).tolist() == [2, 1, 0, 4, 3]
    merged[:3] = 7               # the merged key lost the draws' difference: only the exact keys can order them
    assert order_by_key(merged, exact).tolist() == [2, 1, 0, 4, 3]


def test_engineered_features_of_chunks_are_the_shard_rows():
    batch = _batch(900, seed=3)
    data = ShardData(name="x", event_id=batch.event_id, offset=batch.offsets,
                     pulses={c: getattr(batch, c) for c in ("sensor_id", "time", "charge", "auxiliary")})
    whole = engineered_event_features(data, icecube86())
    source = MemoryShard(data)
    parts = [engineered_event_features(source.read(a, b), icecube86()) for a, b in ((0, 333), (333, 334), (334, 900))]
    assert np.concatenate(parts).tobytes() == whole.tobytes()
    assert np.isfinite(whole).all() and whole[:, -1].max() > 2     # log10 of events over 100 pulses


# ---- predictions ----------------------------------------------------------------------------------
def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = norm > 0
    return np.arccos(np.clip(np.sum(a[ok] * b[ok], axis=1) / norm[ok], -1, 1))


@pytest.mark.parametrize("name", NETWORKS)
def test_chunk_sizes_agree_reruns_are_byte_identical_and_batch_mates_do_not_matter(tmp_path, untrained_checkpoints, name):
    torch.set_num_threads(1)
    path = _store(tmp_path, {"a": 600})
    store = EventStore(path)
    outputs = {}
    for chunk in (97, 400):
        summary = infer_shard(path, "a", name, untrained_checkpoints[name], chunk_events=chunk, overwrite=True)
        outputs[chunk] = store.read_predictions("a", name)
        infer_shard(path, "a", name, untrained_checkpoints[name], chunk_events=chunk, overwrite=True)
        again = store.read_predictions("a", name)
        for key in ("azimuth", "zenith", "direction", "kappa"):
            assert outputs[chunk][key].tobytes() == again[key].tobytes(), (chunk, key)
        assert outputs[chunk]["attrs"]["chunk_events"] == chunk and summary["forward_calls"] >= -(-600 // chunk)
    assert _angle(outputs[97]["direction"], outputs[400]["direction"]).max() < 1e-5
    np.testing.assert_allclose(outputs[97]["kappa"], outputs[400]["kappa"], rtol=1e-5, atol=1e-7)
    # Each event's prediction is its own: alone in a batch, at its padded length, it is the same.
    loaded = registry.load_checkpoint(untrained_checkpoints[name], name)
    data = store.read_shard("a", truth=False)
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], loaded.infer_limit,
                              loaded.truncation, seed=SAMPLING_SEED)
    features = loaded.transform(data, selection, store_geometry(store))
    sample = np.flatnonzero(selection.lengths > 0)[::50]
    pads = padded_length(selection.lengths[sample], loaded.infer_limit)
    with torch.inference_mode():
        alone = np.concatenate([loaded.model.predict(collate(features, np.array([e]), pad_to=int(p)))[0].double()
                                for e, p in zip(sample, pads)])
    assert _angle(alone, outputs[97]["direction"][sample]).max() < 1e-5
    old = predict_events_whole_shard(loaded, data, store_geometry(store))
    assert (old.n_pulses > old.lengths).sum() == summary["truncated_events"] > 0
    if name == "gpt_boost":     # no kNN: the old whole-shard batches give the same angles too
        assert _angle(old.direction, outputs[97]["direction"]).max() < 1e-5


def test_linefit_is_byte_identical_for_every_chunk_size(tmp_path):
    path = _store(tmp_path, {"a": 700})
    store = EventStore(path)
    infer_shard(path, "a", "linefit", legacy=True)
    old = store.read_predictions("a", "linefit")
    for chunk in (7, 50, 699, 10_000):
        infer_shard(path, "a", "linefit", chunk_events=chunk, overwrite=True)
        new = store.read_predictions("a", "linefit")
        assert new["azimuth"].tobytes() == old["azimuth"].tobytes()
        assert new["zenith"].tobytes() == old["zenith"].tobytes()


class RecordingFeatures(GPTBoostFeatures):
    """icegrid's 3rd place transform, noting how many events and pulses each call got."""

    calls: list[tuple[int, int]] = []

    def __call__(self, data, selection, geometry):
        RecordingFeatures.calls.append((data.n_events, int(data.offset[-1])))
        return super().__call__(data, selection, geometry)


def test_no_transform_sees_more_than_a_chunk(tmp_path, untrained_checkpoints):
    path = _store(tmp_path, {"a": 1000})
    loaded = registry.load_checkpoint(untrained_checkpoints["gpt_boost"], "gpt_boost")
    loaded.transform = RecordingFeatures(**{k: v for k, v in loaded.transform.describe().items()
                                            if k not in ("name", "version")})
    RecordingFeatures.calls = []
    store = EventStore(path)
    result = predict_stream(loaded, StoreShard(store, "a"), store_geometry(store), chunk_events=128)
    probes = RecordingFeatures.calls[:3]                       # the cost probes: 2 events each
    chunks = RecordingFeatures.calls[3:]
    assert [n for n, _ in probes] == [2, 2, 2]
    assert [n for n, _ in chunks] == [128] * 7 + [104]
    assert sum(p for _, p in chunks) == int(store.shard_attrs("a")["n_pulses"])
    assert result.chunks == 8 and result.largest_chunk_events == 128


def test_peak_memory_follows_the_chunk_not_the_shard(tmp_path, untrained_checkpoints):
    """numpy's allocations (traced, both threads) while predicting a shard already in memory: flat in
    the shard size when streaming, growing with it on the whole-shard path. (Reading is bounded by
    the store's zarr chunks; the benchmark measures it on a 200,000-event shard.)"""
    torch.set_num_threads(1)
    path = _store(tmp_path, {"small": 500, "large": 2000})
    store = EventStore(path)
    loaded = registry.load_checkpoint(untrained_checkpoints["gpt_boost"], "gpt_boost")
    geometry = store_geometry(store)
    shards = {s: store.read_shard(s, truth=False) for s in ("small", "large")}
    predict_stream(loaded, MemoryShard(shards["small"]), geometry)                         # warm-up
    streamed = {s: traced_peak(lambda: predict_stream(loaded, MemoryShard(d), geometry, chunk_events=100))
                for s, d in shards.items()}
    whole = {s: traced_peak(lambda: predict_events_whole_shard(loaded, d, geometry)) for s, d in shards.items()}
    assert shards["large"].offset[-1] > 3 * shards["small"].offset[-1]
    assert streamed["large"] < 1.25 * streamed["small"]
    assert whole["large"] > 3 * whole["small"]
    assert streamed["large"] < 0.2 * whole["large"]


# ---- bad input --------------------------------------------------------------------------------------
def test_a_corrupt_pulse_chunk_is_one_line_naming_shard_array_and_chunk(tmp_path):
    path = _store(tmp_path, {"a": 300})
    broken = tmp_path / "broken.zarr"
    shutil.copytree(path, broken)
    chunk = broken / "shards" / "a" / "pulses" / "time" / "c" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                                  # same size: only the checksum can tell
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError) as err:
        infer_shard(broken, "a", "linefit", chunk_events=100)
    text = str(err.value)
    assert "\n" not in text and str(broken) in text and "shard 'a'" in text and "pulses/time" in text
    assert "chunk c/0" in text
    assert not EventStore(broken).has_predictions("a", "linefit")
