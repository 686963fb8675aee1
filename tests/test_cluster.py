"""kvsched.cluster: the native migration API, dispatch, and fleets simulated in process."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvsched
from kvsched import _core
from kvsched.cli import main
from kvsched.cluster import DISPATCH_POLICIES, Dispatcher, InstanceLoads, MigrationPolicy
from kvsched.cluster.instance import InstanceLost, LocalPool
from kvsched.sim.driver import FleetSpec, Driver, simulate, simulate_fleet
from kvsched.sim.engine import EngineConfig, EngineInstance, prepare
from kvsched.sim.profiles import PROFILES
from kvsched.sim.workloads import multi_turn_chat, synthetic

A100 = PROFILES["llama3-8b-a100"]


def decoding_source(prompt=40, steps=3, num_blocks=64):
    """A scheduler with request 7 decoding after `steps` steps."""
    source = kvsched.Scheduler(num_blocks=num_blocks, block_size=16)
    source.add_request(7, prompt, 50)
    for _ in range(steps):
        plan = source.schedule()
        source.update(plan.req_ids, np.ones(len(plan), np.int64))
    return source


def snapshot(s: kvsched.Scheduler) -> dict:
    stats = s.stats()
    return {"free": stats["kv"]["num_free"], "cached": stats["kv"]["num_cached"], "added": stats["added"],
            "running": s.running_ids().tolist(), "waiting": s.waiting_ids().tolist(), "incoming": stats["num_incoming"],
            "infos": {int(i): s.info(int(i)) for i in [*s.running_ids(), *s.waiting_ids()]}}


# ---- the native migration API ----
def test_a_migration_moves_a_decoding_request_and_it_decodes_on():
    source = decoding_source()
    info = source.info(7)
    assert info["num_computed"] == 42 and info["num_generated"] == 3
    dest = kvsched.Scheduler(num_blocks=64, block_size=16)
    table, cached = dest.reserve_incoming(7, 40, 50, 3, info["num_computed"])
    assert cached == 0 and table.size == 3  # 42 tokens in 16-token blocks
    assert dest.info(7)["state"] == "incoming" and dest.load()["num_incoming"] == 1
    dest.check_invariants()
    # One more decode on the source while the first stage copies, then the last stage.
    plan = source.schedule()
    source.update(plan.req_ids, [1])
    with pytest.raises(ValueError, match="num_tokens must be in"):  # the last token computes at the destination
        dest.extend_incoming(7, 44, 4)
    dest.extend_incoming(7, source.info(7)["num_computed"], source.info(7)["num_generated"])
    assert dest.info(7)["num_generated"] == 4  # admission there counts what it holds by now
    source.migrate_out([7])
    dest.commit_incoming(7, 4)
    source.check_invariants()
    dest.check_invariants()
    assert 7 not in source and source.stats()["migrated_out"] == 1 and source.stats()["aborted"] == 0
    assert dest.stats()["migrated_in"] == 1 and dest.info(7)["state"] == "running"
    plan = dest.schedule()  # the next decode: one token after the 43 copied
    assert plan.req_ids.tolist() == [7] and plan.num_tokens.tolist() == [1]
    assert plan.computed_offsets.tolist() == [43] and plan.num_generated.tolist() == [4]
    dest.update(plan.req_ids, [1])
    dest.check_invariants()


def test_a_reservation_that_does_not_fit_changes_nothing():
    dest = kvsched.Scheduler(num_blocks=8, block_size=16)
    dest.add_request(1, 100, 10)
    plan = dest.schedule()
    dest.update(plan.req_ids, [1])
    before = snapshot(dest)
    with pytest.raises(kvsched.OutOfBlocks):
        dest.reserve_incoming(7, 40, 20, 3, 42)
    assert snapshot(dest) == before and 7 not in dest
    table, _ = dest.reserve_incoming(7, 20, 20, 1, 16)
    with pytest.raises(kvsched.OutOfBlocks):
        dest.extend_incoming(7, 35, 19)
    assert dest.info(7)["num_computed"] == 16 and dest.block_table(7).tolist() == table.tolist()
    dest.cancel_incoming([7])
    assert snapshot(dest) == before
    dest.check_invariants()


def test_migration_calls_refuse_bad_input_naming_it_and_change_nothing():
    source = decoding_source()
    dest = kvsched.Scheduler(num_blocks=64, block_size=16)
    cases = [
        (lambda: dest.reserve_incoming(7, 40, 50, 3, 43), "num_tokens must be in"),  # the last token computes here
        (lambda: dest.reserve_incoming(7, 40, 50, 50, 42), "num_generated"),
        (lambda: dest.reserve_incoming(-1, 40, 50, 3, 42), "req_id"),
        (lambda: dest.reserve_incoming(7, 40, 2000, 3, 42), "KV capacity"),
        (lambda: dest.commit_incoming(7, 3), "unknown request"),
        (lambda: dest.cancel_incoming([7]), "unknown request"),
        (lambda: source.extend_incoming(7, 50, 12), "not incoming"),
        (lambda: source.cancel_incoming([7]), "not incoming"),
    ]
    before = snapshot(source), snapshot(dest)
    for call, message in cases:
        with pytest.raises((ValueError, KeyError), match=message):
            call()
    dest.reserve_incoming(7, 40, 50, 3, 42)
    with pytest.raises(ValueError, match="leave a token"):
        dest.commit_incoming(7, 2)
    dest.cancel_incoming([7])
    assert (snapshot(source), snapshot(dest)) == before
    source.add_request(8, 20, 5)  # waiting: only running requests migrate
    with pytest.raises(ValueError, match="only running requests migrate"):
        source.migrate_out([8])
    source.schedule()  # a plan outstanding: migrations happen between steps
    with pytest.raises(ValueError, match="a plan is outstanding"):
        source.migrate_out([7])
    with pytest.raises(ValueError, match="a plan is outstanding"):
        source.reserve_incoming(9, 40, 50, 3, 42)


def test_a_migrated_prefix_is_shared_at_the_destination_only_once_it_arrived():
    tokens = np.arange(64, dtype=np.int32)
    dest = kvsched.Scheduler(num_blocks=64, block_size=16)
    keys = dest.block_keys(tokens)
    dest.add_request(1, 64, 4, block_keys=keys[:2])  # the destination holds the first 32 tokens
    plan = dest.schedule()
    dest.update(plan.req_ids, [1], [True])
    _, cached = dest.reserve_incoming(7, 60, 10, 2, 61, block_keys=keys[:3])
    assert cached == 32  # the copy skips the blocks found here
    dest.add_request(2, 64, 4, block_keys=keys)  # the third block is reserved, not filled: no hit yet
    plan = dest.schedule()
    assert plan.computed_offsets.tolist() == [32]
    dest.update(plan.req_ids, [1], [True])
    dest.commit_incoming(7, 2)
    dest.add_request(3, 64, 4, block_keys=keys)
    plan = dest.schedule()
    assert dict(zip(plan.req_ids.tolist(), plan.computed_offsets.tolist()))[3] == 48
    dest.check_invariants()


def test_admission_leaves_room_for_an_incoming_request():
    dest = kvsched.Scheduler(num_blocks=10, block_size=16, admission="conservative")
    dest.reserve_incoming(7, 60, 40, 1, 60)  # 7 blocks at its end (100 tokens)
    dest.add_request(1, 40, 40)  # 5 blocks at its end, after the incoming one's: 12 > 10 together
    assert dest.schedule().req_ids.tolist() == []
    assert dest.load()["peak_blocks"] == 7
    alone = kvsched.Scheduler(num_blocks=10, block_size=16, admission="conservative")
    alone.add_request(1, 40, 40)
    assert alone.schedule().req_ids.tolist() == [1]


def test_load_report_and_migration_candidate():
    s = kvsched.Scheduler(num_blocks=64, block_size=16, admission="conservative")
    s.add_requests([1, 2, 3], [100, 20, 30], [50, 50, 50])
    plan = s.schedule()
    s.update(plan.req_ids, np.ones(len(plan), np.int64))
    report = s.load()
    assert report["num_running"] == 3 and report["running_tokens"] == 153 and report["queued_tokens"] == 0
    # Conservative: every request at its max_new_tokens, in blocks.
    assert report["peak_blocks"] == sum(-(-(p + 50) // 16) for p in (100, 20, 30)) == report["demand_blocks"]
    assert s.migration_candidate() == 2  # the least KV
    assert s.migration_candidate([2]) == 3 and s.migration_candidate([1, 2, 3]) is None
    assert s.prefix_hits([np.zeros((0, 2), np.uint64)]).tolist() == [0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["step", "add", "start", "stage", "finish", "abort", "cancel"]),
                          st.integers(0, 1), st.integers(1, 200)), max_size=60))
def test_random_migrations_between_two_schedulers_lose_nothing(actions):
    """Any interleaving of steps, arrivals and migration stages (either way, aborted or not) keeps
    both schedulers consistent, and every request added is on exactly one of them or ended."""
    pair = [kvsched.Scheduler(num_blocks=24, block_size=16, max_num_seqs=8) for _ in range(2)]
    added, ended, next_id = set(), set(), 0
    moving: dict = {}  # request -> (source, destination)
    for action, side, size in actions:
        s, other = pair[side], pair[1 - side]
        if action == "add":
            s.add_request(next_id, size, 1 + size % 40)
            added.add(next_id)
            next_id += 1
        elif action == "step":
            plan = s.schedule()
            ended.update(plan.rejected_ids.tolist())
            done = s.update(plan.req_ids, plan.samples.astype(np.int64), np.zeros(len(plan), bool))
            ended.update(done.tolist())
            for r in done.tolist():
                if r in moving:
                    pair[moving.pop(r)[1]].cancel_incoming([r])
        elif action == "start":
            r = s.migration_candidate(list(moving))
            if r is not None:
                info = s.info(r)
                try:
                    other.reserve_incoming(r, info["prompt_len"], info["max_new_tokens"], info["num_generated"],
                                           info["num_computed"])
                    moving[r] = (side, 1 - side)
                except kvsched.OutOfBlocks:
                    pass
        elif moving:
            r = sorted(moving)[size % len(moving)]
            src, dst = (pair[i] for i in moving[r])
            info = src.info(r)
            if action == "cancel" or info["state"] != "running":
                dst.cancel_incoming([r])
                del moving[r]
            elif action == "abort":
                src.abort([r])
                dst.cancel_incoming([r])
                del moving[r]
                ended.add(r)
            elif action in ("stage", "finish"):
                try:
                    dst.extend_incoming(r, info["num_computed"], info["num_generated"])
                except kvsched.OutOfBlocks:
                    dst.cancel_incoming([r])
                    del moving[r]
                    continue
                if action == "finish":
                    src.migrate_out([r])
                    dst.commit_incoming(r, info["num_generated"])
                    del moving[r]
        for each in pair:
            each.check_invariants()
        live = [set(each.running_ids().tolist()) | set(each.waiting_ids().tolist()) for each in pair]
        assert not live[0] & live[1]
        assert live[0] | live[1] | ended == added


# ---- dispatch ----
def loads(available=(1, 1, 1), load=(0, 0, 0), headroom=(10, 10, 10), capacity=(100, 100, 100)):
    return InstanceLoads(np.array(available, bool), np.array(load), np.array(headroom), np.zeros(3, np.int64),
                         np.array(capacity), 16)


def test_each_dispatch_policy_places_by_its_measure():
    tokens, blocks = np.full(4, 100), np.full(4, 10)
    assert Dispatcher("round_robin").place(loads(available=(1, 0, 1)), tokens, blocks).tolist() == [0, 2, 0, 2]
    # Each placement adds to the load the next one sees.
    assert Dispatcher("least_load").place(loads(load=(0, 150, 60)), tokens, blocks).tolist() == [0, 2, 0, 1]
    assert Dispatcher("headroom").place(loads(headroom=(5, 30, 20)), tokens, blocks).tolist() == [1, 2, 1, 2]
    hits = np.array([[0, 3, 0]] * 4)
    affinity = Dispatcher("prefix_affinity", imbalance_limit=0.02).place(
        loads(capacity=(625, 625, 625)), tokens, blocks, hits)  # 10000 tokens each
    assert affinity.tolist() == [1, 1, 1, 0]  # the cached one until it is 200+ tokens (2%) more loaded
    assert Dispatcher("prefix_affinity").place(loads(), tokens, blocks, np.zeros((4, 3), np.int64)).tolist() == [0, 1, 2, 0]


def test_least_load_weighs_load_by_capacity_in_an_unequal_fleet():
    # Instance 0 holds four times the KV of the others and four times their tokens: an equal share
    # (ties to the lower index). It then takes three of the next five, holding by far the most tokens;
    # by tokens alone it would get nothing until the small ones had 400 too.
    tokens, blocks = np.full(6, 100), np.full(6, 10)
    unequal = loads(load=(400, 100, 100), capacity=(400, 100, 100))
    assert Dispatcher("least_load").place(unequal, tokens, blocks).tolist() == [0, 1, 2, 0, 0, 0]
    hits = np.array([[5, 0, 0]] * 6)  # its cache too: it keeps it while its share stays within the limit
    affinity = Dispatcher("prefix_affinity", imbalance_limit=0.1).place(unequal, tokens, blocks, hits)
    assert affinity.tolist()[:3] == [0, 0, 0]


def test_an_unequal_fleet_loads_each_instance_by_its_capacity():
    small, large = 16384, 65536
    engine = EngineConfig(A100, small)  # the smallest: every request fits wherever it goes
    prepared = prepare(synthetic("chat", 300, 4 * 5.0, seed=4), engine)
    fleet = FleetSpec(3, "least_load", kv_capacity_tokens=(large, small, small))
    result = simulate_fleet(prepared, engine, "past_future", fleet, check_every_round=True)
    assert np.isfinite(result.log.finish_s).all()  # every request finished
    assert result.served[0] > 1.5 * max(result.served[1:])  # the large instance takes the most
    with pytest.raises(ValueError, match="kv_capacity_tokens: 2 capacities for 3 instances"):
        FleetSpec(3, "least_load", kv_capacity_tokens=(large, small))
    with pytest.raises(ValueError, match=r"kv_capacity_tokens\[1\]"):
        FleetSpec(2, "least_load", kv_capacity_tokens=(large, 0))


def test_the_global_queue_holds_what_fits_nowhere_first_come_first_served():
    tokens, blocks = np.full(4, 100), np.array([5, 30, 5, 5])
    held = Dispatcher("headroom", global_queue=True).place(loads(load=(10, 10, 10), headroom=(12, 6, 8)), tokens,
                                                           blocks)
    assert held.tolist() == [0, -1, -1, -1]  # the second fits nowhere; the ones behind it wait too
    idle = Dispatcher("least_load", global_queue=True).place(loads(load=(10, 0, 10), headroom=(0, 0, 0)), tokens,
                                                             blocks)
    assert idle.tolist() == [1, -1, -1, -1]  # an instance with nothing live takes anything


def test_a_fleet_with_a_global_queue_serves_everything_and_preempts_less():
    trace = synthetic("chat", 600, 4 * 9.0, seed=2)  # above what 4 instances serve
    engine = EngineConfig(A100, 65536)
    prepared = prepare(trace, engine)
    queued = simulate_fleet(prepared, engine, "aggressive", FleetSpec(4, "least_load", global_queue=True),
                            check_every_round=True)
    plain = simulate_fleet(prepared, engine, "aggressive", FleetSpec(4, "least_load"))
    assert (~np.isnan(queued.log.finish_s)).sum() + queued.log.rejected.sum() == len(prepared.trace)
    assert queued.log.preemptions.sum() < plain.log.preemptions.sum()
    assert FleetSpec(4, "headroom", MigrationPolicy(), global_queue=True).label == "headroom+queue+migration"


def test_dispatch_refuses_bad_input_naming_it():
    with pytest.raises(ValueError, match="dispatch policy must be one of"):
        Dispatcher("random")
    with pytest.raises(ValueError, match="imbalance_limit"):
        Dispatcher("least_load", imbalance_limit=-1)
    with pytest.raises(ValueError, match="available: no instance"):
        Dispatcher("least_load").place(loads(available=(0, 0, 0)), np.ones(1, np.int64), np.ones(1, np.int64))
    with pytest.raises(ValueError, match="prefix_hits"):
        Dispatcher("prefix_affinity").place(loads(), np.ones(1, np.int64), np.ones(1, np.int64))
    with pytest.raises(ValueError, match="request_blocks has 2 entries and request_tokens 1"):
        i = np.ones(3, np.int64)
        _core.dispatch(1, np.ones(3, bool), i, i, i, i[:1], i[:2], None, 0.1, 0)
    with pytest.raises(TypeError, match="load_tokens must have an integer dtype"):
        _core.dispatch(1, np.ones(3, bool), np.zeros(3), i, i, i[:1], i[:1], None, 0.1, 0)


def test_migration_triggers_read_what_moving_a_running_request_changes():
    policy = MigrationPolicy(rebalance_gap=0.5)
    waiting, running, draining = np.array([40, 5, 0]), np.array([1, 5, 3]), np.zeros(3, bool)
    # Instance 0: a long queue whose own predicted demand exceeds its KV, but its one running request
    # leaves room for the next: moving that request away would not admit the queue any sooner.
    few = InstanceLoads(np.ones(3, bool), np.zeros(3), np.array([-5000, 100, 800]), np.array([100, 900, 200]),
                        np.full(3, 1000), 16, head_blocks=np.array([150, 150, 0]))
    assert policy.reasons(few, waiting, running, draining) == [None, "queue", None]  # 900 + 150 > 1000
    assert policy.pick(few, waiting, running, draining, np.zeros(3, np.int64)) == [(1, 2, "queue")]
    assert policy.reasons(few, waiting, running, np.array([False, False, True]))[2] == "drain"


# ---- fleets in process ----
def test_one_instance_fleet_is_the_single_engine():
    trace = synthetic("chat", 300, 7.0, seed=1)
    engine = EngineConfig(A100, 65536)
    prepared = prepare(trace, engine)
    single = simulate(prepared, engine, "past_future")
    for dispatch in DISPATCH_POLICIES:
        fleet = simulate_fleet(prepared, engine, "past_future", FleetSpec(1, dispatch)).log
        for name in ("first_token_s", "finish_s", "max_gap_s", "preemptions"):
            assert np.array_equal(getattr(single, name), getattr(fleet, name), equal_nan=True), (dispatch, name)


def sessions(conversations=60, rate=6.0, seed=3):
    trace = multi_turn_chat(conversations, rate, 2.0, seed=seed)
    engine = EngineConfig(A100, 24576)
    return prepare(trace, engine), engine


def test_a_fleet_with_migration_and_a_drain_loses_nothing():
    prepared, engine = sessions()
    policy = MigrationPolicy(check_interval_s=0.02, rebalance_gap=0.1)
    result = simulate_fleet(prepared, engine, "past_future", FleetSpec(3, "headroom", policy), drains={2: 20.0},
                            check_every_round=True)
    log = result.log
    done = ~np.isnan(log.finish_s)
    assert done.sum() + log.rejected.sum() == len(prepared.trace)
    assert result.migration["committed"] > 0 and result.migration["by_reason"]["drain"] > 0
    assert result.migration["bytes"] > 0 and result.migration["downtime_p50_ms"] > 0
    # Every request's measurements carried over: first token before finish, gaps counted.
    assert np.all(log.first_token_s[done] <= log.finish_s[done])
    assert np.all(log.num_gaps[done] == np.maximum(log.output_tokens[done] - 1, 0))


def test_migration_moves_requests_off_an_instance_that_would_preempt():
    prepared, engine = sessions(conversations=120, rate=12.0)
    spec = FleetSpec(2, "round_robin")
    without = simulate_fleet(prepared, engine, "aggressive", spec)
    with_migration = simulate_fleet(prepared, engine, "aggressive", FleetSpec(2, "round_robin", MigrationPolicy()))
    assert with_migration.migration["committed"] > 0
    assert with_migration.load_spread < without.load_spread


class FailingPool(LocalPool):
    """Instance `victim` stops answering once the fleet's time passes `at_s`."""

    def __init__(self, instances, victim, at_s):
        super().__init__(instances)
        self.victim, self.at_s, self.failed = victim, at_s, False

    def call(self, index, method, *args):
        if index == self.victim and (self.failed or self.instances[index].clock > self.at_s):
            self.failed = True
            raise InstanceLost(index, "injected")
        return super().call(index, method, *args)

    def call_many(self, calls):
        out = []
        for i, method, args in calls:
            try:
                out.append(self.call(i, method, *args))
            except InstanceLost as lost:
                out.append(lost)
        return out


def test_a_lost_instance_requests_are_dispatched_again():
    prepared, engine = sessions()
    pool = FailingPool([EngineInstance(prepared, engine, "past_future") for _ in range(3)], victim=1, at_s=15.0)
    driver = Driver(prepared, engine, pool, admission="past_future", dispatcher=Dispatcher("least_load"),
                    migration=MigrationPolicy(), check_every_round=True)
    driver.run()
    result = driver.result("least_load", "past_future least_load+migration")
    assert result.lost_instances == [1] and result.retried > 0
    log = result.log
    assert (~np.isnan(log.finish_s)).sum() + log.rejected.sum() == len(prepared.trace)


# ---- the CLI ----
def test_simulate_a_fleet_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "fleet.json"
    per_request = tmp_path / "fleet.csv"
    argv = ["simulate", "--instances", "2", "--dispatch", "least_load,headroom", "--migration", "both",
            "--num-requests", "240", "--seeds", "1", "--json", str(out), "--per-request", str(per_request)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "fleet: 2 instances" in text and "migration over rdma" in text
    for name in ("past_future least_load", "past_future headroom+migration"):
        assert name in text
    records = json.loads(out.read_text())
    assert [r["run"] for r in records] == ["past_future least_load", "past_future least_load+migration",
                                           "past_future headroom", "past_future headroom+migration"]
    assert all(r["completed"] + r["rejected"] == 240 for r in records)
    assert records[1]["fleet"]["migration"]["started"] >= records[1]["fleet"]["migration"]["committed"]
    assert per_request.read_text().splitlines()[0].startswith("run,admission,seed")


@pytest.mark.parametrize("argv, message", [
    (["--dispatch", "least_load"], "--dispatch: only a fleet"),
    (["--migration", "on"], "--migration: only a fleet"),
    (["--instances", "2", "--link", "tcp"], "--link: only live migration uses the link"),
    (["--instances", "2", "--dispatch", "headroom", "--imbalance-limit", "0.2"], "--imbalance-limit: only"),
    (["--instances", "2", "--dispatch", "nearest"], "unknown dispatch policy"),
])
def test_fleet_options_that_would_not_act_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) if "unknown" in message else contextlib.nullcontext():
        assert main(["simulate", "--num-requests", "50", *argv]) == 2
    assert message in capsys.readouterr().err


def test_seeds_without_a_migration_to_time_aggregate_with_the_others():
    from kvsched.sim.metrics import aggregate

    records = [{"seed": 0, "fleet": {"downtime_ms": None, "committed": 0}},
               {"seed": 1, "fleet": {"downtime_ms": 0.05, "committed": 2}}]
    merged = aggregate(records)["fleet"]
    assert merged["downtime_ms"] == 0.05 and merged["committed"] == 1.0


def _decoding(scheduler, count, prompt, max_new):
    scheduler.add_requests(np.arange(count), np.full(count, prompt), np.full(count, max_new))
    plan = scheduler.schedule()
    scheduler.update(plan.req_ids, np.ones(len(plan), np.int64))
    return scheduler


HEAVY_TAIL = np.random.default_rng(0).lognormal(6, 1.2, 1000).astype(np.int64) + 1


def test_load_reports_the_peak_admission_acts_on():
    """The head of the queue adds to the reported peak exactly what admitting it would add."""
    s = kvsched.Scheduler(num_blocks=600, block_size=16, admission="past_future", sampling=False, adaptive=False)
    s.record_output_lengths(HEAVY_TAIL)
    report = _decoding(s, 40, 64, 20000).load()
    assert report["num_waiting"] > 0 and report["num_running"] > 0
    est = kvsched.PeakEstimator(window=1000, block_size=16, sampling=False, adaptive=False)
    est.record(HEAVY_TAIL)
    ids = np.concatenate([s.running_ids(), s.waiting_ids()[:1]])
    info = [s.info(int(i)) for i in ids]
    generated = np.array([r["num_generated"] for r in info])
    held = np.array([max(r["num_computed"], r["prompt_len"]) for r in info])
    remaining = est.predict_remaining(generated, np.full(ids.size, 20000), ids=ids)
    running = report["num_running"]
    assert report["peak_blocks"] == kvsched.future_peak(held[:running], remaining[:running], 16)
    assert report["head_blocks"] == kvsched.future_peak(held, remaining, 16) - report["peak_blocks"]


def test_sampled_load_takes_the_largest_peak_over_the_scenarios():
    """With sampling, the reported peak is the largest over the scenarios (what an admission that
    must fit every one acts on), not one draw: a dispatcher choosing the most room would otherwise
    pick the instance with the luckiest draws."""
    peaks = {}
    for scenarios in (1, 5):
        s = kvsched.Scheduler(num_blocks=4096, block_size=16, admission="past_future", num_scenarios=scenarios, seed=3)
        s.record_output_lengths(HEAVY_TAIL)
        peaks[scenarios] = _decoding(s, 12, 64, 20000).load()["peak_blocks"]
    assert peaks[5] > peaks[1] > 0  # scenario 0 is common to both (draws keyed by request)


def test_record_output_lengths_teaches_the_estimator_and_refuses_bad_input_whole():
    s = kvsched.Scheduler(num_blocks=4096, block_size=16, admission="past_future", sampling=False, adaptive=False)
    s.add_requests([1], [64], [30000])
    plan = s.schedule()
    s.update(plan.req_ids, np.ones(len(plan), np.int64))
    cold = s.load()["peak_blocks"]  # no history: max_new_tokens
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        s.record_output_lengths([100, -1])
    assert s.load()["peak_blocks"] == cold  # nothing recorded
    with pytest.raises(ValueError, match="class_ids"):
        s.record_output_lengths([100, 200], [0])
    s.record_output_lengths([100] * 50, np.zeros(50, np.int32))
    assert s.load()["peak_blocks"] == -(-(65 + 99) // 16) < cold  # learned: 100 tokens in all


def test_a_declared_class_prices_dispatch_and_shared_history_reaches_every_instance():
    """The reasoning workload declares each request's class; the dispatcher prices a new request by
    its class's recent outputs; with shared_history every instance's estimator learns every finish."""
    trace = synthetic("reasoning", 60, 2.0, seed=1)
    assert trace.class_ids is not None and set(np.unique(trace.class_ids)) == {0, 1}
    deep = trace.output_tokens[trace.class_ids == 1].mean()
    assert deep > 2 * trace.output_tokens[trace.class_ids == 0].mean()
    assert np.array_equal(trace.select(np.array([3, 1])).class_ids, trace.class_ids[[3, 1]])
    engine = EngineConfig(A100, 131072, max_new_tokens=32768, max_model_len=40960)
    prepared = prepare(trace, engine)
    for shared in (False, True):
        fleet = FleetSpec(2, "headroom", shared_history=shared)
        pool = LocalPool([EngineInstance(prepared, engine, "past_future") for _ in range(2)])
        learned = [[], []]
        for index, instance in enumerate(pool.instances):
            def learn(ids, index=index, original=instance.learn_outputs):
                learned[index].extend(ids.tolist())
                original(ids)
            instance.learn_outputs = learn
        driver = Driver(prepared, engine, pool, admission="past_future", routers=fleet.make_routers(),
                        shared_history=fleet.shared_history)
        driver.run()
        if shared:
            assert fleet.label == "headroom+shared"
            assert sorted(learned[0] + learned[1]) == list(range(60))  # each learned what the other finished
            assert len(learned[0]) == driver.served[1] and len(learned[1]) == driver.served[0]
        else:
            assert learned == [[], []]
        deep = np.flatnonzero(trace.class_ids == 1)[:1]
        assert driver._expected_outputs(deep)[0] == int(np.median(prepared.trace.output_tokens[trace.class_ids == 1]))


def test_shared_history_is_a_fleet_option_of_the_cli(capsys):
    assert main(["simulate", "--workload", "reasoning", "--num-requests", "24", "--instances", "2",
                 "--dispatch", "headroom", "--shared-history", "both", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "headroom+shared" in out and "+shared: every instance's estimator" in out
    assert main(["simulate", "--workload", "chat", "--num-requests", "24", "--shared-history", "on"]) != 0
    assert "--shared-history: only a fleet has it" in capsys.readouterr().err
