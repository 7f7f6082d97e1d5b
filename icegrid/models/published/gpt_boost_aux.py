"""The 3rd place's side files and input features: what ``--aux`` files become inside a checkpoint, and the
9 per-pulse inputs the author's ``inference.py`` builds from them.

Side files (found by name among the ``--aux`` files):

- ``angle_bins_<N>.json`` (``data_preparation/angle_bins.py``): the data-quantile bin centres;
- the per-sensor table ``sensor_geometry_with_transparency.csv`` (or a ``.parquet`` with the same columns
  ``sensor_id, qe, scatter, absorp``; ``geometry_with_transparency.py`` writes it), taken as it is;
- or, instead of that table, ``ice_transparency.txt``: qe, scatter and absorp are then computed the way
  ``geometry_with_transparency.py`` does, on the store's own geometry (RobustScaler of the two lengths,
  linear interpolation at z / 500 with the table's z = depth - 1950, the author's sign convention kept;
  outside the table the end values are used where the author's ``interp1d`` would raise).

Features, in the author's order: (t - t_min) / 3e4 over the kept pulses, log10(q) / 3, aux - 0.5, x / 500,
y / 500, z / 500, (qe - 1.25) / 0.25, scatter, absorp; float64 arithmetic, float32 inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from icegrid.geometry import DOMS_PER_STRING, Geometry
from icegrid.kaggle import InputError
from icegrid.models.features import (FeatureTransform, Selection, ShardFeatures, engineered_event_features,
                                     event_of_pulse)
from icegrid.store import ShardData

BINS_FILE = "angle_bins_128.json"
SENSOR_TABLE_FILE = "sensor_geometry_with_transparency.csv"
ICE_TABLE_FILE = "ice_transparency.txt"
SENSOR_COLUMNS = ("qe", "scatter", "absorp")
HIGH_QE, QE_SHIFT, QE_SCALE = 1.35, 1.25, 0.25
DEEPCORE_STRINGS = range(78, 86)        # 0-based strings 79..86 carry high-QE DOMs
ICE_DATUM = 1950.0


# ---- reading the side files --------------------------------------------------------------------
def _role_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.startswith("angle_bins") and name.endswith(".json"):
        return "bins"
    if name.startswith("ice_transparency") and name.endswith(".txt"):
        return "ice"
    if path.suffix.lower() in (".csv", ".parquet") and "transparency" in name:
        return "sensors"
    return None


def read_bins(path: Path, n_bins: int) -> dict[str, torch.Tensor]:
    try:
        data = json.loads(Path(path).read_text())
        azimuth = np.asarray(data["azimuth_bin_centers"], dtype=np.float64)
        zenith = np.asarray(data["zenith_bin_centers"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not the author's angle-bins file ({type(err).__name__}: {err})") from None
    if azimuth.shape != (n_bins,) or zenith.shape != (n_bins,):
        raise InputError(f"{path}: {azimuth.size} azimuth / {zenith.size} zenith bin centres, "
                         f"the classifier has {n_bins} bins")
    return {"azimuth_bin_centers": torch.from_numpy(azimuth), "zenith_bin_centers": torch.from_numpy(zenith)}


def read_sensor_table(path: Path) -> dict[str, torch.Tensor]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path) if Path(path).suffix.lower() == ".parquet" else pacsv.read_csv(path)
    except (pa.ArrowException, OSError) as err:       # parser errors of either format
        raise InputError(f"{path}: not a readable sensor table ({type(err).__name__})") from None
    missing = [c for c in ("sensor_id", *SENSOR_COLUMNS) if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: sensor table lacks column '{missing[0]}' (needs sensor_id, qe, scatter, absorp)")
    try:
        sensor = table["sensor_id"].to_numpy()
        columns = {c: table[c].to_numpy().astype(np.float64) for c in SENSOR_COLUMNS}
    except (pa.ArrowException, ValueError, TypeError) as err:
        raise InputError(f"{path}: non-numeric sensor table column ({type(err).__name__})") from None
    if not np.array_equal(np.sort(sensor), np.arange(sensor.shape[0])):
        raise InputError(f"{path}: sensor_id must be 0..{sensor.shape[0] - 1}, each once")
    order = np.argsort(sensor)
    return {f"sensor_{c}": torch.from_numpy(columns[c][order]) for c in SENSOR_COLUMNS}


def read_ice_table(path: Path) -> dict[str, torch.Tensor]:
    try:
        rows = np.loadtxt(path, skiprows=1, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not the ice table 'depth scattering_len absorption_len' ({err})") from None
    if rows.shape[1] != 3 or rows.shape[0] < 2 or np.any(np.diff(rows[:, 0]) <= 0):
        raise InputError(f"{path}: needs 3 columns (depth scattering_len absorption_len), depth increasing")
    return {"ice_table": torch.from_numpy(rows)}


def read_aux(paths: dict[str, Path], n_bins: int, model: str) -> dict[str, torch.Tensor]:
    """The checkpoint aux of a classifier preset from the ``--aux`` files (by name); one-line InputError
    for a missing or unrecognised file."""
    by_role: dict[str, Path] = {}
    for path in paths.values():
        role = _role_of(Path(path))
        if role is None:
            raise InputError(f"{path}: not a side file of the 3rd place (have {BINS_FILE}, "
                             f"{SENSOR_TABLE_FILE} or .parquet, {ICE_TABLE_FILE})")
        if not Path(path).is_file():
            raise InputError(f"{path}: aux file not found")
        by_role[role] = Path(path)
    if "bins" not in by_role:
        raise InputError(f"--aux {BINS_FILE}: missing; model '{model}' needs the author's angle bins "
                         f"(they ship with the weights)")
    if "sensors" not in by_role and "ice" not in by_role:
        raise InputError(f"--aux {SENSOR_TABLE_FILE}: missing; model '{model}' needs the author's per-sensor "
                         f"qe/scatter/absorp table (or {ICE_TABLE_FILE})")
    aux = read_bins(by_role["bins"], n_bins)
    aux.update(read_sensor_table(by_role["sensors"]) if "sensors" in by_role else read_ice_table(by_role["ice"]))
    return aux


# ---- per-sensor values ------------------------------------------------------------------------------
def quantum_efficiency(n_sensors: int) -> np.ndarray:
    """The author's qe per sensor, scaled: 1.35 on DOMs 11..59 of 0-based strings 78..85 and, because
    pandas ``.loc`` slices are inclusive, on DOM 0 of the string after each; 1 elsewhere."""
    sensor = np.arange(n_sensors)
    string, dom = sensor // DOMS_PER_STRING, sensor % DOMS_PER_STRING
    core = np.isin(string, DEEPCORE_STRINGS) & (dom >= 11)
    spill = np.isin(string - 1, DEEPCORE_STRINGS) & (dom == 0)
    qe = np.where(core | spill, HIGH_QE, 1.0)
    return (qe - QE_SHIFT) / QE_SCALE


def _robust_scale(values: np.ndarray) -> np.ndarray:
    """scikit-learn's RobustScaler (median, 25-75 % range) fitted on and applied to ``values``."""
    q25, median, q75 = np.percentile(values, [25, 50, 75], axis=0)
    return (values - median) / np.where(q75 > q25, q75 - q25, 1.0)


def ice_properties(ice_table: np.ndarray, z_metres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scatter, absorp) at IceCube z: the scaled table lengths interpolated at z / 500 over (depth - 1950) / 500."""
    z_norm = (ice_table[:, 0] - ICE_DATUM) / 500.0
    scaled = _robust_scale(ice_table[:, 1:3])
    z = np.asarray(z_metres, dtype=np.float64) / 500.0
    return np.interp(z, z_norm, scaled[:, 0]), np.interp(z, z_norm, scaled[:, 1])


class GPTAuthorsFeatures(FeatureTransform):
    """The author's 9 inputs (see the module docstring); per-sensor values come from the checkpoint aux."""

    name = "gpt_boost_authors"
    version = 1
    position_scale = 500.0
    time_scale = 3.0e4
    charge_log_scale = 3.0
    aux_shift = 0.5

    def __init__(self, **constants: float):
        super().__init__(**constants)
        self.sensor_table: np.ndarray | None = None     # (n_sensors, 3) qe, scatter, absorp
        self.ice_table: np.ndarray | None = None
        self.stack_model_only = False

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "position_scale": self.position_scale,
                "time_scale": self.time_scale, "charge_log_scale": self.charge_log_scale,
                "aux_shift": self.aux_shift}

    def load_aux(self, aux: dict) -> None:
        self.stack_model_only = bool(aux.get("stack_model_only", False))
        if all(f"sensor_{c}" in aux for c in SENSOR_COLUMNS):
            self.sensor_table = np.stack([np.asarray(aux[f"sensor_{c}"], dtype=np.float64) for c in SENSOR_COLUMNS], 1)
        elif "ice_table" in aux:
            self.ice_table = np.asarray(aux["ice_table"], dtype=np.float64)

    def sensor_values(self, geometry: Geometry) -> np.ndarray:
        """(n_sensors, 3) qe, scatter, absorp for ``geometry``'s sensors."""
        if self.sensor_table is not None:
            if self.sensor_table.shape[0] < geometry.n_sensors:
                raise InputError(f"geometry has {geometry.n_sensors} sensors, the checkpoint's sensor table "
                                 f"{self.sensor_table.shape[0]}: import with {ICE_TABLE_FILE} instead")
            return self.sensor_table[:geometry.n_sensors]
        if self.stack_model_only:
            raise InputError("gpt_boost: this checkpoint holds the stack model alone, which takes a classifier's "
                             "pool and logits; import it together with a classifier (--from CLASSIFIER --from STACK)")
        if self.ice_table is None:
            raise InputError(f"{self.name}: no per-sensor qe/scatter/absorp; import the weights with "
                             f"--aux {SENSOR_TABLE_FILE} (or {ICE_TABLE_FILE})")
        scatter, absorp = ice_properties(self.ice_table, geometry.z)
        return np.stack([quantum_efficiency(geometry.n_sensors), scatter, absorp], axis=1)

    def __call__(self, data: ShardData, selection: Selection, geometry: Geometry) -> ShardFeatures:
        index, offset = selection.index, selection.offset
        sensor = data.pulses["sensor_id"][index].astype(np.int64)
        time = data.pulses["time"][index].astype(np.float64)
        event = event_of_pulse(offset)
        t_min = np.zeros(selection.n_pulses.shape[0])
        nonempty = selection.lengths > 0
        if index.shape[0]:
            t_min[nonempty] = np.minimum.reduceat(time, offset[:-1][nonempty])
        charge = np.log10(data.pulses["charge"][index].astype(np.float64)) / self.charge_log_scale
        auxiliary = data.pulses["auxiliary"][index].astype(np.float64) - self.aux_shift
        x = np.concatenate([((time - t_min[event]) / self.time_scale)[:, None], charge[:, None], auxiliary[:, None],
                            geometry.xyz[sensor] / self.position_scale, self.sensor_values(geometry)[sensor]],
                           axis=1)
        # The engineered event features (all pulses of an event) feed icegrid's head selector only.
        return ShardFeatures(selection=selection, pulse={"x": x.astype(np.float32)},
                             event={"engineered": engineered_event_features(data, geometry)})
