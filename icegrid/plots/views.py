"""Resolution in what every truth has: the primary mode of the opening angle per bin of cos(true zenith),
and per bin of the number of pulses (up-going and down-going), one curve per model with its 1σ band.
These need no true energy, so they are drawn for the real Kaggle train split too."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from icegrid.plots.curves import draw_modes, finish_mode_axes
from icegrid.plots.energy import LEGEND_TITLE
from icegrid.plots.style import DIRECTION_TITLES, Fonts, count_axis, legend_below, model_styles, ordered_models

EMPTY_TEXT = "no bin has enough events for a mode"


def _legend(fig, ax, fonts: Fonts) -> None:
    handles = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    legend_below(fig, handles, [h.get_label() for h in handles], fonts, 3, LEGEND_TITLE)


def plot_vs_zenith(rows: list[dict], reference_model: str = "linefit", styles: dict | None = None,
                   fonts: Fonts | None = None):
    """Mode vs cos(true zenith): -1 is straight up-going (through the Earth), +1 straight down-going."""
    fonts = fonts or Fonts()
    models = ordered_models((r["model"] for r in rows), reference_model, styles)
    style = model_styles(models, reference_model, styles)
    fig, ax = plt.subplots(figsize=(10, 7), layout="constrained")
    ax.icegrid_panel = ("zenith",)
    drawn = []
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        x = np.array([0.5 * (r["cos_zenith_lo"] + r["cos_zenith_hi"]) for r in mine])
        drawn.append(draw_modes(ax, x, mine, model, style[model]))
    finish_mode_axes([ax], drawn, fonts, EMPTY_TEXT)
    ax.set_xlim(-1, 1)
    ax.axvline(0.0, color="0.6", linewidth=0.8)
    ax.text(0.02, 0.97, "← up-going", transform=ax.transAxes, ha="left", va="top", fontsize=fonts.tick, color="0.35")
    ax.text(0.98, 0.97, "down-going →", transform=ax.transAxes, ha="right", va="top", fontsize=fonts.tick,
            color="0.35")
    ax.set_xlabel("cos(true zenith)", fontsize=fonts.size)
    ax.set_ylabel("primary mode of opening angle [deg]", fontsize=fonts.size)
    ax.set_title("Resolution vs direction of arrival", fontsize=fonts.title)
    _legend(fig, ax, fonts)
    return fig


def plot_vs_pulses(rows: list[dict], reference_model: str = "linefit", styles: dict | None = None,
                   fonts: Fonts | None = None):
    """Mode vs number of pulses in the event, up-going and down-going side by side."""
    fonts = fonts or Fonts()
    models = ordered_models((r["model"] for r in rows), reference_model, styles)
    style = model_styles(models, reference_model, styles)
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2), sharex=True, squeeze=False, layout="constrained")
    drawn = []
    for ax, direction in zip(axes[0], ("up", "down")):
        ax.icegrid_panel = ("pulses", direction)
        for model in models:
            mine = [r for r in rows if r["model"] == model and r["direction"] == direction]
            x = np.sqrt(np.array([r["n_pulses_lo"] * r["n_pulses_hi"] for r in mine], dtype=float))
            drawn.append(draw_modes(ax, x, mine, model, style[model]))
        ax.set_xscale("log")
        ax.set_title(DIRECTION_TITLES[direction].capitalize(), fontsize=fonts.title)
        ax.set_xlabel("number of pulses in the event", fontsize=fonts.size)
    finish_mode_axes(list(axes[0]), drawn, fonts, EMPTY_TEXT)
    with_mode = [r for r in rows if r["mode_deg"] is not None and np.isfinite(r["mode_deg"])] or rows
    lo, hi = (min(r["n_pulses_lo"] for r in with_mode), max(r["n_pulses_hi"] for r in with_mode)) if with_mode \
        else (1, 100_000)
    for ax in axes[0]:
        ax.set_xlim(lo, hi)
        count_axis(ax.xaxis, lo, hi)
    axes[0, 0].set_ylabel("primary mode of opening angle [deg]", fontsize=fonts.size)
    _legend(fig, axes[0, 0], fonts)
    return fig
