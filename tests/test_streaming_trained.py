"""The shipped (trained) small checkpoints on simulated events of every length 1..200: the streaming path,
the whole-shard path and each event alone in a batch without padding (GraphNeT's per-event graphs)
agree to float rounding. Untrained checkpoints on random events hid a padding-dependent kNN: trained
weights make the output sensitive to which of several equidistant pulses (one DOM) is a neighbour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icegrid.geometry import icecube86
from icegrid.inference import (MemoryShard, SAMPLING_SEED, predict_events_whole_shard, predict_stream,
                               resolve_model)
from icegrid.models.features import collate, select_pulses_whole_shard
from icegrid.models.layers import knn
from icegrid.simulate import simulate_batch
from icegrid.store import ShardData

TOLERANCE = 1e-5        # rad, for vectors of length >= 1; shorter ones: 1e-5 of absolute perpendicular error


@pytest.fixture(scope="module")
def shard() -> ShardData:
    """Simulated events cut to their first m pulses for m = 1..200, then 100 whole events."""
    batch = simulate_batch(0, 400, seed=3)
    n = batch.n_pulses
    starts = np.concatenate([[0], np.cumsum(n)[:-1]])
    cut = np.arange(1, 201)
    by_length = np.argsort(n, kind="stable")          # donor of m pulses: one of the events with >= m
    pick = np.minimum(np.searchsorted(n[by_length], cut) + cut % 7, n.shape[0] - 1)
    source = by_length[pick]
    assert (n[source] >= cut).all()
    lengths = np.concatenate([cut, n[:100]])
    first = np.concatenate([starts[source], starts[:100]])
    offset = np.concatenate([[0], np.cumsum(lengths)])
    index = np.repeat(first - offset[:-1], lengths) + np.arange(int(offset[-1]))
    pulses = {"sensor_id": batch.sensor_id[index], "time": batch.time[index], "charge": batch.charge[index],
              "auxiliary": batch.auxiliary[index]}
    return ShardData(name="lengths", event_id=np.arange(lengths.shape[0]), offset=offset, pulses=pulses)


def _one_event_alone(loaded, data: ShardData, geometry) -> np.ndarray:
    selection = select_pulses_whole_shard(data.offset, data.pulses["time"], data.pulses["auxiliary"],
                                          loaded.infer_limit, loaded.truncation, seed=SAMPLING_SEED)
    features = loaded.transform(data, selection, geometry)
    out = np.zeros((data.n_events, 3))
    model = loaded.model.eval()
    with torch.inference_mode():
        for event in np.flatnonzero(selection.lengths > 0):     # the reference: one forward per event
            out[event] = model.predict(collate(features, np.array([event])))[0].double().numpy()
    return out


def _disagreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle between a and b, scaled by min(|b|, 1): float32 rounding is absolute in the components,
    so a vector of length 0.05 (kappa 0.05) turns by ~20x the angle of a unit one."""
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(norm_a * norm_b, 1e-30)
    return np.arccos(np.clip(cos, -1.0, 1.0)) * np.minimum(norm_b, 1.0)


@pytest.mark.parametrize("name", ["dynedge", "gpt_boost", "edgeconv_transformer", "icemix"])
def test_trained_streaming_agrees_with_each_event_alone_and_the_whole_shard_path(shard, name):
    torch.set_num_threads(1)
    geometry = icecube86()
    loaded = resolve_model(name)
    alone = _one_event_alone(loaded, shard, geometry)
    streamed = predict_stream(loaded, MemoryShard(shard), geometry, chunk_events=128)
    legacy = predict_events_whole_shard(loaded, shard, geometry)
    assert set(np.unique(streamed.lengths)) >= set(range(1, min(loaded.infer_limit or 200, 200) + 1))
    assert (streamed.n_pulses[:200] == np.arange(1, 201)).all()
    for label, result in (("streaming", streamed), ("whole-shard", legacy)):
        off = _disagreement(result.direction, alone)
        worst = int(np.argmax(off))
        assert off[worst] <= TOLERANCE, (f"{name} {label}: {int((off > TOLERANCE).sum())} events differ from "
                                         f"the event alone; worst {off[worst]:.3g} at {streamed.lengths[worst]} pulses")


def test_knn_of_an_event_does_not_depend_on_its_padding():
    """Pulses on one DOM tie at distance 0: the graph must not change with the padded length
    (torch.cdist's matrix-product path above 25 rows and topk's tie order both did)."""
    rng = np.random.default_rng(0)
    coords = torch.from_numpy(rng.normal(size=(40, 3)).astype(np.float32))
    coords[10:20] = coords[3]                           # eleven pulses on one DOM
    coords[25:30] = coords[26] + 1e-7                   # near-ties below float32 cdist's rounding
    graphs = []
    for length in (40, 48, 64, 130):
        x = torch.zeros((2, length, 3))
        x[0, :40] = coords
        x[1, :7] = coords[:7]
        mask = torch.zeros((2, length), dtype=torch.bool)
        mask[0, :40] = True
        mask[1, :7] = True
        index, valid = knn(x, mask, 8)
        graphs.append((index[0, :40], valid[0, :40], index[1, :7], valid[1, :7]))
    for graph in graphs[1:]:
        for got, want in zip(graph, graphs[0]):
            assert torch.equal(got, want)
