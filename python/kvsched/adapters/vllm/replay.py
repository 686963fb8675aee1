"""Requests replayed through a real vLLM engine stepped in this process: what ``kvsched calibrate``
measures and what the simulator's fidelity is judged against (bench/fidelity.py).

Terms
  request    a trace row: arrival (seconds), prompt length, output length. The prompt is random
             token ids (seeded), so no two prompts share a prefix unless the caller's do.
  clock      ``cpu``: the engine process's CPU seconds, advanced by each ``engine.step()`` only, and
             moved to the next arrival while the engine is idle; with one torch thread it is the
             engine's own time, other processes' load left out (not their contention for the core's
             caches). ``wall``: the wall clock, idle gaps slept. A token is stamped with the clock
             when the step that made it returns.
  step       one ``engine.step()``: its features (kvsched.sim.profiles.STEP_FEATURES, read from the
             SchedulerOutput: a row of more than one token is a prefill chunk, of one a decode) and
             its seconds on the clock (scheduler, model and output processing together).

Ending at the trace's length. Every request asks for ``max_tokens`` (what the scheduler sees, like
the simulator's ``--max-new-tokens``), cut to the context, with ``ignore_eos``; once it holds the
trace's output length, the replay drops it from the frontend and finishes it in the scheduler as
FINISHED_STOPPED, between that step and the next: the state change a stop token makes in the
step's update. So the scheduler does not know the length in advance but learns it at the finish,
as in the simulator. (An abort would not do: vLLM's abort tells the scheduler no output length,
and kvsched's admission learns from the lengths of finished requests.)

Needs the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here before vLLM
is imported) to see each step's SchedulerOutput.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...sim.profiles import STEP_FEATURES, step_features

CLOCKS = ("cpu", "wall")
MAX_IDLE_STEPS = 1000  # steps in a row that schedule nothing before the replay gives up


@dataclass
class ReplayResult:
    """Per request (in the order given): times on the replay's clock, NaN where none; per step: features."""
    arrival_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    max_gap_s: np.ndarray
    output_tokens: np.ndarray  # tokens each request received
    preemptions: np.ndarray
    steps: dict  # STEP_FEATURES -> array, plus "seconds" and "wall_seconds"
    wall_s: float

    def per_request(self) -> dict:
        """TTFT, TPOT and worst gap per request (NaN where a request has too few tokens)."""
        multi = self.output_tokens > 1
        tpot = np.where(multi, (self.finish_s - self.first_token_s) / np.maximum(self.output_tokens - 1, 1), np.nan)
        return dict(ttft_s=self.first_token_s - self.arrival_s, tpot_s=tpot,
                    max_gap_s=np.where(multi, self.max_gap_s, np.nan), e2e_s=self.finish_s - self.arrival_s)


def engine_options(model: str, *, kv_capacity_tokens: int, block_size: int, max_model_len: int, max_num_seqs: int,
                   max_num_batched_tokens: int, dtype: str = "float32", scheduler: str = "kvsched",
                   kvsched_options: Optional[dict] = None, seed: int = 0) -> dict:
    """vLLM ``LLM(...)`` keyword arguments for a replay: a KV cache of exactly ``kv_capacity_tokens``
    (rounded down to blocks), prefix caching off (random prompts share nothing), eager mode."""
    if scheduler not in ("kvsched", "vllm"):
        raise ValueError(f"scheduler: want 'kvsched' or 'vllm', got {scheduler!r}")
    num_blocks = kv_capacity_tokens // block_size
    if num_blocks < 1:
        raise ValueError(f"kv_capacity_tokens: {kv_capacity_tokens} holds no block of {block_size} tokens")
    options = dict(model=model, dtype=dtype, enforce_eager=True, seed=seed, gpu_memory_utilization=0.1,
                   enable_prefix_caching=False, block_size=block_size, num_gpu_blocks_override=num_blocks,
                   max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens)
    if scheduler == "kvsched":
        options["scheduler_cls"] = "kvsched.adapters.vllm.Scheduler"
        options["additional_config"] = {"kvsched": dict(kvsched_options or {})}
    elif kvsched_options:
        raise ValueError("kvsched_options: act only with scheduler='kvsched'")
    return options


def start_engine(options: dict):
    """An in-process vLLM engine (``vllm.LLM``) with these options; its step-level engine is ``.llm_engine``."""
    current = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if current not in (None, "0"):
        raise RuntimeError(f"VLLM_ENABLE_V1_MULTIPROCESSING={current}: the replay needs the engine core in "
                           "this process; unset it or set it to 0")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    return LLM(**options)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def replay(llm, arrival_s: np.ndarray, prompt_tokens: np.ndarray, output_tokens: np.ndarray, *,
           max_new_tokens: int, clock: str = "cpu", seed: int = 0, vocab_size: Optional[int] = None,
           rounds: Optional[np.ndarray] = None, warmup: int = 4) -> ReplayResult:
    """Replays the requests through ``llm`` (from :func:`start_engine`) and measures every step.

    ``rounds`` (calibration): instead of arrival times, round numbers; a round's requests arrive
    together once every earlier request has finished. ``warmup`` lone requests run first, unmeasured
    (the first steps of a fresh engine pay one-time costs)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock: want one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and torch_threads() > 1:  # the process's CPU time sums its threads
        raise ValueError(f"clock: 'cpu' times the engine by this process's CPU time, which needs one torch thread; "
                         f"torch has {torch_threads()} (set OMP_NUM_THREADS=1) or use clock='wall'")
    arrival_s = np.asarray(arrival_s, np.float64)
    prompt_tokens = np.asarray(prompt_tokens, np.int64)
    output_tokens = np.asarray(output_tokens, np.int64)
    n = prompt_tokens.size
    if arrival_s.size != n or output_tokens.size != n:
        raise ValueError(f"arrival_s, prompt_tokens, output_tokens: want equal lengths, got "
                         f"{arrival_s.size}, {n}, {output_tokens.size}")
    if not np.all(np.isfinite(arrival_s) & (arrival_s >= 0)):
        raise ValueError("arrival_s: want finite times >= 0")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    config = engine.vllm_config
    max_model_len = int(config.model_config.max_model_len)
    vocab = int(vocab_size or config.model_config.get_vocab_size())
    too_long = (prompt_tokens < 1) | (prompt_tokens + np.maximum(output_tokens, 1) > max_model_len) | (output_tokens < 1)
    if too_long.any():
        at = int(np.argmax(too_long))
        raise ValueError(f"prompt_tokens, output_tokens: request {at} ({prompt_tokens[at]} + {output_tokens[at]} "
                         f"tokens) does not fit max_model_len {max_model_len} (or is empty)")
    capped = np.minimum(max_new_tokens, max_model_len - prompt_tokens)
    if np.any(output_tokens > capped):
        at = int(np.argmax(output_tokens > capped))
        raise ValueError(f"output_tokens: request {at} wants {output_tokens[at]} tokens, more than max_new_tokens "
                         f"{max_new_tokens} (cut to the context) lets it have")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(4, vocab, size=int(p)).tolist() for p in prompt_tokens]

    def params(length: int):
        return SamplingParams(temperature=0.0, max_tokens=int(min(max_new_tokens, max_model_len - length)),
                              ignore_eos=True, detokenize=False)

    # Unmeasured: one-time costs of a fresh engine. Aborted, not finished, so that admission learns
    # no output length from them (it learns from finishes only).
    warm = [f"warmup-{w}" for w in range(warmup)]
    for w, req_id in enumerate(warm):
        engine.add_request(req_id, TokensPrompt(prompt_token_ids=prompts[w % max(n, 1)][:64] or [4]),
                           SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, detokenize=False))
    for _ in range(8):
        if engine.has_unfinished_requests():
            engine.step()
    if warm:
        engine.abort_request(warm)
    while engine.has_unfinished_requests():
        engine.step()

    scheduler = _scheduler_of(llm)
    steps = {name: [] for name in STEP_FEATURES}
    preemptions = np.zeros(n, np.int64)
    schedule = scheduler.schedule

    def recorded_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        tokens = output.num_scheduled_tokens
        rows = [(new.req_id, new.num_computed_tokens) for new in output.scheduled_new_reqs]
        cached = output.scheduled_cached_reqs
        rows += list(zip(cached.req_ids, cached.num_computed_tokens))
        count = np.array([tokens[r] for r, _ in rows], np.int64)
        context = np.array([c for _, c in rows], np.int64)
        features = step_features(count, context, count > 1)
        for name in STEP_FEATURES:
            steps[name].append(features[name])
        for req_id in output.preempted_req_ids or ():
            preemptions[int(req_id.split("-")[0])] += 1
        return output

    scheduler.schedule = recorded_schedule
    first = np.full(n, np.nan)
    last = np.full(n, np.nan)
    max_gap = np.zeros(n)
    got = np.zeros(n, np.int64)
    seconds: list[float] = []
    wall_seconds: list[float] = []
    order = np.lexsort((np.arange(n), rounds if rounds is not None else arrival_s))
    arrived = np.full(n, np.nan)
    next_index = 0
    now = 0.0
    finished = 0
    idle_steps = 0  # consecutive steps that scheduled nothing
    wall0 = time.perf_counter()
    try:
        while finished < n:
            if rounds is not None:
                if not engine.has_unfinished_requests() and next_index < n:
                    current = rounds[order[next_index]]
                    while next_index < n and rounds[order[next_index]] == current:
                        i = int(order[next_index])
                        arrived[i] = now
                        engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompts[i]), params(prompt_tokens[i]))
                        next_index += 1
            else:
                if not engine.has_unfinished_requests() and next_index < n:
                    idle_until = arrival_s[order[next_index]]
                    if clock == "wall":
                        time.sleep(max(0.0, idle_until - (time.perf_counter() - wall0)))
                    now = max(now, idle_until)
                if clock == "wall":
                    now = time.perf_counter() - wall0
                while next_index < n and arrival_s[order[next_index]] <= now:
                    i = int(order[next_index])
                    arrived[i] = arrival_s[i]
                    engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompts[i]), params(prompt_tokens[i]))
                    next_index += 1
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"the engine holds no request while {n - finished} have not finished")
            cpu, wall = time.process_time(), time.perf_counter()
            outputs = engine.step()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            seconds.append(cpu if clock == "cpu" else wall)
            wall_seconds.append(wall)
            now = now + cpu if clock == "cpu" else time.perf_counter() - wall0
            done = []
            for out in outputs:
                i = int(out.request_id)
                k = len(out.outputs[0].token_ids)
                if k > got[i]:
                    if np.isnan(first[i]):
                        first[i] = now
                    else:
                        max_gap[i] = max(max_gap[i], now - last[i])
                    last[i] = now
                    got[i] = k
                if (k >= output_tokens[i] or out.finished) and i not in done:
                    done.append(i)
            unfinished = [str(i) for i in done if got[i] >= output_tokens[i] and not _finished(outputs, i)]
            if unfinished:
                _stop(engine, scheduler, unfinished)
            finished += len(done)
            if len(seconds) != len(steps["rows"]):
                raise RuntimeError(f"{len(seconds)} engine steps but {len(steps['rows'])} schedule() calls")
            idle_steps = idle_steps + 1 if steps["tokens"][-1] == 0 else 0
            if idle_steps >= MAX_IDLE_STEPS:
                raise RuntimeError(f"{MAX_IDLE_STEPS} steps in a row scheduled nothing while {n - finished} requests "
                                   "remain (a request the KV cache cannot hold?)")
    finally:
        scheduler.schedule = schedule
        left = [str(i) for i in range(n) if not np.isnan(arrived[i]) and got[i] < output_tokens[i]]
        if finished < n and left:  # an error: the engine is left without the replay's requests
            engine.abort_request(left)
    short = np.flatnonzero(got < output_tokens)
    if short.size:
        raise RuntimeError(f"request {short[0]} ended with {got[short[0]]} of its {output_tokens[short[0]]} tokens")
    step_arrays = {name: np.asarray(values) for name, values in steps.items()}
    step_arrays.update(seconds=np.asarray(seconds), wall_seconds=np.asarray(wall_seconds))
    return ReplayResult(arrived, first, last, max_gap, got, preemptions, step_arrays, time.perf_counter() - wall0)


def _stop(engine, scheduler, request_ids: list) -> None:
    """Ends requests as a stop token would: the frontend forgets them, the scheduler finishes them
    as stopped (with their output length)."""
    from vllm.v1.request import RequestStatus

    internal = engine.output_processor.abort_requests(request_ids, internal=False)
    scheduler.finish_requests(internal, RequestStatus.FINISHED_STOPPED)


def _finished(outputs, index: int) -> bool:
    return any(out.finished for out in outputs if out.request_id == str(index))
