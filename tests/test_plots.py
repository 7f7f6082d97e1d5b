"""The figures draw exactly the numbers in the tables: curves and bands against resolution.csv, KDE curves
and mode lines against kde.parquet; files are written as PNG and PDF."""

from __future__ import annotations

import matplotlib.collections
import matplotlib.colors
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from test_analysis_support import make_truth, random_directions, rotate_away, write_store

from icegrid import plots
from icegrid.analysis import analyze_store, load_settings, store_histograms, summarize

SIGMA = {"linefit": 15.0, "first": 3.0, "second": 1.0}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A two-shard store with three models (20 % of events isotropic), analysed with figures."""
    tmp = tmp_path_factory.mktemp("plots")
    rng = np.random.default_rng(17)
    truths = [make_truth(rng, 8000, energy_range=(3e3, 3e5)) for _ in range(2)]
    predictions = {}
    for model, sigma in SIGMA.items():
        predictions[model] = []
        for truth in truths:
            n = truth["azimuth"].size
            # Resolution improves with energy, as for real reconstructions.
            sigma_event = np.radians(sigma) * (truth["energy"] / 3e3) ** -0.2
            vectors = rotate_away(truth["direction"], sigma_event * np.sqrt(-2 * np.log1p(-rng.random(n))), rng)
            background = rng.random(n) < 0.2
            vectors[background] = random_directions(rng, int(background.sum()))
            predictions[model].append(vectors)
    store = write_store(tmp / "s.zarr", truths, predictions)
    settings = load_settings({"bootstrap": {"resamples": 40}})
    paths = analyze_store(store, None, tmp / "out", settings)
    return store, settings, paths


def test_every_figure_is_written_as_png_and_pdf(analysed):
    _, _, paths = analysed
    for stem in ("resolution_vs_energy", "kde_track_up", "kde_track_down", "kde_cascade_up", "kde_cascade_down"):
        png, pdf = paths[f"{stem}_png"], paths[f"{stem}_pdf"]
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 500 and image.shape[1] > 500
        assert pdf.read_bytes().startswith(b"%PDF")


def test_resolution_curves_and_bands_are_the_numbers_in_resolution_csv(analysed):
    _, settings, paths = analysed
    rows = pacsv.read_csv(paths["resolution_csv"]).to_pylist()
    fig = plots.plot_resolution(rows, settings.reference_model)
    try:
        assert len(fig.axes) == 4
        checked = 0
        for ax in fig.axes:
            shape, direction = ax.icegrid_panel
            assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
            assert "energy" in ax.get_xlabel() or ax.get_xlabel() == ""
            lines = {line.get_gid(): line for line in ax.get_lines()}
            bands = [c for c in ax.collections if isinstance(c, matplotlib.collections.PolyCollection)]
            assert set(lines) == set(SIGMA) and len(bands) == len(SIGMA)
            for (model, line), band in zip(lines.items(), bands):
                mine = [r for r in rows if (r["model"], r["shape"], r["direction"]) == (model, shape, direction)]
                expected_x = np.sqrt([r["e_lo"] * r["e_hi"] for r in mine])
                expected_y = np.array([np.nan if r["mode_deg"] is None else r["mode_deg"] for r in mine])
                assert np.allclose(line.get_xdata(), expected_x, rtol=1e-12)
                assert np.allclose(line.get_ydata(), expected_y, rtol=1e-12, equal_nan=True)
                assert np.isfinite(expected_y).sum() >= 6  # the curve is really there
                # The band polygon spans exactly the table's [mode_lo, mode_hi] of the finite bins.
                band_y = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
                lo = [r["mode_lo_deg"] for r in mine if r["mode_lo_deg"] is not None]
                hi = [r["mode_hi_deg"] for r in mine if r["mode_hi_deg"] is not None]
                assert band_y.min() == pytest.approx(min(lo)) and band_y.max() == pytest.approx(max(hi))
                checked += 1
            # The line-fit is the grey dashed reference curve.
            assert lines["linefit"].get_linestyle() == "--"
            assert np.allclose(matplotlib.colors.to_rgb(lines["linefit"].get_color()), [0.45] * 3)
        assert checked == 4 * len(SIGMA)
        assert "[deg]" in fig.axes[0].get_ylabel()
    finally:
        plt.close(fig)


def test_missing_bins_are_gaps_not_bridged(analysed):
    _, settings, paths = analysed
    rows = pacsv.read_csv(paths["resolution_csv"]).to_pylist()
    hole = next(r for r in rows if r["model"] == "first" and r["mode_deg"] is not None and r["e_lo"] > 1e4)
    hole.update(mode_deg=None, mode_lo_deg=None, mode_hi_deg=None)
    fig = plots.plot_resolution(rows, settings.reference_model)
    try:
        ax = next(a for a in fig.axes if a.icegrid_panel == (hole["shape"], hole["direction"]))
        line = next(line for line in ax.get_lines() if line.get_gid() == "first")
        at = np.argmin(np.abs(line.get_xdata() - np.sqrt(hole["e_lo"] * hole["e_hi"])))
        assert np.isnan(line.get_ydata()[at])
    finally:
        plt.close(fig)


def test_kde_panels_draw_the_kde_table_with_the_mode_at_the_peak(analysed):
    store, settings, paths = analysed
    resolution = pacsv.read_csv(paths["resolution_csv"]).to_pylist()
    curves_table = pq.read_table(paths["kde_parquet"]).to_pylist()
    histograms, warnings = store_histograms(store, None, load_settings({"bootstrap": {"resamples": 40}}))
    result = summarize(histograms, settings, warnings)
    fig = plots.plot_kde_panels(result.curves, "track", "up", result.energy_edges, settings.reference_model)
    try:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert panels and all(ax.get_xscale() == "log" for ax in panels)
        for ax in panels:
            shape, direction, energy_bin = ax.icegrid_panel
            e_lo = result.energy_edges[energy_bin]
            curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
            modes = [line for line in ax.get_lines() if line.get_label().endswith(" mode")]
            assert len(curves) == len(modes) == len(SIGMA)
            for curve, mode_line in zip(curves, modes):
                model = curve.get_gid()
                row = next(r for r in resolution if (r["model"], r["shape"], r["direction"]) == (model, shape,
                                                                                               direction)
                           and r["e_lo"] == pytest.approx(e_lo))
                assert mode_line.get_xdata()[0] == pytest.approx(row["mode_deg"], rel=1e-12)
                stored = [c for c in curves_table if (c["model"], c["shape"], c["direction"]) == (model, shape,
                                                                                                direction)
                          and c["e_lo"] == pytest.approx(e_lo)]
                density = np.array([np.nan if c["density_per_deg"] is None else c["density_per_deg"]
                                    for c in stored])
                assert np.allclose(curve.get_xdata(), [c["angle_deg"] for c in stored])
                assert np.allclose(curve.get_ydata(), density, equal_nan=True)
                # The marked mode is where the drawn curve peaks (display grid: 400 log steps, ~2 %).
                peak = curve.get_xdata()[np.nanargmax(curve.get_ydata())]
                assert peak == pytest.approx(row["mode_deg"], rel=0.04)
    finally:
        plt.close(fig)
