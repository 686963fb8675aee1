"""Formats bench/cluster_results.sh's `kvsched simulate --instances N --json` files (named
WORKLOAD-N-GROUP.json) into docs/cluster_results.md: per workload and fleet size, one row per
dispatch policy, global queue and migration; then the reasoning workload over equal and unequal
fleets, from bench/fleet_reasoning.json (bench/fleet_reasoning.py)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from fleet_reasoning import format_page as format_reasoning  # bench/, beside this script
from format_results import interval, shown_command


def fleet_mean(record: dict, path: tuple) -> float:
    """A fleet figure (nested in record['fleet']) averaged over the seeds."""
    runs = record.get("per_seed", [record])
    values = []
    for run in runs:
        value = run["fleet"]
        for key in path:
            value = (value or {}).get(key, 0)
        values.append(value or 0)
    return sum(values) / len(values)


def main(paths: list[str]) -> None:
    groups = defaultdict(list)
    for path in sorted(paths):
        workload, instances, _ = Path(path).stem.rsplit("-", 2)
        groups[(workload, int(instances))].extend(json.loads(Path(path).read_text()))
    print("# A fleet: dispatch and live migration (`bash bench/cluster_results.sh`)\n")
    print("`kvsched simulate --instances N` replays a workload over N identical simulated instances, each with the")
    print("workload's KV cache and its own scheduler (preemption by recompute; past_future admission, or aggressive,")
    print("as vLLM admits, where a row starts with it), behind a dispatcher. Rows: each dispatch policy")
    print("(`round_robin`; `least_load`: tokens running and queued;")
    print("`headroom`: the most KV left after the estimator's predicted peak of every live request;")
    print("`prefix_affinity`: the most cached prefix blocks within a 10% load-imbalance limit), without and with")
    print("live migration (`+migration`: staged KV copies over a 50 GB/s, 10 us RDMA link), and with the global")
    print("queue (`+queue`: a request goes only to an instance with predicted room for it, else waits at the")
    print("dispatcher). Max rate: the highest fleet arrival rate at which 90% of requests meet the lax SLO")
    print("(TTFT <= 10 s, worst gap <= 1.5 s), by bisection. The other columns are at the workload's load (the")
    print("built-in workloads' default rate times N; the Azure trace at N times its rate). Means over three seeds")
    print("with 95% intervals. Cached: prompt tokens found in the instances' prefix caches. Migrations and spread")
    print("(largest minus smallest instance KV utilization) are means. A '-' max rate was not searched.\n")
    for (workload, instances), records in sorted(groups.items()):
        first = records[0]
        print(f"## {workload}, {instances} instances\n")
        print(f"{first['workload']}; {int(first['num_requests'])} requests; KV {first['kv_capacity_tokens']} tokens per "
              f"instance; seeds {first['seeds']}\n")
        print("| run | max rate at 90% lax (req/s) | lax attainment (%) | TTFT p99 (s) | worst gap p99 (s) "
              "| preemptions | cached (%) | migrations | migrated (GB) | spread (%) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in records:
            capped = ">=" if r.get("max_rate_capped") else ""
            max_rate = f"{capped}{interval(r, 'max_rate_req_s_90', '.2f')}" if "max_rate_req_s_90" in r else "-"
            cached = 100 * r["prefix_hit_tokens"] / max(r["prompt_tokens"], 1)
            print(f"| {r['run']} | {max_rate} | "
                  f"{interval(r['slo_lax'], 'attainment', '.1f', 100)} | {interval(r, 'ttft_p99_s', '.2f')} | "
                  f"{interval(r, 'max_gap_p99_s', '.2f')} | {interval(r, 'preemptions', '.0f')} | {cached:.1f} | "
                  f"{fleet_mean(r, ('migration', 'committed')):.0f} | "
                  f"{fleet_mean(r, ('migration', 'bytes')) / 1e9:.1f} | {100 * fleet_mean(r, ('load_spread',)):.1f} |")
        print("\nCommands:\n")
        for command in dict.fromkeys(shown_command(r) for r in records):
            print(f"- `{command}`")
        print()
    reasoning = Path(__file__).with_name("fleet_reasoning.json")
    if reasoning.exists():  # its own page is docs/fleet_reasoning.md; here a level down
        page = format_reasoning(json.loads(reasoning.read_text())).splitlines()
        print("## reasoning, 4 equal or unequal instances\n")
        print("\n".join("#" + line if line.startswith("## ") else line for line in page[2:]))


if __name__ == "__main__":
    main(sys.argv[1:])
