"""BlockCopier: block extents between KV tensors of any layout and a host pool, byte-exact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsched.block_copier import BlockCopier, block_pieces

NUM_BLOCKS, BLOCK, HEADS, DIM = 12, 4, 2, 8


def layouts() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    kv_first = rng.standard_normal((2, NUM_BLOCKS, HEADS, BLOCK, DIM)).astype(np.float32)  # vLLM CPU / flash
    block_first = rng.standard_normal((NUM_BLOCKS, 2, BLOCK, HEADS, DIM)).astype(np.float16)  # K/V inside a block
    # Heads outside the block dimension: each head of a block is its own run.
    heads_outer = np.ascontiguousarray(
        rng.standard_normal((HEADS, NUM_BLOCKS, BLOCK, DIM)).astype(np.float32)).transpose(1, 0, 2, 3)
    return {"kv_first": kv_first, "block_first": block_first, "heads_outer": heads_outer}


def test_pieces_follow_the_tensors_strides():
    t = layouts()
    kv_first = block_pieces(t["kv_first"], NUM_BLOCKS, "kv_first")
    assert [(p.offset, p.block_stride, p.block_bytes) for p in kv_first] == [
        (0, HEADS * BLOCK * DIM * 4, HEADS * BLOCK * DIM * 4),
        (NUM_BLOCKS * HEADS * BLOCK * DIM * 4, HEADS * BLOCK * DIM * 4, HEADS * BLOCK * DIM * 4)]
    interleaved = block_pieces(t["block_first"], NUM_BLOCKS)
    # K and V of a block are adjacent: one run of both.
    assert [(p.offset, p.block_stride, p.block_bytes) for p in interleaved] == [
        (0, 2 * BLOCK * HEADS * DIM * 2, 2 * BLOCK * HEADS * DIM * 2)]
    assert len(block_pieces(t["heads_outer"], NUM_BLOCKS)) == HEADS


def test_a_tensor_without_the_block_dimension_is_refused_by_name():
    with pytest.raises(ValueError, match="layer.3: no dimension"):
        block_pieces(np.zeros((2, 5, 4), np.float32), NUM_BLOCKS, "layer.3")
    with pytest.raises(ValueError, match="several dimensions"):  # K/V or the block dimension?
        block_pieces(np.zeros((2, 2, 4), np.float32), 2, "layer.0")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, NUM_BLOCKS - 1), st.integers(1, 3)), min_size=1, max_size=4))
def test_out_then_in_moves_every_byte_of_every_block(runs):
    tensors = layouts()
    copier = BlockCopier(tensors, NUM_BLOCKS, num_host_blocks=16)
    # Disjoint device runs, packed into host blocks 0.., then brought back into other device blocks.
    seen, extents, host = set(), [], 0
    for start, n in runs:
        n = min(n, NUM_BLOCKS - start)
        if seen & set(range(start, start + n)) or host + n > 16:
            continue
        seen |= set(range(start, start + n))
        extents.append((start, host, n))
        host += n
    before = {b: copier.device_block_bytes(b) for b in seen}
    copier.copy(np.array(extents), "out")
    for t in tensors.values():  # the device blocks are reused by others
        t[...] = 0
    # Back block by block into other device blocks (reversed), so "in" is checked on its own.
    back = np.array([(h + k, NUM_BLOCKS - 1 - (d + k), 1) for d, h, n in extents for k in range(n)])
    copier.copy(back, "in")
    for block, raw in before.items():
        assert copier.device_block_bytes(NUM_BLOCKS - 1 - block) == raw


def test_a_descriptor_outside_the_pool_copies_nothing():
    tensors = layouts()
    copier = BlockCopier(tensors, NUM_BLOCKS, num_host_blocks=2)
    snapshot = {k: v.copy() for k, v in tensors.items()}
    with pytest.raises(ValueError):
        copier.copy(np.array([(0, 0, 1), (3, 2, 1)]), "out")  # host block 2 is outside a pool of 2
    with pytest.raises(ValueError):
        copier.copy(np.array([(1, NUM_BLOCKS, 1)]), "in")
    for name, value in tensors.items():
        assert np.array_equal(value, snapshot[name])


class _DeviceArray:
    """Stands for a CUDA array (CuPy, Numba): only its interface, never dereferenced here."""

    def __init__(self, shape):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f2", "data": (1 << 40, False),
                                         "version": 3, "strides": None}


def test_device_memory_without_cuda_is_refused_by_name():
    # A memmove through a device pointer would crash the process.
    with pytest.raises(ValueError, match=r"kv_tensors\['layer.1'\]: device memory, but cuda=False"):
        BlockCopier({"layer.0": np.zeros((2, 8, 4), np.float16), "layer.1": _DeviceArray((2, 8, 4))}, 8, 4)


def test_step_copy_runner_refuses_cuda_arrays_it_has_no_streams_for():
    from kvsched.step_copies import StepCopyRunner

    with pytest.raises(TypeError, match="kv_tensors: CUDA arrays other than torch tensors"):
        StepCopyRunner({"layer.0": _DeviceArray((2, 8, 4))}, 8)


def test_host_memory_with_cuda_is_refused_by_name():
    with pytest.raises(ValueError, match=r"kv_tensors\['layer.0'\]: host memory, but cuda=True"):
        BlockCopier({"layer.0": np.zeros((2, 8, 4), np.float16)}, 8, 4, cuda=True)
