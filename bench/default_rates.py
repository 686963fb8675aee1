"""Measures each built-in workload's default rate and says whether the code's default still holds.

The rule (kvsched.sim.workloads.WorkloadDefaults): the highest rate on a grid of round numbers at
which oracle admission meets the lax SLO for at least 90% of requests on every one of five seeds,
with the workload's default KV cache and context. At that rate the table also shows aggressive and
past_future admission, so one sees whether admission matters there.

Usage: python bench/default_rates.py [workload ...]   (about 10 minutes on 2 cores for all)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile

from kvsched.cli import main
from kvsched.sim.workloads import BUILT_IN_DEFAULTS

SEEDS = 5
# Round rates, about 8-15% apart: 0.1-0.9 in 0.1 steps, then the same mantissas at every decade.
MANTISSAS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 9.0)
GRID = sorted({round(m * 10.0**e, 4) for e in (-1, 0, 1) for m in MANTISSAS})


def run(workload: str, rate: float, admission: str) -> list:
    """Per-seed lax attainment of one admission mode at one rate (the workload's other defaults)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "run.json")
        argv = ["simulate", "--workload", workload, "--rate", str(rate), "--seeds", str(SEEDS),
                "--admission", admission, "--json", path]
        with contextlib.redirect_stdout(io.StringIO()):
            if main(argv) != 0:
                raise SystemExit(f"kvsched {' '.join(argv)} failed")
        (record,) = json.load(open(path))
    return [seed["slo_lax"]["attainment"] for seed in record.get("per_seed", [record])]


def memory_bound_rate(workload: str) -> float:
    """The grid's highest rate where oracle's worst seed attains >= 90%, searched from the default."""
    def meets(rate: float) -> bool:
        return min(run(workload, rate, "oracle")) >= 0.9

    index = min(range(len(GRID)), key=lambda i: abs(GRID[i] - BUILT_IN_DEFAULTS[workload].rate))
    if meets(GRID[index]):
        while index + 1 < len(GRID) and meets(GRID[index + 1]):
            index += 1
        return GRID[index]
    while index > 0:
        index -= 1
        if meets(GRID[index]):
            return GRID[index]
    return GRID[0]


def main_() -> int:
    workloads = sys.argv[1:] or list(BUILT_IN_DEFAULTS)
    stale = []
    print(f"| workload | default rate | measured | lax attainment at the measured rate, {SEEDS} seeds: "
          "aggressive / past_future / oracle (worst seed) |")
    print("|---|---|---|---|")
    for workload in workloads:
        rate = memory_bound_rate(workload)
        cells = []
        for admission in ("aggressive", "past_future", "oracle"):
            values = run(workload, rate, admission)
            cells.append(f"{100 * sum(values) / len(values):.1f}% ({100 * min(values):.1f}%)")
        default = BUILT_IN_DEFAULTS[workload].rate
        print(f"| {workload} | {default:g} | {rate:g} | {' / '.join(cells)} |", flush=True)
        if rate != default:
            stale.append(f"{workload}: default {default:g}, measured {rate:g}")
    if stale:
        print("\nstale defaults (update BUILT_IN_DEFAULTS in kvsched/sim/workloads.py):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main_())
