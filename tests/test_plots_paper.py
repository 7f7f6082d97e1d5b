"""The paper's figure layout from `icegrid analyze --figure paper --kde-bins LO:HI`: Figs. 9-10 (one figure per
shape, up-going above down-going) and Figs. 7-8 (the KDE of a named energy range per model), drawing exactly
the numbers of kde_bins.csv; a range off the energy bin edges is one line before anything is read."""

from __future__ import annotations

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.csv as pacsv
import pytest
from click.testing import CliRunner
from test_analysis_support import make_truth, random_directions, rotate_away, write_store

from icegrid import plots
from icegrid.analysis import load_settings, store_histograms, summarize
from icegrid.cli import main


@pytest.fixture(scope="module")
def paper_store(tmp_path_factory):
    """One shard of 6,000 events from 100 TeV to 100 PeV, line-fit-like and IceMix-like predictions."""
    tmp = tmp_path_factory.mktemp("paper")
    rng = np.random.default_rng(23)
    truth = make_truth(rng, 6000, energy_range=(1e5, 1e8))
    predictions = {}
    for model, sigma in (("linefit", 10.0), ("icemix", 1.5)):
        vectors = rotate_away(truth["direction"], np.radians(sigma) * np.sqrt(-2 * np.log1p(-rng.random(6000))), rng)
        background = rng.random(6000) < 0.2
        vectors[background] = random_directions(rng, int(background.sum()))
        predictions[model] = [vectors]
    return write_store(tmp / "s.zarr", [truth], predictions), truth


def test_paper_layout_from_the_cli(paper_store, tmp_path):
    store, truth = paper_store
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["analyze", "--store", str(store), "--out", str(out), "--figure", "paper",
                                       "--kde-bins", "1e6:1e7", "--resamples", "10"])
    assert result.exit_code == 0, result.output
    for stem in ("paper_fig09_cascades", "paper_fig10_tracks", "paper_fig07_kde_cascades_1PeV-10PeV",
                 "paper_fig08_kde_tracks_1PeV-10PeV"):
        assert matplotlib.image.imread(out / f"{stem}.png").shape[0] > 1000
        assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    assert not (out / "resolution_vs_energy.png").exists()   # paper only, no overview grid

    # kde_bins.csv: one row per model x shape x direction over exactly the events of 1-10 PeV.
    ranges = pacsv.read_csv(out / "kde_bins.csv").to_pylist()
    inside = (truth["energy"] >= 1e6) & (truth["energy"] < 1e7)
    up = truth["zenith"] > np.pi / 2
    for row in ranges:
        shape = {"cascade": 0, "track": 1}[row["shape"]]
        expected = inside & (truth["shape"] == shape) & (up if row["direction"] == "up" else ~up)
        assert (row["e_lo"], row["e_hi"]) == pytest.approx((1e6, 1e7)) and row["n_events"] == expected.sum()
    assert len(ranges) == 2 * 2 * 2
    assert all(abs(r["mode_deg"] / 1.5 - 1) < 0.25 for r in ranges if r["model"] == "icemix")

    # The drawn figures: Fig. 9 has up-going above down-going; Fig. 7 marks the table's modes.
    settings = load_settings({"bootstrap": {"resamples": 10}, "figures": {"layout": "paper"}})
    histograms, warnings = store_histograms(store, None, settings)
    analysed = summarize(histograms, settings, warnings)
    fig9 = plots.plot_shape_resolution(analysed.rows, "cascade")
    fig7 = plots.plot_kde_range(analysed.range_curves, "cascade", (1e6, 1e7))
    try:
        up_ax, down_ax = fig9.axes
        assert (up_ax.icegrid_panel, down_ax.icegrid_panel) == (("cascade", "up"), ("cascade", "down"))
        fig9.canvas.draw()
        assert up_ax.get_position().y0 > down_ax.get_position().y1
        for ax in fig7.axes:
            _, direction, _ = ax.icegrid_panel
            for line in ax.get_lines():
                if line.get_gid() and line.get_gid().endswith(" mode"):
                    model = line.get_gid().split()[0]
                    row = next(r for r in ranges if (r["model"], r["shape"], r["direction"]) ==
                               (model, "cascade", direction))
                    assert line.get_xdata()[0] == pytest.approx(row["mode_deg"], rel=1e-12)
    finally:
        plt.close(fig9)
        plt.close(fig7)


def test_kde_bins_off_the_energy_edges_is_one_line_before_reading(paper_store, tmp_path):
    store, _ = paper_store
    result = CliRunner().invoke(main, ["analyze", "--store", str(store), "--out", str(tmp_path / "o"),
                                       "--kde-bins", "2e6:1e7"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "2e+06 is not an energy bin edge" in result.output and "1.78e+06, 3.16e+06" in result.output
    bad = CliRunner().invoke(main, ["analyze", "--store", str(store), "--out", str(tmp_path / "o"),
                                    "--kde-bins", "1e6-1e7"])
    assert bad.exit_code == 2 and "LO:HI" in bad.output
    help_text = CliRunner().invoke(main, ["analyze", "--help"]).output
    assert "--figure [grid|paper|all]" in help_text and "--kde-bins" in help_text and "Figs. 9-10" in help_text
