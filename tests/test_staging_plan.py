"""The gather/scatter strategy's plan (pieces, chunks, slots, host runs), built and executed on the
CPU: CI has no GPU, and this is where the strategy failed on an H200 (a host run spanning two pinned
buffers that happened to be adjacent in memory). Executing the plan with memmove through a real
staging buffer must give the bytes the plain host executor gives."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsched import _core
from kvsched.swap import KvLayout, SwapPlanner, copy_host
from swap_fixtures import fragmented_allocator, tables_csr

OUT, IN = 0, 1


def spans(buffers):
    return [(b.ctypes.data, b.nbytes) for b in buffers]


def execute(direction, descriptors, src, dst, staging_bytes):
    """Runs the staging plan as the CUDA engine does: gather pieces into the slot, then copy host runs
    (swap-out), or copy host runs into the slot, then scatter pieces (swap-in). Returns the plan."""
    staging = np.full(staging_bytes, 0xEE, dtype=np.uint8)
    base = staging.ctypes.data
    plan = _core.staging_plan(direction, descriptors, spans(src), spans(dst), base, staging_bytes)
    for piece_begin, piece_end, run_begin, run_end, _slot in plan["chunks"]:
        if direction == IN:
            for offset, host, nbytes, _tensor in plan["runs"][run_begin:run_end]:
                ctypes.memmove(base + int(offset), int(host), int(nbytes))
        for src_address, dst_address, nbytes in plan["pieces"][piece_begin:piece_end]:
            ctypes.memmove(int(dst_address), int(src_address), int(nbytes))
        if direction == OUT:
            for offset, host, nbytes, _tensor in plan["runs"][run_begin:run_end]:
                ctypes.memmove(int(host), base + int(offset), int(nbytes))
    return plan


def check_structure(plan, direction, descriptors, src, dst, staging_bytes):
    host_buffers = spans(dst if direction == OUT else src)
    slot = plan["slot_bytes"]
    assert slot % 16 == 0 and 2 * slot <= staging_bytes
    assert plan["host_runs"] == len(plan["runs"])
    for k, (piece_begin, piece_end, run_begin, run_end, slot_index) in enumerate(plan["chunks"]):
        assert slot_index == k % 2  # chunks alternate between the two slots
        pieces = plan["pieces"][piece_begin:piece_end]
        assert 0 < pieces[:, 2].sum() <= slot
        assert pieces[:, 2].max() <= plan["piece_bytes"]
        runs = plan["runs"][run_begin:run_end]
        assert runs[:, 2].sum() == pieces[:, 2].sum()  # runs cover the chunk's bytes exactly
        assert np.all(runs[:, 0] >= slot_index * slot) and np.all(runs[:, 0] + runs[:, 2] <= (slot_index + 1) * slot)
    for _offset, host, nbytes, tensor in plan["runs"]:
        start, size = host_buffers[tensor]
        assert start <= host and host + nbytes <= start + size, "a host run leaves its buffer"
    assert plan["pieces"][:, 2].sum() == descriptors[:, 3].sum()


def round_trip_through_staging(descriptors_out, descriptors_in, device, host, staging_bytes):
    expected_host = [h.copy() for h in host]
    copy_host(descriptors_out, device, expected_host)
    plan = execute(OUT, descriptors_out, device, host, staging_bytes)
    check_structure(plan, OUT, descriptors_out, device, host, staging_bytes)
    assert all(np.array_equal(a, b) for a, b in zip(host, expected_host))
    restored = [np.full_like(d, 0xAB) for d in device]
    expected_device = [r.copy() for r in restored]
    copy_host(descriptors_in, host, expected_device)
    plan = execute(IN, descriptors_in, host, restored, staging_bytes)
    check_structure(plan, IN, descriptors_in, host, restored, staging_bytes)
    assert all(np.array_equal(a, b) for a, b in zip(restored, expected_device))
    return plan


def adjacent_views(sizes, fill=None, rng=None):
    """Buffers carved back to back out of one allocation: tensor t ends where tensor t+1 starts."""
    whole = np.zeros(sum(sizes), dtype=np.uint8) if rng is None else rng.integers(0, 256, sum(sizes), dtype=np.uint8)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [whole[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("host_side", ["adjacent", "interleaved"])
@pytest.mark.parametrize("staging_bytes", [64 << 10, 96 << 10 | 48, 1 << 20])
def test_swap_through_staging_is_byte_exact(host_side, staging_bytes, rng):
    layout = KvLayout.per_layer(num_layers=4, block_size=4, num_kv_heads=2, head_dim=64, dtype_bytes=2)  # 2 KiB
    num_device, num_host = 256, 192
    allocator = fragmented_allocator(num_device, rng)
    planner = SwapPlanner(num_host, 4, layout=layout)
    seqs = {s: int(rng.integers(1, 100)) for s in range(12)}
    for s, n in seqs.items():
        allocator.allocate(s, n)
    device = adjacent_views(layout.buffer_nbytes(num_device, "device"), rng=rng)
    host_sizes = layout.buffer_nbytes(num_host, "host")
    if host_side == "adjacent":
        host = adjacent_views(host_sizes)
    else:  # K and V of each layer interleaved in one allocation: every other view is a gap
        pieces = adjacent_views([n for size in host_sizes for n in (size, 4096)])
        host = pieces[::2]
    out = planner.plan_swap_out_from(allocator, list(seqs))
    for s in seqs:
        allocator.free(s)
    for s, n in seqs.items():
        allocator.allocate(s, n)
    indptr, blocks = tables_csr(allocator, list(seqs))
    back = planner.plan_swap_in(list(seqs), indptr, blocks)
    round_trip_through_staging(out.descriptors, back.descriptors, device, host, staging_bytes)


def test_host_runs_stop_at_buffer_boundaries():
    # Two host buffers back to back: the descriptor ending tensor 0 and the one starting tensor 1 are
    # contiguous in memory but must not become one copy.
    device = adjacent_views([4096, 4096], rng=np.random.default_rng(1))
    host = adjacent_views([4096, 4096])
    assert host[0].ctypes.data + host[0].nbytes == host[1].ctypes.data
    descriptors = np.array([[0, 0, 2048, 2048], [1, 1024, 0, 2048]], dtype=np.int64)
    plan = execute(OUT, descriptors, device, host, 1 << 20)
    assert plan["runs"][:, 3].tolist() == [0, 1] and plan["runs"][:, 2].tolist() == [2048, 2048]
    # Within one buffer, adjacent host pieces from scattered device pieces are one copy.
    same = np.array([[0, 2048, 0, 1024], [0, 0, 1024, 1024], [0, 1024, 2048, 1024]], dtype=np.int64)
    plan = execute(OUT, same, device, host, 1 << 20)
    assert plan["runs"][:, 2].tolist() == [3072] and len(plan["pieces"]) == 3


def test_large_descriptors_split_into_pieces_and_chunks():
    device = [np.arange(1 << 20, dtype=np.uint8)]
    host = [np.zeros(1 << 20, dtype=np.uint8)]
    descriptors = np.array([[0, 0, 0, 1 << 20]], dtype=np.int64)
    plan = execute(OUT, descriptors, device, host, 256 << 10)  # two slots of 128 KiB
    assert np.array_equal(host[0], device[0])
    assert plan["piece_bytes"] == 64 << 10 and len(plan["pieces"]) == 16 and len(plan["chunks"]) == 8
    assert len(plan["runs"]) == 8  # one copy per chunk: the host side is contiguous


def test_bad_staging_size_names_the_argument():
    device, host = [np.zeros(64, np.uint8)], [np.zeros(64, np.uint8)]
    with pytest.raises(ValueError, match="staging_bytes"):
        _core.staging_plan(OUT, np.array([[0, 0, 0, 16]], np.int64), spans(device), spans(host), 0, 16)
    with pytest.raises(ValueError, match="descriptors"):
        _core.staging_plan(OUT, np.array([[0, 32, 0, 64]], np.int64), spans(device), spans(host), 0, 1 << 20)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_disjoint_descriptors_round_trip(data):
    """Random 16-byte-aligned, non-overlapping descriptors over several buffers, any staging size."""
    num_tensors = data.draw(st.integers(1, 4))
    units = data.draw(st.integers(4, 64))  # buffer size in 1 KiB units
    staging_bytes = 16 * data.draw(st.integers(2, 3000))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    size = units * 1024
    device = adjacent_views([size] * num_tensors, rng=rng)
    host = adjacent_views([size] * num_tensors)
    rows_out, rows_in = [], []
    for t in range(num_tensors):
        # Cut [0, size) into 16-byte-aligned pieces and send them to a permutation of the slots.
        cuts = np.unique(np.concatenate([[0, size], 16 * rng.integers(0, size // 16, rng.integers(0, 12))]))
        lengths = np.diff(cuts)
        order = rng.permutation(len(lengths))
        host_offsets = np.concatenate([[0], np.cumsum(lengths[order])])[:-1]
        for i, k in enumerate(order):
            rows_out.append((t, cuts[k], host_offsets[i], lengths[k]))
            rows_in.append((t, host_offsets[i], cuts[k], lengths[k]))
    round_trip_through_staging(np.array(rows_out, np.int64), np.array(rows_in, np.int64), device, host, staging_bytes)
