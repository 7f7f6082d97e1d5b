"""`icegrid reprocess` as a user runs it: campaign files and flags, local cluster, analysis, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from icegrid.campaign import load_spec, spec_from_flags
from icegrid.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
ICEGRID = [sys.executable, "-m", "icegrid"]


@pytest.mark.parametrize("spec_file", sorted((REPO / "workflows").glob("*.yaml")), ids=lambda p: p.name)
def test_every_workflow_file_validates(spec_file):
    from icegrid.models.registry import expand

    spec = load_spec(spec_file)
    assert spec.inputs and spec.store and expand(spec.models)
    assert all(Path(p).is_absolute() for p in spec.inputs)


def test_campaign_file_errors_are_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [x]\nstore: s.zarr\ncluster: {profile: condor, gpu: 1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: cluster\.gpu: Extra inputs are not permitted$") as err:
        load_spec(bad)
    assert "clusters.yaml" not in str(err.value)   # the user's file is to blame, not icegrid's defaults
    bad.write_text("inputs: [x]\nstore: s.zarr\nretries: {lost: 3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: retries\.lost: Extra inputs"):
        load_spec(bad)
    with pytest.raises(ConfigError, match="give a campaign file, or --input and --store"):
        spec_from_flags({"store": "s.zarr"})


def test_flags_override_the_file_and_mean_the_same(tmp_path):
    spec_file = tmp_path / "c.yaml"
    spec_file.write_text("inputs: [sim]\nstore: a.zarr\nmodels: [linefit]\ncluster: {profile: condor, jobs: 3}\n")
    from_file = load_spec(spec_file, {"store": "b.zarr"}, {"jobs": 5, "memory": "2GiB"})
    from_flags = spec_from_flags({"inputs": ["sim"], "store": "b.zarr", "models": ["linefit"]},
                                 {"profile": "condor", "jobs": 5, "memory": "2GiB"})
    assert from_file == from_flags
    assert from_file.cluster.overrides() == {"jobs": 5, "memory": "2GiB"}


def test_reprocess_local_runs_every_stage_and_a_rerun_redoes_nothing(tmp_path):
    from icegrid.store import EventStore

    sim = subprocess.run(ICEGRID + ["simulate", "--out", "sim", "--batches", "2", "--events-per-batch", "1000",
                                    "--seed", "5"], cwd=tmp_path, capture_output=True, text=True)
    assert sim.returncode == 0, sim.stderr
    (tmp_path / "campaign.yaml").write_text(
        "name: cli-test\ninputs: [sim]\nstore: store.zarr\nmodels: [linefit]\n"
        "cluster: {profile: local, workers: 2, dashboard_address: ':0'}\n")
    first = subprocess.run(ICEGRID + ["reprocess", "campaign.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "all shards done" in first.stdout
    assert "dashboard http://" in first.stderr and "events/s" in first.stderr  # address + progress bars
    summary = json.loads((tmp_path / "store.zarr.campaign" / "summary.json").read_text())
    assert summary["stages"]["preprocess"]["done"] == 2 and summary["stages"]["linefit"]["done"] == 2
    assert (Path(summary["analysis"]["resolution_csv"])).exists()
    store = EventStore(tmp_path / "store.zarr")
    assert store.summary()["events"] == 2000 and store.summary()["models"] == ["linefit"]

    again = subprocess.run(ICEGRID + ["reprocess", "campaign.yaml", "--no-progress"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "store.zarr.campaign" / "summary.json").read_text())
    assert summary["ran"] == [] and len(summary["skipped"]) == 4
    # Nothing to run: no pool is started, and the unchanged analysis is not computed again.
    assert "dashboard" not in again.stderr and "analysis: skipped, the store's" in again.stderr
    assert (Path(summary["analysis"]["resolution_csv"])).exists()

    # --models none: the preprocess stage alone (what `icegrid preprocess` runs); with nothing to score
    # the analysis is skipped with a line, even without --no-analysis.
    only = subprocess.run(ICEGRID + ["reprocess", "--input", "sim", "--store", "only.zarr", "--models", "none",
                                     "--cluster", "local", "--jobs", "1", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert only.returncode == 0, only.stderr[-3000:]
    only_store = EventStore(tmp_path / "only.zarr")
    assert only_store.summary()["events"] == 2000 and only_store.summary()["models"] == []
    assert "FAILED" not in only.stdout and "analysis: skipped (no model" in only.stderr


def test_jobs_flag_on_a_local_campaign_file_means_worker_processes(tmp_path):
    spec_file = tmp_path / "local.yaml"
    spec_file.write_text("inputs: [sim]\nstore: a.zarr\nmodels: [linefit]\ncluster: {profile: local, workers: 2}\n")
    spec = load_spec(spec_file, {}, {"jobs": 1})
    assert spec.cluster.overrides() == {"workers": 1}
    condor = load_spec(spec_file, {}, {"profile": "condor", "jobs": 3})
    assert condor.cluster.overrides() == {"jobs": 3}


def test_progress_on_a_log_file_is_plain_lines_with_the_stage_rate(monkeypatch):
    import io
    import time

    from icegrid.grid.progress import Progress
    from icegrid.grid.summary import StageSummary

    monkeypatch.setenv("ICEGRID_PROGRESS_INTERVAL", "0")
    log = io.StringIO()                     # not a terminal, like a batch job's stderr file
    stage = StageSummary(total=2)
    progress = Progress({"dynedge": stage}, {"dynedge": 2000}, enabled=True, stream=log)
    time.sleep(0.2)                         # the stage queued: its rate must not count this wait
    progress.started("dynedge")
    time.sleep(0.05)
    stage.done = 1
    progress.update("dynedge", 1000, stage, retried=0)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.startswith("progress: dynedge 1/2 shards, 1,000 events, ")
    rate = float(text.split(", ")[-2].split()[0].replace(",", ""))
    assert text.split(", ")[-1].startswith("ETA ") and text.endswith("s\n")
    assert 1000 / 0.3 < rate < 1000 / 0.04       # counted from the stage's start, not the progress' creation


def test_simulate_on_a_log_file_writes_plain_progress_lines(tmp_path):
    import os

    run = subprocess.run(ICEGRID + ["simulate", "--out", str(tmp_path / "sim"), "--batches", "2",
                                    "--events-per-batch", "50"], capture_output=True, text=True,
                         env={**os.environ, "ICEGRID_PROGRESS_INTERVAL": "0"})
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and "\x1b" not in run.stderr
    assert [line.split(",")[0] for line in run.stderr.splitlines()] == [
        "progress: simulate 1/2 batches", "progress: simulate 2/2 batches"]
