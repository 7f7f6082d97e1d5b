"""Where a batch's rows are in its split's meta file, found from the footer: the row ranges a campaign
planner reads once per split, and the reads of one batch's rows that every preprocess task makes.

The footer is parsed once per process and file version (:func:`meta_footer`): a split of 2,000 batches
has a 1.4 MB footer that takes tens of ms to parse, which every preprocess task used to pay, O(batches²)
in all. Errors are one-line :class:`~icegrid.kaggle.InputError` naming the file.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from icegrid.errors import first_line
from icegrid.kaggle import InputError, _column, check_type


@dataclass(frozen=True)
class MetaFooter:
    """A meta file's footer, parsed once per process and file version (path, inode, size, mtime): a split of
    2,000 batches has a 1.4 MB footer that takes tens of ms to parse, which every preprocess task paid,
    O(batches²) in all. ``ends``: cumulative rows per row group; ``low``/``high``: the batch_id
    statistics of each row group (``known`` False where the writer left them out)."""

    metadata: pq.FileMetaData
    ends: np.ndarray
    low: np.ndarray
    high: np.ndarray
    known: np.ndarray

    def open(self, meta_path: Path) -> pq.ParquetFile:
        return pq.ParquetFile(meta_path, metadata=self.metadata, page_checksum_verification=True)


_FOOTERS: dict[tuple, MetaFooter] = {}
_FOOTERS_LOCK = threading.Lock()


def meta_footer(meta_path: Path) -> MetaFooter:
    """The cached :class:`MetaFooter` of ``meta_path`` (one-line InputError when it cannot be read)."""
    meta_path = Path(meta_path)
    try:
        stat = os.stat(meta_path)
    except FileNotFoundError:
        raise InputError(f"{meta_path}: meta file does not exist") from None
    key = (str(meta_path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _FOOTERS_LOCK:
        if key in _FOOTERS:
            return _FOOTERS[key]
    try:
        metadata = pq.read_metadata(meta_path)
        column = metadata.schema.to_arrow_schema().get_field_index("batch_id")
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{meta_path}: not a readable parquet meta file ({first_line(err)})") from None
    if column < 0:
        raise InputError(f"{meta_path}: missing column 'batch_id'")
    check_type(metadata.schema.to_arrow_schema().field(column).type, meta_path, "batch_id", ("int",))
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    stats = [g.column(column).statistics for g in groups]
    known = np.array([s is not None and s.has_min_max and s.null_count == 0 for s in stats], dtype=bool)
    footer = MetaFooter(metadata, np.cumsum([g.num_rows for g in groups], dtype=np.int64),
                        np.array([s.min if k else 0 for s, k in zip(stats, known)], dtype=np.int64),
                        np.array([s.max if k else -1 for s, k in zip(stats, known)], dtype=np.int64), known)
    with _FOOTERS_LOCK:
        if len(_FOOTERS) >= 8:      # a worker sees a split or two: keep the cache small
            _FOOTERS.clear()
        _FOOTERS[key] = footer
    return footer


def _read_groups(meta_path: Path, footer: MetaFooter, groups: list[int], columns: list[str] | None = None) -> pa.Table:
    try:
        file = footer.open(meta_path)
        return file.read_row_groups(groups, columns=columns) if groups else file.schema_arrow.empty_table()
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{meta_path}: not a readable parquet meta file ({first_line(err)})") from None


def meta_row_ranges(meta_path: Path) -> dict[int, tuple[int, int]]:
    """``{batch_id: (first row, stop row)}`` of a split's meta file, for every batch whose rows are
    contiguous (Kaggle's and icegrid's are; others are left out).

    For campaign planning, once per split: each preprocess task gets its range
    (``preprocess_shard(..., meta_rows=range)``) and reads only the row groups that hold it. A row group
    whose statistics say it holds one batch_id is not read (icegrid writes one per batch); the others'
    batch_id column is read one row group at a time.
    """
    footer = meta_footer(meta_path)
    single = footer.known & (footer.low == footer.high)
    sizes = np.diff(footer.ends, prepend=0)
    ids, lengths = [], []
    for index in range(sizes.size):
        if single[index] or sizes[index] == 0:
            ids.append(footer.low[index:index + 1])
            lengths.append(sizes[index:index + 1])
            continue
        table = _read_groups(meta_path, footer, [index], ["batch_id"])
        values = _column(table, meta_path, "batch_id", ("int",)).astype(np.int64, copy=False)
        starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1]).astype(np.int64)
        ids.append(values[starts])
        lengths.append(np.diff(np.append(starts, values.size)))
    ids_all = np.concatenate(ids) if ids else np.empty(0, np.int64)
    ends = np.cumsum(np.concatenate(lengths)) if lengths else np.empty(0, np.int64)
    pieces = np.concatenate([[0], ends[:-1]]) if ends.size else ends     # first row of each piece
    new_run = np.concatenate([[True], ids_all[1:] != ids_all[:-1]]) if ids_all.size else ids_all.astype(bool)
    run_ids, starts = ids_all[new_run], pieces[new_run]
    stops = np.append(starts[1:], ends[-1:])
    unique, runs = np.unique(run_ids, return_counts=True)
    once = set(unique[runs == 1].tolist())
    return {int(b): (int(a), int(z)) for b, a, z in zip(run_ids, starts, stops) if int(b) in once}


def read_meta_rows(meta_path: Path, rows: tuple[int, int]) -> pa.Table:
    """Rows ``[first, stop)`` of a meta file, reading only the row groups that hold them."""
    first, stop = int(rows[0]), int(rows[1])
    footer = meta_footer(meta_path)
    ends, total = footer.ends, int(footer.ends[-1]) if footer.ends.size else 0
    if not 0 <= first < stop <= total:
        raise InputError(f"{meta_path}: rows {first}..{stop - 1} are not in the file ({total} rows)")
    low, high = int(np.searchsorted(ends, first, side="right")), int(np.searchsorted(ends, stop - 1, side="right"))
    table = _read_groups(meta_path, footer, list(range(low, high + 1)))
    base = int(ends[low]) - int(footer.metadata.row_group(low).num_rows)
    return table.slice(first - base, stop - first)


def read_meta_batch(meta_path: Path, batch_id: int) -> pa.Table:
    """The rows of ``batch_id``, reading only the row groups whose statistics may hold it (without the
    dataset API a ``filters=`` read needs: its first use in a worker costs about a second)."""
    footer = meta_footer(meta_path)
    groups = np.flatnonzero(~footer.known | ((footer.low <= batch_id) & (batch_id <= footer.high)))
    table = _read_groups(meta_path, footer, groups.tolist())
    return table.filter(pc.equal(table["batch_id"], batch_id))
