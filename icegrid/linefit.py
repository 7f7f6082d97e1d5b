"""The classic LineFit direction reconstruction (IceCube's first-guess track fit), vectorised over events.

LineFit assumes a plane wave of light moving with velocity v along the muon: r_i ~ r0 + v t_i. The least
squares solution is v = cov(r, t) / var(t) per event; the neutrino came from -v. Only HLC pulses
(auxiliary == False) are used when an event has at least ``min_hlc`` of them, since isolated pulses are
mostly noise; otherwise all pulses are used. It is the floor every learned model must beat.
"""

from __future__ import annotations

import numpy as np

from icegrid.geometry import Geometry
from icegrid.store import ShardData, angles_from_direction


def linefit_arrays(offset: np.ndarray, sensor_id: np.ndarray, time: np.ndarray,
                       auxiliary: np.ndarray, geometry: Geometry, min_hlc: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(azimuth, zenith) in radians for every event of a flat, offset-indexed pulse table.

    Per event only, so any chunk of events gives that chunk's rows of the whole table, bit for bit;
    one coordinate is held at a time, so memory stays a few arrays of the pulses used."""
    n_events = offset.shape[0] - 1
    n_pulses = np.diff(offset)
    event = np.repeat(np.arange(n_events), n_pulses)
    hlc = ~auxiliary.astype(bool)
    hlc_per_event = np.bincount(event, weights=hlc, minlength=n_events)
    use = np.where(hlc_per_event[event] >= min_hlc, hlc, True)
    ev = event[use]
    del event, hlc
    t = time[use].astype(np.float64)
    sid = sensor_id[use].astype(np.int64)
    count = np.bincount(ev, minlength=n_events).astype(np.float64)
    safe_count = np.maximum(count, 1.0)
    # Centre per event before forming products: raw times ~1e4 ns would lose precision in sums of squares.
    t_centred = t - (np.bincount(ev, weights=t, minlength=n_events) / safe_count)[ev]
    del t
    var_t = np.bincount(ev, weights=t_centred * t_centred, minlength=n_events)
    velocity = np.empty((n_events, 3))
    for axis, table in enumerate((geometry.x, geometry.y, geometry.z)):
        coord = table[sid]
        coord -= (np.bincount(ev, weights=coord, minlength=n_events) / safe_count)[ev]
        coord *= t_centred
        velocity[:, axis] = np.bincount(ev, weights=coord, minlength=n_events)
    velocity /= np.where(var_t > 0, var_t, 1.0)[:, None]
    return angles_from_direction(-velocity)


def linefit_directions(data: ShardData, geometry: Geometry, min_hlc: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(azimuth, zenith) for every event of a shard read with pulses sensor_id, time and auxiliary."""
    return linefit_arrays(data.offset, data.pulses["sensor_id"], data.pulses["time"], data.pulses["auxiliary"],
                          geometry, min_hlc=min_hlc)
