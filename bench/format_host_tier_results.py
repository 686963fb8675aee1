"""Formats bench/host_tier_results.sh's `kvsched simulate --json` files (named WORKLOAD-N<config>.json)
into docs/host_tier_results.md: per workload, GPU-only, with the host tier, and with a large GPU cache."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

CONFIGS = {"1gpu": "GPU prefix cache only", "2host": "+ host tier", "3large": "GPU cache that keeps everything"}


def interval(record: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    value, half = record[key] * scale, (record.get(f"{key}_ci95") or 0.0) * scale
    return format(value, fmt) + (f" ± {format(half, fmt)}" if half > 0 else "")


def share(record: dict, key: str) -> str:
    """A share of the prompt tokens, mean over seeds with its interval."""
    runs = record.get("per_seed", [record])
    values = [r[key] / max(r["prompt_tokens"], 1) for r in runs]
    from kvsched.sim.metrics import interval95

    mean, half = 100 * sum(values) / len(values), 100 * interval95(values)
    return f"{mean:.1f}" + (f" ± {half:.1f}" if half > 0 else "")


def main(paths: list[str]) -> None:
    groups = defaultdict(dict)
    for path in paths:
        workload, config = Path(path).stem.rsplit("-", 1)
        (record,) = json.loads(Path(path).read_text())
        groups[workload][config] = record
    print("# Host tier of the prefix cache (`bash bench/host_tier_results.sh`)\n")
    print("`--host-kv-tokens N` keeps blocks evicted from the GPU prefix cache in N tokens of host memory")
    print("and loads them back on a later hit when the swap cost model says the copy beats recomputing them.")
    print("Each step pays the cost model's time for its copies (the profile's host link, blocking, not overlapped")
    print("with the forward pass). Rows: the GPU prefix cache alone, the same GPU with the host tier, and a GPU")
    print("cache large enough to keep everything (the reuse there is to be had). Means over the seeds with 95%")
    print("intervals; past_future admission, preemption by recompute; cached = prompt tokens not computed.\n")
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
        print(f"\n`{configs.get('2host', first)['command']}`\n")


if __name__ == "__main__":
    main(sys.argv[1:])
