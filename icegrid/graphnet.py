"""GraphNeT datasets in: the SQLite and parquet files of graphnet's ``SQLiteWriter``/``ParquetWriter``,
read into the same event store as the Kaggle layout.

Layouts read (graphnet's I3 converters; ``<pulsemap>`` is the ``--pulsemap`` name, e.g. SRTInIcePulses)::

    DB.db                                   SQLite: table <pulsemap> (one row per pulse) and table truth
                                            (one row per event, event_no its INTEGER PRIMARY KEY)
    DIR/<pulsemap>/<pulsemap>_<N>.parquet   parquet, ParquetWriter.merge_files: one batch N per file
    DIR/truth/truth_<N>.parquet             (event_no is the pandas index, stored as a column);
                                            unmerged files <name>_<table>.parquet pair up by <name>

Columns used. Pulse map: ``event_no``, ``dom_x, dom_y, dom_z`` (m), ``dom_time`` (ns, rounded to the
Kaggle int64 ns), ``charge``, and for ``auxiliary`` (Kaggle: True = not in a hard local coincidence) a
column ``auxiliary`` if there is one, else ``hlc`` (auxiliary = hlc == 0), else all False. Truth:
``event_no`` (the store's event_id), ``energy`` (GeV), ``azimuth``/``zenith`` (rad, IceCube's
convention: where the particle came from, as in Kaggle's meta) and, with ``pid`` and
``interaction_type``, the shape: **track when |pid| == 14 and interaction_type == 1 (charged-current
muon neutrino), cascade otherwise** — graphnet's own ``track`` label and the paper's track sample.
Each truth column is optional, as in the Kaggle meta.

Sensor ids: DOM positions are matched to the reference geometry (``sensor_geometry.csv`` beside the
input, else the built-in IceCube-86 one: the Kaggle numbering) when every position lies within
:data:`TOLERANCE_M` of one of its sensors; otherwise the store gets a geometry built from the input's
unique positions (ordered by x, y, then z from the top). Events are in event_no order, pulses in time
order within an event (stable: ties keep file order), like Kaggle batches; truth events with no pulse
in the pulse map are left out and counted in the shard's ``events_without_pulses``.

One shard per parquet batch file, and per :data:`EVENTS_PER_SHARD` events of an SQLite truth table
(``--events-per-shard``); a worker holds one shard's pulses in memory (SQLite rows are converted a block
of :data:`SQL_ROWS` at a time; peak memory per pulse not measured yet). Every problem is an
:class:`~icegrid.kaggle.InputError` of one line naming the file.
"""

from __future__ import annotations

import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from icegrid.errors import first_line
from icegrid.geometry import Geometry, GeometryError, geometry_from_positions, nearest_sensor, unique_positions
from icegrid.kaggle import InputError, KaggleBatch, check_type, first_duplicate

TRUTH = "truth"
INDEX = "event_no"
POSITION = ("dom_x", "dom_y", "dom_z")
PULSE_REQUIRED = (INDEX, *POSITION, "dom_time", "charge")
TRUTH_OPTIONAL = ("energy", "azimuth", "zenith", "pid", "interaction_type")
EVENTS_PER_SHARD = 200_000
TOLERANCE_M = 0.5          # real DOMs are >= 7 m apart; Kaggle's geometry file is rounded to 1 cm
SQL_ROWS = 1 << 18         # rows per fetch: bounds the Python objects alive at once
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Source:
    """One future shard: an SQLite range of truth rows, or one parquet pulse file with its truth file."""

    path: str                  # the .db file, or the parquet pulse file
    pulsemap: str
    index: int                 # batch_id of the shard
    truth_path: str = ""       # parquet: the truth file
    first: int = 0             # sqlite: truth rows [first, first + count) in event_no order
    count: int = 0             # parquet: rows of the truth file

    @property
    def name(self) -> str:
        dataset = Path(self.path).stem if not self.truth_path else Path(self.path).parent.parent.name
        return _NAME.sub("-", f"{dataset}_{self.pulsemap}_batch_{self.index:06d}")

    @property
    def split(self) -> str:
        """Event numbers are unique within a GraphNeT dataset: the store checks them per dataset."""
        return _NAME.sub("-", Path(self.path).stem if not self.truth_path else Path(self.path).parent.parent.name)


# ---- finding the shards -------------------------------------------------------------------------
@contextmanager
def _connect(path: Path, tables=()):
    """A read-only connection to an SQLite file that has ``tables`` (closed on exit)."""
    conn = None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        have = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as err:
        if conn is not None:
            conn.close()
        raise InputError(f"{path}: not a readable SQLite database ({first_line(err)})") from None
    try:
        for table in tables:
            if table not in have:
                raise InputError(f"{path}: no table '{table}' (tables: {', '.join(sorted(have)) or 'none'})")
        yield conn
    finally:
        conn.close()


def _sqlite_sources(path: Path, pulsemap: str, events_per_shard: int) -> list[Source]:
    with _connect(path, (TRUTH, pulsemap)) as conn:
        _sql_columns(conn, path, TRUTH, (INDEX,))
        _sql_columns(conn, path, pulsemap, PULSE_REQUIRED)
        n = conn.execute(f'SELECT count(*) FROM "{TRUTH}"').fetchone()[0]
    if n == 0:
        raise InputError(f"{path}: table '{TRUTH}' has no events")
    return [Source(str(path), pulsemap, k, first=a, count=min(events_per_shard, n - a))
            for k, a in enumerate(range(0, n, events_per_shard))]


def _key(file: Path, table: str) -> str:
    stem = file.name[: -len(".parquet")]
    return stem[len(table) + 1:] if stem.startswith(table + "_") else stem.removesuffix("_" + table)


def _parquet_sources(root: Path, pulsemap: str) -> list[Source]:
    tables = {}
    for table in (TRUTH, pulsemap):
        folder = root / table
        if not folder.is_dir():
            have = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "none"
            raise InputError(f"{root}: no table folder '{table}/' (folders: {have})")
        tables[table] = {_key(f, table): f for f in folder.glob("*.parquet")}
    if not tables[pulsemap]:
        raise InputError(f"{root / pulsemap}: no .parquet files")
    keys = sorted(tables[pulsemap], key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    out = []
    for position, key in enumerate(keys):
        truth = tables[TRUTH].get(key)
        if truth is None:
            raise InputError(f"{tables[pulsemap][key]}: no truth file for it in {root / TRUTH}")
        try:
            events = pq.read_metadata(truth).num_rows   # footer only: for the progress lines
        except (pa.ArrowException, OSError):
            events = 0                                 # the shard's task reports the file properly
        out.append(Source(str(tables[pulsemap][key]), pulsemap, int(key) if key.isdigit() else position,
                          truth_path=str(truth), count=events))
    return out


def list_sources(input_path: Path | str, pulsemap: str, events_per_shard: int = EVENTS_PER_SHARD) -> list[Source]:
    """The shards a GraphNeT input gives: an SQLite file, a parquet dataset folder, or a folder of .db files."""
    path = Path(input_path)
    if not path.exists():
        raise InputError(f"{path}: GraphNeT input does not exist")
    if path.is_file():
        return _sqlite_sources(path, pulsemap, events_per_shard)
    if (path / TRUTH).is_dir() or (path / pulsemap).is_dir():
        return _parquet_sources(path, pulsemap)
    databases = sorted(path.glob("*.db"))
    if not databases:
        raise InputError(f"{path}: neither a GraphNeT parquet dataset ({TRUTH}/ and {pulsemap}/) nor .db files")
    return [s for db in databases for s in _sqlite_sources(db, pulsemap, events_per_shard)]


# ---- reading one shard --------------------------------------------------------------------------
def _sql_columns(conn, path: Path, table: str, wanted) -> list[str]:
    have = [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')]
    for name in wanted:
        if name not in have:
            raise InputError(f"{path}: table '{table}' has no column '{name}'")
    return have


def _fetch(conn, path: Path, table: str, columns: list[str], query: str, params=()) -> dict[str, np.ndarray]:
    """Columns of a query as float64 arrays, converted a block of rows at a time (NULL becomes NaN)."""
    select = ", ".join(f'"{c}"' for c in columns)
    blocks = []
    try:
        cursor = conn.execute(f'SELECT {select} FROM "{table}" {query}', params)
        while rows := cursor.fetchmany(SQL_ROWS):
            try:
                blocks.append(np.array(rows, dtype=np.float64).reshape(len(rows), len(columns)))
            except (TypeError, ValueError):
                bad = next(c for i, c in enumerate(columns) if not _numeric(r[i] for r in rows))
                raise InputError(f"{path}: table '{table}' column '{bad}' has non-numeric values") from None
    except sqlite3.Error as err:
        raise InputError(f"{path}: cannot read table '{table}' ({first_line(err)})") from None
    data = np.concatenate(blocks) if blocks else np.empty((0, len(columns)))
    return {c: data[:, i] for i, c in enumerate(columns)}


def _numeric(values) -> bool:
    try:
        np.array(list(values), dtype=np.float64)
        return True
    except (TypeError, ValueError):
        return False


def _read_sqlite(source: Source) -> tuple[dict, dict, str, str]:
    path = Path(source.path)
    with _connect(path, (TRUTH, source.pulsemap)) as conn:
        truth_cols = [c for c in (INDEX, *TRUTH_OPTIONAL) if c in _sql_columns(conn, path, TRUTH, (INDEX,))]
        truth = _fetch(conn, path, TRUTH, truth_cols, f'ORDER BY "{INDEX}" LIMIT ? OFFSET ?',
                       (source.count, source.first))
        have = _sql_columns(conn, path, source.pulsemap, PULSE_REQUIRED)
        if truth[INDEX].size == 0:
            raise InputError(f"{path}: table '{TRUTH}' has no rows {source.first}..{source.first + source.count - 1}")
        low, high = truth[INDEX].min(), truth[INDEX].max()
        pulses = _fetch(conn, path, source.pulsemap, [*PULSE_REQUIRED, *_aux_column(have)],
                        f'WHERE "{INDEX}" BETWEEN ? AND ?', (int(low), int(high)))
    where = f"{path}: table '{TRUTH}'", f"{path}: table '{source.pulsemap}'"
    return truth, pulses, *where


def _aux_column(have) -> list[str]:
    return [c for c in ("auxiliary", "hlc") if c in have][:1]


def _parquet_table(path: Path, what: str, required, optional) -> dict[str, np.ndarray]:
    try:
        schema = pq.read_schema(path)
        present = [c for c in (*required, *optional) if c in schema.names]
        for name in required:
            if name not in schema.names:
                raise InputError(f"{path}: missing column '{name}'")
        for name in present:
            check_type(schema.field(name).type, path, name, ("bool", "float") if name in ("auxiliary", "hlc")
                       else ("float",))
        table = pq.read_table(path, columns=present)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable parquet {what} file ({first_line(err)})") from None
    out = {}
    for name in present:
        column = table[name]
        if column.null_count:
            raise InputError(f"{path}: column '{name}' has {column.null_count} null value(s)")
        out[name] = column.to_numpy()
    return out


def _read_parquet(source: Source) -> tuple[dict, dict, str, str]:
    truth = _parquet_table(Path(source.truth_path), "truth", (INDEX,), TRUTH_OPTIONAL)
    pulses = _parquet_table(Path(source.path), "pulse map", PULSE_REQUIRED, ("auxiliary", "hlc"))
    if "auxiliary" in pulses:
        pulses.pop("hlc", None)
    return truth, pulses, source.truth_path, source.path


# ---- into the store's form ----------------------------------------------------------------------
def _event_numbers(values: np.ndarray, where: str) -> np.ndarray:
    if values.dtype.kind == "f" and values.size and np.abs(values).max() >= 2.0 ** 53:
        # SQLite rows come through float64: beyond 2**53 an event_no could have been rounded
        raise InputError(f"{where}: column '{INDEX}' has values beyond 2**53 (read as float64)")
    number = values.astype(np.int64)
    if not (np.isfinite(values).all() and np.array_equal(number, values)):
        raise InputError(f"{where}: column '{INDEX}' has null or non-integer values")
    return number


def _finite(values: np.ndarray, where: str, name: str) -> np.ndarray:
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"{where}: column '{name}' has null or non-finite values")
    return values


def sensor_ids(xyz: np.ndarray, geometry: Geometry, where: str) -> np.ndarray:
    """The sensor at each position (within TOLERANCE_M), found once per distinct position."""
    unique, inverse = unique_positions(xyz)
    index = nearest_sensor(unique, geometry, TOLERANCE_M)
    if (index < 0).any():
        x, y, z = unique[index < 0][0]
        raise InputError(f"{where}: DOM position ({x:g}, {y:g}, {z:g}) m is no sensor of the store's geometry "
                         f"({geometry.n_sensors} sensors, tolerance {TOLERANCE_M} m)")
    return index[inverse].astype(np.int16)


def to_batch(source: Source, truth: dict, pulses: dict, truth_where: str, pulse_where: str,
             geometry: Geometry) -> tuple[KaggleBatch, int]:
    """Validated truth and pulses of one shard as a Kaggle-form batch; also the events without pulses."""
    event_no = _event_numbers(truth[INDEX], truth_where)
    duplicate = first_duplicate(event_no)
    if duplicate is not None:
        raise InputError(f"{truth_where}: event_no {duplicate} appears more than once")
    order = np.argsort(event_no, kind="stable")
    pulse_event = _event_numbers(pulses[INDEX], pulse_where)
    position = np.searchsorted(event_no[order], pulse_event)
    known = position < event_no.size
    known[known] = event_no[order][position[known]] == pulse_event[known]
    if not known.all():
        raise InputError(f"{pulse_where}: event_no {pulse_event[~known][0]} has pulses but no row in '{TRUTH}'")
    values = {c: _finite(pulses[c], pulse_where, c) for c in (*POSITION, "dom_time", "charge")}
    by_time = np.lexsort((values["dom_time"], position))     # stable: equal times keep file order
    counts = np.bincount(position, minlength=event_no.size)
    hit = counts > 0
    if not hit.any():
        raise InputError(f"{pulse_where}: no pulses for the events of this shard")
    xyz = np.stack([values[c][by_time] for c in POSITION], axis=1)
    if "auxiliary" in pulses:
        auxiliary = pulses["auxiliary"][by_time].astype(bool)
    elif "hlc" in pulses:
        auxiliary = pulses["hlc"][by_time] == 0
    else:
        auxiliary = np.zeros(by_time.size, dtype=bool)
    kept = order[hit]
    batch = KaggleBatch(batch_id=source.index, source=source.path, event_id=event_no[kept],
                        n_pulses=counts[hit].astype(np.int64), sensor_id=sensor_ids(xyz, geometry, pulse_where),
                        time=np.rint(values["dom_time"][by_time]).astype(np.int64),
                        charge=values["charge"][by_time], auxiliary=auxiliary)
    _add_truth(batch, truth, kept, truth_where)
    return batch, int((~hit).sum())


def _add_truth(batch: KaggleBatch, truth: dict, kept: np.ndarray, where: str) -> None:
    if "azimuth" in truth and "zenith" in truth:
        batch.azimuth = _finite(truth["azimuth"], where, "azimuth")[kept]
        batch.zenith = _finite(truth["zenith"], where, "zenith")[kept]
    if "energy" in truth:
        batch.energy = _finite(truth["energy"], where, "energy")[kept]
    if "pid" in truth and "interaction_type" in truth:
        pid = _finite(truth["pid"], where, "pid")[kept]
        interaction = _finite(truth["interaction_type"], where, "interaction_type")[kept]
        batch.shape = ((np.abs(pid) == 14) & (interaction == 1)).astype(np.int8)   # 1 = track (SHAPES)


def read_source(source: Source, geometry: Geometry) -> tuple[KaggleBatch, int]:
    """One shard of a GraphNeT dataset, read and validated (see the module docstring)."""
    read = _read_parquet if source.truth_path else _read_sqlite
    return to_batch(source, *read(source), geometry)


def preprocess_graphnet_shard(source: Source, store_path: str | Path) -> dict:
    """Publish one GraphNeT shard into the store (idempotent, like ``preprocess_shard``)."""
    from icegrid.preprocess import check_new_event_ids
    from icegrid.store import EventStore

    store = EventStore(store_path)
    name, started = source.name, time.perf_counter()
    if store.has_shard(name):
        attrs = store.shard_attrs(name)
        return {"shard": name, "n_events": attrs["n_events"], "n_pulses": attrs["n_pulses"],
                "skipped": True, "seconds": 0.0}
    batch, empty = read_source(source, store.geometry())
    check_new_event_ids(store, name, Path(source.path), batch.event_id, split=source.split)
    store.write_shard(name, batch, attrs={"split": source.split, "input_format": "graphnet",
                                          "pulsemap": source.pulsemap, "events_without_pulses": empty})
    return {"shard": name, "n_events": batch.n_events, "n_pulses": int(batch.n_pulses.sum()),
            "skipped": False, "seconds": time.perf_counter() - started}


# ---- the store's geometry -----------------------------------------------------------------------
def _positions(source: Source) -> np.ndarray:
    """The distinct DOM positions of a source's pulse map (a whole SQLite table: its shards share it)."""
    if source.truth_path:
        table, where = _parquet_table(Path(source.path), "pulse map", POSITION, ()), source.path
    else:
        path = Path(source.path)
        with _connect(path, (source.pulsemap,)) as conn:
            table = _fetch(conn, path, source.pulsemap, list(POSITION), "GROUP BY dom_x, dom_y, dom_z")
        where = f"{path}: table '{source.pulsemap}'"
    return unique_positions(np.stack([_finite(table[c], where, c) for c in POSITION], axis=1))[0]


def geometry_for(sources: list[Source], reference: Geometry) -> Geometry:
    """``reference`` if every DOM position of the input is one of its sensors, else one built from them."""
    seen = {}
    for source in sources:   # an SQLite file is scanned once, not once per shard
        key = source.path if source.truth_path else (source.path, source.pulsemap)
        if key not in seen:
            seen[key] = _positions(source)
    xyz = unique_positions(np.concatenate(list(seen.values())))[0]
    index = nearest_sensor(xyz, reference, TOLERANCE_M)
    if (index >= 0).all() and np.unique(index).size == index.size:
        return reference
    try:
        return geometry_from_positions(xyz)
    except GeometryError as err:
        raise InputError(f"{sources[0].path}: {err}") from None


def create_store(store_path: str | Path, inputs: list[str | Path], pulsemap: str,
                 events_per_shard: int = EVENTS_PER_SHARD):
    """The store for GraphNeT ``inputs``: an existing one as it is (a DOM position its geometry lacks is
    a one-line error of that shard), else a new one with :func:`geometry_for` the inputs' positions."""
    from icegrid.preprocess import find_geometry
    from icegrid.store import EventStore

    if (Path(store_path) / "zarr.json").exists():
        return EventStore(store_path)
    sources = [s for entry in inputs for s in list_sources(entry, pulsemap, events_per_shard)]
    return EventStore.create(store_path, geometry_for(sources, find_geometry(Path(inputs[0]))))


def preprocess_graphnet(input_path: str | Path, store_path: str | Path, pulsemap: str,
                        events_per_shard: int = EVENTS_PER_SHARD) -> list[dict]:
    """Every shard of one GraphNeT input into the store, serially in this process (the library path;
    `icegrid preprocess --format graphnet` runs the same shards as Dask tasks)."""
    create_store(store_path, [input_path], pulsemap, events_per_shard)
    return [preprocess_graphnet_shard(s, store_path) for s in list_sources(input_path, pulsemap, events_per_shard)]

