"""What a forward pass costs in memory and what a device can spend on one: the two numbers that size
inference batches.

A forward pass at its peak holds, for a batch of B events padded to L slots, about
``B * (per_event + per_token * L + per_pair * L**2)`` bytes (:class:`icegrid.models.base.MemoryCost`):
the L² term only where the model materialises a pair matrix (a relative attention bias, a kNN distance
matrix); fused attention costs tokens. A model may declare its cost (``DirectionModel.memory_cost``);
otherwise it is measured once per process on three tiny probe batches of the model's own inputs, by
counting the bytes of every tensor the forward creates for as long as it lives (a torch dispatch
mode). The count is a function of shapes alone, so it is the same on every machine, thread count and
allocator, and batches (hence the written bytes) do not depend on where a shard ran.

The budget on CPU is a fixed number of bytes (the default or ``ICEGRID_BATCH_MEMORY``), never the RAM
that happens to be free, for the same reason; on CUDA it is a fraction of the free device memory.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from icegrid.geometry import Geometry
from icegrid.models.base import MemoryCost
from icegrid.models.features import collate, select_pulses
from icegrid.store import ShardData

# Bytes a CPU forward pass may hold. Measured (small presets, one core, 3,000 Kaggle-like events):
# 16 MiB ran dynedge 2.5x, icemix 1.6x faster than 256 MiB, the others as fast: bigger batches make
# tensors that malloc serves from fresh mmaps (faulted in page by page on every batch) and that leave
# the cache; smaller ones only add calls.
DEFAULT_CPU_BUDGET = 16 << 20
BUDGET_ENV = "ICEGRID_BATCH_MEMORY"
CUDA_FREE_FRACTION = 0.5            # of the memory free after the weights: room for the allocator's caching
PROBE_EVENTS = 2
PROBE_MAX_LENGTH = 128
SAFETY = 1.25                       # workspaces and allocator rounding the tensor count does not see

_MEASURED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created by the ops run under it, each counted while a tensor on it lives."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.trace: list[int] = []              # live bytes after each op
        self._views: dict[int, int] = {}        # storage -> tensors alive on it
        self._sizes: dict[int, int] = {}
        self._tracked: set[int] = set()

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch would wrap __torch_dispatch__ in dynamo.disable, importing torch._dynamo on first use
        # (3 s and ~100 MB per worker process); nothing is compiled under this mode.
        return False

    def _release(self, key: int, ident: int) -> None:
        self._tracked.discard(ident)
        self._views[key] -= 1
        if self._views[key] == 0:
            self.live -= self._sizes.pop(key)
            del self._views[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or id(tensor) in self._tracked or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key, size = storage._cdata, storage.nbytes()
            if size == 0:
                continue
            if key not in self._views:
                self._views[key], self._sizes[key] = 0, size
                self.live += size
            self._views[key] += 1
            self._tracked.add(id(tensor))
            weakref.finalize(tensor, self._release, key, id(tensor))
        self.peak = max(self.peak, self.live)
        self.trace.append(self.live)
        return out


def probe_lengths(limit: int | None) -> tuple[int, int, int]:
    """Three padded lengths to fit the cost on: up to ``PROBE_MAX_LENGTH`` or the model's limit."""
    top = max(8, min(PROBE_MAX_LENGTH, limit or PROBE_MAX_LENGTH))
    return top // 4 or 1, top // 2, top


def probe_shard(geometry: Geometry, n_events: int, length: int, seed: int = 0) -> ShardData:
    """``n_events`` synthetic events of exactly ``length`` pulses on ``geometry``'s sensors."""
    rng = np.random.default_rng(seed)
    n = n_events * length
    return ShardData(name="probe", event_id=np.arange(n_events), offset=np.arange(n_events + 1) * length,
                     pulses={"sensor_id": rng.integers(0, geometry.n_sensors, n).astype(np.int16),
                             "time": np.sort(rng.integers(6000, 20000, n)).astype(np.int64),
                             "charge": rng.uniform(0.3, 3.0, n), "auxiliary": rng.random(n) < 0.4})


@dataclass(frozen=True)
class MeasuredCost(MemoryCost):
    """A measured cost: the upper envelope of per-op polynomials ``terms`` (c0, c1, c2), so a pair
    matrix freed before the widest layer runs is not added to it; per_* hold the sum of the maxima."""

    terms: tuple[tuple[float, float, float], ...] = ()

    def batch_bytes(self, n_events, longest):
        longest = np.asarray(longest, dtype=np.float64)
        per_event = np.max([c0 + c1 * longest + c2 * longest * longest for c0, c1, c2 in self.terms], axis=0)
        return n_events * per_event


def live_bytes_trace(loaded, geometry: Geometry, length: int, device: str, use_amp: bool) -> list[int]:
    """Live tensor bytes after each op of one ``predict`` on ``PROBE_EVENTS`` events of ``length`` pulses."""
    data = probe_shard(geometry, PROBE_EVENTS, length)
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], None)
    batch = collate(loaded.transform(data, selection, geometry), np.arange(PROBE_EVENTS), device=device)
    counter = LiveBytes()
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
        with counter:
            loaded.model.predict(batch)
    return counter.trace


def fit_cost(lengths: np.ndarray, traces: list[list[int]], limit: int | None) -> MeasuredCost:
    """Per-op polynomials in L through the probes' traces (the peak alone when the op sequences differ),
    reduced to the ones on the upper envelope up to ``limit``."""
    vandermonde = np.stack([np.ones(3), lengths, lengths ** 2], axis=1)
    if len({len(t) for t in traces}) == 1:
        values = np.array(traces, dtype=np.float64) / PROBE_EVENTS          # (3, n_ops)
    else:       # control flow depends on L: only the peaks are comparable
        values = np.array([[max(t, default=0)] for t in traces], dtype=np.float64) / PROBE_EVENTS
    coefficients = np.maximum(np.linalg.solve(vandermonde, values).T, 0.0) * SAFETY    # (n_ops, 3)
    grid = np.unique(np.geomspace(1, max(limit or 8192, 2), 96).round())
    on_envelope = np.unique(np.argmax(coefficients @ np.stack([np.ones_like(grid), grid, grid ** 2]), axis=0))
    terms = tuple(tuple(float(round(c)) for c in coefficients[i]) for i in on_envelope)
    bound = [max(t[j] for t in terms) for j in range(3)]
    return MeasuredCost(per_event=bound[0], per_token=bound[1], per_pair=bound[2], terms=terms)


def model_cost(loaded, geometry: Geometry, device: str = "cpu", use_amp: bool = False) -> MemoryCost:
    """The model's declared cost, else the one measured (once per process, device and precision)."""
    declared = loaded.model.memory_cost()
    if declared is not None:
        return declared
    key = (str(device), bool(use_amp))
    cache = _MEASURED.setdefault(loaded.model, {})
    if key not in cache:
        lengths = np.array(probe_lengths(loaded.infer_limit), dtype=np.float64)
        traces = [live_bytes_trace(loaded, geometry, int(n), device, use_amp) for n in lengths]
        cache[key] = fit_cost(lengths, traces, loaded.infer_limit)
    return cache[key]


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1073741824"`` -> bytes; ValueError in one line otherwise."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(value[-1:], 1)
    try:
        number = float(value[:-1] if scale > 1 else value)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={text!r}: not a size (e.g. 512M, 2G)") from None
    if number <= 0:
        raise ValueError(f"{BUDGET_ENV}={text!r}: must be positive")
    return int(number * scale)


def device_budget(device: str = "cpu", budget: int | None = None) -> int:
    """Bytes one forward pass may hold: ``budget``, else ``$ICEGRID_BATCH_MEMORY``, else the device's own
    (CPU: the fixed default; CUDA: half of the free memory)."""
    if budget is not None:
        return int(budget)
    if os.environ.get(BUDGET_ENV):
        return parse_bytes(os.environ[BUDGET_ENV])
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * CUDA_FREE_FRACTION)
    return DEFAULT_CPU_BUDGET
