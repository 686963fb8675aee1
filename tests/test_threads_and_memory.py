"""The threads contract (docs/design/threads.md, "Threads") hammered, and memory that follows live state.

Each scenario runs in a child process (this file run as a script), so that a crash or a hang is a
test failure rather than the end of the test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kvsched

ALLOWED = (ValueError, KeyError, TypeError)


def _run_child(scenario: str, timeout: float = 240) -> str:
    try:
        done = subprocess.run([sys.executable, __file__, scenario], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: hung (no result in {timeout} s)")
    if done.returncode < 0:
        pytest.fail(f"{scenario}: crashed with signal {-done.returncode}\n{done.stderr[-3000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _scrambler(array: np.ndarray, stop: threading.Event, values: np.ndarray) -> threading.Thread:
    """A thread that rewrites the caller's array in place until stopped."""

    def scramble() -> None:
        rng = np.random.default_rng(0)
        while not stop.is_set():
            array[:] = rng.choice(values, array.size)

    return threading.Thread(target=scramble, daemon=True)


def scenario_allocator_buffer_rewritten() -> None:
    """free_batch and allocate_batch read a private copy: a thread rewriting the ids meanwhile
    cannot make the apply step look up an id the checks did not see."""
    a = kvsched.BlockAllocator(num_blocks=4096, block_size=16)
    deadline = time.monotonic() + 6
    next_id = 0
    while time.monotonic() < deadline:
        ids = np.arange(next_id, next_id + 64, dtype=np.int64)
        next_id += 64
        a.allocate_batch(ids, np.full(64, 40))
        shared = ids.copy()
        stop = threading.Event()
        thread = _scrambler(shared, stop, np.concatenate([ids, [-1, 10**12]]))
        thread.start()
        for _ in range(20):
            try:
                a.free_batch(shared)
                break
            except ALLOWED:
                pass
        stop.set()
        thread.join()
        a.check_invariants()
        for seq in ids.tolist():  # whatever the scrambler did, free what is left
            if seq in a:
                a.free(seq)
    a.check_invariants()
    assert a.num_free_blocks == a.num_blocks
    print("ok")


def scenario_update_buffer_rewritten() -> None:
    """Scheduler.update and abort with arrays that another thread rewrites."""
    s = kvsched.Scheduler(num_blocks=512, block_size=16, max_num_seqs=64, max_num_batched_tokens=4096)
    deadline = time.monotonic() + 6
    next_id = 0
    while time.monotonic() < deadline:
        ids = np.arange(next_id, next_id + 16)
        next_id += 16
        s.add_requests(ids, np.full(16, 20), np.full(16, 4))
        plan = s.schedule()
        req_ids, tokens = plan.req_ids.copy(), plan.samples.astype(np.int64)
        stop = threading.Event()
        thread = _scrambler(req_ids, stop, np.concatenate([plan.req_ids, [-5, 10**15]]))
        thread.start()
        try:
            s.update(req_ids, tokens)
        except ALLOWED:
            pass
        stop.set()
        thread.join()
        s.check_invariants()
        if s._former.has_outstanding_plan:
            s.update(plan.req_ids, tokens)  # the scrambled report was refused whole: report it right
        victims = s.waiting_ids()[:4].copy()
        stop = threading.Event()
        thread = _scrambler(victims, stop, np.array([-1, 10**12, *victims.tolist()]))
        thread.start()
        try:
            s.abort(victims)
        except ALLOWED:
            pass
        stop.set()
        thread.join()
        s.check_invariants()
    print("ok")


def scenario_two_engine_threads() -> None:
    """Two threads each run schedule/update on one Scheduler (misuse): each call either completes
    or is refused before changing anything, and every request ends exactly once."""
    s = kvsched.Scheduler(num_blocks=256, block_size=16, max_num_seqs=32, max_num_batched_tokens=2048)
    total = 3000
    s.add_requests(np.arange(total), np.full(total, 24), np.full(total, 3))
    finished: list[np.ndarray] = []
    errors: list[BaseException] = []
    refused = [0]

    def engine() -> None:
        try:
            while s.has_unfinished_requests():
                try:
                    plan = s.schedule()
                except ValueError as error:  # the other thread's plan is outstanding
                    assert "one plan at a time" in str(error), error
                    refused[0] += 1
                    continue
                # The plan this thread scheduled is still the outstanding one: the other thread's
                # schedule() was refused. Any error here fails the test.
                finished.append(s.update(plan.req_ids, plan.samples.astype(np.int64)))
        except BaseException as error:  # noqa: BLE001 - reported to the main thread
            errors.append(error)

    threads = [threading.Thread(target=engine) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "an engine thread hung"
    assert not errors, errors
    ended = np.concatenate(finished)
    assert np.array_equal(np.sort(ended), np.arange(total)), "a request ended twice or never"
    s.check_invariants()
    print("ok", refused[0])


def scenario_readers_beside_the_engine() -> None:
    """Read-only calls from other threads while the engine steps."""
    s = kvsched.Scheduler(num_blocks=256, block_size=16, max_num_seqs=32, policy="vtc")
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                s.stats(), s.load(), s.running_ids(), s.waiting_ids()
                for rid in s.running_ids()[:4].tolist():
                    try:
                        s.info(rid), s.block_table(rid)
                    except KeyError:
                        pass  # finished between the two calls
            except BaseException as error:  # noqa: BLE001
                errors.append(error)
                return

    def adder() -> None:  # requests come in from an API thread
        next_id = 10**6
        while not stop.is_set():
            s.add_requests(np.arange(next_id, next_id + 4), np.full(4, 30), np.full(4, 5), client_ids=np.arange(4))
            next_id += 4
            time.sleep(0.001)

    threads = [threading.Thread(target=reader), threading.Thread(target=reader), threading.Thread(target=adder)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        plan = s.schedule()
        s.update(plan.req_ids, plan.samples.astype(np.int64))
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    s.check_invariants()
    print("ok")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def scenario_memory_follows_live_state() -> None:
    """Hundreds of thousands of requests with fresh ids, classes and clients (vtc): memory stays
    flat once warm, whatever the id values."""
    s = kvsched.Scheduler(num_blocks=2048, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
                          policy="vtc")
    rng = np.random.default_rng(0)
    batch, rounds = 200, 1500  # 300,000 requests
    next_id = 0
    samples = []
    for round_ in range(rounds):
        ids = np.arange(next_id, next_id + batch)
        next_id += batch
        s.add_requests(ids, rng.integers(8, 64, batch), rng.integers(1, 3, batch),
                       class_ids=rng.integers(0, 2**31 - 1, batch), client_ids=rng.integers(0, 2**31 - 1, batch))
        while s.num_waiting:
            plan = s.schedule()
            s.update(plan.req_ids, plan.samples.astype(np.int64))
        if round_ in (rounds // 5, rounds - 1):
            samples.append(_rss_mb())
    while s.has_unfinished_requests():
        plan = s.schedule()
        s.update(plan.req_ids, plan.samples.astype(np.int64))
    s.check_invariants()
    warm, end = samples
    print(f"ok rss warm {warm:.1f} MB, end {end:.1f} MB")
    assert end - warm < 40, f"memory grew from {warm:.1f} MB to {end:.1f} MB over {rounds * batch} requests"


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_scenario(scenario: str) -> None:
    if scenario == "memory_follows_live_state" and UNDER_ASAN:
        pytest.skip("ASan's quarantine holds freed memory: RSS says nothing there")
    _run_child(scenario)


def test_the_policy_table_forgets_clients_at_the_floor() -> None:
    """vtc keeps a counter only for clients ahead of the floor (memory follows live clients)."""
    policy = kvsched.policies.FairSharePolicy()
    s = kvsched.Scheduler(num_blocks=512, block_size=16, max_num_seqs=64, policy=policy)
    next_id = 0
    for _ in range(60):
        ids = np.arange(next_id, next_id + 50)
        next_id += 50
        s.add_requests(ids, np.full(50, 16), np.full(50, 1), client_ids=ids)  # every client new
        while s.has_unfinished_requests():
            plan = s.schedule()
            s.update(plan.req_ids, plan.samples.astype(np.int64))
    assert policy._clients.size < 2100, policy._clients.size  # 3000 clients seen


def test_class_histories_are_bounded() -> None:
    e = kvsched.PeakEstimator(window=10)
    for start in range(0, 5000, 500):
        classes = np.arange(start, start + 500)
        e.record(np.full(500, 7), classes)
    assert e.history_size(4999) == 1  # recent classes are kept
    assert e.history_size(0) == 0  # the least recent were forgotten (limit: 1024 classes)
    assert e.history_size(-1) == 10


if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
