"""What kvsched's vLLM adapter publishes for routers, with the fake model runner: KV events (against
vLLM's own scheduler's) and the load gauges.

Both schedulers run the same request scripts (shared prefixes, a cache small enough that cached
blocks are evicted) with KV events on; what each publishes goes through msgpack and back with vLLM's
own KVEventBatch decoder, as a router receives it. kvsched's events must rebuild exactly the hashes
its cache holds, name only hashes vLLM's block hasher computes for that request's block, and store
the same set of prompt-block hashes as vLLM's scheduler does. The real engine with a ZMQ subscriber:
tests/test_vllm_real_engine_kv_events.py. The gauges (kvsched.adapters.vllm.metrics) must say what
the adapter's load() says, in Prometheus' exposition.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed")
import msgspec  # noqa: E402  (vLLM's dependency)
from vllm.config import KVEventsConfig  # noqa: E402
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_block_hash, maybe_convert_block_hash  # noqa: E402

from kvsched.adapters import vllm_harness as harness  # noqa: E402
from kvsched.adapters.vllm import versions  # noqa: E402

from kv_event_checks import check_stored_events, router_index, stored_hashes  # noqa: E402

BLOCK = 16


class Recorder:
    """A publisher that keeps every batch as a subscriber decodes it (msgpack there and back)."""

    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.batches: list[KVEventBatch] = []

    def publish(self, batch) -> None:
        self.batches.append(self.decoder.decode(self.encoder.encode(batch)))

    def shutdown(self) -> None:
        pass

    def get_publisher_config(self):
        return None

    def events(self) -> list:
        return [event for batch in self.batches for event in batch.events]


def script(n: int, seed: int, *, groups: int = 4, prefix_blocks: int = 3, max_out: int = 40) -> list[dict]:
    """Requests whose prompts start with one of `groups` prefixes of `prefix_blocks` blocks."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 30000) for _ in range(prefix_blocks * BLOCK)] for _ in range(groups)]
    requests = []
    for i in range(n):
        prompt = prefixes[i % groups] + [rng.randrange(100, 30000) for _ in range(rng.randint(1, 70))]
        requests.append(dict(req_id=f"r{i}", prompt=prompt, max_tokens=rng.randint(1, max_out),
                             true_len=rng.randint(1, max_out), arrival_time=float(i)))
    return requests


def make_request(r: dict, hasher):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=r["max_tokens"], extra_args=r.get("extra_args"))
    params.update_from_generation_config({}, eos_token_id=harness.EOS)
    return Request(r["req_id"], r["prompt"], params, None, arrival_time=r["arrival_time"], block_hasher=hasher)


def run(kind, requests, *, num_blocks, async_scheduling=False, on_step=None, log_stats=False, **config):
    cfg, kv = harness.make_vllm_config(num_blocks=num_blocks, block_size=BLOCK, max_model_len=1024,
                                       async_scheduling=async_scheduling, enable_prefix_caching=True, **config)
    cfg.kv_events_config = KVEventsConfig(enable_kv_cache_events=True, publisher="null")
    scheduler = harness.make_scheduler(kind, cfg, kv, log_stats=log_stats)
    recorder = Recorder()
    if kind == "kvsched":
        assert scheduler.kv_events is not None
        scheduler.kv_events.publisher = recorder
    else:
        scheduler.kv_event_publisher = recorder
    worker = harness.FakeWorker(BLOCK, num_blocks, {r["req_id"]: r["true_len"] for r in requests},
                                v2=versions.uses_v2_model_runner(cfg))
    engine = harness.FakeEngine(scheduler, worker, async_scheduling)
    hasher = harness.vllm_block_hasher(BLOCK)
    engine.requests = [make_request(r, hasher) for r in requests]
    for request in engine.requests:
        engine.add(request)
    engine.run(on_step=on_step)
    engine.recorder = recorder
    return engine


def prompt_hashes(engine) -> dict:
    """Every prompt block's vLLM hash -> (parent hash, tokens), from vLLM's block hasher."""
    blocks = {}
    for request in engine.requests:
        hashes = [maybe_convert_block_hash(h) for h in request.block_hashes]
        for b in range(len(request.prompt_token_ids) // BLOCK):
            blocks[hashes[b]] = (hashes[b - 1] if b else None, list(request.prompt_token_ids[b * BLOCK:(b + 1) * BLOCK]))
    return blocks


def cached_hashes(engine) -> set:
    """The hashes of the blocks kvsched's cache holds, mapped from its keys independently of the adapter."""
    core = engine.scheduler.core
    key_to_hash = {}
    for request in engine.requests:
        keys = core.block_keys(np.asarray(request.prompt_token_ids, np.int32))
        for key, block_hash in zip(keys.tolist(), request.block_hashes):
            key_to_hash[tuple(key)] = maybe_convert_block_hash(block_hash)
    return {key_to_hash[tuple(key)] for key in core.cached_block_keys().tolist()}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_events_rebuild_the_cache_and_store_what_vllm_stores(async_scheduling):
    requests = script(40, seed=5)
    ours = run("kvsched", requests, num_blocks=48, async_scheduling=async_scheduling, max_num_seqs=8,
               max_num_batched_tokens=128)
    theirs = run("vllm", requests, num_blocks=48, async_scheduling=async_scheduling, max_num_seqs=8,
                 max_num_batched_tokens=128)
    assert ours.tokens == theirs.tokens
    blocks = prompt_hashes(ours)
    our_events, their_events = ours.recorder.events(), theirs.recorder.events()
    assert check_stored_events(our_events, blocks, BLOCK) > 20
    ours_index = router_index(our_events)
    assert set(ours_index) == cached_hashes(ours)
    assert set(ours_index.values()) == {1}  # kvsched stores a hash once until it is removed
    assert sum(isinstance(e, BlockRemoved) for e in our_events) > 20  # the cache was under pressure
    # The same prompt blocks were stored: every prompt block of every request, by both.
    assert stored_hashes(our_events) == set(blocks) == stored_hashes(their_events) & set(blocks)
    # vLLM's own index (a check of the reading): its BlockPool's cached hashes.
    pool = theirs.scheduler.kv_cache_manager.block_pool
    assert set(router_index(their_events)) == {maybe_convert_block_hash(get_block_hash(key))
                                               for key in pool.cached_block_hash_to_block._cache}


def test_reset_prefix_cache_publishes_a_clear_at_once():
    published = []

    def on_step(engine):
        if engine.steps == 15:
            recorder = engine.scheduler.kv_events.publisher
            before = len(recorder.batches)
            assert engine.scheduler.reset_prefix_cache(reset_running_requests=True)
            published.extend(recorder.batches[before:])

    ours = run("kvsched", script(12, seed=2), num_blocks=64, max_num_seqs=8, max_num_batched_tokens=128,
               on_step=on_step)
    # In the reset call itself, not with the next step's batch.
    assert [type(e) for batch in published for e in batch.events] == [AllBlocksCleared]
    events = ours.recorder.events()
    assert set(router_index(events)) == cached_hashes(ours) != set()
    check_stored_events(events, prompt_hashes(ours), BLOCK)


def test_full_report_mode_re_reports_prefix_hits_like_vllm():
    prefix = script(1, seed=9)[0]["prompt"][: 3 * BLOCK]
    first, second = [dict(req_id=f"r{i}", prompt=prefix + [500 + i] * 5, max_tokens=3, true_len=3,
                          arrival_time=float(i), extra_args={"kv_cache_report_mode": "full"} if i else None)
                     for i in range(2)]
    reports = {}
    for kind in ("kvsched", "vllm"):
        engine = run(kind, [first], num_blocks=32)
        # It arrives after the first finished: its three prefix blocks are a hit.
        request = make_request(second, harness.vllm_block_hasher(BLOCK))
        engine.worker.true_lens[second["req_id"]] = second["true_len"]
        engine.add(request)
        engine.run()
        reports[kind] = [(e.parent_block_hash, tuple(e.block_hashes)) for e in engine.recorder.events()
                         if isinstance(e, BlockStored)]
    hit = tuple(maybe_convert_block_hash(h) for h in request.block_hashes[:3])
    assert (None, hit) in reports["kvsched"] and reports["kvsched"] == reports["vllm"]


def test_no_events_object_without_kv_events_config():
    cfg, kv = harness.make_vllm_config(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    scheduler = harness.make_scheduler("kvsched", cfg, kv)
    assert scheduler.kv_events is None and scheduler.get_kv_event_publisher_config() is None
    assert scheduler.core.config.track_cache_events is False


def test_load_gauges_say_what_load_says():
    from prometheus_client import REGISTRY, generate_latest

    checked = []

    def on_step(engine):
        if engine.steps in (5, 20):
            scheduler = engine.scheduler
            scheduler.load_gauges.update(force=True)
            load = scheduler.load()
            labels = {"model_name": scheduler.vllm_config.model_config.served_model_name, "engine": "0"}
            value = lambda name: REGISTRY.get_sample_value(f"kvsched:{name}", labels)  # noqa: E731
            assert value("kv_capacity_blocks") == load["capacity_blocks"] == 47
            assert value("kv_used_blocks") == load["used_blocks"] > 0
            assert value("kv_predicted_peak_blocks") == load["peak_blocks"]
            assert value("kv_predicted_demand_blocks") == load["demand_blocks"] >= load["peak_blocks"]
            assert value("kv_headroom_blocks") == load["capacity_blocks"] - load["demand_blocks"]
            assert value("kv_predicted_usage_perc") == pytest.approx(load["demand_blocks"] / 47)
            assert value("running_tokens") == load["running_tokens"] > 0
            assert value("queued_tokens") == load["queued_tokens"]
            assert value("kv_block_size") == BLOCK
            checked.append(load["demand_blocks"])

    run("kvsched", script(30, seed=6), num_blocks=48, max_num_seqs=8, max_num_batched_tokens=128, log_stats=True,
        on_step=on_step)
    assert len(checked) == 2
    assert b"# TYPE kvsched:kv_predicted_usage_perc gauge" in generate_latest(REGISTRY)


def test_no_load_gauges_with_stats_off():
    cfg, kv = harness.make_vllm_config(num_blocks=16, block_size=BLOCK)
    assert harness.make_scheduler("kvsched", cfg, kv, log_stats=False).load_gauges is None
