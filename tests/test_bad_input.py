"""Bad input raises an error naming the argument and leaves the allocator unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from kvsched import BlockAllocator
from conftest import snapshot


@pytest.fixture
def allocator():
    a = BlockAllocator(num_blocks=32, block_size=4)
    a.allocate(1, 6)
    a.allocate(2, 3)
    a.allocate(3, 4)
    a.free(3, ttl_steps=10)  # id 3 is pinned
    return a


CASES = [
    ("negative tokens", lambda a: a.allocate(1, -1), ValueError, "num_tokens must be >= 0"),
    ("absurd tokens", lambda a: a.allocate(1, 10**12), ValueError, "num_tokens 1000000000000 exceeds"),
    ("negative id", lambda a: a.allocate(-4, 4), ValueError, "seq_id must be >= 0"),
    ("id overflow", lambda a: a.allocate(2**64, 4), ValueError, "seq_id does not fit in int64"),
    ("float id", lambda a: a.allocate(1.0, 4), TypeError, "seq_id must be an int, got float"),
    ("bool tokens", lambda a: a.allocate(1, True), TypeError, "num_tokens must be an int"),
    ("str tokens", lambda a: a.allocate(1, "8"), TypeError, "num_tokens must be an int"),
    ("pinned id", lambda a: a.allocate(3, 8), ValueError, "seq_id 3 is pinned"),
    ("free unknown", lambda a: a.free(99), KeyError, "seq_id 99 is not a live sequence"),
    ("free pinned", lambda a: a.free(3), KeyError, "seq_id 3 is pinned, not live"),
    ("negative ttl", lambda a: a.free(1, ttl_steps=-1), ValueError, "ttl_steps must be >= 0"),
    ("table unknown", lambda a: a.block_table(42), KeyError, "seq_id 42"),
    ("fork unknown parent", lambda a: a.fork(42, 43), KeyError, "parent_id 42"),
    ("fork into existing", lambda a: a.fork(1, 2), ValueError, "child_id 2 already exists"),
    ("fork into itself", lambda a: a.fork(1, 1), ValueError, "child_id must differ"),
    ("fork into pinned", lambda a: a.fork(1, 3), ValueError, "child_id 3 is pinned"),
    ("unpin unknown", lambda a: a.unpin(1), KeyError, "seq_id 1 is not pinned"),
    ("restore unknown", lambda a: a.restore(7), KeyError, "seq_id 7 is not pinned"),
    ("negative steps", lambda a: a.advance_steps(-1), ValueError, "steps must be >= 0"),
    ("batch float dtype", lambda a: a.allocate_batch(np.array([1.0]), np.array([8])), TypeError, "seq_ids must have an integer dtype"),
    ("batch bool dtype", lambda a: a.allocate_batch(np.array([1]), np.array([True])), TypeError, "num_tokens must have an integer dtype"),
    ("batch not array", lambda a: a.allocate_batch({1: 2}, [8]), TypeError, "seq_ids must be a numpy integer array"),
    ("batch 2-D", lambda a: a.allocate_batch(np.ones((2, 2), np.int64), np.ones(4, np.int64)), ValueError, "seq_ids must be 1-D"),
    ("batch strided", lambda a: a.allocate_batch(np.arange(10)[::2], np.ones(5, np.int64)), ValueError, "seq_ids must be C-contiguous"),
    ("batch length mismatch", lambda a: a.allocate_batch(np.array([1, 2]), np.array([8])), ValueError, "same length"),
    ("batch duplicate live", lambda a: a.allocate_batch(np.array([1, 1]), np.array([8, 9])), ValueError, r"seq_ids\[1\] = 1 appears twice"),
    ("batch duplicate new", lambda a: a.allocate_batch(np.array([8, 9, 8]), np.array([1, 1, 1])), ValueError, "8 appears twice"),
    ("batch negative tokens", lambda a: a.allocate_batch(np.array([1, 2]), np.array([8, -1])), ValueError, r"num_tokens\[1\]"),
    ("batch uint64 overflow", lambda a: a.allocate_batch(np.array([2**63], np.uint64), np.array([1])), ValueError, "outside the range of int64"),
    ("batch pinned", lambda a: a.allocate_batch(np.array([1, 3]), np.array([8, 8])), ValueError, r"seq_ids\[1\] = 3 is pinned"),
    ("free batch duplicate", lambda a: a.free_batch(np.array([1, 2, 1])), ValueError, "appears twice"),
    ("free batch unknown", lambda a: a.free_batch(np.array([1, 77])), KeyError, r"seq_ids\[1\] = 77"),
    ("tokens float", lambda a: a.allocate(9, 8, tokens=np.ones(8)), TypeError, "tokens must have an integer dtype"),
    ("tokens too big", lambda a: a.allocate(9, 8, tokens=np.array([2**40] * 8)), ValueError, "tokens has values outside the range of int32"),
    ("keys wrong dtype", lambda a: a.allocate(9, 8, block_keys=np.ones((2, 2), np.int64)), TypeError, "block_keys must have dtype uint64"),
    ("keys wrong shape", lambda a: a.allocate(9, 8, block_keys=np.ones((2, 3), np.uint64)), ValueError, r"block_keys must have shape \(n, 2\)"),
    ("tokens and keys", lambda a: a.allocate(9, 8, tokens=np.arange(8), block_keys=np.ones(2, np.uint64)), ValueError, "not both"),
    ("match needs input", lambda a: a.match_prefix(), ValueError, "pass tokens or block_keys"),
]


@pytest.mark.parametrize("name,call,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_argument_and_changes_nothing(allocator, name, call, error, message):
    before = snapshot(allocator, seq_ids=range(12))
    with pytest.raises(error, match=message):
        call(allocator)
    assert snapshot(allocator, seq_ids=range(12)) == before
    assert allocator.is_pinned(3)
    allocator.check_invariants()


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(num_blocks=0, block_size=16), ValueError, "num_blocks"),
        (dict(num_blocks=2**31, block_size=16), ValueError, "num_blocks"),
        (dict(num_blocks=16, block_size=0), ValueError, "block_size"),
        (dict(num_blocks=16.0, block_size=16), TypeError, "num_blocks must be an int"),
        (dict(num_blocks=16, block_size=16, placement="best"), ValueError, "placement must be one of"),
        (dict(num_blocks=16, block_size=16, hash_algorithm="md5"), ValueError, "hash_algorithm must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        BlockAllocator(**kwargs)


def test_lists_of_ints_are_accepted_as_arrays():
    a = BlockAllocator(num_blocks=16, block_size=4)
    indptr, blocks = a.allocate_batch([1, 2], [4, 4])
    assert indptr.tolist() == [0, 1, 2]
    a.free_batch([1, 2])
    a.free_batch([])  # empty batch is a no-op
    assert a.num_free_blocks == 16


def test_narrow_integer_arrays_are_converted():
    a = BlockAllocator(num_blocks=16, block_size=4)
    a.allocate_batch(np.array([1, 2], np.int32), np.array([4, 8], np.uint16))
    assert a.num_tokens(2) == 8
