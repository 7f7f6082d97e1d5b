"""From a store shard to padded model batches: pulse selection above a sequence limit, per-model
feature scalings, sequence bucketing and padding. Everything here is vectorised over the flat
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

# Kaggle convention: auxiliary == True means the pulse is NOT in hard local coincidence (HLC).
TRUNCATION_RULES = ("first_in_time", "hlc_first", "random")


# ---- pulse selection ------------------------------------------------------------------------------
@dataclass
class Selection:
    """Which pulses of a shard a model sees: flat indices into the shard's pulse arrays."""

    index: np.ndarray       # (n_kept,) int64, grouped by event, time-ordered within an event
    offset: np.ndarray      # (n_events + 1,) int64 into ``index``
    n_pulses: np.ndarray    # (n_events,) int64: pulses the event had before truncation

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offset)


def event_of_pulse(offset: np.ndarray) -> np.ndarray:
    """Event index of every flat pulse (offset is (n_events + 1,))."""
    return np.repeat(np.arange(offset.shape[0] - 1, dtype=np.int64), np.diff(offset))


def select_pulses(offset: np.ndarray, time: np.ndarray, auxiliary: np.ndarray, limit: int | None,
                  rule: str = "hlc_first", seed: int | None = 0) -> Selection:
    """Keep at most ``limit`` pulses per event, chosen by ``rule``, returned in time order.

    ``first_in_time``: the earliest pulses. ``hlc_first``: HLC pulses before non-HLC ones; among
    equals a random draw when ``seed`` is given (the 3rd place sampling, reproducible because
    the generator is seeded), else the earliest. ``random``: a uniform random subset, whatever the
    HLC flag (what the 2nd place's code does, though its comments say HLC first).
    """
    if rule not in TRUNCATION_RULES:
        raise ValueError(f"unknown truncation rule '{rule}' (have {', '.join(TRUNCATION_RULES)})")
    offset = np.asarray(offset, dtype=np.int64)
    n_pulses = np.diff(offset)
    event = event_of_pulse(offset)
    n_total = int(offset[-1])
    if limit is None or n_total == 0 or int(n_pulses.max(initial=0)) <= limit:
        index = np.lexsort((np.arange(n_total), time, event)) if n_total else np.zeros(0, np.int64)
        return Selection(index=index.astype(np.int64), offset=offset.copy(), n_pulses=n_pulses)
    if rule == "first_in_time":
        priority_keys = (np.arange(n_total), time, event)
    elif rule == "random":
        priority_keys = (np.random.default_rng(seed).random(n_total), event)
    else:
        tiebreak = (np.random.default_rng(seed).random(n_total) if seed is not None
                    else time.astype(np.float64))
        priority_keys = (tiebreak, auxiliary.astype(np.int8), event)
    by_priority = np.lexsort(priority_keys)          # grouped by event, best pulses first
    rank = np.arange(n_total) - offset[event[by_priority]]
    kept = by_priority[rank < limit]
    kept = kept[np.lexsort((kept, time[kept], event[kept]))]
    lengths = np.minimum(n_pulses, limit)
    new_offset = np.zeros_like(offset)
    np.cumsum(lengths, out=new_offset[1:])
    return Selection(index=kept.astype(np.int64), offset=new_offset, n_pulses=n_pulses)


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


def _segment_stats(values: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, ...]:
    """(min, max, mean, std, sum) of ``values`` per event; empty events give zeros."""
    n = np.diff(offset)
    nonempty = n > 0
    starts = offset[:-1][nonempty]
    out_min = np.zeros(n.shape[0]); out_max = np.zeros(n.shape[0])
    if values.shape[0]:
        out_min[nonempty] = np.minimum.reduceat(values, starts)
        out_max[nonempty] = np.maximum.reduceat(values, starts)
    event = event_of_pulse(offset)
    total = np.bincount(event, weights=values, minlength=n.shape[0])
    mean = total / np.maximum(n, 1)
    var = np.bincount(event, weights=(values - mean[event]) ** 2, minlength=n.shape[0]) / np.maximum(n, 1)
    return out_min, out_max, mean, np.sqrt(var), total


def engineered_event_features(data: ShardData, geometry: Geometry) -> np.ndarray:
    """The 3rd place selector's event features over ALL pulses of each event (paper Table 5):
    z and absolute-time statistics, charge spread and sum, HLC fraction, average speed between
    consecutive pulses, and the HLC-pair features (HLC pulses on vertically adjacent DOMs of one
    string within 1 us)."""
    offset = data.offset
    n = np.diff(offset)
    n_events = n.shape[0]
    sensor = data.pulses["sensor_id"].astype(np.int64)
    time = data.pulses["time"].astype(np.float64)
    charge = data.pulses["charge"].astype(np.float64)
    hlc = ~data.pulses["auxiliary"]
    xyz = geometry.xyz[sensor]
    event = event_of_pulse(offset)
    z_stats = _segment_stats(xyz[:, 2], offset)[:4]
    t_stats = _segment_stats(time, offset)[:4]
    q_stats = _segment_stats(charge, offset)
    frac_hlc = np.bincount(event, weights=hlc.astype(np.float64), minlength=n_events) / np.maximum(n, 1)
    # Average speed between consecutive pulses of an event (distance / time), Kaggle order kept.
    same_event = event[1:] == event[:-1] if event.shape[0] > 1 else np.zeros(0, bool)
    step = np.linalg.norm(np.diff(xyz, axis=0), axis=1) / np.maximum(np.abs(np.diff(time)), 1.0)
    speed = np.bincount(event[1:][same_event], weights=step[same_event], minlength=n_events) \
        / np.maximum(n - 1, 1)
    # HLC pairs: sort HLC pulses by (event, string, time); a neighbour in that order on an adjacent
    # DOM within 1 us forms a pair.
    hlc_index = np.flatnonzero(hlc)
    string = sensor // DOMS_PER_STRING
    dom = sensor % DOMS_PER_STRING
    order = hlc_index[np.lexsort((time[hlc_index], string[hlc_index], event[hlc_index]))]
    pair_of_event = np.zeros(n_events)
    first_dt = np.zeros(n_events); first_dz = np.zeros(n_events); first_z = np.zeros(n_events)
    if order.shape[0] > 1:
        a, b = order[:-1], order[1:]
        is_pair = ((event[a] == event[b]) & (string[a] == string[b]) & (np.abs(dom[a] - dom[b]) == 1)
                   & (np.abs(time[a] - time[b]) < 1000.0))
        pa, pb = a[is_pair], b[is_pair]
        pair_event = event[pa]
        pair_of_event = np.bincount(pair_event, minlength=n_events) * 2.0 / np.maximum(n, 1)
        pair_time = np.minimum(time[pa], time[pb])
        pair_z = 0.5 * (xyz[pa, 2] + xyz[pb, 2])
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
    columns = [*z_stats, *t_stats, q_stats[3], q_stats[4], frac_hlc, speed, pair_of_event,
               first_dt, first_dz, first_z, np.log10(np.maximum(n, 1))]
    return np.stack(columns, axis=1).astype(np.float32)


# ---- bucketing and padding ----------------------------------------------------------------------
def bucket_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None,
                   shuffle_seed: int | None = None, megabatch: int = 64,
                   max_pairs: int | None = None) -> list[np.ndarray]:
    """Sequence bucketing: event indices grouped into batches of similar length.

    Inference (``shuffle_seed=None``): all events sorted by length and cut into consecutive batches
    of at most ``batch_size`` events, ``max_tokens`` padded slots and ``max_pairs`` pulse pairs
    (B * L^2, what attention and kNN cost). Training: events shuffled,
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
         max_pairs: int | None = None) -> list[np.ndarray]:
    """Cut length-sorted ``order`` into batches; loops over batches, not events."""
    if max_tokens is None and max_pairs is None:
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
        stop = start + (int(np.flatnonzero(fits)[-1]) + 1 if fits.any() else 1)
        batches.append(order[start:stop])
        start = stop
    return batches


def padding_efficiency(batches: list[np.ndarray], lengths: np.ndarray) -> float:
    """Fraction of real pulses among the padded slots the batches occupy."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max(initial=0)) * b.shape[0] for b in batches)
    return real / padded if padded else 1.0


def collate(features: ShardFeatures, events: np.ndarray, truth_direction: np.ndarray | None = None,
            device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Pad the chosen events' pulses into (B, L, ...) tensors plus a (B, L) validity mask."""
    events = np.asarray(events, dtype=np.int64)
    offset = features.selection.offset
    lengths = offset[events + 1] - offset[events]
    longest = max(int(lengths.max(initial=0)), 1)
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
