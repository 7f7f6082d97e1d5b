"""Figures of the resolution analysis (matplotlib, Agg backend: no display needed).

Every number drawn comes from the ``AnalysisResult`` the tables are written from. Colours and display labels
are fixed per model (``figures.styles`` in ``analysis.yaml``); angles are labelled in degrees (0.5°, 1°, 2°,
...), energies at decades (1 TeV, 10 TeV, ...).

``write_figures`` writes, each as PNG and PDF beside the tables:

    opening_angle                KDE over all events (all / up / down), Kaggle score in the legend
    resolution_vs_zenith         mode vs cos(true zenith)
    resolution_vs_pulses         mode vs number of pulses, up / down (when event lengths are known)
    with truth energy, layout ``grid`` (default) or ``all``:
    resolution_vs_energy         rows: cascades, tracks (or all events); columns: up, down
    kde_<shape>_<direction>      one panel per energy bin, pages of ``panels_per_figure``
                                 (``_p2.png``, ...; the PDF holds every page)
    with truth energy, layout ``paper`` or ``all`` (the paper's Figs. 7-10):
    paper_fig09_cascades, paper_fig10_tracks            up-going above down-going
    paper_fig07_kde_cascades_<range>, paper_fig08_kde_tracks_<range>   one per ``kde_bins_gev`` range
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

from icegrid.plots.curves import draw_kde, draw_modes
from icegrid.plots.energy import plot_resolution, plot_shape_resolution
from icegrid.plots.kde import kde_pages, plot_kde_panels, plot_kde_range, plot_opening_angle
from icegrid.plots.style import (FORMATS, Fonts, degree_label, energy_label, model_style, model_styles,
                                 nice_degree_ticks, ordered_models, save, save_pages)
from icegrid.plots.views import plot_vs_pulses, plot_vs_zenith

PAPER_RESOLUTION = {"cascade": "paper_fig09_cascades", "track": "paper_fig10_tracks", "all": "paper_resolution_all"}
PAPER_KDE = {"cascade": "paper_fig07_kde_cascades", "track": "paper_fig08_kde_tracks", "all": "paper_kde_all"}

__all__ = ["FORMATS", "Fonts", "degree_label", "draw_kde", "draw_modes", "energy_label", "kde_pages",
           "model_style", "model_styles", "nice_degree_ticks", "ordered_models", "plot_kde_panels",
           "plot_kde_range", "plot_opening_angle", "plot_resolution", "plot_shape_resolution", "plot_vs_pulses",
           "plot_vs_zenith", "save", "save_pages", "write_figures"]


def range_slug(lo: float, hi: float) -> str:
    """1e6, 1e7 -> '1PeV-10PeV' (a file-name part)."""
    return f"{energy_label(lo)}-{energy_label(hi)}".replace(" ", "").replace(".", "p")


def _energy_figures(result, out_dir: Path, settings, fonts: Fonts, echo) -> dict[str, Path]:
    figures, ref, styles = settings.figures, settings.reference_model, settings.figures.styles
    paths: dict[str, Path] = {}
    if figures.grid:
        paths |= save(plot_resolution(result.rows, ref, styles, fonts), out_dir / "resolution_vs_energy")
        for shape in result.shapes:
            for direction in ("up", "down"):
                pages = kde_pages(result.curves, shape, direction, figures.panels_per_figure)
                figs = [plot_kde_panels(result.curves, shape, direction, result.energy_edges, ref, figures.columns,
                                        styles, page, fonts, f" ({i}/{len(pages)})" if len(pages) > 1 else "")
                        for i, page in enumerate(pages, start=1)]
                if figs:
                    paths |= save_pages(figs, out_dir / f"kde_{shape}_{direction}")
    if figures.paper:
        for shape in result.shapes:
            stem = PAPER_RESOLUTION.get(shape, f"paper_resolution_{shape}")
            if not any(key[1] == shape for key in result.curves):
                if echo is not None:
                    echo(f"note: {stem} skipped: no {shape} energy bin has {settings.min_events} events")
                continue
            paths |= save(plot_shape_resolution(result.rows, shape, ref, styles, fonts), out_dir / stem)
        spans = list(dict.fromkeys((r["e_lo"], r["e_hi"]) for r in result.range_rows))
        for span in spans:
            for shape in result.shapes:
                stem = f"{PAPER_KDE.get(shape, f'paper_kde_{shape}')}_{range_slug(*span)}"
                if not any(key[1] == shape and key[3] == span for key in result.range_curves):
                    if echo is not None:
                        echo(f"note: {stem} skipped: no model has {settings.min_events} {shape} events in "
                             f"{energy_label(span[0])} - {energy_label(span[1])}")
                    continue
                paths |= save(plot_kde_range(result.range_curves, shape, span, ref, styles, fonts), out_dir / stem)
    return paths


def write_figures(result, out_dir: Path | str, settings=None,
                  echo: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Every figure the result supports (see the module docstring); returns the paths by label."""
    from icegrid.analysis.settings import load_settings

    settings = settings or load_settings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"savefig.dpi": settings.figures.dpi}):
        return _write_all(result, out_dir, settings, echo)


def _write_all(result, out_dir: Path, settings, echo) -> dict[str, Path]:
    fonts = Fonts(settings.figures.font_size)
    ref, styles = settings.reference_model, settings.figures.styles
    paths: dict[str, Path] = {}
    if result.overall_curves:
        paths |= save(plot_opening_angle(result.overall_curves, result.scores, ref, styles, fonts),
                      out_dir / "opening_angle")
    if result.zenith_rows:
        paths |= save(plot_vs_zenith(result.zenith_rows, ref, styles, fonts), out_dir / "resolution_vs_zenith")
    if result.pulse_rows:
        paths |= save(plot_vs_pulses(result.pulse_rows, ref, styles, fonts), out_dir / "resolution_vs_pulses")
    if result.has_energy:
        paths |= _energy_figures(result, out_dir, settings, fonts, echo)
    return paths
