"""infer_shard on real stores: line-fit and every network, skipping, determinism, empty shards,
one-pulse events, sequence limits and bad checkpoints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NETWORKS
from icegrid.geometry import icecube86
from icegrid.inference import infer_shard
from icegrid.kaggle import KaggleBatch
from icegrid.models import registry
from icegrid.models.layers import opening_angle_np
from icegrid.store import EventStore



@pytest.fixture()
def store(small_store, tmp_path):
    """A private copy of the shared simulated store (inference writes into it)."""
    path = tmp_path / "events.zarr"
    shutil.copytree(small_store, path)
    return path


def _random_store(tmp_path, n_events=120, seed=1):
    """Random pulses with a Kaggle-like (log-normal, median ~60) length spread, one shard."""
    geometry = icecube86()
    path = tmp_path / "random.zarr"
    store = EventStore.create(path, geometry)
    rng = np.random.default_rng(seed)
    n_pulses = np.clip(rng.lognormal(4.0, 0.9, n_events).astype(np.int64), 1, 400)
    total = int(n_pulses.sum())
    batch = KaggleBatch(batch_id=3, source="random", event_id=np.arange(n_events), n_pulses=n_pulses,
                        sensor_id=rng.integers(0, 5160, total).astype(np.int16),
                        time=rng.integers(6000, 20000, total).astype(np.int64), charge=rng.uniform(0.3, 2.0, total),
                        auxiliary=rng.random(total) < 0.5, azimuth=rng.uniform(0, 6, n_events),
                        zenith=rng.uniform(0, 3, n_events))
    store.write_shard("random", batch)
    return path


def _edge_store(tmp_path):
    """A store with an empty shard and a shard of tiny events (1, 2 and 9000 pulses)."""
    geometry = icecube86()
    path = tmp_path / "edge.zarr"
    store = EventStore.create(path, geometry)
    empty = KaggleBatch(batch_id=1, source="empty", event_id=np.zeros(0, np.int64), n_pulses=np.zeros(0, np.int64),
                        sensor_id=np.zeros(0, np.int16), time=np.zeros(0, np.int64), charge=np.zeros(0),
                        auxiliary=np.zeros(0, bool), azimuth=np.zeros(0), zenith=np.zeros(0))
    store.write_shard("empty", empty)
    rng = np.random.default_rng(0)
    n_pulses = np.array([1, 2, 9000])
    total = int(n_pulses.sum())
    tiny = KaggleBatch(batch_id=2, source="tiny", event_id=np.arange(3), n_pulses=n_pulses,
                       sensor_id=rng.integers(0, 5160, total).astype(np.int16),
                       time=np.sort(rng.integers(6000, 20000, total)).astype(np.int64),
                       charge=rng.uniform(0.3, 2.0, total), auxiliary=rng.random(total) < 0.5,
                       azimuth=np.array([0.1, 2.0, 4.0]), zenith=np.array([0.5, 1.5, 2.5]))
    store.write_shard("tiny", tiny)
    return path


def test_linefit_writes_predictions_and_skips_when_done(store):
    shard = EventStore(store).shards()[0]
    summary = infer_shard(store, shard, "linefit")
    assert summary["n_events"] == 400 and not summary["skipped"] and summary["seconds"] > 0
    predictions = EventStore(store).read_predictions(shard, "linefit")
    truth = EventStore(store).read_event_arrays(shard, ("azimuth", "zenith"))
    angle = opening_angle_np(predictions["azimuth"], predictions["zenith"], truth["azimuth"], truth["zenith"])
    assert angle.mean() < 1.2      # a real reconstruction: random directions average pi/2
    assert predictions["kappa"].shape == (400,)
    again = infer_shard(store, shard, "linefit")
    assert again["skipped"]


@pytest.mark.parametrize("name", NETWORKS)
def test_network_inference_is_deterministic_on_cpu(tmp_path, untrained_checkpoints, name):
    store, shard = _random_store(tmp_path), "random"
    first = infer_shard(store, shard, name, untrained_checkpoints[name], batch_size=32)
    assert first["n_events"] == 120
    a = EventStore(store).read_predictions(shard, name)
    infer_shard(store, shard, name, untrained_checkpoints[name], batch_size=32, overwrite=True)
    b = EventStore(store).read_predictions(shard, name)
    for key in ("azimuth", "zenith", "direction", "kappa"):
        assert a[key].tobytes() == b[key].tobytes()
    assert np.isfinite(a["direction"]).all() and (a["kappa"] >= 0).all()
    assert a["attrs"]["checkpoint_sha256"] == registry.file_sha256(untrained_checkpoints[name])


@pytest.mark.parametrize("name", ("linefit",) + NETWORKS)
def test_empty_shard_one_pulse_event_and_sequence_limit(tmp_path, untrained_checkpoints, name):
    path = _edge_store(tmp_path)
    checkpoint = untrained_checkpoints.get(name)
    assert infer_shard(path, "empty", name, checkpoint)["n_events"] == 0
    assert EventStore(path).read_predictions("empty", name)["azimuth"].shape == (0,)
    summary = infer_shard(path, "tiny", name, checkpoint)
    predictions = EventStore(path).read_predictions("tiny", name)
    assert predictions["azimuth"].shape == (3,)
    assert np.isfinite(predictions["azimuth"]).all() and np.isfinite(predictions["zenith"]).all()
    if name != "linefit":   # the 9000-pulse event is above every model's limit
        assert summary["truncated_events"] == 1


def test_all_runs_every_model(tmp_path, untrained_checkpoints, monkeypatch):
    folder = tmp_path / "shipped"
    folder.mkdir()
    for name, path in untrained_checkpoints.items():
        shutil.copy(path, folder / f"{name}-small.pt")
    monkeypatch.setenv("ICEGRID_CHECKPOINTS", str(folder))
    path = _random_store(tmp_path)
    result = infer_shard(path, "random", "all")
    assert sorted(result["models"]) == sorted(registry.MODEL_NAMES)
    assert EventStore(path).prediction_models("random") == sorted(registry.MODEL_NAMES)


def test_bad_checkpoints_give_one_line_errors_naming_the_file(tmp_path, untrained_checkpoints):
    path = _edge_store(tmp_path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(untrained_checkpoints["icemix"].read_bytes()[:2000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint\n")
    wrong_shapes = tmp_path / "wrong_shapes.pt"
    payload = torch.load(untrained_checkpoints["dynedge"], weights_only=True)
    payload["preset_config"] = {**payload["preset_config"], "readout_sizes": [17]}
    torch.save(payload, wrong_shapes)
    cases = [(truncated, "icemix", "not a readable checkpoint"),
             (garbage, "dynedge", "not a readable checkpoint"),
             (untrained_checkpoints["icemix"], "dynedge", "is for model 'icemix', not 'dynedge'"),
             (wrong_shapes, "dynedge", "weights do not fit model 'dynedge'"),
             (tmp_path / "missing.pt", "gpt_boost", "not found")]
    for checkpoint, name, message in cases:
        with pytest.raises(registry.CheckpointError) as err:
            infer_shard(path, "tiny", name, checkpoint)
        text = str(err.value)
        assert text.startswith(str(checkpoint)) and message in text and "\n" not in text
    # The CLI prints it as one line and exits 2.
    icegrid = str(Path(sys.executable).with_name("icegrid"))
    run = subprocess.run([icegrid, "infer", "--store", str(path), "--models", "icemix",
                          "--checkpoint", str(truncated)], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and str(truncated) in run.stderr


@pytest.mark.parametrize("name", NETWORKS)
def test_shipped_small_checkpoints_load_and_predict(tmp_path, name, monkeypatch):
    monkeypatch.delenv("ICEGRID_CHECKPOINTS", raising=False)
    path = registry.default_checkpoint(name)
    assert path is not None and path.name == f"{name}-small.pt"
    assert path.stat().st_size < 4_000_000                       # small enough to ship in git
    loaded = registry.load_checkpoint(path, name)
    assert loaded.preset == "small" and loaded.metrics["val_mean_angle"] < np.pi / 2
    summary = infer_shard(_random_store(tmp_path), "random", name)   # no checkpoint argument: the shipped one
    assert summary["checkpoint"] == str(path) and summary["n_events"] == 120
