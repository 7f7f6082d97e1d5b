"""infer_shard(): one store shard x one model -> predictions written beside the events.

A pure shard function for the campaign manager: idempotent (already published predictions are
skipped), atomic (``EventStore.write_predictions`` publishes with one rename) and deterministic on
CPU (pulse sampling is seeded, batches are formed by a stable length sort, the model runs in fp32
in eval mode). On CUDA the networks run under fp16 autocast by default (``amp``), as the solutions
did at inference; the written angles are float64 either way. Events are sorted by length into
batches (sequence bucketing) so padding stays low; each model applies its own truncation rule
above its sequence limit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from icegrid.geometry import Geometry
from icegrid.models import registry
from icegrid.models.features import bucket_batches, collate, select_pulses
from icegrid.store import EventStore, ShardData, angles_from_direction

DEFAULT_BATCH_SIZE = 256
DEFAULT_MAX_TOKENS = 16384
DEFAULT_MAX_PAIRS = 1 << 21
SAMPLING_SEED = 0          # pulse sub-sampling above the limit is seeded: same shard -> same bytes

_LOADED: dict[tuple, registry.LoadedModel] = {}


def resolve_model(name: str, checkpoint: Path | str | None = None, device: str = "cpu") -> registry.LoadedModel:
    """Load (once per process) the model for ``name`` from ``checkpoint`` or the shipped default."""
    name = registry.canonical(name)
    if name == "linefit":
        return registry.build("linefit")
    path = Path(checkpoint) if checkpoint is not None else registry.default_checkpoint(name)
    if path is None:
        raise registry.CheckpointError(
            f"{registry.checkpoint_folder() / (name + '-small.pt')}: no checkpoint for model '{name}'; "
            f"pass one or create it with `icegrid train --model {name}`")
    path = Path(path)
    key = (name, str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0, str(device))
    if key not in _LOADED:
        _LOADED[key] = registry.load_checkpoint(path, name, device=device)
    return _LOADED[key]


def predict_events(loaded: registry.LoadedModel, data: ShardData, geometry: Geometry, device: str = "cpu",
                   batch_size: int = DEFAULT_BATCH_SIZE, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                   max_pairs: int | None = DEFAULT_MAX_PAIRS, amp: bool | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(direction (n, 3) vectors, kappa (n,), model-visible lengths (n,)) for every event of ``data``.

    Events without pulses get a zero vector and kappa 0 (no information). ``amp`` (default: on for
    CUDA, never on CPU) runs the network under fp16 autocast."""
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], loaded.infer_limit,
                              loaded.truncation, seed=SAMPLING_SEED)
    features = loaded.transform(data, selection, geometry)
    lengths = selection.lengths
    direction = np.zeros((data.n_events, 3), dtype=np.float64)
    kappa = np.zeros(data.n_events, dtype=np.float32)
    nonempty = np.flatnonzero(lengths > 0)
    batches = bucket_batches(lengths[nonempty], batch_size, max_tokens=max_tokens, max_pairs=max_pairs)
    model = loaded.model.to(device).eval()
    on_cuda = str(device).startswith("cuda")
    use_amp = on_cuda and (amp is None or amp)
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
        for batch_index in batches:
            events = nonempty[batch_index]
            vector, batch_kappa = model.predict(collate(features, events, device=device))
            direction[events] = vector.double().cpu().numpy()
            kappa[events] = batch_kappa.float().cpu().numpy()
    return direction, kappa, lengths


def infer_shard(store_path: Path | str, shard: str, model: str, checkpoint: Path | str | None = None,
                device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE,
                max_tokens: int | None = DEFAULT_MAX_TOKENS, overwrite: bool = False) -> dict:
    """Predict every event of ``shard`` with ``model`` and publish the predictions in the store.

    ``model`` is a registry name or alias; ``all`` or a comma list runs each model in turn and
    returns ``{"models": {name: summary}}``. ``checkpoint`` defaults to the shipped small one.
    Returns a summary: model, shard, n_events, seconds, events_per_s, skipped, checkpoint.
    """
    names = registry.expand(model)
    if len(names) > 1:
        if checkpoint is not None:
            raise ValueError("one checkpoint cannot serve several models; run them one by one")
        return {"models": {name: infer_shard(store_path, shard, name, None, device, batch_size, max_tokens,
                                             overwrite) for name in names}}
    name = names[0]
    store = EventStore(store_path)
    n_events = int(store.shard_attrs(shard)["n_events"])
    summary = {"model": name, "shard": shard, "n_events": n_events, "skipped": False, "device": str(device)}
    if store.has_predictions(shard, name) and not overwrite:
        return {**summary, "skipped": True, "seconds": 0.0}
    started = time.perf_counter()
    loaded = resolve_model(name, checkpoint, device)
    data = store.read_shard(shard, truth=False)
    geometry = store.geometry()
    attrs = {"preset": loaded.preset, "truncation": loaded.truncation, "infer_limit": loaded.infer_limit,
             "device": str(device)}
    if name == "linefit":
        from icegrid.models.linefit import predict_shard
        azimuth, zenith, kappa = predict_shard(data, geometry)
        truncated = 0
    else:
        direction, kappa, lengths = predict_events(loaded, data, geometry, device, batch_size, max_tokens)
        azimuth, zenith = angles_from_direction(direction)
        truncated = int((np.diff(data.offset) > lengths).sum())
        attrs.update({"checkpoint": str(loaded.checkpoint), "checkpoint_sha256": loaded.checkpoint_sha256,
                      "features": loaded.transform.describe()})
    store.write_predictions(shard, name, azimuth, zenith, kappa=kappa, attrs=attrs, overwrite=overwrite)
    seconds = time.perf_counter() - started
    return {**summary, "seconds": round(seconds, 3), "events_per_s": round(n_events / seconds, 1) if seconds else None,
            "truncated_events": truncated, "checkpoint": attrs.get("checkpoint")}
