"""External tokens: prompt tokens an engine's KV connector loads (vLLM's external prefix hits)."""

from __future__ import annotations

import numpy as np
import pytest

import kvsched

BLOCK = 16


def first_plan(scheduler: kvsched.Scheduler) -> kvsched.StepPlan:
    plan = scheduler.schedule()
    scheduler.update(plan.req_ids, plan.samples.astype(np.int64))
    return plan


def test_external_tokens_count_as_computed_and_the_plan_lists_the_load():
    s = kvsched.Scheduler(num_blocks=64, block_size=BLOCK, enable_prefix_caching=False)
    s.add_requests([1, 2, 3], [100, 100, 40], [5, 5, 5], external_tokens=[64, 70, 0])
    plan = first_plan(s)
    rows = {int(r): i for i, r in enumerate(plan.req_ids)}
    assert plan.computed_offsets[rows[1]] == 64 and plan.num_tokens[rows[1]] == 36
    assert plan.computed_offsets[rows[2]] == 70  # a partial block too: the prefill goes on from there
    assert plan.computed_offsets[rows[3]] == 0 and plan.num_tokens[rows[3]] == 40
    assert dict(zip(plan.external_load_ids.tolist(), plan.external_load_tokens.tolist())) == {1: 64, 2: 70}
    assert plan.blocks_of(rows[1]).size == -(-100 // BLOCK)  # its whole table, the loaded blocks too
    s.check_invariants()


def test_device_prefix_hits_come_first_and_only_the_rest_is_loaded():
    s = kvsched.Scheduler(num_blocks=64, block_size=BLOCK, enable_prefix_caching=True)
    keys = np.arange(1, 7, dtype=np.uint64)  # 6 full blocks: 96 tokens
    s.add_requests([1], [100], [1], block_keys=[keys[:2]])  # computes and caches two blocks
    while s.has_unfinished_requests():
        first_plan(s)
    s.add_requests([2], [100], [5], block_keys=[keys], external_tokens=[80])
    plan = first_plan(s)
    assert plan.computed_offsets[0] == 80
    assert plan.external_load_tokens.tolist() == [80 - 2 * BLOCK]  # past the 2 cached blocks
    s.add_requests([3], [100], [5], block_keys=[keys], external_tokens=[16])
    plan = first_plan(s)
    row = plan.req_ids.tolist().index(3)
    # Request 2's blocks, loaded and computed, are cached now: the device holds more than the connector.
    assert plan.computed_offsets[row] == 6 * BLOCK and plan.external_load_ids.size == 0


def test_a_recomputed_request_loads_again():
    s = kvsched.Scheduler(num_blocks=12, block_size=BLOCK, admission="aggressive", enable_prefix_caching=False)
    s.add_requests([1, 2], [64, 64], [120, 120], arrival_times=[0.0, 1.0], external_tokens=[32, 32])
    loads = []
    while s.has_unfinished_requests():
        plan = first_plan(s)
        loads += plan.external_load_ids.tolist()
    assert s.stats()["preemptions"] > 0
    assert len(loads) == 2 + s.stats()["preemptions"]  # once per admission


def test_bad_external_tokens_are_refused_by_name_and_change_nothing():
    s = kvsched.Scheduler(num_blocks=64, block_size=BLOCK)
    for bad in ([1, 100], [-1, 0]):
        with pytest.raises(ValueError, match=r"external_tokens\[\d\]"):
            s.add_requests([1, 2], [100, 100], [5, 5], external_tokens=bad)
    with pytest.raises(ValueError, match="external_tokens"):
        s.add_requests([1, 2], [100, 100], [5, 5], external_tokens=[1, 2, 3])
    assert s.stats()["added"] == 0
