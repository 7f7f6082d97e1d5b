"""The reduce step over whole tables: every model's summed histograms -> the rows of every table, the
scores, the KDE curves the figures draw, and the warnings and notes (what was skipped and why).

Seeds derive from the bootstrap seed and each bin's identity, so results do not depend on processing order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from icegrid.analysis.angles import AngleGrid
from icegrid.analysis.histograms import ResolutionHistograms
from icegrid.analysis.kde import BinResult, bin_resolution
from icegrid.analysis.settings import DIRECTIONS, AnalysisError, AnalysisSettings

VIEW_DIRECTIONS = ("all", "up", "down")


def bin_seed(base_seed: int, model: str, shape: int, direction: int, energy_bin: int) -> np.random.SeedSequence:
    """A seed that depends only on the bin's identity, not on the order bins are processed in."""
    return np.random.SeedSequence([base_seed, zlib.crc32(model.encode()), shape, direction, energy_bin])


def view_seed(base_seed: int, model: str, view: str, *index: int) -> np.random.SeedSequence:
    """Like ``bin_seed`` for the other views (``view`` keeps their streams apart from the energy bins')."""
    return np.random.SeedSequence([base_seed, zlib.crc32(model.encode()), zlib.crc32(view.encode()), *index])


@dataclass
class AnalysisResult:
    """Everything ``icegrid analyze`` writes: table rows, per-model scores, KDE curves, warnings, notes.

    ``rows``/``curves``: resolution vs energy (empty without truth energy), ``curves`` keyed by
    (model, shape, direction, energy_bin); ``overall_curves`` by (model, direction); ``range_curves`` by
    (model, shape, direction, (e_lo, e_hi)) for the paper's single-bin KDE figures.
    """

    rows: list[dict]
    scores: list[dict]
    curves: dict[tuple[str, str, str, int], BinResult]
    energy_edges: np.ndarray
    warnings: list[str]
    notes: list[str] = field(default_factory=list)
    shapes: tuple[str, ...] = ("cascade", "track")
    has_energy: bool = True
    zenith_rows: list[dict] = field(default_factory=list)
    pulse_rows: list[dict] = field(default_factory=list)
    overall_rows: list[dict] = field(default_factory=list)
    overall_curves: dict[tuple[str, str], BinResult] = field(default_factory=dict)
    distribution_rows: list[dict] = field(default_factory=list)
    range_rows: list[dict] = field(default_factory=list)
    range_curves: dict[tuple[str, str, str, tuple[float, float]], BinResult] = field(default_factory=dict)


def _stats(result: BinResult) -> dict:
    return {"n_events": result.n_events, "mode_deg": result.mode_deg, "mode_lo_deg": result.mode_lo_deg,
            "mode_hi_deg": result.mode_hi_deg, "median_deg": result.median_deg, "mean_deg": result.mean_deg}


def kde_ranges(settings: AnalysisSettings) -> list[tuple[int, int]]:
    """The paper layout's single-bin KDE ranges as (first, last + 1) energy bins; each end must be an edge."""
    edges = settings.energy.edges()
    out = []
    for lo, hi in settings.figures.kde_bins_gev:
        ends = []
        for value in (lo, hi):
            at = int(np.argmin(np.abs(np.log(edges) - np.log(value))))
            if abs(edges[at] / value - 1) > 0.01:
                near = ", ".join(f"{e:.3g}" for e in edges[max(at - 1, 0):at + 2])
                raise AnalysisError(f"KDE range {lo:g}:{hi:g} GeV: {value:g} is not an energy bin edge "
                                    f"(edges near it: {near} GeV; set energy bins in analysis.yaml)")
            ends.append(at)
        out.append((ends[0], ends[1]))
    return out


def _score(hist: ResolutionHistograms, model: str) -> dict:
    def mean(total, n):
        return total / n if n else float("nan")

    up, down = int(hist.scored_by_direction[1]), int(hist.scored_by_direction[0])
    return {"model": model, "n_events": hist.n_scored, "kaggle_score_rad": mean(hist.angle_sum_rad, hist.n_scored),
            "n_up": up, "kaggle_score_up_rad": mean(hist.angle_sum_rad_by_direction[1], up),
            "n_down": down, "kaggle_score_down_rad": mean(hist.angle_sum_rad_by_direction[0], down)}


def _energy_rows(model: str, hist: ResolutionHistograms, settings: AnalysisSettings, grid: AngleGrid,
                 result: AnalysisResult) -> None:
    edges = settings.energy.edges()
    for shape_index in reversed(range(len(hist.shapes))):      # track first, as in the paper's order
        for direction_index in reversed(range(len(DIRECTIONS))):  # up first
            for energy_bin in range(len(edges) - 1):
                fit = bin_resolution(hist.counts[shape_index, direction_index, energy_bin],
                                     hist.angle_sum_deg[shape_index, direction_index, energy_bin], settings,
                                     bin_seed(settings.bootstrap.seed, model, shape_index, direction_index,
                                              energy_bin), grid)
                shape_name, direction_name = hist.shapes[shape_index], DIRECTIONS[direction_index]
                result.rows.append({"model": model, "shape": shape_name, "direction": direction_name,
                                    "e_lo": float(edges[energy_bin]), "e_hi": float(edges[energy_bin + 1]),
                                    **_stats(fit)})
                if np.isfinite(fit.mode_deg):
                    result.curves[(model, shape_name, direction_name, energy_bin)] = fit


def _range_rows(model: str, hist: ResolutionHistograms, settings: AnalysisSettings, grid: AngleGrid,
                result: AnalysisResult) -> None:
    edges = settings.energy.edges()
    for first, stop in kde_ranges(settings):
        span = (float(edges[first]), float(edges[stop]))
        for shape_index in reversed(range(len(hist.shapes))):
            for direction_index in reversed(range(len(DIRECTIONS))):
                counts = hist.counts[shape_index, direction_index, first:stop].sum(axis=0)
                total = hist.angle_sum_deg[shape_index, direction_index, first:stop].sum()
                fit = bin_resolution(counts, total, settings, view_seed(settings.bootstrap.seed, model, "range",
                                     shape_index, direction_index, first, stop), grid)
                shape_name, direction_name = hist.shapes[shape_index], DIRECTIONS[direction_index]
                result.range_rows.append({"model": model, "shape": shape_name, "direction": direction_name,
                                          "e_lo": span[0], "e_hi": span[1], **_stats(fit)})
                if np.isfinite(fit.mode_deg):
                    result.range_curves[(model, shape_name, direction_name, span)] = fit


def _view_rows(model: str, hist: ResolutionHistograms, settings: AnalysisSettings, grid: AngleGrid,
               result: AnalysisResult) -> None:
    seed = settings.bootstrap.seed
    direction_counts = {"all": (hist.by_direction.counts.sum(axis=0), hist.by_direction.angle_sum_deg.sum()),
                        "up": (hist.by_direction.counts[1], hist.by_direction.angle_sum_deg[1]),
                        "down": (hist.by_direction.counts[0], hist.by_direction.angle_sum_deg[0])}
    for index, direction in enumerate(VIEW_DIRECTIONS):
        counts, total = direction_counts[direction]
        fit = bin_resolution(counts, total, settings, view_seed(seed, model, "direction", index), grid)
        result.overall_rows.append({"model": model, "direction": direction, **_stats(fit)})
        if np.isfinite(fit.mode_deg):
            result.overall_curves[(model, direction)] = fit
    zenith_edges = settings.zenith.edges()
    for index in range(zenith_edges.size - 1):
        fit = bin_resolution(hist.by_zenith.counts[index], hist.by_zenith.angle_sum_deg[index], settings,
                             view_seed(seed, model, "zenith", index), grid)
        result.zenith_rows.append({"model": model, "cos_zenith_lo": float(zenith_edges[index]),
                                   "cos_zenith_hi": float(zenith_edges[index + 1]), **_stats(fit)})
    if hist.by_pulses is not None:
        pulse_edges = settings.pulses.edges
        for direction_index in reversed(range(len(DIRECTIONS))):  # up first
            for index in range(len(pulse_edges) - 1):
                fit = bin_resolution(hist.by_pulses.counts[direction_index, index],
                                     hist.by_pulses.angle_sum_deg[direction_index, index], settings,
                                     view_seed(seed, model, "pulses", direction_index, index), grid)
                result.pulse_rows.append({"model": model, "direction": DIRECTIONS[direction_index],
                                          "n_pulses_lo": int(pulse_edges[index]),
                                          "n_pulses_hi": int(pulse_edges[index + 1]), **_stats(fit)})
    _distribution_rows(model, hist, settings, result)


def _distribution_rows(model: str, hist: ResolutionHistograms, settings: AnalysisSettings,
                       result: AnalysisResult) -> None:
    edges = settings.distribution_edges_deg
    per_direction = {"all": hist.distribution.sum(axis=0), "up": hist.distribution[1], "down": hist.distribution[0]}
    for direction in VIEW_DIRECTIONS:
        counts = per_direction[direction]
        total = counts.sum()
        fraction = counts / total if total else np.full(counts.shape, np.nan)
        cumulative = np.cumsum(fraction)
        for index in range(counts.size):
            result.distribution_rows.append({"model": model, "direction": direction,
                                             "angle_lo_deg": float(edges[index]),
                                             "angle_hi_deg": float(edges[index + 1]),
                                             "n_events": int(counts[index]), "fraction": float(fraction[index]),
                                             "cumulative_fraction": float(cumulative[index])})


def _notes(histograms: dict[str, ResolutionHistograms], settings: AnalysisSettings) -> list[str]:
    if not histograms:
        return []
    first = next(iter(histograms.values()))
    notes = []
    if not first.has_energy:
        views = "cos(zenith) and vs number of pulses" if first.by_pulses is not None else "cos(zenith)"
        notes.append("per-energy resolution skipped: the truth has no energy (true directions only, as in the "
                     "Kaggle train split); written instead: the Kaggle score (all, up- and down-going), the "
                     f"opening-angle distribution and resolution vs {views}")
    elif first.shapes != ("cascade", "track"):
        notes.append("no track/cascade split: the truth has no shape, so resolution vs energy is for all events "
                     "(up- and down-going)")
    if first.by_pulses is None:
        notes.append("resolution vs number of pulses skipped: the truth has no pulse counts "
                     "(first_pulse_index, last_pulse_index)")
    outside = max(h.n_outside_pulses for h in histograms.values())
    if outside:
        notes.append(f"{outside} event(s) with {settings.pulses.edges[-1]} pulses or more are left out of "
                     "resolution vs number of pulses")
    return notes


def summarize(histograms: dict[str, ResolutionHistograms], settings: AnalysisSettings,
              warnings: list[str] | None = None) -> AnalysisResult:
    """Reduce every model's summed histograms to the tables, the scores and the curves."""
    grid = AngleGrid.from_settings(settings)
    edges = settings.energy.edges()
    first = next(iter(histograms.values()), None)
    result = AnalysisResult([], [], {}, edges, list(warnings or []), _notes(histograms, settings),
                            first.shapes if first else ("cascade", "track"), first.has_energy if first else True)
    paper_ranges = result.has_energy and settings.plots and settings.figures.paper
    for model, hist in histograms.items():
        if hist.n_invalid:
            result.warnings.append(f"model '{model}': {hist.n_invalid} prediction(s) are NaN or zero vectors and "
                                   "were left out of the scores and the table")
        if hist.n_outside_energy and hist.has_energy:
            result.warnings.append(f"model '{model}': {hist.n_outside_energy} event(s) outside the energy bins "
                                   f"[{edges[0]:.3g}, {edges[-1]:.3g}] GeV are not in resolution vs energy (they "
                                   "count in the scores and the other tables)")
        result.scores.append(_score(hist, model))
        if hist.has_energy:
            _energy_rows(model, hist, settings, grid, result)
        if paper_ranges:
            _range_rows(model, hist, settings, grid, result)
        if hist.by_direction is not None:
            _view_rows(model, hist, settings, grid, result)
    return result
