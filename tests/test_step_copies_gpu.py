"""StepCopyRunner on a real GPU: the stream order that lets copies overlap a forward pass keeps every
byte right. A "forward pass" here is work queued on the compute stream after the step's copies, as
vLLM queues it after its KV connector's handle_preemptions: it writes and reads KV blocks with
torch. Each check is built so that a missing wait would show: the work on one side of the wait is
made slow (a GPU sleep, or a large copy) and the other side reads or writes at once.
Skipped without PyTorch and a CUDA device (bench/gpu/run.sh runs it there)."""

from __future__ import annotations

import numpy as np
import pytest

import kvsched

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (kvsched.has_cuda() and torch.cuda.is_available()),
                                                  reason="needs a CUDA device and PyTorch with CUDA")]

from kvsched.step_copies import StepCopies, StepCopyRunner  # noqa: E402

LAYERS, BLOCKS, BLOCK, HEADS, DIM = 4, 2048, 16, 8, 128  # vLLM's flash-attention layout, fp16: 256 KiB a block
HOST_BLOCKS = 1024
SLEEP_CYCLES = 50_000_000  # ~25 ms at H200 clocks: far longer than any copy here


def extents(*rows) -> np.ndarray:
    return np.array(rows, np.int64).reshape(-1, 3)


@pytest.fixture()
def cache():
    torch.manual_seed(0)  # random float16 bits, none of them NaN (torch.equal is False on NaN)
    tensors = {f"layer.{i}": torch.randint(0, 30000, (2, BLOCKS, BLOCK, HEADS, DIM), dtype=torch.int16,
                                           device="cuda").view(torch.float16) for i in range(LAYERS)}
    torch.cuda.synchronize()
    return tensors, StepCopyRunner(tensors, BLOCKS)


def write(tensors, first: int, n: int, value: float) -> None:
    """The forward pass writes blocks [first, first + n) (on the current stream)."""
    for t in tensors.values():
        t[:, first:first + n].fill_(value)


def read(tensors, first: int, n: int) -> list:
    """The forward pass reads blocks [first, first + n) (clones on the current stream)."""
    return [t[:, first:first + n].clone() for t in tensors.values()]


def test_copies_wait_for_the_forward_pass_before_them_and_the_next_forward_pass_waits_for_them(cache):
    tensors, runner = cache
    n = 256  # 64 MiB: a copy of a few ms
    # Step 1: its forward pass is slow and then writes blocks 0..n.
    runner.run(StepCopies(HOST_BLOCKS))
    torch.cuda._sleep(SLEEP_CYCLES)
    write(tensors, 0, n, 7.0)
    # Step 2 swaps those blocks out (a waited copy: it must read step 1's writes), and its forward
    # pass at once writes them for another request (it must wait for the copy).
    runner.run(StepCopies(HOST_BLOCKS, out=extents([0, 0, n])))
    write(tensors, 0, n, 9.0)
    # Step 3 prefetches them into other blocks (overlapping: no row of step 3 holds them).
    runner.run(StepCopies(HOST_BLOCKS, into_overlap=extents([0, 1024, n])))
    # Step 4, with no copies, reads them at once: it must wait for step 3's prefetch.
    runner.run(StepCopies(HOST_BLOCKS))
    loaded = read(tensors, 1024, n)
    torch.cuda.synchronize()
    assert all(bool((x == 7.0).all()) for x in loaded), "a forward pass read a prefetch before it landed"
    assert all(bool((t[:, 0:n] == 9.0).all()) for t in tensors.values())
    assert runner.num_copied == {"out": 1, "into": 1} and runner.take_failed_blocks() == set()


def test_an_overlapping_copy_runs_beside_the_forward_pass_and_lands_before_the_next_one(cache):
    tensors, runner = cache
    n = 512
    expected = read(tensors, 100, n)
    runner.run(StepCopies(HOST_BLOCKS, out_overlap=extents([100, 0, n])))  # a write-through
    write(tensors, 1500, 16, 1.0)  # this step's forward pass touches other blocks
    # The next step loads the written-through blocks (waited: its rows hold them) and reads them.
    runner.run(StepCopies(HOST_BLOCKS, into=extents([0, 1024, n])))
    got = read(tensors, 1024, n)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_one_call_per_lane_and_every_section_byte_exact(cache):
    tensors, runner = cache
    a, b = read(tensors, 10, 40), read(tensors, 300, 8)
    # Both out sections in one call (out has copies): blocks 10.. and 300.. to host 0.. and 64..;
    # then into (waited) and into_overlap read them back to blocks 1200.. and 1700...
    runner.run(StepCopies(HOST_BLOCKS, out=extents([10, 0, 40]), out_overlap=extents([300, 64, 8])))
    runner.run(StepCopies(HOST_BLOCKS, into=extents([0, 1200, 40]), into_overlap=extents([64, 1700, 8])))
    runner.run(StepCopies(HOST_BLOCKS))
    got_a, got_b = read(tensors, 1200, 40), read(tensors, 1700, 8)
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(got_a, a)) and all(torch.equal(x, y) for x, y in zip(got_b, b))


def test_a_failed_call_on_cuda_is_reported_and_the_rest_of_the_step_runs(cache):
    tensors, runner = cache
    expected = read(tensors, 5, 3)
    runner.run(StepCopies(HOST_BLOCKS, out=extents([5, 10, 3])))
    # The out call reads blocks outside the cache (refused before a byte moves); the prefetch runs.
    runner.run(StepCopies(HOST_BLOCKS, out=extents([BLOCKS + 5, 0, 2]), into_overlap=extents([10, 40, 3])))
    runner.run(StepCopies(HOST_BLOCKS))
    got = read(tensors, 40, 3)
    torch.cuda.synchronize()
    assert runner.take_failed_blocks() == {-1, -2}  # host blocks 0 and 1
    assert all(torch.equal(x, y) for x, y in zip(got, expected))
