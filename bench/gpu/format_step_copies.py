"""bench/README.md's tables for step copies beside the forward pass, from a results JSON of
bench/gpu/step_copy_overlap.py (or bench/gpu/results/h200-*-step-copies.json).

    python bench/gpu/format_step_copies.py bench/gpu/results/h200-2026-12-04-step-copies.json
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    result = json.load(open(path))
    ceiling = {r["direction"]: r["gbps_median"] for r in result["copies_by_strategy"] if r["strategy"] == "ceiling"}
    print("| dir | strategy | cost model | GB/s (median) | range | / ceiling |")
    print("|---|---|---|---|---|---|")
    for r in result["copies_by_strategy"]:
        low, high = r["gbps_range"]
        print(f"| {r['direction']} | {r['strategy']} | {r['cost_model'] or ''} | {r['gbps_median']:.1f} | "
              f"{low:.1f}-{high:.1f} | {r['gbps_median'] / ceiling[r['direction']]:.0%} |")
    print()
    print("| cost model | dir | compute / copies | compute | copies | waited | overlapping | ideal | "
          "overlapping / ideal | waited / ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        ms = r["ms_per_step"]
        print(f"| {r['cost_model']} | {r['direction']} | {r['ratio']:.1f} | {ms['compute']:.2f} | {ms['copies']:.2f} | "
              f"{ms['waited']:.2f} | {ms['overlapping']:.2f} | {r['ideal_ms']:.2f} | "
              f"{ms['overlapping'] / r['ideal_ms']:.2f} | {ms['waited'] / r['ideal_ms']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
