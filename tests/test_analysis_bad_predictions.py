"""Bad `icegrid analyze --predictions/--truth` input is one line naming the file and what is wrong, before
anything is counted: angles in degrees, duplicate event ids (in the predictions or the truth), event ids of
the wrong type. Model names take the aliases every other command accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from icegrid.analysis import AnalysisError, analyze_predictions, load_settings
from icegrid.analysis.from_files import _SeenEvents
from icegrid.cli import main

N = 400
TABLES_ONLY = {"plots": False, "bootstrap": {"resamples": 5}}


def _truth(tmp_path: Path, **replace) -> Path:
    rng = np.random.default_rng(2)
    columns = {"event_id": np.arange(100, 100 + N), "azimuth": rng.uniform(0, 2 * np.pi, N),
               "zenith": np.arccos(rng.uniform(-1, 1, N))} | replace
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def _predictions(tmp_path: Path, name: str = "predictions.parquet", models=("linefit",), **replace) -> Path:
    rng = np.random.default_rng(3)
    parts = []
    for model in models:
        columns = {"event_id": np.arange(100, 100 + N), "azimuth": rng.uniform(0, 2 * np.pi, N),
                   "zenith": np.arccos(rng.uniform(-1, 1, N)), "model": [model] * N} | replace
        parts.append(pa.table(columns))
    path = tmp_path / name
    pq.write_table(pa.concat_tables(parts), path)
    return path


def _cli_error(predictions: Path, truth: Path, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(main, ["analyze", "--predictions", str(predictions), "--truth", str(truth),
                                       "--out", str(out), "--no-plots", "--resamples", "5", *extra])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert not (out / "scores.csv").exists()
    return result.output


@pytest.mark.parametrize("column", ["azimuth", "zenith"])
def test_predictions_in_degrees_are_refused_naming_file_and_column(tmp_path, column):
    rng = np.random.default_rng(4)
    degrees = {"azimuth": rng.uniform(0, 360, N), "zenith": rng.uniform(0, 180, N)}[column]
    predictions = _predictions(tmp_path, **{column: degrees})
    message = _cli_error(predictions, _truth(tmp_path), tmp_path / "out")
    assert str(predictions) in message and f"column '{column}'" in message and "looks like degrees" in message


def test_negative_azimuth_is_out_of_range_but_not_called_degrees(tmp_path):
    predictions = _predictions(tmp_path, azimuth=np.linspace(-3.0, 3.0, N))
    message = _cli_error(predictions, _truth(tmp_path), tmp_path / "out")
    assert "column 'azimuth' has value -3" in message and "outside [0, 2π]" in message
    assert "degrees" not in message


def test_truth_in_degrees_is_refused_naming_the_truth_file(tmp_path):
    truth = _truth(tmp_path, zenith=np.linspace(0, 180, N))
    message = _cli_error(_predictions(tmp_path), truth, tmp_path / "out")
    assert str(truth) in message and "column 'zenith'" in message and "looks like degrees" in message


def test_duplicate_event_ids_are_refused_with_an_example(tmp_path):
    event_id = np.arange(100, 100 + N)
    event_id[7] = event_id[300]  # event 400 twice; event 107 never
    predictions = _predictions(tmp_path, event_id=event_id)
    message = _cli_error(predictions, _truth(tmp_path), tmp_path / "out")
    assert str(predictions) in message and "event_id 400 appears more than once for model 'linefit'" in message

    truth = _truth(tmp_path, event_id=event_id)
    message = _cli_error(_predictions(tmp_path, "ok.parquet"), truth, tmp_path / "out")
    assert str(truth) in message and "duplicate event_id 400" in message


def test_the_same_event_for_two_models_is_no_duplicate_but_across_batches_it_is(tmp_path):
    paths = analyze_predictions(_predictions(tmp_path, models=("linefit", "icemix")), _truth(tmp_path),
                                tmp_path / "out", load_settings(TABLES_ONLY))
    assert {r["model"]: r["n_events"] for r in pacsv.read_csv(paths["scores_csv"]).to_pylist()} == \
        {"icemix": N, "linefit": N}
    # The file is read in batches: a repeat in a later batch is caught as surely as one in the same batch.
    seen = _SeenEvents(tmp_path / "p.parquet", n_truth=10)
    seen.add("linefit", np.array([0, 1, 2]), np.array([100, 101, 102]))
    seen.add("icemix", np.array([2]), np.array([102]))
    with pytest.raises(AnalysisError, match="event_id 102 appears more than once for model 'linefit'"):
        seen.add("linefit", np.array([5, 2]), np.array([105, 102]))


@pytest.mark.parametrize("where", ["predictions", "truth"])
def test_string_event_ids_are_one_line_errors(tmp_path, where):
    strings = pa.array([f"ev{i}" for i in range(N)])
    predictions = _predictions(tmp_path, event_id=strings) if where == "predictions" else _predictions(tmp_path)
    truth = _truth(tmp_path, event_id=strings) if where == "truth" else _truth(tmp_path)
    message = _cli_error(predictions, truth, tmp_path / "out")
    named = predictions if where == "predictions" else truth
    assert str(named) in message and "column 'event_id' has type string, expected integers" in message


def test_float_event_ids_are_one_line_errors(tmp_path):
    floats = _predictions(tmp_path, event_id=np.arange(100, 100 + N, dtype=float))
    message = _cli_error(floats, _truth(tmp_path), tmp_path / "out")
    assert str(floats) in message and "column 'event_id' has type double, expected integers" in message


def test_models_take_the_registry_aliases_and_tags(tmp_path):
    predictions = _predictions(tmp_path, models=("linefit", "icemix", "dynedge", "icemix@retrained"))
    truth = _truth(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["analyze", "--predictions", str(predictions), "--truth", str(truth),
                                       "--out", str(out), "--no-plots", "--resamples", "5",
                                       "--models", "2nd,baseline,2nd@retrained"])
    assert result.exit_code == 0, result.output
    assert [r["model"] for r in pacsv.read_csv(out / "scores.csv").to_pylist()] == \
        ["icemix", "dynedge", "icemix@retrained"]
    message = _cli_error(predictions, truth, tmp_path / "out2", "--models", "1st,linefit")
    assert "edgeconv_transformer" not in message and "no predictions from model(s) 1st" in message
    assert "file has: dynedge, icemix, icemix@retrained, linefit" in message
