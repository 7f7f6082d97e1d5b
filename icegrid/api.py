"""The Python API: ``icegrid.open_store(path)`` -> :class:`Store`, a read-only view of an event store whose
events, truth, pulses and predictions come back as Arrow tables, or pandas DataFrames with ``pandas=True``.

Every reader takes ``shard=``: one shard's name, or None for the whole store (the shards' tables
concatenated). ``Store.iter_shards(what, ...)`` yields ``(shard, table)`` one shard at a time, so memory is
bounded by one shard whatever the store's size. Rows are in the store's order (the input files' order).

Tables (column names are the Kaggle files' where there is one):

    events()       event_id, shard, batch_id, n_pulses
    truth()        event_id, azimuth, zenith [rad], energy [GeV], shape ('cascade' | 'track'), when known;
                   the layout of a Kaggle meta file, so ``analyze --truth`` reads it written to parquet
    pulses(shard)  event_id, sensor_id, time, charge, auxiliary: the Kaggle batch file's layout
    predictions()  event_id, model, azimuth, zenith [rad], kappa (null when the model gives none); long:
                   one row per event and model, the layout ``analyze --predictions`` reads
    table()        one row per event: event_id, true_<column> for the truth there is, and
                   <model>_azimuth, <model>_zenith, <model>_kappa per model (what ``icegrid export`` writes)

Models are named as the store names them (``icemix``, ``icemix@retrained``) or by alias (``2nd``,
``baseline``, ``2nd@retrained``; resolved through :func:`icegrid.models.registry.expand`, imported only
then), or ``all``: every model with predictions in the shards read. A model missing from one of the shards
read is a one-line error naming the shard. pandas is optional (the ``icegrid[analysis]`` extra).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from icegrid.kaggle import SHAPES, InputError
from icegrid.store import PULSE_COLUMNS, TRUTH_COLUMNS, EventStore

PREDICTION_COLUMNS = ("azimuth", "zenith", "kappa")
TRUTH_PREFIX = "true_"
_SHAPE_NAMES = pa.array(SHAPES, pa.string())


def open_store(path: Path | str) -> "Store":
    """Open an event store for reading (a one-line ``StoreError`` if ``path`` is none)."""
    return Store(path)


def to_pandas(table: pa.Table):
    """``table`` as a pandas DataFrame; without pandas a one-line ImportError naming the extra."""
    try:
        import pandas  # noqa: F401  (only to fail with a useful message; pyarrow does the conversion)
    except ImportError:
        raise ImportError("pandas is not installed: pip install 'icegrid[analysis]' "
                          "(or use the Arrow tables without pandas=True)") from None
    return table.to_pandas()


def _out(table: pa.Table, pandas: bool):
    return to_pandas(table) if pandas else table


def _shape_column(codes: np.ndarray) -> pa.DictionaryArray:
    # Dictionary-encoded names: readable in CSV and pandas (a categorical), one byte per event in memory.
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(codes, dtype=np.int8)), _SHAPE_NAMES)


def _truth_column(name: str, values: np.ndarray) -> pa.Array:
    return _shape_column(values) if name == "shape" else pa.array(values)


class Store:
    """A read-only view of an icegrid event store (see the module docstring for the tables)."""

    def __init__(self, path: Path | str):
        self.event_store = EventStore(path)
        self.path = self.event_store.path

    def __repr__(self) -> str:
        return f"icegrid.Store({str(self.path)!r})"

    # ---- what is there ----------------------------------------------------------------------------
    @property
    def shards(self) -> list[str]:
        """Names of the published, complete shards, sorted (read afresh: a campaign may be adding some)."""
        return self.event_store.shards()

    @property
    def models(self) -> list[str]:
        """Every model with predictions in at least one shard, sorted."""
        return sorted({m for s in self.shards for m in self.event_store.prediction_models(s)})

    def summary(self) -> dict:
        """Shards, events, pulses, models and damaged shards (as ``icegrid info`` prints them)."""
        return self.event_store.summary()

    # ---- selection ------------------------------------------------------------------------------------
    def select_shards(self, shard: str | Sequence[str] | None = None) -> list[str]:
        """``shard`` (a name or names; None: all) checked against the published shards."""
        published = self.shards
        if not published:
            raise InputError(f"{self.path}: the store has no published shards (run `icegrid preprocess` first)")
        if shard is None:
            return published
        wanted = [shard] if isinstance(shard, str) else list(shard)
        unknown = [s for s in wanted if s not in published]
        if unknown:
            raise InputError(f"{self.path}: no published shard '{unknown[0]}' (have {_few(published)})")
        return wanted

    def select_models(self, models: str | Sequence[str] | None, shards: Sequence[str]) -> list[str]:
        """``models`` (names, aliases, ``all``/None) resolved against the predictions of ``shards``; every
        shard must have every model (one line naming the first shard that lacks one)."""
        present = {s: self.event_store.prediction_models(s) for s in shards}
        available = sorted({m for names in present.values() for m in names})
        picked = resolve_models(models, available, str(self.path))
        for shard, names in present.items():
            missing = [m for m in picked if m not in names]
            if missing:
                raise InputError(f"{self.path}: shard '{shard}' has no predictions from model '{missing[0]}' "
                                 f"(it has: {', '.join(names) or 'none'}); run `icegrid infer --models "
                                 f"{missing[0]} --shard {shard}` or leave the model out")
        return picked

    # ---- per-shard tables -----------------------------------------------------------------------------
    def _events(self, shard: str) -> pa.Table:
        arrays = self.event_store.read_event_arrays(shard, ("event_id", "batch_id", "offset"))
        n = arrays["event_id"].shape[0]
        columns = {"event_id": arrays["event_id"],
                   "shard": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([shard]))}
        if "batch_id" in arrays:
            columns["batch_id"] = arrays["batch_id"]
        columns["n_pulses"] = np.diff(arrays["offset"])
        return pa.table(columns)

    def _truth(self, shard: str, prefix: str = "") -> pa.Table:
        arrays = self.event_store.read_event_arrays(shard, ("event_id", *TRUTH_COLUMNS))
        columns = {"event_id": arrays.pop("event_id")}
        columns.update({prefix + name: _truth_column(name, arrays[name]) for name in TRUTH_COLUMNS if name in arrays})
        return pa.table(columns)

    def _pulses(self, shard: str) -> pa.Table:
        data = self.event_store.read_shard(shard, pulses=PULSE_COLUMNS, truth=False)
        columns = {"event_id": np.repeat(data.event_id, data.n_pulses)}
        columns.update({name: data.pulses[name] for name in PULSE_COLUMNS})
        return pa.table(columns)

    def _model_columns(self, shard: str, model: str, n_events: int) -> dict[str, pa.Array]:
        """azimuth, zenith, kappa (null-filled when absent) of one model's predictions in a shard."""
        stored = self.event_store.read_predictions(shard, model)
        out = {}
        for name, kind in zip(PREDICTION_COLUMNS, (pa.float64(), pa.float64(), pa.float32())):
            values = stored.get(name)
            if values is not None and values.shape != (n_events,):
                raise InputError(f"{self.path}: shard '{shard}' predictions '{model}' array '{name}' has shape "
                                 f"{values.shape}, the shard has {n_events} events")
            out[name] = pa.nulls(n_events, kind) if values is None else pa.array(values, kind)
        return out

    def _predictions(self, shard: str, models: Sequence[str]) -> pa.Table:
        event_id = self.event_store.read_event_arrays(shard, ("event_id",))["event_id"]
        n = event_id.shape[0]
        parts = []
        for code, model in enumerate(models):
            columns = self._model_columns(shard, model, n)
            parts.append(pa.table({"event_id": event_id,
                                   "model": pa.DictionaryArray.from_arrays(pa.array(np.full(n, code, np.int32)),
                                                                          pa.array(list(models))),
                                   **columns}))
        return pa.concat_tables(parts)

    def shard_table(self, shard: str, models: Sequence[str], *, truth: bool = True) -> pa.Table:
        """``table()`` of one shard for models named as stored (already resolved: no alias, no check)."""
        table = self._truth(shard, TRUTH_PREFIX) if truth else \
            pa.table({"event_id": self.event_store.read_event_arrays(shard, ("event_id",))["event_id"]})
        for model in models:
            for name, values in self._model_columns(shard, model, table.num_rows).items():
                table = table.append_column(f"{model}_{name}", values)
        return table

    # ---- public readers -------------------------------------------------------------------------------
    def _build(self, what: str, shard: str, models: Sequence[str], truth: bool) -> pa.Table:
        if what == "events":
            return self._events(shard)
        if what == "truth":
            return self._truth(shard)
        if what == "pulses":
            return self._pulses(shard)
        if what == "predictions":
            return self._predictions(shard, models)
        return self.shard_table(shard, models, truth=truth)

    def iter_shards(self, what: str = "table", models: str | Sequence[str] | None = None, *,
                    shard: str | Sequence[str] | None = None, truth: bool = True,
                    pandas: bool = False) -> Iterator[tuple[str, object]]:
        """``(shard, table)`` for each shard in turn (memory bounded by one shard). ``what``: ``table``,
        ``events``, ``truth``, ``pulses`` or ``predictions``; models and shards are checked before the first."""
        if what not in ("table", "events", "truth", "pulses", "predictions"):
            raise InputError(f"unknown table '{what}' (have table, events, truth, pulses, predictions)")
        shards = self.select_shards(shard)
        names = self.select_models(models, shards) if what in ("table", "predictions") else []
        for name in shards:
            yield name, _out(self._build(what, name, names, truth), pandas)

    def _all(self, what: str, models, shard, truth: bool, pandas: bool):
        parts = [table for _, table in self.iter_shards(what, models, shard=shard, truth=truth)]
        # "default" promotion: a column only some shards have (truth of one split) is null elsewhere.
        return _out(pa.concat_tables(parts, promote_options="default"), pandas)

    def events(self, shard: str | Sequence[str] | None = None, *, pandas: bool = False):
        """One row per event: event_id, shard, batch_id, n_pulses."""
        return self._all("events", None, shard, True, pandas)

    def truth(self, shard: str | Sequence[str] | None = None, *, pandas: bool = False):
        """event_id and the truth the store has (azimuth, zenith, energy, shape): a Kaggle meta file's columns."""
        return self._all("truth", None, shard, True, pandas)

    def pulses(self, shard: str, *, pandas: bool = False):
        """One shard's pulses in the Kaggle batch layout (a whole store's would not fit in memory)."""
        if not isinstance(shard, str):
            raise InputError(f"{self.path}: pulses() reads one shard: give its name, or use "
                             "iter_shards('pulses') for all of them")
        return self._all("pulses", None, shard, True, pandas)

    def predictions(self, models: str | Sequence[str] | None = None, shard: str | Sequence[str] | None = None,
                    *, pandas: bool = False):
        """Long table: event_id, model, azimuth, zenith, kappa, one row per event and model."""
        return self._all("predictions", models, shard, True, pandas)

    def table(self, models: str | Sequence[str] | None = None, shard: str | Sequence[str] | None = None, *,
              truth: bool = True, pandas: bool = False):
        """Wide table, one row per event: event_id, true_* (with ``truth``) and <model>_azimuth/_zenith/_kappa."""
        return self._all("table", models, shard, truth, pandas)


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def resolve_models(requested: str | Sequence[str] | None, available: Sequence[str], where: str) -> list[str]:
    """Names/aliases/``all`` -> the stored model names, in the order asked, no repeats. A name stored as it
    is wins over its alias meaning; ``2nd@tag`` is ``icemix@tag``. One-line InputError for a name with no
    predictions (naming what there is)."""
    items = ["all"] if requested is None else requested.split(",") if isinstance(requested, str) else list(requested)
    picked: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        matches = _matches(item, available)
        if not matches:
            raise InputError(_missing_model(item, available, where))
        picked.extend(m for m in matches if m not in picked)
    if not picked:
        raise InputError(f"{where}: no model has predictions here; run `icegrid infer` first")
    return picked


def _matches(item: str, available: Sequence[str]) -> list[str]:
    if item.lower() == "all":
        return list(available)
    if item in available:
        return [item]
    return [name for name in _registry_names(item) if name in available]


def _registry_names(name: str) -> list[str]:
    from icegrid.models.registry import expand_tagged  # imports torch: only for a name the store does not hold

    return expand_tagged(name)


def _missing_model(name: str, available: Sequence[str], where: str) -> str:
    have = ", ".join(available) or "none"
    known = _registry_names(name)
    if not known:
        return f"{where}: unknown model '{name}' (models with predictions here: {have})"
    return (f"{where}: no predictions from model '{', '.join(known)}' (models with predictions here: {have}); "
            f"run `icegrid infer --models {name}` first")
