"""Bad input to the analysis gives one clear line (or a marked empty bin), never a crash or a silent wrong
curve; reconstructions made outside icegrid (--predictions/--truth) give the same table as the store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_analysis_support import make_truth, rotate_away, write_store

from icegrid.analysis import AnalysisError, analyze_predictions, analyze_store, load_settings
from icegrid.cli import main
from icegrid.geometry import icecube86
from icegrid.kaggle import SHAPES, KaggleBatch
from icegrid.store import EventStore, angles_from_direction

TABLES_ONLY = {"plots": False, "bootstrap": {"resamples": 20}}


def _truths_and_predictions(n=3000, shards=2, seed=5):
    rng = np.random.default_rng(seed)
    truths = [make_truth(rng, n, energy_range=(1e4, 1e5)) for _ in range(shards)]
    predictions = {model: [rotate_away(t["direction"], np.radians(sigma) * np.sqrt(-2 * np.log1p(-rng.random(n))),
                                       rng) for t in truths]
                   for model, sigma in (("linefit", 10.0), ("fine", 2.0))}
    return truths, predictions


def _run_cli(*args):
    return CliRunner().invoke(main, ["analyze", *map(str, args)])


def test_store_without_true_directions_is_a_one_line_error(tmp_path):
    # A test-split shard: pulses and predictions, but no truth at all.
    store = EventStore.create(tmp_path / "s.zarr", icecube86())
    n = 50
    store.write_shard("batch_1", KaggleBatch(batch_id=1, source="batch_1.parquet", event_id=np.arange(n),
                                             n_pulses=np.ones(n, np.int64), sensor_id=np.zeros(n, np.int16),
                                             time=np.zeros(n, np.int64), charge=np.ones(n),
                                             auxiliary=np.zeros(n, bool)))
    store.write_predictions("batch_1", "linefit", np.full(n, 1.0), np.full(n, 1.0))
    store = store.path
    with pytest.raises(AnalysisError, match="no true directions") as err:
        analyze_store(store, None, tmp_path / "out", load_settings(TABLES_ONLY))
    assert "\n" not in str(err.value) and "batch_1" in str(err.value)
    result = _run_cli("--store", store, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "no true directions" in result.output


def test_unknown_model_and_store_without_predictions_are_one_line_errors(tmp_path):
    truths, predictions = _truths_and_predictions(n=200, shards=1)
    store = write_store(tmp_path / "s.zarr", truths, predictions)
    result = _run_cli("--store", store, "--models", "fine,icemix", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "icemix" in result.output and "available: fine, linefit" in result.output
    bare = write_store(tmp_path / "bare.zarr", truths, {})
    result = _run_cli("--store", bare, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no model has predictions" in result.output
    assert not (tmp_path / "out" / "resolution.csv").exists()


def test_model_missing_in_some_shards_warns_and_uses_the_others(tmp_path):
    truths, predictions = _truths_and_predictions(n=1000, shards=2)
    predictions["fine"][1] = None
    store = write_store(tmp_path / "s.zarr", truths, predictions)
    lines = []
    paths = analyze_store(store, None, tmp_path / "out", load_settings(TABLES_ONLY), echo=lines.append)
    assert any("'fine'" in line and "1 of 2 shard" in line for line in lines)
    scores = {r["model"]: r["n_events"] for r in pacsv.read_csv(paths["scores_csv"]).to_pylist()}
    assert scores == {"fine": 1000, "linefit": 2000}


def test_nan_predictions_are_counted_out_and_reported_not_drawn(tmp_path):
    truths, predictions = _truths_and_predictions(n=4000, shards=1)
    predictions["fine"][0][:500] = np.nan
    store = write_store(tmp_path / "s.zarr", truths, predictions)
    lines = []
    paths = analyze_store(store, None, tmp_path / "out", load_settings(TABLES_ONLY), echo=lines.append)
    assert any("'fine'" in line and "500 prediction(s) are NaN" in line for line in lines)
    scores = {r["model"]: r for r in pacsv.read_csv(paths["scores_csv"]).to_pylist()}
    assert scores["fine"]["n_events"] == 3500 and np.isfinite(scores["fine"]["kaggle_score_rad"])
    rows = [r for r in pacsv.read_csv(paths["resolution_csv"]).to_pylist() if r["model"] == "fine"]
    assert sum(r["n_events"] for r in rows) == 3500
    assert all(r["mode_deg"] is None or np.isfinite(r["mode_deg"]) for r in rows)


def test_empty_bins_are_marked_and_thin_bins_have_no_mode(tmp_path):
    truths, predictions = _truths_and_predictions(n=300, shards=1)
    store = write_store(tmp_path / "s.zarr", truths, predictions)
    lines = []
    paths = analyze_store(store, ["fine"], tmp_path / "out", load_settings(TABLES_ONLY), echo=lines.append)
    rows = pacsv.read_csv(paths["resolution_csv"]).to_pylist()
    empty = [r for r in rows if r["n_events"] == 0]
    thin = [r for r in rows if 0 < r["n_events"] < 100]
    # 300 events between 10 and 100 TeV: every other energy bin is empty, every bin inside is thin.
    assert empty and all(r["e_hi"] <= 1e4 * 1.0001 or r["e_lo"] >= 1e5 * 0.9999 for r in empty)
    assert len(thin) + len(empty) == len(rows)
    assert thin and all(r["mode_deg"] is None and r["mode_lo_deg"] is None and r["median_deg"] is not None
                        for r in thin)
    assert any("fewer than 100 events" in line for line in lines)


def _write_external(tmp_path, truths, predictions, models=("linefit", "fine")):
    """A predictions parquet (event_id, azimuth, zenith, model) and a Kaggle meta parquet for the same events."""
    event_ids, offset = [], 0
    for truth in truths:
        event_ids.append(np.arange(offset, offset + truth["azimuth"].size))
        offset += truth["azimuth"].size
    event_id = np.concatenate(event_ids)
    meta = pa.table({"batch_id": np.ones(event_id.size, dtype=np.int64), "event_id": event_id,
                     "azimuth": np.concatenate([t["azimuth"] for t in truths]),
                     "zenith": np.concatenate([t["zenith"] for t in truths]),
                     "energy": np.concatenate([t["energy"] for t in truths]),
                     "shape": pa.array(np.asarray(SHAPES)[np.concatenate([t["shape"] for t in truths])])})
    pq.write_table(meta, tmp_path / "meta.parquet")
    parts = []
    for model in models:
        azimuth, zenith = angles_from_direction(np.concatenate(predictions[model]))
        # Shuffled rows: the join is on event_id, not on row order.
        order = np.random.default_rng(1).permutation(event_id.size)
        parts.append(pa.table({"event_id": event_id[order], "azimuth": azimuth[order], "zenith": zenith[order],
                               "model": pa.array([model] * event_id.size)}))
    pq.write_table(pa.concat_tables(parts), tmp_path / "predictions.parquet")
    return tmp_path / "predictions.parquet", tmp_path / "meta.parquet"


def test_external_predictions_give_the_same_table_as_the_store(tmp_path):
    truths, predictions = _truths_and_predictions(n=3000, shards=2)
    store = write_store(tmp_path / "s.zarr", truths, predictions)
    settings = load_settings(TABLES_ONLY)
    from_store = analyze_store(store, None, tmp_path / "a", settings)
    pred_path, meta_path = _write_external(tmp_path, truths, predictions)
    result = _run_cli("--predictions", pred_path, "--truth", meta_path, "--out", tmp_path / "b", "--no-plots",
                      "--resamples", 20)
    assert result.exit_code == 0, result.output
    a = pacsv.read_csv(from_store["resolution_csv"]).to_pylist()
    b = pacsv.read_csv(tmp_path / "b" / "resolution.csv").to_pylist()
    assert len(a) == len(b)
    for row_a, row_b in zip(sorted(a, key=str), sorted(b, key=str)):
        assert row_a.keys() == row_b.keys()
        for key, value in row_a.items():
            assert value == pytest.approx(row_b[key], rel=1e-9) if isinstance(value, float) else value == row_b[key]


def test_external_predictions_with_unknown_events_or_no_directions_are_one_line_errors(tmp_path):
    truths, predictions = _truths_and_predictions(n=500, shards=1)
    pred_path, meta_path = _write_external(tmp_path, truths, predictions)
    meta = pq.read_table(meta_path)
    pq.write_table(meta.slice(0, 400), tmp_path / "short_meta.parquet")
    with pytest.raises(AnalysisError, match=r"event_id\(s\) .* are not in"):
        analyze_predictions(pred_path, tmp_path / "short_meta.parquet", tmp_path / "out", load_settings(TABLES_ONLY))
    pq.write_table(meta.drop(["zenith"]), tmp_path / "no_zenith.parquet")
    result = _run_cli("--predictions", pred_path, "--truth", tmp_path / "no_zenith.parquet", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "no column(s) zenith" in result.output
    assert result.output.strip().count("\n") == 0
    result = _run_cli("--predictions", pred_path, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "--truth" in result.output
    pq.write_table(pa.table({"event_id": [0], "azimuth": [np.nan], "zenith": [0.5]}), tmp_path / "nan.parquet")
    lines = []
    analyze_predictions(tmp_path / "nan.parquet", meta_path, tmp_path / "o2", load_settings(TABLES_ONLY),
                        echo=lines.append)
    assert any("1 prediction(s) are NaN" in line for line in lines)
