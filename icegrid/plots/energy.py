"""Resolution vs true neutrino energy: the primary mode of the opening angle per energy bin with its
bootstrap 1σ band, one curve per model, the reference model (the line-fit) grey and dashed.

* ``plot_resolution``: the overview grid, rows = shapes (cascades, tracks; or all events when the truth has
  no shape), columns = up-going, down-going;
* ``plot_shape_resolution``: the paper's layout (Figs. 9 and 10), one figure per shape with up-going above
  down-going.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from icegrid.plots.curves import draw_modes, finish_mode_axes
from icegrid.plots.style import (DIRECTION_TITLES, SHAPE_TITLES, Fonts, energy_axis, legend_below, model_styles,
                                 ordered_models)

SHAPE_ROWS = ("cascade", "track")
DIRECTION_COLUMNS = ("up", "down")
EMPTY_TEXT = "no energy bin has enough events for a mode"
LEGEND_TITLE = "lines: primary mode of the KDE; shaded: bootstrap 1σ band"


def _energy_range(rows: list[dict]) -> tuple[float, float]:
    """The energies with a mode anywhere (so that empty decades do not squeeze the curves), else all bins."""
    with_mode = [r for r in rows if r["mode_deg"] is not None and np.isfinite(r["mode_deg"])] or rows
    if not with_mode:
        return 1e2, 1e8
    return min(r["e_lo"] for r in with_mode), max(r["e_hi"] for r in with_mode)


def _draw_panels(axes_by_panel: dict, rows: list[dict], reference_model: str, styles: dict | None,
                 fonts: Fonts) -> list[str]:
    models = ordered_models((r["model"] for r in rows), reference_model, styles)
    style = model_styles(models, reference_model, styles)
    drawn = []
    for (shape, direction), ax in axes_by_panel.items():
        ax.icegrid_panel = (shape, direction)
        for model in models:
            mine = [r for r in rows if r["model"] == model and r["shape"] == shape and r["direction"] == direction]
            energy = np.sqrt(np.array([r["e_lo"] * r["e_hi"] for r in mine], dtype=float))  # log-axis bin centre
            drawn.append(draw_modes(ax, energy, mine, model, style[model]))
        ax.set_xscale("log")
    axes = list(axes_by_panel.values())
    finish_mode_axes(axes, drawn, fonts, EMPTY_TEXT)
    lo, hi = _energy_range(rows)
    for ax in axes:
        ax.set_xlim(lo, hi)
        energy_axis(ax.xaxis, lo, hi)
    return models


def _legend(fig, ax, fonts: Fonts) -> None:
    handles = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    legend_below(fig, handles, [h.get_label() for h in handles], fonts, 3, LEGEND_TITLE)


def plot_resolution(rows: list[dict], reference_model: str = "linefit", styles: dict | None = None,
                    fonts: Fonts | None = None):
    """Resolution vs energy from resolution-table rows; returns the Figure. Each axis has
    ``ax.icegrid_panel = (shape, direction)``; each curve's ``gid`` is its model's name, its label the
    model's display name."""
    fonts = fonts or Fonts()
    shapes = [s for s in SHAPE_ROWS if any(r["shape"] == s for r in rows)] or \
        sorted({r["shape"] for r in rows}) or list(SHAPE_ROWS)
    fig, axes = plt.subplots(len(shapes), len(DIRECTION_COLUMNS), figsize=(12, 4.2 * len(shapes) + 1.6),
                             sharex=True, squeeze=False, layout="constrained")
    panels = {(shape, direction): axes[i, j] for i, shape in enumerate(shapes)
              for j, direction in enumerate(DIRECTION_COLUMNS)}
    _draw_panels(panels, rows, reference_model, styles, fonts)
    for (shape, direction), ax in panels.items():
        ax.set_title(f"{SHAPE_TITLES.get(shape, shape)}, {DIRECTION_TITLES[direction]}", fontsize=fonts.title)
    for ax in axes[-1, :]:
        ax.set_xlabel("true neutrino energy", fontsize=fonts.size)
    for ax in axes[:, 0]:
        ax.set_ylabel("primary mode of opening angle [deg]", fontsize=fonts.size)
    _legend(fig, axes[0, 0], fonts)
    return fig


def plot_shape_resolution(rows: list[dict], shape: str, reference_model: str = "linefit",
                          styles: dict | None = None, fonts: Fonts | None = None):
    """The paper's Fig. 9 (cascades) or Fig. 10 (tracks): up-going above down-going, one shape."""
    fonts = fonts or Fonts()
    mine = [r for r in rows if r["shape"] == shape]
    fig, axes = plt.subplots(2, 1, figsize=(8, 10), sharex=True, squeeze=False, layout="constrained")
    panels = {(shape, "up"): axes[0, 0], (shape, "down"): axes[1, 0]}
    _draw_panels(panels, mine, reference_model, styles, fonts)
    for (_, direction), ax in panels.items():
        ax.set_title(DIRECTION_TITLES[direction].capitalize(), fontsize=fonts.title)
        ax.set_ylabel("primary mode of opening angle", fontsize=fonts.size)
    axes[1, 0].set_xlabel("true neutrino energy", fontsize=fonts.size)
    fig.suptitle(f"{SHAPE_TITLES.get(shape, shape)}: estimated primary mode of the opening angle vs energy",
                 fontsize=fonts.suptitle)
    _legend(fig, axes[0, 0], fonts)
    return fig
