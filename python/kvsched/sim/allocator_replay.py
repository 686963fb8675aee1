"""Replay a workload through the block allocator alone, to measure KV placement.

A minimal engine loop: requests arrive, are admitted first come first served while their context
fits, decode one token per step, and leave when their output is complete; when a decode cannot get
a block the newest running request is preempted (released, and later re-admitted with the tokens it
had). Every step is one batched allocate and one batched free: no per-request Python work.
What it reports is how fragmented block tables get (mean blocks per contiguous extent, which sets
how many copies a swap needs), for each placement mode under the same request sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..allocator import BlockAllocator
from .._core import OutOfBlocks
from .traces import Trace


@dataclass(frozen=True)
class PlacementReport:
    placement: str
    steps: int
    completed: int
    preemptions: int
    mean_blocks_per_extent: float  # over live block tables, averaged over steps (weighted by blocks)
    mean_running: float


@dataclass
class ReplayStep:
    """The replay's state after one step (live objects: read them before advancing)."""
    step: int
    allocator: BlockAllocator
    running: np.ndarray  # request ids in admission order (the newest last: the next victims)
    preemptions: int  # so far
    completed: int


def replay_steps(
    trace: Trace,
    placement: str,
    *,
    num_blocks: int = 8192,
    block_size: int = 16,
    step_s: float = 0.03,
    max_num_seqs: int = 256,
    max_steps: int = 1_000_000,
):
    """Yields a ReplayStep after every step of the replay (see the module docstring)."""
    allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching=False, placement=placement)
    n = len(trace)
    context = trace.prompt_tokens.copy()  # tokens a request holds when (re)admitted
    remaining = trace.output_tokens.copy()
    capacity = num_blocks * block_size
    fits = context + remaining <= capacity
    running = np.empty(0, dtype=np.int64)
    next_arrival = int(np.searchsorted(trace.arrival_s, 0.0, side="right"))
    waiting = np.flatnonzero(fits[:next_arrival])
    completed = preemptions = steps = 0
    while (completed + int((~fits).sum()) < n) and steps < max_steps:
        steps += 1
        arrived = int(np.searchsorted(trace.arrival_s, steps * step_s, side="right"))
        if arrived > next_arrival:
            new = np.arange(next_arrival, arrived)
            waiting = np.concatenate([waiting, new[fits[new]]])
            next_arrival = arrived
        # Decode: every running request needs room for one more token.
        while running.size:
            try:
                allocator.allocate_batch(running, context[running] + 1)
                break
            except OutOfBlocks:
                victim = running[-1]
                allocator.free(int(victim))
                running = running[:-1]
                waiting = np.concatenate([[victim], waiting])
                preemptions += 1
        context[running] += 1
        remaining[running] -= 1
        done = remaining[running] <= 0
        if done.any():
            allocator.free_batch(running[done])
            completed += int(done.sum())
            running = running[~done]
        # Admission: the longest FCFS prefix of the queue whose contexts fit now.
        room = max_num_seqs - running.size
        if room > 0 and waiting.size:
            candidates = waiting[:room]
            blocks = np.cumsum(-(-(context[candidates] + 1) // block_size))
            count = int(np.searchsorted(blocks, allocator.num_free_blocks, side="right"))
            if count:
                admitted = candidates[:count]
                allocator.allocate_batch(admitted, context[admitted])
                running = np.concatenate([running, admitted])
                waiting = waiting[count:]
        yield ReplayStep(steps, allocator, running, preemptions, completed)
        if not running.size and not waiting.size and next_arrival < n:
            # Idle: jump to the next arrival.
            steps = max(steps, int(np.ceil(trace.arrival_s[next_arrival] / step_s)) - 1)
    allocator.check_invariants()


def replay_placement(trace: Trace, placement: str, **options) -> PlacementReport:
    """Mean blocks per contiguous extent of the live block tables over a replay (options as for
    replay_steps)."""
    table_blocks = table_extents = running_sum = 0
    last = None
    for last in replay_steps(trace, placement, **options):
        stats = last.allocator.stats()
        table_blocks += stats["table_blocks"]
        table_extents += stats["table_extents"]
        running_sum += last.running.size
    steps = last.step if last else 0
    return PlacementReport(
        placement=placement,
        steps=steps,
        completed=last.completed if last else 0,
        preemptions=last.preemptions if last else 0,
        mean_blocks_per_extent=table_blocks / table_extents if table_extents else 0.0,
        mean_running=running_sum / max(steps, 1),
    )
