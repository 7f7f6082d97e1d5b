"""The Zarr (v3) event store: ragged pulses as flat arrays + per-event offsets, truth, geometry, predictions.

Layout (plain zarr can read all of it)::

    <store>/                          group, attrs: icegrid_store_version, shape_codes
      geometry/{sensor_id,x,y,z}      the detector the store was built with (row = sensor_id)
      shards/<shard>/                 one group per published shard, attrs: n_events, n_pulses, source,
                                      event_id_range, icegrid_complete (the marker, see icegrid.integrity)
        events/event_id, batch_id     (n_events,) int64
        events/offset                 (n_events + 1,) int64: event i is pulses[offset[i]:offset[i+1]]
        events/n_pulses               (n_events,) int64
        events/azimuth, zenith, energy  float64, and events/shape int8 (0 cascade, 1 track), when known
        pulses/sensor_id int16, time int64, charge float64, auxiliary bool  (flat, Kaggle order kept)
        predictions/<model>/          azimuth, zenith (n_events,) float64, direction (n_events, 3) float64,
                                      kappa (n_events,) float32; attrs: model, checkpoint, ..., the marker
      .staging/                       shards and predictions being written (icegrid.staging); never read

Concurrency: any number of writers and readers may work on one store at once, from any host that
mounts it (campaigns, ``icegrid preprocess``, ``icegrid infer``, readers). A group is written under
``.staging/`` by the writer that leases it, sealed with its completeness marker and moved into place
with one ``rename``: a reader sees nothing or the complete group. ``has_shard``/``has_predictions``,
``shards()`` and readers trust a group only when its marker matches its files; a husk is rewritten
by the next writer. Writers of the same group race harmlessly (the content is deterministic: the
first rename wins). ``clean_staging`` may run at any time: it removes only dead writers' entries.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from icegrid import integrity, staging
from icegrid.errors import first_line
from icegrid.geometry import Geometry
from icegrid.kaggle import SHAPES, KaggleBatch

STORE_VERSION = 2          # 2: completeness markers, crc32c on every array, leased staging
READABLE_VERSIONS = (1, 2)  # a version-1 store is read (its unmarked shards checked structurally) and extended
PULSE_CHUNK = 1 << 21
EVENT_CHUNK = 1 << 18
PULSE_COLUMNS = ("sensor_id", "time", "charge", "auxiliary")
TRUTH_COLUMNS = ("azimuth", "zenith", "energy", "shape")
_STAGING = ".staging"
_SHARD_ARRAYS = ("events/event_id", "events/offset", *(f"pulses/{c}" for c in PULSE_COLUMNS))
_PREDICTION_ARRAYS = ("azimuth", "zenith")


class StoreError(RuntimeError):
    """A store that is missing, foreign, damaged, unwritable, or asked for something it does not hold."""


def _compressor(dtype: np.dtype) -> list:
    # Blosc lz4 level 1 with bit-shuffle: of the codecs measured on a 52 M-pulse batch it wrote fastest
    # (1.2 s vs 3.1 s for zstd-1, 1.7 s for lz4-5) at 1.4x the parquet file's size; speed is what keeps
    # preprocessing within a small factor of a bare parquet read. crc32c last: a changed or cut chunk is
    # an error before blosc ever sees it (blosc can crash on a truncated buffer).
    return [BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"), Crc32cCodec()]


def _write_array(group: zarr.Group, name: str, data: np.ndarray, chunk: int, attrs: dict | None = None) -> None:
    data = np.ascontiguousarray(data)
    chunks = (max(1, min(chunk, data.shape[0])),) + data.shape[1:]
    # Every chunk is written, even one of fill values only, so the marker can require each of them.
    group.create_array(name, data=data, chunks=chunks, compressors=_compressor(data.dtype),
                       attributes=attrs or {}, config={"write_empty_chunks": True})


@dataclass
class ShardData:
    """One shard read back into memory (only the requested columns are filled)."""

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


def _public(attrs) -> dict:
    return {k: v for k, v in dict(attrs).items() if k != integrity.MARKER}


class EventStore:
    """A handle on an event store directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path}: not an icegrid event store (no zarr.json); create it with "
                             "`icegrid preprocess`")
        try:
            self.root = zarr.open_group(self.path, mode="r")
            version = self.root.attrs.get("icegrid_store_version")
        except Exception as err:  # zarr raises JSON, key and value errors alike on a broken document
            raise StoreError(f"{self.path}: unreadable store metadata zarr.json ({first_line(err)})") from None
        if version is None:
            raise StoreError(f"{self.path}: a zarr group but not an icegrid event store (no icegrid_store_version)")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{self.path}: store version {version!r}; this icegrid reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        self.version = int(version)

    # ---- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path | str, geometry: Geometry) -> "EventStore":
        """Create the store (idempotent); an existing store must hold the same geometry."""
        path = Path(path)
        if (path / "zarr.json").exists():
            store = cls(path)
            if not np.array_equal(store.geometry().xyz, geometry.xyz):
                raise StoreError(f"{path}: store was built with a different sensor geometry")
            return store
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreError(f"{path}: exists and is not an icegrid event store (no zarr.json); "
                             "give a new path or remove it")
        try:
            _create_root(path, geometry)
        except OSError as err:
            raise StoreError(f"{path}: cannot create the store ({first_line(err)})") from None
        return cls(path)

    # ---- reading --------------------------------------------------------------------------------
    def geometry(self) -> Geometry:
        geo = self.root["geometry"]
        return Geometry(x=geo["x"][:], y=geo["y"][:], z=geo["z"][:])

    def _legacy(self, arrays: tuple[str, ...]) -> tuple[str, ...] | None:
        return arrays if self.version == 1 else None

    def shard_problem(self, name: str) -> str | None:
        """Why shard ``name`` is not published and complete (None when it is)."""
        directory = self.path / "shards" / name
        if not directory.is_dir():
            return "not published"
        return self._checked(integrity.problem, directory, self._legacy(_SHARD_ARRAYS))

    def _checked(self, check, *args):
        try:
            return check(*args)
        except OSError as err:  # an unreadable filesystem, not a damaged group: say so, do not rewrite
            raise StoreError(f"{self.path}: cannot read {args[0]} ({first_line(err)})") from None

    def _listed(self, directory: Path) -> list[str]:
        try:
            return sorted(p.name for p in directory.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def shards(self) -> list[str]:
        """Names of the published, complete shards, sorted."""
        return [n for n in self._listed(self.path / "shards") if self.shard_problem(n) is None]

    def damaged_shards(self) -> dict[str, str]:
        """Shard directories that are not complete (husks), with what is wrong; the next write repairs them."""
        problems = {n: self.shard_problem(n) for n in self._listed(self.path / "shards")}
        return {n: p for n, p in problems.items() if p is not None}

    def has_shard(self, name: str) -> bool:
        return self.shard_problem(name) is None

    def _shard_group(self, name: str) -> zarr.Group:
        problem = self.shard_problem(name)
        if problem == "not published":
            raise StoreError(f"{self.path}: no published shard '{name}'")
        if problem:
            raise StoreError(f"{self.path}: shard '{name}' is damaged ({problem}); rerun preprocess to rebuild it")
        try:
            return zarr.open_group(self.path / "shards" / name, mode="r")
        except Exception as err:
            raise StoreError(f"{self.path}: shard '{name}': unreadable zarr.json ({first_line(err)})") from None

    def _read(self, group: zarr.Group, key: str, where: str) -> np.ndarray:
        """One whole array; a decode or checksum error is a one-line StoreError naming the chunk."""
        try:
            array = group[key]
        except Exception as err:
            raise StoreError(f"{self.path}: {where} array '{key}': unreadable ({first_line(err)})") from None
        try:
            return array[...]
        except Exception as err:
            raise StoreError(f"{self.path}: {where} array '{key}' chunk {integrity.bad_chunk(array)}: "
                             f"{first_line(err)}; rerun to rebuild it") from None

    def shard_attrs(self, name: str) -> dict:
        return _public(self._shard_group(name).attrs)

    def read_shard(self, name: str, pulses: tuple[str, ...] | None = PULSE_COLUMNS,
                   truth: bool = True) -> ShardData:
        """Read one shard; ``pulses=()`` skips the pulse arrays, ``truth=False`` skips truth."""
        for column in pulses or ():
            if column not in PULSE_COLUMNS:
                raise StoreError(f"unknown pulse column '{column}' (have {', '.join(PULSE_COLUMNS)})")
        group = self._shard_group(name)
        where = f"shard '{name}'"
        data = ShardData(name=name, event_id=self._read(group, "events/event_id", where),
                         offset=self._read(group, "events/offset", where), attrs=_public(group.attrs))
        for column in pulses or ():
            data.pulses[column] = self._read(group, f"pulses/{column}", where)
        if truth:
            data.truth = self._event_arrays(group, TRUTH_COLUMNS, where)
        return data

    def _event_arrays(self, group: zarr.Group, columns: tuple[str, ...], where: str) -> dict[str, np.ndarray]:
        events = group["events"]
        return {c: self._read(group, f"events/{c}", where) for c in columns if c in events}

    def read_event_arrays(self, name: str, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Only the named per-event arrays of a shard (cheap: no pulses)."""
        return self._event_arrays(self._shard_group(name), columns, f"shard '{name}'")

    # ---- predictions ----------------------------------------------------------------------------
    def _prediction_dir(self, shard: str, model: str) -> Path:
        return self.path / "shards" / shard / "predictions" / model

    def predictions_problem(self, shard: str, model: str) -> str | None:
        directory = self._prediction_dir(shard, model)
        if not directory.is_dir():
            return "not published"
        return self._checked(integrity.problem, directory, self._legacy(_PREDICTION_ARRAYS))

    def prediction_models(self, shard: str) -> list[str]:
        models = self._listed(self.path / "shards" / shard / "predictions")
        return [m for m in models if self.predictions_problem(shard, m) is None]

    def has_predictions(self, shard: str, model: str) -> bool:
        return self.predictions_problem(shard, model) is None

    def read_predictions(self, shard: str, model: str) -> dict[str, np.ndarray]:
        problem = self.predictions_problem(shard, model)
        if problem:
            what = "has no" if problem == "not published" else f"has damaged ({problem})"
            raise StoreError(f"{self.path}: shard '{shard}' {what} predictions from model '{model}'")
        where = f"shard '{shard}' predictions '{model}'"
        try:
            group = zarr.open_group(self._prediction_dir(shard, model), mode="r")
            names = sorted(group.array_keys())
        except Exception as err:
            raise StoreError(f"{self.path}: {where}: unreadable ({first_line(err)})") from None
        out = {name: self._read(group, name, where) for name in names}
        out["attrs"] = _public(group.attrs)
        return out

    def write_predictions(self, shard: str, model: str, azimuth: np.ndarray, zenith: np.ndarray,
                          kappa: np.ndarray | None = None, attrs: dict | None = None,
                          extra: dict[str, np.ndarray] | None = None, overwrite: bool = False) -> bool:
        """Publish one model's predictions for a shard atomically. Returns False if they already existed."""
        n_events = int(self.shard_attrs(shard)["n_events"])
        azimuth = np.asarray(azimuth, dtype=np.float64)
        zenith = np.asarray(zenith, dtype=np.float64)
        if azimuth.shape != (n_events,) or zenith.shape != (n_events,):
            raise StoreError(f"predictions of '{model}' for shard '{shard}' have {azimuth.shape[0]} events, "
                             f"the shard has {n_events}")
        if self.has_predictions(shard, model) and not overwrite:
            return False
        arrays = {"azimuth": (azimuth, {"units": "rad"}), "zenith": (zenith, {"units": "rad"}),
                  "direction": (direction_from_angles(azimuth, zenith), None)}
        if kappa is not None:
            arrays["kappa"] = (np.asarray(kappa, dtype=np.float32), None)
        arrays.update({name: (np.asarray(values), None) for name, values in (extra or {}).items()})
        what = f"predictions of '{model}' for shard '{shard}'"

        def build(entry: Path) -> zarr.Group:
            group = zarr.open_group(entry, mode="w", attributes={"model": model, "n_events": n_events,
                                                                **(attrs or {})})
            for name, (values, meta) in arrays.items():
                _write_array(group, name, values, EVENT_CHUNK, meta)
            return group

        return self._write(f"{shard}.{model}", self._prediction_dir(shard, model), what, build,
                           _PREDICTION_ARRAYS, overwrite)

    # ---- shards -----------------------------------------------------------------------------------
    def write_shard(self, name: str, batch: KaggleBatch, attrs: dict | None = None) -> bool:
        """Publish a shard from a validated batch. Returns False if it was already published."""
        if self.has_shard(name):
            return False
        event_id = batch.event_id.astype(np.int64)
        shard_attrs = {"n_events": batch.n_events, "n_pulses": int(batch.sensor_id.shape[0]),
                       "batch_id": batch.batch_id, "source": os.path.basename(batch.source),
                       "has_truth": batch.azimuth is not None,
                       "event_id_range": [int(event_id.min()), int(event_id.max())] if event_id.size else None,
                       **(attrs or {})}

        def build(entry: Path) -> zarr.Group:
            group = zarr.open_group(entry, mode="w", attributes=shard_attrs)
            events = group.create_group("events")
            _write_array(events, "event_id", event_id, EVENT_CHUNK)
            _write_array(events, "batch_id", np.full(batch.n_events, batch.batch_id, dtype=np.int64), EVENT_CHUNK)
            _write_array(events, "offset", batch.offsets, EVENT_CHUNK)
            _write_array(events, "n_pulses", batch.n_pulses.astype(np.int64), EVENT_CHUNK)
            for column, units in (("azimuth", "rad"), ("zenith", "rad"), ("energy", "GeV"), ("shape", None)):
                values = getattr(batch, column)
                if values is not None:
                    meta = {"units": units} if units else {"codes": list(SHAPES)}
                    _write_array(events, column, values, EVENT_CHUNK, meta)
            pulses = group.create_group("pulses")
            for column in PULSE_COLUMNS:
                _write_array(pulses, column, getattr(batch, column), PULSE_CHUNK)
            group.create_group("predictions")
            return group

        return self._write(name, self.path / "shards" / name, f"shard '{name}'", build, _SHARD_ARRAYS)

    def _write(self, label: str, target: Path, what: str, build, legacy: tuple[str, ...],
               replace: bool = False) -> bool:
        """Build a group in a leased staging entry, seal it, publish it; OSErrors become one line."""
        try:
            with staging.Lease(self.path / _STAGING, label) as entry:
                integrity.seal(build(entry), entry)
                return self._publish(entry, target, what, self._legacy(legacy), replace)
        except OSError as err:
            raise StoreError(f"{self.path}: cannot write {what} ({first_line(err)})") from None

    def _publish(self, entry: Path, target: Path, what: str, legacy, replace: bool) -> bool:
        """Rename the sealed ``entry`` to ``target``; a husk (or, with ``replace``, anything) there is moved aside."""
        problem = integrity.problem(entry)
        if problem:  # a cleaner took the entry while we wrote (we were judged dead): publish nothing
            raise staging.StagingError(errno.ESTALE, f"staging entry disturbed ({problem}), not published")
        target.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(8):
            if target.exists() and (replace or integrity.problem(target, legacy) is not None):
                # Renamed into .staging first: a concurrent reader or writer never sees half of it.
                staging.discard(target, self.path / _STAGING)
            try:
                os.rename(entry, target)
                return True
            except FileNotFoundError:
                if not entry.exists():
                    raise staging.StagingError(errno.ENOENT, "staging entry removed by another process") from None
                raise
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            # Another writer published first (deterministic content): keep theirs unless it is a husk.
            if not replace and integrity.problem(target, legacy) is None:
                return False
        raise StoreError(f"{self.path}: could not publish {what}: other writers keep replacing it")

    def clean_staging(self) -> int:
        """Remove what dead writers left in ``.staging`` (safe while other writers run; see icegrid.staging)."""
        return staging.clean(self.path / _STAGING)

    def summary(self) -> dict:
        shards = self.shards()
        attrs = [self.shard_attrs(s) for s in shards]
        return {"path": str(self.path), "shards": len(shards),
                "events": sum(int(a.get("n_events", 0)) for a in attrs),
                "pulses": sum(int(a.get("n_pulses", 0)) for a in attrs),
                "models": sorted({m for s in shards for m in self.prediction_models(s)}),
                "damaged": sorted(self.damaged_shards())}


def _create_root(path: Path, geometry: Geometry) -> None:
    """Write the root group aside and rename it into place (a concurrent creator's store wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
    try:
        root = zarr.open_group(tmp, mode="w", attributes={
            "icegrid_store_version": STORE_VERSION, "shape_codes": list(SHAPES)})
        geo = root.create_group("geometry")
        _write_array(geo, "sensor_id", np.arange(geometry.n_sensors, dtype=np.int16), EVENT_CHUNK)
        for axis in ("x", "y", "z"):
            _write_array(geo, axis, getattr(geometry, axis), EVENT_CHUNK, {"units": "m"})
        root.create_group("shards")
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "zarr.json").exists():
            raise


def direction_from_angles(azimuth: np.ndarray, zenith: np.ndarray) -> np.ndarray:
    """Unit vector (n, 3) pointing to where the particle came from (Kaggle convention)."""
    sin_zen = np.sin(zenith)
    return np.stack([np.cos(azimuth) * sin_zen, np.sin(azimuth) * sin_zen, np.cos(zenith)], axis=-1)


def angles_from_direction(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(azimuth in [0, 2pi), zenith in [0, pi]) of (n, 3) vectors; zero vectors give (0, pi/2)."""
    direction = np.asarray(direction, dtype=np.float64)
    norm = np.linalg.norm(direction, axis=-1)
    safe = np.where(norm > 0, norm, 1.0)
    z = np.where(norm > 0, direction[..., 2] / safe, 0.0)
    zenith = np.arccos(np.clip(z, -1.0, 1.0))
    azimuth = np.mod(np.arctan2(direction[..., 1], direction[..., 0]), 2 * np.pi)
    return azimuth, zenith
