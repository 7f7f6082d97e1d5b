"""Talk-ready figures: a fixed colour and display label per model whatever else is present, plain degree and
energy tick labels, and a per-bin KDE grid that stays readable at any bin count (pages of large panels)."""

from __future__ import annotations

import re

import matplotlib.colors
import matplotlib.image
import matplotlib.text
import matplotlib.pyplot as plt
import numpy as np

from icegrid import plots
from icegrid.analysis import AnalysisResult, BinResult, load_settings

EDGES = np.logspace(3, 6, 13)  # 1 TeV - 1 PeV, 4 bins per decade


def _rows(models, shapes=("cascade", "track")):
    """Resolution-table rows with modes between 4° and 9° (under a decade: where 6×10⁰ labels appeared)."""
    rows = []
    for index, model in enumerate(models):
        for shape in shapes:
            for direction in ("up", "down"):
                for lo, hi, mode in zip(EDGES[:-1], EDGES[1:], np.geomspace(8.0, 4.0, EDGES.size - 1)):
                    rows.append({"model": model, "shape": shape, "direction": direction, "e_lo": lo, "e_hi": hi,
                                 "n_events": 500, "mode_deg": mode + 0.1 * index, "mode_lo_deg": mode * 0.95,
                                 "mode_hi_deg": mode * 1.05 + 0.1 * index, "median_deg": 20.0, "mean_deg": 30.0})
    return rows


def _lines(fig):
    return {line.get_gid(): line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}


def test_colours_and_labels_are_fixed_per_model_whatever_else_is_present():
    configured = load_settings().figures.styles
    few = plots.plot_resolution(_rows(["icemix", "linefit", "mine"]))
    many = plots.plot_resolution(_rows(["gpt_boost", "dynedge", "icemix", "icemix@retrained", "linefit", "zeta",
                                        "edgeconv_transformer", "mine"]))
    try:
        a, b = _lines(few), _lines(many)
        for model in ("icemix", "linefit", "mine"):
            assert matplotlib.colors.to_hex(a[model].get_color()) == matplotlib.colors.to_hex(b[model].get_color())
            assert a[model].get_label() == b[model].get_label()
        expected = {"linefit": "LineFit", "dynedge": "DynEdge (baseline)", "icemix": "2nd place (IceMix)",
                    "edgeconv_transformer": "1st place (EdgeConv+Transformer)", "gpt_boost": "3rd place (GPT)"}
        for model, label in expected.items():
            assert b[model].get_label() == label
            assert matplotlib.colors.to_hex(b[model].get_color()) == matplotlib.colors.to_hex(configured[model].color)
        # A tagged model keeps its model's colour, with its own line style; the legend says which it is.
        tagged = b["icemix@retrained"]
        assert tagged.get_color() == b["icemix"].get_color() and tagged.get_linestyle() != b["icemix"].get_linestyle()
        assert tagged.get_label() == "2nd place (IceMix) @retrained"
        assert b["mine"].get_label() == "mine"
        legend = [t.get_text() for t in many.legends[0].get_texts()]
        assert legend[:2] == ["LineFit", "DynEdge (baseline)"]  # reference first, then the configured order
    finally:
        plt.close(few)
        plt.close(many)


def _tick_labels(axis):
    lo, hi = sorted(axis.get_view_interval())
    return [t.get_text() for t, v in zip(axis.get_ticklabels(), axis.get_ticklocs())
            if t.get_visible() and t.get_text() and lo <= v <= hi]


def test_ticks_read_degrees_and_energies_not_powers_of_ten():
    fig = plots.plot_resolution(_rows(["icemix", "linefit"]))
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            degrees = _tick_labels(ax.yaxis)
            assert len(degrees) >= 3 and all(re.fullmatch(r"\d+(\.\d+)?°", t) for t in degrees), degrees
            minor = [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()]
            assert minor == []
        energies = _tick_labels(fig.axes[-1].xaxis)
        assert energies == ["1 TeV", "10 TeV", "100 TeV", "1 PeV"]
        every = [t.get_text() for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                 for t in axis.get_ticklabels(which="both")]
        assert not any("×" in t or "$" in t for t in every)
    finally:
        plt.close(fig)
    assert plots.nice_degree_ticks(0.3, 40) == [0.5, 1, 2, 5, 10, 20]
    assert plots.nice_degree_ticks(4 / 1.5, 9 * 1.5) == [3, 5, 7, 10]
    assert plots.nice_degree_ticks(0.01, 180, max_ticks=6) == [0.01, 0.1, 1, 10, 100]


def _synthetic_kde_result(n_bins=24):
    """A result with a KDE curve in each of ``n_bins`` energy bins (tracks, up-going) for two models."""
    edges = np.logspace(2, 8, n_bins + 1)
    angles = np.geomspace(0.01, 180, 400)
    curves = {}
    for model, sigma in (("linefit", 8.0), ("icemix", 1.0)):
        for energy_bin in range(n_bins):
            width = sigma * (1 + energy_bin) ** -0.3
            density = angles / width**2 * np.exp(-0.5 * (angles / width) ** 2)
            curves[(model, "track", "up", energy_bin)] = BinResult(n_events=1000, mode_deg=width, curve_deg=angles,
                                                                   curve_density=density)
    rows = [{"model": m, "shape": "track", "direction": "up", "e_lo": edges[b], "e_hi": edges[b + 1], "n_events": 1000,
             "mode_deg": fit.mode_deg, "mode_lo_deg": fit.mode_deg * 0.9, "mode_hi_deg": fit.mode_deg * 1.1,
             "median_deg": 2 * fit.mode_deg, "mean_deg": 3 * fit.mode_deg} for (m, _, _, b), fit in curves.items()]
    return AnalysisResult(rows, [], curves, edges, [], shapes=("track",))


def test_a_24_bin_kde_grid_is_split_into_readable_pages(tmp_path):
    result = _synthetic_kde_result()
    settings = load_settings()
    pages = plots.kde_pages(result.curves, "track", "up", settings.figures.panels_per_figure)
    assert [len(p) for p in pages] == [8, 8, 8] and sum(pages, []) == list(range(24))
    fig = plots.plot_kde_panels(result.curves, "track", "up", result.energy_edges, bins=pages[1])
    try:
        fig.canvas.draw()
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.icegrid_panel[2] for ax in visible] == pages[1]
        sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]
        assert min(sizes) >= 11
        width, height = fig.get_size_inches()
        assert width / 4 >= 4 and height / 2 >= 3  # each panel at least 4 x 3 inches
    finally:
        plt.close(fig)
    figs = [plots.plot_kde_panels(result.curves, "track", "up", result.energy_edges, bins=page) for page in pages]
    paths = plots.save_pages(figs, tmp_path / "kde_track_up")
    assert set(paths) == {"kde_track_up_png", "kde_track_up_p2_png", "kde_track_up_p3_png", "kde_track_up_pdf"}
    pdf = paths["kde_track_up_pdf"].read_bytes()
    assert len(re.findall(rb"/Type\s*/Page\b", pdf)) == 3
    assert matplotlib.image.imread(paths["kde_track_up_p3_png"]).shape[1] > 2000


def test_energy_without_shape_draws_one_row_of_all_events():
    fig = plots.plot_resolution(_rows(["icemix"], shapes=("all",)))
    try:
        assert [ax.icegrid_panel for ax in fig.axes] == [("all", "up"), ("all", "down")]
        assert fig.axes[0].get_title().startswith("All events")
    finally:
        plt.close(fig)


def test_a_sub_decade_energy_range_gets_three_plain_labels_and_modes_line_up():
    edges = np.array([100.0, 177.8, 316.2])      # two bins: what the demo's tracks have
    rows = [{"model": "icemix", "shape": "track", "direction": d, "e_lo": lo, "e_hi": hi, "n_events": 200,
             "mode_deg": 5.0, "mode_lo_deg": 4.5, "mode_hi_deg": 5.5, "median_deg": 9.0, "mean_deg": 15.0}
            for d in ("up", "down") for lo, hi in zip(edges[:-1], edges[1:])]
    fig = plots.plot_shape_resolution(rows, "track")
    try:
        fig.canvas.draw()
        assert _tick_labels(fig.axes[-1].xaxis) == ["100 GeV", "150 GeV", "200 GeV", "300 GeV"]
    finally:
        plt.close(fig)
    from icegrid.plots.kde import mode_text
    assert [mode_text(v) for v in (4.6, 2.544, 53.6, 120.4, 9.996)] == ["4.60°", "2.54°", "53.6°", "120°", "10.0°"]


def test_png_resolution_is_the_figures_dpi_setting(tmp_path):
    result = _synthetic_kde_result(n_bins=4)
    settings = load_settings({"figures": {"dpi": 60}})
    paths = plots.write_figures(result, tmp_path, settings)
    fig = plots.plot_resolution(result.rows)
    width_in = fig.get_figwidth()
    plt.close(fig)
    assert matplotlib.image.imread(paths["resolution_vs_energy_png"]).shape[1] == round(60 * width_in)
    default = plots.save(plots.plot_resolution(result.rows), tmp_path / "alone")   # outside write_figures: 150
    assert matplotlib.image.imread(default["alone_png"]).shape[1] == round(150 * width_in)
