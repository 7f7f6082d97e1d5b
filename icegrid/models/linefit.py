"""The line-fit reference registered as a model: wraps :func:`icegrid.linefit.linefit_directions`
(owned by the foundation) so ``--models all`` always carries the floor every model must beat."""

from __future__ import annotations

import numpy as np

from icegrid.geometry import Geometry
from icegrid.store import ShardData


def predict_shard(data: ShardData, geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(azimuth, zenith, kappa) for every event; line-fit has no confidence, so kappa is NaN."""
    from icegrid.linefit import linefit_directions

    azimuth, zenith = linefit_directions(data, geometry)
    kappa = np.full(data.n_events, np.nan, dtype=np.float32)
    return np.asarray(azimuth, dtype=np.float64), np.asarray(zenith, dtype=np.float64), kappa
