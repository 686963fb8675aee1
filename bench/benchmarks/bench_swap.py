"""Swap planning and the host executor (issue 5).

Planning: 64 requests of 2,000 tokens (125 blocks of 16 tokens each) of Llama-3-8B in the
per-layer K/V layout (64 tensors, 32 KiB per block per tensor), swapped out and back in, from
device block tables that are contiguous or fragmented (a random permutation). Target:
microseconds, not milliseconds. `track_descriptors_per_block` reports how many copies each moved
block costs. With `plans = "extents"` the planner has no layout and returns block extents only
(what an engine that expands them itself, or the batch former's cost model, needs); with
"descriptors" it also writes one (tensor, src, dst, nbytes) row per merged piece (64 per block
when the device side is fragmented). The host executor copies fragmented 32 KiB descriptors
between numpy buffers.
"""

import numpy as np

try:
    from kvsched.swap import KvLayout, SwapPlanner, copy_host
except ImportError:
    KvLayout = None

REQUESTS = 64
BLOCKS_PER_REQUEST = 125  # 2,000 tokens
LAYOUT = None if KvLayout is None else KvLayout.per_layer(32, 16, 8, 128, 2)


def _tables(placement):
    total = REQUESTS * BLOCKS_PER_REQUEST
    blocks = np.arange(total, dtype=np.int32)
    if placement == "fragmented":
        blocks = np.random.default_rng(0).permutation(2 * total)[:total].astype(np.int32)
    indptr = np.arange(0, total + 1, BLOCKS_PER_REQUEST, dtype=np.int64)
    return indptr, blocks


class SwapPlanning:
    params = (["contiguous", "fragmented"], ["descriptors", "extents"])
    param_names = ["device_tables", "plans"]

    def setup(self, placement, plans):
        if KvLayout is None:
            raise NotImplementedError("kvsched is not importable")
        layout = LAYOUT if plans == "descriptors" else None
        self.planner = SwapPlanner(REQUESTS * BLOCKS_PER_REQUEST, 16, layout=layout, reuse_host_copies=False)
        self.ids = np.arange(REQUESTS, dtype=np.int64)
        self.tokens = np.full(REQUESTS, 16 * BLOCKS_PER_REQUEST, dtype=np.int64)
        self.indptr, self.blocks = _tables(placement)

    def time_swap_out_and_in(self, placement, plans):
        self.planner.plan_swap_out(self.ids, self.tokens, self.indptr, self.blocks)
        self.planner.plan_swap_in(self.ids, self.indptr, self.blocks)

    def track_descriptors_per_block(self, placement, plans):
        plan = self.planner.plan_swap_out(self.ids, self.tokens, self.indptr, self.blocks)
        self.planner.release(self.ids)
        return plan.descriptors_per_block

    track_descriptors_per_block.unit = "descriptors/block"


class HostExecutor:
    """64 MiB in 2,048 fragmented descriptors of 32 KiB (every other slot), numpy to numpy."""

    piece = 32 << 10
    count = 2048

    def setup(self):
        if KvLayout is None:
            raise NotImplementedError("kvsched is not importable")
        self.src = [np.random.default_rng(0).integers(0, 255, 2 * self.piece * self.count, dtype=np.uint8)]
        self.dst = [np.zeros_like(self.src[0])]
        slots = np.arange(self.count, dtype=np.int64) * 2 * self.piece
        self.descriptors = np.stack([np.zeros(self.count, np.int64), slots, slots, np.full(self.count, self.piece)], 1)

    def time_copy_64mib_fragmented(self):
        copy_host(self.descriptors, self.src, self.dst)


class BlockCopierDescriptors:
    """A step's 32 random blocks of Llama-3-8B in vLLM's flash-attention layout (32 layers of
    (2, blocks, 16, 8, 128) fp16: 64 pieces), as BlockCopier's byte descriptors (2,048 rows): the
    CPU work of every copy call of the vLLM connector. The tensors are host memory with the same
    strides as the GPU's (numpy, head_dim 16 so that they stay small: the descriptor count is the same)."""

    def setup(self):
        if KvLayout is None:
            raise NotImplementedError("kvsched is not importable")
        from kvsched.block_copier import BlockCopier

        tensors = {f"layer.{i}": np.zeros((2, 1024, 16, 8, 16), np.float16) for i in range(32)}
        self.copier = BlockCopier(tensors, 1024, 512)
        rng = np.random.default_rng(0)
        self.extents = np.stack([rng.choice(1024, 32, replace=False), rng.choice(512, 32, replace=False),
                                 np.ones(32, np.int64)], axis=1)

    def time_descriptors_32_blocks(self):
        self.copier.descriptors(self.extents, "out")
