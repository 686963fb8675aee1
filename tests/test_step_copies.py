"""StepCopyRunner over KV tensors in host memory: order, failures, refusals (tests/test_step_copies_gpu.py
runs it on CUDA streams)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kvsched.step_copies import StepCopies, StepCopyRunner

BLOCKS = 16


def extents(*rows) -> np.ndarray:
    return np.array(rows, np.int64).reshape(-1, 3)


def make_runner():
    rng = np.random.default_rng(0)
    tensors = {f"layer.{i}": rng.integers(0, 255, size=(2, BLOCKS, 4, 8), dtype=np.uint8) for i in range(2)}
    return tensors, StepCopyRunner(tensors, BLOCKS)


def block(tensors, b: int) -> bytes:
    return b"".join(t[:, b].tobytes() for t in tensors.values())


def test_waited_copies_run_before_overlapping_ones_in_each_direction():
    tensors, runner = make_runner()
    b3, b5 = block(tensors, 3), block(tensors, 5)
    # out: block 3 -> host 0; out_overlap: block 5 -> host 1; into: host 0 -> block 7;
    # into_overlap: host 1 -> block 9, which reads what out_overlap wrote in the same step.
    runner.run(StepCopies(4, out=extents([3, 0, 1]), into=extents([0, 7, 1]), out_overlap=extents([5, 1, 1]),
                          into_overlap=extents([1, 9, 1])))
    assert block(tensors, 7) == b3 and block(tensors, 9) == b5
    assert runner.num_copied == {"out": 2, "into": 2}
    assert runner.take_failed_blocks() == set()


def test_a_failed_call_reports_the_blocks_it_was_writing_and_the_others_still_run(caplog):
    tensors, runner = make_runner()
    b2 = block(tensors, 2)
    bad_out = extents([1, 0, 1], [BLOCKS + 3, 1, 2])  # a source outside the cache: the whole call fails
    with caplog.at_level(logging.ERROR):
        runner.run(StepCopies(8, out=bad_out, into=extents([5, 4, 1]), out_overlap=extents([2, 6, 1]),
                              into_overlap=extents([6, 11, 1])))
    assert "out-copies failed" in caplog.text
    assert runner.take_failed_blocks() == {-1, -2, -3}  # host blocks 0, 1, 2 as -1 - h
    assert runner.take_failed_blocks() == set()  # taken once
    assert block(tensors, 11) == b2  # the overlapping calls ran
    assert runner.num_copied == {"out": 1, "into": 2}


def test_a_failed_load_reports_device_blocks():
    tensors, runner = make_runner()
    runner.run(StepCopies(4, into=extents([9, 3, 2])))  # host block 9 is outside a pool of 4
    assert runner.take_failed_blocks() == {3, 4}


def test_the_host_pool_size_is_fixed_by_the_first_step_with_copies():
    _, runner = make_runner()
    runner.run(StepCopies(0))  # no copies: no pool yet
    assert runner.copier is None
    runner.run(StepCopies(4, out=extents([1, 0, 1])))
    with pytest.raises(RuntimeError, match="num_host_blocks"):
        runner.run(StepCopies(8, out=extents([1, 0, 1])))


def test_no_tensors_is_refused():
    with pytest.raises(ValueError, match="kv_tensors"):
        StepCopyRunner({}, BLOCKS)


def test_one_call_per_lane_merges_a_directions_overlapping_copies_into_its_waited_call():
    copies = StepCopies(8, out=extents([1, 0, 1]), out_overlap=extents([2, 1, 2]), into_overlap=extents([3, 4, 1]))
    waited, overlapping = copies.one_call_per_lane()
    assert [d for _, d in waited] == ["out", "in"] and [d for _, d in overlapping] == ["out", "in"]
    assert waited[0][0].tolist() == [[1, 0, 1], [2, 1, 2]] and not overlapping[0][0].size
    assert not waited[1][0].size and overlapping[1][0].tolist() == [[3, 4, 1]]
