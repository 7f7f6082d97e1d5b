"""Streaming a Kaggle batch file: row groups in, validated event chunks out, never the whole file in memory.

:class:`PulseFile` opens a ``batch_<N>.parquet`` (footer and schema only: columns and types are checked
there). ``chunks(plan, meta, n_sensors)`` then reads it in record batches (pyarrow ``iter_batches``),
checks every value as it passes (nulls, uint64 beyond int64, non-finite charge, sensor_id outside the
geometry, event_id against the meta's pulse ranges) and yields the pulses of one event chunk of the
store's plan at a time, in the store's dtypes. Peak memory: one record batch plus one event chunk.
Every problem is an :class:`~icegrid.kaggle.InputError` of one line naming the file, raised before the
chunk it is found in is handed on, so a writer that stops there publishes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from icegrid.errors import first_line
from icegrid.kaggle import BatchMeta, InputError, check_type, check_uint64
from icegrid.shard_arrays import PULSE_COLUMNS, ChunkPlan, padded_chunk

BATCH_ROWS = 1 << 18          # pulses per record batch: ~5 MB decoded, small next to an event chunk
KINDS = {"event_id": ("int",), "sensor_id": ("int",), "time": ("int",), "charge": ("float",),
         "auxiliary": ("bool",)}


class EventIdCheck:
    """The pulses' event_id column against the meta's ranges, fed piece by piece in file order.

    Not expanded from the meta: the column must equal the meta's event_id at each range start and change
    value exactly at range starts (the ranges are already known to tile the file, so every boundary in
    ``first[1:]`` is > 0).
    """

    def __init__(self, event_id: np.ndarray, first: np.ndarray):
        self.event_id, self.first, self.boundaries = event_id, first, first[1:]
        self.previous = None

    def first_mismatch(self, values: np.ndarray, row0: int) -> int | None:
        """Row of the first pulse in ``values`` (rows from ``row0``) that disagrees, or None."""
        if values.size == 0:
            return None
        change = np.flatnonzero(values[1:] != values[:-1]) + 1 + row0
        if self.previous is not None and values[0] != self.previous:
            change = np.concatenate([[row0], change])
        lo, hi = np.searchsorted(self.boundaries, [row0, row0 + values.size])
        expected = self.boundaries[lo:hi]
        if not np.array_equal(change, expected):
            diff = np.setxor1d(change, expected)
            return int(diff.min()) if diff.size else row0
        i0, i1 = np.searchsorted(self.first, [row0, row0 + values.size])
        wrong = np.flatnonzero(values[self.first[i0:i1] - row0] != self.event_id[i0:i1])
        if wrong.size:
            return int(self.first[i0 + wrong[0]])
        self.previous = values[-1]
        return None


class PulseFile:
    """A Kaggle pulse batch file, opened for streaming; ``n_rows`` from its footer."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: pulse batch file does not exist")
        try:
            # pre-buffering would cache the whole file; page checksums, where the writer left them, are verified
            self.file = pq.ParquetFile(self.path, pre_buffer=False, page_checksum_verification=True)
            schema = self.file.schema_arrow
        except (pa.ArrowException, OSError) as err:
            raise self._unreadable(err) from None
        for name, kinds in KINDS.items():
            if schema.get_field_index(name) < 0:
                raise InputError(f"{self.path}: missing column '{name}'")
            check_type(schema.field(name).type, self.path, name, kinds)
        self.n_rows = self.file.metadata.num_rows
        if self.n_rows == 0:
            raise InputError(f"{self.path}: empty batch (no pulses)")

    def _unreadable(self, err: Exception) -> InputError:
        return InputError(f"{self.path}: not a readable parquet pulse batch file ({first_line(err)})")

    def _batches(self) -> Iterator[pa.RecordBatch]:
        """Record batches in file order; a damaged page is an InputError, not the OSError a writer would
        report as its own failure."""
        try:
            for batch in self.file.iter_batches(batch_size=BATCH_ROWS, columns=list(KINDS)):
                yield batch
        except (pa.ArrowException, OSError) as err:
            raise self._unreadable(err) from None

    def _checked(self, batch: pa.RecordBatch, row0: int, ids: EventIdCheck, n_sensors: int, meta: BatchMeta,
                 meta_path: Path | str) -> dict:
        """One record batch as numpy arrays in the store's dtypes, every value checked."""
        out = {}
        for name in KINDS:
            column = batch.column(name)
            if column.null_count:
                first = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                raise InputError(f"{self.path}: column '{name}' has null values (the first at pulse row {row0 + first})")
            check_uint64(column, self.path, name)
            out[name] = column.to_numpy(zero_copy_only=False)
        charge = out["charge"].astype(np.float64, copy=False)
        if not np.isfinite(charge).all():
            raise InputError(f"{self.path}: column 'charge' has non-finite values")
        sensor = out["sensor_id"]
        if sensor.size and (sensor.min() < 0 or sensor.max() >= n_sensors):
            bad = int(sensor[(sensor < 0) | (sensor >= n_sensors)][0])
            raise InputError(f"{self.path}: sensor_id {bad} outside the geometry (0..{n_sensors - 1})")
        mismatch = ids.first_mismatch(out.pop("event_id").astype(np.int64, copy=False), row0)
        if mismatch is not None:
            raise InputError(f"{meta_path}: pulse ranges of batch_id {meta.batch_id} do not match event_id "
                             f"in {self.path.name} (first mismatch at pulse row {mismatch})")
        out["charge"] = charge
        return out

    def chunks(self, plan: ChunkPlan, meta: BatchMeta, meta_path: Path | str, n_sensors: int) \
            -> Iterator[dict[str, np.ndarray]]:
        """The pulses of each event chunk of ``plan`` (the events of ``meta``, read from ``meta_path``),
        checked, in order; a chunk that the store pads comes padded (``padded_chunk``)."""
        ids = EventIdCheck(meta.event_id, plan.offset[:-1])
        batches = self._batches()
        current, position, row0 = None, 0, 0
        for k in range(plan.n_chunks):
            a, b = plan.pulses(k)
            out = padded_chunk(plan, k)
            filled = 0
            while filled < b - a:
                if current is None or position == current["time"].shape[0]:
                    if current is not None:
                        row0 += current["time"].shape[0]
                    batch = next(batches, None)
                    if batch is None:   # a footer that promised more rows than the pages hold
                        raise InputError(f"{self.path}: ends at pulse row {row0}, its footer says {self.n_rows}")
                    current, position = self._checked(batch, row0, ids, n_sensors, meta, meta_path), 0
                take = min(current["time"].shape[0] - position, b - a - filled)
                for c in PULSE_COLUMNS:    # the assignment casts to the store's dtype (values checked above)
                    out[c][filled:filled + take] = current[c][position:position + take]
                filled += take
                position += take
            yield out

    def read_all(self, meta: BatchMeta, meta_path: Path | str, n_sensors: int) -> dict[str, np.ndarray]:
        """Every pulse, checked, as one chunk (the in-memory reader's path)."""
        offset = meta.offsets
        whole = ChunkPlan(offset, max(meta.n_events, 1), int(offset[-1]))
        return next(iter(self.chunks(whole, meta, meta_path, n_sensors)))
