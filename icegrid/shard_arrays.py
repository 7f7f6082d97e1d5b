"""Event-aligned chunks: how a shard's arrays are cut, named, encoded, written chunk by chunk and read back.

Zarr v3 as installed (3.1) has only regular chunk grids: a chunk cannot end where an event ends. A shard
is therefore cut into *event chunks* of ``chunk_events`` events (E; the last one shorter). Chunk k of
every per-event array holds events ``[k*E, (k+1)*E)``; chunk k of every pulse array holds exactly their
pulses, in Kaggle order, then padding up to ``chunk_pulses`` (P, the largest event chunk's pulse count).
Padding has ``sensor_id == -1`` (zeros elsewhere) and belongs to no event: ``events/pulse_start`` says
where each event's ``n_pulses`` pulses begin in the stored pulse arrays, so one event is one slice of
one chunk per array. A shard of one chunk (at most E events) has no padding. ``events/offset`` keeps its
Kaggle meaning: cumulative pulse counts, i.e. the pulse's row in the source batch file.

Every array carries xarray/CF ``dimension_names`` (:data:`DIMS`) and the codecs of :func:`codecs_for`.
This module owns that layout: the chunk plan, writing a shard's pulses one event chunk at a time
(:class:`PulseArrays`), reading event ranges back without padding (:class:`ShardReader`), and the
:class:`StoreError` and :class:`ShardData` that ``icegrid.store`` re-exports.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.group import GroupMetadata
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import MemoryStore

from icegrid import integrity
from icegrid.errors import first_line

CHUNK_EVENTS = 16384        # ~3.5 M pulses of a Kaggle batch per chunk: ~65 MB of pulses decoded
PULSE_COLUMNS = ("sensor_id", "time", "charge", "auxiliary")
PULSE_FILL = {"sensor_id": -1, "time": 0, "charge": 0.0, "auxiliary": False}
PULSE_DTYPES = {"sensor_id": np.int16, "time": np.int64, "charge": np.float64, "auxiliary": np.bool_}
EVENT, EDGE, PULSE, SENSOR, XYZ = "event", "event_edge", "pulse", "sensor", "xyz"
DIMS = {"offset": (EDGE,), "direction": (EVENT, XYZ)}   # every other shard array: (event,) or (pulse,)
# Measured on a 200,000-event batch, 43 M pulses (benchmarks/preprocess.py --codecs): against blosc lz4-1
# with bit-shuffle, zstd-1 with bit-shuffle stores float64 charge in 94 MB instead of 210 and time in 39
# instead of 48, for about 0.9 s more CPU (3.2 s to compress all columns); it saves 5 MB on sensor_id and
# auxiliary together, so they keep lz4. A delta filter would halve time again (25 MB) but is a numcodecs
# codec outside the Zarr v3 specification, which other readers need not support.
_DENSE = ("time", "charge")


class StoreError(RuntimeError):
    """A store that is missing, foreign, damaged, unwritable, or asked for something it does not hold."""


@dataclass
class ShardData:
    """One shard (or an event range of it) read back into memory; only the requested columns are filled.
    ``offset`` and the pulse arrays are compact: event i is pulses ``offset[i]:offset[i+1]``."""

    name: str
    event_id: np.ndarray
    offset: np.ndarray
    pulses: dict[str, np.ndarray] = field(default_factory=dict)
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        return int(self.event_id.shape[0])

    @property
    def n_pulses(self) -> np.ndarray:
        return np.diff(self.offset)


def codecs_for(name: str) -> list:
    """Blosc (a core Zarr v3 codec, readable everywhere) then crc32c: a changed or cut chunk is an error
    before blosc sees it (blosc can crash on a truncated buffer)."""
    cname = "zstd" if name in _DENSE else "lz4"
    return [BloscCodec(cname=cname, clevel=1, shuffle="bitshuffle"), Crc32cCodec()]


def dims_for(name: str, ndim: int, first: str = EVENT) -> tuple[str, ...]:
    dims = DIMS.get(name, (first,))
    return dims + tuple(f"{name}_{axis}" for axis in range(len(dims), ndim))


_TEMPLATES: dict[tuple[str, bool], dict] = {}


def array_node(name: str, shape: tuple[int, ...], dtype, chunks: tuple[int, ...], dims: tuple[str, ...],
               attrs: dict | None = None, fill=None) -> ArrayV3Metadata:
    """The metadata of one array, from a template per dtype and codec chain that zarr builds and
    validates once per process (not for each of the ~15 arrays of every shard)."""
    dtype = np.dtype(dtype)
    key = (dtype.str, name in _DENSE)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = zarr.create_array(MemoryStore(), shape=(1,), dtype=dtype, chunks=(1,),
                                            compressors=codecs_for(name)).metadata.to_dict()
    doc = {**_TEMPLATES[key], "shape": tuple(shape), "attributes": attrs or {}, "dimension_names": tuple(dims),
           "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": tuple(chunks)}}}
    if fill is not None:
        doc["fill_value"] = fill
    return ArrayV3Metadata.from_dict(doc)


def create_nodes(group: zarr.Group, nodes: dict[str, ArrayV3Metadata | None]) -> dict[str, zarr.Array]:
    """Every array (and, for None, subgroup) of a new group, their metadata written concurrently.
    Every chunk is then written, even one of fill values only, so the marker can require each of them."""
    specs = {path: GroupMetadata() if meta is None else meta for path, meta in nodes.items()}
    with zarr.config.set({"array.write_empty_chunks": True}):
        return dict(group.create_hierarchy(specs))


def event_node(name: str, data: np.ndarray, chunk: int, attrs: dict | None = None,
               first_dim: str = EVENT) -> ArrayV3Metadata:
    """The node of a per-event (or per-sensor) array of ``data``, chunked ``chunk`` along its first axis."""
    chunks = (max(1, min(chunk, data.shape[0])),) + data.shape[1:]
    return array_node(name, data.shape, data.dtype, chunks, dims_for(name, data.ndim, first_dim), attrs)


def write_arrays(group: zarr.Group, arrays: dict[str, tuple[np.ndarray, int, dict | None]],
                 first_dim: str = EVENT, extra: dict[str, ArrayV3Metadata | None] | None = None) -> dict:
    """Whole arrays ``{path: (data, chunk, attrs)}`` (plus the empty ``extra`` nodes) into a new group."""
    arrays = {path: (np.ascontiguousarray(data), chunk, attrs) for path, (data, chunk, attrs) in arrays.items()}
    nodes = {path: event_node(path.rsplit("/", 1)[-1], data, chunk, attrs, first_dim)
             for path, (data, chunk, attrs) in arrays.items()}
    created = create_nodes(group, {**nodes, **(extra or {})})
    write_together([(created[path], Ellipsis, data) for path, (data, _, _) in arrays.items()])
    return created


def write_together(writes: list[tuple[zarr.Array, object, np.ndarray]]) -> None:
    """``array[selection] = data`` for every write at once, in one trip to zarr's event loop: one trip
    per array costs about a millisecond on an idle machine (tens on a loaded one), and a shard has ~13."""
    from zarr.core.sync import sync

    async def all_writes() -> None:
        await asyncio.gather(*(array.async_array.setitem(selection, data) for array, selection, data in writes))

    sync(all_writes())


def pulse_nodes(plan: "ChunkPlan", columns: tuple[str, ...], prefix: str = "pulses/") -> dict[str, ArrayV3Metadata]:
    """The (empty) pulse arrays of a new shard: ``stored_pulses`` long, one chunk per event chunk."""
    chunk = max(1, plan.chunk_pulses if plan.padded else plan.n_pulses)
    return {prefix + c: array_node(c, (plan.stored_pulses,), PULSE_DTYPES[c], (chunk,), (PULSE,),
                                   {"units": "ns"} if c == "time" else None, PULSE_FILL[c]) for c in columns}


@dataclass(frozen=True)
class ChunkPlan:
    """Where each event chunk of a shard lies, in the compact (Kaggle) and the stored pulse index."""

    offset: np.ndarray      # (n_events + 1,) int64 compact cumulative pulse counts
    chunk_events: int       # E
    chunk_pulses: int       # P: stored pulses per chunk (the last chunk holds only its own)

    @property
    def n_events(self) -> int:
        return int(self.offset.shape[0]) - 1

    @property
    def n_pulses(self) -> int:
        return int(self.offset[-1])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_events // self.chunk_events)

    @property
    def padded(self) -> bool:
        return self.n_chunks > 1

    def events(self, k: int) -> tuple[int, int]:
        return k * self.chunk_events, min((k + 1) * self.chunk_events, self.n_events)

    def pulses(self, k: int) -> tuple[int, int]:
        """Compact pulse range ``[a, b)`` of chunk k."""
        first, last = self.events(k)
        return int(self.offset[first]), int(self.offset[last])

    def shift(self, k: int) -> int:
        """Stored position minus compact position, for every pulse of chunk k."""
        return k * self.chunk_pulses - int(self.offset[k * self.chunk_events])

    @property
    def stored_pulses(self) -> int:
        """Length of the stored pulse arrays."""
        if not self.padded:
            return self.n_pulses
        a, b = self.pulses(self.n_chunks - 1)
        return (self.n_chunks - 1) * self.chunk_pulses + (b - a)

    def pulse_start(self) -> np.ndarray:
        """(n_events,) stored position of each event's first pulse."""
        chunk = np.arange(self.n_events, dtype=np.int64) // self.chunk_events
        firsts = self.offset[: self.n_events : self.chunk_events] if self.n_events else self.offset[:0]
        return self.offset[:-1] + chunk * self.chunk_pulses - firsts[chunk]

    def slices(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(stored start, stored stop, compact start) of events ``[start, stop)``: one slice per chunk."""
        if stop <= start:
            return []
        out = []
        for k in range(start // self.chunk_events, (stop - 1) // self.chunk_events + 1):
            first, last = self.events(k)
            a, b = int(self.offset[max(start, first)]), int(self.offset[min(stop, last)])
            out.append((a + self.shift(k), b + self.shift(k), a))
        return out


def plan_chunks(offset: np.ndarray, chunk_events: int) -> ChunkPlan:
    """The plan of a new shard: E = ``chunk_events`` (a shard of fewer events is one unpadded chunk)."""
    offset = np.asarray(offset, dtype=np.int64)
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be positive, got {chunk_events}")
    n_events = offset.shape[0] - 1
    edges = np.unique(np.minimum(np.arange(0, n_events + chunk_events, chunk_events), n_events))
    per_chunk = np.diff(offset[edges])
    return ChunkPlan(offset, int(chunk_events), int(per_chunk.max(initial=0)))


def stored_plan(offset: np.ndarray, attrs: dict) -> ChunkPlan:
    """The plan of a published shard from its attributes; shards written before event chunks (store
    versions 1 and 2) are one unpadded chunk."""
    offset = np.asarray(offset, dtype=np.int64)
    events, pulses = attrs.get("chunk_events"), attrs.get("chunk_pulses")
    if events is None or pulses is None:
        return ChunkPlan(offset, max(offset.shape[0] - 1, 1), int(offset[-1]))
    return ChunkPlan(offset, int(events), int(pulses))


class PulseArrays:
    """The empty pulse arrays of a new shard (``{column: array}`` from :func:`pulse_nodes`), filled one
    event chunk at a time, in order."""

    def __init__(self, arrays: dict[str, zarr.Array], plan: ChunkPlan):
        self.plan, self.next, self.arrays = plan, 0, arrays

    def write(self, values: dict[str, np.ndarray]) -> None:
        """The pulses of the next event chunk, compact (the rest of the chunk becomes padding) or already
        padded to the stored chunk (:func:`padded_chunk`: written as they are, no copy)."""
        k = self.next
        a, b = self.plan.pulses(k)
        stored = stored_length(self.plan, k)
        start = k * self.plan.chunk_pulses if self.plan.padded else 0
        writes = []
        for column, array in self.arrays.items():
            data = values[column]
            if data.shape not in ((b - a,), (stored,)):
                raise ValueError(f"event chunk {k} of pulses/{column} has {data.shape[0]} pulses, expected {b - a}")
            if data.shape[0] != stored:   # one whole chunk: padding set here, so zarr never reads it back to merge
                full = np.full(stored, PULSE_FILL[column], dtype=PULSE_DTYPES[column])
                full[: data.shape[0]] = data
                data = full
            writes.append((array, slice(start, start + stored), data))
        # One trip to zarr's loop; the columns' chunks (each its own array and file) are compressed concurrently.
        write_together(writes)
        self.next += 1

    def close(self) -> None:
        if self.next != self.plan.n_chunks:
            raise ValueError(f"{self.next} of {self.plan.n_chunks} event chunks written")


def stored_length(plan: ChunkPlan, k: int) -> int:
    """Stored pulses of event chunk k: ``chunk_pulses`` for all but the last chunk of a padded shard."""
    a, b = plan.pulses(k)
    return plan.chunk_pulses if plan.padded and k < plan.n_chunks - 1 else b - a


def padded_chunk(plan: ChunkPlan, k: int) -> dict[str, np.ndarray]:
    """Empty pulse arrays for event chunk k as stored, its padding already set: a reader fills the first
    ``b - a`` (``plan.pulses(k)``) and :meth:`PulseArrays.write` stores them without another copy."""
    a, b = plan.pulses(k)
    out = {c: np.empty(stored_length(plan, k), dtype=PULSE_DTYPES[c]) for c in PULSE_COLUMNS}
    for c, values in out.items():
        values[b - a:] = PULSE_FILL[c]
    return out


_END = object()


def prefetched(items: Iterable):
    """The items of ``items``, each next one prepared in a background thread while the caller works on
    the current one (preprocess: decoding and checking chunk k + 1 overlaps compressing chunk k; both
    release the GIL). At most two items are alive; an exception comes out where its item would."""
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="icegrid-read") as pool:
        pending = pool.submit(next, iterator, _END)
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = pool.submit(next, iterator, _END)
            yield item
            del item        # the caller's is the only reference left


def memory_chunks(plan: ChunkPlan, pulses: dict[str, np.ndarray]):
    """The event chunks of pulse arrays already in memory (views)."""
    for k in range(plan.n_chunks):
        a, b = plan.pulses(k)
        yield {c: v[a:b] for c, v in pulses.items()}


def read_compact(array: zarr.Array, plan: ChunkPlan, start: int = 0, stop: int | None = None) -> np.ndarray:
    """The pulses of events ``[start, stop)`` without padding, reading only the chunks that hold them."""
    stop = plan.n_events if stop is None else stop
    pieces = plan.slices(start, stop)
    if len(pieces) == 1:
        return array[pieces[0][0]:pieces[0][1]]
    out = np.empty(int(plan.offset[stop] - plan.offset[start]), dtype=array.dtype)
    base = int(plan.offset[start])
    for first, last, compact in pieces:
        out[compact - base: compact - base + last - first] = array[first:last]
    return out


def check_columns(columns: tuple[str, ...] | None) -> None:
    for column in columns or ():
        if column not in PULSE_COLUMNS:
            raise StoreError(f"unknown pulse column '{column}' (have {', '.join(PULSE_COLUMNS)})")


def decode_error(store_path: Path, where: str, key: str, array: zarr.Array, err: Exception) -> StoreError:
    return StoreError(f"{store_path}: {where} array '{key}' chunk {integrity.bad_chunk(array)}: "
                      f"{first_line(err)}; rerun to rebuild it")


class ShardReader:
    """Event ranges of a published shard, read as zarr slices of only the chunks that hold them.

    ``read(start, stop)`` gives events ``[start, stop)`` as compact :class:`ShardData` (padding skipped);
    a range inside one event chunk reads one chunk per array. ``event_id``, ``offset`` (compact),
    ``n_events`` and ``chunk_events`` (align ranges to it to read each chunk once) are the shard's.
    """

    def __init__(self, store, shard: str, columns: tuple[str, ...] = PULSE_COLUMNS):
        check_columns(columns)
        self.store, self.shard = store, shard
        data = store.read_shard(shard, pulses=(), truth=False)     # event_id and offsets, integrity-checked
        self.event_id, self.offset, self.n_events = data.event_id, data.offset.astype(np.int64), data.n_events
        self.plan = stored_plan(self.offset, data.attrs)
        self.chunk_events = self.plan.chunk_events
        group = store._shard_group(shard)
        self.arrays = {c: store._array(group, f"pulses/{c}", f"shard '{shard}'") for c in columns}

    def read(self, start: int, stop: int) -> ShardData:
        first = int(self.offset[start])
        return ShardData(name=self.shard, event_id=self.event_id[start:stop],
                         offset=self.offset[start:stop + 1] - first,
                         pulses={c: self._slice(c, start, stop) for c in self.arrays})

    def _slice(self, column: str, start: int, stop: int) -> np.ndarray:
        array = self.arrays[column]
        try:
            return read_compact(array, self.plan, start, stop)
        except Exception as err:   # a decode or checksum error: one line naming the chunk
            raise decode_error(self.store.path, f"shard '{self.shard}'", f"pulses/{column}", array, err) from None
