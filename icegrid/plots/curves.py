"""Drawing primitives shared by every figure: a model's mode curve with its bootstrap band, a model's KDE
curve with its mode line, and the common axis treatment. Each artist carries the model's code name as its
``gid`` (the label is the display name), so tests and users can find a model's curve in any figure."""

from __future__ import annotations

import matplotlib.ticker
import numpy as np

from icegrid.plots.style import Fonts, Style, degree_axis


def as_float(rows: list[dict], key: str) -> np.ndarray:
    """A table column as floats, empty cells (None) as NaN."""
    return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)


def draw_modes(ax, x: np.ndarray, rows: list[dict], model: str, style: Style) -> np.ndarray:
    """Mode curve and 1σ band of one model; NaN modes (thin bins) leave gaps. Returns the drawn values."""
    mode, lo, hi = (as_float(rows, k) for k in ("mode_deg", "mode_lo_deg", "mode_hi_deg"))
    has_band = np.isfinite(lo) & np.isfinite(hi)
    ax.fill_between(x, np.where(has_band, lo, np.nan), np.where(has_band, hi, np.nan), color=style.color,
                    alpha=style.band_alpha, linewidth=0, label=f"_{model} band", gid=f"{model} band")
    (line,) = ax.plot(x, mode, color=style.color, linestyle=style.linestyle, marker=style.marker, markersize=4,
                      linewidth=1.8, label=style.label)
    line.set_gid(model)
    return np.concatenate([mode[np.isfinite(mode)], lo[has_band], hi[has_band]])


def finish_mode_axes(axes, drawn: list[np.ndarray], fonts: Fonts, empty_text: str) -> None:
    """Common log-degree y range over ``axes`` from everything drawn, or a note when nothing was."""
    values = np.concatenate(drawn) if drawn else np.empty(0)
    values = values[np.isfinite(values) & (values > 0)]
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", alpha=0.1)
        ax.tick_params(labelsize=fonts.tick)
        if values.size:
            lo, hi = values.min() / 1.5, min(values.max() * 1.5, 180.0)
        else:
            lo, hi = 0.1, 180.0
            ax.text(0.5, 0.5, empty_text, transform=ax.transAxes, ha="center", va="center",
                    fontsize=fonts.size, color="0.4")
        ax.set_ylim(lo, hi)
        degree_axis(ax.yaxis, lo, hi)


def draw_kde(ax, fit, model: str, style: Style, label: str | None = None):
    """One model's KDE curve (density per degree) and its primary mode as a dotted vertical line."""
    (line,) = ax.plot(fit.curve_deg, fit.curve_density, color=style.color, linestyle=style.linestyle,
                      linewidth=1.6, label=label or style.label)
    line.set_gid(model)
    mode = ax.axvline(fit.mode_deg, color=style.color, linestyle=":", linewidth=1.4, label=f"_{model} mode")
    mode.set_gid(f"{model} mode")
    return line


def finish_kde_axis(ax, sharpest_mode: float, fonts: Fonts, max_ticks: int = 6) -> None:
    ax.set_xscale("log")
    lo = max(sharpest_mode / 10, 1e-3) if np.isfinite(sharpest_mode) else 0.1
    ax.set_xlim(lo, 180)
    ax.set_ylim(0, None)
    degree_axis(ax.xaxis, lo, 180, max_ticks)
    # Unlabelled minor ticks of a log axis cost most of the save time of a many-panel figure.
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(True, which="major", alpha=0.25)
    ax.tick_params(labelsize=fonts.tick)
