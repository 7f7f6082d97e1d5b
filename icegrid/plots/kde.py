"""KDE figures: the estimated density of the opening angle with its primary mode marked, one curve per model.

* ``plot_kde_panels``: one shape × direction, one panel per energy bin (the per-bin grid); ``kde_pages``
  splits the bins into pages of at most ``figures.panels_per_figure`` so the text stays readable at any bin
  count;
* ``plot_kde_range``: the paper's Figs. 7-8, the KDE of one energy range, up-going above down-going;
* ``plot_opening_angle``: the KDE over all events (all, up-going, down-going): what the Kaggle score
  averages, drawn with the score of each model in the legend; needs true directions only.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from icegrid.plots.curves import draw_kde, finish_kde_axis
from icegrid.plots.style import (DIRECTION_TITLES, SHAPE_TITLES, Fonts, energy_label, legend_below, model_styles,
                                 ordered_models)


def kde_pages(curves: dict, shape: str, direction: str, per_page: int) -> list[list[int]]:
    """The energy bins with a curve for one shape × direction, in pages of at most ``per_page``."""
    bins = sorted({key[3] for key in curves if key[1] == shape and key[2] == direction})
    return [bins[i:i + per_page] for i in range(0, len(bins), per_page)]


def _range_title(lo: float, hi: float) -> str:
    return f"{energy_label(lo)} – {energy_label(hi)}"


def _model_legend(fig, models: list[str], styles: dict, fonts: Fonts, labels: dict | None = None,
                  outside: bool = True) -> None:
    handles = [plt.Line2D([], [], color=styles[m].color, linestyle=styles[m].linestyle, linewidth=1.8)
               for m in models]
    legend_below(fig, handles, [(labels or {}).get(m, styles[m].label) for m in models], fonts, 3,
                 "dotted: primary mode", outside)


def plot_kde_panels(curves: dict, shape: str, direction: str, energy_edges: np.ndarray,
                    reference_model: str = "linefit", columns: int = 4, styles: dict | None = None,
                    bins: list[int] | None = None, fonts: Fonts | None = None, page: str = ""):
    """KDEs of one shape × direction, one panel per energy bin in ``bins`` (default: every bin with a mode),
    one curve per model with its primary mode as a dotted vertical line."""
    fonts = fonts or Fonts()
    models = ordered_models({key[0] for key in curves}, reference_model, styles)
    style = model_styles(models, reference_model, styles)
    if bins is None:
        bins = sorted({key[3] for key in curves if key[1] == shape and key[2] == direction})
    columns = max(1, min(columns, len(bins)))
    rows = max(1, -(-len(bins) // columns))
    legend_rows = -(-len(models) // 3)
    width, height = 4.3 * columns, 3.4 * rows + 1.6 + 0.3 * legend_rows
    fig, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False)
    # Fixed margins in inches: the constrained layout engine doubles the save time of a many-panel figure.
    fig.subplots_adjust(left=0.9 / width, right=1 - 0.25 / width, top=1 - 0.75 / height,
                        bottom=(1.0 + 0.3 * legend_rows) / height, hspace=0.45, wspace=0.22)
    for ax in axes.flat[len(bins):]:
        ax.set_visible(False)
    for ax, energy_bin in zip(axes.flat, bins):
        ax.icegrid_panel = (shape, direction, energy_bin)
        sharpest = np.inf
        for model in models:
            fit = curves.get((model, shape, direction, energy_bin))
            if fit is not None:
                draw_kde(ax, fit, model, style[model])
                sharpest = min(sharpest, fit.mode_deg)
        finish_kde_axis(ax, sharpest, fonts)
        ax.set_title(_range_title(energy_edges[energy_bin], energy_edges[energy_bin + 1]), fontsize=fonts.title)
    for ax in axes[:, 0]:
        ax.set_ylabel("density [1/deg]", fontsize=fonts.size)
    for index, ax in enumerate(axes.flat[:len(bins)]):
        if index + columns >= len(bins):  # no panel below it
            ax.set_xlabel("opening angle", fontsize=fonts.size)
    fig.suptitle(f"KDE of the opening angle, {SHAPE_TITLES.get(shape, shape).lower()}, "
                 f"{DIRECTION_TITLES[direction]}{page}", fontsize=fonts.suptitle)
    _model_legend(fig, models, style, fonts, outside=False)
    return fig


def mode_text(degrees: float) -> str:
    """A mode to three significant digits, trailing zeros kept so the legend's numbers line up (4.60°, 53.6°, 120°)."""
    rounded = float(f"{degrees:.3g}")      # 9.996 -> 10.0, not 10.00
    decimals = max(0, 2 - int(np.floor(np.log10(rounded)))) if rounded > 0 else 2
    return f"{rounded:.{decimals}f}°"


def plot_kde_range(range_curves: dict, shape: str, span: tuple[float, float], reference_model: str = "linefit",
                   styles: dict | None = None, fonts: Fonts | None = None):
    """The paper's Fig. 7 (cascades) / Fig. 8 (tracks): the KDE of one energy range per model, up-going
    above down-going, the estimated primary mode as a vertical line (and in the legend)."""
    fonts = fonts or Fonts()
    models = ordered_models({key[0] for key in range_curves}, reference_model, styles)
    style = model_styles(models, reference_model, styles)
    fig, axes = plt.subplots(2, 1, figsize=(12.5, 9.5), squeeze=False, layout="constrained")
    for ax, direction in zip(axes[:, 0], ("up", "down")):
        ax.icegrid_panel = (shape, direction, span)
        sharpest = np.inf
        for model in models:
            fit = range_curves.get((model, shape, direction, span))
            if fit is not None:
                draw_kde(ax, fit, model, style[model], f"{style[model].label}: mode {mode_text(fit.mode_deg)}")
                sharpest = min(sharpest, fit.mode_deg)
        finish_kde_axis(ax, sharpest, fonts, max_ticks=10)
        if np.isfinite(sharpest):
            # Beside the panel: inside it would cover the curves of the sharpest models.
            ax.legend(fontsize=fonts.tick, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.text(0.5, 0.5, "fewer events than min_events in this range", transform=ax.transAxes,
                    ha="center", va="center", fontsize=fonts.size, color="0.4")
        ax.set_title(DIRECTION_TITLES[direction].capitalize(), fontsize=fonts.title)
        ax.set_ylabel("density [1/deg]", fontsize=fonts.size)
    axes[1, 0].set_xlabel("opening angle", fontsize=fonts.size)
    fig.suptitle(f"KDE of the opening angle, {SHAPE_TITLES.get(shape, shape).lower()} "
                 f"{_range_title(*span)}", fontsize=fonts.suptitle)
    return fig


def plot_opening_angle(overall_curves: dict, scores: list[dict], reference_model: str = "linefit",
                       styles: dict | None = None, fonts: Fonts | None = None):
    """KDE of the opening angle over all events, per model: all directions, up-going, down-going."""
    fonts = fonts or Fonts()
    models = ordered_models({key[0] for key in overall_curves}, reference_model, styles)
    style = model_styles(models, reference_model, styles)
    score = {s["model"]: s["kaggle_score_rad"] for s in scores}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.8), squeeze=False, layout="constrained")
    for ax, direction in zip(axes[0], ("all", "up", "down")):
        ax.icegrid_panel = ("all", direction)
        sharpest = np.inf
        for model in models:
            fit = overall_curves.get((model, direction))
            if fit is not None:
                draw_kde(ax, fit, model, style[model])
                sharpest = min(sharpest, fit.mode_deg)
        finish_kde_axis(ax, sharpest, fonts)
        ax.set_title(DIRECTION_TITLES[direction].capitalize(), fontsize=fonts.title)
        ax.set_xlabel("opening angle", fontsize=fonts.size)
    axes[0, 0].set_ylabel("density [1/deg]", fontsize=fonts.size)
    fig.suptitle("KDE of the opening angle between reconstructed and true direction, all events",
                 fontsize=fonts.suptitle)
    labels = {m: f"{style[m].label}: Kaggle score {score[m]:.4f} rad" for m in models if m in score}
    _model_legend(fig, models, style, fonts, labels)
    return fig
