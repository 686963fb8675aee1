"""The host tier of the prefix cache: blocks evicted from the device prefix cache are written back
to host memory and come back by copy, byte-exact, when the cost model says that beats recompute."""

from __future__ import annotations

import numpy as np
import pytest

import kvsched
from scheduler_driver import FakeEngine, kv_layout

BLOCK = 4


def keys(owner: int, blocks: int, first: int = 0) -> np.ndarray:
    """Block keys of content `owner`, blocks first..first+blocks-1 (positions in its sequence)."""
    out = np.empty((blocks, 2), dtype=np.uint64)
    out[:, 0] = owner
    out[:, 1] = np.arange(first + 1, first + blocks + 1)
    return out


def scheduler(host_tier: bool = True, num_host_blocks: int = 32, **overrides) -> kvsched.Scheduler:
    """Written back on eviction and loaded in the plan of the prefill unless told otherwise: the
    tests follow those copies."""
    options = dict(num_blocks=16, block_size=BLOCK, max_num_batched_tokens=64, max_num_seqs=4,
                   num_host_blocks=num_host_blocks, swap_layout=kv_layout(BLOCK), host_prefix_cache=host_tier,
                   host_cache_write="evict" if host_tier else None, host_cache_load="inline" if host_tier else None,
                   recompute_seconds_per_token=1.0, admission="aggressive")
    options.update(overrides)
    return kvsched.Scheduler(**options)


def evict_then_reuse(s: kvsched.Scheduler) -> tuple[FakeEngine, list]:
    """Request 1 (a 16-token prompt, 4 keyed blocks) finishes; request 2 (other content) fills the
    device (all 16 blocks) and evicts those cached blocks; request 3 shares request 1's prompt and adds 8 tokens."""
    engine = FakeEngine(s, kv_check=True)
    engine.add(1, 16, 3, block_keys=keys(1, 4))
    engine.run()
    engine.add(2, 60, 2)
    plans = []
    while s.has_unfinished_requests():
        plans.append(engine.step())
    engine.kv.shared[3] = (1, 16)
    engine.add(3, 24, 2, block_keys=np.concatenate([keys(1, 4), keys(3, 2, first=4)]))
    plans.append(engine.step())
    if 3 not in plans[-1].req_ids.tolist():  # prefetched: its first row comes in the next plan
        plans.append(engine.step())
    engine.run()
    assert engine.finished == {1, 2, 3}
    return engine, plans


def test_evicted_prefix_comes_back_from_host_byte_exact():
    s = scheduler()
    engine, plans = evict_then_reuse(s)
    written = np.concatenate([p.cache_write for p in plans if p.cache_write.size])
    assert written[:, 2].sum() == 4  # the 4 keyed blocks were written back as request 2 took them
    load = plans[-1]
    assert load.cache_load_ids.tolist() == [3]
    assert load.cache_load[:, 2].sum() == 4
    row = load.req_ids.tolist().index(3)
    # Its prefill starts after the loaded blocks; the KV check read them back (FakeEngine, kv_check).
    assert load.computed_offsets[row] == 16 and load.num_tokens[row] == 8
    stats = s.stats()
    assert stats["host_hit_blocks"] == 4 and stats["cache_write_blocks"] == 4
    assert stats["cache_load_bytes"] == stats["cache_write_bytes"] == 4 * 2 * BLOCK * 8
    assert load.swap_seconds > 0
    s.check_invariants()


def test_without_the_host_tier_the_prefix_is_recomputed():
    s = scheduler(host_tier=False)
    _, plans = evict_then_reuse(s)
    last = plans[-1]
    assert last.cache_load_ids.size == 0 and last.cache_write.size == 0
    assert last.computed_offsets[last.req_ids.tolist().index(3)] == 0


def test_a_load_dearer_than_recompute_is_not_made():
    s = scheduler(recompute_seconds_per_token=1e-12)
    _, plans = evict_then_reuse(s)
    last = plans[-1]
    assert last.cache_load_ids.size == 0
    assert last.computed_offsets[last.req_ids.tolist().index(3)] == 0
    assert s.stats()["cache_write_blocks"] == 4  # written back all the same: a later request may load it


def test_a_full_host_pool_skips_write_backs_and_loses_nothing():
    # Two host blocks: of the blocks evicted in one step two find room and the rest are skipped (a
    # block written in this step is not evicted for another of the same step); a later step's
    # write-back evicts the least recently used one. Request 3 loads whatever leading run it finds,
    # and every request's KV still reads back (kv_check).
    s = scheduler(num_host_blocks=2)
    engine, plans = evict_then_reuse(s)
    swap = s.stats()["swap"]
    assert swap["cache_write_skips"] >= 1 and swap["num_cached_host_blocks"] == 2
    assert swap["evicted_cached_blocks"] == swap["cache_write_blocks"] - 2
    s.check_invariants()


def test_reset_prefix_cache_forgets_both_tiers():
    s = scheduler()
    evict_then_reuse(s)
    assert s.stats()["swap"]["num_cached_host_blocks"] > 0
    s.reset_prefix_cache()
    assert s.stats()["swap"]["num_cached_host_blocks"] == 0
    s.check_invariants()


def test_host_tier_needs_a_host_pool_and_prefix_caching():
    with pytest.raises(ValueError, match="num_host_blocks"):
        scheduler(num_host_blocks=0)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        scheduler(enable_prefix_caching=False)
    with pytest.raises(ValueError, match="host_cache_write: only the host tier uses it"):
        scheduler(host_tier=False, host_cache_write="finish")
    with pytest.raises(ValueError, match="host_cache_write must be"):
        scheduler(host_cache_write="never")
    with pytest.raises(ValueError, match="host_cache_load: only the host tier uses it"):
        scheduler(host_tier=False, host_cache_load="prefetch")
    with pytest.raises(ValueError, match="host_cache_load must be"):
        scheduler(host_cache_load="later")


def test_write_through_copies_a_finished_request_once():
    s = scheduler(host_cache_write="finish")
    engine, plans = evict_then_reuse(s)
    # The plan after request 1 finished (the driver's last one) wrote its 4 keyed blocks; when
    # request 2 evicted them they were on the host already, so its plans copy nothing. Request 3
    # adds its own 2 keyed blocks at the end (its shared 4 are cached already).
    assert s.stats()["cache_write_blocks"] == 4 + 2
    assert all(p.cache_write.size == 0 for p in plans)
    assert plans[-1].cache_load_ids.tolist() == [3]
    s.check_invariants()


@pytest.mark.parametrize("next_prompt, overlappable", [(8, True), (61, False)])
def test_write_through_overlaps_only_blocks_the_step_does_not_reuse(next_prompt, overlappable):
    s = scheduler(host_cache_write="finish")
    engine = FakeEngine(s, kv_check=True)
    engine.add(1, 16, 3, block_keys=keys(1, 4))
    while 1 not in engine.finished:
        engine.step()
    # The next plan writes request 1's blocks through. A short request leaves them alone: the copy
    # may run during the forward pass. A long one takes every block: the copy must come first.
    engine.add(2, next_prompt, 2)
    plan = engine.step()
    assert plan.cache_write[:, 2].sum() == 4
    assert plan.cache_overlap_seconds == pytest.approx(plan.swap_seconds if overlappable else 0.0)
    engine.run()


def test_a_swapped_request_leaves_its_host_copy_as_cache():
    # Request 1 is swapped out and back in (a resident host copy), then finishes: its copy's full
    # blocks become host cache without a copy, and request 3 with the same prefix loads them.
    s = scheduler(preemption="swap", num_blocks=12, max_num_batched_tokens=64, admission="aggressive",
                  policy="priority")
    engine = FakeEngine(s, kv_check=True)
    engine.add(1, 16, 6, block_keys=keys(1, 4), priority=1)
    engine.step()
    engine.add(2, 40, 3, priority=0)  # more urgent: evicts request 1 by swap
    engine.run()
    assert engine.swaps_out >= 1
    swap = s.stats()["swap"]
    assert swap["cache_adopted_blocks"] >= 1 and swap["num_resident_copies"] == 0
    engine.kv.shared[3] = (1, 16)
    engine.add(3, 24, 2, block_keys=np.concatenate([keys(1, 4), keys(3, 2, first=4)]))
    engine.run()
    assert s.stats()["host_hit_blocks"] + s.stats()["kv"]["prefix_hit_blocks"] >= 1
    s.check_invariants()


@pytest.mark.parametrize("write", ["evict", "finish"])
def test_simulated_multi_turn_reuses_more_of_the_conversation_with_the_host_tier(write, tmp_path):
    import json

    from kvsched.cli import main

    base = ["simulate", "--workload", "multi_turn", "--num-requests", "400", "--rate", "2.5", "--seeds", "1",
            "--admission", "past_future"]
    assert main([*base, "--json", str(tmp_path / "gpu.json")]) == 0
    assert main([*base, "--host-kv-tokens", "262144", "--host-cache-write", write,
                 "--json", str(tmp_path / "host.json")]) == 0
    (gpu,), (host,) = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("gpu", "host"))
    assert gpu["host_hit_tokens"] == 0 and host["host_hit_tokens"] > 0
    assert host["prefix_hit_tokens"] + host["host_hit_tokens"] > gpu["prefix_hit_tokens"]
    assert host["cache_write_bytes"] > 0 and host["cache_load_bytes"] > 0
    for record in (gpu, host):
        assert record["completed"] + record["rejected"] == record["num_requests"]


def test_cli_host_cache_write_needs_the_host_tier(capsys):
    from kvsched.cli import main

    assert main(["simulate", "--host-cache-write", "finish"]) == 2
    assert "--host-cache-write: the host tier needs --host-kv-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("write_through", [False, True])
def test_shared_documents_come_back_from_host_byte_exact(write_through):
    # The GPU test's scenario (tests/test_scheduler_swap_gpu.py) on the numpy engine.
    from scheduler_driver import add_document_requests

    s = kvsched.Scheduler(num_blocks=160, block_size=16, max_num_batched_tokens=1024, max_num_seqs=16,
                          admission="aggressive", preemption="swap", num_host_blocks=2048,
                          swap_layout=kv_layout(16), host_prefix_cache=True,
                          host_cache_write="finish" if write_through else "evict",
                          recompute_seconds_per_token=1e-3)
    engine = FakeEngine(s, check=False, kv_check=True)
    add_document_requests(engine, np.random.default_rng(11), 300, block_size=16)
    engine.run(max_steps=20_000)
    stats = s.stats()
    assert len(engine.finished) == 300
    assert stats["host_hit_blocks"] >= 100 and stats["cache_write_blocks"] >= 100
    s.check_invariants()


def test_a_prefix_split_between_the_tiers_is_found_on_both():
    # Request 2 takes only 2 of request 1's 4 cached blocks (the tail goes first): request 3 shares
    # the first 2 on the GPU and loads the next 2 from the host, byte-exact.
    s = scheduler()
    engine = FakeEngine(s, kv_check=True)
    engine.add(1, 16, 3, block_keys=keys(1, 4))
    engine.run()
    engine.add(2, 52, 2)
    engine.run()
    engine.kv.shared[3] = (1, 16)
    engine.add(3, 24, 2, block_keys=np.concatenate([keys(1, 4), keys(3, 2, first=4)]))
    plan = engine.step()
    assert plan.computed_offsets.tolist() == [16]
    assert s.stats()["kv"]["prefix_hit_blocks"] == 2 and plan.cache_load[:, 2].sum() == 2
    # A new request's new blocks are its whole table, hits included (what an engine's worker needs).
    assert np.array_equal(plan.new_blocks, s.block_table(3))
    engine.run()


def test_prefetch_loads_a_step_ahead_and_announces_the_whole_table_with_the_first_row():
    s = scheduler(host_cache_load="prefetch")
    engine, plans = evict_then_reuse(s)
    # The plan that admitted request 3 loads its 4 host blocks but gives it no row: the copy may
    # overlap that step's forward pass. Its prefill comes in the next plan, after the loaded tokens.
    loading = next(p for p in plans if p.cache_load_ids.size)
    assert loading.cache_load_ids.tolist() == [3] and 3 not in loading.req_ids.tolist()
    assert loading.cache_overlap_seconds == pytest.approx(loading.swap_seconds)
    first_row = plans[plans.index(loading) + 1]
    row = first_row.req_ids.tolist().index(3)
    assert first_row.computed_offsets[row] == 16 and first_row.num_tokens[row] == 8
    # The engine learns its blocks here: all 6 (24 tokens), the 4 loaded ones first (FakeEngine
    # checked the KV).
    loaded = np.concatenate([np.arange(dst, dst + n) for _, dst, n in loading.cache_load.tolist()])
    blocks = first_row.blocks_of(row)
    assert blocks.size == 6 and np.array_equal(blocks[:4], loaded)
    s.check_invariants()
