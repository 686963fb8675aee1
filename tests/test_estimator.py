"""PeakEstimator: exact peak, conditional quantiles, history windows, admission."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvsched
from kvsched import PeakEstimator, future_peak


def brute_force_peak(held, remaining, block_size=0):
    """Step the set forward token by token; a request holds held + t tokens while t <= remaining."""
    held, remaining = np.asarray(held, np.int64), np.asarray(remaining, np.int64)
    if held.size == 0:
        return 0
    best = 0
    for t in range(int(remaining.max()) + 1):
        alive = remaining >= t
        tokens = held[alive] + t
        used = -(-tokens // block_size) if block_size else tokens
        best = max(best, int(used.sum()))
    return best


def test_peak_matches_brute_force_on_thousands_of_random_sets(rng):
    for case in range(3000):
        n = int(rng.integers(0, 12))
        held = rng.integers(0, 40, size=n)
        # Many ties and zero-remaining requests.
        remaining = rng.integers(0, 6, size=n) * int(rng.integers(1, 5))
        block = int(rng.choice([0, 1, 4, 16]))
        assert future_peak(held, remaining, block) == brute_force_peak(held, remaining, block), (held, remaining, block)


def formula_peak(held, remaining, block_size=0):
    """The peak formula straight from its definition: at the completion of each request j, the
    requests still alive (remaining >= b_j) each hold their held tokens plus b_j."""
    held, remaining = np.asarray(held, np.int64), np.asarray(remaining, np.int64)
    best = 0
    for b in remaining:
        tokens = held[remaining >= b] + b
        best = max(best, int((-(-tokens // block_size) if block_size else tokens).sum()))
    return best


@pytest.mark.parametrize("bits", [3, 12, 23, 40])
def test_peak_matches_the_formula_for_wide_remaining_values(rng, bits):
    # Wide values take the sort through several radix passes; ties stay frequent.
    for _ in range(200):
        n = int(rng.integers(0, 60))
        held = rng.integers(0, 5000, size=n)
        remaining = rng.integers(0, 2**bits, size=n)
        remaining[rng.random(n) < 0.3] = remaining[0] if n else 0
        for block in (0, 16, 5, 100):
            assert future_peak(held, remaining, block) == formula_peak(held, remaining, block), (held, remaining, block)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 60)), max_size=20),
    st.sampled_from([0, 1, 3, 16]),
)
def test_peak_property(pairs, block):
    held = [p[0] for p in pairs]
    remaining = [p[1] for p in pairs]
    assert future_peak(held, remaining, block) == brute_force_peak(held, remaining, block)


def test_conditional_quantiles_match_numpy(rng):
    for _ in range(200):
        window = rng.integers(1, 500, size=int(rng.integers(1, 300)))
        e = PeakEstimator(window=1000, quantile=float(rng.uniform(0.5, 0.99)), adaptive=False)
        e.record(window)
        generated = rng.integers(0, 520, size=50)
        max_new = np.full(50, 10_000)
        got = e.predict_remaining(generated, max_new)
        for g, r in zip(generated, got):
            longer = window[window > g]
            if longer.size == 0:
                assert r == 10_000 - g  # fallback: max_new_tokens
            else:
                expected = np.quantile(longer, e.quantile, method="inverted_cdf")
                assert r == expected - g


def test_prediction_is_capped_by_max_new_tokens():
    e = PeakEstimator(adaptive=False, quantile=0.9)
    e.record([1000] * 10)
    assert e.predict_remaining([0, 10], [50, 1000]).tolist() == [50, 990]


def test_window_evicts_oldest_first():
    e = PeakEstimator(window=3, quantile=0.5, adaptive=False)
    e.record([100, 200, 300])
    e.record([10])  # evicts 100: window {200, 300, 10}
    assert e.history_size() == 3
    # Lengths > 150: {200, 300}; median (inverted CDF) is 200.
    assert e.predict_remaining([150], [10_000]).tolist() == [50]
    e.record([20, 30])  # evicts 200 and 300
    assert e.predict_remaining([150], [10_000]).tolist() == [10_000 - 150]


def test_prior_fills_the_window_until_real_lengths_arrive():
    e = PeakEstimator(window=2, quantile=0.5, adaptive=False, prior=[500, 500])
    assert e.predict_remaining([0], [10_000]).tolist() == [500]
    e.record([40, 40])
    assert e.predict_remaining([0], [10_000]).tolist() == [40]


def test_per_class_histories_are_isolated():
    e = PeakEstimator(quantile=0.5, adaptive=False)
    e.record([10] * 20, class_ids=[1] * 20)
    e.record([1000] * 20, class_ids=[2] * 20)
    got = e.predict_remaining([0, 0], [5000, 5000], class_ids=[1, 2])
    assert got.tolist() == [10, 1000]
    assert e.history_size(1) == 20 and e.history_size(2) == 20 and e.history_size() == 40
    # A class with no history of its own uses the pooled one.
    assert e.predict_remaining([0], [5000], class_ids=[7]).tolist()[0] in (10, 1000)


def test_sampling_draws_from_the_conditional_history():
    e = PeakEstimator(sampling=True, seed=5, adaptive=False)
    e.record(np.arange(1, 101))
    draws = e.predict_remaining(np.full(4000, 60), np.full(4000, 1000))
    assert set(np.unique(draws + 60)) == set(range(61, 101))  # every length > 60, nothing else


def test_keyed_draws_hold_across_calls_and_follow_the_conditional_history():
    e = PeakEstimator(sampling=True, seed=5, adaptive=False)
    e.record(np.arange(1, 101))
    ids = np.arange(4000)
    generated, cap = np.full(4000, 60), np.full(4000, 1000)
    first = e.predict_remaining(generated, cap, ids=ids)
    # The same requests keep their draws; unkeyed draws change from call to call.
    assert np.array_equal(first, e.predict_remaining(generated, cap, ids=ids))
    assert not np.array_equal(e.predict_remaining(generated, cap), e.predict_remaining(generated, cap))
    # Across requests they still cover L | L > 60 evenly (40 lengths, 100 draws each expected).
    counts = np.bincount(first + 60, minlength=101)[61:]
    assert counts.min() > 50 and counts.max() < 160
    assert set(np.unique(first + 60)) == set(range(61, 101))
    # A request keeps its place in the distribution as it generates: its predicted total never
    # falls when its generated count rises.
    later = e.predict_remaining(np.full(4000, 80), cap, ids=ids)
    assert np.all(later + 80 >= first + 60)
    # Another seed draws differently; keyed_draws=False ignores the ids.
    other = PeakEstimator(sampling=True, seed=6, adaptive=False)
    other.record(np.arange(1, 101))
    assert not np.array_equal(first, other.predict_remaining(generated, cap, ids=ids))
    unkeyed = PeakEstimator(sampling=True, seed=5, adaptive=False, keyed_draws=False)
    unkeyed.record(np.arange(1, 101))
    assert not np.array_equal(unkeyed.predict_remaining(generated, cap, ids=ids),
                              unkeyed.predict_remaining(generated, cap, ids=ids))


def test_keyed_admission_is_repeatable():
    rng = np.random.default_rng(3)
    e = PeakEstimator(sampling=True, num_scenarios=3, adaptive=False, block_size=16)
    e.record(rng.integers(1, 400, size=1000))
    args = dict(
        running_held=rng.integers(100, 900, size=200), running_generated=rng.integers(0, 300, size=200),
        running_max_new_tokens=np.full(200, 1000), candidate_prompt=rng.integers(100, 900, size=40),
        candidate_max_new_tokens=np.full(40, 1000), running_ids=np.arange(200), candidate_ids=np.arange(200, 240),
    )
    results = {e.admit(7000, **args) for _ in range(20)}
    assert len(results) == 1 and 0 < results.pop() < 40
    unkeyed = {e.admit(7000, **{k: v for k, v in args.items() if not k.endswith("_ids")}) for _ in range(50)}
    assert len(unkeyed) > 1  # fresh draws: the answer varies from call to call


def _loaded_admission_args(rng):
    return dict(
        running_held=rng.integers(100, 900, size=200), running_generated=rng.integers(0, 300, size=200),
        running_max_new_tokens=np.full(200, 1000), candidate_prompt=rng.integers(100, 900, size=40),
        candidate_max_new_tokens=np.full(40, 1000), running_ids=np.arange(200), candidate_ids=np.arange(200, 240),
    )


def test_overflow_scenarios_take_the_prefix_that_fits_all_scenarios_but_that_many():
    rng = np.random.default_rng(3)
    history = rng.integers(1, 400, size=1000)
    args = _loaded_admission_args(rng)

    def admitted(num_scenarios, overflow_scenarios=0):
        e = PeakEstimator(sampling=True, num_scenarios=num_scenarios, overflow_scenarios=overflow_scenarios,
                          block_size=16)
        e.record(history)
        return e.admit(7000, **args)

    by_risk = [admitted(5, m) for m in range(5)]
    assert by_risk[0] == admitted(5)  # 0: every scenario must fit, as before
    assert by_risk == sorted(by_risk) and by_risk[0] < by_risk[-1]  # more risk, more admitted
    # Scenario 0 alone (its draws are the same in any estimator with this seed) lies between the
    # smallest and the largest of the five scenarios' answers.
    assert by_risk[0] <= admitted(1) <= by_risk[-1]
    # Prefixes of a 5-scenario answer: with 4 may overflow, the best scenario decides; scenarios 0-1
    # of 2 are scenarios 0-1 of 5, so the larger of those two is at most the 5-scenario maximum.
    assert admitted(2, 1) <= by_risk[-1] and admitted(2, 0) >= by_risk[0]


def test_overflow_scenarios_is_refused_where_it_cannot_act():
    with pytest.raises(ValueError, match="overflow_scenarios"):
        PeakEstimator(sampling=False, overflow_scenarios=1)
    with pytest.raises(ValueError, match=r"overflow_scenarios must be in \[0, num_scenarios\)"):
        PeakEstimator(sampling=True, num_scenarios=3, overflow_scenarios=3)
    with pytest.raises(ValueError, match="overflow_scenarios must be in"):
        PeakEstimator(sampling=True, num_scenarios=3, overflow_scenarios=-1)
    with pytest.raises(TypeError, match="overflow_scenarios"):
        PeakEstimator(sampling=True, num_scenarios=3, overflow_scenarios=1.5)
    for options in (dict(admission="aggressive"), dict(sampling=False)):
        with pytest.raises(ValueError, match="overflow_scenarios"):
            kvsched.Scheduler(num_blocks=64, block_size=16, overflow_scenarios=1, **options)
    with pytest.raises(ValueError, match="overflow_scenarios must be in"):
        kvsched.Scheduler(num_blocks=64, block_size=16, num_scenarios=2, overflow_scenarios=2)


def test_modes_never_let_non_oracle_modes_see_true_lengths():
    e = PeakEstimator(adaptive=False)
    e.record([50] * 10)
    kwargs = dict(generated=[0, 0], max_new_tokens=[500, 500])
    truth = [5, 400]
    for mode in ("aggressive", "conservative", "past_future"):
        assert np.array_equal(
            e.predict_remaining(**kwargs, lengths=truth, mode=mode), e.predict_remaining(**kwargs, mode=mode)
        )
    assert e.predict_remaining(**kwargs, lengths=truth, mode="oracle").tolist() == truth
    assert e.predict_remaining(**kwargs, mode="aggressive").tolist() == [0, 0]
    assert e.predict_remaining(**kwargs, mode="conservative").tolist() == [500, 500]


def _random_admission(rng, e, mode, capacity, max_running=30):
    n, k = int(rng.integers(0, max_running)), int(rng.integers(0, 20))
    generated = rng.integers(0, 100, size=n)
    truth_running = generated + rng.integers(1, 200, size=n)
    args = dict(
        running_held=rng.integers(10, 300, size=n) + generated,
        running_generated=generated,
        running_max_new_tokens=np.maximum(truth_running, 250),
        running_lengths=truth_running,
        candidate_prompt=rng.integers(10, 300, size=k),
        candidate_max_new_tokens=np.full(k, 250),
        candidate_lengths=rng.integers(1, 250, size=k),
    )
    return args, e.admit(capacity, mode=mode, **args)


@pytest.mark.parametrize("block_size", [0, 16, 5, 100])
def test_admission_is_a_fitting_prefix_and_oracle_never_exceeds_capacity(rng, block_size):
    e = PeakEstimator(adaptive=False, block_size=block_size)
    e.record(rng.integers(1, 250, size=500))
    for _ in range(400):
        mode = str(rng.choice(["aggressive", "conservative", "past_future", "oracle"]))
        # Some running sets span many segments of the admission profile.
        scale = 10 if rng.random() < 0.3 else 1
        capacity = int(rng.integers(500, 8000)) * scale // max(block_size, 1) + 1
        args, admitted = _random_admission(rng, e, mode, capacity, max_running=30 * scale)
        k = len(args["candidate_prompt"])
        assert 0 <= admitted <= k
        remaining_running = e.predict_remaining(
            args["running_generated"], args["running_max_new_tokens"], lengths=args["running_lengths"], mode=mode
        )
        remaining_cand = e.predict_remaining(
            np.zeros(k, np.int64), args["candidate_max_new_tokens"], lengths=args["candidate_lengths"], mode=mode
        )

        def peak(prefix):
            return future_peak(
                np.concatenate([args["running_held"], args["candidate_prompt"][:prefix]]),
                np.concatenate([remaining_running, remaining_cand[:prefix]]),
                block_size,
            )

        # Maximal: the admitted prefix fits and one more does not (unless none are left).
        if admitted > 0 or peak(0) <= capacity:
            assert peak(admitted) <= capacity
        if admitted < k and peak(0) <= capacity:
            assert peak(admitted + 1) > capacity
        # Monotone: any shorter prefix fits too.
        for prefix in range(admitted):
            assert peak(prefix) <= capacity
        if mode == "oracle" and admitted:
            true_peak = future_peak(
                np.concatenate([args["running_held"], args["candidate_prompt"][:admitted]]),
                np.concatenate(
                    [args["running_lengths"] - args["running_generated"], args["candidate_lengths"][:admitted]]
                ),
                block_size,
            )
            assert true_peak <= capacity


def test_reserve_and_blocks():
    e = PeakEstimator(block_size=16, adaptive=False)
    common = dict(
        running_held=[], running_generated=[], running_max_new_tokens=[],
        candidate_prompt=[17, 17, 17], candidate_max_new_tokens=[0, 0, 0], mode="conservative",
    )
    assert e.admit(6, **common) == 3  # 2 blocks each
    assert e.admit(6, reserve=1, **common) == 2


def test_adaptive_quantile_rises_on_preemptions_and_relaxes_while_quiet():
    e = PeakEstimator(quantile=0.9, target_preemption_rate=0.01)
    start = e.quantile
    e.observe(preempted=5, admitted=0)
    raised = e.quantile
    assert raised > start
    for _ in range(200):
        e.observe(preempted=0, admitted=10)
    assert e.quantile < raised
    for _ in range(10_000):
        e.observe(preempted=0, admitted=100)
    assert e.quantile == pytest.approx(0.5)  # clamped at min_quantile
    fixed = PeakEstimator(adaptive=False)
    fixed.observe(100, 0)
    assert fixed.quantile == pytest.approx(0.9)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda e: e.record([-1]), ValueError, r"lengths\[0\] must be in \[0, "),
        (lambda e: e.record([1, 2], class_ids=[0]), ValueError, "same length"),
        (lambda e: e.record([1.5]), TypeError, "lengths must have an integer dtype"),
        (lambda e: e.predict_remaining([1, 2], [5]), ValueError, "max_new_tokens has 1 entries, generated has 2"),
        (lambda e: e.predict_remaining([-1], [5]), ValueError, r"generated\[0\] must be >= 0"),
        (lambda e: e.predict_remaining([1], [5], mode="magic"), ValueError, "mode must be one of"),
        (lambda e: e.predict_remaining([1], [5], mode="oracle"), ValueError, "lengths is required"),
        (lambda e: e.admit(0, running_held=[], running_generated=[], running_max_new_tokens=[],
                           candidate_prompt=[1], candidate_max_new_tokens=[1]), ValueError, "capacity must be > 0"),
        (lambda e: e.admit(10, reserve=11, running_held=[], running_generated=[], running_max_new_tokens=[],
                           candidate_prompt=[1], candidate_max_new_tokens=[1]), ValueError, "reserve must be in"),
        (lambda e: e.admit(10, running_held=[1], running_generated=[1, 2], running_max_new_tokens=[1],
                           candidate_prompt=[1], candidate_max_new_tokens=[1]), ValueError, "running_generated has 2"),
        (lambda e: e.admit(10, running_held=[1], running_generated=[1], running_max_new_tokens=[1],
                           candidate_prompt=[-3], candidate_max_new_tokens=[1]), ValueError, r"candidate_prompt\[0\]"),
        (lambda e: e.admit(10, running_held=[1], running_generated=[1], running_max_new_tokens=[1],
                           running_ids=[1, 2], candidate_prompt=[1], candidate_max_new_tokens=[1]),
         ValueError, "running_ids has 2 entries, running_held has 1"),
        (lambda e: e.predict_remaining([1], [5], ids=[1.5]), TypeError, "ids must have an integer dtype"),
        (lambda e: e.observe(-1, 0), ValueError, "preempted must be >= 0"),
        (lambda e: future_peak([1], [1, 2]), ValueError, "same length"),
    ],
)
def test_bad_input(call, error, message):
    e = PeakEstimator()
    e.record([5, 6])
    with pytest.raises(error, match=message):
        call(e)
    assert e.history_size() == 2


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(quantile=float("nan")), "quantile must be in"),
        (dict(quantile=1.0), "quantile must be in"),
        (dict(window=0), r"window must be in \[1, "),
        (dict(min_quantile=0.0), "quantile bounds"),
        (dict(target_preemption_rate=float("nan")), "target_preemption_rate"),
        (dict(num_scenarios=0), "num_scenarios"),
        (dict(block_size=-1), "block_size"),
        (dict(prior=[-5]), r"prior lengths must be in \[0, "),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PeakEstimator(**kwargs)


def test_exported_from_package():
    assert kvsched.PeakEstimator is PeakEstimator


def test_scheduler_admits_more_as_it_takes_more_overflow_risk():
    prior = np.random.default_rng(0).integers(1, 400, size=500)
    admitted = []
    for risk in range(5):
        s = kvsched.Scheduler(num_blocks=120, block_size=16, num_scenarios=5, overflow_scenarios=risk, prior=prior)
        s.add_requests(np.arange(60), 100, 400)
        admitted.append(s.schedule().num_admitted)
    assert admitted == sorted(admitted) and admitted[0] < admitted[-1]
