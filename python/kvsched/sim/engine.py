"""The simulated engine: an instance that drives the real kvsched.Scheduler one step at a time.

:class:`EngineInstance` runs the requests a driver (``sim/driver.py``) hands it. Each step: those
handed to it since the last step are added, ``Scheduler.schedule()`` plans the step,
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
from typing import Optional

import numpy as np

from .._core import OutOfBlocks
from ..risk import PricedAdmission
from ..scheduler import Scheduler, SchedulerConfig
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
    # The scheduler cuts max_new_tokens to what the whole KV cache holds beside the prompt (a request
    # alone must be able to finish) and finishes the request there: the workload's output is cut the
    # same way, so that the run counts what the scheduler does. A prompt the cache cannot hold at all
    # keeps the context's cut: the scheduler rejects it, and it is not counted as clipped.
    cache_tokens = max(1, engine.kv_capacity_tokens // engine.block_size) * engine.block_size
    fits = kept.prompt_tokens < cache_tokens
    max_new = np.where(fits, np.minimum(max_new, cache_tokens - kept.prompt_tokens), max_new)
    clipped = fits & (kept.output_tokens > max_new)
    kept = replace(kept, output_tokens=np.minimum(kept.output_tokens, max_new))
    return PreparedTrace(kept, max_new.astype(np.int64), int((~keep).sum()), int(clipped.sum()), trace,
                         np.flatnonzero(keep))


# A step whose tokens reach this share of max_num_batched_tokens, or whose prefill attention reaches
# this share of prefill_attention_budget (deep in a long prompt the chunks shrink to stay within it),
# is full: a request left waiting then waits for compute, not for KV (kvsched.sim.diagnosis).
STEP_FULL_SHARE = 0.9

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
    prefill_start_s: np.ndarray  # first token minus its prefill steps: queueing = this - arrival
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
    # What bound the run (kvsched.sim.diagnosis), summed over instances: the peak fraction of KV
    # blocks in use (the largest instance's), seconds of engine steps, and seconds with requests left
    # waiting after a step's plan, all of them and those whose step had room (token budget and a
    # sequence slot) for more, so that KV or admission held them back.
    kv_peak: float = 0.0
    busy_s: float = 0.0
    backlog_s: float = 0.0
    backlog_kv_s: float = 0.0
    instances: int = 1
    kv_capacity_tokens: int = 0  # of one instance
    run: str = ""  # the run's name in reports: its admission mode, and its fleet's dispatch over several instances


@dataclass
class StepEvents:
    """What the steps of one :meth:`EngineInstance.advance` call ended: requests that finished (with
    when) and requests the scheduler rejected."""

    finished: np.ndarray
    finish_s: np.ndarray
    rejected: np.ndarray
    clock: float
    busy: bool
    rows: dict = field(default_factory=dict)  # per-request measurements of ``finished``


@dataclass
class MigrationRecord:
    """A request in flight between instances: what its destination needs to go on with it (the
    scheduler's counts and the per-request measurements made so far)."""

    index: int
    num_generated: int
    num_computed: int
    first_token_s: float
    prefill_start_s: float
    last_token_s: float
    max_gap_s: float
    num_gaps: int
    slow_gaps: dict
    preemptions: int


class EngineInstance:
    """One simulated engine instance over the prepared trace (request ids are trace indices; the
    instance runs those handed to it with :meth:`add`). ``clock`` is when its next step starts."""

    def __init__(self, prepared: PreparedTrace, engine: EngineConfig, admission: str, policy: Optional[str] = None,
                 priorities: Optional[PriorityPlan] = None):
        policy = policy or ("priority" if priorities is not None else "fcfs")
        if priorities is not None and policy != "priority":
            raise ValueError(f"priorities: only the priority policy uses them, not {policy!r}")
        self.prepared, self.engine, self.admission, self.policy = prepared, engine, admission, policy
        trace = prepared.trace
        n = len(trace)
        self.num_blocks = max(1, engine.kv_capacity_tokens // engine.block_size)
        overrides = {**engine.swap_options(), **engine.scheduler_overrides}
        # "auto": the risk priced from this engine's simulated steps, as the vLLM adapter does.
        priced = overrides.get("overflow_scenarios") == "auto"
        if priced:
            overrides["overflow_scenarios"] = 0
        config = SchedulerConfig(
            num_blocks=self.num_blocks, block_size=engine.block_size, max_num_seqs=engine.max_num_seqs,
            max_num_batched_tokens=engine.max_num_batched_tokens, max_prefill_chunk=engine.max_prefill_chunk,
            prefill_attention_budget=engine.prefill_attention_budget, admission=admission, **overrides,
        )
        self.scheduler = Scheduler(config, policy=policy)
        self.priced_admission = PricedAdmission(self.scheduler) if priced else None
        self._has_keys = trace.shared_context or (
            trace.prefix_ids is not None and trace.prefix_block_tokens % engine.block_size == 0)
        self._session = trace.sessions()
        self._priorities = priorities
        self._session_priority = None if priorities is None else priorities.initial.copy()
        self._live_of_session = np.full(int(self._session.max()) + 1, -1, np.int64)  # its request here
        self._next_change = 0
        self._has_follower = np.zeros(n, bool)  # a step that finishes one stops advance()
        if trace.has_sessions:
            self._has_follower[trace.parent_index[trace.parent_index >= 0]] = True
        self.arrival = np.full(n, np.nan)
        self.generated = np.zeros(n, np.int64)
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.prefill_start = np.full(n, np.nan)  # when its prefill would have started, had no step left it out
        self.prefill_busy = np.zeros(n)  # seconds of steps that computed its prompt, before its first token
        self.last_token = np.zeros(n)
        self.max_gap = np.zeros(n)
        self.num_gaps = np.zeros(n, np.int64)
        self._p99_slos = [slo for slo in SLOS.values() if slo.gap_kind == "p99"]
        self.slow = {slo.name: np.zeros(n, np.int64) for slo in self._p99_slos}
        self.preemptions = np.zeros(n, np.int64)
        self.rejected = np.zeros(n, bool)
        self.cpu = 0.0
        self.clock = 0.0
        self.steps = 0
        self.step_cpus: list[float] = []  # schedule() + update() of each step, seconds
        self.util_time = 0.0
        # What bound the run (kvsched.sim.diagnosis): the peak share of KV blocks in use, the time
        # steps took, and of it the time with requests left waiting after schedule() (backlog),
        # split by whether the step still had token budget and a sequence slot for them (then KV
        # or admission held them back) or not (compute: the step was full).
        self.kv_peak = 0.0
        self.busy_time = 0.0
        self.backlog_time = 0.0
        self.backlog_kv_time = 0.0
        self.swap_time = 0.0
        self.first_arrival = np.inf
        self._unflushed_adds = False

    # ---- requests ----
    def block_keys(self, index: int) -> Optional[np.ndarray]:
        """Prefix-cache keys of request ``index`` (None without keys in the trace)."""
        if not self._has_keys:
            return None
        trace, block_size = self.prepared.trace, self.engine.block_size
        max_tokens = int(trace.prompt_tokens[index] + self.prepared.max_new_tokens[index])
        return _block_keys(trace, index, block_size, int(self._session[index]), max_tokens)

    def add(self, ids: np.ndarray, arrival_s: np.ndarray) -> None:
        """Requests ``ids`` arrived at ``arrival_s``; they join at the next step (an idle instance's
        clock moves to the first arrival)."""
        if ids.size == 0:
            return
        trace = self.prepared.trace
        prompt, output = trace.prompt_tokens, trace.output_tokens
        self._forget(ids)
        self.arrival[ids] = arrival_s
        self.first_arrival = min(self.first_arrival, float(np.min(arrival_s)))
        if not self.busy():
            self.clock = max(self.clock, float(np.min(arrival_s)))
        keys = [self.block_keys(i) for i in ids.tolist()] if self._has_keys else None
        start = time.perf_counter()
        self.scheduler.add_requests(
            ids, prompt[ids], self.prepared.max_new_tokens[ids], arrival_times=arrival_s,
            true_output_lens=output[ids] if self.admission == "oracle" else None, block_keys=keys,
            priorities=None if self._priorities is None else self._session_priority[self._session[ids]],
            client_ids=self._session[ids],  # a session (closed-loop client, conversation) is a client to vtc
            class_ids=None if trace.class_ids is None else trace.class_ids[ids],
        )
        self.cpu += time.perf_counter() - start
        self._live_of_session[self._session[ids]] = ids
        self._unflushed_adds = True

    def _forget(self, ids: np.ndarray) -> None:
        """Clears what an earlier visit of these requests left (one that migrated away or whose
        instance failed comes back from scratch)."""
        for array, value in ((self.generated, 0), (self.first_token, np.nan), (self.finish, np.nan),
                             (self.prefill_start, np.nan), (self.prefill_busy, 0), (self.last_token, 0), (self.max_gap, 0),
                             (self.num_gaps, 0), (self.preemptions, 0), (self.rejected, False)):
            array[ids] = value
        for counts in self.slow.values():
            counts[ids] = 0

    def busy(self) -> bool:
        return self._unflushed_adds or self.scheduler.has_unfinished_requests()

    def _apply_priority_changes(self) -> None:
        plan = self._priorities
        due = int(np.searchsorted(plan.change_s, self.clock, side="right"))
        if due <= self._next_change:
            return
        index = plan.change_index[self._next_change:due][::-1]  # the latest change per session wins
        value = plan.change_priority[self._next_change:due][::-1]
        index, first = np.unique(index, return_index=True)
        self._session_priority[index] = value[first]
        request = self._live_of_session[index]
        keep = request >= 0
        if keep.any():
            start = time.perf_counter()
            self.scheduler.set_priority(request[keep], value[first][keep])
            self.cpu += time.perf_counter() - start
        self._next_change = due

    def _ended(self, ids: np.ndarray) -> None:
        self._live_of_session[self._session[ids]] = -1

    # ---- steps ----
    def advance(self, until: float, next_arrival_s: float) -> StepEvents:
        """Runs steps while the clock is before ``until``, and stops early after a step that
        finished a request with a follower (it arrives later: the driver must see it). A step that
        plans nothing moves the clock to ``next_arrival_s`` (the driver's next event)."""
        finished: list = []
        finish_s: list = []
        rejected: list = []
        stalled = False
        busy = self.busy()
        while busy and self.clock < until:
            done, lost, stalled = self.step(next_arrival_s)
            busy = self.busy()
            if lost.size:
                rejected.append(lost)
            if done.size:
                finished.append(done)
                finish_s.append(np.full(done.size, self.clock))
                if self._has_follower[done].any():
                    break
            if stalled:
                break
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
        ids = cat(finished, np.int64)
        rows = {"first_token": self.first_token[ids], "finish": self.finish[ids],
                "prefill_start": self.prefill_start[ids], "max_gap": self.max_gap[ids],
                "num_gaps": self.num_gaps[ids], "preemptions": self.preemptions[ids],
                "slow": {name: counts[ids] for name, counts in self.slow.items()}}
        return StepEvents(ids, cat(finish_s, np.float64), cat(rejected, np.int64), self.clock, busy, rows)

    def step(self, next_arrival_s: float) -> tuple:
        """One engine step at ``clock``: returns (finished ids, rejected ids, planned nothing)."""
        prompt, output = self.prepared.trace.prompt_tokens, self.prepared.trace.output_tokens
        if self._priorities is not None:
            self._apply_priority_changes()
        scheduler = self.scheduler
        start = time.perf_counter()
        plan = scheduler.schedule()
        step_cpu = time.perf_counter() - start
        self.cpu += step_cpu
        self._unflushed_adds = False
        self.steps += 1
        lost = plan.rejected_ids
        if lost.size:
            self.rejected[lost] = True
            self._ended(lost)
        if plan.preempted_ids.size:
            self.preemptions[plan.preempted_ids] += 1
        if plan.swapped_out_ids.size:
            self.preemptions[plan.swapped_out_ids] += 1
        self.swap_time += plan.swap_seconds
        ids = plan.req_ids
        counts = scheduler._former.stats()
        # Left waiting: in the queue, or admitted and left out of this step (its prefill waits); a
        # request whose KV this step's copies bring back (a host prefetch, a swap-in) is not left out.
        queued = counts["num_waiting"] + counts["num_swapped"] > 0
        copying = 0
        if plan.cache_load_ids.size or plan.swapped_in_ids.size:  # most steps copy nothing: no set work
            copied_in = np.union1d(plan.cache_load_ids, plan.swapped_in_ids)
            copying = np.setdiff1d(copied_in, ids, assume_unique=True).size
        left_out = counts["num_running"] > ids.size + copying
        left_waiting = queued or left_out
        if ids.size == 0:
            before = self.clock
            self.clock += plan.swap_seconds  # swap-outs of a step that runs nothing still take their time
            scheduler.update(ids, ids, np.zeros(0, bool))
            self.step_cpus.append(step_cpu)
            if plan.cache_load_ids.size or plan.swapped_in_ids.size:
                # A host prefetch (or a swap-in) with no row yet: the copies took their time above
                # (swap_seconds counts them; nothing runs to overlap) and the requests run from the
                # next plan on. Progress, not a stall.
                return np.zeros(0, np.int64), lost, False
            if np.isfinite(next_arrival_s):
                self.clock = max(self.clock, next_arrival_s)
            if queued:  # nothing fits although requests wait: held back by KV until the next event
                self.backlog_time += self.clock - before
                self.backlog_kv_time += self.clock - before
            elif scheduler.has_unfinished_requests():
                raise RuntimeError("the scheduler planned nothing while requests wait and none will arrive")
            return np.zeros(0, np.int64), lost, True
        engine = self.engine
        forward = engine.profile.step_time_s(plan.num_tokens, plan.computed_offsets, plan.is_prefill)
        overlap = plan.cache_overlap_seconds
        dt = max(forward, overlap) + plan.swap_seconds - overlap
        prefilling = ids[self.generated[ids] == 0]
        self.prefill_busy[prefilling] += dt
        self.clock += dt
        t = self.clock
        generated = self.generated
        reached = plan.computed_offsets + plan.num_tokens >= prompt[ids] + generated[ids]
        emitting = ids[reached]
        first = generated[emitting] == 0
        self.first_token[emitting[first]] = t
        # Queueing is what the first token waited beyond its own prefill steps: in the queue, and
        # admitted but left out of steps (long prompts share the prefill attention budget).
        self.prefill_start[emitting[first]] = t - self.prefill_busy[emitting[first]]
        later = emitting[~first]
        gaps = t - self.last_token[later]
        self.max_gap[later] = np.maximum(self.max_gap[later], gaps)
        self.num_gaps[later] += 1
        for slo in self._p99_slos:
            self.slow[slo.name][later] += gaps > slo.gap_s
        self.last_token[emitting] = t
        generated[emitting] += 1
        done = reached & (generated[ids] >= output[ids])
        start = time.perf_counter()
        ended = scheduler.update(ids, reached.astype(np.int64), done)
        elapsed = time.perf_counter() - start
        if ended.size != np.count_nonzero(done):
            # The scheduler finishes a request at its max_new_tokens, which prepare() cut the output to:
            # any other disagreement would lose a request from the run, so it stops here instead.
            raise RuntimeError(f"the scheduler finished {ended.size} requests where the simulated engine "
                               f"finished {np.count_nonzero(done)}")
        step_cpu += elapsed
        self.cpu += elapsed
        self.step_cpus.append(step_cpu)
        finished = ids[done]
        if finished.size:
            self.finish[finished] = t
            self._ended(finished)
        if self.priced_admission is not None:
            self.priced_admission.step(dt, int(ids.size), int(plan.num_tokens.sum()))
            if finished.size:
                self.priced_admission.finished(int(generated[finished].sum()), int(finished.size))
        used = scheduler._former.allocator_stats()["num_used"] / self.num_blocks
        self.util_time += dt * used
        self.kv_peak = max(self.kv_peak, used)
        self.busy_time += dt
        if left_waiting:
            self.backlog_time += dt
            full = (ids.size >= engine.max_num_seqs
                    or int(plan.num_tokens.sum()) >= STEP_FULL_SHARE * engine.max_num_batched_tokens
                    or self._prefill_attention(plan) >= STEP_FULL_SHARE * engine.prefill_attention_budget > 0)
            if not full:
                self.backlog_kv_time += dt
        return finished, lost, False

    @staticmethod
    def _prefill_attention(plan) -> float:
        """The step's prefill attention in token pairs, as the batch former counts it against
        prefill_attention_budget: a chunk of n tokens after c computed ones costs n * (c + n / 2)."""
        n = plan.num_tokens[plan.is_prefill].astype(np.float64)
        return float((n * (plan.computed_offsets[plan.is_prefill] + n / 2)).sum())

    # ---- live migration (the driver copies; this instance is one end) ----
    def migration_state(self, index: int) -> Optional[tuple]:
        """(computed tokens, generated tokens, preemptions so far) of a running request here, or None."""
        if index not in self.scheduler:
            return None
        info = self.scheduler.info(index)
        if info["state"] != "running":
            return None
        return int(info["num_computed"]), int(info["num_generated"]), int(info["num_preemptions"])

    def reserve_incoming(self, index: int, arrival_s: float, num_generated: int, num_tokens: int) -> Optional[int]:
        """Reserves blocks for the first ``num_tokens`` tokens of a request migrating here; returns
        the tokens cached here already (not copied), or None when the room is not there (nothing
        changed)."""
        trace = self.prepared.trace
        priority = 0.0 if self._priorities is None else float(self._session_priority[self._session[index]])
        self._forget(np.array([index]))
        start = time.perf_counter()
        try:
            _, cached = self.scheduler.reserve_incoming(
                index, int(trace.prompt_tokens[index]), int(self.prepared.max_new_tokens[index]), num_generated,
                num_tokens, arrival_time=arrival_s, priority=priority, block_keys=self.block_keys(index),
                client_id=int(self._session[index]),  # its client to vtc, as when it was added
                true_output_len=int(trace.output_tokens[index]) if self.admission == "oracle" else None)
        except OutOfBlocks:
            return None
        finally:
            self.cpu += time.perf_counter() - start
        self.arrival[index] = arrival_s
        return int(cached)

    def extend_incoming(self, index: int, num_tokens: int, num_generated: int) -> bool:
        """Grows the reservation; False when the room is not there (nothing changed)."""
        try:
            self.scheduler.extend_incoming(index, num_tokens, num_generated)
        except OutOfBlocks:
            return False
        return True

    def cancel_incoming(self, index: int) -> None:
        self.scheduler.cancel_incoming([index])

    def commit_incoming(self, record: "MigrationRecord", now: float) -> None:
        """The last stage arrived at ``now``: the request goes on here with its measurements."""
        i = record.index
        was_busy = self.busy()
        self.scheduler.commit_incoming(i, record.num_generated)
        self.generated[i] = record.num_generated
        self.first_token[i], self.prefill_start[i] = record.first_token_s, record.prefill_start_s
        self.last_token[i], self.max_gap[i], self.num_gaps[i] = record.last_token_s, record.max_gap_s, record.num_gaps
        for name, count in record.slow_gaps.items():
            self.slow[name][i] = count
        self.preemptions[i] = record.preemptions
        self._live_of_session[self._session[i]] = i
        if not was_busy:  # idle: it wakes when the KV has arrived
            self.clock = max(self.clock, now)
        self._unflushed_adds = True
        return True

    def migrate_out(self, index: int) -> MigrationRecord:
        """The last stage: the request leaves; its record goes to the destination."""
        info = self.scheduler.info(index)
        self.scheduler.migrate_out([index])
        self._ended(np.array([index]))
        return MigrationRecord(
            index, int(info["num_generated"]), int(info["num_computed"]), float(self.first_token[index]),
            float(self.prefill_start[index]), float(self.last_token[index]), float(self.max_gap[index]),
            int(self.num_gaps[index]), {k: int(v[index]) for k, v in self.slow.items()},
            int(self.preemptions[index]))

    # ---- cluster reports ----
    def load(self) -> dict:
        """The scheduler's load report plus this instance's clock."""
        report = self.scheduler.load()
        report["clock"] = self.clock
        return report

    def learn_outputs(self, ids: np.ndarray) -> None:
        """Requests that finished on other instances: the estimator learns their output lengths."""
        if ids.size:
            classes = self.prepared.trace.class_ids
            self.scheduler.record_output_lengths(self.prepared.trace.output_tokens[ids],
                                                 None if classes is None else classes[ids])

    def prefix_hits(self, ids: np.ndarray) -> np.ndarray:
        """Blocks of each request's prefix cached here."""
        if not self._has_keys or ids.size == 0:
            return np.zeros(ids.size, np.int64)
        return self.scheduler.prefix_hits([self.block_keys(i) for i in ids.tolist()])

    def migration_candidate(self, exclude: list) -> Optional[int]:
        return self.scheduler.migration_candidate(exclude)

    def take_queued(self) -> np.ndarray:
        """Drops the requests waiting or swapped here (a draining instance's go to dispatch again);
        returns their ids."""
        s = self.scheduler
        ids = np.concatenate([s.waiting_ids(), s.swapped_ids()]).astype(np.int64)
        if ids.size:
            s.abort(ids)
            self._ended(ids)
        return ids

    def outcome(self) -> dict:
        """Everything the driver merges into the run's log: per-request arrays and counters."""
        stats = self.scheduler.stats()
        return {
            "first_token": self.first_token, "finish": self.finish, "prefill_start": self.prefill_start,
            "max_gap": self.max_gap, "num_gaps": self.num_gaps, "slow": self.slow, "preemptions": self.preemptions,
            "rejected": self.rejected, "cpu": self.cpu, "steps": self.steps, "util_time": self.util_time,
            "kv_peak": self.kv_peak, "busy_time": self.busy_time, "backlog_time": self.backlog_time,
            "backlog_kv_time": self.backlog_kv_time,
            "swap_time": self.swap_time, "step_cpus": np.asarray(self.step_cpus), "clock": self.clock,
            "stats": stats, "policy": self.policy,
        }
