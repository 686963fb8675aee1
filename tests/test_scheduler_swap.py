"""Preemption by swap through the Scheduler: KV moves to host blocks and back byte for byte, no
token is recomputed, the host pool's limits fall back to recompute, auto mode follows the cost
model, priorities evict by swap, and aborts and finishes return host blocks."""

from __future__ import annotations

import numpy as np
import pytest
from scheduler_driver import FakeEngine, kv_layout

import kvsched

BLOCK = 8


def pressured(preemption: str, num_host_blocks: int = 64, **overrides) -> tuple[kvsched.Scheduler, FakeEngine]:
    """Aggressive admission into a small cache: decodes outgrow it and someone must be evicted."""
    options = dict(num_blocks=24, block_size=BLOCK, max_num_batched_tokens=512, max_num_seqs=8,
                   admission="aggressive", preemption=preemption,
                   num_host_blocks=num_host_blocks if preemption != "recompute" else 0,
                   swap_layout=kv_layout(BLOCK), recompute_seconds_per_token=1.0)
    options.update(overrides)
    scheduler = kvsched.Scheduler(**options)
    engine = FakeEngine(scheduler, kv_check=True)
    for req in range(6):
        engine.add(req, 20, 40, arrival_time=float(req))
    return scheduler, engine


def test_preempted_tokens_count_swapped_victims_too():
    # A victim's size, whether its KV is copied out or dropped (admission's priced risk reads it).
    scheduler, engine = pressured("swap")
    held_by_victims = 0
    while scheduler.has_unfinished_requests():
        held = {r: scheduler.info(r)["num_computed"] for r in engine.prompt if r in scheduler}
        plan = engine.step()
        held_by_victims += sum(held[r] for r in plan.swapped_out_ids.tolist() + plan.preempted_ids.tolist())
    stats = scheduler.stats()
    assert stats["swap_preemptions"] > 0 and stats["preempted_tokens"] == held_by_victims > 0


def test_swap_preemption_keeps_kv_and_recomputes_nothing():
    swap_scheduler, swap_engine = pressured("swap")
    seen_swapped = False
    while swap_scheduler.has_unfinished_requests():
        plan = swap_engine.step()
        for req in plan.swapped_out_ids.tolist():
            info = swap_scheduler.info(req)
            assert info["state"] == "swapped" and info["num_computed"] > 0
            assert swap_scheduler.block_table(req).size == 0
            seen_swapped = True
        for i, req in enumerate(plan.req_ids.tolist()):
            if req in plan.swapped_in_ids.tolist():
                # Back with its KV: it continues where it stopped, no prefill of what it had.
                assert plan.computed_offsets[i] > 0
    assert seen_swapped
    assert all(swap_engine.generated[r] == 40 for r in range(6))
    stats = swap_scheduler.stats()
    assert stats["swap_preemptions"] > 0 and stats["swapped_in"] == stats["swap_preemptions"]
    assert stats["swap_out_bytes"] > 0 and stats["swap_in_bytes"] > 0
    assert swap_engine.preemptions == 0  # nothing recomputed
    assert stats["swap"]["num_free_host_blocks"] == stats["swap"]["num_host_blocks"]

    recompute_scheduler, recompute_engine = pressured("recompute")
    recompute_engine.run()
    assert recompute_engine.preemptions > 0
    # Every token is computed once under swap; recompute prefills evicted requests again.
    useful = 6 * (20 + 40 - 1)
    assert stats["scheduled_tokens"] == useful
    assert recompute_scheduler.stats()["scheduled_tokens"] > useful


def test_second_swap_out_moves_only_new_blocks():
    scheduler = kvsched.Scheduler(num_blocks=10, block_size=BLOCK, max_num_seqs=4, admission="conservative",
                                  policy="priority", preemption="swap", num_host_blocks=32,
                                  swap_layout=kv_layout(BLOCK))
    engine = FakeEngine(scheduler, kv_check=True)
    engine.add(0, 36, 30, priority=5)
    for _ in range(3):
        engine.step()
    engine.add(1, 40, 3, priority=0)  # evicts 0 (37 tokens: 4 full blocks + 5 tokens)
    first = engine.step()
    assert first.swapped_out_ids.tolist() == [0]
    while scheduler.info(0)["state"] != "running":
        engine.step()
    for _ in range(12):  # 0 decodes past two block boundaries
        engine.step()
    computed = scheduler.info(0)["num_computed"]
    engine.add(2, 40, 3, priority=0)
    second = engine.step()
    assert second.swapped_out_ids.tolist() == [0]
    # Only the blocks from the first swap-out's partial block on move again.
    copied_blocks = int(second.swap_out[:, 2].sum())
    assert copied_blocks == -(-computed // BLOCK) - 4
    assert second.swap_out_bytes == copied_blocks * 2 * BLOCK * 8
    engine.run()
    assert engine.generated[0] == 30 and engine.preemptions == 0


def test_full_host_pool_falls_back_to_recompute():
    scheduler, engine = pressured("swap", num_host_blocks=2)
    engine.run()
    assert engine.preemptions > 0  # did not fit on the host: recomputed
    assert all(engine.generated[r] == 40 for r in range(6))
    assert scheduler.stats()["swap"]["num_free_host_blocks"] == 2


@pytest.mark.parametrize("seconds_per_token, expect_swap", [(1.0, True), (0.0, False)])
def test_auto_mode_follows_the_cost_model(seconds_per_token, expect_swap):
    scheduler, engine = pressured("auto", recompute_seconds_per_token=seconds_per_token)
    engine.run()
    stats = scheduler.stats()
    assert (stats["swap_preemptions"] > 0) == expect_swap
    assert (engine.preemptions > 0) == (not expect_swap)


def test_the_recompute_price_set_between_steps_switches_auto_s_choice():
    # An engine that measures its prefill cost as it runs (kvsched's vLLM adapter) sets it between steps.
    scheduler, engine = pressured("auto", recompute_seconds_per_token=0.0)
    for _ in range(3):
        engine.step()
    with pytest.raises(ValueError, match="recompute_seconds_per_token"):
        scheduler.set_recompute_seconds_per_token(float("nan"))
    assert scheduler.config.recompute_seconds_per_token == 0.0  # a refused value changes nothing
    scheduler.set_recompute_seconds_per_token(1.0)
    assert scheduler.config.recompute_seconds_per_token == 1.0
    engine.run()
    stats = scheduler.stats()
    assert stats["swap_preemptions"] > 0 and engine.preemptions == 0


def test_host_copy_cost_is_timed_on_this_machine():
    table = kvsched.swap.host_copy_cost(nbytes=4 << 20, pieces=256)
    assert table.shape == (2, 3, 3)
    assert (table[..., 2] > 1e8).all() and (table[..., 1] >= 0).all()  # over 100 MB/s, whatever the machine
    kvsched.Scheduler(num_blocks=8, preemption="auto", num_host_blocks=4, swap_cost=table)  # a table it takes


def test_priority_preemption_by_swap():
    scheduler = kvsched.Scheduler(num_blocks=10, block_size=BLOCK, max_num_seqs=4, admission="conservative",
                                  policy="priority", preemption="swap", num_host_blocks=32,
                                  swap_layout=kv_layout(BLOCK))
    engine = FakeEngine(scheduler, kv_check=True)
    engine.add(0, 30, 30, priority=5)
    engine.add(1, 30, 30, priority=5)
    for _ in range(3):
        engine.step()
    engine.add(2, 40, 10, priority=0)  # urgent; only fits if someone leaves
    plan = engine.step()
    assert plan.swapped_out_ids.size > 0 and 2 in plan.req_ids.tolist()
    victim = int(plan.swapped_out_ids[0])
    assert scheduler.info(victim)["state"] == "swapped"
    engine.run()
    assert all(engine.generated[r] == engine.true_len[r] for r in range(3))
    assert engine.preemptions == 0


def test_abort_of_swapped_request_returns_host_blocks():
    scheduler, engine = pressured("swap")
    while scheduler.swapped_ids().size == 0:
        engine.step()
    victim = int(scheduler.swapped_ids()[0])
    assert scheduler.stats()["swap"]["num_swapped_blocks"] > 0
    scheduler.abort([victim])
    assert victim not in scheduler
    engine.true_len.pop(victim)
    engine.run()
    swap = scheduler.stats()["swap"]
    assert swap["num_free_host_blocks"] == swap["num_host_blocks"]
    scheduler.check_invariants()


def test_swap_in_skips_prefix_cache_hits():
    keys = np.arange(1, 9, dtype=np.uint64)  # 8 full blocks of a shared system prompt
    scheduler = kvsched.Scheduler(num_blocks=30, block_size=BLOCK, max_num_seqs=8, admission="aggressive",
                                  preemption="swap", num_host_blocks=64, enable_prefix_caching=True)
    engine = FakeEngine(scheduler)
    for req in range(5):
        engine.add(req, 64 + 4, 60, arrival_time=float(req), block_keys=keys)
    engine.run()
    stats = scheduler.stats()
    assert stats["swap_preemptions"] > 0
    assert stats["swap_blocks_reused"] > 0  # shared prefix blocks still on the device
    assert all(engine.generated[r] == 60 for r in range(5))


def test_swap_configuration_errors():
    with pytest.raises(ValueError, match="num_host_blocks"):
        kvsched.Scheduler(num_blocks=8, preemption="swap")
    with pytest.raises(ValueError, match="preemption"):
        kvsched.Scheduler(num_blocks=8, preemption="sometimes", num_host_blocks=4)
    with pytest.raises(ValueError, match="recompute_seconds_per_token"):
        kvsched.Scheduler(num_blocks=8, preemption="auto", num_host_blocks=4, recompute_seconds_per_token=-1.0)


def test_recompute_drops_corrupt_kv_wherever_the_request_is():
    """An engine whose copy failed names the requests that read or wrote the bad blocks: running,
    swapped or waiting, each drops its KV and prefills again from its true length, and finishes with
    every token (the fake engine checks every KV position it reads)."""
    scheduler, engine = pressured("swap")
    while not scheduler.swapped_ids().size:
        engine.step()
    swapped = int(scheduler.swapped_ids()[0])
    running = [int(r) for r in scheduler.running_ids()[:2]]
    ids = [swapped, *running]
    # The last token of each running request is taken back, as if it had been sampled from bad KV.
    true_lengths = [engine.generated[swapped]] + [engine.generated[r] - 1 for r in running]
    before = scheduler.stats()["swap"]["num_free_host_blocks"]
    scheduler.recompute(ids, true_lengths)
    for req, generated in zip(ids, true_lengths):
        info = scheduler.info(req)
        assert info["state"] == "waiting" and info["num_computed"] == 0 and info["num_generated"] == generated
        assert scheduler.block_table(req).size == 0
        engine.generated[req] = generated
    assert scheduler.stats()["swap"]["num_free_host_blocks"] > before  # the swapped copy is gone
    plan = engine.step()
    assert not set(ids) & set(plan.req_ids.tolist())  # they sit out one step (tokens may be in flight)
    scheduler.check_invariants()
    engine.run()
    assert all(engine.generated[r] == 40 for r in range(6))
    stats = scheduler.stats()
    assert stats["swap"]["num_free_host_blocks"] == stats["swap"]["num_host_blocks"]


def test_recompute_refuses_bad_input_and_changes_nothing():
    scheduler, engine = pressured("swap")
    for _ in range(3):
        engine.step()
    running = int(scheduler.running_ids()[0])
    generated = scheduler.info(running)["num_generated"]
    with pytest.raises(ValueError, match=r"num_generated\[0\]"):
        scheduler.recompute([running], [generated + 1])
    with pytest.raises(ValueError, match="num_generated must have the same length"):
        scheduler.recompute([running], [1, 2])
    with pytest.raises((ValueError, KeyError), match="req_ids"):
        scheduler.recompute([running, 999], [0, 0])
    with pytest.raises(ValueError, match="req_ids"):
        scheduler.recompute([running, running], [0, 0])
    assert scheduler.info(running)["state"] == "running" and scheduler.info(running)["num_generated"] == generated
    plan = scheduler.schedule()
    with pytest.raises(ValueError, match="recompute: a plan is outstanding"):
        scheduler.recompute([running], [0])
    scheduler.update(plan.req_ids, np.ones(len(plan), np.int64), np.zeros(len(plan), bool))
    scheduler.check_invariants()
