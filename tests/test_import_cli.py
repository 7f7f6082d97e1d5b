"""The whole import path through the real `icegrid` console script, in subprocesses: golden events ->
`icegrid preprocess` -> `icegrid import-weights` (GraphNeT's DynEdge weights) -> `icegrid infer
--checkpoint` -> stored predictions equal to the authors' angles, and the same from a campaign file through
`icegrid reprocess`; bad weight files exit 2 with one
stderr line and write no checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from golden_support import align, expected, family_dir
from icegrid.store import EventStore

FAMILY = "dynedge_graphnet_v1"
ICEGRID = str(Path(sys.executable).with_name("icegrid"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def icegrid(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([ICEGRID, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_preprocess_import_infer_gives_the_authors_angles(tmp_path):
    golden = family_dir(FAMILY)
    store, checkpoint = tmp_path / "S.zarr", tmp_path / "C.pt"
    run = icegrid("preprocess", "--input", golden / "events", "--store", store, "--workers", "1",
                  "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    run = icegrid("import-weights", "--model", "dynedge", "--from", golden / "full" / "weights.pth",
                  "--out", checkpoint, cwd=tmp_path)
    assert run.returncode == 0 and "preset 'kaggle_baseline', 1,348,627 parameters" in run.stdout, run.stderr
    run = icegrid("infer", "--store", store, "--models", "dynedge", "--checkpoint", checkpoint, cwd=tmp_path)
    assert run.returncode == 0 and "320 events" in run.stdout, run.stderr
    events = EventStore(store)
    (shard,) = events.shards()
    predictions = events.read_predictions(shard, "dynedge")
    assert predictions["attrs"]["checkpoint"] == str(checkpoint)
    gold = expected(FAMILY, "full/expected.parquet")
    position = align(events.read_event_arrays(shard, ("event_id",))["event_id"], gold["event_id"])
    np.testing.assert_allclose(predictions["azimuth"][position], gold["azimuth"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(predictions["zenith"][position], gold["zenith"], atol=1e-5, rtol=0)

    # The same checkpoint in a campaign file, run by `icegrid reprocess` on a local Dask cluster.
    spec = tmp_path / "campaign.yaml"
    spec.write_text(f"inputs: [{golden / 'events'}]\nstore: {tmp_path / 'R.zarr'}\nmodels: [baseline]\n"
                    f"checkpoints: {{dynedge: {checkpoint}}}\nanalysis: false\ncluster: {{profile: local, workers: 1}}\n")
    run = icegrid("reprocess", spec, "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    campaign = EventStore(tmp_path / "R.zarr").read_predictions(shard, "dynedge")
    for column in ("azimuth", "zenith", "kappa"):
        np.testing.assert_array_equal(campaign[column], predictions[column])


def test_bad_weight_files_exit_2_with_one_line_and_no_checkpoint(tmp_path):
    full = family_dir(FAMILY) / "full" / "weights.pth"
    state = torch.load(full, weights_only=True)
    (tmp_path / "truncated.pth").write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    renamed = {("_gnn._conv_layers.9.nn.0.weight" if k == "_gnn._conv_layers.3.nn.0.weight" else k): v
               for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    torch.save(dict(state, **{"_tasks.0._affine.weight": torch.zeros(3, 64)}), tmp_path / "reshaped.pth")
    cases = {"truncated": (tmp_path / "truncated.pth", "not a readable torch file"),
             "other_family": (family_dir("icemix_2nd") / "deepice_small" / "weights.pth", "not a GraphNeT DynEdge"),
             "renamed": (tmp_path / "renamed.pth", "missing key '_gnn._conv_layers.3.nn.0.weight'"),
             "reshaped": (tmp_path / "reshaped.pth", "key '_tasks.0._affine.weight' has shape (3, 64)")}
    out = tmp_path / "ckpt"
    running = {case: subprocess.Popen([ICEGRID, "import-weights", "--model", "dynedge", "--from", str(path),
                                       "--out", str(out / f"{case}.pt")], cwd=tmp_path, env=ENV, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for case, (path, _) in cases.items()}
    for case, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        path, message = cases[case]
        assert process.returncode == 2, (case, stderr)
        assert stdout == "" and len(stderr.splitlines()) == 1, (case, stderr)
        assert stderr.startswith(f"icegrid: error: {path}: ") and message in stderr, (case, stderr)
    assert not out.exists() or not any(out.iterdir())
