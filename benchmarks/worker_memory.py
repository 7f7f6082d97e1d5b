"""Peak memory of one worker per stage on a Kaggle-size shard: what the shipped profile memory must cover.

Usage::

    python benchmarks/worker_memory.py [--shard-events 200000] [--models linefit,dynedge,...]
                                       [--chunk 16384] [--workdir DIR] [--threads 1]

For line-fit and every small preset (shipped checkpoint), runs ``infer_shard`` on the whole shard in a
fresh child process -- the streaming path a campaign's worker runs, at the default chunk size -- the same
child as ``benchmarks/inference.py`` (its store is reused when present) and prints the child's peak RSS
(VmHWM), which includes the interpreter, torch and the loaded model, as a worker's does. The shipped
``memory`` of the condor and slurm profiles (icegrid/config/clusters.yaml) is chosen from the largest.
Preprocess's peak is ``benchmarks/preprocess.py --memory``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from inference import MODELS, make_store, run_child  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-events", type=int, default=200_000)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--chunk", type=int, default=None, help="chunk_events; default: icegrid's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "icegrid-bench-inference")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    from icegrid.inference import DEFAULT_CHUNK_EVENTS

    chunk = args.chunk or DEFAULT_CHUNK_EVENTS
    args.workdir.mkdir(parents=True, exist_ok=True)
    store, _ = make_store(args.workdir, args.shard_events, args.shard_events // 4, args.seed)
    shard = f"s{args.shard_events}"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch threads "
          f"{args.threads}; shard {shard} of {store}; chunk_events {chunk}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':<22}{'peak RSS':>10}{'baseline':>10}{'events/s':>10}{'load':>6}")
    peaks = {}
    for model in args.models.split(","):
        got = run_child({"store": str(store), "shard": shard, "model": model, "chunk": chunk, "legacy": False,
                         "threads": args.threads, "out": str(args.workdir / f"memory-{model}.npy")})
        peaks[model] = got["peak"]
        print(f"{model:<22}{got['peak'] / 2**30:>9.2f}G{got['baseline'] / 2**30:>9.2f}G"
              f"{got['events_per_s']:>10.0f}{os.getloadavg()[0]:>6.1f}", flush=True)
    top = max(peaks, key=peaks.get)
    print(f"largest: {top} {peaks[top] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
