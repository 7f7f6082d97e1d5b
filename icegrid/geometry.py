"""The detector: sensor_id -> (x, y, z), string and DOM numbers, reading and writing sensor_geometry.csv,
and positions -> sensor_id (inputs that give DOM positions, not ids: icegrid.graphnet).

The Kaggle numbering is kept everywhere: ``sensor_id = 60 * (string - 1) + (dom - 1)`` for 86 strings of
60 DOMs (5160 sensors). The built-in geometry is an IceCube-86-like layout generated from the published
design (78 strings on a 125 m triangular grid in rows of 6-7-8-9-10-10-9-8-7-4 strings, 17 m DOM spacing
between z = +500 m and -500 m; 8 DeepCore strings around the centre with a 10-DOM veto cap above the dust
layer and 50 DOMs at 7 m spacing below it). A real Kaggle ``sensor_geometry.csv`` is read unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from icegrid.atomic import atomic_path
from icegrid.errors import first_line

N_STRINGS = 86
DOMS_PER_STRING = 60
N_SENSORS = N_STRINGS * DOMS_PER_STRING
STRING_SPACING_M = 125.0
MAIN_ARRAY_ROWS = (6, 7, 8, 9, 10, 10, 9, 8, 7, 4)
# Offset (in lattice steps) of the first string of each row, chosen so the rows form IceCube's
# near-hexagonal footprint.
MAIN_ARRAY_ROW_START = (0, -0.5, -1.0, -1.5, -2.0, -1.5, -1.0, -0.5, 0.0, 1.5)


class GeometryError(ValueError):
    """A geometry file that cannot be used."""


@dataclass(frozen=True)
class Geometry:
    """Sensor positions indexed by sensor_id (row i is sensor i)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @property
    def n_sensors(self) -> int:
        return int(self.x.shape[0])

    @property
    def xyz(self) -> np.ndarray:
        """(n_sensors, 3) float64 positions in metres."""
        return np.stack([self.x, self.y, self.z], axis=1)

    @property
    def sensor_id(self) -> np.ndarray:
        return np.arange(self.n_sensors, dtype=np.int16)

    def string_of(self, sensor_id: np.ndarray) -> np.ndarray:
        """1-based string number of each sensor."""
        return np.asarray(sensor_id) // DOMS_PER_STRING + 1

    def dom_of(self, sensor_id: np.ndarray) -> np.ndarray:
        """1-based DOM number (along its string, from the top) of each sensor."""
        return np.asarray(sensor_id) % DOMS_PER_STRING + 1

    def to_table(self) -> pa.Table:
        return pa.table({"sensor_id": pa.array(np.arange(self.n_sensors, dtype=np.int64)),
                         "x": self.x, "y": self.y, "z": self.z})


def _main_array_xy() -> np.ndarray:
    row_step = STRING_SPACING_M * np.sqrt(3.0) / 2.0
    points = []
    for row, (count, start) in enumerate(zip(MAIN_ARRAY_ROWS, MAIN_ARRAY_ROW_START)):
        for k in range(count):
            points.append(((start + k) * STRING_SPACING_M, row * row_step))
    xy = np.array(points)
    # Centre the array on string 36 as IceCube coordinates do.
    return xy - xy[35]


def _deepcore_xy() -> np.ndarray:
    # Seven strings on a ring of ~72 m around the centre string plus one at ~41 m, like DeepCore.
    angles = np.deg2rad(np.arange(7) * 360.0 / 7 + 15.0)
    ring = np.stack([72.0 * np.cos(angles), 72.0 * np.sin(angles)], axis=1)
    return np.vstack([ring, [[41.0, -10.0]]])


def _main_string_z() -> np.ndarray:
    return 500.0 - 17.0 * np.arange(DOMS_PER_STRING)


def _deepcore_string_z() -> np.ndarray:
    veto_cap = 188.0 - 10.0 * np.arange(10)
    deep = -152.0 - 7.0 * np.arange(50)
    return np.concatenate([veto_cap, deep])


def icecube86() -> Geometry:
    """The built-in IceCube-86-like geometry (5160 sensors, Kaggle numbering)."""
    xy = np.vstack([_main_array_xy(), _deepcore_xy()])
    z_per_string = [_main_string_z()] * 78 + [_deepcore_string_z()] * 8
    x = np.repeat(xy[:, 0], DOMS_PER_STRING)
    y = np.repeat(xy[:, 1], DOMS_PER_STRING)
    z = np.concatenate(z_per_string)
    return Geometry(x=x.astype(np.float64), y=y.astype(np.float64), z=z.astype(np.float64))


def write_geometry_csv(geometry: Geometry, path: Path) -> None:
    """Write ``sensor_id,x,y,z`` like the Kaggle file."""
    with atomic_path(path) as tmp:
        pacsv.write_csv(geometry.to_table(), tmp)


def _check_sensor_ids(path: Path, sensor_id: np.ndarray) -> None:
    """One row per sensor of the Kaggle numbering, each once: a short file is named as the problem here,
    not later by every batch whose pulses hit the sensors it lacks."""
    n = sensor_id.shape[0]
    ids, counts = np.unique(sensor_id, return_counts=True)
    stray = ids[(ids < 0) | (ids >= N_SENSORS) | (counts > 1)]
    if stray.size:
        raise GeometryError(f"{path}: sensor_id must be 0..{N_SENSORS - 1} with each id once "
                            f"(got {n} rows; sensor_id {int(stray[0])} is out of range or repeated)")
    missing = np.setdiff1d(np.arange(N_SENSORS), ids)
    if missing.size:
        span = f"{int(missing[0])}" + (f"..{int(missing[-1])}" if missing.size > 1 else "")
        raise GeometryError(f"{path}: {missing.size} of the {N_SENSORS} sensors missing (sensor_id {span}; "
                            f"the file has {n} rows): is it truncated?")


def read_geometry_csv(path: Path) -> Geometry:
    """Read a Kaggle ``sensor_geometry.csv`` (``sensor_id,x,y,z``); rows may come in any order."""
    path = Path(path)
    try:
        table = pacsv.read_csv(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise GeometryError(f"{path}: cannot read geometry CSV ({first_line(err)})") from None
    missing = {"sensor_id", "x", "y", "z"} - set(table.column_names)
    if missing:
        raise GeometryError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    try:
        sensor_id = table["sensor_id"].to_numpy().astype(np.int64, casting="same_kind")
        coords = [table[c].to_numpy().astype(np.float64) for c in ("x", "y", "z")]
    except (TypeError, ValueError, pa.ArrowInvalid) as err:
        raise GeometryError(f"{path}: non-numeric geometry column ({first_line(err)})") from None
    _check_sensor_ids(path, sensor_id)
    if not all(np.isfinite(c).all() for c in coords):
        raise GeometryError(f"{path}: non-finite sensor position")
    order = np.argsort(sensor_id)
    return Geometry(*(c[order] for c in coords))


def unique_positions(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of (n, 3) positions and each row's index among them. A DOM's position repeats exactly
    in every pulse: each axis's distinct values give a small integer code and the three codes one int64
    key, sorted many times faster than ``np.unique(axis=0)`` sorts rows."""
    codes, sizes = [], []
    for axis in range(3):
        values, code = np.unique(xyz[:, axis], return_inverse=True)
        codes.append(code.reshape(-1).astype(np.int64))
        sizes.append(values.size)
    if float(sizes[0]) * sizes[1] * sizes[2] >= 2.0 ** 62:
        unique, inverse = np.unique(xyz, axis=0, return_inverse=True)
        return unique, inverse.reshape(-1)
    _, first, inverse = np.unique((codes[0] * sizes[1] + codes[1]) * sizes[2] + codes[2], return_index=True,
                                  return_inverse=True)
    return xyz[first], inverse.reshape(-1)


def nearest_sensor(xyz: np.ndarray, geometry: Geometry, tolerance_m: float) -> np.ndarray:
    """The sensor_id within ``tolerance_m`` of each (distinct) position, -1 where there is none."""
    from scipy.spatial import cKDTree

    distance, index = cKDTree(geometry.xyz).query(xyz, distance_upper_bound=tolerance_m)
    return np.where(np.isfinite(distance), index, -1)


def geometry_from_positions(xyz: np.ndarray) -> Geometry:
    """A geometry of the distinct positions (float noise below 1 mm merged), numbered string by string
    (x, then y), each string from the top."""
    xyz = unique_positions(np.round(xyz, 3))[0]
    if xyz.shape[0] > np.iinfo(np.int16).max:
        raise GeometryError(f"{xyz.shape[0]} distinct DOM positions: more than int16 sensor ids can number")
    order = np.lexsort((-xyz[:, 2], xyz[:, 1], xyz[:, 0]))
    return Geometry(x=xyz[order, 0].copy(), y=xyz[order, 1].copy(), z=xyz[order, 2].copy())

