"""Preemption by swap end to end on a GPU: the Scheduler plans, every plan's swap-out, swap-in and
copy-on-write runs on real device tensors through kvsched.cuda.CopyEngine, and each request's KV is
checked before every step, over thousands of steps with heavy preemption, for every strategy.
Skipped without a CUDA device and PyTorch (bench/gpu/run.sh runs it on the device machine)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import kvsched

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not kvsched.has_cuda(), reason="needs a CUDA device")]
torch = pytest.importorskip("torch") if kvsched.has_cuda() else None

from scheduler_driver import FakeEngine, kv_layout  # noqa: E402

BLOCK = 16


def strategies():
    names = ["auto", "per_descriptor", "gather_kernel"]
    if kvsched.has_cuda():
        from kvsched.cuda import CopyEngine
        if CopyEngine.batched_supported():
            names.append("batched")
    return names


@pytest.mark.parametrize("strategy", strategies())
def test_swap_preemption_on_gpu_keeps_every_byte(strategy):
    from gpu_kv_cache import GpuKvCache, timed_schedule

    rng = np.random.default_rng(7)
    scheduler = kvsched.Scheduler(num_blocks=192, block_size=BLOCK, max_num_batched_tokens=1024, max_num_seqs=48,
                                  admission="aggressive", policy="priority", preemption="swap",
                                  num_host_blocks=4096, swap_layout=kv_layout(BLOCK))
    kv = GpuKvCache(scheduler.config, strategy=strategy, staging_bytes=64 << 10)  # staging far below a swap
    engine = FakeEngine(scheduler, check=False, kv=kv)
    num_requests = 240
    prompts = rng.integers(16, 300, num_requests)
    outputs = rng.integers(32, 400, num_requests)
    for req in range(num_requests):
        engine.add(req, int(prompts[req]), int(outputs[req]), arrival_time=float(req // 8),
                   priority=int(rng.integers(0, 3)))
    planning = timed_schedule(scheduler)
    engine.run(max_steps=20_000)
    stats = scheduler.stats()
    assert all(engine.generated[r] == outputs[r] for r in range(num_requests))
    assert engine.steps >= 1000
    assert stats["swap_preemptions"] >= 100 and stats["swapped_in"] == stats["swap_preemptions"]
    assert engine.preemptions == 0  # nothing recomputed: every eviction went to host and came back
    assert kv.checked_tokens > 1_000_000
    report = {"strategy": strategy, "steps": engine.steps, "swap_preemptions": stats["swap_preemptions"],
              "swap_out_bytes": stats["swap_out_bytes"], "swap_in_bytes": stats["swap_in_bytes"],
              "steps_with_copies": kv.copies,
              "copy_us_per_copy_step": 1e6 * kv.copy_seconds / max(kv.copies, 1),
              "planning_us_per_step": 1e6 * planning["seconds"] / max(planning["calls"], 1),
              "checked_tokens": kv.checked_tokens}
    print(json.dumps(report))
    if os.environ.get("KVSCHED_GPU_REPORT"):
        with open(os.environ["KVSCHED_GPU_REPORT"], "a") as f:  # one JSON line per strategy
            f.write(json.dumps(report) + "\n")


@pytest.mark.parametrize("write_through", [False, True])
def test_host_tier_on_gpu_keeps_every_byte(write_through):
    # Documents shared by many requests on a GPU too small to keep them: their blocks go to pinned
    # host memory and come back through CopyEngine, checked byte for byte before every step.
    from gpu_kv_cache import GpuKvCache
    from scheduler_driver import add_document_requests

    scheduler = kvsched.Scheduler(num_blocks=160, block_size=BLOCK, max_num_batched_tokens=1024, max_num_seqs=16,
                                  admission="aggressive", preemption="swap", num_host_blocks=2048,
                                  swap_layout=kv_layout(BLOCK), host_prefix_cache=True,
                                  host_cache_write="finish" if write_through else "evict", recompute_seconds_per_token=1e-3)
    kv = GpuKvCache(scheduler.config, staging_bytes=64 << 10)
    engine = FakeEngine(scheduler, check=False, kv=kv)
    add_document_requests(engine, np.random.default_rng(11), 300, block_size=BLOCK)
    engine.run(max_steps=20_000)
    stats = scheduler.stats()
    assert len(engine.finished) == 300
    assert stats["host_hit_blocks"] >= 100 and stats["cache_write_blocks"] >= 100
    assert kv.checked_tokens > 100_000
