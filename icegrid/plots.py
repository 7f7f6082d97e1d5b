"""Figures of the resolution analysis (matplotlib, Agg backend: no display needed).

What this module owns
    * ``plot_resolution``: primary mode of the opening angle vs true neutrino energy, one panel per
      shape × direction (rows: cascades, tracks; columns: up-going, down-going), one curve per model with
      its bootstrap 1σ band, log energy axis in GeV, log angle axis in degrees; the reference model
      (the line-fit) is the grey dashed curve, as the baseline in the paper's Figs. 9–10.
    * ``plot_kde_panels``: the KDEs of one shape × direction, one panel per energy bin, one curve per model
      with its primary mode as a vertical line, as in the paper's Figs. 7–8.
    * ``write_figures``: both kinds as PNG and PDF beside the tables they draw.

Every number drawn comes from the ``AnalysisResult`` that the tables are written from.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

SHAPE_ROWS = ("cascade", "track")
DIRECTION_COLUMNS = ("up", "down")
SHAPE_TITLES = {"cascade": "Cascades", "track": "Tracks"}
DIRECTION_TITLES = {"up": "up-going (true zenith > 90°)", "down": "down-going (true zenith ≤ 90°)"}
REFERENCE_STYLE = {"color": "0.45", "linestyle": "--", "marker": "s", "band_alpha": 0.25}
FORMATS = ("png", "pdf")


def _model_styles(models: list[str], reference_model: str) -> dict[str, dict]:
    colors = plt.get_cmap("tab10").colors
    # Colours follow the sorted names, so a model has the same colour in every figure of a run.
    others = sorted(m for m in models if m != reference_model)
    styles = {m: {"color": colors[i % len(colors)], "linestyle": "-", "marker": "o", "band_alpha": 0.3}
              for i, m in enumerate(others)}
    if reference_model in models:
        styles[reference_model] = dict(REFERENCE_STYLE)
    return styles


def _ordered_models(rows: list[dict], reference_model: str) -> list[str]:
    models = list(dict.fromkeys(row["model"] for row in rows))
    # The reference is drawn first, underneath the solutions.
    return sorted(models, key=lambda m: m != reference_model)


def plot_resolution(rows: list[dict], reference_model: str = "linefit"):
    """Resolution vs energy from resolution-table rows; returns the Figure (axes in ``fig.axes``, each with
    ``ax.icegrid_panel = (shape, direction)``; curve lines carry the model name as label)."""
    models = _ordered_models(rows, reference_model)
    styles = _model_styles(models, reference_model)
    fig, axes = plt.subplots(len(SHAPE_ROWS), len(DIRECTION_COLUMNS), figsize=(11, 8.5), sharex=True,
                             squeeze=False, layout="constrained")
    lowest, highest = np.inf, 0.0
    for i, shape in enumerate(SHAPE_ROWS):
        for j, direction in enumerate(DIRECTION_COLUMNS):
            ax = axes[i, j]
            ax.icegrid_panel = (shape, direction)
            for model in models:
                sel = [r for r in rows if r["model"] == model and r["shape"] == shape
                       and r["direction"] == direction]
                e_lo = np.array([r["e_lo"] for r in sel], dtype=float)
                e_hi = np.array([r["e_hi"] for r in sel], dtype=float)
                mode = np.array([np.nan if r["mode_deg"] is None else r["mode_deg"] for r in sel], dtype=float)
                lo = np.array([np.nan if r["mode_lo_deg"] is None else r["mode_lo_deg"] for r in sel], float)
                hi = np.array([np.nan if r["mode_hi_deg"] is None else r["mode_hi_deg"] for r in sel], float)
                energy = np.sqrt(e_lo * e_hi)  # bin centre on the log axis
                style = styles[model]
                has_band = np.isfinite(lo) & np.isfinite(hi)
                ax.fill_between(energy, np.where(has_band, lo, np.nan), np.where(has_band, hi, np.nan),
                                color=style["color"], alpha=style["band_alpha"], linewidth=0,
                                label=f"_{model} band")
                # NaN modes (bins with too few events) leave gaps instead of bridging them.
                ax.plot(energy, mode, color=style["color"], linestyle=style["linestyle"],
                        marker=style["marker"], markersize=3.5, linewidth=1.6, label=model)
                finite = mode[np.isfinite(mode)]
                band = np.concatenate([finite, lo[has_band], hi[has_band]])
                if band.size:
                    lowest, highest = min(lowest, band.min()), max(highest, band.max())
            ax.set_xscale("log")
            ax.set_yscale("log")
            # Under a decade of energy, matplotlib labels minor ticks too and they overlap: decades only.
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.25)
            ax.set_title(f"{SHAPE_TITLES[shape]}, {DIRECTION_TITLES[direction]}", fontsize=11)
            if i == len(SHAPE_ROWS) - 1:
                ax.set_xlabel("true neutrino energy [GeV]")
            if j == 0:
                ax.set_ylabel("primary mode of opening angle [deg]")
    if np.isfinite(lowest):
        for ax in axes.flat:
            ax.set_ylim(lowest / 1.5, min(highest * 1.5, 180.0))
    else:
        # No bin anywhere has enough events for a mode: fixed log limits (matplotlib cannot derive them
        # from empty data) and a note instead of silently blank panels.
        edges = [r[k] for r in rows for k in ("e_lo", "e_hi")] or [1e2, 1e8]
        for ax in axes.flat:
            ax.set_xlim(min(edges), max(edges))
            ax.set_ylim(0.1, 180.0)
            ax.text(0.5, 0.5, "no energy bin has enough events for a mode", transform=ax.transAxes,
                    ha="center", va="center", fontsize=10, color="0.4")
    handles = [h for h in axes[0, 0].get_lines()]
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncol=min(len(models), 6),
               fontsize=11, frameon=False, title="lines: primary mode of the KDE; shaded: bootstrap 1σ band")
    return fig


def plot_kde_panels(curves: dict, shape: str, direction: str, energy_edges: np.ndarray,
                    reference_model: str = "linefit", columns: int = 4):
    """KDEs of one shape × direction, one panel per energy bin that has a mode, one curve per model with
    its primary mode as a dotted vertical line (the paper's Figs. 7–8, for every bin)."""
    models = sorted(dict.fromkeys(key[0] for key in curves), key=lambda m: m != reference_model)
    styles = _model_styles(models, reference_model)
    bins = sorted({key[3] for key in curves if key[1] == shape and key[2] == direction})
    rows = max(1, -(-len(bins) // columns))
    height = 2.6 * rows + 1.5
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, height), squeeze=False)
    # Fixed margins (inches -> figure fractions): the constrained layout engine would triple the save time
    # of a figure with two dozen panels.
    fig.subplots_adjust(left=0.7 / (3.6 * columns), right=0.99, top=1 - 0.8 / height, bottom=1.0 / height,
                        hspace=0.45, wspace=0.18)
    for ax in axes.flat[len(bins):]:
        ax.set_visible(False)
    for ax, energy_bin in zip(axes.flat, bins):
        ax.icegrid_panel = (shape, direction, energy_bin)
        sharpest = np.inf
        for model in models:
            result = curves.get((model, shape, direction, energy_bin))
            if result is None:
                continue
            style = styles[model]
            ax.plot(result.curve_deg, result.curve_density, color=style["color"], linestyle=style["linestyle"],
                    linewidth=1.4, label=model)
            ax.axvline(result.mode_deg, color=style["color"], linestyle=":", linewidth=1.3,
                       label=f"_{model} mode")
            sharpest = min(sharpest, result.mode_deg)
        ax.set_xscale("log")
        ax.set_xlim(sharpest / 10, 180)
        ax.set_ylim(0, None)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="major", alpha=0.2)
        ax.set_title(f"{_energy_label(energy_edges[energy_bin])} – {_energy_label(energy_edges[energy_bin + 1])}",
                     fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("density [1/deg]", fontsize=9)
    for ax in axes[-1, :]:
        ax.set_xlabel("opening angle [deg]", fontsize=9)
        ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(f"KDE of the opening angle, {SHAPE_TITLES[shape].lower()}, {DIRECTION_TITLES[direction]}; "
                 "dotted: primary mode", fontsize=12)
    handles = [plt.Line2D([], [], color=styles[m]["color"], linestyle=styles[m]["linestyle"], linewidth=1.6)
               for m in models]
    fig.legend(handles, models, loc="lower center", ncol=min(len(models), 6), fontsize=11, frameon=False)
    return fig


def _energy_label(energy_gev: float) -> str:
    for unit, scale in (("PeV", 1e6), ("TeV", 1e3), ("GeV", 1.0)):
        if energy_gev >= scale:
            return f"{energy_gev / scale:.3g} {unit}"
    return f"{energy_gev:.3g} GeV"


def _save(fig, stem: Path) -> dict[str, Path]:
    paths = {}
    for fmt in FORMATS:
        path = stem.parent / f"{stem.name}.{fmt}"
        partial = stem.parent / f".{stem.name}.partial.{fmt}"
        fig.savefig(partial, dpi=150 if fmt == "png" else None)
        partial.replace(path)
        paths[f"{stem.name}_{fmt}"] = path
    plt.close(fig)
    return paths


def write_figures(result, out_dir: Path | str, reference_model: str = "linefit") -> dict[str, Path]:
    """resolution_vs_energy.{png,pdf} and kde_<shape>_<direction>.{png,pdf} (one panel per energy bin)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _save(plot_resolution(result.rows, reference_model), out_dir / "resolution_vs_energy")
    for shape in SHAPE_ROWS:
        for direction in DIRECTION_COLUMNS:
            if any(key[1] == shape and key[2] == direction for key in result.curves):
                fig = plot_kde_panels(result.curves, shape, direction, result.energy_edges, reference_model)
                paths.update(_save(fig, out_dir / f"kde_{shape}_{direction}"))
    return paths
