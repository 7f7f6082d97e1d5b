"""The synthetic detector's response: how much light each DOM sees from a track or a cascade, when, and
as how many pulses; plus uncorrelated noise. Used by :mod:`icegrid.simulate`, which samples the events'
truth, applies the trigger and writes the Kaggle layout.

All functions work on flat arrays of (event, DOM) pairs: no loop over events or pulses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from icegrid import ragged
from icegrid.geometry import DOMS_PER_STRING, N_STRINGS, Geometry

C_VACUUM = 0.299792458            # m/ns
N_GROUP = 1.35                    # group index of refraction of ice
C_ICE = C_VACUUM / N_GROUP
COS_CHERENKOV = 1.0 / 1.32
TAN_CHERENKOV = math.tan(math.acos(COS_CHERENKOV))
SIN_CHERENKOV = math.sin(math.acos(COS_CHERENKOV))


@dataclass(frozen=True)
class DetectorModel:
    """Tunable constants of the synthetic detector response."""

    attenuation_m: float = 35.0           # effective exponential fall-off of light with distance
    cascade_yield: float = 2.0            # expected PE at 1 m-ish per GeV deposited (scaled by 1/(r + r0))
    track_yield: float = 8.0              # expected PE per DOM near a minimum-ionising muon
    track_energy_scale_gev: float = 1500.0  # above this the muon's stochastic losses dominate
    min_expected_pe: float = 0.03         # DOMs expected to see less are not simulated
    pulses_per_pe_exponent: float = 0.4   # a DOM with N photo-electrons reports ceil(N**x) pulses
    max_range_m: float = 1200.0
    scatter_length_m: float = 30.0        # Pandel-like delay: Gamma(1 + r / scatter_length, delay_scale)
    delay_scale_ns: float = 20.0
    jitter_ns: float = 2.0
    noise_pulses_per_event: float = 25.0
    readout_start_ns: float = 6000.0
    readout_length_ns: float = 14000.0
    trigger_time_ns: float = 10000.0
    trigger_min_hlc_pulses: int = 4
    cascade_anisotropy: float = 3.0       # forward (Cherenkov-angle) peak over the isotropic part
    track_fraction: float = 0.24     # tracks trigger more often: ~1/3 after the trigger
    cascade_radius_m: float = 600.0
    cascade_half_height_m: float = 600.0
    track_target_radius_m: float = 600.0
    track_target_half_height_m: float = 550.0


DEFAULT_MODEL = DetectorModel()


def light_scale(c, model: DetectorModel) -> np.ndarray:
    """Per-event brightness factor multiplying exp(-r/lambda)/(r + r0)."""
    track_scale = model.track_yield * 30.0 * (1.0 + c.deposited / model.track_energy_scale_gev) ** 0.9
    cascade_scale = model.cascade_yield * c.deposited ** 0.95 * (1.0 + model.cascade_anisotropy) / 2.0
    return np.where(c.is_track, track_scale, cascade_scale)


def cascade_angular_profile(cos_angle: np.ndarray, model: DetectorModel) -> np.ndarray:
    """Relative cascade light yield versus the angle to the shower axis (peaks at the Cherenkov angle,
    never above ``1 + cascade_anisotropy``, so the range estimate stays an upper bound)."""
    peak = np.exp(-0.5 * ((cos_angle - COS_CHERENKOV) / 0.3) ** 2)
    return (1.0 + model.cascade_anisotropy * peak) / (1.0 + model.cascade_anisotropy)


def max_distance(scale: np.ndarray, model: DetectorModel) -> np.ndarray:
    """Distance where a DOM expects ``min_expected_pe``: solves scale * exp(-r/L) / (r + 30) = pe_min."""
    r = np.full(scale.shape, 100.0)
    for _ in range(4):  # fixed-point iteration; converges in a few steps since r + 30 varies slowly
        r = model.attenuation_m * np.log(np.maximum(scale / (model.min_expected_pe * (r + 30.0)), 1.0))
    return np.clip(r, 20.0, model.max_range_m)


# ---- geometry helpers ------------------------------------------------------------------------------

class StringLayout:
    """Per-string x, y and DOM depths, grouped into the few distinct depth profiles for range look-ups."""

    def __init__(self, geometry: Geometry):
        xyz = geometry.xyz.reshape(N_STRINGS, DOMS_PER_STRING, 3)
        self.x = xyz[:, 0, 0]
        self.y = xyz[:, 0, 1]
        z = xyz[:, :, 2]
        if np.any(np.diff(z, axis=1) >= 0):
            raise ValueError("simulation needs DOM depths decreasing along each string")
        self.z_top = z.max(axis=1)
        self.z_bottom = z.min(axis=1)
        # Strings share a handful of depth profiles (main array, DeepCore); negated so they ascend.
        profiles, self.profile_of_string = np.unique(-z, axis=0, return_inverse=True)
        self.profiles = list(profiles)
        self.sensor_x = geometry.x.astype(np.float32)
        self.sensor_y = geometry.y.astype(np.float32)
        self.sensor_z = geometry.z.astype(np.float32)


def candidate_dom_ranges(c, r_max: np.ndarray, layout: StringLayout):
    """(event, string, first_dom, last_dom) ranges of DOMs that may see light, exact per string segment.

    For each event x string pair the squared distance between the string (a vertical segment) and the
    emitter (a point or a line) is a quadratic in z; its minimum picks candidate strings and the z-window
    where it stays under r_max picks the DOMs.
    """
    dx = layout.x[None, :] - c.vertex[:, 0:1]
    dy = layout.y[None, :] - c.vertex[:, 1:2]
    u = c.travel
    # Track: d^2(z) = |Q - P|^2 - ((Q - P).u)^2 with Q = (xs, ys, z). Cascade: u = 0.
    ux = np.where(c.is_track, u[:, 0], 0.0)[:, None]
    uy = np.where(c.is_track, u[:, 1], 0.0)[:, None]
    uz = np.where(c.is_track, u[:, 2], 0.0)[:, None]
    zv = c.vertex[:, 2:3]
    proj_xy = dx * ux + dy * uy
    a = 1.0 - uz * uz
    b = -2.0 * zv * a - 2.0 * proj_xy * uz          # d^2 = a z^2 + b z + c
    c0 = dx * dx + dy * dy + zv * zv - (proj_xy - zv * uz) ** 2
    safe_a = np.where(a > 1e-9, a, 1.0)
    z_star = np.where(a > 1e-9, -b / (2.0 * safe_a), zv)
    z_star = np.clip(z_star, layout.z_bottom[None, :], layout.z_top[None, :])
    d2_min = a * z_star ** 2 + b * z_star + c0
    r2 = (r_max ** 2)[:, None]
    event_idx, string_idx = np.nonzero(d2_min < r2)
    # z-window where d^2(z) < r_max^2: roots of the quadratic (whole string if a ~ 0).
    a_s = a[event_idx, 0]
    b_s = b[event_idx, string_idx]
    c_s = c0[event_idx, string_idx] - r2[event_idx, 0]
    disc = np.maximum(b_s * b_s - 4.0 * a_s * c_s, 0.0)
    flat = a_s <= 1e-9
    safe = np.where(flat, 1.0, a_s)
    z_lo = np.where(flat, -np.inf, (-b_s - np.sqrt(disc)) / (2.0 * safe))
    z_hi = np.where(flat, np.inf, (-b_s + np.sqrt(disc)) / (2.0 * safe))
    # DOM numbers grow downwards (z decreasing): first DOM = first with z <= z_hi, last = last with z >= z_lo.
    first = np.empty(string_idx.shape[0], dtype=np.int64)
    last = np.empty_like(first)
    profile = layout.profile_of_string[string_idx]
    for p, neg_z in enumerate(layout.profiles):
        sel = np.flatnonzero(profile == p)
        first[sel] = np.searchsorted(neg_z, -z_hi[sel], side="left")
        last[sel] = np.searchsorted(neg_z, -z_lo[sel], side="right") - 1
    keep = last >= first
    return event_idx[keep], string_idx[keep], first[keep], last[keep]


def _expand_ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ranges [start, start+count): (owner index, value) for every element."""
    owner = np.repeat(np.arange(counts.shape[0]), counts)
    return owner, np.repeat(starts, counts) + ragged.positions_within(counts)


# ---- detector response ------------------------------------------------------------------------------

def _track_light(rx, ry, rz, travel, length):
    """(distance the light travels, time from the vertex) for DOMs seeing a muon of finite length.

    Cherenkov photons reaching a DOM leave the muon at l_e = along - rho / tan(theta_c); outside
    [0, length] the light comes from the nearer end point.
    """
    along = rx * travel[:, 0] + ry * travel[:, 1] + rz * travel[:, 2]
    perp2 = np.maximum(rx * rx + ry * ry + rz * rz - along * along, 0.0)
    rho = np.sqrt(perp2)
    emit = along - rho / TAN_CHERENKOV
    inside = (emit >= 0.0) & (emit <= length)
    end_point = np.clip(along, 0.0, length)
    to_end = np.sqrt(perp2 + (along - end_point) ** 2)
    dist = np.where(inside, rho, to_end)
    path_time = np.where(inside, emit / C_VACUUM + rho / (SIN_CHERENKOV * C_ICE),
                         end_point / C_VACUUM + to_end / C_ICE)
    return dist, path_time, np.ones_like(dist)


def _cascade_light(rx, ry, rz, travel, model):
    """(distance, time from the vertex, angular yield factor) for DOMs seeing a point-like cascade.

    Cascades are not isotropic: their light peaks around the Cherenkov angle to the shower axis, which is
    what makes a cascade's direction reconstructable at all.
    """
    dist = np.sqrt(rx * rx + ry * ry + rz * rz)
    along = rx * travel[:, 0] + ry * travel[:, 1] + rz * travel[:, 2]
    anisotropy = cascade_angular_profile(along / np.maximum(dist, 1.0), model)
    return dist, dist / C_ICE, anisotropy


def signal_hits(c, rng: np.random.Generator, layout: StringLayout, model: DetectorModel):
    """Signal pulses of all candidate events: (event index, sensor_id, time, charge)."""
    scale = light_scale(c, model)
    r_max = max_distance(scale, model)
    ev, string, first, last = candidate_dom_ranges(c, r_max, layout)
    # Track pairs first, so that each event type's DOMs form one contiguous slice below.
    order = np.argsort(~c.is_track[ev], kind="stable")
    ev, string, first, last = ev[order], string[order], first[order], last[order]
    owner, dom = _expand_ranges(first, last - first + 1)
    ev = ev[owner]
    sensor = string[owner] * DOMS_PER_STRING + dom
    n_track_doms = int(np.count_nonzero(c.is_track[ev]))
    # Per-axis 1-D gathers in float32: much faster than fancy-indexing (n, 3) float64 arrays, and
    # ample precision for metre-scale geometry.
    vertex = c.vertex.astype(np.float32)
    rx = layout.sensor_x[sensor] - vertex[:, 0][ev]
    ry = layout.sensor_y[sensor] - vertex[:, 1][ev]
    rz = layout.sensor_z[sensor] - vertex[:, 2][ev]
    travel = c.travel.astype(np.float32)[ev]
    tracks, cascades = slice(0, n_track_doms), slice(n_track_doms, None)
    track_part = _track_light(rx[tracks], ry[tracks], rz[tracks], travel[tracks],
                              c.length.astype(np.float32)[ev[tracks]])
    cascade_part = _cascade_light(rx[cascades], ry[cascades], rz[cascades], travel[cascades], model)
    dist, path_time, angular = (np.concatenate(pair) for pair in zip(track_part, cascade_part))

    expected = scale.astype(np.float32)[ev] * angular * np.exp(-dist / model.attenuation_m) / (dist + 30.0)
    photo_electrons = rng.poisson(expected)
    lit = np.flatnonzero(photo_electrons)
    ev, sensor, dist, pe = ev[lit], sensor[lit], dist[lit], photo_electrons[lit]
    geo_time = c.t0[ev] + path_time[lit]
    # The waveform unfolding resolves bright DOMs into fewer pulses than photo-electrons.
    n_pulses = np.ceil(pe.astype(np.float64) ** model.pulses_per_pe_exponent).astype(np.int64)
    owner = np.repeat(np.arange(pe.shape[0]), n_pulses)
    n_total = owner.shape[0]
    shape = 1.0 + dist[owner] / model.scatter_length_m
    delay = (rng.standard_gamma(shape) - 1.0) * model.delay_scale_ns
    time = geo_time[owner] + delay + model.jitter_ns * rng.standard_normal(n_total)
    charge = (pe / n_pulses)[owner] * np.exp(0.35 * rng.standard_normal(n_total))
    return ev[owner], sensor[owner], time, charge


def noise_pulses(n_events: int, rng: np.random.Generator, model: DetectorModel, n_sensors: int):
    counts = rng.poisson(model.noise_pulses_per_event, n_events)
    ev = np.repeat(np.arange(n_events), counts)
    sensor = rng.integers(0, n_sensors, ev.shape[0])
    time = model.readout_start_ns + rng.random(ev.shape[0]) * model.readout_length_ns
    charge = rng.exponential(0.6, ev.shape[0]) + 0.2
    return ev, sensor, time, charge
