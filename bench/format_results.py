"""Formats `kvsched simulate --json` files (named WORKLOAD-SLO.json) into the markdown results table."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def shown_command(record: dict) -> str:
    """The run's command line without its temporary --json path."""
    return re.sub(r" --json \S+", "", record["command"])


def interval(record: dict, key: str, fmt: str, scale: float = 1.0, signed: bool = False) -> str:
    """``mean ± half-width`` of a figure over the seeds."""
    value = record[key] * scale
    half = (record.get(f"{key}_ci95") or 0.0) * scale
    text = format(value, ("+" if signed else "") + fmt)
    shown = format(half, fmt)
    return text + (f" ± {shown}" if float(shown) > 0 else "")


def main(paths: list[str]) -> None:
    print("# Simulated results (`bash bench/simulate_results.sh`)\n")
    print("Produced by `kvsched simulate --seeds 3 --find-max-rate` on the first 1000 requests of each workload;")
    print("every figure is the mean over three seeds with its 95% Student interval (± half-width; none when all")
    print("seeds agree, as for a timed trace under a mode that draws nothing). Every admission mode runs on the")
    print("same seeds, so Δ, each mode's attainment minus aggressive's seed by seed, is judged against its own")
    print("noise. Columns: the highest arrival rate (req/s) at which the mode still meets the SLO for 90% of")
    print("requests (`>=`: met even at 64x the workload's rate, where a finite set of conversations stops adding")
    print("load), then P99 TTFT, P99 worst gap, attainment, Δ and preemptions at the workload's own load. Built-in")
    print("workloads run at their defaults (rate, KV cache and context: `WorkloadDefaults`).")
    print("lax: TTFT <= 10 s and worst gap <= 1.5 s; strict: TTFT <= 2 s and p99 gap <= 0.2 s.\n")
    for path in sorted(paths):
        name, slo = Path(path).stem.rsplit("-", 1)
        records = json.loads(Path(path).read_text())
        first = records[0]
        print(f"## {name}, {slo} SLO\n")
        print(f"`{shown_command(first)}`\n")
        print(f"{first['workload']}; rate scale {first['rate_scale']:g}; KV {first['kv_capacity_tokens']} tokens; "
              f"context {first['max_model_len']} tokens; {first['model_profile']}; seeds {first['seeds']}\n")
        print("| admission | max rate @90% (req/s) | TTFT p99 (s) | gap p99 (s) | attainment (%) "
              "| Δ vs aggressive (pp) | preemptions |")
        print("|---|---|---|---|---|---|---|")
        for r in records:
            rate = (">= " if r.get("max_rate_capped") else "") + interval(r, "max_rate_req_s_90", ".2f")
            print(f"| {r['admission']} | {rate} | {interval(r, 'ttft_p99_s', '.2f')} | "
                  f"{interval(r, 'max_gap_p99_s', '.2f')} | {interval(r, 'slo_attainment', '.1f', 100)} | "
                  f"{interval(r['paired_difference'], 'attainment', '.1f', 100, signed=True)} | "
                  f"{interval(r, 'preemptions', '.0f')} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
