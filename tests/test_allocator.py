"""BlockAllocator semantics: growth, release, fork and copy-on-write, placement, batched calls."""

from __future__ import annotations

import numpy as np
import pytest

import kvsched
from kvsched import BlockAllocator, OutOfBlocks


def test_public_contract_names():
    a = BlockAllocator(num_blocks=1024, block_size=16)
    assert a.num_blocks == 1024 and a.block_size == 16 and a.num_free_blocks == 1024
    assert issubclass(OutOfBlocks, MemoryError)
    assert isinstance(kvsched.__version__, str) and kvsched.__version__
    assert isinstance(kvsched.has_cuda(), bool)


def test_allocate_grows_to_total_tokens_and_returns_added_blocks():
    a = BlockAllocator(num_blocks=16, block_size=4)
    added = a.allocate(7, 5)
    assert added.dtype == np.int32 and added.tolist() == [0, 1]
    assert a.allocate(7, 8).size == 0  # still fits in two blocks
    assert a.allocate(7, 3).size == 0  # never shrinks
    assert a.num_tokens(7) == 8
    assert a.allocate(7, 9).tolist() == [2]  # the block right after the last one
    assert a.block_table(7).tolist() == [0, 1, 2]
    assert a.num_free_blocks == 13
    a.check_invariants()


def test_free_returns_every_block():
    a = BlockAllocator(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a.allocate(1, 10)
    a.allocate(2, 7)
    a.free(1)
    assert 1 not in a and 2 in a
    assert a.num_free_blocks == 6
    a.free(2)
    assert a.num_free_blocks == 8
    assert a.stats()["num_free"] == 8
    a.check_invariants()


def test_out_of_blocks_changes_nothing():
    a = BlockAllocator(num_blocks=5, block_size=4)
    a.allocate(1, 12)
    a.allocate(9, 4)
    before = (a.block_table(1).tolist(), a.num_free_blocks, a.stats())
    with pytest.raises(OutOfBlocks, match="seq_id 1 needs 2 blocks but only 1"):
        a.allocate(1, 20)
    with pytest.raises(OutOfBlocks):
        a.allocate(2, 8)
    assert (a.block_table(1).tolist(), a.num_free_blocks, a.stats()) == before
    assert 2 not in a
    assert a.can_allocate(2, 4) and not a.can_allocate(2, 5)
    a.check_invariants()


def test_fork_shares_blocks_and_copy_on_write_on_shared_partial_block():
    a = BlockAllocator(num_blocks=16, block_size=4)
    a.allocate(1, 6)  # blocks [0, 1], last block half full
    a.fork(1, 2)
    assert a.block_table(2).tolist() == a.block_table(1).tolist()
    assert a.num_free_blocks == 14  # shared, not copied
    assert a.blocks_needed(2, 7) == 1  # the copy
    assert a.allocate(2, 7).size == 0  # no block appended...
    copies = a.pop_copy_on_writes()
    assert copies.shape == (1, 3)
    seq, src, dst = copies[0].tolist()
    assert (seq, src) == (2, 1)
    assert a.block_table(2).tolist() == [0, dst] and a.block_table(1).tolist() == [0, 1]
    assert a.pop_copy_on_writes().shape == (0, 3)  # popped once
    # The parent is now the only holder of block 1: it appends in place.
    a.allocate(1, 7)
    assert a.pop_copy_on_writes().shape == (0, 3)
    assert a.stats()["copy_on_writes"] == 1
    a.check_invariants()


def test_fork_of_full_last_block_needs_no_copy():
    a = BlockAllocator(num_blocks=16, block_size=4)
    a.allocate(1, 8)
    a.fork(1, 2)
    assert a.allocate(2, 9).size == 1
    assert a.pop_copy_on_writes().shape == (0, 3)
    a.free(1)
    a.free(2)
    assert a.num_free_blocks == 16
    a.check_invariants()


def test_batched_copy_on_write_counts_the_last_sharer_writing_in_place():
    a = BlockAllocator(num_blocks=5, block_size=4, enable_prefix_caching=False)
    a.allocate(1, 6)
    a.fork(1, 2)
    a.fork(1, 3)
    # Three sharers of a partial block all grow: two copies, the third writes in place.
    assert a.num_free_blocks == 3
    indptr, blocks = a.allocate_batch(np.array([1, 2, 3]), np.array([7, 7, 7]))
    assert indptr.tolist() == [0, 0, 0, 0] and blocks.size == 0
    assert a.pop_copy_on_writes().shape == (2, 3)
    assert a.num_free_blocks == 1
    a.check_invariants()


def test_growth_stays_contiguous_when_interleaved():
    a = BlockAllocator(num_blocks=4096, block_size=16)
    ids = np.arange(64)
    tokens = np.full(64, 100)
    a.allocate_batch(ids, tokens)
    for _ in range(400):  # decode steps interleaving the growth of 64 sequences
        tokens += 1
        a.allocate_batch(ids, tokens)
    stats = a.stats()
    assert stats["table_extents"] == 64  # every table is still one extent
    for s in range(64):
        table = a.block_table(s)
        assert np.all(np.diff(table) == 1)
    a.check_invariants()


def test_placement_baselines_fragment_interleaved_growth():
    fifo = BlockAllocator(num_blocks=4096, block_size=16, placement="fifo")
    ids = np.arange(64)
    tokens = np.full(64, 16)
    fifo.allocate_batch(ids, tokens)
    for _ in range(50):
        tokens += 16
        fifo.allocate_batch(ids, tokens)
    # Interleaved growth from a plain free list gives every block its own extent.
    assert fifo.stats()["mean_blocks_per_extent"] < 1.1
    fifo.check_invariants()


def test_allocate_batch_csr_output_matches_tables():
    a = BlockAllocator(num_blocks=64, block_size=4)
    indptr, blocks = a.allocate_batch([3, 1, 2], [5, 0, 9])
    assert indptr.dtype == np.int64 and blocks.dtype == np.int32
    assert indptr.tolist() == [0, 2, 2, 5]
    assert blocks[0:2].tolist() == a.block_table(3).tolist()
    assert a.block_table(1).size == 0
    assert blocks[2:5].tolist() == a.block_table(2).tolist()


def test_allocate_batch_is_all_or_nothing():
    a = BlockAllocator(num_blocks=8, block_size=4)
    a.allocate(1, 4)
    before = (a.stats(), a.block_table(1).tolist())
    with pytest.raises(OutOfBlocks, match="allocate_batch needs 9 blocks"):
        a.allocate_batch([1, 2, 3], [8, 16, 16])
    assert (a.stats(), a.block_table(1).tolist()) == before
    assert 2 not in a and 3 not in a


def test_free_batch():
    a = BlockAllocator(num_blocks=32, block_size=4)
    a.allocate_batch(np.arange(5), np.full(5, 9))
    a.free_batch(np.array([0, 2, 4]))
    assert [s in a for s in range(5)] == [False, True, False, True, False]
    assert a.num_free_blocks == 32 - 6
    with pytest.raises(KeyError, match=r"seq_ids\[1\] = 0 is not a live sequence"):
        a.free_batch(np.array([1, 0]))
    assert 1 in a  # the failed batch freed nothing
    a.check_invariants()


def test_stats_count_every_state():
    a = BlockAllocator(num_blocks=32, block_size=4)
    a.allocate(1, 8, tokens=np.arange(8))  # two full keyed blocks
    a.allocate(2, 5)
    a.allocate(3, 4)
    a.free(1)  # -> cached
    a.free(3, ttl_steps=5)  # -> pinned
    s = a.stats()
    assert (s["num_cached"], s["num_pinned"], s["num_used"], s["num_free"]) == (2, 1, 2, 27)
    assert s["num_sequences"] == 1 and s["num_pinned_sequences"] == 1
    assert a.num_free_blocks == 29  # free + cached
    a.check_invariants()


def test_calls_from_two_threads_are_serialized():
    import threading

    a = BlockAllocator(num_blocks=1 << 14, block_size=16)
    errors = []

    def worker(offset: int) -> None:
        try:
            ids = np.arange(offset, offset + 64)
            for step in range(1, 200):
                a.allocate_batch(ids, np.full(64, step * 3))
                a.allocate(offset + 1000, step)
                a.check_invariants()
            a.free_batch(ids)
            a.free(offset + 1000)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k * 10_000,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert a.num_free_blocks == 1 << 14
    a.check_invariants()
