"""Inference throughput per model and preset, and padding efficiency with and without bucketing.

Usage::

    python benchmarks/inference.py [--events 2000] [--full-events 200] [--threads 2] [--seed 5]
                                   [--also icemix:B ...]

Simulates one Kaggle-like shard (icegrid.simulate), writes it to a temporary event store and, in the
same run, measures for every model:
- events/s of ``predict_events`` (the body of ``infer_shard``) on CPU, and on CUDA when a GPU is
  present (named in the output), for the ``small`` preset (shipped checkpoint when there is one)
  and the ``full`` preset (random weights: speed does not depend on their values; fewer events on
  CPU), plus the presets named with ``--also`` (default ``icemix:B``, the 2nd place B size that the
  H100 goal of >= 5,000 events/s is stated for);
- the fraction of real pulses among padded slots for the model's own sequence limit, with sequence
  bucketing (what inference does) and with batches in shard order (no bucketing).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from icegrid.geometry import icecube86
from icegrid.inference import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PAIRS, DEFAULT_MAX_TOKENS, predict_events
from icegrid.models import registry
from icegrid.models.features import bucket_batches, padding_efficiency, select_pulses
from icegrid.simulate import simulate_batch
from icegrid.store import EventStore, ShardData

NETWORKS = ("dynedge", "edgeconv_transformer", "icemix", "gpt_boost")


def subset(data: ShardData, n: int) -> ShardData:
    """The first n events of a shard (pulse arrays cut at the n-th offset)."""
    n = min(n, data.n_events)
    end = int(data.offset[n])
    return ShardData(name=data.name, event_id=data.event_id[:n], offset=data.offset[:n + 1].copy(),
                     pulses={k: v[:end] for k, v in data.pulses.items()}, truth={})


def padding_row(loaded: registry.LoadedModel, data: ShardData) -> tuple[float, float]:
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], loaded.infer_limit,
                              loaded.truncation, seed=0)
    lengths = selection.lengths
    bucketed = bucket_batches(lengths, DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS, max_pairs=DEFAULT_MAX_PAIRS)
    in_order = [np.arange(i, min(i + DEFAULT_BATCH_SIZE, lengths.shape[0]))
                for i in range(0, lengths.shape[0], DEFAULT_BATCH_SIZE)]
    return padding_efficiency(bucketed, lengths), padding_efficiency(in_order, lengths)


def time_model(loaded: registry.LoadedModel, data: ShardData, geometry, device: str) -> float:
    started = time.perf_counter()
    predict_events(loaded, data, geometry, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return data.n_events / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="events for line-fit and small presets")
    parser.add_argument("--full-events", type=int, default=50, help="events for full presets on CPU")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--also", action="append", metavar="MODEL:PRESET",
                        help="more presets to time with random weights (default: icemix:B)")
    args = parser.parse_args()
    extra = [tuple(item.split(":", 1)) for item in (args.also or ["icemix:B"])]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    geometry = icecube86()
    with tempfile.TemporaryDirectory() as tmp:
        store = EventStore.create(Path(tmp) / "bench.zarr", geometry)
        store.write_shard("bench", simulate_batch(1, args.events, args.seed, geometry))
        data = store.read_shard("bench", truth=False)
    n_pulses = np.diff(data.offset)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"shard: {data.n_events} simulated events, pulses per event median {np.median(n_pulses):.0f}, "
          f"mean {n_pulses.mean():.1f}, max {n_pulses.max()}; torch threads {args.threads}")
    if "cuda" in devices:
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    print(f"{'model':<22}{'preset':<8}{'device':<8}{'events':>7}{'events/s':>11}"
          f"{'pad eff bucketed':>18}{'pad eff in order':>18}")

    from icegrid.models.linefit import predict_shard
    started = time.perf_counter()
    predict_shard(data, geometry)
    print(f"{'linefit':<22}{'-':<8}{'cpu':<8}{data.n_events:>7}{data.n_events / (time.perf_counter() - started):>11.0f}"
          f"{'-':>18}{'-':>18}")
    jobs = [(name, preset) for name in NETWORKS for preset in ("small", "full")] + extra
    for name, preset in jobs:
        checkpoint = registry.default_checkpoint(name) if preset == "small" else None
        loaded = registry.load_checkpoint(checkpoint, name) if checkpoint else registry.build(name, preset)
        weights = "trained" if checkpoint else "random"
        bucketed, in_order = padding_row(loaded, data)
        for device in devices:
            n = args.events if (preset == "small" or device != "cpu") else args.full_events
            part = subset(data, n)
            rate = time_model(loaded, part, geometry, device)
            print(f"{name:<22}{preset:<8}{device:<8}{part.n_events:>7}{rate:>11.1f}"
                  f"{bucketed:>18.3f}{in_order:>18.3f}   ({weights} weights, limit {loaded.infer_limit})",
                  flush=True)
        loaded.model.to("cpu")


if __name__ == "__main__":
    main()
