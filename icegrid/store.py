"""The Zarr (v3) event store: ragged pulses as flat arrays + per-event offsets, truth, geometry, predictions.

Layout (plain zarr, xarray and any Zarr v3 reader can read all of it; dimension names in brackets)::

    <store>/                          group, attrs: icegrid_store_version, shape_codes, chunk_events
      geometry/{sensor_id,x,y,z}      [sensor] the detector the store was built with (row = sensor_id)
      shards/<shard>/                 one group per published shard, attrs: n_events, n_pulses, source,
                                      event_id_range, chunk_events, chunk_pulses, icegrid_complete (the marker)
        events/event_id, batch_id, n_pulses, pulse_start   [event] int64
        events/offset                 [event_edge] (n_events + 1,) int64: the Kaggle pulse index; event i is
                                      pulses offset[i]:offset[i+1] of the source batch file
        events/azimuth, zenith, energy  [event] float64, and events/shape int8 (0 cascade, 1 track), when known
        pulses/sensor_id int16, time int64, charge float64, auxiliary bool   [pulse] Kaggle order, cut in
                                      event chunks (icegrid.shard_arrays): event i is the n_pulses[i] pulses
                                      from pulse_start[i]; after each chunk's last event, padding (sensor_id -1)
        predictions/<model>/          [event] azimuth, zenith float64, kappa float32, [event, xyz] direction;
                                      attrs: model, checkpoint, ..., the marker
      .staging/                       shards and predictions being written (icegrid.staging); never read

Chunk k of every [event] array and of every [pulse] array holds events [k*E, (k+1)*E) (E = chunk_events),
so reading one event reads one chunk of each array. Versions 1 and 2 (one chunk per array, no padding,
no dimension names) are read as such; writing a shard into one turns it into version 3.

Concurrency: any number of writers and readers may work on one store at once, from any host that
mounts it (campaigns, ``icegrid preprocess``, ``icegrid infer``, readers). A group is written under
``.staging/`` by the writer that leases it, sealed with its completeness marker and moved into place
with one ``rename``: a reader sees nothing or the complete group. ``has_shard``/``has_predictions``,
``shards()`` and readers trust a group only when its marker matches its files; a husk is rewritten
by the next writer. Writers of the same group race harmlessly (the content is deterministic: the
first rename wins). ``clean_staging`` may run at any time: it removes only dead writers' entries.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import zarr

from icegrid import integrity, staging
from icegrid.atomic import write_atomic
from icegrid.errors import first_line
from icegrid.geometry import Geometry
from icegrid.kaggle import SHAPES, KaggleBatch
from icegrid.shard_arrays import (CHUNK_EVENTS, PULSE_COLUMNS, SENSOR, ChunkPlan, PulseArrays, ShardData, ShardReader,
                                  StoreError, check_columns, decode_error, memory_chunks, plan_chunks, prefetched,
                                  pulse_nodes, read_compact, stored_plan, write_arrays)

STORE_VERSION = 3          # 3: event-aligned chunks, dimension names, zstd for time and charge
READABLE_VERSIONS = (1, 2, 3)  # 1: no markers (unmarked shards checked structurally); 1, 2: one chunk per array
EVENT_CHUNK = CHUNK_EVENTS  # predictions of shards written before event chunks
TRUTH_COLUMNS = ("azimuth", "zenith", "energy", "shape")
_STAGING = ".staging"
_SHARD_ARRAYS = ("events/event_id", "events/offset", *(f"pulses/{c}" for c in PULSE_COLUMNS))
_PREDICTION_ARRAYS = ("azimuth", "zenith")
_TRUTH_ATTRS = {"azimuth": {"units": "rad"}, "zenith": {"units": "rad"}, "energy": {"units": "GeV"},
                "shape": {"codes": list(SHAPES), "flag_values": list(range(len(SHAPES))),
                          "flag_meanings": " ".join(SHAPES)}}


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
            attrs = dict(self.root.attrs)
        except Exception as err:  # zarr raises JSON, key and value errors alike on a broken document
            raise StoreError(f"{self.path}: unreadable store metadata zarr.json ({first_line(err)})") from None
        version = attrs.get("icegrid_store_version")
        if version is None:
            raise StoreError(f"{self.path}: a zarr group but not an icegrid event store (no icegrid_store_version)")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{self.path}: store version {version!r}; this icegrid reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        self.version = int(version)
        # A store upgraded from version 1 may still hold unmarked shards: they keep their structural check.
        self._first_version = int(attrs.get("icegrid_store_upgraded_from", version))
        self.chunk_events = int(attrs.get("chunk_events", CHUNK_EVENTS))

    # ---- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path | str, geometry: Geometry, chunk_events: int | None = None) -> "EventStore":
        """Create the store (idempotent); an existing store must hold the same geometry, or hold no
        shard yet: then its geometry is replaced (a store made from a bad ``sensor_geometry.csv`` is
        fixed by rerunning with the right one).

        ``chunk_events``: events per chunk of the shards written into a new store (default
        ``$ICEGRID_CHUNK_EVENTS`` or 16384); an existing store keeps its own.
        """
        path = Path(path)
        if (path / "zarr.json").exists():
            store = cls(path)
            if not np.array_equal(store.geometry().xyz, geometry.xyz):
                store._replace_geometry(geometry)
            return store
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreError(f"{path}: exists and is not an icegrid event store (no zarr.json); "
                             "give a new path or remove it")
        chunk_events = _chunk_events_setting(chunk_events)
        try:
            _create_root(path, geometry, chunk_events)
        except OSError as err:
            raise StoreError(f"{path}: cannot create the store ({first_line(err)})") from None
        return cls(path)

    def _replace_geometry(self, geometry: Geometry) -> None:
        """Swap in ``geometry`` (write aside, two renames) when no shard could depend on the old one."""
        old = self.n_sensors()
        built = self.shards()   # a husk does not count: the next write redoes it with the new geometry
        if built:
            raise StoreError(f"{self.path}: store was built with a different sensor geometry ({old} sensors; the "
                             f"inputs' has {geometry.n_sensors}) and holds {len(built)} shard(s) made with it "
                             f"(first: {built[0]}): give a new store, or remove its shards/ to replace the geometry")
        tmp = self.path.parent / f".{self.path.name}.geometry.{uuid.uuid4().hex}.partial"
        trash = self.path / f".geometry.{uuid.uuid4().hex}.old"
        try:
            root = zarr.open_group(tmp, mode="w")
            write_arrays(root, _geometry_arrays(geometry), first_dim=SENSOR, extra={"geometry": None})
            os.rename(self.path / "geometry", trash)
            os.rename(tmp / "geometry", self.path / "geometry")
        except OSError as err:
            if trash.exists() and not (self.path / "geometry").exists():
                os.rename(trash, self.path / "geometry")
            raise StoreError(f"{self.path}: cannot replace the store's geometry ({first_line(err)})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
        self.root = zarr.open_group(self.path, mode="r")
        logging.getLogger("icegrid").warning("%s: replaced the store's geometry (%d sensors) with the inputs' (%d): "
                                             "no shard was built with it yet", self.path, old, geometry.n_sensors)

    # ---- reading --------------------------------------------------------------------------------
    def geometry(self) -> Geometry:
        geo = self.root["geometry"]
        return Geometry(x=geo["x"][:], y=geo["y"][:], z=geo["z"][:])

    def n_sensors(self) -> int:
        """Rows of the store's geometry, from one small metadata document (no array is read)."""
        try:
            return int(json.loads((self.path / "geometry" / "x" / "zarr.json").read_bytes())["shape"][0])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            raise StoreError(f"{self.path}: unreadable geometry metadata ({first_line(err)})") from None

    def _legacy(self, arrays: tuple[str, ...]) -> tuple[str, ...] | None:
        return arrays if self._first_version == 1 else None

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

    def _array(self, group: zarr.Group, key: str, where: str) -> zarr.Array:
        try:
            return group[key]
        except Exception as err:
            raise StoreError(f"{self.path}: {where} array '{key}': unreadable ({first_line(err)})") from None

    def _read(self, group: zarr.Group, key: str, where: str, plan: ChunkPlan | None = None) -> np.ndarray:
        """One whole array (a pulse array without its padding, given the shard's ``plan``); a decode or
        checksum error is a one-line StoreError naming the chunk."""
        array = self._array(group, key, where)
        try:
            return array[...] if plan is None else read_compact(array, plan)
        except Exception as err:
            raise decode_error(self.path, where, key, array, err) from None

    def shard_attrs(self, name: str) -> dict:
        return _public(self._shard_group(name).attrs)

    def read_shard(self, name: str, pulses: tuple[str, ...] | None = PULSE_COLUMNS,
                   truth: bool = True) -> ShardData:
        """Read one shard; ``pulses=()`` skips the pulse arrays, ``truth=False`` skips truth."""
        check_columns(pulses)
        group = self._shard_group(name)
        where = f"shard '{name}'"
        data = ShardData(name=name, event_id=self._read(group, "events/event_id", where),
                         offset=self._read(group, "events/offset", where), attrs=_public(group.attrs))
        plan = stored_plan(data.offset, data.attrs)
        for column in pulses or ():
            data.pulses[column] = self._read(group, f"pulses/{column}", where, plan)
        if truth:
            data.truth = self._event_arrays(group, TRUTH_COLUMNS, where)
        return data

    def shard_reader(self, name: str, columns: tuple[str, ...] = PULSE_COLUMNS) -> ShardReader:
        """Event ranges of shard ``name`` on demand (see :class:`ShardReader`)."""
        return ShardReader(self, name, columns)

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

    def prediction_attrs(self, shard: str, model: str) -> dict:
        """The attributes of published predictions (model, checkpoint, checkpoint_sha256, ...); no arrays read."""
        try:
            return _public(zarr.open_group(self._prediction_dir(shard, model), mode="r").attrs)
        except Exception as err:
            raise StoreError(f"{self.path}: shard '{shard}' predictions '{model}': unreadable "
                             f"({first_line(err)})") from None

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
        shard_attrs = self.shard_attrs(shard)
        n_events = int(shard_attrs["n_events"])
        chunk = int(shard_attrs.get("chunk_events", EVENT_CHUNK))
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
            write_arrays(group, {name: (values, chunk, meta) for name, (values, meta) in arrays.items()})
            return group

        return self._write(f"{shard}.{model}", self._prediction_dir(shard, model), what, build,
                           _PREDICTION_ARRAYS, overwrite)

    # ---- shards -----------------------------------------------------------------------------------
    def write_shard(self, name: str, batch: KaggleBatch, attrs: dict | None = None) -> bool:
        """Publish a shard from a validated batch in memory. Returns False if it was already published."""
        pulses = {c: getattr(batch, c) for c in PULSE_COLUMNS}
        return self.write_events(name, batch, lambda plan: memory_chunks(plan, pulses), attrs)

    def write_events(self, name: str, meta, chunks: Callable[[ChunkPlan], Iterable[dict]],
                     attrs: dict | None = None) -> bool:
        """Publish a shard chunk by chunk; False if it was already published.

        ``meta`` has a batch's per-event fields (batch_id, source, event_id, n_pulses, offsets and the
        truth arrays or None: a :class:`~icegrid.kaggle.KaggleBatch` or ``BatchMeta``); ``chunks(plan)``
        yields, for each event chunk of the plan in order, its pulses (PULSE_COLUMNS, compact). An error
        raised by ``chunks`` (bad input found mid-file) publishes nothing and leaves nothing behind.
        """
        if self.has_shard(name):
            return False
        offsets = np.asarray(meta.offsets, dtype=np.int64)
        plan = plan_chunks(offsets, self.chunk_events)
        event_id = np.asarray(meta.event_id, dtype=np.int64)
        shard_attrs = {"n_events": plan.n_events, "n_pulses": plan.n_pulses, "batch_id": meta.batch_id,
                       "source": os.path.basename(meta.source), "has_truth": meta.azimuth is not None,
                       "event_id_range": [int(event_id.min()), int(event_id.max())] if event_id.size else None,
                       "chunk_events": plan.chunk_events, "chunk_pulses": plan.chunk_pulses, **(attrs or {})}
        events = {"event_id": event_id, "batch_id": np.full(plan.n_events, meta.batch_id, dtype=np.int64),
                  "offset": offsets, "n_pulses": np.diff(offsets), "pulse_start": plan.pulse_start()}
        events.update({c: getattr(meta, c) for c in TRUTH_COLUMNS if getattr(meta, c) is not None})

        def build(entry: Path) -> zarr.Group:
            group = zarr.open_group(entry, mode="w", attributes=shard_attrs)
            empty = {"events": None, "pulses": None, "predictions": None, **pulse_nodes(plan, PULSE_COLUMNS)}
            arrays = write_arrays(group, {f"events/{c}": (v, plan.chunk_events, _TRUTH_ATTRS.get(c))
                                          for c, v in events.items()}, extra=empty)
            writer = PulseArrays({c: arrays[f"pulses/{c}"] for c in PULSE_COLUMNS}, plan)
            for values in prefetched(chunks(plan)):
                writer.write(values)
                del values      # before the next is asked for: two chunks alive, not three
            writer.close()
            return group

        if self.version < STORE_VERSION:
            self._upgrade()
        return self._write(name, self.path / "shards" / name, f"shard '{name}'", build, _SHARD_ARRAYS)

    def _upgrade(self) -> None:
        """Mark an older store as version 3 before it gets a version-3 shard, so an older icegrid refuses
        it rather than misreading padded chunks. The root document is replaced in one rename."""
        document = self.path / "zarr.json"
        try:
            meta = json.loads(document.read_bytes())
            meta["attributes"]["icegrid_store_version"] = STORE_VERSION
            meta["attributes"].setdefault("icegrid_store_upgraded_from", self._first_version)
            write_atomic(document, json.dumps(meta, indent=2))
        except OSError as err:
            raise StoreError(f"{self.path}: cannot upgrade the store to version {STORE_VERSION} "
                             f"({first_line(err)})") from None
        self.version = STORE_VERSION

    def _write(self, label: str, target: Path, what: str, build, legacy: tuple[str, ...],
               replace: bool = False) -> bool:
        """Build a group in a leased staging entry, seal it, publish it; OSErrors become one line."""
        legacy = self._legacy(legacy)
        try:
            with staging.Lease(self.path / _STAGING, label) as entry:
                integrity.seal(build(entry), entry)
                return staging.publish(entry, target, self.path / _STAGING,
                                       lambda path, strict=False: integrity.problem(path, None if strict else legacy),
                                       replace)
        except OSError as err:
            raise StoreError(f"{self.path}: cannot write {what} ({first_line(err)})") from None

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


def _create_root(path: Path, geometry: Geometry, chunk_events: int) -> None:
    """Write the root group aside and rename it into place (a concurrent creator's store wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
    try:
        root = zarr.open_group(tmp, mode="w", attributes={
            "icegrid_store_version": STORE_VERSION, "shape_codes": list(SHAPES), "chunk_events": chunk_events})
        write_arrays(root, _geometry_arrays(geometry), first_dim=SENSOR, extra={"geometry": None, "shards": None})
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "zarr.json").exists():
            raise


def _geometry_arrays(geometry: Geometry) -> dict:
    n = geometry.n_sensors
    return {"geometry/sensor_id": (np.arange(n, dtype=np.int16), n, None),
            **{f"geometry/{axis}": (getattr(geometry, axis), n, {"units": "m"}) for axis in ("x", "y", "z")}}


def _chunk_events_setting(chunk_events: int | None) -> int:
    if chunk_events is None:
        raw = os.environ.get("ICEGRID_CHUNK_EVENTS", "")
        try:
            chunk_events = int(raw) if raw.strip() else CHUNK_EVENTS
        except ValueError:
            raise StoreError(f"ICEGRID_CHUNK_EVENTS={raw!r}: not a whole number of events") from None
    if int(chunk_events) < 1:
        raise StoreError(f"chunk_events must be a positive number of events, got {chunk_events}")
    return int(chunk_events)


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
