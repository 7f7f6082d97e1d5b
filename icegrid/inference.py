"""infer_shard(): one store shard x one model -> predictions written beside the events, streamed in
event chunks so a worker's memory depends on the chunk, not on the shard.

A pure shard function for the campaign manager: idempotent (already published predictions are
skipped), atomic (``EventStore.write_predictions`` publishes with one rename) and deterministic on
CPU. Each chunk of ``chunk_events`` events is read from the store (zarr slices of the pulse arrays),
its pulses are selected above the model's limit and transformed, and it is predicted in batches;
a background thread prepares chunk i + 1 while the network runs on chunk i (numpy, zarr and torch
release the GIL). Within a chunk, events are sorted by length into batches (sequence bucketing)
sized by the model's memory cost and the device's budget (``icegrid.models.memory``).

Determinism: pulse sampling above a limit draws number ``p`` of one seeded stream for the shard's
pulse ``p`` (``select_pulses``), so every chunking selects the same pulses, and the same ones as the
whole-shard path did. Every event is padded to a length that depends on its own length alone
(``padded_length``), and the kNN graph is the event's own at any padding (``layers.knn``: explicit
distances, ties to the lower pulse index), so an event's prediction is the one it gets alone in an
unpadded batch, independent of its batch and chunk mates (batch sizes still change GEMM rounding,
~1e-6 rad; more for a vector of length << 1, whose direction is barely defined). The
CPU budget is a fixed number of bytes, so the written bytes depend on the checkpoint, the shard and
the chunk size only. On CUDA the networks run under fp16 autocast by default (``amp``), as the
solutions did at inference; the angles are float64 either way. ``legacy=True`` runs the
pre-streaming whole-shard path (kept for ``benchmarks/inference.py`` and the tests).

Names: predictions are stored under the model's name or a tagged one (``icemix@retrained``), so two
checkpoints of one model live side by side. Stored predictions record their checkpoint's sha256; a
request for them from another checkpoint is refused in one line (``checkpoint_conflict``) unless it
overwrites them, instead of silently keeping the old ones.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from icegrid.geometry import Geometry
from icegrid.models import memory, registry
from icegrid.models.features import (ShardFeatures, bucket_batches, collate, inference_batches, select_pulses,
                                     select_pulses_whole_shard)
from icegrid.store import EventStore, ShardData, ShardReader, angles_from_direction

DEFAULT_BATCH_SIZE = 256
DEFAULT_MAX_TOKENS = None          # the memory budget sizes batches; a token cap is optional
DEFAULT_CHUNK_EVENTS = 16384       # ~3.6 M pulses of a Kaggle batch: ~70 MB of pulses per chunk
LEGACY_MAX_TOKENS = 16384          # the whole-shard path's fixed caps
LEGACY_MAX_PAIRS = 1 << 21
SAMPLING_SEED = 0                  # pulse sub-sampling above the limit is seeded: same shard -> same bytes

_LOADED: dict[tuple, registry.LoadedModel] = {}
_GEOMETRY: dict[tuple, Geometry] = {}
_SHA256: dict[tuple, str] = {}


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


def store_geometry(store: EventStore) -> Geometry:
    """The store's geometry, read once per process (a store's geometry never changes once created)."""
    marker = (store.path / "geometry" / "x" / "zarr.json").stat()
    key = (str(store.path.resolve()), marker.st_ino, marker.st_mtime_ns)
    if key not in _GEOMETRY:
        _GEOMETRY[key] = store.geometry()
    return _GEOMETRY[key]


# ---- chunk sources --------------------------------------------------------------------------------
class MemoryShard:
    """Event ranges of a shard already in memory (views, no copies)."""

    def __init__(self, data: ShardData):
        self.data, self.offset, self.n_events = data, np.asarray(data.offset, dtype=np.int64), data.n_events

    def read(self, start: int, stop: int) -> ShardData:
        first, last = int(self.offset[start]), int(self.offset[stop])
        return ShardData(name=self.data.name, event_id=self.data.event_id[start:stop],
                         offset=self.offset[start:stop + 1] - first,
                         pulses={k: v[first:last] for k, v in self.data.pulses.items()})


class StoreShard(ShardReader):
    """Event ranges of a published store shard, read as zarr slices: only the chunks that hold them
    (icegrid.store.ShardReader: chunks are event-aligned, padding skipped, bad chunks one line)."""


def chunk_ranges(n_events: int, chunk_events: int | None) -> list[tuple[int, int]]:
    """Consecutive (start, stop) event ranges of at most ``chunk_events`` (None or 0: one range)."""
    size = int(chunk_events) if chunk_events else max(n_events, 1)
    if size < 1:
        raise ValueError(f"chunk_events must be positive, got {chunk_events}")
    return [(start, min(start + size, n_events)) for start in range(0, n_events, size)]


def stream(ranges: list[tuple[int, int]], prepare: Callable, consume: Callable) -> None:
    """``consume(start, stop, prepare(start, stop))`` for each range; one thread prepares the next
    range while the caller's thread consumes the current one, so at most two are in memory."""
    if not ranges:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="icegrid-prepare") as pool:
        pending = pool.submit(prepare, *ranges[0])
        for i, (start, stop) in enumerate(ranges):
            prepared = pending.result()
            if i + 1 < len(ranges):
                pending = pool.submit(prepare, *ranges[i + 1])
            consume(start, stop, prepared)
            del prepared


# ---- networks ---------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    """Predictions of every event of a shard plus what it took."""

    direction: np.ndarray               # (n, 3) float64, zero for events without pulses
    kappa: np.ndarray                   # (n,) float32
    lengths: np.ndarray                 # (n,) pulses the model saw
    n_pulses: np.ndarray                # (n,) pulses before truncation
    forward_calls: int = 0
    chunks: int = 0
    largest_chunk_events: int = 0
    largest_chunk_pulses: int = 0
    budget_bytes: int | None = None
    cost: dict = field(default_factory=dict)


def _use_amp(device: str, amp: bool | None) -> bool:
    return str(device).startswith("cuda") and (amp is None or amp)


def predict_stream(loaded: registry.LoadedModel, source, geometry: Geometry, device: str = "cpu",
                   batch_size: int = DEFAULT_BATCH_SIZE, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                   chunk_events: int | None = DEFAULT_CHUNK_EVENTS, amp: bool | None = None,
                   memory_budget: int | None = None, on_events: Callable[[int], None] | None = None) -> StreamResult:
    """Predict every event of ``source`` (a :class:`MemoryShard` or :class:`StoreShard`) chunk by chunk;
    ``on_events(n)`` after each chunk of ``n`` events (progress)."""
    model = loaded.model.to(device).eval()
    use_amp = _use_amp(device, amp)
    n = source.n_events
    result = StreamResult(direction=np.zeros((n, 3)), kappa=np.zeros(n, np.float32),
                          lengths=np.zeros(n, np.int64), n_pulses=np.diff(source.offset))
    if n == 0:
        return result
    cost = memory.model_cost(loaded, geometry, device, use_amp)
    result.budget_bytes = budget = memory.device_budget(device, memory_budget)
    result.cost = {"per_event": cost.per_event, "per_token": cost.per_token, "per_pair": cost.per_pair}

    def prepare(start: int, stop: int) -> ShardFeatures:
        data = source.read(start, stop)
        selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], loaded.infer_limit,
                                  loaded.truncation, seed=SAMPLING_SEED, pulse_start=int(source.offset[start]))
        return loaded.transform(data, selection, geometry)

    def consume(start: int, stop: int, features: ShardFeatures) -> None:
        lengths = features.selection.lengths
        result.lengths[start:stop] = lengths
        result.chunks += 1
        result.largest_chunk_events = max(result.largest_chunk_events, stop - start)
        result.largest_chunk_pulses = max(result.largest_chunk_pulses, int(features.selection.n_pulses.sum()))
        nonempty = np.flatnonzero(lengths > 0)
        for batch, pad in inference_batches(lengths[nonempty], batch_size, max_tokens, cost, budget,
                                            loaded.infer_limit):
            events = nonempty[batch]
            vector, kappa = model.predict(collate(features, events, device=device, pad_to=pad))
            result.direction[start + events] = vector.double().cpu().numpy()
            result.kappa[start + events] = kappa.float().cpu().numpy()
            result.forward_calls += 1
        if on_events is not None:
            on_events(stop - start)

    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
        stream(chunk_ranges(n, chunk_events), prepare, consume)
    return result


def predict_events(loaded: registry.LoadedModel, data: ShardData, geometry: Geometry, device: str = "cpu",
                   batch_size: int = DEFAULT_BATCH_SIZE, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                   amp: bool | None = None, chunk_events: int | None = DEFAULT_CHUNK_EVENTS
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(direction (n, 3) vectors, kappa (n,), model-visible lengths (n,)) for every event of ``data``.

    Events without pulses get a zero vector and kappa 0 (no information). ``amp`` (default: on for
    CUDA, never on CPU) runs the network under fp16 autocast."""
    result = predict_stream(loaded, MemoryShard(data), geometry, device, batch_size, max_tokens, chunk_events, amp)
    return result.direction, result.kappa, result.lengths


def predict_events_whole_shard(loaded: registry.LoadedModel, data: ShardData, geometry: Geometry,
                               device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE,
                               max_tokens: int | None = LEGACY_MAX_TOKENS, max_pairs: int | None = LEGACY_MAX_PAIRS,
                               amp: bool | None = None) -> StreamResult:
    """The pre-streaming path: the whole shard selected (lexsorts of all pulses), transformed and
    batched at once with fixed token and pair caps. The reference the streaming path is tested against."""
    selection = select_pulses_whole_shard(data.offset, data.pulses["time"], data.pulses["auxiliary"],
                                          loaded.infer_limit, loaded.truncation, seed=SAMPLING_SEED)
    features = loaded.transform(data, selection, geometry)
    lengths = selection.lengths
    result = StreamResult(direction=np.zeros((data.n_events, 3)), kappa=np.zeros(data.n_events, np.float32),
                          lengths=lengths, n_pulses=np.diff(data.offset), chunks=1,
                          largest_chunk_events=data.n_events, largest_chunk_pulses=int(data.offset[-1]))
    nonempty = np.flatnonzero(lengths > 0)
    model = loaded.model.to(device).eval()
    use_amp = _use_amp(device, amp)
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
        for batch in bucket_batches(lengths[nonempty], batch_size, max_tokens=max_tokens, max_pairs=max_pairs):
            events = nonempty[batch]
            vector, batch_kappa = model.predict(collate(features, events, device=device))
            result.direction[events] = vector.double().cpu().numpy()
            result.kappa[events] = batch_kappa.float().cpu().numpy()
            result.forward_calls += 1
    return result


# ---- line-fit -------------------------------------------------------------------------------------
def linefit_stream(source, geometry: Geometry, chunk_events: int | None = DEFAULT_CHUNK_EVENTS,
                   on_events: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(azimuth, zenith, kappa, largest chunk in events) of line-fit over ``source``, chunk by chunk
    (the next chunk is read while this one is fitted)."""
    from icegrid.models.linefit import predict_shard

    azimuth, zenith = np.zeros(source.n_events), np.zeros(source.n_events)
    kappa = np.full(source.n_events, np.nan, dtype=np.float32)
    largest = [0]

    def consume(start: int, stop: int, data: ShardData) -> None:
        azimuth[start:stop], zenith[start:stop], _ = predict_shard(data, geometry)
        largest[0] = max(largest[0], stop - start)
        if on_events is not None:
            on_events(stop - start)

    stream(chunk_ranges(source.n_events, chunk_events), source.read, consume)
    return azimuth, zenith, kappa, largest[0]


# ---- the shard task ------------------------------------------------------------------------------------
def _run_model(store: EventStore, shard: str, loaded: registry.LoadedModel, geometry: Geometry, device: str,
               batch_size: int, max_tokens: int | None, chunk_events: int | None, legacy: bool,
               memory_budget: int | None, on_events: Callable[[int], None] | None) -> StreamResult:
    if legacy:
        data = store.read_shard(shard, truth=False)
        result = predict_events_whole_shard(loaded, data, geometry, device, batch_size)
        if on_events is not None:
            on_events(data.n_events)
        return result
    return predict_stream(loaded, StoreShard(store, shard), geometry, device, batch_size, max_tokens,
                          chunk_events, memory_budget=memory_budget, on_events=on_events)


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file, hashed once per process per (file, mtime, size)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _SHA256:
        _SHA256[key] = registry.file_sha256(path)
    return _SHA256[key]


def checkpoint_conflict(store: EventStore, shard: str, name: str, checkpoint: Path | str | None) -> str | None:
    """Why the predictions stored under ``name`` (tagged or not) did not come from ``checkpoint`` (default:
    the model's default one), or None when they did or nothing says (line-fit, no sha256 recorded)."""
    base = registry.split_tag(name)[0]
    path = Path(checkpoint) if checkpoint is not None else registry.default_checkpoint(base)
    if base == "linefit" or path is None or not path.is_file():
        return None
    attrs = store.prediction_attrs(shard, name)
    stored = attrs.get("checkpoint_sha256")
    sha = checkpoint_sha256(path) if stored else None
    if not stored or sha == stored:
        return None
    return (f"{store.path}: shard '{shard}' has predictions '{name}' from checkpoint "
            f"{Path(str(attrs.get('checkpoint', '?'))).name} (sha256 {stored[:12]}), not from {path} "
            f"(sha256 {sha[:12]})")


def refuse_other_checkpoint(store: EventStore, shard: str, name: str, checkpoint: Path | str | None) -> None:
    """CheckpointError (one line) when predictions stored under ``name`` came from another checkpoint."""
    conflict = checkpoint_conflict(store, shard, name, checkpoint)
    if conflict:
        raise registry.CheckpointError(f"{conflict}; pass --overwrite to replace them, or --as TAG to "
                                       f"store the new ones beside them")


def infer_shard(store_path: Path | str, shard: str, model: str, checkpoint: Path | str | None = None,
                device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE,
                max_tokens: int | None = DEFAULT_MAX_TOKENS, overwrite: bool = False,
                chunk_events: int | None = DEFAULT_CHUNK_EVENTS, legacy: bool = False,
                memory_budget: int | None = None, on_events: Callable[[int], None] | None = None) -> dict:
    """Predict every event of ``shard`` with ``model`` and publish the predictions in the store.

    ``model`` is a registry name or alias, maybe tagged (``2nd@retrained``: stored as
    ``icemix@retrained``); ``all`` or a comma list runs each model in turn and returns
    ``{"models": {name: summary}}``. ``checkpoint`` defaults to the shipped small one. Predictions
    already stored under the name are kept (``skipped``) when they came from the same checkpoint;
    from another one, CheckpointError (one line) unless ``overwrite``.
    ``chunk_events`` bounds the events in memory at once; ``memory_budget`` (bytes) the memory of
    one forward pass (default: the device's, see ``icegrid.models.memory``); ``on_events(n)`` is
    called as chunks of ``n`` events are done.
    Returns a summary: model, shard, n_events, seconds, events_per_s, skipped, checkpoint,
    truncated_events, forward_calls, chunk_events.
    """
    names = registry.expand_names(model)
    if len(names) > 1:
        if checkpoint is not None:
            raise ValueError("one checkpoint cannot serve several models; run them one by one")
        return {"models": {name: infer_shard(store_path, shard, name, None, device, batch_size, max_tokens,
                                             overwrite, chunk_events, legacy, memory_budget, on_events)
                           for name in names}}
    name = names[0]
    base = registry.split_tag(name)[0]
    store = EventStore(store_path)
    n_events = int(store.shard_attrs(shard)["n_events"])
    summary = {"model": name, "shard": shard, "n_events": n_events, "skipped": False, "device": str(device)}
    if store.has_predictions(shard, name) and not overwrite:
        refuse_other_checkpoint(store, shard, name, checkpoint)
        return {**summary, "skipped": True, "seconds": 0.0}
    started = time.perf_counter()
    loaded = resolve_model(base, checkpoint, device)
    geometry = store_geometry(store)
    attrs = {"preset": loaded.preset, "truncation": loaded.truncation, "infer_limit": loaded.infer_limit,
             "device": str(device), "base_model": base}
    if base == "linefit":
        columns = ("sensor_id", "time", "auxiliary")
        source = (MemoryShard(store.read_shard(shard, pulses=columns, truth=False)) if legacy
                  else StoreShard(store, shard, columns))
        azimuth, zenith, kappa, _ = linefit_stream(source, geometry, None if legacy else chunk_events, on_events)
        truncated, calls = 0, 0
    else:
        result = _run_model(store, shard, loaded, geometry, device, batch_size, max_tokens, chunk_events, legacy,
                            memory_budget, on_events)
        azimuth, zenith = angles_from_direction(result.direction)
        kappa, calls = result.kappa, result.forward_calls
        truncated = int((result.n_pulses > result.lengths).sum())
        attrs.update({"checkpoint": str(loaded.checkpoint), "checkpoint_sha256": loaded.checkpoint_sha256,
                      "features": loaded.transform.describe(), "chunk_events": None if legacy else chunk_events,
                      "batch_memory_bytes": result.budget_bytes})
    store.write_predictions(shard, name, azimuth, zenith, kappa=kappa, attrs=attrs, overwrite=overwrite)
    seconds = time.perf_counter() - started
    return {**summary, "seconds": round(seconds, 3), "events_per_s": round(n_events / seconds, 1) if seconds else None,
            "truncated_events": truncated, "checkpoint": attrs.get("checkpoint"), "forward_calls": calls,
            "chunk_events": None if legacy else chunk_events}
