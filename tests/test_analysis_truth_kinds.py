"""Analysis for every kind of truth. The headline case is the real Kaggle train split: its meta has true
directions but no energy and no shape. A store preprocessed from such Kaggle-layout files must still give
exit 0, ``scores.csv`` (all, up- and down-going), the opening-angle distribution, the cos(zenith)- and
length-binned tables and figures, and one note saying what was skipped. With energy but no shape, resolution
vs energy comes without the track/cascade split."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_analysis_support import rotate_away

from icegrid.analysis import (DISTRIBUTION_COLUMNS, PULSES_COLUMNS, SCORE_COLUMNS, ZENITH_COLUMNS, analyze_predictions,
                              load_settings)
from icegrid.cli import main
from icegrid.linefit import linefit_directions
from icegrid.preprocess import discover_batches, find_geometry, preprocess_shard
from icegrid.simulate import write_dataset
from icegrid.store import EventStore, angles_from_direction, direction_from_angles

SIGMA_DEG = 2.0  # the stand-in reconstruction "icemix": Rayleigh(2°) around the truth, 20 % isotropic


@pytest.fixture(scope="module")
def train_like(tmp_path_factory):
    """Simulated Kaggle-layout files whose meta has been cut down to the real train split's columns, a store
    preprocessed from them, and predictions from the line-fit and from a known-resolution stand-in."""
    root = tmp_path_factory.mktemp("kaggle")
    write_dataset(root, batches=2, events_per_batch=1500, seed=3)
    full_meta = pq.read_table(root / "train_meta.parquet")
    pq.write_table(full_meta.drop(["energy", "shape"]), root / "train_meta.parquet")
    store_path = root.parent / f"{root.name}_events.zarr"
    EventStore.create(store_path, find_geometry(root))
    for batch in discover_batches(root):
        preprocess_shard(batch, store_path)
    store = EventStore(store_path)
    rng = np.random.default_rng(11)
    for shard in store.shards():
        data = store.read_shard(shard)
        store.write_predictions(shard, "linefit", *linefit_directions(data, store.geometry()))
        truth = direction_from_angles(data.truth["azimuth"], data.truth["zenith"])
        n = truth.shape[0]
        vectors = rotate_away(truth, np.radians(SIGMA_DEG) * np.sqrt(-2 * np.log1p(-rng.random(n))), rng)
        isotropic = rng.random(n) < 0.2
        vectors[isotropic] = direction_from_angles(rng.uniform(0, 2 * np.pi, isotropic.sum()),
                                                   np.arccos(rng.uniform(-1, 1, isotropic.sum())))
        store.write_predictions(shard, "icemix", *angles_from_direction(vectors))
    return root, store_path, full_meta


def _truth_and_angles(store_path, model):
    """Every event's truth, length and opening angle (deg), computed here independently of icegrid.analysis."""
    store = EventStore(store_path)
    parts = {"zenith": [], "n_pulses": [], "angle": []}
    for shard in store.shards():
        data = store.read_shard(shard, pulses=())
        truth = direction_from_angles(data.truth["azimuth"], data.truth["zenith"])
        predicted = store.read_predictions(shard, model)["direction"]
        cosine = np.clip(np.sum(truth * predicted, axis=1) / np.linalg.norm(predicted, axis=1), -1, 1)
        parts["angle"].append(np.degrees(np.arccos(cosine)))
        parts["zenith"].append(data.truth["zenith"])
        parts["n_pulses"].append(data.n_pulses)
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.fixture(scope="module")
def analysed(train_like, tmp_path_factory):
    _, store_path, _ = train_like
    out = tmp_path_factory.mktemp("analysis")
    result = CliRunner().invoke(main, ["analyze", "--store", str(store_path), "--models", "2nd,linefit",
                                                       "--out", str(out), "--resamples", "20"])
    return result, out


def test_directions_only_store_exits_0_with_scores_tables_figures_and_one_note(analysed):
    result, out = analysed
    assert result.exit_code == 0, result.output + result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: per-energy")]
    assert len(notes) == 1 and "no energy" in notes[0]
    for name in ("scores.csv", "opening_angle.csv", "opening_angle_distribution.csv", "resolution_zenith.csv",
                 "resolution_pulses.csv", "opening_angle_kde.parquet"):
        assert (out / name).stat().st_size > 0
    assert not (out / "resolution.csv").exists() and not (out / "resolution_vs_energy.png").exists()
    for stem in ("opening_angle", "resolution_vs_zenith", "resolution_vs_pulses"):
        image = matplotlib.image.imread(out / f"{stem}.png")
        assert image.shape[0] > 500 and image.shape[1] > 800
        assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF")


def test_scores_are_the_mean_opening_angle_overall_and_per_direction(train_like, analysed):
    _, store_path, _ = train_like
    _, out = analysed
    scores = pacsv.read_csv(out / "scores.csv")
    assert tuple(scores.column_names) == SCORE_COLUMNS
    rows = {r["model"]: r for r in scores.to_pylist()}
    assert set(rows) == {"icemix", "linefit"}       # "2nd" is the registry's alias of icemix
    for model, row in rows.items():
        events = _truth_and_angles(store_path, model)
        up = events["zenith"] > np.pi / 2
        angle = np.radians(events["angle"])
        assert row["n_events"] == angle.size == 3000 and row["n_up"] == up.sum() and row["n_down"] == (~up).sum()
        assert row["kaggle_score_rad"] == pytest.approx(angle.mean(), rel=1e-6)
        assert row["kaggle_score_up_rad"] == pytest.approx(angle[up].mean(), rel=1e-6)
        assert row["kaggle_score_down_rad"] == pytest.approx(angle[~up].mean(), rel=1e-6)
    assert rows["icemix"]["kaggle_score_rad"] < rows["linefit"]["kaggle_score_rad"]


def test_distribution_zenith_and_pulse_tables_hold_the_exact_counts(train_like, analysed):
    _, store_path, _ = train_like
    _, out = analysed
    settings = load_settings()
    events = _truth_and_angles(store_path, "icemix")
    up = events["zenith"] > np.pi / 2

    distribution = pacsv.read_csv(out / "opening_angle_distribution.csv")
    assert tuple(distribution.column_names) == DISTRIBUTION_COLUMNS
    edges = np.asarray(settings.distribution_edges_deg)
    for direction, pick in (("all", np.ones_like(up)), ("up", up), ("down", ~up)):
        mine = [r for r in distribution.to_pylist() if r["model"] == "icemix" and r["direction"] == direction]
        assert [r["n_events"] for r in mine] == np.histogram(events["angle"][pick], edges)[0].tolist()
        assert mine[-1]["cumulative_fraction"] == pytest.approx(1.0)

    zenith = pacsv.read_csv(out / "resolution_zenith.csv")
    assert tuple(zenith.column_names) == ZENITH_COLUMNS
    mine = [r for r in zenith.to_pylist() if r["model"] == "icemix"]
    assert [r["n_events"] for r in mine] == np.histogram(np.cos(events["zenith"]), settings.zenith.edges())[0].tolist()
    # 300 events per bin, 20 % background: each bin's mode finds the 2° peak; the line-fit's distribution is
    # far wider (its median), though its long tracks give it a sharp primary mode too.
    linefit = {r["cos_zenith_lo"]: r for r in zenith.to_pylist() if r["model"] == "linefit"}
    for row in mine:
        assert abs(row["mode_deg"] / SIGMA_DEG - 1) < 0.3
        assert row["mode_lo_deg"] <= row["mode_deg"] <= row["mode_hi_deg"]
        assert linefit[row["cos_zenith_lo"]]["median_deg"] > 5 * row["median_deg"]

    pulses = pacsv.read_csv(out / "resolution_pulses.csv")
    assert tuple(pulses.column_names) == PULSES_COLUMNS
    pulse_edges = settings.pulses.edges
    for direction, pick in (("up", up), ("down", ~up)):
        mine = [r for r in pulses.to_pylist() if r["model"] == "icemix" and r["direction"] == direction]
        assert [r["n_pulses_lo"] for r in mine] == pulse_edges[:-1]
        assert [r["n_events"] for r in mine] == np.histogram(events["n_pulses"][pick], pulse_edges)[0].tolist()
    # The line-fit needs light along a track: its resolution improves with the event's length.
    linefit = {(r["direction"], r["n_pulses_lo"]): r["mode_deg"] for r in pulses.to_pylist() if r["model"] == "linefit"}
    for direction in ("up", "down"):
        assert linefit[(direction, 30)] > 3 * linefit[(direction, 100)]


def test_predictions_file_with_directions_only_meta_gives_the_store_numbers(train_like, analysed, tmp_path):
    import pyarrow as pa

    root, store_path, _ = train_like
    _, out = analysed
    store = EventStore(store_path)
    parts = []
    for shard in store.shards():
        predicted = store.read_predictions(shard, "icemix")
        parts.append(pa.table({"event_id": store.read_event_arrays(shard, ("event_id",))["event_id"],
                               "azimuth": predicted["azimuth"], "zenith": predicted["zenith"]}))
    pq.write_table(pa.concat_tables(parts), tmp_path / "icemix.parquet")
    lines = []
    paths = analyze_predictions(tmp_path / "icemix.parquet", root / "train_meta.parquet", tmp_path / "out",
                                load_settings({"plots": False, "bootstrap": {"resamples": 20}}), echo=lines.append)
    assert any(line.startswith("note: per-energy resolution skipped") for line in lines)
    from_file = pacsv.read_csv(paths["scores_csv"]).to_pylist()[0]
    from_store = next(r for r in pacsv.read_csv(out / "scores.csv").to_pylist() if r["model"] == "icemix")
    assert from_file.pop("model") == "icemix" and from_store.pop("model") == "icemix"
    assert from_file == pytest.approx(from_store, rel=1e-12)
    # Lengths come from the meta's first/last_pulse_index: the same pulse table as the store's.
    assert pacsv.read_csv(paths["resolution_pulses_csv"])["n_events"].to_pylist() == \
        [r["n_events"] for r in pacsv.read_csv(out / "resolution_pulses.csv").to_pylist() if r["model"] == "icemix"]


def test_energy_without_shape_gives_resolution_vs_energy_without_the_split(train_like, tmp_path):
    root, store_path, full_meta = train_like
    pq.write_table(full_meta.drop(["shape"]), tmp_path / "meta_energy.parquet")
    store = EventStore(store_path)
    import pyarrow as pa

    parts = [pa.table({"event_id": store.read_event_arrays(s, ("event_id",))["event_id"],
                       "azimuth": store.read_predictions(s, "icemix")["azimuth"],
                       "zenith": store.read_predictions(s, "icemix")["zenith"]}) for s in store.shards()]
    pq.write_table(pa.concat_tables(parts), tmp_path / "icemix.parquet")
    lines = []
    paths = analyze_predictions(tmp_path / "icemix.parquet", tmp_path / "meta_energy.parquet", tmp_path / "out",
                                load_settings({"plots": False, "bootstrap": {"resamples": 10}}), echo=lines.append)
    assert any("no track/cascade split" in line for line in lines)
    assert not any("per-energy resolution skipped" in line for line in lines)
    rows = pacsv.read_csv(paths["resolution_csv"]).to_pylist()
    assert {r["shape"] for r in rows} == {"all"} and {r["direction"] for r in rows} == {"up", "down"}
    energy = full_meta["energy"].to_numpy()
    edges = load_settings().energy.edges()
    inside = (energy >= edges[0]) & (energy < edges[-1])
    assert sum(r["n_events"] for r in rows) == inside.sum()
    assert sum(r["mode_deg"] is not None for r in rows) >= 4


def test_a_campaign_on_directions_only_input_writes_its_analysis(train_like, tmp_path):
    import json
    import subprocess
    import sys

    import os

    root, _, _ = train_like
    # Tables only (a user's analysis.yaml): the figures of this path are tested above.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "analysis.yaml").write_text("plots: false\nbootstrap: {resamples: 10}\n")
    run = subprocess.run([sys.executable, "-m", "icegrid", "reprocess", "--input", str(root), "--store", "s.zarr",
                          "--models", "linefit", "--cluster", "local", "--jobs", "1", "--no-progress"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ICEGRID_CONFIG": str(tmp_path / "config")})
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "s.zarr.campaign" / "summary.json").read_text())
    assert "analysis" not in summary["failures"]
    scores = pacsv.read_csv(summary["analysis"]["scores_csv"]).to_pylist()
    assert [r["model"] for r in scores] == ["linefit"] and scores[0]["n_events"] == 3000
    assert "resolution_zenith_csv" in summary["analysis"] and "resolution_csv" not in summary["analysis"]
    assert "per-energy resolution skipped" in run.stdout + run.stderr
