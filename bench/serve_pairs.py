"""Pools the alternated pairs of several real-serve runs (bench/vllm_cpu_serve.py's JSON) into one
paired comparison: kvsched's adapter against vLLM's scheduler, pair by pair.

    python bench/serve_pairs.py bench/vllm_cpu_serve_rate8_*.json [--config kvsched] [--out summary.json]

A serve on this 2-core machine swings by 10% between runs of the same scheduler, more than the
schedulers differ, so one file's three pairs cannot say which is ahead. Each pair ran both
schedulers back to back on the same workload, so each pair gives one ratio per metric (kvsched over
vLLM); the pooled figure is the geometric mean of the ratios with a 95% interval (Student's t on
the log ratios, pairs taken as independent), and how many pairs kvsched won. Files are grouped by
request rate; pool only files whose kvsched commit you mean to judge (each file's commit is
printed).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from kvsched.sim.metrics import interval95

# (key in a run, label, True when higher is better)
METRICS = (("tokens_per_s", "throughput", True), ("ttft_mean_ms", "TTFT mean", False),
           ("ttft_p99_ms", "TTFT p99", False), ("tpot_p99_ms", "TPOT p99", False),
           ("preemptions", "preemptions", False))


def pairs_of(path: Path, config: str) -> tuple[dict, list[tuple[dict, dict]], list[int]]:
    """The file's runs, its (vLLM run, ``config`` run) pairs, and the pairs left out because a run
    in them failed requests (a failure is no throughput: such a pair is reported, not compared)."""
    data = json.loads(path.read_text())
    runs = data["runs"]
    if config not in runs:
        raise SystemExit(f"{path}: no config {config!r} (it has {', '.join(runs)})")
    by_pair = {r["pair"]: r for r in runs["vllm"] if not r.get("failed")}
    pairs = [(by_pair[r["pair"]], r) for r in runs[config] if r["pair"] in by_pair and not r.get("failed")]
    kept = {r["pair"] for _, r in pairs}
    left_out = sorted({r["pair"] for r in runs["vllm"] + runs[config]} - kept)
    return data, pairs, left_out


def summarize(ratios: list[float], higher_is_better: bool) -> dict:
    logs = np.log(np.asarray(ratios))
    half = interval95(logs)
    wins = int(np.sum(logs > 0) if higher_is_better else np.sum(logs < 0))
    return dict(ratio=float(np.exp(logs.mean())), low=float(np.exp(logs.mean() - half)),
                high=float(np.exp(logs.mean() + half)), wins=wins, pairs=len(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+", help="bench/vllm_cpu_serve.py --out files")
    parser.add_argument("--config", default="kvsched", help="the configuration compared with vllm")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    by_rate: dict[float, dict[str, list[float]]] = {}
    for path in args.files:
        data, pairs, left_out = pairs_of(path, args.config)
        rate = float(data["options"]["rate"])
        commit = data.get("kvsched", {}).get("commit", "?")[:8]
        ratios = by_rate.setdefault(rate, {key: [] for key, _, _ in METRICS})
        cells = []
        for reference, run in pairs:
            for key, _, _ in METRICS:
                ratios[key].append(max(run[key], 1e-9) / max(reference[key], 1e-9))
            cells.append(f"{run['tokens_per_s'] / reference['tokens_per_s'] - 1:+.1%}")
        print(f"{path.name}: rate {rate:g}, seed {data['options']['seed']}, kvsched {commit}, "
              f"throughput per pair {', '.join(cells)}"
              + (f"; pairs {left_out} left out: a run failed requests" if left_out else ""))
    summary = {}
    print(f"\n{args.config} against vLLM's scheduler, pooled pairs: geometric mean of the ratios "
          "[95% interval], pairs won")
    print("| rate req/s | pairs | " + " | ".join(label for _, label, _ in METRICS) + " |")
    print("|---:|---:|" + "---|" * len(METRICS))
    for rate, ratios in sorted(by_rate.items()):
        summary[rate] = {key: summarize(ratios[key], better) for key, _, better in METRICS}
        cells = [f"{s['ratio']:.3f} [{s['low']:.3f}-{s['high']:.3f}], {s['wins']}/{s['pairs']}"
                 for s in summary[rate].values()]
        print(f"| {rate:g} | {len(ratios['tokens_per_s'])} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(dict(
            command="python bench/serve_pairs.py " + " ".join(str(f) for f in args.files) + f" --config {args.config}",
            summary={str(rate): s for rate, s in summary.items()}), indent=1) + "\n")
    if any(math.isnan(s["ratio"]) for by in summary.values() for s in by.values()):
        raise SystemExit("a ratio is not a number: a run reported nothing")


if __name__ == "__main__":
    main()
