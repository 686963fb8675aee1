"""max_loras: at most that many distinct LoRA adapters among running requests, decided natively."""

from __future__ import annotations

import numpy as np
import pytest

import kvsched


def run_to_end(s: kvsched.Scheduler, lora_of: dict[int, int], max_loras: int) -> int:
    """Steps until every request ends, checking the adapter limit on every step; returns steps."""
    steps = 0
    while s.has_unfinished_requests():
        plan = s.schedule()
        running = {lora_of[i] for i in s.running_ids().tolist()} - {0}
        assert len(running) <= max_loras, f"step {steps}: adapters {sorted(running)}"
        s.check_invariants()
        s.update(plan.req_ids, plan.samples.astype(np.int64))
        steps += 1
        assert steps < 10_000
    return steps


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_running_requests_never_use_more_adapters_than_max_loras(preemption: str) -> None:
    rng = np.random.default_rng(0)
    n = 120
    ids = np.arange(n)
    loras = rng.integers(0, 6, n)  # 0 is the base model
    extra = dict(num_host_blocks=64) if preemption == "swap" else {}
    s = kvsched.Scheduler(num_blocks=96, block_size=16, max_num_seqs=16, max_loras=2, preemption=preemption, **extra)
    s.add_requests(ids, rng.integers(16, 200, n), rng.integers(1, 60, n), lora_ids=loras)
    run_to_end(s, dict(zip(ids.tolist(), loras.tolist())), 2)
    stats = s.stats()
    assert stats["finished"] == n


def test_a_request_without_an_adapter_slot_is_passed_over_not_blocking() -> None:
    s = kvsched.Scheduler(num_blocks=256, block_size=16, max_num_seqs=8, max_loras=1)
    s.add_requests([1, 2, 3, 4], [32, 32, 32, 32], [50, 50, 50, 50], arrival_times=[0, 1, 2, 3], lora_ids=[7, 8, 0, 7])
    plan = s.schedule()
    assert sorted(plan.req_ids.tolist()) == [1, 3, 4]  # 2 (adapter 8) waits; the base model and 7 go on
    assert s.waiting_ids().tolist() == [2]
    lora_of = {1: 7, 2: 8, 3: 0, 4: 7}
    s.update(plan.req_ids, plan.samples.astype(np.int64))
    run_to_end(s, lora_of, 1)


def test_no_limit_by_default() -> None:
    s = kvsched.Scheduler(num_blocks=256, block_size=16, max_num_seqs=8)
    s.add_requests(np.arange(6), np.full(6, 16), np.full(6, 5), lora_ids=np.arange(1, 7))
    assert len(s.schedule()) == 6


def test_bad_lora_input_is_refused_by_name_and_changes_nothing() -> None:
    with pytest.raises(ValueError, match="max_loras"):
        kvsched.Scheduler(num_blocks=16, max_loras=-1)
    with pytest.raises(TypeError, match="max_loras"):
        kvsched.Scheduler(num_blocks=16, max_loras=1.5)
    s = kvsched.Scheduler(num_blocks=64, block_size=16, max_loras=1)
    with pytest.raises(ValueError, match="lora_ids"):
        s.add_requests([1, 2], [10, 10], [5, 5], lora_ids=[1, -1])
    with pytest.raises(TypeError, match="lora_ids"):
        s.add_requests([1], [10], [5], lora_ids=[1.5])
    with pytest.raises(ValueError, match="lora_ids"):
        s.add_requests([1], [10], [5], lora_ids=[2**40])
    assert s.stats()["added"] == 0


def test_an_incoming_migration_needs_an_adapter_slot() -> None:
    s = kvsched.Scheduler(num_blocks=64, block_size=16, max_loras=1)
    s.add_request(1, 32, 20, lora_id=3)
    plan = s.schedule()
    s.update(plan.req_ids, plan.samples.astype(np.int64))
    before = s.stats()
    with pytest.raises(kvsched.OutOfBlocks, match="LoRA"):
        s.reserve_incoming(9, 40, 10, 2, 30, lora_id=4)
    assert s.stats() == before and 9 not in s
    s.reserve_incoming(10, 40, 10, 2, 30, lora_id=3)  # the same adapter shares the slot
    s.check_invariants()
