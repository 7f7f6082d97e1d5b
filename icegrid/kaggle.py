"""Reading and writing the IceCube Kaggle layout with pyarrow, with schema and consistency checks.

Layout (the competition's, unchanged)::

    <root>/<split>/batch_<N>.parquet   pulses: event_id int64, sensor_id int16, time int64,
                                       charge float64, auxiliary bool (True = NOT in HLC)
    <root>/<split>_meta.parquet        batch_id, event_id, first_pulse_index, last_pulse_index,
                                       [azimuth, zenith float64], [energy float64 GeV, shape track|cascade]
    <root>/sensor_geometry.csv         sensor_id,x,y,z

Every problem with an input file raises :class:`InputError` whose message is one line naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from icegrid import ragged
from icegrid.atomic import atomic_path
from icegrid.errors import first_line

PULSE_SCHEMA = pa.schema([
    ("event_id", pa.int64()),
    ("sensor_id", pa.int16()),
    ("time", pa.int64()),
    ("charge", pa.float64()),
    ("auxiliary", pa.bool_()),
])
META_INDEX_COLUMNS = ("batch_id", "event_id", "first_pulse_index", "last_pulse_index")
TRUTH_DIRECTION_COLUMNS = ("azimuth", "zenith")
SHAPES = ("cascade", "track")  # stored as int8 code: index in this tuple
BATCH_FILE_RE = re.compile(r"^batch_(\d+)\.parquet$")


class InputError(ValueError):
    """An input file that cannot be processed; the message is one line and names the file."""


class EventIndex:
    """What a batch's per-event index (``event_id``, ``n_pulses``) gives: its size and its offsets."""

    event_id: np.ndarray
    n_pulses: np.ndarray

    @property
    def n_events(self) -> int:
        return int(self.event_id.shape[0])

    @property
    def offsets(self) -> np.ndarray:
        """(n_events + 1,) start of each event in the flat pulse arrays."""
        return ragged.offsets(self.n_pulses)


@dataclass
class KaggleBatch(EventIndex):
    """One validated batch: flat pulses plus per-event index and (optional) truth."""

    batch_id: int
    source: str
    event_id: np.ndarray          # (n_events,) int64
    n_pulses: np.ndarray          # (n_events,) int64
    sensor_id: np.ndarray         # (n_pulses_total,) int16
    time: np.ndarray              # int64
    charge: np.ndarray            # float64
    auxiliary: np.ndarray         # bool
    azimuth: np.ndarray | None = None
    zenith: np.ndarray | None = None
    energy: np.ndarray | None = None
    shape: np.ndarray | None = None  # int8 codes into SHAPES


def meta_path_for(batch_path: Path) -> Path:
    """``<root>/<split>/batch_N.parquet`` -> ``<root>/<split>_meta.parquet``."""
    batch_path = Path(batch_path)
    return batch_path.parent.parent / f"{batch_path.parent.name}_meta.parquet"


def batch_id_of(batch_path: Path) -> int:
    match = BATCH_FILE_RE.match(Path(batch_path).name)
    if not match:
        raise InputError(f"{batch_path}: not a Kaggle batch file name (expected batch_<N>.parquet)")
    return int(match.group(1))


def list_batches(split_dir: Path) -> list[Path]:
    """Batch files of a split directory, ordered by batch number."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: not a directory of batch_<N>.parquet files")
    files = [p for p in split_dir.iterdir() if BATCH_FILE_RE.match(p.name)]
    if not files:
        raise InputError(f"{split_dir}: no batch_<N>.parquet files found")
    return sorted(files, key=batch_id_of)


def find_splits(root: Path) -> list[Path]:
    """Split directories under a Kaggle-layout root (``train/``, ``test/``, ...) that have a meta file.

    ``root`` may also be a split directory itself.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: input directory does not exist")
    if any(BATCH_FILE_RE.match(p.name) for p in root.iterdir()):
        return [root]
    splits = [d for d in sorted(root.iterdir()) if d.is_dir() and meta_path_for(d / "batch_0.parquet").exists()]
    if not splits:
        raise InputError(f"{root}: no <split>/batch_<N>.parquet with a <split>_meta.parquet beside it")
    return splits


def _read_parquet(path: Path, what: str, **kwargs) -> pa.Table:
    if not Path(path).exists():
        raise InputError(f"{path}: {what} file does not exist")
    try:
        return pq.read_table(path, page_checksum_verification=True, **kwargs)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable parquet {what} file ({first_line(err)})") from None


def check_type(type_: pa.DataType, path: Path, name: str, kinds: tuple[str, ...]) -> None:
    """A column of ``type_`` must be one of ``kinds`` (int, float: also int, bool, string)."""
    ok = ((("int" in kinds) and pa.types.is_integer(type_))
          or (("float" in kinds) and (pa.types.is_floating(type_) or pa.types.is_integer(type_)))
          or (("bool" in kinds) and pa.types.is_boolean(type_))
          or (("string" in kinds) and (pa.types.is_string(type_) or pa.types.is_large_string(type_)
                                       or pa.types.is_dictionary(type_))))
    if not ok:
        raise InputError(f"{path}: column '{name}' has type {type_}, expected {' or '.join(kinds)}")


def check_uint64(values, path: Path, name: str) -> None:
    """Read as int64 a value above 2**63 - 1 wraps to a negative one: refuse rather than corrupt."""
    if pa.types.is_uint64(values.type) and len(values):
        largest = pc.max(values).as_py()
        if largest > np.iinfo(np.int64).max:
            raise InputError(f"{path}: column '{name}' is uint64 with value {largest}, beyond the int64 range")


def _check_column(table: pa.Table, path: Path, name: str, kinds: tuple[str, ...]) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise InputError(f"{path}: missing column '{name}'")
    col = table[name]
    check_type(col.type, path, name, kinds)
    if col.null_count:
        raise InputError(f"{path}: column '{name}' has {col.null_count} null value(s)")
    check_uint64(col, path, name)
    return col


def _column(table: pa.Table, path: Path, name: str, kinds: tuple[str, ...]) -> np.ndarray:
    col = _check_column(table, path, name, kinds)
    if "string" in kinds:
        return np.asarray(col.cast(pa.string()).to_pylist(), dtype=object)
    if col.num_chunks == 1:
        return col.chunk(0).to_numpy(zero_copy_only=False)
    return col.to_numpy()


@dataclass
class BatchMeta(EventIndex):
    """One batch's rows of its split's meta file, validated: events in pulse order, truth when known."""

    batch_id: int
    source: str                   # the batch file these rows describe
    event_id: np.ndarray          # (n_events,) int64
    n_pulses: np.ndarray          # (n_events,) int64
    azimuth: np.ndarray | None = None
    zenith: np.ndarray | None = None
    energy: np.ndarray | None = None
    shape: np.ndarray | None = None


def read_meta(meta_path: Path, batch_path: Path, n_rows: int, rows: tuple[int, int] | None = None) -> BatchMeta:
    """Validate the meta rows of ``batch_path`` (a file of ``n_rows`` pulses): index columns, pulse ranges
    that tile the file, unique event_ids, finite truth. ``rows``: the batch's row range in the meta file
    (see :func:`icegrid.kaggle_meta.meta_row_ranges`); without it the file is filtered on batch_id."""
    from icegrid.kaggle_meta import read_meta_batch, read_meta_rows

    batch_id = batch_id_of(batch_path)
    if not Path(meta_path).exists():
        raise InputError(f"{meta_path}: meta file does not exist (needed for {Path(batch_path).name})")
    meta = read_meta_batch(meta_path, batch_id) if rows is None else read_meta_rows(meta_path, rows)
    for name in META_INDEX_COLUMNS:
        _column(meta, meta_path, name, ("int",))
    if rows is not None and not pc.all(pc.equal(meta["batch_id"], batch_id)).as_py():
        raise InputError(f"{meta_path}: rows {rows[0]}..{rows[1] - 1} are not all batch_id {batch_id} "
                         "(planned from another version of the file?)")
    if meta.num_rows == 0:
        raise InputError(f"{meta_path}: no rows for batch_id {batch_id} ({Path(batch_path).name} is an empty batch)")
    meta = meta.sort_by("first_pulse_index")
    event_id = meta["event_id"].to_numpy().astype(np.int64)
    first = meta["first_pulse_index"].to_numpy().astype(np.int64)
    last = meta["last_pulse_index"].to_numpy().astype(np.int64)
    n_pulses = last - first + 1
    contiguous = (first[0] == 0 and last[-1] == n_rows - 1 and (n_pulses >= 1).all()
                  and np.array_equal(first[1:], last[:-1] + 1))
    if not contiguous:
        raise InputError(f"{meta_path}: pulse ranges of batch_id {batch_id} do not tile {Path(batch_path).name} "
                         f"({n_rows} pulses; ranges must run 0..{n_rows - 1} without gaps or overlaps)")
    duplicate = first_duplicate(event_id)
    if duplicate is not None:
        raise InputError(f"{meta_path}: event_id {duplicate} appears more than once in batch_id {batch_id}")
    out = BatchMeta(batch_id=batch_id, source=str(batch_path), event_id=event_id, n_pulses=n_pulses)
    if all(c in meta.column_names for c in TRUTH_DIRECTION_COLUMNS):
        out.azimuth = _finite(meta, meta_path, "azimuth")
        out.zenith = _finite(meta, meta_path, "zenith")
    if "energy" in meta.column_names:
        out.energy = _finite(meta, meta_path, "energy")
    if "shape" in meta.column_names:
        out.shape = shape_codes(_column(meta, meta_path, "shape", ("string",)), meta_path)
    return out


def read_batch(batch_path: Path, meta_path: Path | None = None, n_sensors: int = 5160,
               require_truth: bool = False) -> KaggleBatch:
    """Read and validate one ``batch_<N>.parquet`` with its rows of the split's meta file, into memory.

    Truth columns (azimuth, zenith, energy, shape) are returned when the meta file has them; the Kaggle
    test split has none, which is valid unless ``require_truth``. The checks are those of the streaming
    reader (``icegrid.kaggle_stream``), which preprocessing uses to stay within one chunk of memory.
    """
    from icegrid.kaggle_stream import PulseFile

    batch_path = Path(batch_path)
    meta_path = Path(meta_path) if meta_path is not None else meta_path_for(batch_path)
    pulses = PulseFile(batch_path)
    meta = read_meta(meta_path, batch_path, pulses.n_rows)
    if require_truth and meta.azimuth is None:
        raise InputError(f"{meta_path}: no truth columns (azimuth, zenith)")
    columns = pulses.read_all(meta, meta_path, n_sensors)
    return KaggleBatch(batch_id=meta.batch_id, source=meta.source, event_id=meta.event_id, n_pulses=meta.n_pulses,
                       **columns, azimuth=meta.azimuth, zenith=meta.zenith, energy=meta.energy, shape=meta.shape)


def first_duplicate(values: np.ndarray) -> int | None:
    """The smallest value that occurs more than once in ``values``, or None."""
    ordered = np.sort(values)
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    return int(ordered[same[0]]) if same.size else None


def shape_codes(names: np.ndarray, path: Path | str, error: type[InputError] = InputError) -> np.ndarray:
    """'track'/'cascade' strings -> int8 codes (index in SHAPES); any other value is a one-line error."""
    codes = np.full(names.shape, -1, dtype=np.int8)
    for code, name in enumerate(SHAPES):
        codes[names == name] = code
    if (codes < 0).any():
        raise error(f"{path}: column 'shape' has value {names[codes < 0][0]!r}, expected one of {', '.join(SHAPES)}")
    return codes


def _finite(meta: pa.Table, meta_path: Path, name: str) -> np.ndarray:
    values = _column(meta, meta_path, name, ("float",)).astype(np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"{meta_path}: column '{name}' has NaN or infinite truth values")
    return values


def pulses_table(batch: KaggleBatch) -> pa.Table:
    """The batch's pulses as a Kaggle ``batch_<N>.parquet`` table."""
    return pa.Table.from_arrays([
        pa.array(np.repeat(batch.event_id, batch.n_pulses)),
        pa.array(batch.sensor_id.astype(np.int16, copy=False)),
        pa.array(batch.time.astype(np.int64, copy=False)),
        pa.array(batch.charge.astype(np.float64, copy=False)),
        pa.array(batch.auxiliary.astype(bool, copy=False)),
    ], schema=PULSE_SCHEMA)


def meta_table(batch: KaggleBatch) -> pa.Table:
    """The batch's rows of a Kaggle ``<split>_meta.parquet``."""
    offsets = batch.offsets
    columns = {
        "batch_id": pa.array(np.full(batch.n_events, batch.batch_id, dtype=np.int64)),
        "event_id": pa.array(batch.event_id.astype(np.int64)),
        "first_pulse_index": pa.array(offsets[:-1]),
        "last_pulse_index": pa.array(offsets[1:] - 1),
    }
    if batch.azimuth is not None:
        columns["azimuth"] = pa.array(batch.azimuth.astype(np.float64))
        columns["zenith"] = pa.array(batch.zenith.astype(np.float64))
    if batch.energy is not None:
        columns["energy"] = pa.array(batch.energy.astype(np.float64))
    if batch.shape is not None:
        columns["shape"] = pc.take(pa.array(SHAPES), pa.array(batch.shape.astype(np.int64)))
    return pa.table(columns)


def write_pulses(batch: KaggleBatch, path: Path) -> None:
    """Write a batch file atomically (aside, then rename)."""
    with atomic_path(path) as tmp:
        pq.write_table(pulses_table(batch), tmp, compression="zstd", row_group_size=1 << 20,
                       write_page_checksum=True)   # preprocess verifies them: a damaged page is named
