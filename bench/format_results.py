"""Formats `kvsched simulate --json` files (named WORKLOAD-SLO.json) into the markdown results table."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    print("# Simulated results (`bash bench/simulate_results.sh`)\n")
    print("Produced by `kvsched simulate --seeds 1 --find-max-rate` on the first 1000 requests of each trace,")
    print("one seed per cell (the seed-to-seed spread is not shown here; docs/swap_results.md gives five). Columns:")
    print("the highest arrival rate (req/s) at which the policy still meets the SLO for 90% of requests,")
    print("then P99 TTFT, P99 TPOT, P99 worst gap, SLO attainment and preemptions at the trace's own load")
    print("(rate scale shown). lax: TTFT <= 10 s and worst gap <= 1.5 s; strict: TTFT <= 2 s and p99 gap <= 0.2 s.\n")
    for path in sorted(paths):
        name, slo = Path(path).stem.rsplit("-", 1)
        records = json.loads(Path(path).read_text())
        first = records[0]
        print(f"## {name}, {slo} SLO\n")
        print(f"{first['workload']}; rate scale {first['rate_scale']:g}; KV {first['kv_capacity_tokens']} tokens; "
              f"{first['model_profile']}\n")
        print("| policy | max rate @90% (req/s) | TTFT p99 (s) | TPOT p99 (s) | gap p99 (s) | attainment | preemptions |")
        print("|---|---|---|---|---|---|---|")
        for r in records:
            rate = (">= " if r.get("max_rate_capped") else "") + f"{r['max_rate_req_s_90']:.2f}"
            print(f"| {r['policy']} | {rate} | {r['ttft_p99_s']:.2f} | {r['tpot_p99_s']:.3f} | "
                  f"{r['max_gap_p99_s']:.2f} | {r['slo_attainment']:.1%} | {r['preemptions']} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
