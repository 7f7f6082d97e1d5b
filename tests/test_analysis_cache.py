"""The analysis cache: a rerun on an unchanged store is skipped (one line says so); a changed prediction,
a new shard, another option or --force recompute it."""

from __future__ import annotations

import numpy as np
import pyarrow.csv as pacsv
from click.testing import CliRunner

from icegrid.analysis import analyze_store, load_settings
from icegrid.analysis.cache import KEY_FILE
from icegrid.cli import main
from icegrid.kaggle import KaggleBatch
from icegrid.store import EventStore, angles_from_direction, direction_from_angles
from test_analysis_support import make_truth, rotate_away, write_store

SETTINGS = {"plots": False, "bootstrap": {"resamples": 5}}


def _predictions(rng, truth, sigma_deg):
    angle = np.radians(sigma_deg) * np.sqrt(-2 * np.log1p(-rng.random(truth["azimuth"].shape[0])))
    return rotate_away(truth["direction"], angle, rng)


def _store(tmp_path, shards=2, n=600):
    rng = np.random.default_rng(5)
    truths = [make_truth(rng, n, energy_range=(1e3, 1e4)) for _ in range(shards)]
    return write_store(tmp_path / "s.zarr", truths, {"linefit": [_predictions(rng, t, 10.0) for t in truths]}), rng


def _run(store, out, force=False, **overrides):
    lines = []
    paths = analyze_store(store, None, out, load_settings({**SETTINGS, **overrides}), echo=lines.append, force=force)
    return paths, [line for line in lines if line.startswith("analysis: skipped")]


def test_an_unchanged_store_is_not_analysed_again(tmp_path):
    store, _ = _store(tmp_path)
    out = tmp_path / "out"
    first, skipped = _run(store, out)
    assert not skipped and (out / KEY_FILE).is_file()
    stamps = {label: path.stat().st_mtime_ns for label, path in first.items()}
    again, skipped = _run(store, out)
    assert len(skipped) == 1 and "\n" not in skipped[0] and str(out) in skipped[0]
    assert again == first and {label: path.stat().st_mtime_ns for label, path in again.items()} == stamps
    # Another option, or --force: computed again.
    assert not _run(store, out, min_events=50)[1]
    assert _run(store, out, min_events=50)[1]
    assert not _run(store, out, force=True, min_events=50)[1]


def test_a_changed_prediction_or_a_new_shard_reruns_the_analysis(tmp_path):
    store, rng = _store(tmp_path)
    out = tmp_path / "out"
    _run(store, out)
    before = pacsv.read_csv(out / "scores.csv").to_pylist()[0]["kaggle_score_rad"]
    # Another checkpoint's predictions for one shard (what `infer --overwrite` publishes).
    events = EventStore(store)
    truth = events.read_event_arrays("batch_1", ("azimuth", "zenith"))
    truth["direction"] = direction_from_angles(truth["azimuth"], truth["zenith"])
    azimuth, zenith = angles_from_direction(_predictions(rng, truth, 2.0))
    events.write_predictions("batch_1", "linefit", azimuth, zenith, overwrite=True)
    _, skipped = _run(store, out)
    assert not skipped
    after = pacsv.read_csv(out / "scores.csv").to_pylist()[0]["kaggle_score_rad"]
    assert after < before
    assert _run(store, out)[1]
    # A new shard.
    extra = make_truth(rng, 300, energy_range=(1e3, 1e4))
    write_store(tmp_path / "more.zarr", [extra], {"linefit": [_predictions(rng, extra, 10.0)]})
    data = EventStore(tmp_path / "more.zarr").read_shard("batch_1")
    batch = KaggleBatch(batch_id=3, source="batch_3.parquet", event_id=data.event_id + 10**6,
                        n_pulses=np.diff(data.offset), **data.pulses, **data.truth)
    events.write_shard("batch_3", batch)
    moved = EventStore(tmp_path / "more.zarr").read_predictions("batch_1", "linefit")
    events.write_predictions("batch_3", "linefit", moved["azimuth"], moved["zenith"])
    _, skipped = _run(store, out)
    assert not skipped
    assert pacsv.read_csv(out / "scores.csv").to_pylist()[0]["n_events"] == 1500


def test_icegrid_analyze_says_in_one_line_that_it_skipped(tmp_path):
    store, _ = _store(tmp_path, shards=1)
    args = ["analyze", "--store", str(store), "--out", str(tmp_path / "out"), "--no-plots", "--resamples", "5"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "skipped" not in first.output
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert [line for line in second.output.splitlines() if line.startswith("analysis: skipped")]
    third = CliRunner().invoke(main, args + ["--force"])
    assert third.exit_code == 0 and "analysis: skipped" not in third.output
