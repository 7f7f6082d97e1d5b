"""Histograms from an event store: read one shard at a time, only its truth, event lengths and the models'
prediction arrays (never the pulses), and sum each model's histograms over the shards.

What the truth allows is decided once for the whole store (``TruthKind``): a view needs its truth column in
every shard, so all shards' histograms have the same shape and add up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from icegrid.analysis.angles import AngleGrid, opening_angle
from icegrid.analysis.histograms import ResolutionHistograms, ViewBinning, shard_histograms
from icegrid.analysis.names import select_models
from icegrid.analysis.settings import AnalysisError, AnalysisSettings


@dataclass(frozen=True)
class TruthKind:
    """Which optional truth every shard of a store has (true directions are required)."""

    energy: bool = True
    shape: bool = True
    pulses: bool = True

    def columns(self) -> tuple[str, ...]:
        optional = (("energy", self.energy), ("shape", self.shape), ("n_pulses", self.pulses))
        return ("azimuth", "zenith") + tuple(name for name, wanted in optional if wanted)


def _event_arrays(store, shard: str) -> set[str]:
    # Array names only (the layout in icegrid.store): deciding what to read must not read the arrays.
    events = store.path / "shards" / shard / "events"
    return {p.name for p in events.iterdir() if (p / "zarr.json").exists()} if events.is_dir() else set()


def store_truth_kind(store, shards: Sequence[str]) -> TruthKind:
    """The truth every shard has; a shard without true directions is a one-line error."""
    names = {shard: _event_arrays(store, shard) for shard in shards}
    for shard, present in names.items():
        if not {"azimuth", "zenith"} <= present:
            raise AnalysisError(f"{store.path} shard '{shard}': no true directions (azimuth, zenith): nothing to "
                                "score the predictions against (the Kaggle test split has no truth)")
    return TruthKind(*(all(column in present for present in names.values())
                       for column in ("energy", "shape", "n_pulses")))


def _prediction_vectors(predictions: dict) -> np.ndarray:
    if "direction" in predictions:
        return np.asarray(predictions["direction"], dtype=np.float64)
    from icegrid.store import direction_from_angles

    return direction_from_angles(np.asarray(predictions["azimuth"], float),
                                 np.asarray(predictions["zenith"], float))


def store_shard_histograms(store_path: Path | str, shard: str, models: Sequence[str],
                           settings: AnalysisSettings, truth_kind: TruthKind | None = None
                           ) -> dict[str, ResolutionHistograms]:
    """The map step on a store: one shard's histograms for each of ``models`` that has predictions there.

    Pure and picklable (paths and names in, arrays out): a campaign can run it on any worker and sum the
    results with ``+``. ``truth_kind`` None: whatever this shard has (give the store's to sum shards).
    """
    from icegrid.store import EventStore, direction_from_angles

    store = EventStore(store_path)
    kind = truth_kind or store_truth_kind(store, [shard])
    truth = store.read_event_arrays(shard, kind.columns())
    truth_vectors = direction_from_angles(truth["azimuth"], truth["zenith"])
    grid = AngleGrid.from_settings(settings)
    edges = settings.energy.edges()
    views = ViewBinning.from_settings(settings)
    out = {}
    for model in models:
        if not store.has_predictions(shard, model):
            continue
        angles = opening_angle(_prediction_vectors(store.read_predictions(shard, model)), truth_vectors)
        out[model] = shard_histograms(angles, truth.get("energy"), truth.get("shape"), truth["zenith"], edges,
                                      grid, truth.get("n_pulses"), views)
    return out


def store_histograms(store_path: Path | str, models: Sequence[str] | None,
                     settings: AnalysisSettings) -> tuple[dict[str, ResolutionHistograms], list[str]]:
    """Read a store shard by shard (only truth + prediction arrays) and sum each model's histograms.

    ``models``: names or aliases (``2nd``, ``baseline``, ``all``); None: every model with predictions.
    """
    from icegrid.store import EventStore

    store = EventStore(store_path)
    shards = store.shards()
    if not shards:
        raise AnalysisError(f"{store.path}: the store has no published shards")
    available = {shard: set(store.prediction_models(shard)) for shard in shards}
    all_models = sorted(set().union(*available.values()))
    if models is None and not all_models:
        raise AnalysisError(f"{store.path}: no model has predictions in this store; run `icegrid infer` "
                            "(or the line-fit) first")
    models, unknown = select_models(models, all_models)
    if unknown or not models:
        raise AnalysisError(f"{store.path}: no predictions from model(s) {', '.join(unknown) or 'none asked'} in "
                            f"any shard (available: {', '.join(all_models) or 'none'})")
    kind = store_truth_kind(store, shards)
    warnings = []
    for model in models:
        missing = [s for s in shards if model not in available[s]]
        if missing:
            warnings.append(f"model '{model}': no predictions for {len(missing)} of {len(shards)} shard(s) "
                            f"(e.g. '{missing[0]}'); its curves use the other shards only")
    totals: dict[str, ResolutionHistograms] = {}
    for shard in shards:
        for model, part in store_shard_histograms(store.path, shard, models, settings, kind).items():
            totals[model] = totals[model] + part if model in totals else part
    return {model: totals[model] for model in models}, warnings
