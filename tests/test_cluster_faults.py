"""The fleet under faults: an instance dies or drains at every stage of a live migration, as its
source or its destination, alone, with others, or all of them. Every request must end exactly once
(finished, or rejected with a reason), every reservation must be released, and the driver's
conservation check must hold (and must fail when a request can no longer end)."""

from __future__ import annotations

import numpy as np
import pytest
from test_cluster import A100, FailingPool

from kvsched.cluster import Dispatcher, Link, MigrationPolicy
from kvsched.cluster.instance import InstanceLost, LocalPool
from kvsched.sim.driver import IN_FLIGHT, REJECT_REASONS, Driver
from kvsched.sim.engine import EngineConfig, EngineInstance, prepare
from kvsched.sim.traces import Trace

# A slow link and no early last stage: migrations take several stages, so that each stage is seen.
POLICY = MigrationPolicy(link=Link("slow", 2e9, 1e-3), check_interval_s=0.02, rebalance_gap=0.3, max_stages=3,
                         final_stage_tokens=0)
STAGES = ("first", "middle", "last", "after_migrate_out")


def conversations(num=12, turns=3, seed=0) -> Trace:
    """``num`` conversations of ``turns`` short turns (each turn's prompt is the conversation so far):
    a fleet serves them in well under a second of CPU."""
    rng = np.random.default_rng(seed)
    n = num * turns
    output = rng.integers(30, 120, n)
    prompt = rng.integers(100, 600, n)
    parent = np.full(n, -1, np.int64)
    parent[num:] = np.arange(n - num)  # turn t of conversation c is request t * num + c
    for i in range(num, n):
        prompt[i] += prompt[i - num] + output[i - num]
    return Trace(np.tile(np.arange(num) * 0.05, turns), prompt, output, session_ids=np.tile(np.arange(num), turns),
                 parent_index=parent, think_s=np.full(n, 0.2), shared_context=True)


class FaultPool(FailingPool):
    """Instances in this process that fail on demand: every call to one in ``dead`` raises
    InstanceLost; ``die_at[method]`` kills whichever instance receives that call next, at that call."""

    def __init__(self, instances):
        super().__init__(instances, victim=None, at_s=np.inf)
        self.dead: set = set()
        self.die_at: dict = {}

    def call(self, index, method, *args):
        if method in self.die_at:
            del self.die_at[method]
            self.dead.add(index)
        if index in self.dead:
            raise InstanceLost(index, "injected")
        return LocalPool.call(self, index, method, *args)


def fleet(instances=3, drains=None, dispatcher=None, trace=None):
    engine = EngineConfig(A100, 8192)
    prepared = prepare(trace if trace is not None else conversations(), engine)
    pool = FaultPool([EngineInstance(prepared, engine, "aggressive") for _ in range(instances)])
    driver = Driver(prepared, engine, pool, admission="aggressive", dispatcher=dispatcher or Dispatcher("round_robin"),
                    migration=POLICY, drains=drains, check_every_round=True)
    return driver, pool


def at_stage(m, stage: str) -> bool:
    """Whether migration ``m``, seen between rounds, is copying its ``stage`` (``last``: the next
    landing stops the request at its source)."""
    if stage == "after_migrate_out":
        return m.record is not None
    if m.record is not None:
        return False
    last = POLICY.max_stages
    return {"first": m.stage == 1, "middle": 1 < m.stage < last, "last": m.stage >= last}[stage]


def run_and_check(driver, pool):
    """Runs ``driver`` to its end and checks that every request ended exactly once, with a reason
    when rejected, and that the surviving instances hold nothing: no request, no reservation."""
    driver.run()
    result = driver.result("round_robin", "faults")
    log = result.log
    finished = ~np.isnan(log.finish_s)
    assert driver.num_ended == driver.n and np.all(driver.times_ended == 1)
    assert np.all(finished ^ log.rejected), "a request neither finished nor rejected, or both"
    assert result.served.sum() == finished.sum()  # none finished twice
    assert np.all(driver.reject_reason[log.rejected] >= 0)
    assert sum(result.rejected_by_reason.values()) == log.rejected.sum()
    assert not driver.migrations and not driver.retry and not driver.held
    driver.check_conservation()
    for i, instance in enumerate(pool.instances):
        if i in pool.dead:
            continue
        scheduler = instance.scheduler
        scheduler.check_invariants()
        assert scheduler.load()["num_incoming"] == 0, f"instance {i} holds a reservation"
        assert not scheduler.has_unfinished_requests(), f"instance {i} holds requests"
    trace = driver.prepared.trace
    follows = np.flatnonzero(trace.parent_index >= 0)
    # A later turn ran only after its earlier turn finished; a rejected turn took its later turns with it.
    assert np.all(finished[trace.parent_index[follows]] | ~finished[follows])
    return result


# ---- one instance, every stage, either end ----
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("role", ["source", "destination"])
@pytest.mark.parametrize("fault", ["dies", "dies, noticed at once", "drains"])
def test_a_fault_at_any_migration_stage_loses_no_request(stage, role, fault):
    driver, pool = fleet()
    fired: list = []
    if fault == "dies" and stage == "last":
        # The call that ends the last stage is the one that finds its instance dead.
        pool.die_at["migrate_out" if role == "source" else "commit_incoming"] = True

    def hook(now, _pool):
        if fired or (fault == "dies" and stage == "last"):
            return
        for m in driver.migrations:
            if not at_stage(m, stage):
                continue
            victim = m.src if role == "source" else m.dst
            fired.append((m.index, victim))
            if fault == "drains":
                # From the round in which the stage lands (the last stage: before it is handled).
                driver.drains[victim] = m.event_s if stage in ("last", "after_migrate_out") else now
            else:
                pool.dead.add(victim)
                if fault != "dies":
                    driver.instance_lost(victim)
            return

    driver.hook = hook
    result = run_and_check(driver, pool)
    if fault == "dies" and stage == "last":
        assert not pool.die_at and len(pool.dead) == 1  # the call was made, and failed
    else:
        assert fired, f"no migration was seen at its {stage} stage"
    if fault == "drains":
        assert driver.draining.sum() == 1 and not result.lost_instances
    else:
        assert len(result.lost_instances) == 1


def test_a_destination_lost_at_commit_sends_the_request_and_its_later_turns_on():
    driver, pool = fleet()
    pool.die_at["commit_incoming"] = True
    run_and_check(driver, pool)
    (lost,) = pool.dead
    assert driver.retried > 0
    trace = driver.prepared.trace
    finished = ~np.isnan(driver.rows["finish"])
    # With two instances left every request fits: all finished, later turns included.
    assert finished.all() and (trace.parent_index >= 0).sum() > 0


def test_a_source_lost_while_its_last_stage_copies_releases_the_destination():
    driver, pool = fleet()
    seen: list = []

    def hook(now, _pool):
        for m in driver.migrations:
            if m.record is not None and not seen:
                seen.append(m)
                pool.dead.add(m.src)
                driver.instance_lost(m.src)
                # The copy is lost with its source: the reservation is released, the request re-sent.
                assert m not in driver.migrations and m.index in driver.retry
                assert pool.instances[m.dst].scheduler.load()["num_incoming"] == 0

    driver.hook = hook
    run_and_check(driver, pool)
    assert seen


# ---- several instances, all instances ----
def test_both_ends_of_a_migration_lost_at_once():
    driver, pool = fleet(instances=4)
    fired: list = []

    def hook(now, _pool):
        for m in driver.migrations:
            if m.record is not None and not fired:
                fired.append(m)
                pool.dead.update((m.src, m.dst))
                driver.instance_lost(m.dst)  # the source is found at its next call

    driver.hook = hook
    result = run_and_check(driver, pool)
    assert fired and len(result.lost_instances) == 2


def test_instances_lost_and_drained_at_different_stages():
    driver, pool = fleet(instances=4, drains={3: 1.0})
    faults = {"first": "source", "middle": "destination"}
    fired: dict = {}

    def hook(now, _pool):
        for m in driver.migrations:
            for stage, role in faults.items():
                victim = m.src if role == "source" else m.dst
                if stage not in fired and at_stage(m, stage) and victim not in pool.dead and victim != 3:
                    fired[stage] = victim
                    pool.dead.add(victim)
                    return

    driver.hook = hook
    result = run_and_check(driver, pool)
    assert len(fired) == 2 and sorted(result.lost_instances) == sorted(fired.values())


@pytest.mark.parametrize("fault", ["dies", "drains"])
def test_every_instance_gone_rejects_what_is_left_with_a_reason(fault):
    driver, pool = fleet()
    fired: list = []

    def hook(now, _pool):
        if not fired and any(m.record is not None for m in driver.migrations):
            fired.append(now)
            for i in range(len(pool)):
                if fault == "drains":
                    driver.drains[i] = now
                else:
                    pool.dead.add(i)

    driver.hook = hook
    result = run_and_check(driver, pool)
    assert fired
    left = result.rejected_by_reason["no instance left"] + result.rejected_by_reason["earlier turn rejected"]
    assert result.rejected_by_reason["no instance left"] > 0 and left == result.log.rejected.sum()
    if fault == "drains":  # running requests finish where they are; nothing new is taken
        assert driver.draining.all() and not result.lost_instances and result.served.sum() > 0
    else:
        assert sorted(result.lost_instances) == [0, 1, 2]
        assert np.isnan(result.kv_utilization).all()


def test_instances_lost_one_after_another_until_none_is_left():
    driver, pool = fleet()
    losses: list = []

    def hook(now, _pool):
        for m in driver.migrations:
            victim = m.dst if len(losses) % 2 else m.src
            if victim not in pool.dead and (not losses or now > losses[-1] + 0.3):
                losses.append(now)
                pool.dead.add(victim)
                return
        if losses and len(pool.dead) < len(pool) and now > losses[-1] + 2.0:
            pool.dead.add(min(set(range(len(pool))) - pool.dead))
            losses.append(now)

    driver.hook = hook
    result = run_and_check(driver, pool)
    assert len(result.lost_instances) == 3
    assert result.rejected_by_reason["no instance left"] > 0


def test_a_global_queue_with_every_instance_draining_rejects_the_held_requests():
    driver, pool = fleet(dispatcher=Dispatcher("least_load", global_queue=True), drains={0: 0.3, 1: 0.3, 2: 0.3},
                         trace=conversations(num=24, seed=1))
    result = run_and_check(driver, pool)
    assert result.rejected_by_reason["no instance left"] > 0 and result.served.sum() > 0


# ---- the conservation check catches what can no longer end ----
def test_the_conservation_check_fails_when_a_request_can_no_longer_end():
    driver, pool = fleet()
    caught: dict = {}

    def expect_failure(name: str, message: str) -> None:
        with pytest.raises(AssertionError, match=message):
            driver.check_conservation()
        caught[name] = True

    def hook(now, _pool):
        landing = [m for m in driver.migrations if m.record is not None]
        if landing and "in flight" not in caught:
            m = landing[0]
            driver.migrations.remove(m)  # its last stage will never land
            expect_failure("in flight", "in flight with no migration to land them")
            driver.migrations.append(m)
            driver.ended[m.index] = True  # its reservation would outlive it
            expect_failure("ended", "of an ended request")
            driver.ended[m.index] = False
        copying = [m for m in driver.migrations if m.record is None]
        if copying and "source" not in caught:
            m = copying[0]
            driver.location[m.index] = (m.src + 1) % len(pool)  # not where its migration copies from
            expect_failure("source", "not where it says")
            driver.location[m.index] = m.src
        on_instance = np.flatnonzero(driver.location >= 0)
        if on_instance.size and "queued" not in caught:
            i = int(on_instance[0])
            at = int(driver.location[i])
            driver.location[i] = -1
            driver.retry.append(i)
            driver.draining[:] = True  # queued, and no instance left to take it
            expect_failure("queued", "no live instance left")
            driver.draining[:] = False
            driver.retry.append(i)
            expect_failure("queued twice", "queued for dispatch twice")
            driver.retry = driver.retry[:-2]
            driver.location[i] = at
            driver.alive[at] = False
            expect_failure("lost instance", "on a lost instance")
            driver.alive[at] = True
            driver.location[i] = IN_FLIGHT
            expect_failure("stranded", "in flight with no migration")
            driver.location[i] = at
        ended = np.flatnonzero(driver.ended & ~driver.rejected)
        if ended.size and "twice" not in caught:
            driver.times_ended[ended[0]] += 1
            expect_failure("twice", "ended more than once")
            driver.times_ended[ended[0]] -= 1
        driver.check_conservation()  # restored

    driver.hook = hook
    run_and_check(driver, pool)
    assert set(caught) == {"in flight", "ended", "source", "queued", "queued twice", "lost instance", "stranded",
                           "twice"}


def test_reject_reasons_are_reported():
    driver, pool = fleet()
    result = run_and_check(driver, pool)
    assert set(result.rejected_by_reason) == set(REJECT_REASONS)
    assert result.summary()["rejected_by_reason"] == result.rejected_by_reason
