"""Histograms for reconstructions made outside icegrid: a predictions parquet (event_id, azimuth, zenith in
radians, optional model) joined on event_id with a Kaggle meta parquet (event_id, azimuth, zenith; energy,
shape and first/last_pulse_index when present).

Both files are checked before anything is counted, each problem one line naming the file and the column:
event ids that are not integers, duplicate event ids (an event counted twice moves the score), angles
outside the radian ranges (degrees give a plausible-looking but wrong score), prediction ids missing from
the truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from icegrid.analysis.angles import AngleGrid, opening_angle
from icegrid.analysis.histograms import ResolutionHistograms, ViewBinning, shard_histograms
from icegrid.analysis.settings import AnalysisError, AnalysisSettings
from icegrid.errors import first_line
from icegrid.kaggle import shape_codes

ANGLE_RANGES = {"azimuth": (2 * np.pi, "2π"), "zenith": (np.pi, "π")}
_SLACK = 1e-6  # rad: float round-off of an angle computed at the end of its range


def _open_parquet(path: Path, what: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise AnalysisError(f"{path}: not a readable parquet {what} file ({first_line(err)})") from None


def _check_types(path: Path, schema, integer: tuple[str, ...], numeric: tuple[str, ...]) -> None:
    import pyarrow as pa

    for name in integer + numeric:
        if name not in schema.names:
            continue
        kind = schema.field(name).type
        wanted = pa.types.is_integer(kind) or (name in numeric and pa.types.is_floating(kind))
        if not wanted:
            expected = "integers" if name in integer else "numbers in radians" if name in ANGLE_RANGES else "numbers"
            raise AnalysisError(f"{path}: column '{name}' has type {kind}, expected {expected}")


def check_angle_ranges(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Finite azimuths outside [0, 2π] or zeniths outside [0, π] are a one-line error (NaN is allowed)."""
    for name, (top, label) in ANGLE_RANGES.items():
        values = columns[name]
        bad = np.isfinite(values) & ((values < -_SLACK) | (values > top + _SLACK))
        if bad.any():
            worst = float(values[bad][np.argmax(np.abs(values[bad]))])
            hint = ": looks like degrees (icegrid reads radians)" if abs(worst) > top + _SLACK else ""
            raise AnalysisError(f"{path}: column '{name}' has value {worst:.6g}, outside [0, {label}] rad{hint}")


def _duplicate(sorted_ids: np.ndarray) -> int | None:
    same = np.flatnonzero(np.diff(sorted_ids) == 0)
    return int(sorted_ids[same[0]]) if same.size else None


def read_truth_table(path: Path) -> dict[str, np.ndarray]:
    """The truth (Kaggle meta) parquet, sorted by event_id: event_id, azimuth, zenith, and energy, shape and
    n_pulses when the file has them."""
    import pyarrow.parquet as pq

    schema = _open_parquet(path, "truth (meta)").schema_arrow
    names = schema.names
    missing = [c for c in ("event_id", "azimuth", "zenith") if c not in names]
    if missing:
        raise AnalysisError(f"{path}: no column(s) {', '.join(missing)}; the truth needs event_id and the true "
                            "azimuth, zenith [rad] (energy, shape optional)")
    _check_types(path, schema, ("event_id", "first_pulse_index", "last_pulse_index"), ("azimuth", "zenith", "energy"))
    has_pulses = {"first_pulse_index", "last_pulse_index"} <= set(names)
    columns = ["event_id", "azimuth", "zenith"] + [c for c in ("energy", "shape") if c in names] \
        + (["first_pulse_index", "last_pulse_index"] if has_pulses else [])
    table = pq.read_table(path, columns=columns)
    truth = {"event_id": table["event_id"].to_numpy().astype(np.int64)}
    for name in ("azimuth", "zenith", "energy"):
        if name in table.column_names:
            truth[name] = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
            if not np.isfinite(truth[name]).all():
                raise AnalysisError(f"{path}: column '{name}' has NaN or infinite truth values")
    check_angle_ranges(path, truth)
    if "shape" in table.column_names:
        shape_names = np.asarray(table["shape"].cast("string").to_pylist(), dtype=object)
        truth["shape"] = shape_codes(shape_names, path, error=AnalysisError)
    if has_pulses:
        truth["n_pulses"] = (table["last_pulse_index"].to_numpy() - table["first_pulse_index"].to_numpy() + 1)
    order = np.argsort(truth["event_id"], kind="stable")
    truth = {k: v[order] for k, v in truth.items()}
    duplicate = _duplicate(truth["event_id"])
    if duplicate is not None:
        raise AnalysisError(f"{path}: duplicate event_id {duplicate} (each event must appear once; a repeated "
                            "one would be counted twice)")
    return truth


def iter_prediction_table(path: Path, batch_rows: int = 1 << 20) -> Iterator[dict[str, np.ndarray]]:
    """The predictions parquet in batches: event_id, azimuth, zenith (radians, range-checked), model."""
    parquet = _open_parquet(path, "predictions")
    names = parquet.schema_arrow.names
    missing = [c for c in ("event_id", "azimuth", "zenith") if c not in names]
    if missing:
        raise AnalysisError(f"{path}: missing column(s) {', '.join(missing)} (need event_id, azimuth, zenith "
                            "in radians, optional model)")
    _check_types(path, parquet.schema_arrow, ("event_id",), ("azimuth", "zenith"))
    columns = ["event_id", "azimuth", "zenith"] + (["model"] if "model" in names else [])
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        out = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in ("event_id", "azimuth", "zenith")}
        if np.issubdtype(out["event_id"].dtype, np.floating):  # an integer column with nulls
            raise AnalysisError(f"{path}: column 'event_id' has missing values")
        for name in ("azimuth", "zenith"):
            out[name] = np.asarray(out[name], dtype=np.float64)
        check_angle_ranges(path, out)
        if "model" in columns:
            out["model"] = np.asarray(batch.column("model").cast("string").to_pylist(), dtype=object)
        yield out


class _SeenEvents:
    """Which truth rows each model already predicted: a duplicate id anywhere in the file is caught."""

    def __init__(self, path: Path, n_truth: int):
        self.path, self.n_truth, self.seen = path, n_truth, {}

    def add(self, model: str, rows: np.ndarray, event_id: np.ndarray) -> None:
        seen = self.seen.setdefault(model, np.zeros(self.n_truth, dtype=bool))
        order = np.argsort(rows, kind="stable")
        repeated = _duplicate(rows[order])
        before = np.flatnonzero(seen[rows])
        if repeated is not None or before.size:
            example = event_id[order][np.flatnonzero(np.diff(rows[order]) == 0)[0]] if repeated is not None \
                else event_id[before[0]]
            raise AnalysisError(f"{self.path}: event_id {int(example)} appears more than once for model '{model}' "
                                "(each event must be predicted once; a repeated one would be counted twice)")
        seen[rows] = True


def prediction_histograms(predictions_path: Path | str, truth_path: Path | str, settings: AnalysisSettings,
                          default_model: str | None = None) -> tuple[dict[str, ResolutionHistograms], list[str]]:
    """Histograms of a predictions parquet joined on event_id with a truth parquet."""
    from icegrid.store import direction_from_angles

    predictions_path, truth_path = Path(predictions_path), Path(truth_path)
    default_model = default_model or predictions_path.stem
    truth = read_truth_table(truth_path)
    truth_vectors = direction_from_angles(truth["azimuth"], truth["zenith"])
    grid, edges, views = AngleGrid.from_settings(settings), settings.energy.edges(), ViewBinning.from_settings(settings)
    seen = _SeenEvents(predictions_path, truth["event_id"].size)
    totals: dict[str, ResolutionHistograms] = {}
    n_rows = 0
    for chunk in iter_prediction_table(predictions_path):
        n_rows += chunk["event_id"].size
        row = np.minimum(np.searchsorted(truth["event_id"], chunk["event_id"]), truth["event_id"].size - 1)
        unmatched = truth["event_id"][row] != chunk["event_id"]
        if unmatched.any():
            raise AnalysisError(f"{predictions_path}: {int(unmatched.sum())} event_id(s) (e.g. "
                                f"{int(chunk['event_id'][unmatched][0])}) are not in {truth_path}")
        models = chunk.get("model", np.full(row.size, default_model, dtype=object))
        angles = opening_angle(direction_from_angles(chunk["azimuth"], chunk["zenith"]), truth_vectors[row])
        for model in np.unique(models):
            pick = models == model
            seen.add(model, row[pick], chunk["event_id"][pick])
            rows = row[pick]
            part = shard_histograms(angles[pick], _take(truth, "energy", rows), _take(truth, "shape", rows),
                                    truth["zenith"][rows], edges, grid, _take(truth, "n_pulses", rows), views)
            totals[model] = totals[model] + part if model in totals else part
    if n_rows == 0:
        raise AnalysisError(f"{predictions_path}: no predictions (0 rows)")
    return dict(sorted(totals.items())), []


def _take(truth: dict[str, np.ndarray], name: str, rows: np.ndarray) -> np.ndarray | None:
    return truth[name][rows] if name in truth else None
