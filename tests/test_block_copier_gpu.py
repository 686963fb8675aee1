"""The vLLM connector's worker side on a real GPU: BlockCopier over KV tensors laid out as vLLM's CUDA
attention backends lay them out, byte-exact. No vLLM needed: the tensors are built here with the
backends' shapes. Its bandwidth against one plain copy of the same bytes is a benchmark's
(bench/gpu/step_copy_overlap.py), not a test's. Skipped without a CUDA device (bench/gpu/run.sh runs it there)."""

from __future__ import annotations

import numpy as np
import pytest

import kvsched

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not kvsched.has_cuda(), reason="needs a CUDA device")]

if kvsched.has_cuda():
    from gpu_arrays import fill, synchronize, to_device, to_host
    from kvsched.block_copier import BlockCopier

LAYERS, BLOCKS, BLOCK, HEADS, DIM = 4, 256, 16, 8, 128


def layouts() -> dict[str, tuple[int, ...]]:
    """Per-layer KV tensor shapes of vLLM's CUDA backends (fp16)."""
    return {
        "flash_attn (2, blocks, block, heads, dim)": (2, BLOCKS, BLOCK, HEADS, DIM),
        "flashinfer NHD (blocks, 2, block, heads, dim)": (BLOCKS, 2, BLOCK, HEADS, DIM),
        "flashinfer HND (blocks, 2, heads, block, dim)": (BLOCKS, 2, HEADS, BLOCK, DIM),
    }


def make_tensors(shape: tuple[int, ...], seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return {f"layer.{i}": to_device(rng.integers(0, 2**16, size=shape, dtype=np.uint16).view(np.float16))
            for i in range(LAYERS)}


def block_bytes(tensors: dict, shape: tuple[int, ...], block: int) -> bytes:
    dim = shape.index(BLOCKS)
    return b"".join(np.take(to_host(t), block, axis=dim).tobytes() for t in tensors.values())


@pytest.mark.parametrize("layout", list(layouts()))
def test_swap_out_and_back_is_byte_exact_in_every_backend_layout(layout):
    shape = layouts()[layout]
    tensors = make_tensors(shape, seed=1)
    copier = BlockCopier(tensors, BLOCKS, num_host_blocks=128, cuda=True)
    rng = np.random.default_rng(2)
    blocks = rng.choice(np.arange(1, BLOCKS), size=100, replace=False)
    before = {int(b): block_bytes(tensors, shape, int(b)) for b in blocks}
    out = np.array([(b, h, 1) for h, b in enumerate(blocks.tolist())], np.int64)
    copier.copy(out, "out").wait()
    for t in tensors.values():  # the freed blocks are overwritten by others
        fill(t, 0)
    back = np.array([(h, BLOCKS - b, 1) for h, b in enumerate(blocks.tolist())], np.int64)  # other blocks
    copier.copy(back, "in").wait()
    synchronize()
    for b, raw in before.items():
        assert block_bytes(tensors, shape, BLOCKS - b) == raw
