"""The scheduler test engine's KV cache on a GPU (PyTorch): device tensors hold the KV, pinned host
buffers the swapped copies, and every plan's swap_out, swap_in and copy-on-write runs through
kvsched.cuda.CopyEngine (and a block copy for copy-on-write) on one created stream, in the order the
plan prescribes. Checks are vectorized over the whole batch: one comparison per tensor per step.

Each token slot holds one int64 that names its request and position (as tests/scheduler_driver.py's
numpy cache does), so any block lost, misplaced or overwritten shows up as a wrong value."""

from __future__ import annotations

import time

import numpy as np
import torch

import kvsched
from kvsched.cuda import CopyEngine, pinned_empty


def _ragged_positions(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row index, position) for every position in [starts[i], ends[i]) of every row."""
    lengths = np.maximum(ends - starts, 0)
    rows = np.repeat(np.arange(lengths.size), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, starts[rows] + offsets


class GpuKvCache:
    def __init__(self, config: kvsched.SchedulerConfig, strategy: str = "auto", staging_bytes: int = 1 << 20):
        self.block_size = config.block_size
        self.strategy = strategy
        self.device = [torch.zeros((config.num_blocks, config.block_size), dtype=torch.int64, device="cuda")
                       for _ in range(2)]
        host_bytes = max(config.num_host_blocks, 1) * config.block_size * 8
        self.host = [pinned_empty(host_bytes) for _ in range(2)]
        for h in self.host:
            h.fill(0xCD)
        self.engine = CopyEngine(0, staging_bytes=staging_bytes)
        self.stream = torch.cuda.Stream()
        self.copy_seconds = 0.0  # device time of the plans' copies (CUDA events)
        self.copies = 0
        self.checked_tokens = 0
        self.shared: dict[int, tuple[int, int]] = {}  # as scheduler_driver.KvCache.shared

    def values(self, tensor: int, reqs: np.ndarray, positions: np.ndarray) -> np.ndarray:
        reqs = reqs.astype(np.int64)
        if self.shared:
            owner = np.array([self.shared.get(int(r), (r, 0))[0] for r in reqs], dtype=np.int64)
            tokens = np.array([self.shared.get(int(r), (r, 0))[1] for r in reqs], dtype=np.int64)
            reqs = np.where(positions < tokens, owner, reqs)
        v = (reqs << 32 | positions.astype(np.int64)) + 1
        return v if tensor == 0 else -v

    def apply_copies(self, plan: kvsched.StepPlan) -> None:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # The copies read KV that earlier steps wrote on the default stream.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            start.record()
            handle = self.stream.cuda_stream
            # Device -> host first (swap-outs, then host-tier writes), then host -> device.
            for direction, descriptors in (("out", plan.swap_out_descriptors), ("out", plan.cache_write_descriptors),
                                           ("in", plan.swap_in_descriptors), ("in", plan.cache_load_descriptors)):
                if descriptors.size:
                    self.engine.copy_descriptors(direction, descriptors, self.device, self.host,
                                                 strategy=self.strategy, stream=handle)
            if plan.copy_on_writes.size:
                src = torch.as_tensor(plan.copy_on_writes[:, 1], device="cuda")
                dst = torch.as_tensor(plan.copy_on_writes[:, 2], device="cuda")
                for t in range(2):
                    self.device[t][dst] = self.device[t][src]
            stop.record()
        torch.cuda.current_stream().wait_stream(self.stream)
        if (plan.swap_out_descriptors.size or plan.swap_in_descriptors.size or plan.cache_write_descriptors.size
                or plan.cache_load_descriptors.size):
            stop.synchronize()
            self.copy_seconds += start.elapsed_time(stop) * 1e-3
            self.copies += 1

    def check_plan(self, plan: kvsched.StepPlan, scheduler: kvsched.Scheduler, totals: np.ndarray) -> None:
        self.apply_copies(plan)
        if not len(plan):
            return
        reqs = plan.req_ids.astype(np.int64)
        tables = [scheduler.block_table(int(r)) for r in reqs]
        table_start = np.concatenate([[0], np.cumsum([t.size for t in tables])])[:-1]
        flat = np.concatenate(tables).astype(np.int64) if tables else np.zeros(0, np.int64)
        computed = plan.computed_offsets.astype(np.int64)
        end = np.minimum(totals, computed + plan.num_tokens.astype(np.int64))

        def slots(rows, positions):
            blocks = flat[table_start[rows] + positions // self.block_size]
            return (torch.as_tensor(blocks, device="cuda"), torch.as_tensor(positions % self.block_size, device="cuda"))

        rows, positions = _ragged_positions(np.zeros_like(computed), computed)
        if rows.size:
            index = slots(rows, positions)
            for t in range(2):
                expected = torch.as_tensor(self.values(t, reqs[rows], positions), device="cuda")
                if not torch.equal(self.device[t][index], expected):
                    bad = (self.device[t][index] != expected).nonzero()[0].item()
                    raise AssertionError(f"request {reqs[rows[bad]]}: KV at position {positions[bad]} lost or "
                                         f"corrupted (tensor {t})")
            self.checked_tokens += rows.size
        rows, positions = _ragged_positions(computed, end)
        if rows.size:
            index = slots(rows, positions)
            for t in range(2):
                self.device[t][index] = torch.as_tensor(self.values(t, reqs[rows], positions), device="cuda")


def timed_schedule(scheduler: kvsched.Scheduler):
    """Wraps scheduler.schedule to add up its CPU time (planning), for the report."""
    original = scheduler.schedule
    totals = {"seconds": 0.0, "calls": 0}

    def schedule(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals["seconds"] += time.perf_counter() - began
            totals["calls"] += 1

    scheduler.schedule = schedule
    return totals
