"""Forward-pass speed under the glibc malloc settings a Dask worker may run with.

Usage::

    python benchmarks/worker_malloc.py [--events 3000] [--repeats 3] [--threads 1]
                                       [--models dynedge:small,gpt_boost:small,dynedge:full]

distributed's nanny exports ``MALLOC_TRIM_THRESHOLD_=65536`` to every worker it spawns. Setting any
``MALLOC_*_THRESHOLD_`` switches off glibc's dynamic mmap threshold, so every allocation over 128 KiB
(every activation tensor of a batch) becomes an mmap/munmap pair and its pages fault in afresh. This
script times ``predict_events`` (the body of ``infer_shard``) in one fresh process per setting, the
settings interleaved over ``--repeats`` rounds, and prints each setting's median time and its ratio to
distributed's default measured in the same run, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "distributed default (TRIM=64 KiB)": {"MALLOC_TRIM_THRESHOLD_": "65536"},
    "glibc default (unset)": {},
    "icegrid (TRIM=128 MiB, MMAP=32 MiB)": {"MALLOC_TRIM_THRESHOLD_": "134217728",
                                            "MALLOC_MMAP_THRESHOLD_": "33554432"},
}


def child(models: list[str], events: int, threads: int) -> dict:
    """Seconds of one predict_events call per model (after one warm-up call), in this process."""
    import torch

    from icegrid.geometry import icecube86
    from icegrid.inference import predict_events, resolve_model
    from icegrid.models import registry
    from icegrid.simulate import simulate_batch
    from icegrid.store import ShardData

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    geometry = icecube86()
    batch = simulate_batch(1, events, seed=5, geometry=geometry)
    data = ShardData(name="bench", event_id=batch.event_id, offset=batch.offsets,
                     pulses={c: getattr(batch, c) for c in ("sensor_id", "time", "charge", "auxiliary")})
    out = {}
    for spec in models:
        name, preset = spec.split(":")
        loaded = resolve_model(name) if preset == "small" else registry.build(name, preset)
        loaded.model.eval()
        predict_events(loaded, data, geometry)
        started = time.perf_counter()
        predict_events(loaded, data, geometry)
        out[spec] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="dynedge:small,gpt_boost:small,dynedge:full")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.split(",")
    if args.child:
        print(json.dumps(child(models, args.events, args.threads)))
        return
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    times: dict[str, dict[str, list[float]]] = {label: {m: [] for m in models} for label in SETTINGS}
    for _ in range(args.repeats):             # interleaved, so drifting load hits every setting alike
        for label, extra in SETTINGS.items():
            run = subprocess.run([sys.executable, __file__, "--child", "--events", str(args.events),
                                  "--threads", str(args.threads), "--models", args.models],
                                 env={**base_env, **extra}, capture_output=True, text=True, check=True)
            for model, seconds in json.loads(run.stdout.strip().splitlines()[-1]).items():
                times[label][model].append(seconds)
    reference = next(iter(SETTINGS))
    print(f"{args.events} events, {args.repeats} runs per setting, {args.threads} torch thread(s); "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for model in models:
        ref = statistics.median(times[reference][model])
        for label in SETTINGS:
            median = statistics.median(times[label][model])
            print(f"  {model:<20} {label:<38} median {median:7.2f} s   x{median / ref:5.2f} of the default")


if __name__ == "__main__":
    main()
