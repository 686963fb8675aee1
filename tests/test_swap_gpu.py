"""Swap copies on a real GPU: byte-exact round trips for every strategy and layout on random
fragmented block sets with poisoned destinations, multi-chunk staging, and device-side bad input.
Skipped without a CUDA device (CI has none; bench/gpu/run.sh runs these on the device machine)."""

from __future__ import annotations

import numpy as np
import pytest

import kvsched

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not kvsched.has_cuda(), reason="needs a CUDA device")]

if kvsched.has_cuda():
    from gpu_arrays import fill, new_stream, synchronize, to_device, to_host
    from kvsched.cuda import CopyEngine, pin, pinned_empty
from kvsched.swap import SwapPlanner
from swap_fixtures import LAYOUTS, fragmented_allocator, make_buffers, sequence_matches, tables_csr, write_sequence

BLOCK = 4
NUM_DEVICE_BLOCKS = 512
NUM_HOST_BLOCKS = 256


def strategies():
    # gather_kernel/per_run: the gather strategy issuing one cudaMemcpyAsync per host run.
    names = ["auto", "per_descriptor", "gather_kernel", "gather_kernel/per_run"]
    if kvsched.has_cuda() and CopyEngine.batched_supported():
        names.append("batched")
    return names


def engine_for(strategy: str, staging_bytes: int):
    """(engine, strategy name for copy()) for a name of strategies()."""
    per_run = strategy.endswith("/per_run")
    return CopyEngine(0, staging_bytes=staging_bytes, batch_staging_copies=not per_run), strategy.split("/")[0]


def pinned_like(sizes):
    buffers = [pinned_empty(n) for n in sizes]
    for b in buffers:
        b.fill(0xCD)  # poisoned destination
    return buffers


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("strategy", strategies())
@pytest.mark.parametrize("staging_bytes", [64 << 10, 64 << 20])
def test_device_round_trip_is_byte_exact(layout_name, strategy, staging_bytes, rng):
    layout = LAYOUTS[layout_name]
    allocator = fragmented_allocator(NUM_DEVICE_BLOCKS, rng)
    planner = SwapPlanner(NUM_HOST_BLOCKS, BLOCK, layout=layout)
    engine, strategy = engine_for(strategy, staging_bytes)
    host_image = make_buffers(layout, NUM_DEVICE_BLOCKS, "device")
    seq_tokens = {s: int(rng.integers(1, 80)) for s in range(10)}
    for s, n in seq_tokens.items():
        allocator.allocate(s, n)
        write_sequence(layout, host_image, s, allocator.block_table(s))
    device = [to_device(a) for a in host_image]
    host = pinned_like(layout.buffer_nbytes(NUM_HOST_BLOCKS, "host"))

    stream, handle = new_stream()
    synchronize()  # the uploads above ran on the library's default stream
    out = planner.plan_swap_out_from(allocator, list(seq_tokens))
    engine.copy(out, device, host, strategy=strategy, stream=handle).wait()
    for s in seq_tokens:
        allocator.free(s)
    for d in device:
        fill(d, 0xAB)  # poisoned destination for the way back
    synchronize()
    for s, n in seq_tokens.items():
        allocator.allocate(s, n)
    indptr, blocks = tables_csr(allocator, list(seq_tokens))
    back = planner.plan_swap_in(list(seq_tokens), indptr, blocks)
    event = engine.copy(back, device, host, strategy=strategy, stream=handle)
    event.wait()
    assert event.done()
    restored = [to_host(d) for d in device]
    for s, n in seq_tokens.items():
        assert sequence_matches(layout, restored, s, allocator.block_table(s), -(-n // BLOCK)), (s, strategy)


def test_registered_numpy_buffer_works_as_host_side(rng):
    layout = LAYOUTS["per_layer"]
    planner = SwapPlanner(64, BLOCK, layout=layout)
    allocator = fragmented_allocator(128, rng)
    allocator.allocate(1, 50)
    image = make_buffers(layout, 128, "device")
    write_sequence(layout, image, 1, allocator.block_table(1))
    device = [to_device(a) for a in image]
    plain = make_buffers(layout, 64, "host")
    pinned = [pin(a) for a in plain]
    CopyEngine(0).copy(planner.plan_swap_out_from(allocator, [1]), device, pinned).wait()
    host_blocks = planner.host_blocks(1)
    assert any(a.any() for a in plain) and len(host_blocks) == 13


def test_device_bad_input(rng):
    layout = LAYOUTS["per_layer"]
    planner = SwapPlanner(64, BLOCK, layout=layout)
    allocator = fragmented_allocator(128, rng)
    allocator.allocate(1, 20)
    plan = planner.plan_swap_out_from(allocator, [1])
    device = [to_device(a) for a in make_buffers(layout, 128, "device")]
    engine = CopyEngine(0)
    pageable = make_buffers(layout, 64, "host")
    with pytest.raises(ValueError, match="not pinned"):
        engine.copy(plan, device, pageable)
    with pytest.raises(TypeError, match="device_tensors"):
        engine.copy(plan, pageable, pinned_like(layout.buffer_nbytes(64, "host")))
    small = pinned_like([16] * layout.num_tensors)
    with pytest.raises(ValueError, match="descriptors"):
        engine.copy(plan, device, small)
    with pytest.raises(ValueError, match="strategy"):
        engine.copy(plan, device, pinned_like(layout.buffer_nbytes(64, "host")), strategy="fastest")
    with pytest.raises(ValueError, match="device"):
        CopyEngine(1 << 20)
    if CopyEngine.batched_supported():
        with pytest.raises(ValueError, match="legacy default stream"):
            engine.copy(plan, device, pinned_like(layout.buffer_nbytes(64, "host")), strategy="batched", stream=0)


@pytest.mark.parametrize("layout_name", ["per_layer", "cross_layer"])
@pytest.mark.parametrize("strategy", strategies())
def test_production_size_round_trip(layout_name, strategy):
    """1 GiB over 64 tensors (or one cross-layer tensor of 2 MiB blocks), random device blocks, a
    staging buffer far smaller than the swap: out to pinned host, back into other random blocks."""
    torch = pytest.importorskip("torch")
    from kvsched.swap import KvLayout

    layout = {"per_layer": KvLayout.per_layer, "cross_layer": KvLayout.cross_layer}[layout_name](
        num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype_bytes=2)
    num_device, num_swap = 1536, 512
    rng = np.random.default_rng(11)
    picked = rng.choice(num_device, size=2 * num_swap, replace=False).astype(np.int32)
    source, target = picked[:num_swap], picked[num_swap:]
    planner = SwapPlanner(num_swap, 16, layout=layout)
    out = planner.plan_swap_out([0], [16 * num_swap], [0, num_swap], source)
    back = planner.plan_swap_in([0], [0, num_swap], target)
    assert out.bytes == 1 << 30
    device = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda") for n in layout.buffer_nbytes(num_device)]
    for d in device:  # poison the blocks the swap-in will write
        d.view(num_device, -1)[torch.as_tensor(target, device="cuda")] = 0xAB
    host = pinned_like(layout.buffer_nbytes(num_swap, "host"))
    engine, strategy = engine_for(strategy, 16 << 20)
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    engine.copy(out, device, host, strategy=strategy, stream=stream.cuda_stream)
    engine.copy(back, device, host, strategy=strategy, stream=stream.cuda_stream).wait()
    source_index, target_index = torch.as_tensor(source, device="cuda"), torch.as_tensor(target, device="cuda")
    for t, d in enumerate(device):
        blocks = d.view(num_device, -1)
        assert torch.equal(blocks[source_index], blocks[target_index]), (strategy, layout_name, t)
        # And the host copy itself, in the planner's host blocks.
        host_blocks = torch.from_numpy(np.asarray(host[t]).reshape(num_swap, -1)).cuda()
        assert torch.equal(host_blocks[torch.as_tensor(planner.host_blocks(0), device="cuda")], blocks[source_index])
