"""``icegrid export`` and the Python API (``icegrid.open_store``), on real stores written here.

The store: two train shards with full truth and a test shard without truth whose event ids interleave with
the first train shard's (a store holding two splits, as after preprocessing the Kaggle train and test
folders). Every expected value is read back with ``EventStore`` itself, never through ``icegrid.api``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import icegrid
from conftest import one_line_error
from icegrid.cli import main
from icegrid.geometry import icecube86
from icegrid.kaggle import SHAPES, InputError
from icegrid.linefit import linefit_directions
from icegrid.simulate import simulate_batch
from icegrid.store import EventStore

TRAIN = ("train_batch_000001", "train_batch_000002")
TEST = "test_batch_000001"


def _batch(batch_id: int, n: int, seed: int, event_id: np.ndarray, truth: bool = True):
    batch = dataclasses.replace(simulate_batch(batch_id, n, seed=seed), event_id=event_id.astype(np.int64))
    return batch if truth else dataclasses.replace(batch, azimuth=None, zenith=None, energy=None, shape=None)


def _predict(store: EventStore, shard: str, model: str, seed: int, kappa: bool = True, nan_at: int | None = None):
    n = int(store.shard_attrs(shard)["n_events"])
    rng = np.random.default_rng(seed)
    azimuth, zenith = rng.uniform(0, 2 * np.pi, n), np.arccos(rng.uniform(-1, 1, n))
    if nan_at is not None:
        zenith[nan_at] = np.nan
    store.write_predictions(shard, model, azimuth, zenith, kappa=rng.gamma(2.0, 50.0, n) if kappa else None)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """Train ids even (10^7·batch + 2k), test ids odd inside train batch 1's range: no duplicates, overlap."""
    path = tmp_path_factory.mktemp("export") / "events.zarr"
    store = EventStore.create(path, icecube86())
    for batch_id, shard in zip((1, 2), TRAIN):
        ids = batch_id * 10**7 + 2 * np.arange(150)
        store.write_shard(shard, _batch(batch_id, 150, 5, ids), attrs={"split": "train"})
    store.write_shard(TEST, _batch(1, 120, 6, 10**7 + 2 * np.arange(120)[::-1] + 1, truth=False),
                      attrs={"split": "test"})  # ids descending: the export must sort them
    geometry = store.geometry()
    for i, shard in enumerate((*TRAIN, TEST)):
        azimuth, zenith = linefit_directions(store.read_shard(shard), geometry)
        store.write_predictions(shard, "linefit", azimuth, zenith)
        _predict(store, shard, "icemix", seed=10 + i)
        if shard in TRAIN:
            _predict(store, shard, "icemix@retrained", seed=20 + i)
    _predict(store, TEST, "dynedge", seed=30, nan_at=7)   # only in the test shard, one NaN
    return path


def _expected(store_path, shards, models):
    """Per event_id (sorted): truth and predictions straight from EventStore."""
    store = EventStore(store_path)
    parts = []
    for shard in shards:
        part = store.read_event_arrays(shard, ("event_id", "azimuth", "zenith", "energy", "shape"))
        for model in models:
            stored = store.read_predictions(shard, model)
            for name in ("azimuth", "zenith", "kappa"):
                part[f"{model}_{name}"] = stored.get(name, np.full(part["event_id"].size, np.nan, np.float32))
        parts.append(part)
    names = set().union(*parts)
    n = [p["event_id"].size for p in parts]
    merged = {k: np.concatenate([p[k] if k in p else np.full(m, np.nan) for p, m in zip(parts, n)]) for k in names}
    order = np.argsort(merged["event_id"])
    return {k: v[order] for k, v in merged.items()}


def _cli(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def _equal(a, b):
    return np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64), equal_nan=True)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_table_export_round_trips_predictions_and_truth(store_path, tmp_path, suffix):
    out = tmp_path / f"train{suffix}"
    result = _cli("--store", store_path, "--split", "train", "--models", "linefit,2nd,2nd@retrained", "--out", out)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out) if suffix == ".parquet" else pacsv.read_csv(out)
    models = ("linefit", "icemix", "icemix@retrained")
    assert table.column_names == ["event_id", "true_azimuth", "true_zenith", "true_energy", "true_shape"] + [
        f"{m}_{c}" for m in models for c in ("azimuth", "zenith", "kappa")]
    expected = _expected(store_path, TRAIN, models)
    assert np.array_equal(table["event_id"].to_numpy(), expected["event_id"])      # sorted, every event once
    for name in ("azimuth", "zenith", "energy"):
        assert _equal(table[f"true_{name}"].to_numpy(), expected[name])
    assert table["true_shape"].to_pylist() == [SHAPES[c] for c in expected["shape"]]
    for model in models:
        assert _equal(table[f"{model}_azimuth"].to_numpy(), expected[f"{model}_azimuth"])   # bit for bit
        assert _equal(table[f"{model}_zenith"].to_numpy(), expected[f"{model}_zenith"])
        kappa = table[f"{model}_kappa"].to_numpy(zero_copy_only=False)
        assert _equal(np.asarray(kappa, np.float64).astype(np.float32), expected[f"{model}_kappa"])
    assert table["linefit_kappa"].null_count == table.num_rows        # the line-fit gives no kappa
    if suffix == ".parquet":
        assert pq.ParquetFile(out).num_row_groups == len(TRAIN)       # streamed: one row group per shard
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]    # no temporary file left


def test_whole_store_export_nulls_truth_where_a_shard_has_none(store_path, tmp_path):
    out = tmp_path / "all.parquet"
    assert _cli("--store", store_path, "--models", "linefit,icemix", "--out", out).exit_code == 0
    table = pq.read_table(out)
    expected = _expected(store_path, (*TRAIN, TEST), ("linefit", "icemix"))
    ids = table["event_id"].to_numpy()
    order = np.argsort(ids)
    assert np.array_equal(ids[order], expected["event_id"])
    assert _equal(table["icemix_zenith"].to_numpy()[order], expected["icemix_zenith"])
    test_rows = (ids % 2) == 1                      # the test shard's ids are the odd ones
    assert test_rows.sum() == 120 and table["true_zenith"].null_count == 120
    assert not np.isnan(table["true_zenith"].to_numpy(zero_copy_only=False)[~test_rows]).any()


@pytest.mark.parametrize("where", [("--split", "test"), ()])
def test_kaggle_submission_is_exactly_the_competitions_csv(store_path, tmp_path, where):
    import pandas as pd

    out = tmp_path / "submission.csv"
    assert _cli("--store", store_path, *where, "--models", "2nd", "--format", "kaggle", "--out", out).exit_code == 0
    assert out.read_text().splitlines()[0] == "event_id,azimuth,zenith"   # the sample submission's header
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["event_id", "azimuth", "zenith"]
    assert frame["event_id"].dtype == np.int64 and frame["azimuth"].dtype == frame["zenith"].dtype == np.float64
    shards = (TEST,) if where else (*TRAIN, TEST)
    expected = _expected(store_path, shards, ("icemix",))
    # Sorted by event_id even across the interleaved train and test ids (the in-memory merge).
    assert np.array_equal(frame["event_id"].to_numpy(), expected["event_id"])
    assert np.array_equal(frame["azimuth"].to_numpy(), expected["icemix_azimuth"])
    assert np.array_equal(frame["zenith"].to_numpy(), expected["icemix_zenith"])


def test_an_event_id_in_two_shards_is_one_line(tmp_path):
    path = tmp_path / "twice.zarr"
    store = EventStore.create(path, icecube86())
    ids = 10**7 + np.arange(50)
    for shard, split in (("train_batch_000001", "train"), ("test_batch_000001", "test")):
        store.write_shard(shard, _batch(1, 50, 1, ids), attrs={"split": split})
        _predict(store, shard, "icemix", seed=1)
    for fmt in ("table", "kaggle"):
        result = _cli("--store", path, "--format", fmt, "--out", tmp_path / "x.csv")
        one_line_error(result, f"event_id {10**7}", "test_batch_000001", "train_batch_000001", "--split")
    assert not (tmp_path / "x.csv").exists() and [p.name for p in tmp_path.iterdir()] == ["twice.zarr"]


@pytest.mark.parametrize("args, fragments", [
    (("--models", "nosuch"), ("unknown model 'nosuch'", "linefit")),
    (("--models", "3rd"), ("no predictions from model 'gpt_boost'", "icemix")),
    (("--models", "linefit,icemix", "--format", "kaggle"), ("exactly one model", "got 2")),
    (("--models", "icemix@retrained"), (f"shard '{TEST}' has no predictions from model 'icemix@retrained'",)),
    (("--shard", "train_batch_000009"), ("no published shard 'train_batch_000009'",)),
    (("--split", "val"), ("no shard of split 'val'", "test, train")),
    (("--split", "test", "--models", "baseline", "--format", "kaggle"), ("'dynedge'", "event_id", "NaN")),
])
def test_bad_requests_are_one_line_and_leave_the_old_file(store_path, tmp_path, args, fragments):
    out = tmp_path / "out.csv"
    out.write_text("previous\n")
    one_line_error(_cli("--store", store_path, *args, "--out", out), *fragments)
    assert out.read_text() == "previous\n" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_bad_paths_are_one_line(store_path, tmp_path):
    one_line_error(_cli("--store", store_path, "--out", tmp_path / "missing" / "x.parquet"),
                    "folder", "missing", "does not exist")
    one_line_error(_cli("--store", store_path, "--out", tmp_path / "x.txt"), "unknown output type '.txt'")
    one_line_error(_cli("--store", store_path, "--models", "icemix", "--format", "kaggle",
                         "--out", tmp_path / "x.parquet"), "ending in .csv")
    one_line_error(_cli("--store", tmp_path, "--out", tmp_path / "x.csv"), "not an icegrid event store")
    empty = tmp_path / "empty.zarr"
    EventStore.create(empty, icecube86())
    one_line_error(_cli("--store", empty, "--out", tmp_path / "x.csv"), "no published shards")


def test_open_store_tables_match_the_store(store_path):
    store, raw = icegrid.open_store(store_path), EventStore(store_path)
    assert store.shards == raw.shards() and store.models == ["dynedge", "icemix", "icemix@retrained", "linefit"]
    events = store.events()
    offsets = np.concatenate([np.diff(raw.read_event_arrays(s, ("offset",))["offset"]) for s in store.shards])
    assert events.num_rows == 420 and np.array_equal(events["n_pulses"].to_numpy(), offsets)
    assert set(events["shard"].to_pylist()) == set(store.shards)
    truth = store.truth(TRAIN[1])
    assert truth.column_names == ["event_id", "azimuth", "zenith", "energy", "shape"]
    assert _equal(truth["energy"].to_numpy(), raw.read_event_arrays(TRAIN[1], ("energy",))["energy"])
    pulses, data = store.pulses(TEST), raw.read_shard(TEST, truth=False)
    assert np.array_equal(pulses["time"].to_numpy(), data.pulses["time"])
    assert np.array_equal(pulses["event_id"].to_numpy(), np.repeat(data.event_id, data.n_pulses))
    long = store.predictions("linefit,2nd", shard=list(TRAIN))
    assert long.num_rows == 2 * 300 and sorted(set(long["model"].to_pylist())) == ["icemix", "linefit"]
    per_shard = list(store.iter_shards("table", "2nd@retrained", shard=list(TRAIN)))
    assert [name for name, _ in per_shard] == list(TRAIN) and [t.num_rows for _, t in per_shard] == [150, 150]
    first = raw.read_predictions(TRAIN[0], "icemix@retrained")
    assert np.array_equal(per_shard[0][1]["icemix@retrained_zenith"].to_numpy(), first["zenith"])
    frame = store.table("icemix", shard=TRAIN[0], pandas=True)
    assert list(frame["icemix_azimuth"]) == list(raw.read_predictions(TRAIN[0], "icemix")["azimuth"])
    with pytest.raises(InputError, match=f"shard '{TEST}' has no predictions from model 'icemix@retrained'"):
        store.table("icemix@retrained")
    with pytest.raises(InputError, match="pulses\\(\\) reads one shard"):
        store.pulses(None)


def test_api_tables_are_what_analyze_reads(store_path, tmp_path):
    from icegrid.analysis.from_files import iter_prediction_table, read_truth_table

    store = icegrid.open_store(store_path)
    pq.write_table(store.truth(list(TRAIN)), tmp_path / "truth.parquet")
    pq.write_table(store.predictions("icemix", shard=list(TRAIN)), tmp_path / "predictions.parquet")
    truth = read_truth_table(tmp_path / "truth.parquet")
    assert truth["event_id"].size == 300 and set(truth["shape"]) <= {0, 1}
    chunk = next(iter_prediction_table(tmp_path / "predictions.parquet"))
    assert chunk["event_id"].size == 300 and set(chunk["model"]) == {"icemix"}


def test_pandas_is_optional_with_aone_line_error(store_path, monkeypatch):
    store = icegrid.open_store(store_path)
    monkeypatch.setitem(sys.modules, "pandas", None)   # what `import pandas` meets where it is not installed
    assert store.truth(TEST).num_rows == 120           # Arrow needs no pandas
    with pytest.raises(ImportError) as err:
        store.truth(TEST, pandas=True)
    assert "icegrid[analysis]" in str(err.value) and len(str(err.value).splitlines()) == 1


def test_import_icegrid_stays_cheap(store_path):
    code = ("import sys, icegrid\n"
            "heavy = [m for m in ('torch', 'zarr', 'pyarrow', 'icegrid.api') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            f"icegrid.open_store({str(store_path)!r}).table('icemix')\n"
            "assert 'torch' not in sys.modules  # stored names need no registry\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
