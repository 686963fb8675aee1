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
    options = dict(num_blocks=16, block_size=BLOCK, max_num_batched_tokens=64, max_num_seqs=4,
                   num_host_blocks=num_host_blocks, swap_layout=kv_layout(BLOCK), host_prefix_cache=host_tier,
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
