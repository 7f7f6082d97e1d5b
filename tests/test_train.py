"""icegrid train on a real (simulated) store: checkpoints, resume after an interruption, every
model's stages (stacking, ensemble weights, boosted selectors) and the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from icegrid.inference import infer_shard
from icegrid.models import registry
from icegrid.store import EventStore
from icegrid.train import plan_epoch, split_shards, train
from test_inference import _random_store


@pytest.fixture()
def store(small_store, tmp_path):
    path = tmp_path / "events.zarr"
    shutil.copytree(small_store, path)
    return path


def test_split_is_by_shard():
    assert split_shards(["a", "b", "c", "d", "e"], 0.2) == (["a", "b", "c", "d"], ["e"])
    assert split_shards(["a", "b"], 0.5) == (["a"], ["b"])
    assert split_shards(["a"], 0.2) == (["a"], [])


def test_train_writes_a_small_finished_checkpoint_that_infers(store, tmp_path):
    out = tmp_path / "dynedge.pt"
    metrics = train(store, "dynedge", out=out, epochs=1, max_events=48, progress=False)
    assert metrics["finished"] and metrics["train_shards"] == EventStore(store).shards()[:2]
    assert metrics["val_events"] == 48 and 0.0 < metrics["val_mean_angle"] < np.pi
    payload = torch.load(out, weights_only=True)
    assert payload["train_state"] is None                      # optimizer state dropped when done
    assert payload["preset"] == "small" and payload["features"]["version"] == 1
    assert payload["features"]["time_scale"] == registry.build("dynedge", "small").transform.time_scale
    assert payload["metrics"]["val_mean_angle"] == metrics["val_mean_angle"]
    assert infer_shard(_random_store(tmp_path), "random", "dynedge", out)["n_events"] == 120
    assert train(store, "dynedge", out=out, epochs=1, max_events=48, progress=False)["already_trained"]


def test_fine_tuning_starts_from_a_checkpoints_weights(store, tmp_path):
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    train(store, "dynedge", out=first, epochs=1, max_events=48, progress=False)
    tuned = train(store, "dynedge", out=second, epochs=1, max_events=48, progress=False, init_from=first, seed=9)
    assert tuned["stages"][0] == {"stage": "init_from", "checkpoint": str(first),
                                  "val_mean_angle": torch.load(first, weights_only=True)["metrics"]["val_mean_angle"]}
    with pytest.raises(registry.CheckpointError, match="is for model 'dynedge'"):
        train(store, "icemix", out=tmp_path / "x.pt", epochs=1, max_events=8, progress=False, init_from=first)


def test_interrupted_training_resumes_to_the_same_weights(store, tmp_path):
    common = dict(epochs=2, max_events=48, progress=False, seed=3)
    straight = tmp_path / "straight.pt"
    train(store, "dynedge", out=straight, **common)
    resumed = tmp_path / "resumed.pt"
    first = train(store, "dynedge", out=resumed, max_steps=3, **common)
    assert not first["finished"]
    assert torch.load(resumed, weights_only=True)["train_state"]["batch"] >= 1
    again = train(store, "dynedge", out=resumed, **common)
    assert again["finished"] and again["resumed_from"].startswith("stage 1, epoch ")
    a = torch.load(straight, weights_only=True)["state_dict"]
    b = torch.load(resumed, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name, fitted", [
    ("edgeconv_transformer", "stacker"), ("icemix", "ensemble_weights"), ("gpt_boost", "selectors")])
def test_ensembles_train_all_their_stages(store, tmp_path, name, fitted):
    out = tmp_path / f"{name}.pt"
    metrics = train(store, name, out=out, epochs=1, max_events=40, progress=False)
    stages = [entry["stage"] for entry in metrics["stages"]]
    assert fitted in stages
    loaded = registry.load_checkpoint(out, name)
    if name == "icemix":
        weights = loaded.model.weights
        assert torch.isclose(weights.sum(), torch.tensor(1.0)) and (weights >= 0).all()
    if name == "gpt_boost":
        assert loaded.model.head_selectors[0] is not None     # the HGB selector travels in the checkpoint
    assert infer_shard(_random_store(tmp_path), "random", name, out)["n_events"] == 120


def test_training_batches_are_bucketed_and_respect_the_1st_place_length_cut(store):
    loaded = registry.build("edgeconv_transformer")
    from icegrid.train import load_parts

    parts = load_parts(EventStore(store), loaded, EventStore(store).shards()[:1], loaded.train_limit, 0, None)
    plan = plan_epoch(parts, seed=0, stage_index=0, epoch=0, batch_size=64, max_tokens=None, max_event_pulses=200)
    used = np.concatenate([events for _, events in plan])
    assert (parts[0].n_pulses[used] <= 200).all()
    assert len(used) == int((parts[0].n_pulses[parts[0].events] <= 200).sum())
    again = plan_epoch(parts, 0, 0, 0, 64, None, 200)          # a pure function: resumable
    assert len(plan) == len(again) and all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(plan, again))


def test_cli_train_reports_one_line_and_refuses_a_foreign_checkpoint(store, tmp_path):
    icegrid = str(Path(sys.executable).with_name("icegrid"))
    out = tmp_path / "cli.pt"
    run = subprocess.run([icegrid, "train", "--model", "3rd", "--store", str(store), "--out", str(out),
                          "--epochs", "1", "--max-events", "24"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "validation mean angle" in run.stdout and out.exists()
    clash = subprocess.run([icegrid, "train", "--model", "dynedge", "--store", str(store), "--out", str(out)],
                           capture_output=True, text=True)
    assert clash.returncode == 2 and str(out) in clash.stderr and clash.stderr.strip().count("\n") == 0


def test_train_without_out_writes_under_the_current_directory_and_never_over_a_shipped_checkpoint(
        store, tmp_path, monkeypatch):
    shipped = {p: p.read_bytes() for p in registry.CHECKPOINT_DIR.glob("*-small.pt")}
    assert len(shipped) == 4
    monkeypatch.chdir(tmp_path)
    metrics = train(store, "dynedge", epochs=1, max_events=24, progress=False)
    assert Path(metrics["checkpoint"]) == tmp_path / "checkpoints" / "dynedge-small.pt"
    assert metrics["finished"] and not metrics.get("already_trained")
    with pytest.raises(registry.CheckpointError, match="shipped checkpoints live"):
        train(store, "dynedge", out=registry.CHECKPOINT_DIR / "dynedge-small.pt", epochs=1, progress=False)
    assert {p: p.read_bytes() for p in registry.CHECKPOINT_DIR.glob("*-small.pt")} == shipped
