"""Prefix caching: chained keys, longest-prefix match, LRU reuse of released blocks, TTL pins."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from kvsched import BlockAllocator, OutOfBlocks


def test_keys_are_chained_over_the_whole_prefix():
    a = BlockAllocator(num_blocks=8, block_size=4)
    keys = a.hash_tokens(np.arange(12))
    assert keys.shape == (3, 2) and keys.dtype == np.uint64
    same_block_other_prefix = a.hash_tokens(np.concatenate([[99, 1, 2, 3], np.arange(4, 12)]))
    # Blocks 1 and 2 hold the same tokens, but their prefix differs, so their keys differ.
    assert not np.any(np.all(keys == same_block_other_prefix, axis=1))
    assert np.array_equal(a.hash_tokens(np.arange(14)), keys)  # the partial block has no key
    assert not np.array_equal(a.hash_tokens(np.arange(12), salt=1), keys)


def test_sha256_option_matches_hashlib():
    a = BlockAllocator(num_blocks=8, block_size=4, hash_algorithm="sha256")
    tokens = np.array([5, 6, 7, 8, 9, 10, 11, 12], dtype=np.int32)
    keys = a.hash_tokens(tokens, salt=3)
    parent = (3).to_bytes(8, "little") + bytes(8)
    for b in range(2):
        digest = hashlib.sha256(parent + tokens[4 * b : 4 * b + 4].astype("<i4").tobytes()).digest()
        expected = (int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little"))
        assert tuple(int(x) for x in keys[b]) == expected
        parent = digest[:16]


def test_fast_keys_do_not_collide_on_many_random_prefixes(rng):
    a = BlockAllocator(num_blocks=8, block_size=4)
    prompts = [rng.integers(0, 50, size=64) for _ in range(2000)]
    keys = np.concatenate([a.hash_tokens(p) for p in prompts])
    prefixes = {tuple(p[: 4 * (b + 1)].tolist()) for p in prompts for b in range(16)}
    # Equal keys exactly when the whole prefixes are equal.
    assert len({(int(lo), int(hi)) for lo, hi in keys}) == len(prefixes)


def test_new_sequence_shares_cached_prefix_and_leaves_one_token_to_compute():
    a = BlockAllocator(num_blocks=16, block_size=4)
    prompt = np.arange(12)
    first = a.allocate(1, 12, tokens=prompt)
    assert a.match_prefix(prompt).tolist() == first.tolist()
    # Same 12-token prompt: only two blocks are reused, so the last token is computed again.
    second = a.allocate(2, 12, tokens=prompt)
    assert second[:2].tolist() == first[:2].tolist() and second[2] != first[2]
    assert a.num_cached_tokens(2) == 8
    # A longer prompt with the same start reuses all three.
    third = a.allocate(3, 14, tokens=np.arange(14))
    assert third[:3].tolist() == first.tolist() and a.num_cached_tokens(3) == 12
    s = a.stats()
    assert s["prefix_hit_blocks"] == 5 and s["prefix_queries"] == 3
    a.check_invariants()


def test_released_blocks_stay_findable_until_reused_lru_and_free_first():
    a = BlockAllocator(num_blocks=6, block_size=4)
    a.allocate(1, 8, tokens=np.arange(8))  # blocks 0, 1 keyed
    a.allocate(2, 8, tokens=np.arange(100, 108))  # keyed
    a.free(1)
    a.free(2)
    assert a.stats()["num_cached"] == 4 and a.num_free_blocks == 6
    # Two plain free blocks exist: they are used before any cached block is evicted.
    a.allocate(3, 8)
    assert a.stats()["cache_evictions"] == 0
    assert a.match_prefix(np.arange(8)).size == 2 and a.match_prefix(np.arange(100, 108)).size == 2
    # Next allocation evicts in LRU order: seq 1 was released first, its tail block goes first.
    a.allocate(4, 4)
    assert a.stats()["cache_evictions"] == 1
    assert a.match_prefix(np.arange(8)).size == 1  # head block of seq 1 survives
    assert a.match_prefix(np.arange(100, 108)).size == 2
    a.check_invariants()


def test_hit_on_cached_block_removes_it_from_the_evictable_set():
    a = BlockAllocator(num_blocks=4, block_size=4)
    a.allocate(1, 8, tokens=np.arange(8))
    a.free(1)
    a.allocate(2, 9, tokens=np.arange(9))  # two hits + one new block
    assert a.num_cached_tokens(2) == 8
    assert a.num_free_blocks == 1
    a.check_invariants()


def test_allocation_counts_hits_when_checking_capacity():
    a = BlockAllocator(num_blocks=3, block_size=4)
    a.allocate(1, 8, tokens=np.arange(8))
    a.free(1)
    # 3 blocks needed, 2 of them cached hits: fits exactly.
    a.allocate(2, 12, tokens=np.arange(12))
    assert a.num_free_blocks == 0
    a.check_invariants()


def test_block_keys_path_and_incremental_registration():
    a = BlockAllocator(num_blocks=16, block_size=4)
    keys = a.hash_tokens(np.arange(16))
    a.allocate(1, 6, block_keys=keys)  # chunked prefill: one full block so far
    assert a.match_prefix(block_keys=keys).size == 1
    a.allocate(1, 16, block_keys=keys)
    assert a.match_prefix(block_keys=keys).size == 4
    with pytest.raises(ValueError, match="do not extend"):
        a.allocate(1, 20, block_keys=a.hash_tokens(np.arange(1, 17)))
    a.check_invariants()


def test_duplicate_content_keeps_first_block_keyed():
    a = BlockAllocator(num_blocks=16, block_size=4)
    a.allocate(1, 5)
    a.allocate(2, 5)
    keys = a.hash_tokens(np.arange(8))
    a.allocate(1, 8, block_keys=keys)
    a.allocate(2, 8, block_keys=keys)  # same content computed twice: only one copy is findable
    hits = a.match_prefix(block_keys=keys)
    assert hits.tolist() == a.block_table(1).tolist()
    a.free(1)
    a.free(2)
    assert a.stats()["num_cached"] == 2
    a.check_invariants()


def test_prefix_caching_disabled_ignores_keys():
    a = BlockAllocator(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a.allocate(1, 8, tokens=np.arange(8))
    a.free(1)
    assert a.match_prefix(np.arange(8)).size == 0
    assert a.stats()["num_cached"] == 0


def test_reset_prefix_cache():
    a = BlockAllocator(num_blocks=8, block_size=4)
    a.allocate(1, 8, tokens=np.arange(8))
    a.allocate(2, 8, tokens=np.arange(50, 58))
    a.free(1)
    assert a.reset_prefix_cache() == 4
    assert a.match_prefix(np.arange(50, 58)).size == 0
    assert a.stats()["num_cached"] == 0 and a.stats()["num_free"] == 6
    a.free(2)
    assert a.stats()["num_free"] == 8
    a.check_invariants()


def test_ttl_pin_holds_blocks_until_expiry():
    a = BlockAllocator(num_blocks=8, block_size=4)
    a.allocate(1, 8, tokens=np.arange(8))
    a.free(1, ttl_steps=3)
    assert a.is_pinned(1) and 1 not in a
    assert a.num_free_blocks == 6  # pinned blocks are not available
    with pytest.raises(OutOfBlocks):
        a.allocate(2, 32)
    assert a.advance_steps(2) == 0 and a.is_pinned(1)
    # A new turn finds the pinned prefix.
    assert a.match_prefix(np.arange(8)).size == 2
    assert a.advance_steps() == 1 and not a.is_pinned(1)
    assert a.stats()["num_cached"] == 2 and a.num_free_blocks == 8
    a.check_invariants()


def test_restore_and_unpin():
    a = BlockAllocator(num_blocks=8, block_size=4)
    a.allocate(1, 6)
    table = a.block_table(1).tolist()
    a.free(1, ttl_steps=10)
    a.restore(1)
    assert a.block_table(1).tolist() == table and a.num_tokens(1) == 6
    a.allocate(1, 9)  # grows as before
    a.free(1, ttl_steps=10)
    a.unpin(1)
    assert a.num_free_blocks == 8
    assert a.advance_steps(20) == 0  # the stale expiry is ignored
    a.check_invariants()


def test_pinned_block_shared_by_a_new_sequence_stays_after_pin_expires():
    a = BlockAllocator(num_blocks=8, block_size=4)
    a.allocate(1, 8, tokens=np.arange(8))
    a.free(1, ttl_steps=1)
    a.allocate(2, 12, tokens=np.arange(12))  # shares both pinned blocks
    assert a.stats()["num_pinned"] == 0  # referenced by a live sequence: used, not pinned-only
    a.advance_steps(1)
    assert a.block_table(2).size == 3 and a.num_free_blocks == 5
    a.check_invariants()
