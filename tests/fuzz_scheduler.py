"""Coverage-guided fuzzing of the Scheduler with atheris (libFuzzer for Python).

    python tests/fuzz_scheduler.py -max_total_time=30 [-runs=N] [corpus_dir]

Each input is a program: a scheduler configuration, then a sequence of calls (add, a step with a
valid or a fuzzed report, abort, stop, priority changes, the migration API, preemption, cache
resets) whose arguments come from the input bytes, full int64 range included. Checked after every
call: it returned or raised an allowed error (TypeError, ValueError, KeyError, OverflowError,
kvsched.OutOfBlocks), a refused call changed nothing, and check_invariants() passes. At the end
the scheduler is drained and its counters must account for every request it took (finished,
aborted, stopped, rejected or migrated out). Anything else is a crash that atheris reports with the
input that caused it.

Coverage is Python's (the bindings' argument checks and the Python layer); the native core is not
instrumented here (that needs clang), so the search is guided by which Python paths each input
reaches. tests/test_fuzz_scheduler.py runs it briefly; CI runs that under ASan and UBSan too.
"""

from __future__ import annotations

import inspect
import sys

import atheris
import numpy as np

import kvsched
from kvsched.scheduler import ADMISSION_MODES

ALLOWED = (TypeError, ValueError, KeyError, OverflowError, kvsched.OutOfBlocks)


def instrument_kvsched() -> None:
    """Coverage for kvsched's Python functions only (instrument_all() would take most of a minute
    on numpy; instrument_imports() misses modules an editable install's import hook loads)."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("kvsched"):
            continue
        for value in list(vars(module).values()):
            members = vars(value).values() if inspect.isclass(value) and value.__module__ == name else [value]
            for member in members:
                member = getattr(member, "__func__", getattr(member, "fget", member))
                if inspect.isfunction(member) and member.__module__ == name:
                    atheris.instrument_func(member)
    atheris.instrument_func(test_one_input)


def observable(s: kvsched.Scheduler) -> tuple:
    stats = s.stats()
    ids = sorted(s.running_ids().tolist() + s.waiting_ids().tolist() + s.swapped_ids().tolist())
    return repr(sorted((k, repr(v)) for k, v in stats.items())), tuple(
        (i, tuple(sorted(s.info(i).items()))) for i in ids)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    options = dict(num_blocks=fdp.ConsumeIntInRange(2, 48), block_size=fdp.PickValueInList([1, 4, 16]),
                   max_num_batched_tokens=fdp.ConsumeIntInRange(8, 512), max_num_seqs=fdp.ConsumeIntInRange(1, 8),
                   admission=fdp.PickValueInList(list(ADMISSION_MODES)),
                   max_prefill_chunk=fdp.ConsumeIntInRange(0, 64), max_loras=fdp.ConsumeIntInRange(0, 2))
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode:
        options.update(preemption="swap", num_host_blocks=fdp.ConsumeIntInRange(1, 48), host_prefix_cache=mode == 2)
    options["max_num_batched_tokens"] = max(options["max_num_batched_tokens"], options["max_num_seqs"])
    s = kvsched.Scheduler(policy=fdp.PickValueInList(["fcfs", "priority", "vtc", "deadline"]), **options)
    incoming: set[int] = set()

    def any_int() -> int:
        return fdp.ConsumeIntInRange(-3, 300) if fdp.ConsumeBool() else fdp.ConsumeInt(8)

    def known_id() -> int:  # a live request's id, or any int
        pool = s.running_ids().tolist() + s.waiting_ids().tolist() + s.swapped_ids().tolist() + sorted(incoming)
        return pool[fdp.ConsumeIntInRange(0, len(pool) - 1)] if pool and fdp.ConsumeBool() else any_int()

    def step() -> None:
        plan = s.schedule()
        tokens = plan.samples.astype(np.int64)
        finished = np.array([fdp.ConsumeBool() for _ in range(len(plan))], bool) & plan.samples.astype(bool)
        if fdp.ConsumeIntInRange(0, 3) == 0:  # a fuzzed report first: refused whole, or a valid one
            bad = tokens.copy()
            if bad.size:
                bad[fdp.ConsumeIntInRange(0, bad.size - 1)] = any_int()
            try:
                s.update(plan.req_ids, bad, finished)
                return
            except ALLOWED:
                pass
        s.update(plan.req_ids, tokens, finished)

    for _ in range(fdp.ConsumeIntInRange(0, 48)):
        before = observable(s)
        op = fdp.ConsumeIntInRange(0, 11)
        try:
            if op <= 2:
                n = fdp.ConsumeIntInRange(0, 3)
                ids = [any_int() for _ in range(n)]
                s.add_requests(ids, [any_int() for _ in ids], [any_int() for _ in ids],
                               priorities=[fdp.ConsumeRegularFloat() for _ in ids],
                               client_ids=[fdp.ConsumeIntInRange(-1, 2**31) for _ in ids],
                               class_ids=[fdp.ConsumeIntInRange(-1, 5) for _ in ids],
                               lora_ids=[fdp.ConsumeIntInRange(-1, 3) for _ in ids])
            elif op <= 5:
                step()
            elif op == 6:
                victim = known_id()
                s.abort([victim])
            elif op == 7:
                victim = known_id()
                s.stop([victim])
            elif op == 8:
                s.set_priority([known_id()], [fdp.ConsumeFloat()])
            elif op == 9:
                rid = any_int()
                s.reserve_incoming(rid, any_int(), any_int(), any_int(), any_int())
                incoming.add(rid)
            elif op == 10 and incoming:
                rid = sorted(incoming)[0]
                choice = fdp.ConsumeIntInRange(0, 2)
                if choice == 0:
                    s.extend_incoming(rid, any_int(), any_int())
                elif choice == 1:
                    s.commit_incoming(rid, any_int())
                    incoming.discard(rid)
                else:
                    s.cancel_incoming([rid])
                    incoming.discard(rid)
            else:
                action = fdp.ConsumeIntInRange(0, 4)
                if action == 0:
                    s.preempt_running()
                elif action == 4:  # a failed copy: its requests drop their KV, some generated tokens taken back
                    victims = [known_id() for _ in range(fdp.ConsumeIntInRange(1, 3))]
                    s.recompute(victims, [any_int() for _ in victims])
                elif action == 1:
                    s.reset_prefix_cache()
                elif action == 2:
                    s.pause_admission(fdp.ConsumeBool())
                else:
                    victim = known_id()
                    s.migrate_out([victim])
        except ALLOWED:
            if observable(s) != before:
                raise AssertionError(f"op {op} was refused but changed the scheduler")
        s.check_invariants()
    s.pause_admission(False)
    if incoming:
        s.cancel_incoming(sorted(incoming))
    for _ in range(10_000):
        if not s.has_unfinished_requests():
            break
        plan = s.schedule()
        s.update(plan.req_ids, plan.samples.astype(np.int64), plan.samples.astype(bool))
    plan = s.schedule()  # rejections decided at the last add are reported by the next plan
    s.update(plan.req_ids, plan.samples.astype(np.int64), plan.samples.astype(bool))
    assert not s.has_unfinished_requests(), "the scheduler never drained"
    stats = s.stats()
    ends = stats["finished"] + stats["aborted"] + stats["rejected"] + stats["migrated_out"]
    assert ends == stats["added"] + stats["migrated_in"], f"requests lost: {stats}"
    s.check_invariants()


if __name__ == "__main__":
    instrument_kvsched()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
