"""Formats bench/host_tier_results.sh's `kvsched simulate --json` files (named WORKLOAD-N<config>.json)
into docs/host_tier_results.md: per workload, GPU-only, with the host tier, and with a large GPU cache."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from format_results import interval, shown_command  # bench/, beside this script

CONFIGS = {"1gpu": "GPU prefix cache only", "2evict": "+ host tier: write on eviction, load inline",
           "3finish": "+ host tier: write through at finish, load inline",
           "4prefetch": "+ host tier: write through at finish, prefetch (the defaults)",
           "5large": "GPU cache that keeps everything"}


def share(record: dict, key: str) -> str:
    """A share of the prompt tokens, mean over seeds with its interval."""
    runs = record.get("per_seed", [record])
    values = [r[key] / max(r["prompt_tokens"], 1) for r in runs]
    from kvsched.sim.metrics import interval95

    mean, half = 100 * sum(values) / len(values), 100 * interval95(values)
    return f"{mean:.1f}" + (f" ± {half:.1f}" if round(half, 1) > 0 else "")


def main(paths: list[str]) -> None:
    groups = defaultdict(dict)
    for path in paths:
        workload, config = Path(path).stem.rsplit("-", 1)
        (record,) = json.loads(Path(path).read_text())
        groups[workload][config] = record
    print("# Host tier of the prefix cache (`bash bench/host_tier_results.sh`)\n")
    print("`--host-kv-tokens N` keeps full KV blocks in N tokens of host memory and loads them back on a later")
    print("prefix hit when the swap cost model says the copy beats recomputing them. A block gets there when the")
    print("GPU prefix cache evicts it (`--host-cache-write evict`: the step that reuses the block waits for the")
    print("copy) or when its request finishes (`finish`: write-through, overlapping the next forward pass unless")
    print("that step reuses the block). A request's host hits are loaded in the plan of its prefill, before the")
    print("forward pass (`--host-cache-load inline`), or a step ahead, overlapping that step's forward pass")
    print("(`prefetch`: its prefill starts a step later). Every other copy is priced at the cost model's time on")
    print("the profile's host link, blocking, before the forward pass. Rows: the GPU prefix cache alone, the same")
    print("GPU with the host tier each way, and a GPU cache large enough to keep everything (the reuse there is")
    print("to be had).")
    print("Means over the seeds with 95% intervals; past_future admission, preemption by recompute; cached: the")
    print("share of prompt tokens not computed, found on the GPU or loaded from the host.\n")
    for workload, configs in sorted(groups.items()):
        first = next(iter(configs.values()))
        print(f"## {workload}\n")
        print(f"{first['workload']}; seeds {first['seeds']}; lax SLO\n")
        print("| configuration | KV (tokens) | host (tokens) | lax attainment (%) | TTFT p50 (s) | TTFT p99 (s) "
              "| cached: GPU (%) | cached: host (%) | copied (GB) | preemptions |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for config, title in CONFIGS.items():
            r = configs.get(config)
            if r is None:
                continue
            host = r["options"]["host_kv_tokens"] or "-"
            copied = (r["cache_write_bytes"] + r["cache_load_bytes"]) / 1e9
            print(f"| {title} | {r['kv_capacity_tokens']} | {host} | {interval(r, 'slo_attainment', '.1f', 100)} | "
                  f"{interval(r, 'ttft_p50_s', '.2f')} | {interval(r, 'ttft_p99_s', '.2f')} | "
                  f"{share(r, 'prefix_hit_tokens')} | {share(r, 'host_hit_tokens')} | {copied:.1f} | "
                  f"{interval(r, 'preemptions', '.0f')} |")
        print("\nCommands:\n")
        for config in CONFIGS:
            if config in configs:
                print(f"- `{shown_command(configs[config])}`")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
