"""Pools the alternated pairs of several real-serve runs (bench/vllm_cpu_serve.py's JSON) into one
paired comparison: kvsched's adapter against vLLM's scheduler, pair by pair.

    python bench/serve_pairs.py bench/vllm_cpu_serve_rate8_*.json [--config kvsched] [--out summary.json]

A serve on this 2-core machine swings by 10% between runs of the same scheduler, more than the
schedulers differ, so one file's three pairs cannot say which is ahead. Each pair ran both
schedulers back to back on the same workload, so each pair gives one ratio per metric (kvsched over
vLLM); the pooled figure is the geometric mean of the ratios with a 95% interval (Student's t on
the log ratios), and how many pairs kvsched won. Preemptions are counts that can be 0: their ratio
is (kvsched + 1) / (vLLM + 1). Files are grouped by request rate; pool only files whose kvsched
commit you mean to judge (each file's commit is printed).

The interval takes the pairs as independent. They are not quite: a file's pairs share a workload
seed and a stretch of the machine's time, and its pairs alternate which scheduler runs first, so
with three pairs a file runs vLLM first twice or once. Read the interval as a lower bound on the
uncertainty. A pair in which a run failed requests is left out of the ratios and named, with the
scheduler whose run failed: failures are never a throughput.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kvsched.sim.metrics import interval95

# (key in a run, label, True when higher is better)
METRICS = (("tokens_per_s", "throughput", True), ("ttft_mean_ms", "TTFT mean", False),
           ("ttft_p99_ms", "TTFT p99", False), ("tpot_p99_ms", "TPOT p99", False),
           ("preemptions", "preemptions", False))
COUNTS = {"preemptions"}  # ratios of (count + 1): a pair where one side had none stays finite


def pairs_of(path: Path, config: str) -> tuple[dict, list[tuple[dict, dict]], list[str]]:
    """The file's runs, its (vLLM run, ``config`` run) pairs, and why each pair left out was:
    a run that failed requests (named with its scheduler) or a pair one scheduler has no run in."""
    data = json.loads(path.read_text())
    runs = data["runs"]
    if config not in runs:
        raise SystemExit(f"{path}: no config {config!r} (it has {', '.join(runs)})")
    reference = {r["pair"]: r for r in runs["vllm"]}
    compared = {r["pair"]: r for r in runs[config]}
    pairs, left_out = [], []
    for pair in sorted(set(reference) | set(compared)):
        if pair not in reference or pair not in compared:
            left_out.append(f"pair {pair}: no {'vllm' if pair not in reference else config} run")
            continue
        failed = [f"{name} failed {run['failed']}" for name, run in (("vllm", reference[pair]), (config, compared[pair]))
                  if run.get("failed")]
        if failed:
            left_out.append(f"pair {pair}: " + ", ".join(failed))
        else:
            pairs.append((reference[pair], compared[pair]))
    return data, pairs, left_out


def ratio(key: str, run: dict, reference: dict) -> float:
    shift = 1 if key in COUNTS else 0
    return (run[key] + shift) / (reference[key] + shift)


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
                ratios[key].append(ratio(key, run, reference))
            cells.append(f"{run['tokens_per_s'] / reference['tokens_per_s'] - 1:+.1%}")
        print(f"{path.name}: rate {rate:g}, seed {data['options']['seed']}, kvsched {commit}, "
              f"throughput per pair {', '.join(cells)}"
              + (f"; left out: {'; '.join(left_out)}" if left_out else ""))
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


if __name__ == "__main__":
    main()
