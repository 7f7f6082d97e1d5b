"""What ``icegrid analyze`` writes, and its two drivers (``analyze_store``, ``analyze_predictions``).

Tables (each written aside, then renamed into place)::

    scores.csv                      Kaggle score (mean opening angle, rad) per model: all, up- and down-going
    opening_angle.csv               per model and direction (all/up/down): mode, 1σ band, median, mean
    opening_angle_distribution.csv  exact event counts in coarse opening-angle bins, fraction, cumulative
    opening_angle_kde.parquet       the KDE curves drawn in opening_angle.png
    resolution_zenith.csv           resolution per cos(true zenith) bin (needs true directions only)
    resolution_pulses.csv           resolution per bin in the number of pulses, up/down (needs event lengths)
    resolution.csv / .parquet       resolution per shape × direction × energy bin (needs truth energy)
    kde.parquet                     the per-energy-bin KDE curves
    kde_bins.csv / .parquet         the paper layout's single-bin KDEs over the named energy ranges

Figures: ``icegrid.plots.write_figures``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from icegrid.analysis.from_files import prediction_histograms
from icegrid.analysis.from_store import store_histograms
from icegrid.analysis.names import select_models
from icegrid.analysis.settings import (DISTRIBUTION_COLUMNS, OPENING_ANGLE_COLUMNS, PULSES_COLUMNS,
                                       RESOLUTION_COLUMNS, SCORE_COLUMNS, ZENITH_COLUMNS, AnalysisError,
                                       AnalysisSettings, load_settings)
from icegrid.analysis.summary import AnalysisResult, kde_ranges, summarize

_STRINGS = {"model", "shape", "direction"}
_INTEGERS = {"n_events", "n_up", "n_down", "n_pulses_lo", "n_pulses_hi"}


def table_of(rows: list[dict], columns: Sequence[str]):
    """A pyarrow table with exactly ``columns``; non-finite floats become nulls (empty CSV cells)."""
    import pyarrow as pa

    out = {}
    for name in columns:
        values = [row[name] for row in rows]
        if name in _STRINGS:
            out[name] = pa.array(values, type=pa.string())
        elif name in _INTEGERS:
            out[name] = pa.array(values, type=pa.int64())
        else:
            array = np.asarray(values, dtype=np.float64)
            out[name] = pa.array(array, mask=~np.isfinite(array), type=pa.float64())
    return pa.table(out)


def resolution_table(result: AnalysisResult):
    """The ``resolution`` table (pyarrow) with exactly ``RESOLUTION_COLUMNS``; missing values are null."""
    return table_of(result.rows, RESOLUTION_COLUMNS)


def scores_table(result: AnalysisResult):
    return table_of(result.scores, SCORE_COLUMNS)


def curves_table(curves: dict, key_columns: Sequence[str], key_values: Callable[[tuple], tuple]):
    """KDE curves as long rows: ``key_columns`` (from each key), angle_deg, density_per_deg (1/deg, per event)."""
    import pyarrow as pa

    keys = {name: [] for name in key_columns}
    angles, densities = [], []
    for key, fit in curves.items():
        n = fit.curve_deg.size
        for name, value in zip(key_columns, key_values(key)):
            keys[name].append(np.full(n, value, dtype=object if isinstance(value, str) else np.float64))
        angles.append(fit.curve_deg)
        densities.append(fit.curve_density)
    out = {}
    for name, parts in keys.items():
        values = np.concatenate(parts) if parts else np.empty(0)
        out[name] = pa.array(values.tolist(), type=pa.string()) if name in _STRINGS else \
            pa.array(values.astype(np.float64), type=pa.float64())
    for name, parts in (("angle_deg", angles), ("density_per_deg", densities)):
        array = np.concatenate(parts) if parts else np.empty(0)
        out[name] = pa.array(array, mask=~np.isfinite(array), type=pa.float64())
    return pa.table(out)


def kde_table(result: AnalysisResult):
    """The per-energy-bin KDE curves drawn in the KDE panels (density in 1/degree, per event of the bin)."""
    edges = result.energy_edges
    return curves_table(result.curves, ("model", "shape", "direction", "e_lo", "e_hi"),
                        lambda k: (k[0], k[1], k[2], float(edges[k[3]]), float(edges[k[3] + 1])))


def _echo(result: AnalysisResult, settings: AnalysisSettings, echo: Callable[[str], None]) -> None:
    for warning in result.warnings:
        echo(f"warning: {warning}")
    for score in result.scores:
        echo(f"{score['model']}: {score['n_events']:,} events, Kaggle score (mean opening angle) "
             f"{score['kaggle_score_rad']:.4f} rad (up-going {score['kaggle_score_up_rad']:.4f}, "
             f"down-going {score['kaggle_score_down_rad']:.4f})")
    rows = result.rows + result.zenith_rows + result.pulse_rows
    thin = [r for r in rows if 0 < r["n_events"] < settings.min_events]
    if thin:
        echo(f"note: {len(thin)} bin(s) have fewer than {settings.min_events} events: no mode (empty cells)")
    for note in result.notes:
        echo(f"note: {note}")


def write_outputs(result: AnalysisResult, out_dir: Path | str, settings: AnalysisSettings,
                  echo: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the tables (atomically: aside, then rename) and, if ``settings.plots``, the figures."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if echo is not None:
        _echo(result, settings, echo)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def _write(label: str, name: str, table) -> None:
        path = out_dir / name
        partial = path.with_name(f".{path.name}.partial")
        (pq.write_table if name.endswith(".parquet") else pacsv.write_csv)(table, partial)
        paths[label] = partial.replace(path)

    _write("scores_csv", "scores.csv", scores_table(result))
    if result.has_energy:
        resolution = resolution_table(result)
        _write("resolution_csv", "resolution.csv", resolution)
        _write("resolution_parquet", "resolution.parquet", resolution)
        _write("kde_parquet", "kde.parquet", kde_table(result))
    if result.overall_rows:
        _write("opening_angle_csv", "opening_angle.csv", table_of(result.overall_rows, OPENING_ANGLE_COLUMNS))
        _write("opening_angle_distribution_csv", "opening_angle_distribution.csv",
               table_of(result.distribution_rows, DISTRIBUTION_COLUMNS))
        _write("opening_angle_kde_parquet", "opening_angle_kde.parquet",
               curves_table(result.overall_curves, ("model", "direction"), lambda k: k))
        _write("resolution_zenith_csv", "resolution_zenith.csv", table_of(result.zenith_rows, ZENITH_COLUMNS))
    if result.pulse_rows:
        _write("resolution_pulses_csv", "resolution_pulses.csv", table_of(result.pulse_rows, PULSES_COLUMNS))
    if result.range_rows:
        ranges = table_of(result.range_rows, RESOLUTION_COLUMNS)
        _write("kde_bins_csv", "kde_bins.csv", ranges)
        _write("kde_bins_parquet", "kde_bins.parquet",
               curves_table(result.range_curves, ("model", "shape", "direction", "e_lo", "e_hi"),
                            lambda k: (k[0], k[1], k[2], k[3][0], k[3][1])))
    if settings.plots:
        from icegrid import plots

        paths.update(plots.write_figures(result, out_dir, settings, echo=echo))
    return paths


def _check_ranges(settings: AnalysisSettings) -> None:
    # Named KDE ranges are checked before any shard is read: a typo must not cost a full pass.
    if settings.plots and settings.figures.paper:
        kde_ranges(settings)


def analyze_store(store_path: Path | str, models: Sequence[str] | None, out_dir: Path | str,
                  settings: AnalysisSettings | None = None, echo: Callable[[str], None] | None = None,
                  force: bool = False) -> dict[str, Path]:
    """The campaign's last stage: scores, resolution tables, KDE curves and figures for a store.

    ``models=None`` takes every model with predictions (names and aliases such as ``2nd`` accepted);
    ``echo`` receives warnings, notes and the scores. Returns the written paths by label. When the
    store's truth and predictions and the options are those of the outputs already in ``out_dir``
    (``icegrid.analysis.cache``), nothing is recomputed, one line says so, unless ``force``.
    """
    from icegrid.analysis import cache

    settings = settings or load_settings()
    _check_ranges(settings)
    key = cache.analysis_key(store_path, models, settings)
    kept = None if force else cache.cached_outputs(out_dir, key)
    if kept is not None:
        if echo is not None:
            echo(f"analysis: skipped, the store's predictions and truth and the options are those of the "
                 f"{len(kept)} output(s) already in {out_dir}")
        return kept
    cache.forget(out_dir)
    histograms, warnings = store_histograms(store_path, models, settings)
    paths = write_outputs(summarize(histograms, settings, warnings), out_dir, settings, echo)
    cache.remember(out_dir, key, paths)
    return paths


def analyze_predictions(predictions_path: Path | str, truth_path: Path | str, out_dir: Path | str,
                        settings: AnalysisSettings | None = None, models: Sequence[str] | None = None,
                        echo: Callable[[str], None] | None = None) -> dict[str, Path]:
    """``icegrid analyze --predictions P.parquet --truth META.parquet``."""
    settings = settings or load_settings()
    _check_ranges(settings)
    histograms, warnings = prediction_histograms(predictions_path, truth_path, settings)
    picked, unknown = select_models(models, list(histograms))
    if unknown or not picked:
        raise AnalysisError(f"{predictions_path}: no predictions from model(s) {', '.join(unknown) or 'none asked'} "
                            f"(file has: {', '.join(histograms)})")
    histograms = {m: histograms[m] for m in picked}
    return write_outputs(summarize(histograms, settings, warnings), out_dir, settings, echo)
