"""Which pulses of each event a model sees above its sequence limit: the truncation rules, chunk-exact.

Only events above the limit are ranked, by one sort of a single integer key (event, HLC flag, draw);
the seeded draw of a pulse is number ``pulse_start + i`` of one stream for the whole shard, so a chunk of
events selects exactly the pulses the whole shard does, and the pre-streaming path did
(:func:`select_pulses_whole_shard`, kept as the reference). Nothing loops over events or pulses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Kaggle convention: auxiliary == True means the pulse is NOT in hard local coincidence (HLC).
TRUNCATION_RULES = ("first_in_time", "hlc_first", "random")


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


def pulses_of(offset: np.ndarray, events: np.ndarray) -> np.ndarray:
    """Flat indices of the pulses of ``events`` (ascending event indices), grouped by event."""
    lengths = offset[events + 1] - offset[events]
    start_in_output = np.cumsum(lengths) - lengths
    return np.repeat(offset[events] - start_in_output, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def time_order(offset: np.ndarray, time: np.ndarray) -> np.ndarray | None:
    """Permutation putting each event's pulses in (time, index) order, None when they already are
    (Kaggle batches are); only the events that are not time-ordered are sorted."""
    step_back = np.flatnonzero(time[1:] < time[:-1]) + 1
    event = np.searchsorted(offset, step_back, side="right") - 1
    unsorted = np.unique(event[step_back > offset[event]])
    if unsorted.shape[0] == 0:
        return None
    order = np.arange(int(offset[-1]), dtype=np.int64)
    pulses = pulses_of(offset, unsorted)
    group = np.repeat(np.arange(unsorted.shape[0]), np.diff(offset)[unsorted])
    order[pulses] = pulses[np.lexsort((time[pulses], group))]
    return order


def seeded_bits(seed: int, first: int, count: int) -> np.ndarray:
    """The 53-bit integers behind draws ``first .. first + count`` of ``default_rng(seed).random``
    (draw = bits / 2**53): a pulse's draw depends on its place in the shard only, so any chunking of
    the shard draws the same values."""
    generator = np.random.PCG64(seed)
    generator.advance(first)
    bits = generator.random_raw(count)
    bits >>= np.uint64(11)
    return bits


def _priority_key(group: np.ndarray, bits: np.ndarray, auxiliary: np.ndarray | None) -> np.ndarray:
    """One uint64 per pulse ordering (event, [non-HLC after HLC], draw): the draw keeps the bits left
    once the event index and the HLC flag have theirs."""
    group_bits = max(1, int(group[-1]).bit_length())
    flag_bits = 0 if auxiliary is None else 1
    kept = min(53, 64 - group_bits - flag_bits)
    key = bits >> np.uint64(53 - kept)
    if auxiliary is not None:
        key |= auxiliary.astype(np.uint64) << np.uint64(kept)
    shifted = group.astype(np.uint64)
    shifted <<= np.uint64(kept + flag_bits)
    key |= shifted
    return key


def _by_priority(rule: str, seed: int | None, pulses: np.ndarray, group: np.ndarray, order: np.ndarray | None,
                 time: np.ndarray, auxiliary: np.ndarray, pulse_start: int) -> np.ndarray:
    """The pulses of the long events, grouped by event, best first."""
    in_time = pulses if order is None else order[pulses]      # each long event's pulses by (time, index)
    if rule == "first_in_time":
        return in_time
    if seed is None:                 # unseeded: "random" draws fresh entropy, "hlc_first" takes the earliest
        if rule == "hlc_first":
            return in_time[np.lexsort((auxiliary[in_time], group))]
        return pulses[np.lexsort((np.random.default_rng().random(pulses.shape[0]), group))]
    span = int(pulses[-1] - pulses[0]) + 1
    bits = seeded_bits(seed, pulse_start + int(pulses[0]), span)
    if span != pulses.shape[0]:      # short events between the long ones: their draws are skipped
        bits = bits[pulses - pulses[0]]
    flags = auxiliary[pulses] if rule == "hlc_first" else None
    exact = (bits, group) if flags is None else (bits, flags, group)
    return pulses[order_by_key(_priority_key(group, bits, flags), exact)]


def order_by_key(key: np.ndarray, exact: tuple[np.ndarray, ...]) -> np.ndarray:
    """``np.lexsort(exact)`` by one sort of ``key``, a uint64 that orders like ``exact``'s keys but
    may have merged near-equal draws: when two keys tie, the exact, stable lexsort is done instead."""
    by_key = np.argsort(key)
    sorted_key = key[by_key]
    if np.any(sorted_key[1:] == sorted_key[:-1]):
        return np.lexsort(exact)
    return by_key


def select_pulses(offset: np.ndarray, time: np.ndarray, auxiliary: np.ndarray, limit: int | None,
                  rule: str = "hlc_first", seed: int | None = 0, pulse_start: int = 0) -> Selection:
    """Keep at most ``limit`` pulses per event, chosen by ``rule``, returned in time order.

    ``first_in_time``: the earliest pulses. ``hlc_first``: HLC pulses before non-HLC ones; among
    equals a random draw when ``seed`` is given (the 3rd place sampling, reproducible because
    the generator is seeded), else the earliest. ``random``: a uniform random subset, whatever the
    HLC flag (what the 2nd place's code does, though its comments say HLC first).

    The draw for a pulse is number ``pulse_start + i`` of ``default_rng(seed).random`` (``pulse_start``:
    where these pulses start in their shard), so a chunk of events selects exactly what the whole
    shard does, and what the pre-streaming path did. Only the pulses of events above ``limit`` are
    ranked, by one sort of a single integer key.
    """
    if rule not in TRUNCATION_RULES:
        raise ValueError(f"unknown truncation rule '{rule}' (have {', '.join(TRUNCATION_RULES)})")
    offset = np.asarray(offset, dtype=np.int64)
    n_pulses = np.diff(offset)
    order = time_order(offset, time)
    long_events = np.flatnonzero(n_pulses > limit) if limit is not None else np.zeros(0, np.int64)
    if long_events.shape[0] == 0:
        index = np.arange(int(offset[-1]), dtype=np.int64) if order is None else order
        return Selection(index=index, offset=offset.copy(), n_pulses=n_pulses)
    pulses = pulses_of(offset, long_events)
    long_lengths = n_pulses[long_events]
    group = np.repeat(np.arange(long_events.shape[0], dtype=np.int32), long_lengths)
    by_priority = _by_priority(rule, seed, pulses, group, order, time, auxiliary, pulse_start)
    rank = np.arange(pulses.shape[0]) - np.repeat(np.cumsum(long_lengths) - long_lengths, long_lengths)
    keep = np.ones(int(offset[-1]), dtype=bool)
    keep[pulses] = False
    keep[by_priority[rank < limit]] = True
    new_offset = np.zeros_like(offset)
    np.cumsum(np.minimum(n_pulses, limit), out=new_offset[1:])
    index = np.flatnonzero(keep) if order is None else order[keep[order]]
    return Selection(index=index, offset=new_offset, n_pulses=n_pulses)


def select_pulses_whole_shard(offset: np.ndarray, time: np.ndarray, auxiliary: np.ndarray, limit: int | None,
                              rule: str = "hlc_first", seed: int | None = 0) -> Selection:
    """The pre-streaming selection (lexsorts of every pulse), kept as the reference that
    :func:`select_pulses` must equal and that ``benchmarks/inference.py --legacy`` times."""
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
    by_priority = np.lexsort(priority_keys)
    rank = np.arange(n_total) - offset[event[by_priority]]
    kept = by_priority[rank < limit]
    kept = kept[np.lexsort((kept, time[kept], event[kept]))]
    new_offset = np.zeros_like(offset)
    np.cumsum(np.minimum(n_pulses, limit), out=new_offset[1:])
    return Selection(index=kept.astype(np.int64), offset=new_offset, n_pulses=n_pulses)
