"""The per-shard map step: one shard's opening angles -> additive histograms.

``shard_histograms`` turns one shard's angles and truth into fine log-angle histograms, for each binned view
the truth allows:

* energy: shape × direction × energy bin (the paper's Figs. 7-10), when the truth has an energy; without a
  shape (track/cascade) the shape axis is one ``"all"`` entry;
* direction: up-going / down-going over all events (the opening-angle distribution);
* zenith: bins in cos(true zenith), which needs only the true direction (the Kaggle train split);
* pulses: direction × bins in the number of pulses, when the event lengths are known;

plus exact sums for the Kaggle score (all, up-going, down-going) and exact counts in coarse angle bins.
Histograms of shards add up with ``+``, so a store larger than memory is analysed one shard at a time and a
cluster can map this over shards and sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from icegrid.analysis.angles import AngleGrid
from icegrid.analysis.settings import DIRECTIONS, AnalysisSettings
from icegrid.kaggle import SHAPES

ALL_SHAPES = ("all",)  # the shape axis when the truth has no track/cascade label


@dataclass(frozen=True)
class ViewBinning:
    """Bin edges of the views other than energy: cos(zenith), number of pulses, coarse angles (deg)."""

    zenith_edges: np.ndarray
    pulse_edges: np.ndarray
    distribution_edges: np.ndarray

    @classmethod
    def from_settings(cls, settings: AnalysisSettings) -> "ViewBinning":
        return cls(settings.zenith.edges(), np.asarray(settings.pulses.edges, dtype=np.int64),
                   np.asarray(settings.distribution_edges_deg, dtype=np.float64))

    @cached_property
    def _pulse_table(self) -> np.ndarray:
        # Every count up to the last edge: binning is then a gather instead of a binary search per event.
        return np.searchsorted(self.pulse_edges, np.arange(int(self.pulse_edges[-1]) + 1), side="right") - 1

    def pulse_bin(self, n_pulses: np.ndarray) -> np.ndarray:
        """Bin of each event's pulse count (-1 below the first edge, n_bins from the last edge on)."""
        return self._pulse_table[np.clip(n_pulses, 0, self._pulse_table.size - 1)]


def _uniform_bin(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of ``values`` in equal-width ``edges`` by arithmetic, corrected exactly against the edges (as
    ``np.histogram`` does); values on or beyond the last edge go to the last bin, below the first to bin 0."""
    n_bins = edges.size - 1
    index = np.clip(((values - edges[0]) * (n_bins / (edges[-1] - edges[0]))).astype(np.int64), 0, n_bins - 1)
    index -= values < edges[index]
    index += (values >= edges[index + 1]) & (index < n_bins - 1)
    return np.clip(index, 0, n_bins - 1)


@dataclass
class AngleCounts:
    """Additive log-grid counts ``counts[..., angle_bin]`` and angle sums ``angle_sum_deg[...]`` of a view."""

    counts: np.ndarray
    angle_sum_deg: np.ndarray

    @classmethod
    def of(cls, group: np.ndarray, shape: tuple[int, ...], angle_bin: np.ndarray, angles_deg: np.ndarray,
           n_angle_bins: int) -> "AngleCounts":
        n_groups = int(np.prod(shape))
        counts = np.bincount(group * n_angle_bins + angle_bin, minlength=n_groups * n_angle_bins)
        sums = np.bincount(group, weights=angles_deg, minlength=n_groups)
        return cls(counts.reshape(*shape, n_angle_bins), sums.reshape(shape))

    def __add__(self, other: "AngleCounts") -> "AngleCounts":
        return AngleCounts(self.counts + other.counts, self.angle_sum_deg + other.angle_sum_deg)


def _add(a, b):
    # None: that view has no data (e.g. no pulse counts); adding it changes nothing.
    return b if a is None else a if b is None else a + b


@dataclass
class ResolutionHistograms:
    """Additive summary of one model's opening angles (sum shards with ``+``).

    ``counts[shape, direction, energy_bin, angle_bin]`` on the log grid, ``angle_sum_deg`` for the means,
    and over all events with a finite prediction (any energy): ``n_scored``, ``angle_sum_rad``, and the
    same per direction. ``shapes`` is ``SHAPES`` or ``("all",)``; without truth energy there are no energy
    bins (``has_energy`` False) and only the other views are filled.
    """

    counts: np.ndarray
    angle_sum_deg: np.ndarray
    n_scored: int = 0
    angle_sum_rad: float = 0.0
    n_invalid: int = 0          # NaN/zero-length predictions, left out everywhere
    n_outside_energy: int = 0   # scored, but outside the energy bins
    shapes: tuple[str, ...] = SHAPES
    has_energy: bool = True
    scored_by_direction: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.int64))
    angle_sum_rad_by_direction: np.ndarray = field(default_factory=lambda: np.zeros(2))
    by_direction: AngleCounts | None = None   # [direction, angle]
    by_zenith: AngleCounts | None = None      # [cos-zenith bin, angle]
    by_pulses: AngleCounts | None = None      # [direction, pulse bin, angle]; None: lengths unknown
    distribution: np.ndarray | None = None    # [direction, coarse angle bin], exact counts
    n_outside_pulses: int = 0                 # scored, but with more pulses than the last pulse edge

    @classmethod
    def empty(cls, n_energy_bins: int, n_angle_bins: int, shapes: tuple[str, ...] = SHAPES,
              has_energy: bool = True) -> "ResolutionHistograms":
        return cls(np.zeros((len(shapes), len(DIRECTIONS), n_energy_bins, n_angle_bins), dtype=np.int64),
                   np.zeros((len(shapes), len(DIRECTIONS), n_energy_bins)), shapes=shapes, has_energy=has_energy)

    def __add__(self, other: "ResolutionHistograms") -> "ResolutionHistograms":
        if (self.shapes, self.has_energy) != (other.shapes, other.has_energy):
            raise ValueError("cannot add histograms made from different kinds of truth")
        return ResolutionHistograms(
            self.counts + other.counts, self.angle_sum_deg + other.angle_sum_deg,
            self.n_scored + other.n_scored, self.angle_sum_rad + other.angle_sum_rad,
            self.n_invalid + other.n_invalid, self.n_outside_energy + other.n_outside_energy,
            self.shapes, self.has_energy, self.scored_by_direction + other.scored_by_direction,
            self.angle_sum_rad_by_direction + other.angle_sum_rad_by_direction,
            _add(self.by_direction, other.by_direction), _add(self.by_zenith, other.by_zenith),
            _add(self.by_pulses, other.by_pulses), _add(self.distribution, other.distribution),
            self.n_outside_pulses + other.n_outside_pulses)


def shard_histograms(angles_rad: np.ndarray, energy: np.ndarray | None, shape: np.ndarray | None,
                     true_zenith: np.ndarray, energy_edges: np.ndarray, grid: AngleGrid,
                     n_pulses: np.ndarray | None = None, views: ViewBinning | None = None) -> ResolutionHistograms:
    """Histogram one shard's opening angles by every view the truth allows (pure, additive).

    ``shape`` holds codes into ``SHAPES`` (0 cascade, 1 track), or is None (no split); ``energy`` None: no
    energy view. Events with a NaN angle are counted in ``n_invalid`` and left out; events outside the
    energy edges count in the Kaggle score and the other views only.
    """
    views = views or ViewBinning.from_settings(AnalysisSettings())
    angles_rad = np.asarray(angles_rad, dtype=np.float64)
    valid = np.isfinite(angles_rad)
    shapes = SHAPES if shape is not None else ALL_SHAPES
    n_energy = len(energy_edges) - 1 if energy is not None else 0
    out = ResolutionHistograms.empty(n_energy, grid.n_bins, shapes, has_energy=energy is not None)
    out.n_invalid = int((~valid).sum())
    angles_rad = angles_rad[valid]
    out.n_scored = int(angles_rad.size)
    out.angle_sum_rad = float(angles_rad.sum())
    zenith = np.asarray(true_zenith)[valid]
    up_going = (zenith > np.pi / 2).astype(np.int64)
    angles_deg = np.degrees(angles_rad)
    angle_bin = grid.index(angles_deg)
    if energy is not None:
        shape_code = np.asarray(shape)[valid] if shape is not None else np.zeros(angles_rad.size, np.int64)
        _energy_view(out, angles_deg, angle_bin, np.asarray(energy)[valid], shape_code, up_going, energy_edges,
                     grid.n_bins)
    out.scored_by_direction = np.bincount(up_going, minlength=2)
    out.angle_sum_rad_by_direction = np.bincount(up_going, weights=angles_rad, minlength=2)
    out.by_direction = AngleCounts.of(up_going, (2,), angle_bin, angles_deg, grid.n_bins)
    n_zenith = views.zenith_edges.size - 1
    zenith_bin = _uniform_bin(np.cos(zenith), views.zenith_edges)
    out.by_zenith = AngleCounts.of(zenith_bin, (n_zenith,), angle_bin, angles_deg, grid.n_bins)
    if n_pulses is not None:
        n_bins = views.pulse_edges.size - 1
        pulse_bin = views.pulse_bin(np.asarray(n_pulses)[valid])
        inside = (pulse_bin >= 0) & (pulse_bin < n_bins)
        out.n_outside_pulses = int((~inside).sum())
        out.by_pulses = AngleCounts.of((up_going * n_bins + pulse_bin)[inside], (2, n_bins), angle_bin[inside],
                                       angles_deg[inside], grid.n_bins)
    n_coarse = views.distribution_edges.size - 1
    # Angles outside the coarse edges (none with the default 0-180°) count in the first or last bin.
    coarse = np.searchsorted(views.distribution_edges[1:-1], angles_deg, side="right")
    out.distribution = np.bincount(up_going * n_coarse + coarse, minlength=2 * n_coarse).reshape(2, n_coarse)
    return out


def _energy_view(out: ResolutionHistograms, angles_deg: np.ndarray, angle_bin: np.ndarray, energy: np.ndarray,
                 shape_code: np.ndarray, up_going: np.ndarray, energy_edges: np.ndarray, n_angle_bins: int) -> None:
    n_energy = len(energy_edges) - 1
    n_shapes = len(out.shapes)
    energy_bin = np.searchsorted(energy_edges, energy, side="right") - 1
    shape_code = shape_code.astype(np.int64)
    in_range = (energy_bin >= 0) & (energy_bin < n_energy) & (shape_code >= 0) & (shape_code < n_shapes)
    out.n_outside_energy = int((~in_range).sum())
    group = ((shape_code * len(DIRECTIONS) + up_going) * n_energy + energy_bin)[in_range]
    n_groups = n_shapes * len(DIRECTIONS) * n_energy
    flat = group * n_angle_bins + angle_bin[in_range]
    out.counts = np.bincount(flat, minlength=n_groups * n_angle_bins).reshape(out.counts.shape)
    out.angle_sum_deg = np.bincount(group, weights=angles_deg[in_range],
                                    minlength=n_groups).reshape(out.angle_sum_deg.shape)
