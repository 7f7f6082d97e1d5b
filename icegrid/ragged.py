"""Ragged arrays, the one place for their idioms: flat pulse arrays cut into events by offsets
(``offset[i]:offset[i + 1]`` are event i's pulses), vectorised over all events, never a Python loop."""

from __future__ import annotations

import numpy as np


def offsets(lengths: np.ndarray) -> np.ndarray:
    """(n + 1,) int64 starts of n consecutive runs of ``lengths``; the last entry is the total."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def positions_within(lengths: np.ndarray) -> np.ndarray:
    """For every element of the flat array, its index inside its own run (0, 1, ... per event)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
