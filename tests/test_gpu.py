"""The CUDA paths (fp16 autocast inference, mixed-precision training). They run where a GPU is
present and are skipped, saying so, on CPU-only machines such as CI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icegrid.inference import predict_events, resolve_model
from icegrid.models import registry
from icegrid.store import EventStore
from icegrid.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

NETWORKS = ("dynedge", "edgeconv_transformer", "icemix", "gpt_boost")


def _angle_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.degrees(np.arccos(np.clip((a * b).sum(1), -1, 1)))


@pytest.mark.parametrize("name", NETWORKS)
def test_cuda_inference_with_autocast_matches_cpu(small_store, name):
    store = EventStore(small_store)
    shard = store.shards()[0]
    data = store.read_shard(shard, truth=False)
    geometry = store.geometry()
    on_cpu, _, _ = predict_events(resolve_model(name, device="cpu"), data, geometry, "cpu")
    on_gpu, kappa, _ = predict_events(resolve_model(name, device="cuda"), data, geometry, "cuda")
    assert np.isfinite(on_gpu).all() and np.isfinite(kappa).all()
    disagreement = _angle_between(on_cpu, on_gpu)
    # fp16 moves a direction by hundredths of a degree; a kNN tie broken the other way moves a few events more.
    assert np.median(disagreement) < 0.5 and np.mean(disagreement > 5.0) < 0.02


def test_cuda_training_with_mixed_precision_gives_a_cpu_loadable_checkpoint(small_store, tmp_path):
    out = tmp_path / "gpu.pt"
    metrics = train(small_store, "icemix", out=out, epochs=1, max_events=64, progress=False, device="cuda")
    assert metrics["finished"] and np.isfinite(metrics["val_mean_angle"])
    loaded = registry.load_checkpoint(out, "icemix", device="cpu")
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
