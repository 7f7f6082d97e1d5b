"""A resolution figure where no energy bin has enough events for a mode still renders, with a note."""

from icegrid import plots


def test_resolution_figure_with_no_mode_anywhere(tmp_path):
    rows = [{"model": "linefit", "shape": shape, "direction": direction, "e_lo": 100.0, "e_hi": 177.8,
             "n_events": 3, "mode_deg": None, "mode_lo_deg": None, "mode_hi_deg": None,
             "median_deg": 10.0, "mean_deg": 12.0}
            for shape in ("track", "cascade") for direction in ("up", "down")]
    fig = plots.plot_resolution(rows)
    fig.savefig(tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert notes.count("no energy bin has enough events for a mode") == 4
    assert fig.axes[0].get_ylim() == (0.1, 180.0)
