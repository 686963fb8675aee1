"""Formats bench/swap_results.sh's `kvsched simulate --json` files (named
GROUP-WORKLOAD-SLO-MODE-SEED.json) into docs/swap_results.md: per cell, the mean over seeds and the
range (min-max) across them."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def cell(values, fmt) -> str:
    values = np.asarray(values, dtype=float)
    if values.size == 1:
        return fmt(values[0])
    return f"{fmt(values.mean())} ({fmt(values.min())}-{fmt(values.max())})"


def pct(v: float) -> str:
    return f"{v:.1%}"


def main(paths: list[str]) -> None:
    runs = defaultdict(lambda: defaultdict(list))  # (group, workload, slo, mode, admission) -> field -> values
    seeds = set()
    for path in paths:
        group, workload, slo, mode, seed = Path(path).stem.split("-")
        seeds.add(seed)
        for r in json.loads(Path(path).read_text()):
            key = (group, workload, slo, mode, r["admission"])
            for field in ("slo_attainment", "preemptions", "swap_bytes", "ttft_p99_s"):
                runs[key][field].append(r[field])
    print("# Preemption by swap versus recompute (`bash bench/swap_results.sh`)\n")
    print("Same runs, same scheduler, only the eviction mechanism differs. Recompute drops an evicted request's KV")
    print("and prefills it again; swap moves it to host memory (4x the device KV capacity by default) through the")
    print("swap planner and back, and each step pays the swap cost model's time for its copies on the profile's")
    print("host link (A100: PCIe Gen4, 25 GB/s), blocking, not overlapped with the forward pass.")
    print(f"Each cell: the mean over {len(seeds)} seeds (workload draws) and, in brackets, the range across them.\n")
    print("```bash")
    print("kvsched simulate --seeds 1 --rate 7 --slo {strict,lax} --preemption {recompute,swap} --seed S   # chat, 1500 requests, KV 65536")
    print("kvsched simulate --seeds 1 --workload decode_heavy --num-requests 1000 --rate 7 --kv-capacity-tokens 32768 \\")
    print("                 --slo {strict,lax} --preemption {recompute,swap} --seed S")
    print("```\n")
    for slo, title in (("strict", "Strict SLO (TTFT <= 2 s, p99 token gap <= 0.2 s)"),
                       ("lax", "Lax SLO (TTFT <= 10 s, worst gap <= 1.5 s)")):
        print(f"{title}: attainment, preemptions and bytes swapped.\n")
        print("| workload | admission | recompute: attainment | preemptions | swap: attainment | preemptions | swapped (GB) |")
        print("|---|---|---|---|---|---|---|")
        for workload in ("chat", "decode_heavy"):
            for admission in ("aggressive", "conservative", "past_future", "oracle"):
                rec, swp = runs[("memory", workload, slo, "recompute", admission)], runs[("memory", workload, slo, "swap", admission)]
                if not rec["slo_attainment"]:
                    continue
                print(f"| {workload} | {admission} | {cell(rec['slo_attainment'], pct)} | {cell(rec['preemptions'], '{:.0f}'.format)} | "
                      f"{cell(swp['slo_attainment'], pct)} | {cell(swp['preemptions'], '{:.0f}'.format)} | "
                      f"{cell(np.asarray(swp['swap_bytes']) / 1e9, '{:.1f}'.format)} |")
        print()
    print("## Changing priorities (FastSwitch-style evaluation)\n")
    print("```bash")
    print("kvsched simulate --seeds 1 --rate 7 --slo strict --priorities {markov,random} --preemption {recompute,swap} \\")
    print("                 --admission aggressive,past_future,oracle --seed S")
    print("```\n")
    print("Same chat workload; every request gets one of 3 priority classes, re-drawn every 2 s while it lives")
    print("(`random`), or moved one class up or down with probability 0.2 (`markov`, reflected at the ends). The")
    print("`priority` policy evicts running requests for a more urgent waiting one. Strict-SLO attainment and P99 TTFT:\n")
    print("| priorities | admission | recompute: attainment | TTFT p99 (s) | swap: attainment | TTFT p99 (s) | swapped (GB) |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("markov", "random"):
        for admission in ("aggressive", "past_future", "oracle"):
            rec, swp = runs[("priorities", kind, "strict", "recompute", admission)], runs[("priorities", kind, "strict", "swap", admission)]
            if not rec["slo_attainment"]:
                continue
            print(f"| {kind} | {admission} | {cell(rec['slo_attainment'], pct)} | {cell(rec['ttft_p99_s'], '{:.1f}'.format)} | "
                  f"{cell(swp['slo_attainment'], pct)} | {cell(swp['ttft_p99_s'], '{:.1f}'.format)} | "
                  f"{cell(np.asarray(swp['swap_bytes']) / 1e9, '{:.1f}'.format)} |")
    print()
    print("Priority preemption by recompute throws away a context that must be prefilled again, so under frequent")
    print("priority changes the queue never drains; with swap an eviction costs a copy. The swap cost in these runs")
    print("is the planner's cost model, not a GPU measurement; bench/README.md has the copy engine's measured")
    print("bandwidth on an H200.")


if __name__ == "__main__":
    main(sys.argv[1:])
