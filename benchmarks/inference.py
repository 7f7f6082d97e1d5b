"""Whole-shard inference: events/s, peak RSS and forward calls per model, streaming against the
pre-streaming whole-shard path, in one run.

Usage::

    python benchmarks/inference.py [--shard-events 200000] [--small-shard-events 50000]
                                   [--chunks 4096,16384] [--models linefit,dynedge,...] [--threads 1]
                                   [--legacy-models dynedge,gpt_boost] [--small-legacy] [--shards big,small]
                                   [--skip-plans] [--workdir DIR] [--full-events 0] [--gpu-budget 40G] [--seed 5]

1. Simulates one Kaggle-size shard (icegrid.simulate; 200,000 events, ~44 M pulses) and its first
   ``--small-shard-events`` events as a second shard, into ``--workdir`` (kept, reused when present).
2. For line-fit and every small preset (shipped checkpoint), runs ``infer_shard`` in a fresh child
   process per configuration -- the old whole-shard path (``legacy=True``, for ``--legacy-models``, on
   the big shard unless ``--small-legacy``) and streaming at each ``--chunks`` size, on both shards
   -- and prints events/s, forward calls, the child's peak RSS
   (VmHWM) and its growth over the child's baseline (imports and model loaded), and the
   largest angle between the streaming and the old path's predictions and the share of events
   more than 1e-5 rad apart. Then a verdict per model: the streaming peak on the small vs the big
   shard must not grow by more than 64 MiB and must stay <= 1.5 GiB (issue 13).
3. Forward calls per whole shard for every preset (small, full, ``icemix:B``) under the old fixed
   caps (16,384 tokens, 2**21 pairs) and under the memory budget (the CPU default, and
   ``--gpu-budget`` bytes as a stand-in for a GPU's free memory, at the fp32 cost measured here).
4. With ``--full-events N``: events/s of the full presets (random weights) on the first N events.

Measured (shared 2-core dev machine, no GPU, load average 15-20 from other work, 1 run each, chunks of
16,384, ``taskset -c 1``; children run with glibc's default malloc, not WORKER_MALLOC_ENV): see the README,
"Memory and speed per shard". On the 200,000-event shard dynedge small streamed 1.95x the old path's
events/s (283 vs 145) with 0.83 GiB peak RSS instead of 3.29 GiB, gpt_boost small 2.69x (771 vs 286; 1.06 vs 4.53 GiB); 17 % of its events differ from the old
path by more than 1e-5 rad (up to 2.7 rad): see the README for why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("linefit", "dynedge", "edgeconv_transformer", "icemix", "gpt_boost")
PEAK_LIMIT = 3 << 29            # 1.5 GiB: a worker's peak on a Kaggle-size shard (issue 13)
GROWTH_SLACK = 64 << 20         # a 4x bigger shard may add this much (its event arrays), no more


# ---- the child: one infer_shard call ------------------------------------------------------------------
def peak_rss() -> int:
    """This process's peak resident set (VmHWM; ``ru_maxrss`` would include the parent's at the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from icegrid.inference import infer_shard, resolve_model
    from icegrid.store import EventStore

    resolve_model(spec["model"])
    baseline = peak_rss()
    started = time.perf_counter()
    summary = infer_shard(spec["store"], spec["shard"], spec["model"], overwrite=True,
                          chunk_events=spec["chunk"], legacy=spec["legacy"])
    seconds = time.perf_counter() - started
    peak = peak_rss()
    predictions = EventStore(spec["store"]).read_predictions(spec["shard"], spec["model"])
    np.save(spec["out"], predictions["direction"])
    print(json.dumps({"seconds": seconds, "events_per_s": summary["n_events"] / seconds, "peak": peak,
                      "baseline": baseline, "forward_calls": summary["forward_calls"]}))


def run_child(spec: dict) -> dict:
    run = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    if run.returncode != 0:
        raise SystemExit(f"child {spec['model']} {spec['shard']} chunk {spec['chunk']} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---- setup ----------------------------------------------------------------------------------------------
def make_store(workdir: Path, n_events: int, n_small: int, seed: int) -> tuple[Path, dict[str, int]]:
    """A store holding the simulated shard and its first ``n_small`` events (reused when present)."""
    from icegrid.geometry import icecube86
    from icegrid.kaggle import KaggleBatch
    from icegrid.simulate import simulate_batch
    from icegrid.store import EventStore

    path = workdir / f"bench-{n_events}-{seed}.zarr"
    shards = {f"s{n_events}": n_events, f"s{n_small}": n_small}
    if (path / "zarr.json").exists() and all(EventStore(path).has_shard(s) for s in shards):
        return path, shards
    store = EventStore.create(path, icecube86())
    batch = simulate_batch(1, n_events, seed, icecube86())
    store.write_shard(f"s{n_events}", batch)
    end = int(batch.offsets[n_small])
    head = KaggleBatch(batch_id=2, source="head", event_id=batch.event_id[:n_small],
                       n_pulses=batch.n_pulses[:n_small], sensor_id=batch.sensor_id[:end], time=batch.time[:end],
                       charge=batch.charge[:end], auxiliary=batch.auxiliary[:end])
    store.write_shard(f"s{n_small}", head)
    return path, shards


def angles_to(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Angles (rad) between matching non-zero direction vectors."""
    norm = np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1)
    ok = norm > 0
    cos = np.sum(reference[ok] * other[ok], axis=1) / norm[ok]
    return np.arccos(np.clip(cos, -1.0, 1.0))


# ---- part 2: forward calls from the batch plan -------------------------------------------------------
def forward_calls(n_pulses: np.ndarray, limit: int | None, chunk: int | None, cost=None, max_bytes=None,
                  **caps) -> tuple[int, int]:
    """(forward calls, single-event calls) of a shard: the old plan (``caps``, whole shard) or the
    streaming one (``cost`` and ``max_bytes``, per chunk)."""
    from icegrid.inference import chunk_ranges
    from icegrid.models.features import bucket_batches, inference_batches

    lengths = np.minimum(n_pulses, limit) if limit else n_pulses
    sizes = []
    for a, b in chunk_ranges(lengths.shape[0], chunk):
        part = lengths[a:b][lengths[a:b] > 0]
        batches = (bucket_batches(part, 256, **caps) if cost is None
                   else [e for e, _ in inference_batches(part, 256, None, cost, max_bytes, limit)])
        sizes += [len(e) for e in batches]
    return len(sizes), sum(size == 1 for size in sizes)


def plan_rows(n_pulses: np.ndarray, gpu_budget: int) -> None:
    import torch

    from icegrid.geometry import icecube86
    from icegrid.inference import DEFAULT_CHUNK_EVENTS, LEGACY_MAX_PAIRS, LEGACY_MAX_TOKENS
    from icegrid.models import memory, registry

    print(f"\nforward calls per {n_pulses.shape[0]:,}-event shard (batch size 256; budgets at the fp32 cost "
          f"measured on CPU; chunks of {DEFAULT_CHUNK_EVENTS})")
    print("calls (of them single-event)")
    print(f"{'model':<22}{'preset':<8}{'limit':>6}{'old caps':>16}{'cpu ' + _size(memory.DEFAULT_CPU_BUDGET):>16}"
          f"{'gpu ' + _size(gpu_budget):>16}")
    for name in MODELS[1:]:
        for preset in ("small", "full") + (("B",) if name == "icemix" else ()):
            torch.manual_seed(0)
            loaded = registry.build(name, preset)
            cost = memory.model_cost(loaded, icecube86())
            old = forward_calls(n_pulses, loaded.infer_limit, None, max_tokens=LEGACY_MAX_TOKENS,
                                max_pairs=LEGACY_MAX_PAIRS)
            cpu, gpu = (forward_calls(n_pulses, loaded.infer_limit, DEFAULT_CHUNK_EVENTS, cost=cost, max_bytes=b)
                        for b in (memory.DEFAULT_CPU_BUDGET, gpu_budget))
            cells = "".join(f"{f'{calls} ({single})':>16}" for calls, single in (old, cpu, gpu))
            print(f"{name:<22}{preset:<8}{loaded.infer_limit or '-':>6}{cells}", flush=True)


def _size(n: int) -> str:
    return f"{n / 2**30:.0f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


# ---- part 4: full presets ---------------------------------------------------------------------------------
def full_rows(store: Path, shard: str, n_events: int, threads: int) -> None:
    import torch

    from icegrid.inference import MemoryShard, predict_stream, store_geometry
    from icegrid.models import registry
    from icegrid.store import EventStore

    torch.set_num_threads(threads)
    events = EventStore(store)
    data = MemoryShard(events.read_shard(shard, truth=False)).read(0, n_events)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"\nfull presets, random weights, first {data.n_events} events" +
          (f"; GPU: {torch.cuda.get_device_name(0)}" if "cuda" in devices else ""))
    for name, preset in [(n, "full") for n in MODELS[1:]] + [("icemix", "B")]:
        torch.manual_seed(0)
        loaded = registry.build(name, preset)
        for device in devices:
            started = time.perf_counter()
            result = predict_stream(loaded, MemoryShard(data), store_geometry(events), device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            rate = data.n_events / (time.perf_counter() - started)
            print(f"{name:<22}{preset:<8}{device:<6}{rate:>10.1f} events/s {result.forward_calls:>6} forward calls",
                  flush=True)
        loaded.model.to("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shard-events", type=int, default=200_000)
    parser.add_argument("--small-shard-events", type=int, default=50_000)
    parser.add_argument("--chunks", default="4096,16384", help="comma list of chunk_events to stream with")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--legacy-models", default="dynedge,gpt_boost",
                        help="models also run on the old whole-shard path ('all': every one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icegrid-bench-inference",
                        help="where the simulated store is kept between runs")
    parser.add_argument("--full-events", type=int, default=0)
    parser.add_argument("--gpu-budget", default="40G", help="budget standing in for a GPU's free memory")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--skip-runs", action="store_true", help="only the batch plans (parts 3 and 4)")
    parser.add_argument("--skip-plans", action="store_true", help="no batch plans (part 3)")
    parser.add_argument("--shards", default="big,small", help="which shards to run: big, small or both")
    parser.add_argument("--small-legacy", action="store_true", help="the old path on the small shard too")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    from icegrid.models.memory import parse_bytes

    args.workdir.mkdir(parents=True, exist_ok=True)
    store, shards = make_store(args.workdir, args.shard_events, args.small_shard_events, args.seed)
    from icegrid.store import EventStore
    n_pulses = np.diff(EventStore(store).read_event_arrays(f"s{args.shard_events}", ("offset",))["offset"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; torch threads {args.threads}; store {store}")
    print(f"shard s{args.shard_events}: {n_pulses.shape[0]:,} events, {int(n_pulses.sum()):,} pulses "
          f"(median {np.median(n_pulses):.0f}, max {n_pulses.max()})")
    if not args.skip_runs:
        whole_shard_rows(args, store, shards)
    if not args.skip_plans:
        plan_rows(n_pulses, parse_bytes(args.gpu_budget))
    if args.full_events:
        full_rows(store, f"s{args.shard_events}", args.full_events, args.threads)


def whole_shard_rows(args, store: Path, shards: dict[str, int]) -> None:
    chunks = [int(c) for c in args.chunks.split(",") if c]
    legacy_models = args.models if args.legacy_models == "all" else args.legacy_models
    print(f"\n{'model':<22}{'shard':>9}{'path':>16}{'events/s':>10}{'x old':>7}{'forward':>9}"
          f"{'peak RSS':>10}{'growth':>9}{'max angle':>11}{'> 1e-5 rad':>11}")
    peaks: dict[tuple[str, str], int] = {}          # (model, shard) -> largest streaming peak
    big, small = shards
    chosen = [s for s, key in ((big, "big"), (small, "small")) if key in args.shards.split(",")]
    for model in args.models.split(","):
        for shard in chosen:
            with_old = model in legacy_models.split(",") and (shard == big or args.small_legacy)
            old = [("old whole-shard", None, True)] if with_old else []
            rows = old + [(f"chunks {c}", c, False) for c in chunks]
            reference = old_rate = None
            for label, chunk, legacy in rows:
                out = args.workdir / f"{model}-{shard}-{label.replace(' ', '_')}.npy"
                got = run_child({"store": str(store), "shard": shard, "model": model, "chunk": chunk,
                                 "legacy": legacy, "threads": args.threads, "out": str(out)})
                direction = np.load(out)
                reference = direction if legacy else reference
                old_rate = got["events_per_s"] if legacy else old_rate
                if not legacy:
                    peaks[model, shard] = max(peaks.get((model, shard), 0), got["peak"])
                angles = angles_to(reference, direction) if reference is not None else np.zeros(0)
                angle = "-" if legacy or reference is None else f"{angles.max(initial=0.0):.1e}"
                off = "-" if legacy or reference is None else f"{(angles > 1e-5).mean():.2%}"
                ratio = f"{got['events_per_s'] / old_rate:>7.2f}" if old_rate else f"{'-':>7}"
                print(f"{model:<22}{shard:>9}{label:>16}{got['events_per_s']:>10.0f}"
                      f"{ratio}{got['forward_calls']:>9}"
                      f"{got['peak'] / 2**30:>9.2f}G{(got['peak'] - got['baseline']) / 2**30:>8.2f}G{angle:>11}"
                      f"{off:>11}",
                      flush=True)
    memory_verdict(peaks, [big, small])


def memory_verdict(peaks: dict[tuple[str, str], int], shards: list[str]) -> None:
    """Per model: the streaming peak RSS on the big and the small shard, whether it grew with the shard
    (more than ``GROWTH_SLACK``) and whether it stays within ``PEAK_LIMIT``."""
    big, small = shards
    print(f"\npeak RSS per worker (largest over chunk sizes), {small} vs {big}: must not grow with the shard, "
          f"<= {PEAK_LIMIT / 2**30:.1f} GiB")
    for model in dict.fromkeys(m for m, _ in peaks):
        if (model, small) not in peaks or (model, big) not in peaks:
            continue
        a, b = peaks[model, small], peaks[model, big]
        grows = b - a > GROWTH_SLACK
        ok = not grows and b <= PEAK_LIMIT
        print(f"{model:<22}{a / 2**30:>7.2f} G -> {b / 2**30:.2f} G ({(b - a) / 2**20:+.0f} MiB)  "
              f"{'PASS' if ok else 'FAIL'}{' (grows with the shard)' if grows else ''}"
              f"{' (above the limit)' if b > PEAK_LIMIT else ''}", flush=True)

if __name__ == "__main__":
    main()
