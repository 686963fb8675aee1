"""Cases an adversarial pass found after the hostile-input suite landed, one test per class.

Crashes run in a child process so that a regression fails the test instead of ending the run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kvsched
from kvsched.cluster import Dispatcher, InstanceLoads
from kvsched.policies import FairSharePolicy
from kvsched.swap import copy_host


def run_child(code: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode >= 0, f"crashed with signal {-done.returncode}: {done.stderr[-2000:]}"
    return done


def test_an_ndarray_subclass_cannot_override_the_private_copy() -> None:
    done = run_child("""
        import threading, numpy as np, kvsched
        class Shared(np.ndarray):
            def copy(self, *a, **k):
                return self
            def astype(self, *a, **k):
                return np.zeros(self.size, np.int8)
        a = kvsched.BlockAllocator(4096, 16)
        ids = np.arange(100).view(Shared)
        stop = threading.Event()
        def scramble():
            while not stop.is_set():
                ids[:] = 10**6
                ids[:] = np.arange(100)
        t = threading.Thread(target=scramble); t.start()
        for _ in range(300):
            a.allocate_batch(np.arange(100), np.full(100, 16))
            try:
                a.free_batch(ids)
            except KeyError:
                for i in range(100):
                    if i in a:
                        a.free(i)
            a.check_invariants()
        stop.set(); t.join()
        print("ok")
    """)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_copy_host_refuses_object_buffers_and_allows_overlap() -> None:
    dst = np.array([object() for _ in range(8)], dtype=object)
    with pytest.raises(TypeError, match=r"dst\[0\]"):
        copy_host(np.array([[0, 0, 0, 64]]), [np.full(64, 0x41, np.uint8)], [dst])
    buffer = np.arange(64, dtype=np.uint8)
    copy_host(np.array([[0, 0, 8, 32]]), [buffer], [buffer])  # overlapping ranges: memmove semantics
    assert buffer[8:40].tolist() == list(range(32))


def test_update_returns_finished_ids_whatever_the_engine_does_to_the_plan() -> None:
    s = kvsched.Scheduler(num_blocks=64, block_size=16, policy="vtc")
    s.add_requests([1, 2], [20, 20], [1, 1], client_ids=[3, 4])
    plan = s.schedule()
    ids = plan.req_ids.copy()
    with pytest.raises(ValueError, match="read-only"):
        plan.req_ids[:] = [7, 9]
    with pytest.raises(ValueError, match="read-only"):
        plan.client_ids[:] = -1
    assert sorted(s.update(ids[::-1].copy(), np.ones(2, np.int64)).tolist()) == [1, 2]


def test_huge_fair_share_weights_saturate_instead_of_breaking_update() -> None:
    s = kvsched.Scheduler(num_blocks=64, block_size=16, policy=FairSharePolicy(input_weight=1e308, output_weight=1e308))
    s.add_requests([1, 2, 3], [20, 20, 20], [3, 3, 3], client_ids=[0, 1, 0])
    finished = []
    while s.has_unfinished_requests():
        plan = s.schedule()
        finished += s.update(plan.req_ids, plan.samples.astype(np.int64)).tolist()
    assert sorted(finished) == [1, 2, 3]


def test_the_policy_counts_a_step_whose_plan_lost_an_aborted_request() -> None:
    policy = FairSharePolicy()
    s = kvsched.Scheduler(num_blocks=64, block_size=16, policy=policy)
    s.add_requests([1, 2, 3], [10, 10, 10], [5, 5, 5], client_ids=[0, 1, 2])
    plan = s.schedule()
    s.abort([3])
    keep = plan.req_ids != 3
    s.update(plan.req_ids[keep], plan.samples.astype(np.int64)[keep])
    assert policy.counter(np.array([0, 1])).tolist() == [12.0, 12.0]  # 10 prompt tokens + 1 output x 2


def test_refused_adds_leave_the_fair_share_table_alone() -> None:
    policy = FairSharePolicy()
    s = kvsched.Scheduler(num_blocks=64, block_size=16, policy=policy)
    s.add_request(1, 10, 2)
    for client in range(2000):
        with pytest.raises(ValueError, match="already exists"):
            s.add_request(1, 10, 2, client_id=client)
    assert policy._clients.size == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_bytes=2**62), "block_bytes"),
    (dict(block_bytes=2**63 - 1), "block_bytes"),
])
def test_swap_byte_sizes_that_would_wrap_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kvsched.SwapPlanner(64, 16, **kwargs)
    with pytest.raises(ValueError, match="swap_block_bytes"):
        kvsched.Scheduler(num_blocks=64, preemption="swap", num_host_blocks=64, swap_block_bytes=kwargs["block_bytes"])


def test_a_layout_past_the_block_byte_bound_is_refused() -> None:
    layout = kvsched.KvLayout(np.array([[2**40, 2**61, 2**61]]))
    with pytest.raises(ValueError, match="layout"):
        kvsched.SwapPlanner(64, 16, layout=layout)


def test_future_peak_bounds_its_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        kvsched.future_peak([1], [0], 2**28)


@pytest.mark.parametrize("field, value, error", [
    ("load_tokens", np.array([1.5, 2.0]), TypeError),
    ("load_tokens", np.array([np.nan, 2.0]), TypeError),
    ("available", np.array(["False", "False"]), TypeError),
    ("block_size", 1.5, ValueError),
    ("block_size", -16, ValueError),
    ("capacity_blocks", np.array([2**60, 1]), ValueError),
])
def test_dispatcher_loads_are_checked_not_cast(field: str, value, error: type) -> None:
    good = dict(available=np.ones(2, bool), load_tokens=np.array([1, 2]), headroom_blocks=np.array([5, 5]),
                peak_blocks=np.zeros(2, np.int64), capacity_blocks=np.array([100, 100]), block_size=16)
    good[field] = value
    with pytest.raises(error, match=field):
        Dispatcher("least_load").place(InstanceLoads(**good), np.array([10]), np.array([1]))


def test_conversions_that_were_silent_are_refused() -> None:
    with pytest.raises(TypeError, match="prior"):
        kvsched.Scheduler(num_blocks=64, prior=[1.9, 2.7])
    with pytest.raises(TypeError, match="enable_prefix_caching"):
        kvsched.BlockAllocator(8, 16, enable_prefix_caching="false")
    s = kvsched.Scheduler(num_blocks=64)
    with pytest.raises(TypeError, match="paused"):
        s.pause_admission("false")
    with pytest.raises(TypeError, match="block_keys"):
        s.prefix_hits(np.zeros((4, 2), np.uint64))


def test_empty_lists_are_an_empty_batch() -> None:
    s = kvsched.Scheduler(num_blocks=64)
    s.add_requests([], [], [])
    assert s.stats()["added"] == 0


def test_a_scalar_argument_given_an_array_or_a_failing_index_is_named() -> None:
    class RaisingIndex:
        def __index__(self) -> int:
            raise RuntimeError("boom")

    s = kvsched.Scheduler(num_blocks=64)
    a = kvsched.BlockAllocator(8, 16)
    for call, name in ((lambda v: s.info(v), "req_id"), (lambda v: s.block_table(v), "req_id"),
                       (lambda v: a.block_table(v), "seq_id"), (lambda v: a.advance_steps(v), "steps")):
        for value in (np.array([1, 2]), RaisingIndex()):
            with pytest.raises(TypeError, match=f"{name} must be an int"):
                call(value)
