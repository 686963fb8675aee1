"""Swap planning: where a preempted request's KV goes in host memory and which bytes move.

``SwapPlanner`` (over ``kvsched._core.SwapPlanner``) keeps a host block pool with contiguity-aware
placement, plans swap-outs and swap-ins as coalesced block extents and as byte descriptors for the
engine's KV layout, reuses host copies that are still valid (a second swap-out moves only new
blocks), and estimates copy time with a cost model. ``copy_host`` executes descriptors between host
buffers (numpy arrays); ``kvsched.cuda.CopyEngine`` executes them between GPU and pinned host memory.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from time import perf_counter
from typing import Sequence

import numpy as np

from . import _core

STRATEGIES = ("per_descriptor", "batched", "gather_kernel")


@dataclass(frozen=True)
class KvLayout:
    """The engine's KV tensors as the planner sees them: one row per tensor of
    (block_bytes, device_block_stride, host_block_stride), all in bytes."""

    tensors: np.ndarray

    @classmethod
    def per_layer(cls, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                  dtype_bytes: int = 2) -> "KvLayout":
        """vLLM flash-attention style: a K and a V tensor per layer, each [num_blocks, block_size,
        heads, head_dim], dense on both sides (2 * num_layers tensors)."""
        block = _positive(block_size, "block_size") * _positive(num_kv_heads, "num_kv_heads") * \
            _positive(head_dim, "head_dim") * _positive(dtype_bytes, "dtype_bytes")
        rows = np.full((2 * _positive(num_layers, "num_layers"), 3), block, dtype=np.int64)
        return cls(rows)

    @classmethod
    def cross_layer(cls, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype_bytes: int = 2) -> "KvLayout":
        """One tensor whose block holds K and V of every layer: [num_blocks, layers, 2, block_size,
        heads, head_dim]."""
        per_layer = cls.per_layer(num_layers, block_size, num_kv_heads, head_dim, dtype_bytes)
        total = int(per_layer.tensors[:, 0].sum())
        return cls(np.array([[total, total, total]], dtype=np.int64))

    @property
    def num_tensors(self) -> int:
        return int(self.tensors.shape[0])

    @property
    def bytes_per_block(self) -> int:
        return int(self.tensors[:, 0].sum())

    def buffer_nbytes(self, num_blocks: int, side: str = "device") -> list[int]:
        """Bytes each tensor needs to hold `num_blocks` blocks on `side` ("device" or "host")."""
        column = {"device": 1, "host": 2}[side]
        return [int((num_blocks - 1) * row[column] + row[0]) for row in self.tensors]


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def default_cost_model() -> np.ndarray:
    """The default cost table, shape (2, 3, 3): ``[direction (out, in)][strategy][per_call_s,
    per_descriptor_s, bytes_per_s]``; published PCIe Gen5 figures, not a measurement."""
    return _core.default_swap_cost()


def host_copy_cost(nbytes: int = 32 << 20, pieces: int = 4096, piece_bytes: int = 4096,
                   repeats: int = 3) -> np.ndarray:
    """The swap cost table (2, 3, 3) for copies within host memory, timed here: bandwidth from one
    ``nbytes`` copy, the per-descriptor cost from ``pieces`` scattered copies of ``piece_bytes``
    (medians of ``repeats``); the same for both directions and every strategy."""
    if min(nbytes, pieces, piece_bytes, repeats) <= 0 or 2 * pieces * piece_bytes > nbytes:
        raise ValueError("host_copy_cost: need positive sizes and nbytes >= 2 * pieces * piece_bytes")
    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    spans = ([(src.ctypes.data, nbytes)], [(dst.ctypes.data, nbytes)])
    whole = np.array([[0, 0, 0, nbytes]], np.int64)
    offsets = np.arange(pieces, dtype=np.int64) * 2 * piece_bytes
    scattered = np.stack([np.zeros(pieces, np.int64), offsets, offsets, np.full(pieces, piece_bytes)], axis=1)

    def median_seconds(descriptors: np.ndarray) -> float:
        times = []
        for _ in range(repeats):
            start = perf_counter()
            _core.copy_descriptors_host(descriptors, *spans)
            times.append(perf_counter() - start)
        return float(np.median(times))

    bandwidth = nbytes / max(median_seconds(whole), 1e-9)
    per_descriptor = max(0.0, (median_seconds(scattered) - pieces * piece_bytes / bandwidth) / pieces)
    table = np.zeros((2, 3, 3))
    table[:, :, 1], table[:, :, 2] = per_descriptor, bandwidth
    return table


@dataclass(frozen=True)
class SwapPlan:
    """One planned swap. ``extents[extent_indptr[i]:extent_indptr[i+1]]`` are sequence i's
    (src_block, dst_block, n_blocks) rows; ``descriptors`` are (tensor, src_offset, dst_offset,
    nbytes) rows (empty without a layout)."""

    direction: str
    seq_ids: np.ndarray
    extent_indptr: np.ndarray
    extents: np.ndarray
    descriptors: np.ndarray
    blocks_copied: int
    blocks_reused: int
    bytes: int
    num_descriptors: int
    estimated_seconds: float

    @property
    def descriptors_per_block(self) -> float:
        return self.num_descriptors / self.blocks_copied if self.blocks_copied else 0.0


def _locked(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return call


class SwapPlanner:
    """Host block pool and swap plans for preempted sequences.

    Args:
        num_host_blocks: blocks in the host pool (same block size as the device pool).
        block_size: tokens per block.
        layout: the engine's KV layout; without one, plans carry extents only and bytes are
            estimated from ``block_bytes`` split in ``tensors_per_block`` pieces.
        reuse_host_copies: keep a host copy after swap-in so the next swap-out moves only blocks
            written since (evicted least recently used first when the pool needs room).
        cost: a (2, 3, 3) cost table (see ``default_cost_model``), e.g. from
            ``kvsched.cuda.calibrate_swap_cost``.

    Running out of host blocks raises ``kvsched.OutOfBlocks`` with nothing changed. Safe from any
    thread: calls run one at a time under a lock (the native planner is not thread-safe, and the
    planning calls release the GIL).
    """

    def __init__(self, num_host_blocks: int, block_size: int = 16, *, layout: KvLayout | None = None,
                 block_bytes: int = 2 * 1024 * 1024, tensors_per_block: int = 64,
                 reuse_host_copies: bool = True, cost: np.ndarray | None = None) -> None:
        self.layout = layout
        self._lock = threading.Lock()
        self._core = _core.SwapPlanner(num_host_blocks, block_size, None if layout is None else layout.tensors,
                                       block_bytes, tensors_per_block, reuse_host_copies, cost)

    @_locked
    def plan_swap_out(self, seq_ids: Sequence[int], num_tokens: Sequence[int], block_indptr: Sequence[int],
                      device_blocks: Sequence[int]) -> SwapPlan:
        """Plan moving sequences to host. Sequence i holds ``num_tokens[i]`` current tokens in
        ``device_blocks[block_indptr[i]:block_indptr[i+1]]`` (its block table in token order). Free
        its device blocks once the copy has run."""
        return SwapPlan(**self._core.plan_swap_out(seq_ids, num_tokens, block_indptr, device_blocks))

    @_locked
    def plan_swap_out_from(self, allocator, seq_ids: Sequence[int]) -> SwapPlan:
        """plan_swap_out with block tables and token counts read from a ``kvsched.BlockAllocator``."""
        return SwapPlan(**self._core.plan_swap_out_from(allocator._core, seq_ids))

    @_locked
    def plan_swap_in(self, seq_ids: Sequence[int], block_indptr: Sequence[int], device_blocks: Sequence[int],
                     skip_blocks: Sequence[int] | None = None) -> SwapPlan:
        """Plan moving swapped sequences back into freshly allocated device blocks. The first
        ``skip_blocks[i]`` blocks are already on the device (a prefix-cache hit) and are not copied."""
        return SwapPlan(**self._core.plan_swap_in(seq_ids, block_indptr, device_blocks, skip_blocks))

    @_locked
    def release(self, seq_ids: Sequence[int]) -> None:
        """Drop host copies (finished or aborted sequences, or KV that was rewritten)."""
        self._core.release(seq_ids)

    @_locked
    def host_blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        return self._core.host_blocks_needed(seq_id, num_tokens)

    @_locked
    def can_swap_out(self, seq_id: int, num_tokens: int) -> bool:
        return self._core.can_swap_out(seq_id, num_tokens)

    @_locked
    def estimate_round_trip_seconds(self, seq_id: int, num_tokens: int) -> float:
        return self._core.estimate_round_trip_seconds(seq_id, num_tokens)

    @_locked
    def is_swapped(self, seq_id: int) -> bool:
        return self._core.is_swapped(seq_id)

    @_locked
    def has_host_copy(self, seq_id: int) -> bool:
        return self._core.has_host_copy(seq_id)

    @_locked
    def num_swapped_tokens(self, seq_id: int) -> int:
        return self._core.num_swapped_tokens(seq_id)

    @_locked
    def host_blocks(self, seq_id: int) -> np.ndarray:
        return self._core.host_blocks(seq_id)

    @_locked
    def cost_model(self) -> np.ndarray:
        return self._core.cost_model()

    @_locked
    def stats(self) -> dict:
        return self._core.stats()

    @_locked
    def check_invariants(self) -> None:
        self._core.check_invariants()


def host_span(array: np.ndarray, name: str, writable: bool) -> tuple[int, int]:
    """(pointer, nbytes) of a C-contiguous numpy array; the argument name goes into errors."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(array).__name__}")
    if array.dtype.hasobject:  # its bytes are object pointers: copying them corrupts refcounts
        raise TypeError(f"{name}: must hold plain numbers, got dtype {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    if writable and not array.flags.writeable:
        raise ValueError(f"{name}: is read-only")
    return array.ctypes.data, array.nbytes


def copy_host(descriptors: np.ndarray, src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> None:
    """Execute byte descriptors between host buffers, one numpy array per layout tensor on each side.
    Every descriptor is checked against the buffers before the first byte moves."""
    if len(src) != len(dst):
        raise ValueError(f"dst: {len(dst)} buffers for {len(src)} source buffers")
    src_spans = [host_span(a, f"src[{i}]", False) for i, a in enumerate(src)]
    dst_spans = [host_span(a, f"dst[{i}]", True) for i, a in enumerate(dst)]
    _core.copy_descriptors_host(np.asarray(descriptors), src_spans, dst_spans)


__all__ = ["KvLayout", "STRATEGIES", "SwapPlan", "SwapPlanner", "copy_host", "default_cost_model", "host_copy_cost"]
