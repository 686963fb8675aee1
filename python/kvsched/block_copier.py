"""Block copies between an engine's KV cache tensors and a host pool, whatever their layout.

A plan names what moves as block extents; ``BlockCopier`` turns them into byte descriptors for the
engine's real tensors and executes them: natively with memmove where the KV cache is in host memory
(a CPU engine), with ``kvsched.cuda.CopyEngine`` on a stream of its own on CUDA.

Glossary
  block dim   the dimension of a KV tensor indexed by block id: the one whose size is the number of
              blocks (a tensor where another dimension is as large is refused: ambiguous).
  piece       the bytes one block has in one tensor at one index of the tensor's other outer
              dimensions: a K/V dimension in front of the block dim, a layer dimension, or inner
              dimensions that are not dense. Each piece is a row of the KvLayout: one block of it
              is ``block_bytes`` contiguous bytes, ``block_stride`` apart from the next block's.
              vLLM's (2, num_blocks, ...) K/V tensor of a layer is two pieces; a
              (num_blocks, 2, ...) one is one piece (a block's K and V are adjacent).
  extent      a plan's ``(src_block, dst_block, n_blocks)`` row.
  host pool   one dense buffer per piece, ``num_host_blocks * block_bytes`` bytes (host block stride
              = block_bytes), so an extent of n host blocks is one run per piece.

Strides are read from the tensors given, never assumed; a tensor whose blocks cannot be found is
refused naming it. Every descriptor is checked against its buffers before the first byte moves (a
bad one raises ValueError and copies nothing).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import _core
from .swap import KvLayout


@dataclass(frozen=True)
class Piece:
    """One piece of a KV tensor: byte offset of block 0 from the tensor's start, bytes between
    consecutive blocks, bytes of one block."""

    tensor: str
    offset: int
    block_stride: int
    block_bytes: int


def _geometry(tensor: Any, name: str) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """(data pointer, shape, strides in bytes, item size) of a torch tensor, a numpy array or any
    device array with ``__cuda_array_interface__`` (CuPy)."""
    if hasattr(tensor, "data_ptr") and hasattr(tensor, "stride"):  # torch, on any device
        itemsize = int(tensor.element_size())
        return int(tensor.data_ptr()), tuple(tensor.shape), tuple(int(s) * itemsize for s in tensor.stride()), itemsize
    if isinstance(tensor, np.ndarray):
        return int(tensor.ctypes.data), tuple(tensor.shape), tuple(int(s) for s in tensor.strides), tensor.itemsize
    interface = getattr(tensor, "__cuda_array_interface__", None)
    if interface is not None:
        shape, itemsize = tuple(interface["shape"]), np.dtype(interface["typestr"]).itemsize
        strides = interface.get("strides")
        if strides is None:  # C-contiguous
            strides, step = [], itemsize
            for extent in reversed(shape):
                strides.insert(0, step)
                step *= extent
        return int(interface["data"][0]), shape, tuple(int(s) for s in strides), itemsize
    raise TypeError(f"{name}: expected a torch tensor, a numpy array or a CUDA array, got {type(tensor).__name__}")


def _on_device(tensor: Any) -> bool:
    """Whether a KV tensor is in device memory: a torch tensor off the CPU, or any array that exposes
    ``__cuda_array_interface__`` (CuPy, Numba; a torch CUDA tensor exposes it too)."""
    device = getattr(tensor, "device", None)
    if getattr(device, "type", None) is not None:  # torch
        return device.type != "cpu"
    return hasattr(tensor, "__cuda_array_interface__")


def block_pieces(tensor: Any, num_blocks: int, name: str = "tensor") -> list[Piece]:
    """The pieces of one KV tensor of ``num_blocks`` blocks (see the glossary)."""
    _, shape, strides, itemsize = _geometry(tensor, name)
    candidates = [d for d, size in enumerate(shape) if size == num_blocks]
    if len(candidates) != 1:
        raise ValueError(f"{name}: {'no dimension' if not candidates else 'several dimensions'} of shape {shape} "
                         f"{'has' if not candidates else 'have'} the {num_blocks} blocks of the KV cache")
    block_dim = candidates[0]
    block_stride = strides[block_dim]
    others = [d for d in range(len(shape)) if d != block_dim and shape[d] > 1]
    # The dense core of a block: inner dimensions, smallest stride first, while each continues the last.
    dense, run = [], itemsize
    for d in sorted((d for d in others if strides[d] < block_stride), key=lambda d: strides[d]):
        if strides[d] != run:
            break
        dense.append(d)
        run *= shape[d]
    if run > block_stride and block_stride != 0:
        raise ValueError(f"{name}: blocks of {run} bytes overlap at a block stride of {block_stride}")
    enumerated = [d for d in others if d not in dense]
    pieces = []
    for index in itertools.product(*(range(shape[d]) for d in enumerated)):
        offset = sum(i * strides[d] for i, d in zip(index, enumerated))
        pieces.append(Piece(name, offset, block_stride, run))
    return pieces


class BlockCopier:
    """Executes block extents between KV tensors and a host pool it allocates.

    Args:
        kv_tensors: name -> tensor (torch, numpy, or a CUDA array such as CuPy's), each holding
            ``num_device_blocks`` blocks.
        num_device_blocks: blocks of the KV cache (each tensor's block dimension).
        num_host_blocks: blocks of the host pool.
        cuda: copy with ``kvsched.cuda.CopyEngine`` (the tensors are on a CUDA device, the pool
            is pinned); False: the tensors are in host memory and copies are memmoves.
    """

    def __init__(self, kv_tensors: Mapping[str, Any], num_device_blocks: int, num_host_blocks: int, *,
                 cuda: bool = False, cuda_device: int = 0) -> None:
        if not kv_tensors:
            raise ValueError("kv_tensors: no KV tensors to copy")
        if num_host_blocks <= 0:
            raise ValueError(f"num_host_blocks: must be positive, got {num_host_blocks}")
        self.num_device_blocks, self.num_host_blocks = int(num_device_blocks), int(num_host_blocks)
        self._tensors = dict(kv_tensors)  # kept alive: the spans point into them
        self.pieces: list[Piece] = []
        self._device_spans: list[tuple[int, int]] = []
        for name, tensor in self._tensors.items():
            if _on_device(tensor) != bool(cuda):
                # A memmove through a device pointer, or a CUDA copy from host memory, would crash.
                where = "host" if cuda else "device"
                raise ValueError(f"kv_tensors[{name!r}]: {where} memory, but cuda={bool(cuda)}"
                                 f"{'' if cuda else ' (pass cuda=True)'}")
            pointer = _geometry(tensor, name)[0]
            for piece in block_pieces(tensor, self.num_device_blocks, name):
                self.pieces.append(piece)
                span = (self.num_device_blocks - 1) * piece.block_stride + piece.block_bytes
                self._device_spans.append((pointer + piece.offset, span))
        block_bytes = np.array([p.block_bytes for p in self.pieces], np.int64)
        self.layout = KvLayout(np.stack([block_bytes, [p.block_stride for p in self.pieces], block_bytes], axis=1))
        self._block_bytes = block_bytes
        self._strides = self.layout.tensors[:, 1]
        self._cuda = bool(cuda)
        if self._cuda:
            from . import cuda as kv_cuda

            self._engine = kv_cuda.CopyEngine(cuda_device)
            self.host = [kv_cuda.pinned_empty(int(b) * self.num_host_blocks) for b in block_bytes]
        else:
            self.host = [np.empty(int(b) * self.num_host_blocks, np.uint8) for b in block_bytes]
        self._host_spans = [(int(a.ctypes.data), int(a.nbytes)) for a in self.host]

    @property
    def bytes_per_block(self) -> int:
        return int(self._block_bytes.sum())

    def descriptors(self, extents: np.ndarray, direction: str) -> np.ndarray:
        """Byte descriptors ``(piece, src_offset, dst_offset, nbytes)`` for extents moving "out"
        (device -> host: ``(device_block, host_block, n)``) or "in" (``(host_block, device_block, n)``).
        An extent is one run per piece where the piece's device blocks are dense, else a run per block."""
        extents = np.asarray(extents, np.int64).reshape(-1, 3)
        if direction not in ("out", "in"):
            raise ValueError(f"direction: expected 'out' or 'in', got {direction!r}")
        if not extents.size:
            return np.zeros((0, 4), np.int64)
        out = direction == "out"
        device, host, count = (extents[:, 0], extents[:, 1], extents[:, 2]) if out else \
            (extents[:, 1], extents[:, 0], extents[:, 2])
        dense = self._strides == self._block_bytes
        groups = []  # (pieces, device blocks, host blocks, blocks per run): one run per extent where dense
        if dense.any():
            groups.append((np.flatnonzero(dense), device, host, count))
        if not dense.all():  # a run per block
            step = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
            groups.append((np.flatnonzero(~dense), np.repeat(device, count) + step, np.repeat(host, count) + step,
                           np.ones(int(count.sum()), np.int64)))
        rows = []
        for pieces, dev, hst, n in groups:  # one (pieces x runs) grid per group, piece-major
            stride, block_bytes = self._strides[pieces, None], self._block_bytes[pieces, None]
            on_device, on_host = dev[None, :] * stride, hst[None, :] * block_bytes
            src, dst = (on_device, on_host) if out else (on_host, on_device)
            rows.append(np.stack(np.broadcast_arrays(pieces[:, None], src, dst, n[None, :] * block_bytes),
                                 axis=2).reshape(-1, 4))
        rows = np.concatenate(rows)
        return rows[np.argsort(rows[:, 0], kind="stable")] if len(groups) > 1 else rows

    @property
    def engine(self) -> Any:
        """The ``kvsched.cuda.CopyEngine`` that runs the copies on CUDA (None on CPU)."""
        return self._engine if self._cuda else None

    def copy(self, extents: np.ndarray, direction: str, *, stream: int = 0, strategy: str = "auto") -> Any:
        """Executes extents in one direction. On CPU it returns when the bytes moved; on CUDA it
        enqueues on ``stream`` with ``strategy`` (``kvsched.cuda.CopyEngine``'s) and returns the CopyEvent."""
        if self._cuda:
            from .cuda import _strategy

            strategy_index = _strategy(strategy)
        elif strategy != "auto":
            raise ValueError(f"strategy: host-memory KV tensors are copied with memmove, not {strategy!r}")
        descriptors = self.descriptors(extents, direction)
        if not descriptors.shape[0]:
            return None
        src, dst = (self._device_spans, self._host_spans) if direction == "out" else \
            (self._host_spans, self._device_spans)
        if self._cuda:
            return self._engine._core.copy(0 if direction == "out" else 1, descriptors, src, dst, strategy_index,
                                           int(stream))
        _core.copy_descriptors_host(descriptors, src, dst)
        return None

    def device_block_bytes(self, block: int) -> bytes:
        """Every byte one device block holds, piece by piece (for tests and checks; host tensors only)."""
        if self._cuda:
            raise RuntimeError("device_block_bytes: reads host-memory KV tensors only")
        if not 0 <= block < self.num_device_blocks:
            raise ValueError(f"block: {block} is outside 0..{self.num_device_blocks - 1}")
        out = bytearray()
        for (pointer, _), piece in zip(self._device_spans, self.pieces):
            raw = (np.ctypeslib.ctypes.c_uint8 * piece.block_bytes).from_address(pointer + block * piece.block_stride)
            out += bytes(raw)
        return bytes(out)


def extent_blocks(extents: np.ndarray, column: int) -> np.ndarray:
    """Every block of column 0 (source) or 1 (destination) of extents, one per block, in order."""
    extents = np.asarray(extents, np.int64).reshape(-1, 3)
    lengths = extents[:, 2]
    starts = np.cumsum(lengths) - lengths
    return np.repeat(extents[:, column], lengths) + np.arange(lengths.sum()) - np.repeat(starts, lengths)


def extent_touches(extents: np.ndarray, column: int, blocks) -> np.ndarray:
    """Per extent whether any block of its column 0 (source) or 1 (destination) is in ``blocks``
    (an array or a set)."""
    extents = np.asarray(extents, np.int64).reshape(-1, 3)
    if isinstance(blocks, (set, frozenset)):
        blocks = np.fromiter(blocks, np.int64, len(blocks))
    if not extents.size or not len(blocks):
        return np.zeros(len(extents), bool)
    return np.add.reduceat(np.isin(extent_blocks(extents, column), blocks), np.cumsum(extents[:, 2]) - extents[:, 2]) > 0


__all__ = ["BlockCopier", "Piece", "block_pieces", "extent_blocks", "extent_touches"]
