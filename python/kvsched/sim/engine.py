"""A discrete-event engine that drives the real kvsched.Scheduler.

Each iteration: requests that have arrived are added, ``Scheduler.schedule()`` plans the step,
simulated time advances by the model profile's iteration time of that plan, every request whose
scheduled chunk reaches the end of its sequence emits one token, and ``Scheduler.update()``
reports them. Only the engine knows true output lengths (it ends a request there); the scheduler
sees ``max_new_tokens``, except under ``oracle`` admission, which is given the true lengths.
Preemption is by recompute (a preempted request's later prefill of its lost tokens is simply
part of the steps that run it), or by swap: the step then also takes the swap planner's cost-model
time for the plan's copies, executed before the forward pass and not overlapped with it (as a
blocking engine does; an engine that overlaps them only does better). The host tier's copies are
priced the same way, except the ones the plan marks as overlappable (write-throughs, prefetched
loads): the step then takes the longer of its forward pass and those copies. Per-step work is numpy over
the plan's arrays; there is no scheduling code here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np

from ..scheduler import Scheduler, SchedulerConfig
from .arrivals import ArrivalQueue
from .profiles import ModelProfile
from .traces import Trace
from .workloads import PriorityPlan


@dataclass(frozen=True)
class SLO:
    """A per-request service-level objective: TTFT and a bound on the token gaps, either the
    worst gap (``gap_kind="max"``) or the request's 99th-percentile gap (``"p99"``)."""

    name: str
    ttft_s: float
    gap_s: float
    gap_kind: str = "max"


LAX = SLO("lax", ttft_s=10.0, gap_s=1.5, gap_kind="max")  # LightLLM Past-Future
STRICT = SLO("strict", ttft_s=2.0, gap_s=0.2, gap_kind="p99")
SLOS = {"lax": LAX, "strict": STRICT}


@dataclass
class EngineConfig:
    """The simulated engine: model profile, KV capacity and the scheduler's budgets."""

    profile: ModelProfile
    kv_capacity_tokens: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 2048  # SchedulerConfig.max_prefill_chunk (0: only the step budget)
    prefill_attention_budget: int = 2048 * (8192 + 1024)  # SchedulerConfig's (0: no limit)
    max_new_tokens: int = 2048
    max_model_len: int = 0  # 0: the profile's
    preemption: str = "recompute"  # or "swap" / "auto" (SchedulerConfig.preemption)
    # Host KV memory in tokens: > 0 adds the host tier of the prefix cache (any preemption mode) and
    # is the pool swap shares with it; 0: no tier, and swap gets four times the device KV capacity.
    host_kv_tokens: int = 0
    host_cache_write: Optional[str] = None  # host tier: SchedulerConfig.host_cache_write (None: its default)
    host_cache_load: Optional[str] = None  # host tier: SchedulerConfig.host_cache_load (None: its default)
    scheduler_overrides: dict = field(default_factory=dict)

    def swap_options(self) -> dict:
        """SchedulerConfig options for preemption by swap and the host tier: a host pool, the bytes
        of a block of this model in the per-layer K/V layout, the host link's bandwidth, and
        recompute priced at the profile's prefill time per token."""
        host_tier = self.host_kv_tokens > 0
        if self.preemption == "recompute" and not host_tier:
            return {"preemption": "recompute"}
        host_tokens = self.host_kv_tokens or 4 * self.kv_capacity_tokens
        return {
            "preemption": self.preemption,
            "host_prefix_cache": host_tier,
            "host_cache_write": self.host_cache_write if host_tier else None,
            "host_cache_load": self.host_cache_load if host_tier else None,
            "num_host_blocks": max(1, host_tokens // self.block_size),
            "swap_block_bytes": self.profile.kv_bytes_per_token * self.block_size,
            "swap_tensors_per_block": 2 * self.profile.num_layers,
            "swap_cost": self.profile.swap_cost(),
            "recompute_seconds_per_token": self.profile.prefill_time_s(1024) / 1024,
        }

    def context_limit(self) -> int:
        return self.max_model_len or self.profile.max_model_len


@dataclass
class PreparedTrace:
    """A trace cut to what the model accepts: prompts beyond the context are rejected, outputs
    beyond max_new_tokens or the context are clipped; both are counted and reported."""

    trace: Trace
    max_new_tokens: np.ndarray
    rejected_too_long: int
    clipped_outputs: int
    workload: Optional[Trace] = None  # the trace before the cut
    source_index: Optional[np.ndarray] = None  # each kept request's index in ``workload``


def prepare(trace: Trace, engine: EngineConfig) -> PreparedTrace:
    """Cuts ``trace`` to the context: a session's later requests go with a rejected one (the
    conversation cannot go on), counted as rejected too."""
    limit = engine.context_limit()
    keep = trace.prompt_tokens < limit
    if trace.has_sessions:
        follows = np.flatnonzero(trace.parent_index >= 0)
        while True:  # parents come first: one pass per turn depth
            dropped = follows[keep[follows] & ~keep[trace.parent_index[follows]]]
            if dropped.size == 0:
                break
            keep[dropped] = False
    kept = trace.select(np.flatnonzero(keep)) if not keep.all() else trace
    max_new = np.minimum(engine.max_new_tokens, limit - kept.prompt_tokens)
    clipped = kept.output_tokens > max_new
    kept = replace(kept, output_tokens=np.minimum(kept.output_tokens, max_new))
    return PreparedTrace(kept, max_new.astype(np.int64), int((~keep).sum()), int(clipped.sum()), trace,
                         np.flatnonzero(keep))


# Session keys are tagged so that they never equal a (prefix id, position) key of a Mooncake trace.
_SESSION_KEY_TAG = np.uint64(1 << 63)


def _block_keys(trace: Trace, index: int, block_size: int, session: int, max_tokens: int) -> Optional[np.ndarray]:
    """Prefix-cache keys of a request's full blocks, or None.

    Shared-prefix ids (Mooncake): block b lies in prefix block b * block_size // prefix_block_tokens,
    and the pair (prefix id, position inside it) identifies its content. Sessions with a shared
    context: a conversation only grows, so (session, block index) identifies a block's content;
    keys run to the request's last possible block (prompt + max_new_tokens, which says nothing of
    its true length) so that its output blocks are cached for the next turn too."""
    if trace.shared_context:
        blocks = max_tokens // block_size
        keys = np.empty((blocks, 2), dtype=np.uint64)
        keys[:, 0] = np.uint64(session) | _SESSION_KEY_TAG
        keys[:, 1] = np.arange(1, blocks + 1, dtype=np.uint64)
        return keys
    if trace.prefix_ids is None or trace.prefix_block_tokens % block_size:
        return None
    ids = trace.prefix_ids[index]
    per_prefix = trace.prefix_block_tokens // block_size
    full_blocks = min(int(trace.prompt_tokens[index]) // block_size, ids.size * per_prefix)
    blocks = np.arange(full_blocks)
    keys = np.empty((full_blocks, 2), dtype=np.uint64)
    keys[:, 0] = ids[blocks // per_prefix].astype(np.uint64)
    keys[:, 1] = (blocks % per_prefix + 1).astype(np.uint64)
    return keys


@dataclass
class RunLog:
    """Per-request outcomes of one simulated run (index = position in the prepared trace;
    ``arrival_s`` holds when each request really arrived, NaN for one never sent)."""

    admission: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    first_token_s: np.ndarray  # NaN until the first token
    finish_s: np.ndarray  # NaN when not completed
    first_scheduled_s: np.ndarray
    max_gap_s: np.ndarray
    num_gaps: np.ndarray
    slow_gaps: dict  # SLO name -> per-request count of gaps above its p99 bound
    preemptions: np.ndarray
    rejected: np.ndarray  # by the scheduler (a prompt the cache can never hold)
    rejected_too_long: int  # by the model's context, before the run
    clipped_outputs: int
    scheduler_cpu_s: float
    steps: int
    kv_utilization: float  # time-weighted mean fraction of KV blocks in use
    swap_bytes: int = 0  # both directions
    swap_preemptions: int = 0  # preemptions (counted in `preemptions`) that swapped instead of recomputing
    swap_time_s: float = 0.0  # simulated time spent on swap copies
    prefix_hit_tokens: int = 0  # prompt tokens found in the device prefix cache
    host_hit_tokens: int = 0  # prompt tokens loaded from the host tier
    cache_write_bytes: int = 0  # host tier: written back (device -> host)
    cache_load_bytes: int = 0  # host tier: loaded (host -> device)
    computed_tokens: int = 0  # tokens the engine computed (prefill, recompute and decode)
    step_cpu_us: np.ndarray = field(default_factory=lambda: np.zeros(0))  # schedule() + update() per step
    policy: str = "fcfs"  # the ordering policy


def simulate(
    prepared: PreparedTrace,
    engine: EngineConfig,
    admission: str,
    policy: Optional[str] = None,
    progress: Optional[Callable[[int], None]] = None,
    priorities: Optional[PriorityPlan] = None,
) -> RunLog:
    """Replays ``prepared`` through a fresh Scheduler under ``admission`` and the ordering
    ``policy`` (default fcfs, or priority with ``priorities``); deterministic. With ``priorities``
    (built on the prepared trace) sessions carry priorities that change while they live, which
    only the ``priority`` policy (it evicts for a more urgent request) acts on."""
    policy = policy or ("priority" if priorities is not None else "fcfs")
    if priorities is not None and policy != "priority":
        raise ValueError(f"priorities: only the priority policy uses them, not {policy!r}")
    trace = prepared.trace
    n = len(trace)
    block_size = engine.block_size
    num_blocks = max(1, engine.kv_capacity_tokens // block_size)
    config = SchedulerConfig(
        num_blocks=num_blocks, block_size=block_size, max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens, max_prefill_chunk=engine.max_prefill_chunk,
        prefill_attention_budget=engine.prefill_attention_budget, admission=admission, **{**engine.swap_options(), **engine.scheduler_overrides},
    )
    scheduler = Scheduler(config, policy=policy)
    prompt, output = trace.prompt_tokens, trace.output_tokens
    arrivals = ArrivalQueue(trace)
    arrival = arrivals.arrival_s  # filled in as followers are sent
    has_keys = trace.shared_context or (trace.prefix_ids is not None and trace.prefix_block_tokens % block_size == 0)
    session = trace.sessions()
    session_priority = None if priorities is None else priorities.initial.copy()
    live_of_session = np.full(int(session.max()) + 1, -1, np.int64)  # its request in the scheduler
    generated = np.zeros(n, np.int64)
    first_token = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    first_scheduled = np.full(n, np.nan)
    last_token = np.zeros(n)
    max_gap = np.zeros(n)
    num_gaps = np.zeros(n, np.int64)
    p99_slos = [slo for slo in SLOS.values() if slo.gap_kind == "p99"]
    slow = {slo.name: np.zeros(n, np.int64) for slo in p99_slos}
    preemptions = np.zeros(n, np.int64)
    rejected = np.zeros(n, bool)
    cpu = 0.0
    t = 0.0
    ended = 0
    steps = 0
    step_cpus: list[float] = []  # schedule() + update() of each step, seconds
    util_time = 0.0
    swap_time = 0.0
    unflushed_adds = False
    next_change = 0

    def end(ids: np.ndarray) -> None:
        nonlocal ended
        live_of_session[session[ids]] = -1
        ended += int(ids.size)

    while ended < n:
        ids = arrivals.due(t)
        if ids.size:
            max_tokens = prompt[ids] + prepared.max_new_tokens[ids]
            keys = ([_block_keys(trace, i, block_size, s, m) for i, s, m in
                     zip(ids.tolist(), session[ids].tolist(), max_tokens.tolist())] if has_keys else None)
            start = time.perf_counter()
            scheduler.add_requests(
                ids, prompt[ids], prepared.max_new_tokens[ids], arrival_times=arrival[ids],
                true_output_lens=output[ids] if admission == "oracle" else None, block_keys=keys,
                priorities=None if priorities is None else session_priority[session[ids]],
            )
            cpu += time.perf_counter() - start
            live_of_session[session[ids]] = ids
            unflushed_adds = True
        if priorities is not None:
            due = int(np.searchsorted(priorities.change_s, t, side="right"))
            if due > next_change:
                index = priorities.change_index[next_change:due][::-1]  # the latest change per session wins
                value = priorities.change_priority[next_change:due][::-1]
                index, first = np.unique(index, return_index=True)
                session_priority[index] = value[first]
                request = live_of_session[index]
                keep = request >= 0
                if keep.any():
                    start = time.perf_counter()
                    scheduler.set_priority(request[keep], value[first][keep])
                    cpu += time.perf_counter() - start
                next_change = due
        if not unflushed_adds and not scheduler.has_unfinished_requests():
            t = arrivals.next_time()  # idle until the next arrival
            if not np.isfinite(t):
                raise RuntimeError("requests are left that will never arrive")
            continue
        start = time.perf_counter()
        plan = scheduler.schedule()
        step_cpu = time.perf_counter() - start
        cpu += step_cpu
        unflushed_adds = False
        steps += 1
        if plan.rejected_ids.size:
            lost = np.concatenate([plan.rejected_ids, arrivals.cancelled(plan.rejected_ids)])
            rejected[lost] = True
            end(lost)
        if plan.preempted_ids.size:
            preemptions[plan.preempted_ids] += 1
        if plan.swapped_out_ids.size:
            preemptions[plan.swapped_out_ids] += 1
        swap_time += plan.swap_seconds
        ids = plan.req_ids
        if ids.size == 0:
            t += plan.swap_seconds  # swap-outs of a step that runs nothing still take their time
            scheduler.update(ids, ids, np.zeros(0, bool))
            step_cpus.append(step_cpu)
            if np.isfinite(arrivals.next_time()):
                t = max(t, arrivals.next_time())
            elif scheduler.has_unfinished_requests():
                raise RuntimeError("the scheduler planned nothing while requests wait and none will arrive")
            continue
        forward = engine.profile.step_time_s(plan.num_tokens, plan.computed_offsets, plan.is_prefill)
        overlap = plan.cache_overlap_seconds
        dt = max(forward, overlap) + plan.swap_seconds - overlap
        unscheduled = np.isnan(first_scheduled[ids])
        first_scheduled[ids[unscheduled]] = t
        t += dt
        reached = plan.computed_offsets + plan.num_tokens >= prompt[ids] + generated[ids]
        emitting = ids[reached]
        first = generated[emitting] == 0
        first_token[emitting[first]] = t
        later = emitting[~first]
        gaps = t - last_token[later]
        max_gap[later] = np.maximum(max_gap[later], gaps)
        num_gaps[later] += 1
        for slo in p99_slos:
            slow[slo.name][later] += gaps > slo.gap_s
        last_token[emitting] = t
        generated[emitting] += 1
        done = reached & (generated[ids] >= output[ids])
        start = time.perf_counter()
        scheduler.update(ids, reached.astype(np.int64), done)
        elapsed = time.perf_counter() - start
        step_cpu += elapsed
        cpu += elapsed
        step_cpus.append(step_cpu)
        if done.any():
            finished = ids[done]
            finish[finished] = t
            end(finished)
            arrivals.finished(finished, t)
            if progress is not None:
                progress(int(done.sum()))
        util_time += dt * (scheduler._former.allocator_stats()["num_used"] / num_blocks)
    makespan = max(t - float(np.nanmin(arrival)), 1e-9)
    stats = scheduler.stats()
    return RunLog(
        admission, arrival, prompt, output, first_token, finish, first_scheduled, max_gap, num_gaps, slow, preemptions,
        rejected, prepared.rejected_too_long, prepared.clipped_outputs, cpu, steps, util_time / makespan,
        swap_bytes=int(stats["swap_out_bytes"] + stats["swap_in_bytes"]),
        swap_preemptions=int(stats["swap_preemptions"]), swap_time_s=swap_time,
        prefix_hit_tokens=int(stats["kv"]["prefix_hit_blocks"]) * block_size,
        host_hit_tokens=int(stats["host_hit_blocks"]) * block_size,
        cache_write_bytes=int(stats["cache_write_bytes"]), cache_load_bytes=int(stats["cache_load_bytes"]),
        computed_tokens=int(stats["scheduled_tokens"]),
        step_cpu_us=np.asarray(step_cpus) * 1e6, policy=policy,
    )
