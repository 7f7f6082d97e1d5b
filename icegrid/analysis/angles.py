"""Opening angles, the Kaggle score, and the fine logarithmic angle grid every histogram is kept on.

``opening_angle`` computes ``atan2(|a×b|, a·b)``, which keeps full precision near 0° and 180° (``arccos`` of
a dot product loses half the digits there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icegrid.analysis.settings import MAX_ANGLE_DEG, AnalysisSettings


def opening_angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in radians between direction vectors ``a`` and ``b`` (..., 3); they need not be unit length.

    ``atan2(|a×b|, a·b)`` is accurate at every angle; zero vectors give NaN.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    cross = np.cross(a, b)
    sin_part = np.sqrt(np.einsum("...i,...i->...", cross, cross))
    cos_part = np.einsum("...i,...i->...", a, b)
    angle = np.arctan2(sin_part, cos_part)
    zero = (np.einsum("...i,...i->...", a, a) == 0) | (np.einsum("...i,...i->...", b, b) == 0)
    return np.where(zero, np.nan, angle)


def opening_angle_from_angles(azimuth_a, zenith_a, azimuth_b, zenith_b) -> np.ndarray:
    """Angle in radians between two (azimuth, zenith) directions (Kaggle convention)."""
    from icegrid.store import direction_from_angles

    return opening_angle(direction_from_angles(np.asarray(azimuth_a, float), np.asarray(zenith_a, float)),
                         direction_from_angles(np.asarray(azimuth_b, float), np.asarray(zenith_b, float)))


def kaggle_score(angles_rad: np.ndarray) -> float:
    """The competition metric: mean opening angle in radians (NaN for no events)."""
    angles_rad = np.asarray(angles_rad, dtype=np.float64)
    return float(angles_rad.mean()) if angles_rad.size else float("nan")


@dataclass(frozen=True)
class AngleGrid:
    """``n_bins`` equal bins in ln(angle/deg) from ``min_angle_deg`` to 180°; smaller angles go to bin 0.

    Opening angles of one bin span 0.01°–180° while a peak can be 0.1° wide, so no linear grid resolves every
    bin cheaply; 2048 log bins are 0.6 % wide.
    """

    min_angle_deg: float
    n_bins: int

    @classmethod
    def from_settings(cls, settings: AnalysisSettings) -> "AngleGrid":
        return cls(settings.kde.min_angle_deg, settings.kde.grid_points)

    @property
    def log_min(self) -> float:
        return float(np.log(self.min_angle_deg))

    @property
    def log_step(self) -> float:
        return float((np.log(MAX_ANGLE_DEG) - self.log_min) / self.n_bins)

    @property
    def log_edges(self) -> np.ndarray:
        return self.log_min + self.log_step * np.arange(self.n_bins + 1)

    @property
    def centers_deg(self) -> np.ndarray:
        edges = self.log_edges
        return np.exp(0.5 * (edges[1:] + edges[:-1]))

    def index(self, angle_deg: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            position = (np.log(angle_deg) - self.log_min) / self.log_step
        return np.clip(np.nan_to_num(position, neginf=0.0), 0, self.n_bins - 1).astype(np.int64)
