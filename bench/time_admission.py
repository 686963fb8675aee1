"""Times the asv admission round (bench/benchmarks/bench_estimator.py) without asv: kvsched in
tokens and in blocks of 16, a steady engine step (record, observe, admit), and the numpy reference of the original algorithm, in one run.

    OPENBLAS_NUM_THREADS=1 python bench/time_admission.py [--rounds 15] [--calls 500]

Prints the median and minimum microseconds per call over `rounds` rounds of `calls` calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks"))

import numpy as np  # noqa: E402
from bench_estimator import AdmissionRound, ReferenceAdmissionRound, SteadyStep  # noqa: E402


def timed(call, rounds: int, calls: int) -> tuple[float, float]:
    for _ in range(min(calls, 200)):
        call()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return float(np.median(samples)), float(np.min(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    bench = AdmissionRound()
    for mode in ("past_future", "conservative", "aggressive"):
        cells = []
        for block_size in (0, 16):
            bench.setup(mode, block_size)
            median, best = timed(lambda: bench.time_admit(mode, block_size), args.rounds, args.calls)
            cells.append(f"{'tokens' if block_size == 0 else 'blocks'} {median:6.1f} us (min {best:5.1f})")
        print(f"{mode:13s} " + "   ".join(cells))
    step = SteadyStep()
    cells = []
    for block_size in (0, 16):
        step.setup(block_size)
        median, best = timed(lambda: step.time_step(block_size), args.rounds, args.calls)
        cells.append(f"{'tokens' if block_size == 0 else 'blocks'} {median:6.1f} us (min {best:5.1f})")
    print(f"{'steady step':13s} " + "   ".join(cells) + "   (record 4 + observe + past_future admit)")
    reference = ReferenceAdmissionRound()
    reference.setup()
    median, best = timed(reference.time_reference_admit, max(3, args.rounds // 3), max(5, args.calls // 50))
    print(f"{'reference':13s} tokens {median:8.1f} us (min {best:7.1f}), the original algorithm in numpy")


if __name__ == "__main__":
    main()
