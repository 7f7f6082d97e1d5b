"""Settings of the resolution analysis (``icegrid/config/analysis.yaml``), the table columns, and the
analysis's one-line error.

Every value can be overridden from a campaign file's ``analysis:`` section or from `icegrid analyze` flags.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from icegrid.kaggle import InputError

DIRECTIONS = ("down", "up")  # index 1: up-going, true zenith > 90°
MAX_ANGLE_DEG = 180.0
_STATS = ("n_events", "mode_deg", "mode_lo_deg", "mode_hi_deg", "median_deg", "mean_deg")
RESOLUTION_COLUMNS = ("model", "shape", "direction", "e_lo", "e_hi", *_STATS)
ZENITH_COLUMNS = ("model", "cos_zenith_lo", "cos_zenith_hi", *_STATS)
PULSES_COLUMNS = ("model", "direction", "n_pulses_lo", "n_pulses_hi", *_STATS)
OPENING_ANGLE_COLUMNS = ("model", "direction", *_STATS)
DISTRIBUTION_COLUMNS = ("model", "direction", "angle_lo_deg", "angle_hi_deg", "n_events", "fraction",
                        "cumulative_fraction")
SCORE_COLUMNS = ("model", "n_events", "kaggle_score_rad", "n_up", "kaggle_score_up_rad", "n_down",
                 "kaggle_score_down_rad")


class AnalysisError(InputError):
    """Input the analysis cannot use (no true directions, unknown model, degrees, ...); one line."""


class EnergyBinning(BaseModel):
    """Bins in log10(true neutrino energy / GeV): ``bins_per_decade`` from 10^log10_min to 10^log10_max,
    or explicit ``edges_gev``."""

    log10_min: float = 2.0
    log10_max: float = 8.0
    bins_per_decade: int = Field(4, ge=1)
    edges_gev: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> "EnergyBinning":
        if self.edges_gev is not None:
            edges = np.asarray(self.edges_gev, dtype=float)
            if edges.size < 2 or not (np.diff(edges) > 0).all() or edges[0] <= 0:
                raise ValueError("edges_gev must be at least two positive, increasing energies")
        elif self.log10_max <= self.log10_min:
            raise ValueError("log10_max must be above log10_min")
        return self

    def edges(self) -> np.ndarray:
        if self.edges_gev is not None:
            return np.asarray(self.edges_gev, dtype=float)
        n_bins = int(round((self.log10_max - self.log10_min) * self.bins_per_decade))
        return np.logspace(self.log10_min, self.log10_max, max(n_bins, 1) + 1)


def _increasing(values: list[float], what: str) -> list[float]:
    if len(values) < 2 or not (np.diff(values) > 0).all():
        raise ValueError(f"{what} must be at least two increasing values")
    return values


class ZenithBinning(BaseModel):
    """Equal bins in cos(true zenith) from -1 (straight up-going) to 1 (straight down-going)."""

    cos_bins: int = Field(10, ge=1)

    def edges(self) -> np.ndarray:
        return np.linspace(-1.0, 1.0, self.cos_bins + 1)


class PulseBinning(BaseModel):
    """Bins in the number of pulses of an event, ``[edges[i], edges[i+1])``; longer events are left out."""

    edges: list[int] = [1, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000, 10000, 100000]

    @field_validator("edges")
    @classmethod
    def _check(cls, value: list[int]) -> list[int]:
        if value and value[0] < 1:
            raise ValueError("edges must start at 1 pulse or more")
        return _increasing(value, "edges")


class BandwidthSettings(BaseModel):
    """How wide the kernel is; see ``icegrid.analysis.kde``. ``relative``: kernel width at the mode =
    ``factor · 0.9 · n^(-1/5)`` × mode; ``fixed``: = ``value`` × mode; ``robust_silverman``: Silverman's
    rule on the shortest half of the events (no iteration)."""

    rule: Literal["relative", "fixed", "robust_silverman"] = "relative"
    factor: float = Field(2.5, gt=0)
    value: float | None = Field(None, gt=0)
    iterations: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "BandwidthSettings":
        if self.rule == "fixed" and self.value is None:
            raise ValueError("rule 'fixed' needs a value (the kernel width at the mode as a fraction of the mode)")
        return self


class KDESettings(BaseModel):
    power: float = Field(0.75, gt=0, le=1)
    grid_points: int = Field(2048, ge=64)
    min_angle_deg: float = Field(1e-3, gt=0, lt=1)
    window_points: int = Field(1024, ge=64)
    window_factor: float = Field(5.0, ge=2)
    display_points: int = Field(400, ge=10)
    zero_boundary: Literal["odd", "even"] = "odd"


class BootstrapSettings(BaseModel):
    resamples: int = Field(100, ge=0)
    seed: int = 20230417
    confidence: float = Field(0.6827, gt=0, lt=1)


class ModelStyle(BaseModel):
    """How one model is drawn: its legend label and a matplotlib colour (fixed, whatever else is present)."""

    label: str
    color: str


class FigureSettings(BaseModel):
    """Which figures are drawn and how (``icegrid.plots``)."""

    layout: Literal["grid", "paper", "all"] = "grid"
    kde_bins_gev: list[tuple[float, float]] = [(1e6, 1e7)]
    panels_per_figure: int = Field(8, ge=1)
    columns: int = Field(4, ge=1)
    font_size: float = Field(12.0, ge=6)
    dpi: int = Field(150, ge=50, le=600)
    styles: dict[str, ModelStyle] = {}

    @field_validator("kde_bins_gev")
    @classmethod
    def _check_ranges(cls, value: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for lo, hi in value:
            if not 0 < lo < hi:
                raise ValueError(f"energy range {lo:g}:{hi:g} must be two positive, increasing energies")
        return value

    @property
    def paper(self) -> bool:
        return self.layout in ("paper", "all")

    @property
    def grid(self) -> bool:
        return self.layout in ("grid", "all")


class AnalysisSettings(BaseModel):
    energy: EnergyBinning = EnergyBinning()
    zenith: ZenithBinning = ZenithBinning()
    pulses: PulseBinning = PulseBinning()
    distribution_edges_deg: list[float] = [0, 0.5, 1, 2, 3, 5, 10, 20, 30, 45, 60, 90, 120, 180]
    min_events: int = Field(100, ge=2)
    kde: KDESettings = KDESettings()
    bandwidth: BandwidthSettings = BandwidthSettings()
    bootstrap: BootstrapSettings = BootstrapSettings()
    reference_model: str = "linefit"
    plots: bool = True
    figures: FigureSettings = FigureSettings()

    @field_validator("distribution_edges_deg")
    @classmethod
    def _check_distribution(cls, value: list[float]) -> list[float]:
        if value and (value[0] < 0 or value[-1] > MAX_ANGLE_DEG):
            raise ValueError("distribution_edges_deg must lie within 0..180 degrees")
        return _increasing(value, "distribution_edges_deg")


def load_settings(overrides: dict | None = None) -> AnalysisSettings:
    """``icegrid/config/analysis.yaml`` (and the user's override file) merged with ``overrides``."""
    from icegrid.config import load_section

    return load_section("analysis", AnalysisSettings, overrides)
