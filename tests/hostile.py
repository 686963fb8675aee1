"""Hostile input for every public call, run as a child process (tests/test_hostile_input.py).

    python tests/hostile.py TARGET SEED CALLS

Each call corrupts at most one argument with a hostile value (a wrong type, NaN or inf, a huge,
negative or wrapped number, a wrong shape or dtype, a non-contiguous array) and keeps the others
valid. The contract checked after every call:

- it returns, or raises TypeError, ValueError, KeyError, OverflowError or kvsched.OutOfBlocks
  (anything else, e.g. pybind11's "Unable to cast", IndexError or a RuntimeError, is a failure);
- an error names the corrupted argument (its name without a plural "s" appears in the message);
- a value that can only be a mistake (a float with a fraction, a str, a bool for an int; a str for
  a float) is refused, never converted;
- a refused call changed nothing observable, and ``check_invariants()`` passes either way;
- the object still works: a normal step (schedule and update) runs between hostile calls.

A crash (signal) or a hang is caught by the parent, which runs this with a timeout. The script
prints the first broken rule with the call and exits 1.
"""

from __future__ import annotations

import math
import random
import sys
import traceback
from typing import Any, Callable

import numpy as np

import kvsched
from kvsched.cluster import Dispatcher, InstanceLoads
from kvsched.estimator import QUANTILE_DEFAULTS

ALLOWED = (TypeError, ValueError, KeyError, OverflowError, kvsched.OutOfBlocks)
NOT_AN_INT = object()  # marks a hostile value that no int argument may accept


class Broken(AssertionError):
    pass


def hostile_ints(rng: random.Random) -> tuple[Any, bool]:
    """A hostile value for an int argument, and whether it must be refused."""
    choices: list[tuple[Any, bool]] = [
        (-1, False), (0, False), (-(2**63), False), (2**63, True), (2**64 + 3, True), (2**40 + 1, False),
        (2**62, False), (2**31, False), (1.7, True), (float("nan"), True), (float("inf"), True), ("5", True),
        (None, False), (True, True), ([1], False), (np.float64(2.5), True), (np.uint64(2**64 - 1), False),
        (np.int8(3), False), (b"\x01", True),
    ]
    return rng.choice(choices)


def hostile_floats(rng: random.Random) -> tuple[Any, bool]:
    choices: list[tuple[Any, bool]] = [
        (float("nan"), False), (float("inf"), False), (-float("inf"), False), (-1.0, False), (0.0, False),
        (1e308, False), ("0.5", True), (None, False), (True, True), ([0.5], False), (2**70, False),
    ]
    return rng.choice(choices)


def hostile_arrays(rng: random.Random, n: int) -> tuple[Any, bool]:
    """A hostile value for an integer array argument of n entries."""
    big = np.zeros(2 * max(n, 1), np.int64)
    choices: list[tuple[Any, bool]] = [
        (np.full(n, 1.5), True), (np.full(n, "a"), True), (np.full(n, 1, dtype=object), True),
        (np.ones((n, 1), np.int64), False), (big[::2][:n] if n else big[::2], False),
        (np.full(n, 2**64 - 1, np.uint64), False), (np.full(n, -1), False), (np.full(n, np.nan), True),
        (np.ones(n + 1, np.int64), False), (np.zeros(0, np.float64), False), (np.ones(n, bool), False),
        (np.full(n, 2**62), False), (np.full(n, 2**40 + 1), False), (np.full(n, 7, np.int8), False), ("abc", True),
        (None, False), (np.full(n, -(2**63)), False),
    ]
    return rng.choice(choices)


def stem(name: str) -> str:
    """What an error about `name` must mention: 'class_ids' -> 'class_id', 'priorities' -> 'priorit'."""
    if name.endswith("ies"):
        return name[:-3]
    if name.endswith("y"):
        return name[:-1]
    return name[:-1] if name.endswith("s") else name


def call_hostile(label: str, fn: Callable[..., Any], kwargs: dict, corrupted: str | None, must_refuse: bool,
                 snapshot: Callable[[], Any], check: Callable[[], None]) -> Any:
    before = snapshot()
    try:
        result = fn(**kwargs)
    except ALLOWED as error:
        message = str(error)
        # Running out of capacity is an expected outcome, not a complaint about an argument.
        named = isinstance(error, kvsched.OutOfBlocks) or corrupted is None
        if not named and stem(corrupted).lower() not in message.lower():
            raise Broken(f"{label}: error does not name {corrupted!r}: {type(error).__name__}: {message}") from error
        if "Unable to cast" in message or "incompatible function arguments" in message:
            raise Broken(f"{label}: pybind11's error instead of a named one: {message}") from error
        after = snapshot()
        if after != before:
            raise Broken(f"{label}: refused ({message}) but the state changed")
        check()
        return None
    except Exception as error:
        raise Broken(f"{label}: {type(error).__name__} is not an allowed error: {error}") from error
    if must_refuse:
        raise Broken(f"{label}: accepted a value for {corrupted!r} that it must refuse: {kwargs[corrupted]!r}")
    check()
    return result


# ---------------------------------------------------------------- Scheduler


def scheduler_snapshot(s: kvsched.Scheduler) -> tuple:
    stats = s.stats()
    ids = sorted(s.running_ids().tolist() + s.waiting_ids().tolist() + s.swapped_ids().tolist())
    infos = tuple((i, tuple(sorted(s.info(i).items())), tuple(s.block_table(i).tolist())) for i in ids)
    return repr(sorted((k, repr(v)) for k, v in stats.items())), infos


def run_scheduler(seed: int, calls: int) -> None:
    rng = random.Random(seed)
    variant = seed % 3
    options: dict = dict(num_blocks=64, block_size=16, max_num_batched_tokens=256, max_num_seqs=8, max_loras=seed % 2)
    if variant == 1:
        options.update(preemption="swap", num_host_blocks=64)
    elif variant == 2:
        options.update(preemption="swap", num_host_blocks=64, host_prefix_cache=True)
    s = kvsched.Scheduler(policy=["fcfs", "priority", "vtc"][seed % 3], **options)
    next_id = [0]
    incoming: list[int] = []

    def fresh() -> int:
        next_id[0] += 1
        return next_id[0]

    def check() -> None:
        s.check_invariants()

    def normal_step() -> None:
        if rng.random() < 0.7:
            ids = [fresh() for _ in range(rng.randint(1, 3))]
            s.add_requests(ids, [rng.randint(1, 200) for _ in ids], [rng.randint(1, 40) for _ in ids],
                           client_ids=[rng.randint(0, 5) for _ in ids], priorities=[rng.random() for _ in ids])
        plan = s.schedule()
        if rng.random() < 0.3:  # a hostile report of this plan first
            hostile_update(plan)
        tokens = plan.samples.astype(np.int64)
        finished = np.array([bool(t) and rng.random() < 0.1 for t in tokens], bool)
        s.update(plan.req_ids, tokens, finished)
        check()

    def hostile_update(plan) -> None:
        n = len(plan)
        good = dict(req_ids=plan.req_ids.copy(), num_new_tokens=plan.samples.astype(np.int64), finished=None)
        name = rng.choice(["req_ids", "num_new_tokens", "finished"])
        value, refuse = hostile_arrays(rng, n)
        good[name] = value
        # A hostile report may be a valid one by chance (e.g. all-ones tokens): then it was applied.
        outcome = call_hostile(f"update[{name}={value!r}]", s.update, good, name, refuse and n > 0,
                               lambda: scheduler_snapshot(s), check)
        if outcome is not None:
            raise _Applied()

    def keep_incoming() -> None:  # forget migrations that ended (committed, cancelled, aborted)
        incoming[:] = [i for i in incoming if i in s and s.info(i)["state"] == "incoming"]

    def live_id() -> int:
        ids = s.running_ids().tolist() + s.waiting_ids().tolist()
        return rng.choice(ids) if ids else 10**9

    def one_hostile_call() -> None:
        what = rng.choice(["add", "add_one", "abort", "stop", "set_priority", "reserve", "extend", "commit",
                           "cancel", "migrate_out", "info", "block_keys", "prefix_hits", "candidate",
                           "accept_drafts"])
        if what == "add":
            n = rng.randint(1, 3)
            args = dict(req_ids=np.array([fresh() for _ in range(n)]), prompt_lens=np.full(n, 30),
                        max_new_tokens=np.full(n, 10), arrival_times=np.zeros(n), priorities=np.zeros(n),
                        class_ids=np.zeros(n, np.int64), client_ids=np.zeros(n, np.int64),
                        true_output_lens=None, lora_ids=np.arange(n))
            name = rng.choice(list(args))
            value, refuse = hostile_arrays(rng, n)
            if name in ("arrival_times", "priorities"):  # float columns: only non-numbers must be refused
                value, refuse = hostile_floats(rng) if rng.random() < 0.5 else (value, False)
            if name in ("true_output_lens", "lora_ids") and value is None:
                refuse = False
            args[name] = value
            call_hostile(f"add_requests[{name}={value!r}]", s.add_requests, args, name, refuse,
                         lambda: scheduler_snapshot(s), check)
        elif what == "add_one":
            args = dict(req_id=fresh(), prompt_len=30, max_new_tokens=10, priority=0.0, class_id=0, client_id=0,
                        arrival_time=0.0)
            name = rng.choice(list(args))
            value, refuse = hostile_floats(rng) if name in ("priority", "arrival_time") else hostile_ints(rng)
            args[name] = value
            call_hostile(f"add_request[{name}={value!r}]", s.add_request, args, name, refuse,
                         lambda: scheduler_snapshot(s), check)
        elif what in ("abort", "stop", "cancel", "migrate_out"):
            fn = {"abort": s.abort, "stop": s.stop, "cancel": s.cancel_incoming, "migrate_out": s.migrate_out}[what]
            value, refuse = hostile_arrays(rng, 1) if rng.random() < 0.7 else (incoming[:1] or [live_id()], False)
            call_hostile(f"{what}[req_ids={value!r}]", fn, dict(req_ids=value), "req_ids", refuse,
                         lambda: scheduler_snapshot(s), check)
            keep_incoming()
        elif what == "accept_drafts":  # a valid id may still be refused (not running, no slots): unnamed
            name = rng.choice(["req_ids", "num_accepted"])
            args = dict(req_ids=[live_id()], num_accepted=[rng.randint(0, 2)])
            value, refuse = hostile_arrays(rng, 1)
            args[name] = value
            call_hostile(f"accept_drafts[{name}={value!r}]", s.accept_drafts, args, None, False,
                         lambda: scheduler_snapshot(s), check)
        elif what == "set_priority":
            name = rng.choice(["req_ids", "priorities"])
            args = dict(req_ids=[live_id()], priorities=[0.5])
            value, refuse = hostile_floats(rng) if name == "priorities" else hostile_arrays(rng, 1)
            args[name] = value
            if s.policy.name != "priority":
                name = None  # refused for the policy whatever the values
            call_hostile(f"set_priority[{name}={value!r}]", s.set_priority, args, name, False,
                         lambda: scheduler_snapshot(s), check)
        elif what == "reserve":
            args = dict(req_id=fresh(), prompt_len=40, max_new_tokens=20, num_generated=2, num_tokens=30,
                        class_id=0, client_id=0)
            name = rng.choice(list(args))
            value, refuse = hostile_ints(rng)
            args[name] = value
            result = call_hostile(f"reserve_incoming[{name}={value!r}]", s.reserve_incoming, args, name, refuse,
                                  lambda: scheduler_snapshot(s), check)
            if result is not None:
                incoming.append(args["req_id"])
        elif what in ("extend", "commit") and incoming:
            rid = incoming[0]
            info = s.info(rid)
            if what == "extend":
                args = dict(req_id=rid, num_tokens=info["num_computed"] + 1, num_generated=info["num_generated"])
                fn = s.extend_incoming
            else:
                args = dict(req_id=rid, num_generated=info["num_generated"])
                fn = s.commit_incoming
            name = rng.choice(list(args))
            value, refuse = hostile_ints(rng)
            args[name] = value
            call_hostile(f"{what}_incoming[{name}={value!r}]", fn, args, name, refuse,
                         lambda: scheduler_snapshot(s), check)
            keep_incoming()
        elif what == "info":
            value, refuse = hostile_ints(rng)
            call_hostile(f"info[req_id={value!r}]", s.info, dict(req_id=value), "req_id", refuse,
                         lambda: scheduler_snapshot(s), check)
        elif what == "block_keys":
            value, refuse = hostile_arrays(rng, 40)
            call_hostile(f"block_keys[tokens={value!r}]", s.block_keys, dict(tokens=value), "tokens", refuse,
                         lambda: scheduler_snapshot(s), check)
        elif what == "prefix_hits":
            value, refuse = hostile_arrays(rng, 2)
            call_hostile(f"prefix_hits[block_keys={value!r}]", s.prefix_hits, dict(block_keys=[value]),
                         "block_keys", refuse, lambda: scheduler_snapshot(s), check)
        elif what == "candidate":
            value, refuse = hostile_arrays(rng, 2)
            call_hostile(f"migration_candidate[exclude={value!r}]", s.migration_candidate, dict(exclude=value),
                         "exclude", refuse, lambda: scheduler_snapshot(s), check)

    for _ in range(calls):
        try:
            if rng.random() < 0.3:
                normal_step()
            else:
                one_hostile_call()
        except _Applied:
            continue  # the hostile update happened to be a valid report of the plan
    while s.has_unfinished_requests() and s.num_running + s.num_waiting > 0:
        plan = s.schedule()
        s.update(plan.req_ids, plan.samples.astype(np.int64), plan.samples.astype(bool))
    check()


class _Applied(Exception):
    pass


# ---------------------------------------------------------------- constructors


CONFIG_FIELDS = {
    "num_blocks": "int", "block_size": "int", "max_num_batched_tokens": "int", "max_num_seqs": "int",
    "max_prefill_chunk": "int", "prefill_attention_budget": "int", "num_lookahead_tokens": "int",
    "max_bypass": "int", "watermark_blocks": "int", "max_loras": "int", "window": "int", "num_scenarios": "int", "seed": "int",
    "num_host_blocks": "int", "swap_block_bytes": "int", "swap_tensors_per_block": "int",
    "quantile": "float", "target_preemption_rate": "float", "adapt_gain": "float", "min_quantile": "float",
    "max_quantile": "float", "recompute_seconds_per_token": "float",
    "adaptive": "bool", "sampling": "bool", "keyed_draws": "bool", "enable_prefix_caching": "bool",
    "reuse_host_copies": "bool", "host_prefix_cache": "bool",
    "admission": "str", "placement": "str", "hash_algorithm": "str", "preemption": "str",
}


def run_config(seed: int, calls: int) -> None:
    rng = random.Random(seed)
    for _ in range(calls):
        name = rng.choice(sorted(CONFIG_FIELDS))
        kind = CONFIG_FIELDS[name]
        if kind == "int":
            value, refuse = hostile_ints(rng)
            refuse = refuse or value is None or isinstance(value, list)
        elif kind == "float":
            value, refuse = hostile_floats(rng)
            refuse = refuse or value is None or isinstance(value, list) or not math.isfinite(
                value if isinstance(value, float) else 0.0)
        elif kind == "bool":
            value, refuse = rng.choice([(1, True), ("yes", True), (None, True), (np.bool_(True), False), (2.0, True)])
        else:
            value, refuse = rng.choice([("", True), (None, True), (3, True), ("AGGRESSIVE", True)])
        options = dict(num_blocks=64, block_size=16, max_num_batched_tokens=256, max_num_seqs=8)
        if name in QUANTILE_DEFAULTS:  # they act in quantile mode only (refused with sampled draws)
            options["sampling"] = False
            refuse = refuse and value is not None  # None: the default
        options[name] = value
        try:
            s = kvsched.Scheduler(**options)
        except ALLOWED as error:
            if stem(name) not in str(error) and name not in str(error):
                raise Broken(f"Scheduler({name}={value!r}): error does not name it: {error}") from error
            continue
        except Exception as error:
            raise Broken(f"Scheduler({name}={value!r}): {type(error).__name__}: {error}") from error
        if refuse:
            raise Broken(f"Scheduler({name}={value!r}) accepted a value it must refuse")
        # An accepted value must give a scheduler that runs (and quickly: the parent times it).
        s.add_requests([1, 2], [50, 20], [5, 5])
        for _ in range(20):
            if not s.has_unfinished_requests():
                break
            plan = s.schedule()
            s.update(plan.req_ids, plan.samples.astype(np.int64))
        s.check_invariants()


# ---------------------------------------------------------------- BlockAllocator


def run_allocator(seed: int, calls: int) -> None:
    rng = random.Random(seed)
    a = kvsched.BlockAllocator(num_blocks=64, block_size=16)
    live: list[int] = []
    next_id = [0]

    def snapshot() -> tuple:
        return (repr(sorted(a.stats().items())),
                tuple((i, tuple(a.block_table(i).tolist())) for i in sorted(live)))

    for _ in range(calls):
        what = rng.choice(["allocate", "allocate_batch", "free", "free_batch", "fork", "advance", "query",
                           "hash", "good"])
        if what == "good" or not live:
            next_id[0] += 1
            if a.can_allocate(next_id[0], 40):
                a.allocate(next_id[0], 40)
                live.append(next_id[0])
            elif live:
                a.free(live.pop(0))
            continue
        if what == "allocate":
            args = dict(seq_id=rng.choice(live), num_tokens=a.num_tokens(live[0]) + 1)
            name = rng.choice(list(args))
            args[name], refuse = hostile_ints(rng)
            call_hostile(f"allocate[{name}]", a.allocate, args, name, refuse, snapshot, a.check_invariants)
        elif what == "allocate_batch":
            args = dict(seq_ids=np.array(live[:2]), num_tokens=np.array([a.num_tokens(i) + 1 for i in live[:2]]))
            name = rng.choice(list(args))
            args[name], refuse = hostile_arrays(rng, len(live[:2]))
            call_hostile(f"allocate_batch[{name}]", a.allocate_batch, args, name, refuse, snapshot,
                         a.check_invariants)
        elif what in ("free", "free_batch"):
            if what == "free":
                args = dict(seq_id=rng.choice(live), ttl_steps=0)
                name = rng.choice(list(args))
                args[name], refuse = hostile_ints(rng)
                fn = a.free
            else:
                args = dict(seq_ids=np.array(live[:1]), ttl_steps=0)
                name = rng.choice(list(args))
                args[name], refuse = hostile_arrays(rng, 1) if name == "seq_ids" else hostile_ints(rng)
                fn = a.free_batch
            call_hostile(f"{what}[{name}={args[name]!r}]", fn, args, name, refuse, snapshot, a.check_invariants)
            live[:] = [i for i in live if i in a]
        elif what == "fork":
            next_id[0] += 1
            args = dict(parent_id=rng.choice(live), child_id=next_id[0])
            name = rng.choice(list(args))
            args[name], refuse = hostile_ints(rng)
            call_hostile(f"fork[{name}]", a.fork, args, name, refuse, snapshot, a.check_invariants)
            if next_id[0] in a:
                live.append(next_id[0])
        elif what == "advance":
            value, refuse = hostile_ints(rng)
            call_hostile(f"advance_steps[{value!r}]", a.advance_steps, dict(steps=value), "steps", refuse,
                         snapshot, a.check_invariants)
        elif what == "query":
            fn = rng.choice([a.blocks_needed, a.can_allocate])
            args = dict(seq_id=live[0], num_tokens=10)
            name = rng.choice(list(args))
            args[name], refuse = hostile_ints(rng)
            call_hostile(f"{fn.__name__}[{name}]", fn, args, name, refuse, snapshot, a.check_invariants)
        elif what == "hash":
            value, refuse = hostile_arrays(rng, 40)
            call_hostile("hash_tokens", a.hash_tokens, dict(tokens=value), "tokens", refuse, snapshot,
                         a.check_invariants)
    for i in live:
        a.free(i)
    a.check_invariants()


# ---------------------------------------------------------------- PeakEstimator


ESTIMATOR_FIELDS = {"window": "int", "block_size": "int", "num_scenarios": "int", "seed": "int",
                    "quantile": "float", "target_preemption_rate": "float", "adapt_gain": "float",
                    "min_quantile": "float", "max_quantile": "float", "adaptive": "bool", "sampling": "bool"}


def run_estimator(seed: int, calls: int) -> None:
    rng = random.Random(seed)
    e = kvsched.PeakEstimator(window=100, sampling=True, num_scenarios=3)
    snapshot = lambda: (e.history_size(), e.quantile)  # noqa: E731
    for _ in range(calls):
        what = rng.choice(["ctor", "record", "admit", "peak", "observe"])
        if what == "ctor":
            name = rng.choice(sorted(ESTIMATOR_FIELDS))
            kind = ESTIMATOR_FIELDS[name]
            value, refuse = (hostile_ints(rng) if kind == "int" else hostile_floats(rng) if kind == "float"
                             else rng.choice([(1, True), ("x", True), (None, True)]))
            if name in QUANTILE_DEFAULTS and value is None:
                refuse = False  # None: the default
            call_hostile(f"PeakEstimator({name}={value!r})", kvsched.PeakEstimator, {name: value}, name, refuse,
                         snapshot, lambda: None)
        elif what == "record":
            args = dict(lengths=np.array([10, 20]), class_ids=np.array([0, 1]))
            name = rng.choice(list(args))
            args[name], refuse = hostile_arrays(rng, 2)
            if name == "class_ids" and args[name] is None:
                refuse = False
            call_hostile(f"record[{name}]", e.record, args, name, refuse, snapshot, lambda: None)
        elif what == "observe":
            args = dict(preempted=0, admitted=1)
            name = rng.choice(list(args))
            args[name], refuse = hostile_ints(rng)
            call_hostile(f"observe[{name}]", e.observe, args, name, refuse, snapshot, lambda: None)
        elif what == "peak":
            args = dict(held=np.array([10, 20]), remaining=np.array([5, 1]))
            name = rng.choice(list(args))
            args[name], refuse = hostile_arrays(rng, 2)
            call_hostile(f"future_peak[{name}]", kvsched.future_peak, args, name, refuse, snapshot, lambda: None)
        else:
            args = dict(running_held=np.array([10]), running_generated=np.array([2]),
                        running_max_new_tokens=np.array([50]), candidate_prompt=np.array([30, 30]),
                        candidate_max_new_tokens=np.array([50, 50]), capacity=500)
            name = rng.choice(list(args))
            args[name], refuse = hostile_ints(rng) if name == "capacity" else hostile_arrays(
                rng, 1 if name.startswith("running") else 2)
            call_hostile(f"admit[{name}]", e.admit, args, name, refuse, snapshot, lambda: None)


# ---------------------------------------------------------------- SwapPlanner


def run_swap(seed: int, calls: int) -> None:
    rng = random.Random(seed)
    p = kvsched.SwapPlanner(num_host_blocks=64, block_size=16)
    swapped: list[int] = []
    next_id = [0]

    def snapshot() -> tuple:
        return repr(sorted(p.stats().items())), tuple((i, tuple(p.host_blocks(i).tolist())) for i in swapped)

    for _ in range(calls):
        what = rng.choice(["out", "in", "query", "release", "good"])
        if what == "good" or (what == "in" and not swapped):
            next_id[0] += 1
            if p.can_swap_out(next_id[0], 32):
                p.plan_swap_out([next_id[0]], [32], [0, 2], np.array([2 * next_id[0] % 60, 2 * next_id[0] % 60 + 1]))
                swapped.append(next_id[0])
            continue
        if what == "out":
            next_id[0] += 1
            args = dict(seq_ids=np.array([next_id[0]]), num_tokens=np.array([32]), block_indptr=np.array([0, 2]),
                        device_blocks=np.array([3, 4], np.int32))
            name = rng.choice(list(args))
            args[name], refuse = hostile_arrays(rng, len(args[name]))
            if call_hostile(f"plan_swap_out[{name}={args[name]!r}]", p.plan_swap_out, args, name, refuse,
                            snapshot, p.check_invariants) is not None:
                swapped.extend(int(i) for i in np.atleast_1d(args["seq_ids"]) if p.is_swapped(int(i)))
        elif what == "in":
            sid = swapped[0]
            n = p.host_blocks(sid).size
            args = dict(seq_ids=np.array([sid]), block_indptr=np.array([0, n]),
                        device_blocks=np.arange(n, dtype=np.int32))
            name = rng.choice(list(args) + ["duplicate"])
            refuse = False
            if name == "duplicate":  # two host blocks into one device block
                name = "device_blocks"
                args[name], refuse = np.zeros(n, np.int32), n > 1
            else:
                args[name], refuse = hostile_arrays(rng, len(args[name]))
            call_hostile(f"plan_swap_in[{name}={args[name]!r}]", p.plan_swap_in, args, name, refuse, snapshot,
                         p.check_invariants)
            swapped[:] = [i for i in swapped if p.is_swapped(i)]  # whichever ids the call swapped in
        elif what == "query":
            fn = rng.choice([p.host_blocks_needed, p.can_swap_out, p.estimate_round_trip_seconds])
            args = dict(seq_id=next_id[0], num_tokens=32)
            name = rng.choice(list(args))
            args[name], refuse = hostile_ints(rng)
            if name == "num_tokens" and isinstance(args[name], int) and not isinstance(args[name], bool):
                refuse = args[name] < 0 or args[name] > 2**40
            call_hostile(f"{fn.__name__}[{name}={args[name]!r}]", fn, args, name, refuse, snapshot,
                         p.check_invariants)
        elif what == "release":
            value, refuse = hostile_arrays(rng, 1)
            call_hostile(f"release[{value!r}]", p.release, dict(seq_ids=value), "seq_ids", refuse, snapshot,
                         p.check_invariants)
            swapped[:] = [i for i in swapped if p.is_swapped(i)]


# ---------------------------------------------------------------- Dispatcher


def run_dispatch(seed: int, calls: int) -> None:
    rng = random.Random(seed)
    for policy in ("round_robin", "least_load", "headroom", "prefix_affinity"):
        d = Dispatcher(policy)
        k, r = 3, 4
        loads = InstanceLoads(np.ones(k, bool), np.array([10, 20, 30]), np.array([5, 5, 5]), np.zeros(k, np.int64),
                              np.full(k, 100), 16)
        for _ in range(calls // 4):
            args = dict(loads=loads, request_tokens=np.full(r, 30), request_blocks=np.full(r, 2),
                        prefix_hits=np.zeros((r, k), np.int64) if policy == "prefix_affinity" else None)
            name = rng.choice(["request_tokens", "request_blocks", "prefix_hits", "transposed"])
            refuse = False
            if name == "transposed":
                name, args["prefix_hits"] = "prefix_hits", np.zeros((k, r), np.int64)
                refuse = policy == "prefix_affinity"
            else:
                args[name], refuse = hostile_arrays(rng, r)
                if name == "prefix_hits" and policy != "prefix_affinity":
                    refuse = False
            if name == "prefix_hits" and policy != "prefix_affinity":
                name = None  # ignored by the policy: any value may pass
            call_hostile(f"{policy}.place[{name}]", d.place, args, name, refuse, lambda: d._next, lambda: None)


TARGETS = {"scheduler": run_scheduler, "config": run_config, "allocator": run_allocator,
           "estimator": run_estimator, "swap": run_swap, "dispatch": run_dispatch}

if __name__ == "__main__":
    target, seed, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    try:
        TARGETS[target](seed, calls)
    except Broken as broken:
        print(f"BROKEN ({target}, seed {seed}): {broken}")
        traceback.print_exc()
        sys.exit(1)
    print(f"ok {target} seed {seed}: {calls} calls")
