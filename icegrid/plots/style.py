"""How every figure looks: a fixed colour and display label per model (from the ``figures.styles`` section
of ``analysis.yaml``, so a model keeps its colour whatever other models are present), degree and energy tick
labels, font sizes, and saving (PNG per page, one PDF for all pages).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

FORMATS = ("png", "pdf")
DPI = 150          # PNGs saved outside write_figures (which uses the figures.dpi setting)
SHAPE_TITLES = {"cascade": "Cascades", "track": "Tracks", "all": "All events"}
DIRECTION_TITLES = {"up": "up-going (true zenith > 90°)", "down": "down-going (true zenith ≤ 90°)",
                    "all": "all directions"}
# Models without a configured style: a colour picked by a hash of the name (not by which models are present),
# from colours the configured models do not use.
FALLBACK_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#1b3a8c", "#9e1b1b", "#4a7a2c")
# A tagged model (icemix@retrained) keeps its model's colour with another line style.
TAG_LINESTYLES = ("-.", ":", (0, (6, 2)), (0, (3, 1, 1, 1, 1, 1)))
REFERENCE_COLOR = "0.45"


@dataclass(frozen=True)
class Style:
    label: str
    color: str
    linestyle: object = "-"
    marker: str = "o"
    band_alpha: float = 0.3


@dataclass(frozen=True)
class Fonts:
    """Point sizes; every figure sets them explicitly so that no text is smaller than ``tick``."""

    size: float = 12.0

    @property
    def title(self) -> float:
        return self.size

    @property
    def tick(self) -> float:
        return self.size - 1

    @property
    def legend(self) -> float:
        return self.size

    @property
    def suptitle(self) -> float:
        return self.size + 2


def _configured_styles(configured: dict | None) -> dict:
    if configured is not None:
        return configured
    from icegrid.analysis.settings import load_settings

    return load_settings().figures.styles


def model_style(model: str, reference_model: str = "linefit", configured: dict | None = None) -> Style:
    """The style of one model name; ``configured`` maps names to objects with ``label`` and ``color``."""
    configured = _configured_styles(configured)
    base, _, tag = model.partition("@")
    entry = configured.get(base)
    label = entry.label if entry is not None else base
    color = entry.color if entry is not None else FALLBACK_COLORS[zlib.crc32(base.encode()) % len(FALLBACK_COLORS)]
    if model == reference_model:
        return Style(label, entry.color if entry is not None else REFERENCE_COLOR, "--", "s", 0.25)
    if tag:
        return Style(f"{label} @{tag}", color, TAG_LINESTYLES[zlib.crc32(tag.encode()) % len(TAG_LINESTYLES)], "^")
    return Style(label, color)


def model_styles(models, reference_model: str = "linefit", configured: dict | None = None) -> dict[str, Style]:
    configured = _configured_styles(configured)
    return {m: model_style(m, reference_model, configured) for m in models}


def ordered_models(models, reference_model: str = "linefit", configured: dict | None = None) -> list[str]:
    """Drawing and legend order: the reference first (underneath), then the configured models in config
    order (their tagged variants after each), then any other model by name."""
    configured = list(_configured_styles(configured))
    models = list(dict.fromkeys(models))

    def key(model):
        base = model.partition("@")[0]
        rank = configured.index(base) if base in configured else len(configured)
        return (model != reference_model, rank, base, model)

    return sorted(models, key=key)


def nice_degree_ticks(lo: float, hi: float, max_ticks: int = 10) -> list[float]:
    """Ticks between ``lo`` and ``hi`` on a log axis (degrees, counts): 1-2-5 steps, finer when fewer than three fit, decades only
    (then every other decade) when more than ``max_ticks`` would."""
    def ticks_for(mantissas):
        return [float(f"{m * 10.0 ** k:.6g}") for k in range(int(np.floor(np.log10(lo))) - 1,
                                                             int(np.ceil(np.log10(hi))) + 1)
                for m in mantissas if lo <= m * 10.0 ** k <= hi]

    ticks = ticks_for((1, 2, 5))
    if len(ticks) < 3:
        return ticks_for((1, 1.5, 2, 3, 5, 7))
    if len(ticks) > max_ticks:
        ticks = ticks_for((1,))
        while len(ticks) > max_ticks:
            ticks = ticks[::2]
    return ticks


def count_axis(axis, lo: float, hi: float, max_ticks: int = 10) -> None:
    """A log axis of counts (pulses) labelled 10, 20, 50, 100, ... in plain numbers."""
    axis.set_major_locator(matplotlib.ticker.FixedLocator(nice_degree_ticks(lo, hi, max_ticks)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def degree_label(value: float, _position=None) -> str:
    return f"{value:g}°"


def degree_axis(axis, lo: float, hi: float, max_ticks: int = 10) -> None:
    """A log axis in degrees labelled 0.5°, 1°, 2°, 5°, ... (no 6×10⁰-style minor labels)."""
    axis.set_major_locator(matplotlib.ticker.FixedLocator(nice_degree_ticks(lo, hi, max_ticks)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(degree_label))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def energy_label(energy_gev: float, _position=None) -> str:
    for unit, scale in (("EeV", 1e9), ("PeV", 1e6), ("TeV", 1e3), ("GeV", 1.0)):
        if energy_gev >= scale * 0.9999:
            return f"{energy_gev / scale:.3g} {unit}"
    return f"{energy_gev:.3g} GeV"


def energy_axis(axis, lo: float, hi: float) -> None:
    """A log energy axis labelled at decades in GeV/TeV/PeV; under three decades in 1-2-5 steps (finer when
    fewer than three of those fit: a range of two bins still gets three labels)."""
    decades = [10.0 ** k for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)]
    ticks = [d for d in decades if lo * 0.999 <= d <= hi * 1.001]
    if len(ticks) < 3:
        ticks = nice_degree_ticks(lo * 0.999, hi * 1.001)
    axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(energy_label))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def save(fig, stem: Path) -> dict[str, Path]:
    """``stem``.png and .pdf (each written aside, then renamed)."""
    return save_pages([fig], stem)


def save_pages(figs: list, stem: Path) -> dict[str, Path]:
    """Pages of one figure: ``stem``.png, ``stem``_p2.png, ... and all pages in ``stem``.pdf."""
    paths = {}
    for page, fig in enumerate(figs, start=1):
        name = stem.name if page == 1 else f"{stem.name}_p{page}"
        partial = stem.parent / f".{name}.partial.png"
        dpi = plt.rcParams["savefig.dpi"]     # write_figures sets it from figures.dpi
        fig.savefig(partial, dpi=DPI if dpi == "figure" else dpi)
        paths[f"{name}_png"] = partial.replace(stem.parent / f"{name}.png")
    partial = stem.parent / f".{stem.name}.partial.pdf"
    with PdfPages(partial) as pdf:
        for fig in figs:
            pdf.savefig(fig)
    paths[f"{stem.name}_pdf"] = partial.replace(stem.parent / f"{stem.name}.pdf")
    for fig in figs:
        plt.close(fig)
    return paths


def legend_columns(fig, labels, fonts: Fonts, most: int) -> int:
    """As many legend columns (up to ``most``) as the figure's width holds for its longest label."""
    # ~0.55 em per character plus the line sample and the gap, in inches.
    column_in = (0.55 * max((len(label) for label in labels), default=1) * fonts.legend + 40) / 72
    return max(1, min(most, len(labels), int(fig.get_figwidth() // column_in)))


def legend_below(fig, handles, labels, fonts: Fonts, columns: int, title: str | None = None,
                 outside: bool = True) -> None:
    """The figure's legend under the panels (``outside``: room made by the constrained layout engine)."""
    fig.legend(handles, labels, loc="outside lower center" if outside else "lower center",
               ncol=legend_columns(fig, labels, fonts, columns), fontsize=fonts.legend, frameon=False, title=title,
               title_fontsize=fonts.tick)
