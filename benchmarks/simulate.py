"""Simulated pulses per second on one core (goal: >= 2 million pulses/s).

Usage: python benchmarks/simulate.py [--events 200000] [--repeats 3]
Prints wall-clock and CPU-time rates per repeat; numpy runs single-threaded here.
"""

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from icegrid.simulate import simulate_batch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"simulate_batch({args.events} events)")
    for repeat in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        batch = simulate_batch(repeat + 1, args.events, seed=0)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        pulses = int(batch.n_pulses.sum())
        print(f"run {repeat + 1}: {pulses:,} pulses in {wall:.2f} s wall ({cpu:.2f} s CPU): "
              f"{pulses / wall / 1e6:.2f} M pulses/s wall, {pulses / cpu / 1e6:.2f} M pulses/s per CPU-second")


if __name__ == "__main__":
    main()
