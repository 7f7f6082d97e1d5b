"""Two checkpoints of one model in one store: `icegrid infer --as TAG`, the sha256 guard against silently
keeping another checkpoint's predictions, `--overwrite`, and tagged names in analyze, export and campaigns."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from conftest import one_line_error
from icegrid.cli import main
from icegrid.models import registry
from icegrid.store import EventStore


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two dynedge checkpoints with different (random) weights: different files, different sha256."""
    folder = tmp_path_factory.mktemp("tagged-checkpoints")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = folder / f"dynedge-{seed}.pt"
        registry.save_checkpoint(path, registry.checkpoint_payload(registry.build("dynedge", "small")))
        paths.append(path)
    return paths


@pytest.fixture()
def store(small_store, tmp_path):
    path = tmp_path / "events.zarr"
    shutil.copytree(small_store, path)
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _predictions(store_path, model):
    store = EventStore(store_path)
    return {s: store.read_predictions(s, model) for s in store.shards()}


def test_two_checkpoints_of_one_model_coexist_and_are_compared(store, two_checkpoints, tmp_path):
    first, second = two_checkpoints
    assert _run("infer", "--store", store, "--models", "dynedge", "--checkpoint", first).exit_code == 0
    original = _predictions(store, "dynedge")

    refused = _run("infer", "--store", store, "--models", "baseline", "--checkpoint", second)
    one_line_error(refused, "sha256", "--overwrite", "--as", str(second))
    assert all(np.array_equal(original[s]["azimuth"], p["azimuth"]) for s, p in _predictions(store, "dynedge").items())

    tagged = _run("infer", "--store", store, "--models", "baseline", "--checkpoint", second, "--as", "retrained")
    assert tagged.exit_code == 0, tagged.output
    assert "dynedge@retrained" in tagged.output
    again = _run("infer", "--store", store, "--models", "dynedge", "--checkpoint", second, "--as", "2nd@x")
    one_line_error(again, "--as 2nd@x", "icemix")
    rerun = _run("infer", "--store", store, "--models", "dynedge@retrained", "--checkpoint", second)
    assert rerun.exit_code == 0 and rerun.output.count("skipped (already there)") == 3, rerun.output
    retrained = _predictions(store, "dynedge@retrained")
    for shard, stored in retrained.items():
        assert stored["attrs"]["checkpoint_sha256"] == registry.file_sha256(second)
        assert original[shard]["attrs"]["checkpoint_sha256"] == registry.file_sha256(first)
        assert not np.allclose(stored["azimuth"], original[shard]["azimuth"])

    out = tmp_path / "analysis"
    analysed = _run("analyze", "--store", store, "--out", out, "--no-plots", "--resamples", "2")
    assert analysed.exit_code == 0, analysed.output
    scores = {r["model"]: r for r in pacsv.read_csv(out / "scores.csv").to_pylist()}
    assert set(scores) == {"dynedge", "dynedge@retrained"}
    assert scores["dynedge"]["kaggle_score_rad"] != scores["dynedge@retrained"]["kaggle_score_rad"]

    table = tmp_path / "predictions.parquet"
    exported = _run("export", "--store", store, "--models", "baseline,baseline@retrained", "--out", table)
    assert exported.exit_code == 0, exported.output
    columns = pq.read_table(table).to_pydict()
    store_handle = EventStore(store)
    for model, stored in (("dynedge", original), ("dynedge@retrained", retrained)):
        ids = np.concatenate([store_handle.read_event_arrays(s, ("event_id",))["event_id"] for s in stored])
        azimuth = np.concatenate([p["azimuth"] for p in stored.values()])
        order = np.argsort(ids)
        assert np.array_equal(columns["event_id"], ids[order])
        assert np.array_equal(columns[f"{model}_azimuth"], azimuth[order])

    replaced = _run("infer", "--store", store, "--models", "dynedge", "--checkpoint", second, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    for shard, stored in _predictions(store, "dynedge").items():
        assert stored["attrs"]["checkpoint_sha256"] == registry.file_sha256(second)
        assert np.array_equal(stored["azimuth"], retrained[shard]["azimuth"])


@pytest.mark.parametrize("tag, fragment", [("a/b", "a tag after '@'"), ("", "a tag after '@'"),
                                           ("icemix@x", "names model 'icemix', not 'dynedge'")])
def test_bad_tags_are_one_line(store, two_checkpoints, tag, fragment):
    one_line_error(_run("infer", "--store", store, "--models", "dynedge", "--as", tag or "dynedge@"), fragment)


def test_as_needs_one_model(store):
    one_line_error(_run("infer", "--store", store, "--models", "linefit,dynedge", "--as", "x"), "--as needs exactly one")


def test_a_campaign_runs_tagged_checkpoints_and_refuses_a_silent_mismatch(store, small_dataset, two_checkpoints):
    from icegrid.grid.campaign import run_campaign
    from icegrid.grid.spec import spec_from_flags

    first, second = two_checkpoints

    def spec(models, checkpoints):
        return spec_from_flags({"name": "tags", "inputs": [str(small_dataset)], "store": store, "models": models,
                                "checkpoints": checkpoints, "analysis": False},
                               {"profile": "local", "workers": 1, "threads": 1})

    summary = run_campaign(spec(["baseline", "baseline@retrained"],
                                {"dynedge": str(first), "baseline@retrained": str(second)}),
                           progress=False, echo=lambda line: None)
    assert summary.ok, summary.failures
    assert set(summary.stages) >= {"dynedge", "dynedge@retrained"}
    for model, checkpoint in (("dynedge", first), ("dynedge@retrained", second)):
        for stored in _predictions(store, model).values():
            assert stored["attrs"]["checkpoint_sha256"] == registry.file_sha256(checkpoint)
    with pytest.raises(registry.CheckpointError, match=r"sha256 .*models: \[dynedge@TAG\]"):
        run_campaign(spec(["dynedge"], {"dynedge": str(second)}), progress=False, echo=lambda line: None)
