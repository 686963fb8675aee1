"""A fake KV cache for swap tests: numpy buffers per layout tensor, filled with a known pattern per
(sequence, logical block), so that a round trip can be checked byte for byte on any executor."""

from __future__ import annotations

import numpy as np

import kvsched
from kvsched.swap import KvLayout

LAYOUTS = {
    # 4 layers of K and V, dense: the flash-attention layout in miniature.
    "per_layer": KvLayout.per_layer(num_layers=4, block_size=4, num_kv_heads=2, head_dim=8, dtype_bytes=2),
    # one tensor whose block holds every layer
    "cross_layer": KvLayout.cross_layer(num_layers=4, block_size=4, num_kv_heads=2, head_dim=8, dtype_bytes=2),
    # K and V interleaved per block ([num_blocks, 2, ...] viewed as two tensors): stride is twice the block
    "interleaved": KvLayout(np.array([[128, 256, 256], [128, 256, 256]], dtype=np.int64)),
    # a host side packed tighter than the device side
    "padded_device": KvLayout(np.array([[96, 160, 96], [64, 64, 64]], dtype=np.int64)),
}


def make_buffers(layout: KvLayout, num_blocks: int, side: str, alloc=np.zeros) -> list[np.ndarray]:
    return [alloc(n, dtype=np.uint8) for n in layout.buffer_nbytes(num_blocks, side)]


def block_pattern(seq_id: int, logical_block: int, tensor: int, nbytes: int) -> np.ndarray:
    seed = (seq_id * 1_000_003 + logical_block * 7919 + tensor * 104_729) & 0xFFFFFFFF
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def block_view(layout: KvLayout, buffers: list[np.ndarray], tensor: int, block: int, side: str) -> np.ndarray:
    block_bytes, device_stride, host_stride = (int(v) for v in layout.tensors[tensor])
    start = block * (device_stride if side == "device" else host_stride)
    return buffers[tensor][start:start + block_bytes]


def write_sequence(layout: KvLayout, buffers, seq_id: int, table, first_block: int = 0) -> None:
    for logical in range(first_block, len(table)):
        for t in range(layout.num_tensors):
            view = block_view(layout, buffers, t, int(table[logical]), "device")
            view[:] = block_pattern(seq_id, logical, t, view.size)


def sequence_matches(layout: KvLayout, buffers, seq_id: int, table, num_blocks: int) -> bool:
    for logical in range(num_blocks):
        for t in range(layout.num_tensors):
            view = block_view(layout, buffers, t, int(table[logical]), "device")
            if not np.array_equal(view, block_pattern(seq_id, logical, t, view.size)):
                return False
    return True


def poison(buffers, value: int = 0xAB) -> None:
    for b in buffers:
        b.fill(value)


def tables_csr(allocator: kvsched.BlockAllocator, seq_ids) -> tuple[np.ndarray, np.ndarray]:
    tables = [allocator.block_table(s) for s in seq_ids]
    indptr = np.concatenate([[0], np.cumsum([len(t) for t in tables])]).astype(np.int64)
    blocks = np.concatenate(tables).astype(np.int32) if tables else np.zeros(0, np.int32)
    return indptr, blocks


def fragmented_allocator(num_blocks: int, rng: np.random.Generator, fragment: bool = True) -> kvsched.BlockAllocator:
    """An allocator whose free space is scattered: filler sequences are allocated and every other
    one freed, so new tables take many short runs."""
    allocator = kvsched.BlockAllocator(num_blocks=num_blocks, block_size=4, placement="lifo" if fragment else "contiguous")
    if fragment:
        fillers = list(range(10_000, 10_000 + num_blocks // 2))
        for s in fillers:
            allocator.allocate(s, 4)
        for s in rng.permutation(fillers)[: len(fillers) // 2]:
            allocator.free(int(s))
    return allocator
