"""Per-step CPU cost of vLLM v1's Scheduler, kvsched's vLLM adapter and kvsched's core, in one run.

Both schedulers hold N running requests that are all decoding plus W waiting ones that cannot be
admitted (max_num_seqs = N), which is the steady state of a saturated server. One step is
``schedule()`` plus the engine's report (``update()`` / ``update_from_output()``); the engine's
own output objects are built outside the timed region. vLLM runs on CPU with a mocked model: a
two-layer Llama config.json in a temporary folder, no weights and no tokenizer.

    python bench/compare_vllm_scheduler.py --running 256 1024 --waiting 10000 --steps 200

The adapter (kvsched.adapters.vllm.Scheduler) takes and returns vLLM's objects, so it pays for the
SchedulerOutput and EngineCoreOutputs vLLM's engine needs; the core row is kvsched.Scheduler alone.
Prints the median of each part per scheduler and the ratios. Needs vLLM importable (and einops).

``--cold-cache MIB`` reads a buffer of that many MiB before each timed call, where an engine runs
its forward pass (between update and schedule, and between schedule and update): the caches are
then as cold as inside a real engine, where every call costs several times its warm figure and a
small batch's cost is the number of objects and arrays a step touches, not the work per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

import kvsched

PROMPT_LEN = 128
BLOCK_SIZE = 16
_EVICT = np.zeros(0, np.float32)  # --cold-cache: read before each timed call


def evict() -> None:
    """What a forward pass does to the CPU caches, without its time (outside the timed region)."""
    if _EVICT.size:
        _EVICT.sum()


def kvsched_step_times(running: int, waiting: int, steps: int) -> tuple[list[float], list[float]]:
    total = running + waiting
    blocks = running * (PROMPT_LEN + steps + 64) // BLOCK_SIZE + 64
    s = kvsched.Scheduler(
        num_blocks=blocks, block_size=BLOCK_SIZE, max_num_seqs=running, max_num_batched_tokens=8192,
        admission="aggressive", enable_prefix_caching=False,
    )
    s.add_requests(np.arange(total), PROMPT_LEN, 100_000)
    while True:  # prefill everyone who fits
        plan = s.schedule()
        done = plan.computed_offsets + plan.num_tokens >= PROMPT_LEN
        s.update(plan.req_ids, done.astype(np.int64), np.zeros(len(plan), bool))
        if len(plan) == running and not plan.is_prefill.any():
            break
    schedule_s, update_s = [], []
    ones = np.ones(running, np.int64)
    no = np.zeros(running, bool)
    for _ in range(steps):
        evict()
        t0 = time.perf_counter()
        plan = s.schedule()
        t1 = time.perf_counter()
        evict()
        t2 = time.perf_counter()
        s.update(plan.req_ids, ones, no)
        t3 = time.perf_counter()
        assert len(plan) == running
        schedule_s.append(t1 - t0)
        update_s.append(t3 - t2)
    return schedule_s, update_s


def _decode_batch(kind: str, running: int, waiting: int, steps: int, shuffled: bool):
    """A scheduler of ``kind`` ("vllm" or "kvsched", the adapter) holding ``running`` decoding
    requests and ``waiting`` ones that cannot be admitted, plus a runner-output maker."""
    from vllm import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    from kvsched.adapters import vllm_harness

    num_blocks = running * (PROMPT_LEN + steps + 64) // BLOCK_SIZE + 64
    # Aggressive admission fills the batch at once (past_future would admit these 100k-token
    # requests slowly); admission does no work in the timed steps, where every slot is taken.
    cfg, kv = vllm_harness.make_vllm_config(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=running,
                                            max_num_batched_tokens=8192, max_model_len=8192,
                                            additional_config={"kvsched": {"admission": "aggressive"}})
    sched = vllm_harness.make_scheduler(kind, cfg, kv)
    params = SamplingParams(max_tokens=100_000, ignore_eos=True)
    for i in range(running + waiting):
        sched.add_request(Request(str(i), list(range(PROMPT_LEN)), params, None, arrival_time=float(i)))

    has_index = "req_id_to_index" in {f.name for f in dataclasses.fields(ModelRunnerOutput)}

    def output_for(scheduler_output):
        ids = list(scheduler_output.num_scheduled_tokens)
        if shuffled:  # a model runner keeps its own batch order
            ids.reverse()
        index = {"req_id_to_index": {r: k for k, r in enumerate(ids)}} if has_index else {}  # gone in 0.34
        return ModelRunnerOutput(req_ids=ids, sampled_token_ids=[[7] for _ in ids], **index)

    while True:
        out = sched.schedule()
        sched.update_from_output(out, output_for(out))
        if len(out.num_scheduled_tokens) == running and all(n == 1 for n in out.num_scheduled_tokens.values()):
            return sched, output_for


def engine_step_times(kind: str, running: int, waiting: int, steps: int,
                      shuffled: bool = True) -> tuple[list[float], list[float]]:
    sched, output_for = _decode_batch(kind, running, waiting, steps, shuffled)
    schedule_s, update_s = [], []
    for _ in range(steps):
        evict()
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        runner_output = output_for(out)
        evict()
        t2 = time.perf_counter()
        sched.update_from_output(out, runner_output)
        t3 = time.perf_counter()
        assert len(out.num_scheduled_tokens) == running
        schedule_s.append(t1 - t0)
        update_s.append(t3 - t2)
    return schedule_s, update_s


def _medians(times: tuple[list[float], list[float]]) -> tuple[float, float]:
    return statistics.median(times[0]) * 1e6, statistics.median(times[1]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--running", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runner-order", choices=("shuffled", "same"), default="shuffled",
                        help="whether the fake model runner reports requests in the scheduled order")
    parser.add_argument("--cold-cache", type=int, default=0, metavar="MIB",
                        help="read this many MiB before each timed call, as a forward pass would (0: warm)")
    args = parser.parse_args()
    if args.cold_cache < 0:
        parser.error(f"--cold-cache: must be >= 0 MiB, got {args.cold_cache}")
    global _EVICT
    _EVICT = np.ones(args.cold_cache << 18, np.float32)
    print(f"kvsched {kvsched.__version__}; medians of {args.steps} steps, {args.waiting} waiting, "
          f"runner order {args.runner_order}, {f'{args.cold_cache} MiB read before each call' if args.cold_cache else 'warm caches'}; "
          "microseconds per step")
    shuffled = args.runner_order == "shuffled"
    for running in args.running:
        ks, ku = _medians(kvsched_step_times(running, args.waiting, args.steps))
        print(f"N={running:5d}  kvsched core        schedule {ks:8.1f}  update {ku:8.1f}  total {ks + ku:8.1f}")
        try:
            import vllm
        except ImportError as error:
            print(f"         vLLM not importable ({error}); kvsched core only")
            continue
        vs, vu = _medians(engine_step_times("vllm", running, args.waiting, args.steps, shuffled))
        a_s, a_u = _medians(engine_step_times("kvsched", running, args.waiting, args.steps, shuffled))
        print(
            f"         vLLM {vllm.__version__} Scheduler schedule {vs:8.1f}  update {vu:8.1f}  total {vs + vu:8.1f}\n"
            f"         kvsched adapter     schedule {a_s:8.1f}  update {a_u:8.1f}  total {a_s + a_u:8.1f}\n"
            f"         vLLM / adapter      schedule {vs / a_s:7.1f}x  update {vu / a_u:7.1f}x  total "
            f"{(vs + vu) / (a_s + a_u):7.1f}x\n"
            f"         vLLM / core         total {(vs + vu) / (ks + ku):7.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
