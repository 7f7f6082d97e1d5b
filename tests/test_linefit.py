"""LineFit, the reference reconstruction: the simulated light must carry the direction."""

import numpy as np

from icegrid.geometry import Geometry, icecube86
from icegrid.linefit import linefit_arrays, linefit_directions
from icegrid.simulate import simulate_batch
from icegrid.store import EventStore, direction_from_angles


def _opening_deg(az1, ze1, az2, ze2):
    cos = np.sum(direction_from_angles(az1, ze1) * direction_from_angles(az2, ze2), axis=1)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def test_linefit_resolves_high_energy_tracks():
    batch = simulate_batch(9, 56_000, seed=21)
    az, ze = linefit_arrays(batch.offsets, batch.sensor_id, batch.time, batch.auxiliary, icecube86())
    angle = _opening_deg(az, ze, batch.azimuth, batch.zenith)
    tracks = (batch.shape == 1) & (batch.energy > 1e4)
    assert tracks.sum() >= 2000
    assert np.median(angle[tracks]) < 15.0
    # A random guess is ~90 degrees off: the fit is not just the isotropic prior.
    rng = np.random.default_rng(0)
    guess = _opening_deg(rng.uniform(0, 2 * np.pi, tracks.sum()), np.arccos(rng.uniform(-1, 1, tracks.sum())),
                         batch.azimuth[tracks], batch.zenith[tracks])
    assert 80 < np.median(guess) < 100


def test_linefit_is_exact_for_hits_along_a_straight_track():
    travel = np.array([0.6, 0.0, -0.8])               # down-going, from azimuth pi, zenith acos(0.8)
    steps = np.linspace(-400, 400, 9)
    points = np.array([10.0, -20.0, 5.0]) + steps[:, None] * travel
    geo = Geometry(x=points[:, 0], y=points[:, 1], z=points[:, 2])
    time = 10_000 + steps / 0.3
    az, ze = linefit_arrays(np.array([0, steps.size]), np.arange(steps.size), time,
                            np.zeros(steps.size, bool), geo)
    assert np.isclose(ze[0], np.arccos(0.8)) and np.isclose(az[0], np.pi)


def test_linefit_handles_single_pulse_events(small_store):
    store = EventStore(small_store)
    shard = store.shards()[0]
    data = store.read_shard(shard)
    az, ze = linefit_directions(data, store.geometry())
    assert az.shape == (data.n_events,) and np.isfinite(az).all() and np.isfinite(ze).all()
    one = linefit_arrays(np.array([0, 1]), np.array([5], np.int16), np.array([10_000]), np.array([True]),
                         store.geometry())
    assert np.isfinite(one[0]).all() and np.isfinite(one[1]).all()
