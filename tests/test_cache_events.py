"""The prefix cache's event log (Scheduler.pop_cache_events): what an engine publishes to routers.

Replaying the log in order (stored adds a key, removed drops it, cleared drops all) must give exactly
the keys the cache can match (cached_block_keys), after every step, under memory pressure with shared
prefixes, chunked prefill, preemption, aborts and resets. Stored events name the request and the
index of its block, so an engine can translate them into its own block hashes.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvsched
from kvsched import CacheEvents

from scheduler_driver import FakeEngine

BLOCK = 4


def key_set(keys: np.ndarray) -> set[tuple[int, int]]:
    return {(int(lo), int(hi)) for lo, hi in keys.tolist()}


class Replay:
    """A router's index of the cache: the keys stored and not removed since the last clear."""

    def __init__(self) -> None:
        self.keys: set[tuple[int, int]] = set()
        self.stored: list[tuple[int, int, tuple[int, int]]] = []  # (req, block index, key)

    def apply(self, events: CacheEvents) -> None:
        for kind, req, index, key in zip(events.kinds.tolist(), events.req_ids.tolist(),
                                         events.block_indices.tolist(), events.keys.tolist()):
            key = tuple(key)
            if kind == CacheEvents.STORED:
                assert key not in self.keys, f"key {key} stored twice without a removal"
                assert req >= 0 and index >= 0
                self.keys.add(key)
                self.stored.append((req, index, key))
            elif kind == CacheEvents.REMOVED:
                assert key in self.keys, f"key {key} removed but never stored"
                assert req == index == -1
                self.keys.remove(key)
            else:
                assert kind == CacheEvents.CLEARED and key == (0, 0)
                self.keys.clear()


def scheduler(**options) -> kvsched.Scheduler:
    config = dict(num_blocks=24, block_size=BLOCK, max_num_batched_tokens=32, max_num_seqs=8,
                  max_prefill_chunk=12, track_cache_events=True)
    config.update(options)
    return kvsched.Scheduler(**config)


def test_off_by_default_and_refused_when_off():
    s = kvsched.Scheduler(num_blocks=8, block_size=BLOCK)
    assert s.config.track_cache_events is False
    with pytest.raises(ValueError, match="track_cache_events"):
        s.pop_cache_events()
    s.add_request(0, 9, 2, prompt_tokens=np.arange(9))
    s.schedule()
    assert key_set(s.cached_block_keys()) == key_set(s.block_keys(np.arange(9)))  # readable either way


def test_option_must_be_a_bool():
    with pytest.raises(TypeError, match="track_cache_events"):
        kvsched.Scheduler(num_blocks=8, track_cache_events=1)


def test_stored_events_name_each_prompt_block_as_its_chunk_is_scheduled():
    s = scheduler()
    prompt = np.arange(100, 130)  # 7 full blocks and 2 tokens; chunks of 12 tokens (3 blocks)
    s.add_request(7, prompt.size, 3, prompt_tokens=prompt)
    keys = s.block_keys(prompt)
    seen = []
    while len(seen) < 7:
        plan = s.schedule()
        events = s.pop_cache_events()
        assert set(events.kinds.tolist()) <= {CacheEvents.STORED}
        seen += list(zip(events.req_ids.tolist(), events.block_indices.tolist(), map(tuple, events.keys.tolist())))
        end = int(plan.computed_offsets[0] + plan.num_tokens[0])
        assert len(seen) == min(end // BLOCK, 7)  # a block is stored once the step computing it is planned
        s.update(plan.req_ids, plan.samples.astype(np.int64), None)
    assert seen == [(7, b, tuple(keys[b].tolist())) for b in range(7)]
    assert len(s.pop_cache_events()) == 0  # popped: the log is empty
    assert repr(CacheEvents({"kinds": np.array([0, 0, 1, 2], np.int8), "req_ids": np.zeros(4, np.int64),
                             "block_indices": np.zeros(4, np.int64), "keys": np.zeros((4, 2), np.uint64)})) \
        == "CacheEvents(2 stored, 1 removed, 1 cleared)"


def test_a_block_cached_already_is_not_stored_again():
    s = scheduler()
    shared = np.arange(16)  # four blocks
    for req, tail in enumerate((np.arange(50, 57), np.arange(60, 66))):
        s.add_request(req, 16 + tail.size, 2, prompt_tokens=np.concatenate([shared, tail]))
    replay = Replay()
    engine = FakeEngine(s)
    engine.prompt = {0: 23, 1: 22}
    engine.true_len = {0: 2, 1: 2}
    engine.generated = {0: 0, 1: 0}
    while s.has_unfinished_requests():
        engine.step()
        replay.apply(s.pop_cache_events())
        assert replay.keys == key_set(s.cached_block_keys())
    keys = [s.block_keys(np.concatenate([shared, tail])) for tail in (np.arange(50, 57), np.arange(60, 66))]
    distinct = key_set(keys[0]) | key_set(keys[1])
    assert len(distinct) == 6  # four shared blocks and each request's fifth
    # Each key stored once, whichever request computed its block first.
    assert sorted(key for _, _, key in replay.stored) == sorted(distinct)
    assert {(req, index) for req, index, _ in replay.stored} >= {(0, 4), (1, 4)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replaying_the_log_gives_the_cache_contents_after_every_step(seed):
    rng = np.random.default_rng(seed)
    s = scheduler(num_blocks=16, admission="aggressive")  # aggressive: preempts under pressure
    engine = FakeEngine(s)
    documents = [rng.integers(0, 1000, int(rng.integers(2, 6)) * BLOCK) for _ in range(4)]
    replay = Replay()
    prompts = {}
    next_id, evicted, cleared = 0, 0, 0
    for step in range(400):
        if next_id < 60 and rng.random() < 0.5:
            prompt = np.concatenate([documents[int(rng.integers(0, 4))], rng.integers(0, 1000, int(rng.integers(1, 9)))])
            engine.add(next_id, prompt.size, int(rng.integers(1, 40)), prompt_tokens=prompt)
            prompts[next_id] = prompt
            next_id += 1
        if s.has_unfinished_requests():
            engine.step()
        if step % 97 == 96:  # a live request aborted between steps; its full blocks stay cached
            live = s.running_ids()
            if live.size:
                s.abort(live[:1])
        if step == 250:
            s.preempt_running()
            s.reset_prefix_cache()
        events = s.pop_cache_events()
        evicted += int(np.sum(events.kinds == CacheEvents.REMOVED))
        cleared += int(np.sum(events.kinds == CacheEvents.CLEARED))
        replay.apply(events)
        assert replay.keys == key_set(s.cached_block_keys()), f"step {step}"
    assert evicted > 0 and cleared == 1 and engine.preemptions > 0
    # Every stored key is the key of that request's block, as block_keys computes it.
    for req, index, key in replay.stored:
        assert key == tuple(s.block_keys(prompts[req])[index].tolist())
    assert len(replay.stored) > 20


def test_reset_logs_one_clear_and_the_cache_is_empty():
    s = scheduler()
    s.add_request(0, 12, 1, prompt_tokens=np.arange(12))
    plan = s.schedule()
    s.update(plan.req_ids, np.ones(1, np.int64), None)
    assert s.reset_prefix_cache() == 3
    events = s.pop_cache_events()
    assert events.kinds.tolist() == [CacheEvents.STORED] * 3 + [CacheEvents.CLEARED]
    assert s.cached_block_keys().shape == (0, 2)
    assert s.reset_prefix_cache() == 0
    assert s.pop_cache_events().kinds.tolist() == [CacheEvents.CLEARED]  # a reset always says so


def test_no_keys_no_events():
    s = scheduler()
    s.add_request(0, 20, 2)  # no prompt tokens or keys: nothing is cached
    plan = s.schedule()
    s.update(plan.req_ids, plan.samples.astype(np.int64), None)
    assert len(s.pop_cache_events()) == 0 and s.cached_block_keys().shape == (0, 2)
    s2 = scheduler(enable_prefix_caching=False)
    s2.add_request(0, 20, 2, prompt_tokens=np.arange(20))
    s2.schedule()
    assert len(s2.pop_cache_events()) == 0
