"""From a store shard to padded model batches: per-model feature scalings (after the pulse selection
of :mod:`icegrid.models.selection`), the 3rd place's engineered event features, sequence bucketing and
padding. Everything here is vectorised over the flat
(ragged) pulse arrays; nothing loops over events or pulses.

Each model names one :class:`FeatureTransform` (its own scaling constants, in one place) and one
truncation rule; a transform's ``version`` is written into checkpoints so a checkpoint trained on
one scaling is never silently evaluated with another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from icegrid.geometry import DOMS_PER_STRING, Geometry
from icegrid.store import ShardData

# Pulse selection lives in icegrid.models.selection; its names are re-exported here, where models import them.
from icegrid.models.selection import (TRUNCATION_RULES, Selection, event_of_pulse, order_by_key,  # noqa: F401
                                      pulses_of, seeded_bits, select_pulses, select_pulses_whole_shard,
                                      time_order)


# ---- feature transforms -------------------------------------------------------------------------
@dataclass
class ShardFeatures:
    """Per-pulse (flat, aligned with ``selection.index``) and per-event model inputs of one shard."""

    selection: Selection
    pulse: dict[str, np.ndarray]
    event: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        return int(self.selection.offset.shape[0] - 1)


class FeatureTransform:
    """One model's scaling of (x, y, z, t, q, auxiliary); subclasses set the constants."""

    name = "base"
    version = 1
    position_scale = 500.0
    time_shift = 1.0e4
    time_scale = 3.0e4
    charge_log_scale = 3.0
    relative_time = False       # 3rd place: time of the first selected pulse set to 0

    def __init__(self, **constants: float):
        for key, value in constants.items():
            if not hasattr(self, key):
                raise ValueError(f"{self.name}: unknown feature constant '{key}'")
            setattr(self, key, value)

    def load_aux(self, aux: dict) -> None:
        """Side-file data stored in a checkpoint (per-DOM QE, the ice table); icegrid's own need none."""

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "position_scale": self.position_scale,
                "time_shift": self.time_shift, "time_scale": self.time_scale,
                "charge_log_scale": self.charge_log_scale, "relative_time": self.relative_time}

    def __call__(self, data: ShardData, selection: Selection, geometry: Geometry) -> ShardFeatures:
        index = selection.index
        sensor = data.pulses["sensor_id"][index].astype(np.int64)
        xyz = geometry.xyz[sensor] / self.position_scale
        time = data.pulses["time"][index].astype(np.float64)
        event = event_of_pulse(selection.offset)
        if self.relative_time:
            first = time[selection.offset[:-1][selection.lengths > 0]]
            first_of_event = np.zeros(selection.n_pulses.shape[0])
            first_of_event[selection.lengths > 0] = first
            time = time - first_of_event[event]
        else:
            time = time - self.time_shift
        charge = np.log10(np.maximum(data.pulses["charge"][index], 1e-3)) / self.charge_log_scale
        auxiliary = data.pulses["auxiliary"][index]
        features = np.concatenate([xyz, (time / self.time_scale)[:, None], charge[:, None],
                                   auxiliary[:, None].astype(np.float64)], axis=1).astype(np.float32)
        pulse = {"x": features, "aux": auxiliary.astype(np.int64)}
        out = ShardFeatures(selection=selection, pulse=pulse,
                            event={"log_n_pulses": np.log10(np.maximum(selection.n_pulses, 1))
                                   .astype(np.float32)})
        self.add_event_features(out, data, geometry)
        return out

    def add_event_features(self, features: ShardFeatures, data: ShardData, geometry: Geometry) -> None:
        """Hook for per-event engineered inputs (the 3rd place selector's)."""


class DynEdgeFeatures(FeatureTransform):
    """GraphNeT DynEdge: x,y,z / 500; (t - 1e4) / 3e4; log10(q) / 3."""

    name = "dynedge"


class EdgeTransformerFeatures(FeatureTransform):
    """1st place: as DynEdge but (t - 1e4) / 115 (paper eq. 4)."""

    name = "edgeconv_transformer"
    time_scale = 115.0


class IceMixFeatures(FeatureTransform):
    """2nd place: DynEdge scaling; Fourier multipliers (x4096 / x1024) live in the model."""

    name = "icemix"


class GPTBoostFeatures(FeatureTransform):
    """3rd place: x,y,z / 500; time relative to the first selected pulse / 3e4; log10(q) / 3, plus
    the selector's engineered event features (paper Table 5)."""

    name = "gpt_boost"
    relative_time = True

    def add_event_features(self, features: ShardFeatures, data: ShardData, geometry: Geometry) -> None:
        features.event["engineered"] = engineered_event_features(data, geometry)


ENGINEERED_FEATURE_NAMES = (
    "z_min", "z_max", "z_mean", "z_std", "t_min", "t_max", "t_mean", "t_std", "q_std", "q_sum",
    "frac_hlc", "avg_speed", "frac_hlc_pairs", "pair_dt12", "pair_dz12", "pair_z1", "log_n_pulses")


def _segment_stats(values: np.ndarray, offset: np.ndarray, event: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(min, max, mean, std, sum) of ``values`` per event; empty events give zeros."""
    n = np.diff(offset)
    nonempty = n > 0
    starts = offset[:-1][nonempty]
    out_min = np.zeros(n.shape[0]); out_max = np.zeros(n.shape[0])
    if values.shape[0]:
        out_min[nonempty] = np.minimum.reduceat(values, starts)
        out_max[nonempty] = np.maximum.reduceat(values, starts)
    event = event_of_pulse(offset) if event is None else event
    total = np.bincount(event, weights=values, minlength=n.shape[0])
    mean = total / np.maximum(n, 1)
    deviation = values - mean[event]
    deviation *= deviation
    var = np.bincount(event, weights=deviation, minlength=n.shape[0]) / np.maximum(n, 1)
    return out_min, out_max, mean, np.sqrt(var), total


def _time_rank(offset: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Each pulse's place in its event's (time, index) order."""
    position = np.arange(event.shape[0], dtype=np.int64) - offset[event]
    order = time_order(offset, time)
    if order is None:
        return position
    rank = np.empty_like(position)
    rank[order] = position
    return rank


def _hlc_pair_order(offset, event, string, time, hlc, n_strings: int) -> np.ndarray:
    """HLC pulses sorted by (event, string, time, index), by one sort of a unique integer key."""
    hlc_index = np.flatnonzero(hlc)
    stride = int(np.diff(offset).max(initial=1))
    if (event.shape[0] and (int(event[-1]) + 1) * n_strings * stride >= 1 << 62):   # key would overflow
        return hlc_index[np.lexsort((time[hlc_index], string[hlc_index], event[hlc_index]))]
    key = event[hlc_index] * n_strings
    key += string[hlc_index]
    key *= stride
    key += _time_rank(offset, time, event)[hlc_index]
    return hlc_index[np.argsort(key)]


def _average_speed(sensor, time, event, n, geometry: Geometry) -> np.ndarray:
    """Mean distance / time between consecutive pulses of each event, in the Kaggle order."""
    step = np.zeros(max(sensor.shape[0] - 1, 0))
    for coordinate in (geometry.x, geometry.y, geometry.z):
        delta = np.diff(coordinate[sensor])
        delta *= delta
        step += delta
    np.sqrt(step, out=step)
    step /= np.maximum(np.abs(np.diff(time)), 1.0)
    if step.shape[0]:
        step[event[1:] != event[:-1]] = 0.0    # no step between two events (adds an exact 0)
    return np.bincount(event[1:], weights=step, minlength=n.shape[0]) / np.maximum(n - 1, 1)


def _hlc_pair_features(offset, event, sensor, time, z, hlc, n, n_strings: int) -> list[np.ndarray]:
    """Fraction of pulses in HLC pairs, and the first two pairs' time and z difference and first z."""
    n_events = n.shape[0]
    string = sensor // DOMS_PER_STRING
    order = _hlc_pair_order(offset, event, string, time, hlc, n_strings)
    pair_of_event = np.zeros(n_events)
    first_dt = np.zeros(n_events); first_dz = np.zeros(n_events); first_z = np.zeros(n_events)
    if order.shape[0] < 2:
        return [pair_of_event, first_dt, first_dz, first_z]
    a, b = order[:-1], order[1:]
    is_pair = event[a] == event[b]
    is_pair &= string[a] == string[b]
    del string
    dom = sensor % DOMS_PER_STRING
    is_pair &= np.abs(dom[a] - dom[b]) == 1
    del dom
    is_pair &= np.abs(time[a] - time[b]) < 1000.0
    pa, pb = a[is_pair], b[is_pair]
    pair_event = event[pa]
    pair_of_event = np.bincount(pair_event, minlength=n_events) * 2.0 / np.maximum(n, 1)
    pair_time = np.minimum(time[pa], time[pb])
    pair_z = 0.5 * (z[pa] + z[pb])
    by_time = np.lexsort((pair_time, pair_event))
    pair_event, pair_time, pair_z = pair_event[by_time], pair_time[by_time], pair_z[by_time]
    is_first = np.r_[True, pair_event[1:] != pair_event[:-1]] if pair_event.shape[0] else np.zeros(0, bool)
    first_z[pair_event[is_first]] = pair_z[is_first]
    is_second = np.r_[False, (pair_event[1:] == pair_event[:-1]) & is_first[:-1]] \
        if pair_event.shape[0] else np.zeros(0, bool)
    second_event = pair_event[is_second]
    first_pos = np.flatnonzero(is_second) - 1
    first_dt[second_event] = pair_time[is_second] - pair_time[first_pos]
    first_dz[second_event] = pair_z[is_second] - pair_z[first_pos]
    return [pair_of_event, first_dt, first_dz, first_z]


def engineered_event_features(data: ShardData, geometry: Geometry) -> np.ndarray:
    """The 3rd place selector's event features over ALL pulses of each event (paper Table 5):
    z and absolute-time statistics, charge spread and sum, HLC fraction, average speed between
    consecutive pulses, and the HLC-pair features (HLC pulses on vertically adjacent DOMs of one
    string within 1 us). Per event, so a chunk of events gives the rows the whole shard does;
    temporaries die as soon as each feature is done, so memory stays a few arrays of the chunk."""
    offset = data.offset
    n = np.diff(offset)
    sensor = data.pulses["sensor_id"]
    time = data.pulses["time"].astype(np.float64)
    hlc = ~data.pulses["auxiliary"]
    z = geometry.z[sensor]
    event = event_of_pulse(offset)
    columns = [*_segment_stats(z, offset, event)[:4], *_segment_stats(time, offset, event)[:4]]
    q_stats = _segment_stats(data.pulses["charge"].astype(np.float64), offset, event)
    columns += [q_stats[3], q_stats[4]]
    columns.append(np.bincount(event, weights=hlc, minlength=n.shape[0]) / np.maximum(n, 1))
    columns.append(_average_speed(sensor, time, event, n, geometry))
    columns += _hlc_pair_features(offset, event, sensor, time, z, hlc, n, geometry.n_sensors // DOMS_PER_STRING + 1)
    columns.append(np.log10(np.maximum(n, 1)))
    return np.stack(columns, axis=1).astype(np.float32)


# ---- bucketing and padding ----------------------------------------------------------------------
def bucket_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None,
                   shuffle_seed: int | None = None, megabatch: int = 64,
                   max_pairs: int | None = None) -> list[np.ndarray]:
    """Sequence bucketing: event indices grouped into batches of similar length.

    Inference (``shuffle_seed=None``; the whole-shard path, streaming uses :func:`inference_batches`):
    all events sorted by length and cut into consecutive batches of at most ``batch_size`` events,
    ``max_tokens`` padded slots and ``max_pairs`` pulse pairs (B * L^2). Training: events shuffled,
    then sorted by length inside windows of ``megabatch`` batches, and the batch order shuffled,
    so each batch is both random and tightly packed.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = lengths.shape[0]
    if n == 0:
        return []
    if shuffle_seed is None:
        order = np.argsort(lengths, kind="stable")
        return _cut(order, lengths, batch_size, max_tokens, max_pairs)
    rng = np.random.default_rng(shuffle_seed)
    order = rng.permutation(n)
    window = batch_size * megabatch
    batches: list[np.ndarray] = []
    for start in range(0, n, window):       # loop over windows (few), not events
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(_cut(chunk, lengths, batch_size, max_tokens, max_pairs))
    return [batches[i] for i in rng.permutation(len(batches))]


def _cut(order: np.ndarray, lengths: np.ndarray, batch_size: int, max_tokens: int | None,
         max_pairs: int | None = None, cost=None, max_bytes: int | None = None) -> list[np.ndarray]:
    """Cut length-sorted ``order`` into batches; loops over batches, not events."""
    if cost is None or max_bytes is None:
        cost = max_bytes = None
    if max_tokens is None and max_pairs is None and max_bytes is None:
        return [order[i:i + batch_size] for i in range(0, order.shape[0], batch_size)]
    sorted_len = np.maximum(lengths[order], 1).astype(np.int64)
    batches, start, n = [], 0, order.shape[0]
    while start < n:
        stop = min(start + batch_size, n)
        # Largest stop whose padded cost fits the budgets (lengths ascending, so cost grows).
        count = np.arange(1, stop - start + 1)
        longest = sorted_len[start:stop]
        fits = np.ones(count.shape[0], dtype=bool)
        if max_tokens is not None:
            fits &= count * longest <= max_tokens
        if max_pairs is not None:
            fits &= count * longest * longest <= max_pairs
        if max_bytes is not None:
            fits &= cost.batch_bytes(count, longest.astype(np.float64)) <= max_bytes
        stop = start + (int(np.flatnonzero(fits)[-1]) + 1 if fits.any() else 1)
        batches.append(order[start:stop])
        start = stop
    return batches


def padded_length(lengths: np.ndarray, limit: int | None = None) -> np.ndarray:
    """The slots inference pads an event of ``lengths`` pulses to, a function of its own length alone:
    multiples of 8 up to 64, then steps of at most 1/8, never past the model's ``limit``. The padding
    depends on the event only, never on its batch or chunk mates, so even a model whose output did
    depend on its padding (the kNN models did, until ``layers.knn`` made the graph padding-free)
    would give an event the same answer in every chunking."""
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    top = int(lengths.max(initial=1))
    steps = np.arange(int(np.ceil(8 * np.log2(max(top, 64) / 64))) + 2)
    grid = np.unique(np.concatenate([np.arange(8, 65, 8), np.ceil(64 * 2.0 ** (steps / 8)).astype(np.int64)]))
    padded = grid[np.searchsorted(grid, lengths)]
    return np.minimum(padded, limit) if limit else padded


def inference_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None, cost=None,
                      max_bytes: int | None = None, limit: int | None = None) -> list[tuple[np.ndarray, int]]:
    """(event indices, padded length) of inference batches: events sorted by length, grouped by
    :func:`padded_length` and cut by ``batch_size``, ``max_tokens`` and ``max_bytes`` of the model's
    ``cost`` at the padded length. Loops over length groups (a few dozen), not events."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    padded = padded_length(lengths[order], limit)
    bounds = np.flatnonzero(np.diff(padded)) + 1
    batches = []
    for group in np.split(np.arange(order.shape[0]), bounds) if order.shape[0] else []:
        pad = int(padded[group[0]])
        width = np.full(order.shape[0], pad)
        batches.extend((b, pad) for b in _cut(order[group], width, batch_size, max_tokens, None, cost, max_bytes))
    return batches


def padding_efficiency(batches: list[np.ndarray], lengths: np.ndarray) -> float:
    """Fraction of real pulses among the padded slots the batches occupy."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max(initial=0)) * b.shape[0] for b in batches)
    return real / padded if padded else 1.0


def collate(features: ShardFeatures, events: np.ndarray, truth_direction: np.ndarray | None = None,
            device: str | torch.device = "cpu", pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad the chosen events' pulses into (B, L, ...) tensors plus a (B, L) validity mask; L is the
    longest event's length, or ``pad_to`` when that is longer."""
    events = np.asarray(events, dtype=np.int64)
    offset = features.selection.offset
    lengths = offset[events + 1] - offset[events]
    longest = max(int(lengths.max(initial=0)), 1, pad_to or 0)
    batch_size = events.shape[0]
    row = np.repeat(np.arange(batch_size), lengths)
    slot = np.arange(row.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = np.repeat(offset[events], lengths) + slot
    out: dict[str, torch.Tensor] = {}
    for name, values in features.pulse.items():
        padded = np.zeros((batch_size, longest) + values.shape[1:], dtype=values.dtype)
        padded[row, slot] = values[flat]
        out[name] = torch.from_numpy(padded)
    mask = np.zeros((batch_size, longest), dtype=bool)
    mask[row, slot] = True
    out["mask"] = torch.from_numpy(mask)
    out["length"] = torch.from_numpy(lengths.astype(np.int64))
    for name, values in features.event.items():
        out[name] = torch.from_numpy(np.ascontiguousarray(values[events]))
    if truth_direction is not None:
        out["target"] = torch.from_numpy(truth_direction[events].astype(np.float32))
    return {k: v.to(device) for k, v in out.items()}
