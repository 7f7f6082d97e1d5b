"""The 2nd place's inputs as the authors' ``src/data_test.py`` builds them (``IceCubeDataset``,
``prepare_sensors``, ``ice_transparency``): scaled position, time and charge, the auxiliary flag, the
0/1 quantum-efficiency flag and the two ice properties, plus ``L0`` (pulses before truncation).

The ice table (``ice_transparency.txt``, shipped with the authors' weights) is read at import time and
stored in the checkpoint's ``aux``; ``IceTable`` reproduces RobustScaler + interp1d on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icegrid.errors import first_line
from icegrid.geometry import DOMS_PER_STRING, Geometry
from icegrid.kaggle import InputError
from icegrid.models.features import FeatureTransform, Selection, ShardFeatures
from icegrid.store import ShardData

ICE_TABLE_FILE = "ice_transparency.txt"
ICE_AUX_KEY = "icemix_ice_transparency"
ICE_COLUMNS = ("depth", "scattering_len", "absorption_len")
ICE_DATUM_M = 1950.0          # ice_transparency(datum=1950): z = depth - 1950 (sign as the authors wrote it)
DEEPCORE_STRINGS = range(78, 86)   # 0-based strings 79..86 of the 1-based numbering
FIRST_HIGH_QE_DOM = 11             # 0-based; start_core = i*60 + 10 + 1


def authors_qe(sensor_id: np.ndarray) -> np.ndarray:
    """prepare_sensors' qe: 1 for 0-based DOMs 11..59 of DeepCore strings 79-86 and, because pandas'
    ``.loc[start:end]`` is inclusive, for DOM 0 of each following string; 0 elsewhere."""
    sensor_id = np.asarray(sensor_id, dtype=np.int64)
    string, dom = sensor_id // DOMS_PER_STRING, sensor_id % DOMS_PER_STRING
    deep = (string >= DEEPCORE_STRINGS.start) & (string < DEEPCORE_STRINGS.stop)
    after_deep = (string > DEEPCORE_STRINGS.start) & (string <= DEEPCORE_STRINGS.stop)
    return ((deep & (dom >= FIRST_HIGH_QE_DOM)) | (after_deep & (dom == 0))).astype(np.int64)


def read_ice_table(path: Path) -> dict[str, list[float]]:
    """``ice_transparency.txt`` (a header ``depth scattering_len absorption_len``, then rows) -> columns."""
    try:
        lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
        header = lines[0]
        columns = [header.index(name) for name in ICE_COLUMNS]
        rows = np.array([[float(row[i]) for i in columns] for row in lines[1:]], dtype=np.float64)
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as err:
        raise InputError(f"{path}: not an ice table with columns {' '.join(ICE_COLUMNS)} "
                         f"({first_line(err)})") from None
    if rows.shape[0] < 2 or not np.isfinite(rows).all():
        raise InputError(f"{path}: ice table needs at least 2 finite rows")
    return {name: rows[:, i].tolist() for i, name in enumerate(ICE_COLUMNS)}


def _robust_scale(values: np.ndarray) -> np.ndarray:
    """sklearn's RobustScaler fit_transform on one column: (x - median) / (q75 - q25)."""
    q25, q75 = np.percentile(values, [25.0, 75.0])
    scale = q75 - q25
    return (values - np.median(values)) / (scale if scale != 0 else 1.0)


class IceTable:
    """ice_transparency(): RobustScaler'd scattering and absorption lengths, linear in z / 500."""

    def __init__(self, table: dict[str, list[float]]):
        depth = np.asarray(table["depth"], dtype=np.float64)
        order = np.argsort(depth, kind="stable")
        self.z_norm = ((depth - ICE_DATUM_M) / 500)[order]
        self.scaled = [_robust_scale(np.asarray(table[c], dtype=np.float64))[order] for c in ICE_COLUMNS[1:]]

    def __call__(self, pos_z: np.ndarray) -> np.ndarray:
        """(N, 2) float32 at ``pos_z`` (z / 500); interp1d's bounds check, as one line."""
        z = np.asarray(pos_z, dtype=np.float64)
        if z.size and (z.min() < self.z_norm[0] or z.max() > self.z_norm[-1]):
            raise InputError(f"ice table: sensor z/500 in [{z.min():.4f}, {z.max():.4f}] leaves the table's "
                             f"[{self.z_norm[0]:.4f}, {self.z_norm[-1]:.4f}] (the authors' interp1d "
                             f"does not extrapolate)")
        return np.stack([np.interp(z, self.z_norm, s) for s in self.scaled], axis=-1).astype(np.float32)


class IceMixAuthorsFeatures(FeatureTransform):
    """The authors' dataset item: pos = float32 xyz / 500, (t - 1e4) / 3e4, log10(q) / 3, auxiliary;
    with ``with_ice`` (V22/V23 members) also qe and the ice properties at z / 500."""

    name = "icemix_authors"
    version = 1
    with_ice = False

    def __init__(self, **constants):
        super().__init__(**constants)
        self.ice: IceTable | None = None

    def describe(self) -> dict:
        return {**super().describe(), "with_ice": bool(self.with_ice)}

    def load_aux(self, aux: dict) -> None:
        table = (aux or {}).get(ICE_AUX_KEY)
        self.ice = IceTable(table) if table is not None else None

    def __call__(self, data: ShardData, selection: Selection, geometry: Geometry) -> ShardFeatures:
        index = selection.index
        sensor = data.pulses["sensor_id"][index].astype(np.int64)
        # float32 geometry divided in float32, as prepare_sensors does (a phase of 4096 * pos
        # moves by ~5e-4 rad per ulp, so the rounding must be the authors').
        pos = (geometry.xyz.astype(np.float32) / np.float32(self.position_scale))[sensor]
        time = ((data.pulses["time"][index] - self.time_shift) / self.time_scale).astype(np.float32)
        # log10(0) would be -inf and NaN downstream; Kaggle charges are >= 0.025, so the floor never bites.
        charge = (np.log10(np.maximum(data.pulses["charge"][index], 1e-3)) / self.charge_log_scale)
        pulse = {"pos": pos, "time": time, "charge": charge.astype(np.float32),
                 "auxiliary": data.pulses["auxiliary"][index].astype(np.int64)}
        if self.with_ice:
            if self.ice is None:
                raise InputError(f"{self.name}: the checkpoint carries no ice table; re-import the weights "
                                 f"with --aux {ICE_TABLE_FILE}")
            pulse["qe"] = authors_qe(sensor)
            pulse["ice_properties"] = self.ice(pos[:, 2])
        return ShardFeatures(selection=selection, pulse=pulse,
                             event={"L0": selection.n_pulses.astype(np.int64)})
