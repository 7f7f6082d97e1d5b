"""Resolution analysis: opening angles, the Kaggle score, and the primary mode of the opening-angle
distribution with a bootstrap 1σ band, binned in whatever the truth has.

With true directions only (the real Kaggle train split) it writes the Kaggle score (all, up- and
down-going), the opening-angle distribution, and resolution vs cos(zenith) and vs number of pulses; with a
true energy also resolution vs energy per up/down-going, split into tracks and cascades when the truth
has a shape (the paper's Figs. 7-10). What it skipped, and why, is one ``note:`` line.

Modules
    * ``settings``: the config (``icegrid/config/analysis.yaml``), table columns, ``AnalysisError``;
    * ``angles``: ``opening_angle`` (atan2 form, exact near 0° and 180°), ``kaggle_score``, ``AngleGrid``;
    * ``histograms``: the pure per-shard map step ``shard_histograms`` -> additive ``ResolutionHistograms``;
    * ``kde``: the per-bin reduce step ``bin_resolution`` (the KDE method and why it looks as it does);
    * ``summary``: ``summarize``: all models' histograms -> table rows, scores, curves, notes;
    * ``from_store`` / ``from_files``: histograms from an event store, or from a predictions parquet joined
      with a truth parquet (strictly checked: integer ids, no duplicates, radians);
    * ``names``: model names and aliases (``2nd``, ``baseline``, ``all``) against what has predictions;
    * ``outputs``: the tables written and the drivers ``analyze_store`` / ``analyze_predictions``.
"""

from icegrid.analysis.angles import AngleGrid, kaggle_score, opening_angle, opening_angle_from_angles
from icegrid.analysis.from_files import prediction_histograms, read_truth_table
from icegrid.analysis.from_store import TruthKind, store_histograms, store_shard_histograms, store_truth_kind
from icegrid.analysis.histograms import AngleCounts, ResolutionHistograms, ViewBinning, shard_histograms
from icegrid.analysis.kde import (BinResult, _Window, bin_resolution, fit_kde, kde_on_window, mode_search_start,
                                  modes_on_window, shorth)
from icegrid.analysis.names import select_models
from icegrid.analysis.outputs import (analyze_predictions, analyze_store, kde_table, resolution_table, scores_table,
                                      table_of, write_outputs)
from icegrid.analysis.settings import (DIRECTIONS, DISTRIBUTION_COLUMNS, MAX_ANGLE_DEG, OPENING_ANGLE_COLUMNS,
                                       PULSES_COLUMNS, RESOLUTION_COLUMNS, SCORE_COLUMNS, ZENITH_COLUMNS,
                                       AnalysisError, AnalysisSettings, BandwidthSettings, BootstrapSettings,
                                       EnergyBinning, FigureSettings, KDESettings, ModelStyle, PulseBinning,
                                       ZenithBinning, load_settings)
from icegrid.analysis.summary import AnalysisResult, bin_seed, kde_ranges, summarize, view_seed

__all__ = [
    "AngleCounts", "AngleGrid", "AnalysisError", "AnalysisResult", "AnalysisSettings", "BandwidthSettings",
    "BinResult", "BootstrapSettings", "DIRECTIONS", "DISTRIBUTION_COLUMNS", "EnergyBinning", "FigureSettings",
    "KDESettings", "MAX_ANGLE_DEG", "ModelStyle", "OPENING_ANGLE_COLUMNS", "PULSES_COLUMNS", "PulseBinning",
    "RESOLUTION_COLUMNS", "ResolutionHistograms", "SCORE_COLUMNS", "TruthKind", "ViewBinning", "ZENITH_COLUMNS",
    "ZenithBinning", "_Window", "analyze_predictions", "analyze_store", "bin_resolution", "bin_seed",
    "fit_kde", "kaggle_score", "kde_on_window", "kde_ranges", "kde_table", "load_settings", "mode_search_start",
    "modes_on_window", "opening_angle", "opening_angle_from_angles", "prediction_histograms", "read_truth_table",
    "resolution_table", "scores_table", "select_models", "shard_histograms", "shorth", "store_histograms",
    "store_shard_histograms", "store_truth_kind", "summarize", "table_of", "view_seed", "write_outputs",
]
