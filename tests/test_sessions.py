"""Sessions in the simulator: multi-turn conversations, closed-loop clients, priorities per session."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kvsched.cli import main
from kvsched.sim.driver import simulate
from kvsched.sim.engine import LAX, EngineConfig, prepare
from kvsched.sim.metrics import summarize
from kvsched.sim.profiles import PROFILES
from kvsched.sim.sweep import MAX_RATE_SCALE, max_rate_scale
from kvsched.sim.traces import Trace
from kvsched.sim.workloads import closed_loop, multi_turn_chat, priority_plan, synthetic

A100 = PROFILES["llama3-8b-a100"]


def run(trace, admission, capacity, priorities=None, **kw):
    engine = EngineConfig(A100, capacity, **kw)
    prepared = prepare(trace, engine)
    plan = None if priorities is None else priority_plan(prepared.trace, priorities, seed=3)
    return prepared, simulate(prepared, engine, admission, priorities=plan)


def test_a_turn_extends_its_parent_conversation():
    trace = multi_turn_chat(80, 1.0, think_time_s=5.0, seed=1)
    parent = trace.parent_index
    follows = np.flatnonzero(parent >= 0)
    assert follows.size > 80  # more than one turn per conversation on average
    assert np.all(parent[follows] < follows)
    assert np.array_equal(trace.session_ids[follows], trace.session_ids[parent[follows]])
    grown = trace.prompt_tokens[follows] - trace.prompt_tokens[parent[follows]] - trace.output_tokens[parent[follows]]
    assert grown.min() >= 1  # the new user message
    assert np.all(trace.think_s[follows] >= 0) and np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.shared_context


def test_followers_arrive_think_time_after_their_parent_finishes():
    trace = multi_turn_chat(60, 1.0, think_time_s=3.0, seed=2)
    prepared, log = run(trace, "past_future", 32768)
    t = prepared.trace
    follows = np.flatnonzero(t.parent_index >= 0)
    parents = t.parent_index[follows]
    np.testing.assert_allclose(log.arrival_s[follows], log.finish_s[parents] + t.think_s[follows])
    assert (~np.isnan(log.finish_s)).sum() + log.rejected.sum() == len(t)
    assert np.all(log.first_token_s[follows] > log.finish_s[parents])


def test_later_turns_reuse_the_conversation_kv():
    trace = multi_turn_chat(60, 1.0, think_time_s=1.0, seed=3)
    _, shared = run(trace, "past_future", 400_000)
    unshared = replace(trace, shared_context=False)
    _, alone = run(unshared, "past_future", 400_000)
    follows = trace.parent_index >= 0
    reusable = (trace.prompt_tokens[follows] - trace.prompt_tokens[follows] % 16).sum()
    # With ample memory nearly every follower finds its conversation so far in the cache.
    assert shared.prefix_hit_tokens > 0.8 * (trace.prompt_tokens[follows].sum() - trace.output_tokens.max())
    assert shared.prefix_hit_tokens <= reusable
    assert alone.prefix_hit_tokens == 0
    assert shared.computed_tokens < alone.computed_tokens - 0.8 * shared.prefix_hit_tokens


def test_a_rejected_turn_ends_its_conversation():
    trace = multi_turn_chat(40, 1.0, think_time_s=1.0, seed=4)
    engine = EngineConfig(A100, 65536, max_model_len=1500)
    prepared = prepare(trace, engine)
    assert prepared.rejected_too_long > 0
    kept = prepared.trace
    # Only prompts within the context are kept (select() refuses a follower without its parent).
    assert np.all(kept.prompt_tokens < 1500)
    log = simulate(prepared, engine, "past_future")
    record = summarize(log, LAX)
    assert record["num_requests"] == len(trace) and record["completed"] + record["rejected"] == len(trace)


def test_closed_loop_clients_keep_at_most_one_request_each_in_flight():
    base = synthetic("chat", 120, 5.0, seed=5)
    trace = closed_loop(base, num_clients=8, think_time_s=0.5, seed=1)
    assert np.array_equal(np.sort(trace.prompt_tokens), np.sort(base.prompt_tokens))
    prepared, log = run(trace, "aggressive", 65536)
    t = prepared.trace
    assert (~np.isnan(log.finish_s)).all()
    follows = np.flatnonzero(t.parent_index >= 0)
    np.testing.assert_allclose(log.arrival_s[follows], log.finish_s[t.parent_index[follows]] + t.think_s[follows])
    # At any arrival, at most 8 requests are in the system.
    for now in log.arrival_s:
        in_flight = (log.arrival_s <= now) & (log.finish_s > now)
        assert in_flight.sum() <= 8
    with pytest.raises(ValueError, match="num_clients"):
        closed_loop(base, 0)


def test_more_clients_offer_more_load():
    base = synthetic("chat", 200, 5.0, seed=6)
    few = summarize(run(closed_loop(base, 4, 1.0), "past_future", 65536)[1], LAX)
    many = summarize(run(closed_loop(base, 32, 1.0), "past_future", 65536)[1], LAX)
    assert many["throughput_tok_s"] > 2 * few["throughput_tok_s"]
    assert many["ttft_p50_s"] >= few["ttft_p50_s"]


def test_priorities_belong_to_sessions():
    trace = multi_turn_chat(50, 1.0, think_time_s=2.0, seed=7)
    plan = priority_plan(trace, "markov", seed=1)
    sessions = np.unique(trace.session_ids).size
    assert plan.initial.size == sessions and plan.change_index.max() < sessions
    prepared, log = run(trace, "past_future", 16384, priorities="random", preemption="swap")
    assert (~np.isnan(log.finish_s)).sum() + log.rejected.sum() == len(prepared.trace)
    assert log.preemptions.sum() > 0


def test_select_keeps_sessions_closed():
    trace = multi_turn_chat(10, 1.0, seed=8)
    head = trace.head(12)
    assert np.all(head.parent_index < np.arange(12))
    follower = int(np.flatnonzero(trace.parent_index >= 0)[0])
    with pytest.raises(ValueError, match="parent is not selected"):
        trace.select(np.array([follower]))
    with pytest.raises(ValueError, match="earlier request"):
        Trace(np.zeros(2), np.ones(2, np.int64), np.ones(2, np.int64), session_ids=np.zeros(2, np.int64),
              parent_index=np.array([1, -1]), think_s=np.zeros(2))


def test_find_max_rate_with_priorities():
    trace = synthetic("chat", 120, 4.0, seed=9)
    engine = EngineConfig(A100, 32768)
    plain = max_rate_scale(trace, engine, "past_future", LAX, iterations=2)
    with_priorities = max_rate_scale(trace, engine, "past_future", LAX, iterations=2, priorities="markov", seed=1)
    assert plain > 0 and with_priorities > 0


def test_cli_multi_turn_and_clients(capsys):
    assert main(["simulate", "--workload", "multi_turn", "--num-requests", "150", "--admission", "past_future"]) == 0
    out = capsys.readouterr().out
    assert "multi_turn" in out and "GPU hit" in out
    assert main(["simulate", "--num-requests", "100", "--clients", "16", "--admission", "aggressive"]) == 0
    assert "closed loop: 16 clients" in capsys.readouterr().out
    for argv, message in (
        (["--clients", "4", "--find-max-rate"], "--clients sets the load"),
        (["--clients", "4", "--workload", "multi_turn"], "without sessions"),
    ):
        assert main(["simulate", "--num-requests", "50", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_find_max_rate_reports_the_top_of_the_sweep_when_every_rate_meets_the_slo():
    trace = synthetic("chat", 12, 1.0, seed=10)
    engine = EngineConfig(A100, 400_000)
    assert max_rate_scale(trace, engine, "past_future", LAX, iterations=1) == MAX_RATE_SCALE


def test_a_rate_and_a_rate_scale_of_the_same_load_give_the_same_multi_turn_requests():
    # --num-requests keeps whole conversations in start order, whatever the rate: --rate 3 and
    # --rate 1.5 --rate-scale 2 replay the same requests at the same nominal times.
    fast = multi_turn_chat(200, 3.0, think_time_s=10.0, seed=5, max_requests=300)
    slow = multi_turn_chat(200, 1.5, think_time_s=10.0, seed=5, max_requests=300)
    assert len(fast) == len(slow) == 300
    key = lambda t: sorted(zip(t.session_ids.tolist(), t.prompt_tokens.tolist(), t.output_tokens.tolist()))  # noqa: E731
    assert key(fast) == key(slow)
    first_turn = lambda t: np.sort(t.arrival_s[t.parent_index < 0])  # noqa: E731
    assert np.allclose(first_turn(fast), first_turn(slow) / 2)
