"""Bad input to the Scheduler: a clear error naming the argument, and nothing changed."""

from __future__ import annotations

import numpy as np
import pytest

import kvsched


def observable(s: kvsched.Scheduler) -> tuple:
    stats = s.stats()
    stats.pop("kv")
    ids = sorted(s.running_ids().tolist() + s.waiting_ids().tolist())
    infos = tuple((i, tuple(sorted(s.info(i).items())), tuple(s.block_table(i).tolist())) for i in ids)
    return tuple(sorted(stats.items())), infos, s._former.allocator_stats()["num_free"]


@pytest.fixture
def scheduler() -> kvsched.Scheduler:
    s = kvsched.Scheduler(num_blocks=32, block_size=16, max_num_batched_tokens=128, max_num_seqs=16)
    s.add_requests([1, 2, 3], [40, 300, 20], [10, 10, 10], arrival_times=[0, 1, 2])
    plan = s.schedule()  # 1 runs whole, 2 is chunked
    s.update(plan.req_ids, np.where(plan.req_ids == 2, 0, 1), np.zeros(len(plan), bool))
    return s


ADD_CASES = [
    (dict(req_ids=[1], prompt_lens=[5], max_new_tokens=[5]), ValueError, "req_ids.*already exists"),
    (dict(req_ids=[9, 9], prompt_lens=[5, 5], max_new_tokens=[5, 5]), ValueError, "duplicate"),
    (dict(req_ids=[-1], prompt_lens=[5], max_new_tokens=[5]), ValueError, "req_ids"),
    (dict(req_ids=[9], prompt_lens=[0], max_new_tokens=[5]), ValueError, "prompt_lens"),
    (dict(req_ids=[9], prompt_lens=[5], max_new_tokens=[-2]), ValueError, "max_new_tokens"),
    (dict(req_ids=[9, 10], prompt_lens=[5], max_new_tokens=[5, 5]), ValueError, "prompt_lens"),
    (dict(req_ids=[9], prompt_lens=[5.5], max_new_tokens=[5]), TypeError, "prompt_lens"),
    (dict(req_ids=[9], prompt_lens=[5], max_new_tokens=[5], arrival_times=[np.nan]), ValueError, "arrival_times"),
    (dict(req_ids=[9], prompt_lens=[5], max_new_tokens=[5], class_ids=[-1]), ValueError, "class_ids"),
    (dict(req_ids=[9], prompt_lens=[5], max_new_tokens=[5], client_ids=[-3]), ValueError, "client_ids"),
    (dict(req_ids=[9], prompt_lens=[5], max_new_tokens=[5], true_output_lens=[0]), ValueError, "true_output_lens"),
    (dict(req_ids=[[9]], prompt_lens=[5], max_new_tokens=[5]), ValueError, "req_ids"),
]


@pytest.mark.parametrize("kwargs, error, match", ADD_CASES)
def test_add_requests_rejects_bad_input_without_change(scheduler, kwargs, error, match):
    before = observable(scheduler)
    with pytest.raises(error, match=match):
        scheduler.add_requests(**kwargs)
    assert observable(scheduler) == before


def test_abort_unknown_or_duplicate_changes_nothing(scheduler):
    before = observable(scheduler)
    with pytest.raises(KeyError, match="req_ids\\[1\\]: unknown request id 77"):
        scheduler.abort([3, 77])
    with pytest.raises(ValueError, match="duplicate"):
        scheduler.abort([3, 3])
    assert observable(scheduler) == before


def test_update_rejects_mismatched_reports_without_change(scheduler):
    plan = scheduler.schedule()
    ids = plan.req_ids
    ones = np.ones(len(plan), np.int64)
    chunked = ids == 2
    tokens_ok = np.where(chunked, 0, 1)
    no = np.zeros(len(plan), bool)
    before = observable(scheduler)
    cases = [
        ((ids[:-1], tokens_ok[:-1], no[:-1]), ValueError, "req_ids has"),
        ((np.append(ids[:-1], 99), tokens_ok, no), KeyError, "unknown request id 99"),
        ((np.append(ids[:-1], ids[0]), tokens_ok, no), ValueError, "duplicate"),
        ((ids, ones, no), ValueError, "num_new_tokens.*does not reach its end"),
        ((ids, np.where(chunked, 0, 2), no), ValueError, "between 1 and 1"),
        ((ids, np.where(chunked, 0, -1), no), ValueError, "num_new_tokens"),
        ((ids, tokens_ok[:-1], no), ValueError, "num_new_tokens must have the same length"),
        ((ids, tokens_ok, chunked), ValueError, "cannot finish"),
        ((ids, tokens_ok.astype(float), no), TypeError, "num_new_tokens"),
        ((ids, tokens_ok, np.full(len(plan), 2)), ValueError, "finished"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            scheduler.update(*args)
        assert observable(scheduler) == before
    scheduler.update(ids, tokens_ok, no)  # the right report still goes through
    scheduler.check_invariants()


def test_schedule_twice_without_update_is_an_error(scheduler):
    scheduler.schedule()
    with pytest.raises(ValueError, match="update"):
        scheduler.schedule()


def test_update_without_a_plan_is_an_error():
    s = kvsched.Scheduler(num_blocks=8)
    with pytest.raises(ValueError, match="no outstanding plan"):
        s.update([], [], [])


def test_lookahead_stays_within_max_new_tokens():
    s = kvsched.Scheduler(num_blocks=8, num_lookahead_tokens=4)
    s.add_request(0, 10, 2)
    plan = s.schedule()
    s.update(plan.req_ids, [1], [False])
    plan = s.schedule()
    assert plan.num_tokens.tolist() == [1]  # one token left: no speculative slots
    with pytest.raises(ValueError, match="between 1 and 1"):
        s.update(plan.req_ids, [2], [False])
    assert s.update(plan.req_ids, [1], [False]).tolist() == [0]  # finished at max_new_tokens


def test_bad_config_names_the_option():
    with pytest.raises(ValueError, match="num_blocks is required"):
        kvsched.Scheduler()
    with pytest.raises(ValueError, match="max_num_seqs"):
        kvsched.Scheduler(num_blocks=8, max_num_seqs=0)
    with pytest.raises(ValueError, match="admission"):
        kvsched.Scheduler(num_blocks=8, admission="greedy")
    with pytest.raises(ValueError, match="policy"):
        kvsched.Scheduler(num_blocks=8, policy="lottery")
    with pytest.raises(ValueError, match="quantile"):
        kvsched.Scheduler(num_blocks=8, quantile=1.5)
    with pytest.raises(ValueError, match="watermark_blocks"):
        kvsched.Scheduler(num_blocks=8, watermark_blocks=8)


def test_set_priority_unknown_id_changes_nothing():
    s = kvsched.Scheduler(num_blocks=8, policy="priority")
    s.add_requests([0, 1], [5, 5], [5, 5], priorities=[1, 2])
    with pytest.raises(KeyError, match="unknown request id 5"):
        s.set_priority([0, 5], [9, 9])
    assert s.info(0)["key"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        s.set_priority([0, 1], [1])


def test_safety_quantile_options_are_refused_with_sampled_draws_where_they_would_not_act():
    for name, value in (("target_preemption_rate", 0.05), ("quantile", 0.8), ("adaptive", True),
                        ("adapt_gain", 0.5), ("min_quantile", 0.2), ("max_quantile", 0.99)):
        with pytest.raises(ValueError, match=name):
            kvsched.Scheduler(num_blocks=8, **{name: value})  # sampling=True by default
        with pytest.raises(ValueError, match=name):
            kvsched.PeakEstimator(sampling=True, **{name: value})
        kvsched.Scheduler(num_blocks=8, sampling=False, **{name: value})  # quantile mode: they act
    kvsched.Scheduler(num_blocks=8, adaptive=False)  # says what sampling does anyway
    estimator = kvsched.PeakEstimator(sampling=False, target_preemption_rate=0.5, adapt_gain=1.0)
    before = estimator.quantile
    estimator.observe(0, 10)  # admissions without preemptions relax the quantile toward the target
    assert estimator.quantile < before


@pytest.mark.parametrize("keywords, named", [
    ({"num_blokcs": 64}, "'num_blokcs' (did you mean 'num_blocks'?)"),
    ({"num_blocks": 64, "admision": "aggressive"}, "'admision' (did you mean 'admission'?)"),
    ({"num_blocks": 64, "zzzz": 1}, "'zzzz';"),
])
def test_an_unknown_scheduler_keyword_is_named_not_mistaken_for_a_missing_one(keywords, named):
    with pytest.raises(TypeError, match="unknown keyword argument") as error:
        kvsched.Scheduler(**keywords)
    assert named in str(error.value)
    # With a config too: the misspelt override is named, not silently dropped or a dataclass error.
    with pytest.raises(TypeError, match="unknown keyword argument"):
        kvsched.Scheduler(kvsched.SchedulerConfig(num_blocks=64), **{k: v for k, v in keywords.items()
                                                                     if k != "num_blocks"})


def test_help_of_the_scheduler_lists_every_keyword_with_a_line():
    import dataclasses
    import pydoc

    text = pydoc.render_doc(kvsched.Scheduler, renderer=pydoc.plaintext)
    lines = [line.strip(" |") for line in text.splitlines()]  # help() draws a class's text behind " |  "
    for field in dataclasses.fields(kvsched.SchedulerConfig):
        at = next((i for i, line in enumerate(lines) if line.startswith(f"{field.name} :")), None)
        assert at is not None, f"{field.name} is not listed in help(kvsched.Scheduler)"
        assert lines[at + 1], f"{field.name} has no line saying what it is"
