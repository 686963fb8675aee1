"""Swap planner and host executor: byte-exact round trips on every layout, multi-turn reuse,
contiguity, all-or-nothing plans, eviction of resident copies, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvsched
from kvsched.swap import KvLayout, SwapPlanner, copy_host, default_cost_model
from swap_fixtures import (LAYOUTS, fragmented_allocator, make_buffers, poison, sequence_matches, tables_csr,
                           write_sequence)

BLOCK = 4


def planner_for(layout: KvLayout, num_host_blocks: int = 256, **kwargs) -> SwapPlanner:
    return SwapPlanner(num_host_blocks, BLOCK, layout=layout, **kwargs)


def round_trip(layout: KvLayout, allocator, planner, seq_tokens: dict[int, int], device, host):
    """Allocate, fill, swap out, free + poison, reallocate, swap in; returns the two plans."""
    ids = list(seq_tokens)
    for s, n in seq_tokens.items():
        allocator.allocate(s, n)
        write_sequence(layout, device, s, allocator.block_table(s))
    out = planner.plan_swap_out_from(allocator, ids)
    copy_host(out.descriptors, device, host)
    for s in ids:
        allocator.free(s)
    poison(device)
    for s, n in seq_tokens.items():
        allocator.allocate(s, n)
    indptr, blocks = tables_csr(allocator, ids)
    back = planner.plan_swap_in(ids, indptr, blocks)
    copy_host(back.descriptors, host, device)
    return out, back


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("fragment", [True, False])
def test_round_trip_restores_every_byte(layout_name, fragment, rng):
    layout = LAYOUTS[layout_name]
    allocator = fragmented_allocator(512, rng, fragment)
    planner = planner_for(layout)
    device = make_buffers(layout, 512, "device")
    host = make_buffers(layout, 256, "host")
    seq_tokens = {int(s): int(rng.integers(1, 60)) for s in range(8)}
    out, back = round_trip(layout, allocator, planner, seq_tokens, device, host)
    for s, n in seq_tokens.items():
        assert sequence_matches(layout, device, s, allocator.block_table(s), -(-n // BLOCK))
    assert out.blocks_copied == back.blocks_copied == sum(-(-n // BLOCK) for n in seq_tokens.values())
    assert out.bytes == out.blocks_copied * layout.bytes_per_block
    # Descriptors cover exactly the bytes moved.
    assert int(out.descriptors[:, 3].sum()) == out.bytes and int(back.descriptors[:, 3].sum()) == back.bytes
    planner.check_invariants()


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       layout_name=st.sampled_from(sorted(LAYOUTS)))
def test_round_trip_random(lengths, seed, layout_name):
    rng = np.random.default_rng(seed)
    layout = LAYOUTS[layout_name]
    allocator = fragmented_allocator(256, rng)
    planner = planner_for(layout, 128)
    device, host = make_buffers(layout, 256, "device"), make_buffers(layout, 128, "host")
    seq_tokens = {i: n for i, n in enumerate(lengths)}
    round_trip(layout, allocator, planner, seq_tokens, device, host)
    for s, n in seq_tokens.items():
        assert sequence_matches(layout, device, s, allocator.block_table(s), -(-n // BLOCK))
    planner.check_invariants()


def test_contiguous_tables_give_one_descriptor_per_tensor(rng):
    layout = LAYOUTS["per_layer"]
    planner = planner_for(layout)
    contiguous = fragmented_allocator(512, rng, fragment=False)
    contiguous.allocate(1, 100)
    plan = planner.plan_swap_out_from(contiguous, [1])
    assert plan.extents.shape[0] == 1
    assert plan.num_descriptors == layout.num_tensors
    assert plan.descriptors_per_block == pytest.approx(layout.num_tensors / 25)

    fragmented = fragmented_allocator(512, rng)
    fragmented.allocate(2, 100)
    frag_plan = planner.plan_swap_out_from(fragmented, [2])
    assert frag_plan.num_descriptors > 5 * plan.num_descriptors
    assert frag_plan.estimated_seconds > plan.estimated_seconds


def test_second_swap_out_moves_only_new_blocks(rng):
    layout = LAYOUTS["per_layer"]
    allocator = fragmented_allocator(256, rng)
    planner = planner_for(layout)
    device, host = make_buffers(layout, 256, "device"), make_buffers(layout, 256, "host")
    out, _ = round_trip(layout, allocator, planner, {7: 30}, device, host)  # 7 full blocks + 2 tokens
    assert out.blocks_copied == 8 and planner.has_host_copy(7) and not planner.is_swapped(7)
    # Decode 13 more tokens (the partial block fills, three more start) and write them on the device.
    allocator.allocate(7, 43)
    table = allocator.block_table(7)
    write_sequence(layout, device, 7, table, first_block=7)
    again = planner.plan_swap_out_from(allocator, [7])
    assert again.blocks_reused == 7 and again.blocks_copied == 4
    copy_host(again.descriptors, device, host)
    allocator.free(7)
    poison(device)
    allocator.allocate(7, 43)
    indptr, blocks = tables_csr(allocator, [7])
    copy_host(planner.plan_swap_in([7], indptr, blocks).descriptors, host, device)
    assert sequence_matches(layout, device, 7, allocator.block_table(7), 11)
    planner.check_invariants()


def test_no_reuse_copies_everything(rng):
    layout = LAYOUTS["per_layer"]
    allocator = fragmented_allocator(256, rng)
    planner = planner_for(layout, reuse_host_copies=False)
    device, host = make_buffers(layout, 256, "device"), make_buffers(layout, 256, "host")
    round_trip(layout, allocator, planner, {7: 30}, device, host)
    assert not planner.has_host_copy(7)
    assert planner.plan_swap_out_from(allocator, [7]).blocks_copied == 8


def test_prefix_hit_blocks_are_not_copied_back():
    planner = SwapPlanner(64, BLOCK)
    planner.plan_swap_out([1], [20], [0, 5], np.arange(5, dtype=np.int32))
    back = planner.plan_swap_in([1], [0, 5], np.arange(10, 15, dtype=np.int32), skip_blocks=[3])
    assert back.blocks_copied == 2 and back.blocks_reused == 3
    assert back.extents.tolist() == [[planner.host_blocks(1)[3], 13, 2]]


def test_host_blocks_are_contiguous():
    planner = SwapPlanner(1000, BLOCK)
    for s in range(10):
        planner.plan_swap_out([s], [64], [0, 16], np.arange(16 * s, 16 * s + 16, dtype=np.int32) * 3)
        blocks = planner.host_blocks(s)
        assert (np.diff(blocks) == 1).all()


def test_plan_is_all_or_nothing_when_host_pool_is_full():
    planner = SwapPlanner(10, BLOCK)
    planner.plan_swap_out([1], [24], [0, 6], np.arange(6, dtype=np.int32))
    before = planner.stats()
    with pytest.raises(kvsched.OutOfBlocks, match="host pool"):
        planner.plan_swap_out([2, 3], [8, 12], [0, 2, 5], np.arange(5, dtype=np.int32))
    assert planner.stats() == before
    assert not planner.has_host_copy(2) and not planner.has_host_copy(3)
    assert not planner.can_swap_out(2, 20) and planner.can_swap_out(2, 16)
    planner.check_invariants()


def test_resident_copies_are_evicted_lru_but_swapped_never():
    planner = SwapPlanner(12, BLOCK)
    for s in (1, 2, 3):
        planner.plan_swap_out([s], [16], [0, 4], np.arange(4, dtype=np.int32))
    planner.plan_swap_in([1], [0, 4], np.arange(4, dtype=np.int32))
    planner.plan_swap_in([2], [0, 4], np.arange(4, dtype=np.int32))
    assert planner.stats()["num_resident_copies"] == 2
    # 4 blocks needed, none free: the least recently used resident copy (1) goes, 2 stays.
    planner.plan_swap_out([4], [16], [0, 4], np.arange(4, dtype=np.int32))
    assert not planner.has_host_copy(1) and planner.has_host_copy(2) and planner.is_swapped(3)
    assert planner.stats()["evicted_copies"] == 1
    # Swapped copies (3, 4) are never evicted: only 2's 4 blocks can be freed.
    assert planner.can_swap_out(5, 16) and not planner.can_swap_out(5, 17)
    planner.check_invariants()


def test_release_frees_host_blocks():
    planner = SwapPlanner(8, BLOCK)
    planner.plan_swap_out([1, 2], [8, 8], [0, 2, 4], np.arange(4, dtype=np.int32))
    planner.release([1, 99])
    assert planner.stats()["num_free_host_blocks"] == 6 and not planner.has_host_copy(1)
    planner.check_invariants()


def test_cost_model_prefers_few_large_copies():
    cost = default_cost_model()
    assert cost.shape == (2, 3, 3)
    planner = SwapPlanner(4096, 16, cost=cost)
    contiguous = planner.plan_swap_out([1], [2000], [0, 125], np.arange(125, dtype=np.int32))
    fragmented = planner.plan_swap_out([2], [2000], [0, 125], np.arange(0, 250, 2, dtype=np.int32))
    assert fragmented.num_descriptors == 125 * contiguous.num_descriptors
    assert fragmented.estimated_seconds > contiguous.estimated_seconds > 0
    # A cost table where per-descriptor copies are free makes fragmentation cost nothing extra.
    flat = cost.copy()
    flat[:, :, 1] = 0.0
    flat[:, :, 0] = 0.0
    planner_flat = SwapPlanner(4096, 16, cost=flat)
    a = planner_flat.plan_swap_out([1], [2000], [0, 125], np.arange(125, dtype=np.int32)).estimated_seconds
    b = planner_flat.plan_swap_out([2], [2000], [0, 125], np.arange(0, 250, 2, dtype=np.int32)).estimated_seconds
    assert a == pytest.approx(b)


# ---- bad input: a clear error naming the argument, and nothing changed ----

def test_bad_input_leaves_state_unchanged():
    planner = SwapPlanner(64, BLOCK, layout=LAYOUTS["per_layer"])
    planner.plan_swap_out([1], [8], [0, 2], np.array([3, 4], dtype=np.int32))
    before = planner.stats()
    cases = [
        (ValueError, "already swapped", lambda: planner.plan_swap_out([1], [8], [0, 2], np.array([3, 4], np.int32))),
        (ValueError, "more than once", lambda: planner.plan_swap_out([2, 2], [4, 4], [0, 1, 2], np.array([3, 4], np.int32))),
        (ValueError, "num_tokens", lambda: planner.plan_swap_out([2], [0], [0, 0], np.zeros(0, np.int32))),
        (ValueError, "device_blocks", lambda: planner.plan_swap_out([2], [9], [0, 2], np.array([3, 4], np.int32))),
        (ValueError, "block_indptr", lambda: planner.plan_swap_out([2], [4], [0, 2], np.array([3], np.int32))),
        (ValueError, "num_tokens", lambda: planner.plan_swap_out([2], [4, 4], [0, 1], np.array([3], np.int32))),
        (ValueError, "seq_ids", lambda: planner.plan_swap_out([-1], [4], [0, 1], np.array([3], np.int32))),
        (TypeError, "seq_ids", lambda: planner.plan_swap_out([1.5], [4], [0, 1], np.array([3], np.int32))),
        (KeyError, "no host copy", lambda: planner.plan_swap_in([5], [0, 1], np.array([3], np.int32))),
        (ValueError, "device_blocks", lambda: planner.plan_swap_in([1], [0, 1], np.array([3], np.int32))),
        (ValueError, "skip_blocks", lambda: planner.plan_swap_in([1], [0, 2], np.array([3, 4], np.int32), [3])),
    ]
    for error, pattern, call in cases:
        with pytest.raises(error, match=pattern):
            call()
        assert planner.stats() == before
    planner.check_invariants()
    planner.plan_swap_in([1], [0, 2], np.array([5, 6], np.int32))
    with pytest.raises(ValueError, match="not swapped out"):
        planner.plan_swap_in([1], [0, 2], np.array([5, 6], np.int32))


def test_bad_layout_and_options():
    with pytest.raises(ValueError, match="num_host_blocks"):
        SwapPlanner(0, BLOCK)
    with pytest.raises(ValueError, match="layout"):
        SwapPlanner(8, BLOCK, layout=KvLayout(np.array([[64, 32, 64]])))
    with pytest.raises(ValueError, match="layout"):
        SwapPlanner(8, BLOCK, layout=KvLayout(np.array([[64, 64]])))
    with pytest.raises(ValueError, match="cost"):
        SwapPlanner(8, BLOCK, cost=np.zeros((2, 3)))
    bad = default_cost_model()
    bad[0, 0, 2] = 0
    with pytest.raises(ValueError, match="cost"):
        SwapPlanner(8, BLOCK, cost=bad)
    with pytest.raises(ValueError, match="num_layers"):
        KvLayout.per_layer(0, 16, 8, 128)


def test_copy_host_checks_every_descriptor_before_copying():
    src = [np.arange(64, dtype=np.uint8), np.arange(64, dtype=np.uint8)]
    dst = [np.zeros(64, np.uint8), np.zeros(32, np.uint8)]
    good_then_bad = np.array([[0, 0, 0, 16], [1, 0, 24, 16]])
    with pytest.raises(ValueError, match=r"descriptors\[1\].*dst\[1\]"):
        copy_host(good_then_bad, src, dst)
    assert not dst[0].any(), "a rejected batch copied nothing"
    with pytest.raises(ValueError, match=r"descriptors\[0\]: tensor 2"):
        copy_host(np.array([[2, 0, 0, 8]]), src, dst)
    with pytest.raises(ValueError, match=r"descriptors\[0\]"):
        copy_host(np.array([[0, -8, 0, 8]]), src, dst)
    with pytest.raises(ValueError, match="dst"):
        copy_host(np.array([[0, 0, 0, 8]]), src, dst[:1])
    with pytest.raises(ValueError, match="shape"):
        copy_host(np.array([0, 0, 0, 8]), src, dst)
    with pytest.raises(ValueError, match="read-only"):
        frozen = np.zeros(64, np.uint8)
        frozen.flags.writeable = False
        copy_host(np.array([[0, 0, 0, 8]]), src[:1], [frozen])
    with pytest.raises(ValueError, match="contiguous"):
        copy_host(np.array([[0, 0, 0, 8]]), [np.arange(128, dtype=np.uint8)[::2]], dst[:1])
    copy_host(good_then_bad[:1], src, dst)
    assert dst[0][:16].tolist() == list(range(16))


def test_cuda_entry_points_fail_clearly_without_a_device():
    if kvsched.has_cuda():
        pytest.skip("a CUDA device is present: tests/test_swap_gpu.py covers it")
    from kvsched.cuda import CopyEngine, pinned_empty
    with pytest.raises(RuntimeError):
        CopyEngine(0)
    with pytest.raises(RuntimeError):
        pinned_empty(1024)
