"""``icegrid export``: a store's predictions, with the truth it has, as one parquet or CSV file keyed by
event_id (``table``), or the Kaggle competition's submission CSV (``kaggle``: exactly ``event_id,azimuth,zenith``
of one model, sorted by event_id, every value finite, as the competition's grader requires).

The ``table`` columns are :meth:`icegrid.api.Store.table`'s: event_id, true_<column> for every truth column
some shard has (null in shards without it), then <model>_azimuth, <model>_zenith [rad] and <model>_kappa
(null when the model gives none) per model. The stored ``direction`` is not written: it is computed from
the two angles. Rows are sorted by event_id within each shard and shards are written in event_id order, so
the file is sorted whenever the shards' event_id ranges do not overlap (always within one split).

Memory is bounded by one shard: the file is streamed shard by shard (a parquet row group, or CSV rows, per
shard). The one exception is shards whose event_id ranges overlap (a store with several splits): then
the event ids seen are kept to refuse duplicates (8 bytes per event), and a Kaggle submission is sorted
in memory (24 bytes per event). The file is written beside the output under a hidden temporary name and
renamed into place when complete: a failed export leaves any previous file at that path as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from icegrid.api import PREDICTION_COLUMNS, TRUTH_PREFIX, Store
from icegrid.atomic import atomic_path
from icegrid.errors import first_line
from icegrid.kaggle import InputError
from icegrid.store import TRUTH_COLUMNS

FORMATS = ("table", "kaggle")
KAGGLE_COLUMNS = ("event_id", "azimuth", "zenith")
SUFFIXES = (".parquet", ".csv")
_TRUTH_TYPES = {"azimuth": pa.float64(), "zenith": pa.float64(), "energy": pa.float64(),
                "shape": pa.dictionary(pa.int8(), pa.string())}
_PREDICTION_TYPES = dict(zip(PREDICTION_COLUMNS, (pa.float64(), pa.float64(), pa.float32())))


def check_out(out: Path, fmt: str) -> Path:
    """The output path's type and folder, checked before any shard is read."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format '{fmt}' (have {', '.join(FORMATS)})")
    suffix = out.suffix.lower()
    if fmt == "kaggle" and suffix != ".csv":
        raise InputError(f"{out}: --format kaggle writes the competition's CSV submission; give a path ending in .csv")
    if suffix not in SUFFIXES:
        raise InputError(f"{out}: unknown output type '{out.suffix or '(none)'}'; give a path ending in "
                         ".parquet or .csv")
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give a file path ending in {suffix}")
    if not out.parent.is_dir():
        raise InputError(f"{out}: folder '{out.parent}' does not exist (create it first)")
    return out


def export_store(store_path: Path | str, out: Path | str, models: str | Sequence[str] | None = "all",
                 fmt: str = "table", shards: Sequence[str] | None = None, split: str | None = None) -> dict:
    """Write the export file; returns what was written (out, format, events, shards, models, columns)."""
    out = check_out(Path(out), fmt)
    store = Store(store_path)
    names = _pick_shards(store, shards, split)
    picked = store.select_models(models, names)
    if fmt == "kaggle" and len(picked) != 1:
        raise InputError(f"{store.path}: --format kaggle takes exactly one model, got {len(picked)} "
                         f"({', '.join(picked)}); give one with --models")
    ordered, overlapping = _event_order(store, names)
    if fmt == "kaggle":
        schema = pa.schema([("event_id", pa.int64()), ("azimuth", pa.float64()), ("zenith", pa.float64())])
    else:
        schema = _table_schema(_truth_columns(store, ordered), picked)
    tables = _shard_tables(store, ordered, picked, fmt, schema)
    if overlapping:
        tables = _merged_kaggle(tables, schema) if fmt == "kaggle" else _unique_across(tables)
    n_events = _write_atomically(out, schema, tables)
    return {"out": out, "format": fmt, "events": n_events, "shards": len(ordered), "models": picked,
            "columns": schema.names}


def _pick_shards(store: Store, shards: Sequence[str] | None, split: str | None) -> list[str]:
    names = store.select_shards(list(shards) if shards else None)
    if split is None:
        return names
    splits = {s: store.event_store.shard_attrs(s).get("split") for s in names}
    chosen = [s for s in names if splits[s] == split]
    if not chosen:
        have = ", ".join(sorted({str(v) for v in splits.values()}))
        raise InputError(f"{store.path}: no shard of split '{split}' (splits here: {have})")
    return chosen


def _event_order(store: Store, names: list[str]) -> tuple[list[str], bool]:
    """Shards by their first event_id, and whether any two event_id ranges overlap (or are unknown)."""
    ranges = {s: store.event_store.shard_attrs(s).get("event_id_range") for s in names}
    if any(r is None for r in ranges.values()):  # written before ranges were recorded, or empty: assume overlap
        return sorted(names), len(names) > 1
    ordered = sorted(names, key=lambda s: (ranges[s][0], s))
    starts = np.array([ranges[s][0] for s in ordered])
    ends = np.maximum.accumulate(np.array([ranges[s][1] for s in ordered]))
    return ordered, bool((starts[1:] <= ends[:-1]).any())


def _truth_columns(store: Store, names: list[str]) -> list[str]:
    """The truth columns some shard has (per-event arrays only: cheap next to the pulses)."""
    present = set()
    for shard in names:
        present.update(store.event_store.read_event_arrays(shard, TRUTH_COLUMNS))
    return [c for c in TRUTH_COLUMNS if c in present]


def _table_schema(truth: list[str], models: list[str]) -> pa.Schema:
    fields = [("event_id", pa.int64())] + [(TRUTH_PREFIX + c, _TRUTH_TYPES.get(c, pa.float64())) for c in truth]
    fields += [(f"{m}_{c}", kind) for m in models for c, kind in _PREDICTION_TYPES.items()]
    return pa.schema(fields)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the schema's columns in its order; a truth column this shard lacks becomes nulls."""
    columns = [table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _shard_tables(store: Store, ordered: list[str], models: list[str], fmt: str, schema: pa.Schema):
    """(shard, table) per shard in order, each sorted by event_id with its ids checked unique."""
    for shard in ordered:
        table = store.shard_table(shard, models, truth=fmt == "table")
        ids = table["event_id"].to_numpy()
        if ids.size > 1 and (np.diff(ids) < 0).any():
            order = np.argsort(ids, kind="stable")
            table, ids = table.take(order), ids[order]
        repeated = np.flatnonzero(np.diff(ids) == 0)
        if repeated.size:
            raise InputError(f"{store.path}: shard '{shard}' holds event_id {int(ids[repeated[0]])} twice")
        if fmt == "kaggle":
            table = _kaggle_rows(store, shard, table, models[0])
        yield shard, _conform(table, schema)


def _kaggle_rows(store: Store, shard: str, table: pa.Table, model: str) -> pa.Table:
    azimuth, zenith = (table[f"{model}_{c}"].to_numpy(zero_copy_only=False) for c in ("azimuth", "zenith"))
    bad = ~(np.isfinite(azimuth) & np.isfinite(zenith))
    if bad.any():
        event = int(table["event_id"].to_numpy()[np.argmax(bad)])
        raise InputError(f"{store.path}: shard '{shard}' predictions '{model}': {int(bad.sum())} event(s) without a "
                         f"finite azimuth and zenith (e.g. event_id {event}); Kaggle refuses NaN and infinity")
    return pa.table({"event_id": table["event_id"], "azimuth": azimuth, "zenith": zenith})


def _unique_across(tables):
    """Pass the shards' tables on, refusing an event_id that two shards hold (only needed when ranges overlap)."""
    seen: dict[str, np.ndarray] = {}
    for shard, table in tables:
        ids = table["event_id"].to_numpy()
        for other, previous in seen.items():
            if ids.size == 0 or previous.size == 0 or previous[0] > ids[-1] or previous[-1] < ids[0]:
                continue
            common = np.intersect1d(previous, ids, assume_unique=True)
            if common.size:
                raise InputError(f"event_id {int(common[0])} is in shards '{other}' and '{shard}'; export one "
                                 "split (--split NAME) or pick shards (--shard NAME)")
        seen[shard] = ids
        yield shard, table


def _merged_kaggle(tables, schema: pa.Schema):
    """All shards' submission rows sorted by event_id (shards' ranges overlap: a stream cannot be sorted)."""
    parts = list(_unique_across(tables))
    merged = pa.concat_tables([table for _, table in parts]) if parts else schema.empty_table()
    order = np.argsort(merged["event_id"].to_numpy(), kind="stable")
    yield "all", merged.take(order)


class _CsvWriter:
    """CSV rows streamed after a header written here: pyarrow quotes every header name, and the
    competition's sample submission reads exactly ``event_id,azimuth,zenith``."""

    def __init__(self, path: Path, schema: pa.Schema):
        import pyarrow.csv as pacsv

        awkward = [n for n in schema.names if any(c in n for c in ',"\n\r')]
        if awkward:
            raise InputError(f"{path}: column name {awkward[0]!r} cannot be a CSV header; export to .parquet")
        self.file = open(path, "wb")
        self.file.write((",".join(schema.names) + "\n").encode())
        # No quoting: a value that would need quotes is an error instead of a silent change of the layout.
        self.rows = pacsv.CSVWriter(self.file, schema, write_options=pacsv.WriteOptions(
            include_header=False, quoting_style="none"))

    def write_table(self, table: pa.Table) -> None:
        self.rows.write_table(table)

    def close(self) -> None:
        try:
            self.rows.close()
        finally:
            self.file.close()


def _writer(path: Path, schema: pa.Schema, suffix: str):
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetWriter(path, schema, compression="zstd")
    return _CsvWriter(path, schema)


def _write_atomically(out: Path, schema: pa.Schema, tables) -> int:
    """Stream ``tables`` into a hidden file beside ``out``, then rename it to ``out``; the event count."""
    n_events = 0
    try:
        with atomic_path(out) as tmp:
            writer = _writer(tmp, schema, out.suffix.lower())
            try:
                for _, table in tables:
                    writer.write_table(table)
                    n_events += table.num_rows
            finally:
                writer.close()
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{out}: cannot write the export ({first_line(err)})") from None
    return n_events
