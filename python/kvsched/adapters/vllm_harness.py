"""Drive a vLLM scheduler on CPU without a model: for kvsched's tests and benchmarks, and for checking
an adapter against vLLM's own scheduler on the same request script.

``make_vllm_config`` writes a tiny Llama config.json (no weights, no tokenizer) and builds the
configs vLLM's engine core would hand a scheduler. ``FakeWorker`` plays vLLM's model runner: it
keeps the state a real runner keeps (block table, computed tokens, token ids per request), checks
every ``SchedulerOutput`` against it, and keeps a fake KV cache (which token sits in which slot of
which block) so that a request reading a block someone else overwrote is caught. With kvsched's KV
connector it also executes each step's copies (``KvschedConnectorMetadata``) between that fake KV
cache and a fake host pool (those that may overlap the forward pass after the step's rows, the
latest they may land), and can be told to fail some of them (``fail_copy``): the blocks a
failed call was writing hold garbage and are reported as the real connector reports them, and a
request that reads garbage samples ``CORRUPT`` instead of its token (a real model would compute
from the garbage), so that a scheduler that lets one through is caught by the tokens. ``FakeEngine``
calls schedule / execute / update_from_output the way vLLM's engine core does, synchronously or with
its batch queue of two (asynchronous scheduling).

Tokens are a function of (request, output index), so two schedulers that serve the same requests
must produce the same token streams; a request's true length is where its token is EOS.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

EOS = 2
CORRUPT = 3  # sampled by a request whose attention read garbage KV (a failed copy's destination)
_GARBAGE = -1


def make_vllm_config(
    *,
    num_blocks: int,
    block_size: int = 16,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    max_model_len: int = 8192,
    enable_prefix_caching: bool = False,
    async_scheduling: bool = False,
    policy: str = "fcfs",
    long_prefill_token_threshold: int = 0,
    additional_config: dict | None = None,
    max_loras: int = 0,
):
    """(VllmConfig, KVCacheConfig) for a two-layer mock Llama on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    model_dir = tempfile.mkdtemp(prefix="kvsched-mock-llama-")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
            "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
            "vocab_size": 32000, "max_position_embeddings": max_model_len, "torch_dtype": "float16",
        }, f)
    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, max_model_len=max_model_len, dtype="float16")
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
        is_encoder_decoder=False, async_scheduling=async_scheduling, policy=policy,
        long_prefill_token_threshold=long_prefill_token_threshold,
    )
    cache = CacheConfig(block_size=block_size, gpu_memory_utilization=0.9, cache_dtype="auto",
                        enable_prefix_caching=enable_prefix_caching)
    lora = None
    if max_loras:
        from vllm.config import LoRAConfig
        lora = LoRAConfig(max_loras=max_loras)
    # The fake runner's steps take no model time: there is nothing for overflow_scenarios "auto" (the
    # adapter's default) to price, so its comparisons pin the risk at 0 unless a test sets it.
    additional_config = dict(additional_config or {})
    kvsched_options = additional_config.get("kvsched")
    if isinstance(kvsched_options, dict) and "overflow_scenarios" not in kvsched_options:
        admission, sampling = kvsched_options.get("admission", "past_future"), kvsched_options.get("sampling", True)
        if admission == "past_future" and sampling:
            additional_config["kvsched"] = {**kvsched_options, "overflow_scenarios": 0}
    elif kvsched_options is None:
        additional_config["kvsched"] = {"overflow_scenarios": 0}
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model, cache_config=cache,
                             device_config=DeviceConfig("cpu"), additional_config=additional_config,
                             lora_config=lora)
    # The CPU platform turns asynchronous scheduling off while the config is built; the GPU path keeps
    # it. Turned back on here, so that "async" runs drive vLLM's real AsyncScheduler.
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    cache.num_gpu_blocks = num_blocks
    kv = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(
            block_size=block_size, num_kv_heads=4, head_size=64, dtype=torch.float16))],
    )
    return vllm_config, kv


def make_scheduler(kind: str, vllm_config, kv_cache_config, log_stats: bool = False):
    """``kind``: "vllm" (vLLM's own, async or not as the config says) or "kvsched" (the adapter)."""
    from vllm.v1.structured_output import StructuredOutputManager

    if kind == "kvsched":
        from kvsched.adapters.vllm import Scheduler as cls
    elif vllm_config.scheduler_config.async_scheduling:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler as cls
    else:
        from vllm.v1.core.sched.scheduler import Scheduler as cls
    block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    return cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
               structured_output_manager=StructuredOutputManager(vllm_config), block_size=block_size,
               hash_block_size=block_size, log_stats=log_stats)


def token_for(req_id: str, index: int, true_len: int) -> int:
    """The token a request samples at output ``index``: EOS at its true length."""
    if index == true_len - 1:
        return EOS
    return 10 + (sum(map(ord, req_id)) * 31 + index * 7) % 30000


def prompt_for(req_id: str, length: int, shared_prefix: int = 0) -> list[int]:
    """Prompt tokens; the first ``shared_prefix`` are the same for every request."""
    seed = sum(map(ord, req_id))
    return [100 + i % 50 for i in range(shared_prefix)] + [
        1000 + (seed * 13 + i * 17) % 20000 for i in range(length - shared_prefix)]


def make_request(req_id: str, prompt_len: int, max_tokens: int, *, arrival_time: float = 0.0, priority: int = 0,
                 shared_prefix: int = 0, block_hasher: Callable | None = None, ignore_eos: bool = False,
                 stop_token_ids: list[int] | None = None, extra_args: dict | None = None, lora_id: int = 0,
                 stop: list[str] | None = None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids,
                            extra_args=extra_args, stop=stop)
    if not ignore_eos:
        params.update_from_generation_config({}, eos_token_id=EOS)
    lora_request = None
    if lora_id:
        from vllm.lora.request import LoRARequest
        lora_request = LoRARequest(f"adapter-{lora_id}", lora_id, f"/nonexistent/adapter-{lora_id}")
    return Request(req_id, prompt_for(req_id, prompt_len, shared_prefix), params, None, arrival_time=arrival_time,
                   priority=priority, block_hasher=block_hasher, lora_request=lora_request)


def vllm_block_hasher(block_size: int):
    """The block hasher vLLM's engine core gives requests when prefix caching is on."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return get_request_block_hasher(block_size, hash_fn)


@dataclass
class _RunnerRequest:
    tokens: list[int]
    prompt_len: int
    blocks: list[int]
    computed: int
    true_len: int
    num_sampled: int = 0


@dataclass
class FakeWorker:
    """vLLM's model runner, minus the model: checks each SchedulerOutput and samples tokens."""

    block_size: int
    num_blocks: int
    true_lens: dict[str, int]
    v2: bool = False
    requests: dict[str, _RunnerRequest] = field(default_factory=dict)
    kv: dict[int, list] = field(default_factory=dict)  # block -> token id per slot (None: unwritten)
    steps: int = 0
    host: dict[int, list] = field(default_factory=dict)  # host block -> slots, as ``kv``
    # (direction "out" or "in", index of that direction's call from 1) -> whether the call fails
    fail_copy: Callable[[str, int], bool] | None = None
    copy_calls: dict[str, int] = field(default_factory=lambda: {"out": 0, "in": 0})
    failed_copies: int = 0
    corrupt_reads: int = 0  # rows that read garbage (with fail_copy set; otherwise that fails the check)

    def _copy(self, extents, direction: str, reported: set) -> None:
        """One direction's copies of a step, as one connector call (connector.py)."""
        if not len(extents):
            return
        self.copy_calls[direction] += 1
        src, dst = (self.kv, self.host) if direction == "out" else (self.host, self.kv)
        fails = self.fail_copy is not None and self.fail_copy(direction, self.copy_calls[direction])
        for s, d, n in extents.tolist():
            for k in range(n):
                if fails:
                    dst[d + k] = [_GARBAGE] * self.block_size
                    reported.add(-1 - (d + k) if direction == "out" else d + k)
                else:
                    dst[d + k] = list(src.get(s + k) or [None] * self.block_size)
        self.failed_copies += fails

    def execute(self, so) -> Any:
        from vllm.v1.outputs import ModelRunnerOutput

        self.steps += 1
        reported: set = set()
        meta = getattr(so, "kv_connector_metadata", None)
        if meta is not None and hasattr(meta, "waited"):  # kvsched's connector
            for extents, direction in meta.waited:
                self._copy(extents, direction, reported)
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        for req_id in so.preempted_req_ids or ():
            if self.v2:
                self.requests.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            old = self.requests.get(new.req_id)
            tokens = list(new.prefill_token_ids or new.prompt_token_ids)
            if old is not None:  # v2 resumes a preempted request as a new one; its tokens must match
                assert old.tokens[: len(tokens)] == tokens, new.req_id
            self.requests[new.req_id] = _RunnerRequest(
                tokens, len(new.prompt_token_ids), list(new.block_ids[0]), new.num_computed_tokens,
                self.true_lens[new.req_id], num_sampled=len(tokens) - len(new.prompt_token_ids))
        cached = so.scheduled_cached_reqs
        # vLLM 0.34 has neither (it resumes requests as new ones and sends no tokens of cached ones).
        resumed = getattr(cached, "resumed_req_ids", set())
        all_token_ids = getattr(cached, "all_token_ids", {})
        for i, req_id in enumerate(cached.req_ids):
            r = self.requests[req_id]
            blocks = cached.new_block_ids[i]
            if req_id in resumed:
                r.blocks = list(blocks[0])
            elif blocks is not None:
                r.blocks.extend(blocks[0])
            if req_id in all_token_ids:
                known = all_token_ids[req_id]
                assert r.tokens[: len(known)] == known, req_id
            if req_id not in resumed:  # a resumed one restarts (after any prefix-cache hit)
                assert cached.num_computed_tokens[i] == r.computed, (req_id, cached.num_computed_tokens[i], r.computed)
            r.computed = cached.num_computed_tokens[i]
            if self.fail_copy is not None and cached.num_output_tokens[i] < r.num_sampled:
                # Tokens the scheduler discarded (sampled from a failed copy's KV): trimmed as vLLM's runner does.
                del r.tokens[r.prompt_len + cached.num_output_tokens[i]:]
                r.num_sampled = cached.num_output_tokens[i]
            assert cached.num_output_tokens[i] == r.num_sampled, (req_id, cached.num_output_tokens[i], r.num_sampled)
        assert sum(so.num_scheduled_tokens.values()) == so.total_num_scheduled_tokens
        sampled = {}
        for req_id, n in so.num_scheduled_tokens.items():
            r = self.requests[req_id]
            end = r.computed + n
            assert n > 0 and end <= len(r.tokens), (req_id, r.computed, n, len(r.tokens))
            assert len(r.blocks) * self.block_size >= end, (req_id, len(r.blocks), end)
            assert all(0 < b < self.num_blocks for b in r.blocks), (req_id, r.blocks)
            corrupt = False
            for pos in range(r.computed):  # what attention reads must be this request's own KV
                slot = self.kv.get(r.blocks[pos // self.block_size])
                if self.fail_copy is not None and slot is not None and slot[pos % self.block_size] == _GARBAGE:
                    corrupt = True
                    continue
                assert slot is not None and slot[pos % self.block_size] == r.tokens[pos], (req_id, pos)
            self.corrupt_reads += corrupt
            for pos in range(r.computed, end):
                slot = self.kv.setdefault(r.blocks[pos // self.block_size], [None] * self.block_size)
                slot[pos % self.block_size] = r.tokens[pos]
            r.computed = end
            if end == len(r.tokens):
                token = CORRUPT if corrupt else token_for(req_id, r.num_sampled, r.true_len)
                r.tokens.append(token)
                r.num_sampled += 1
                sampled[req_id] = [token]
            else:
                sampled[req_id] = []
        if meta is not None and hasattr(meta, "overlapping"):
            # After the rows: copies that overlap the forward pass may land after it (strictest case).
            for extents, direction in meta.overlapping:
                self._copy(extents, direction, reported)
        # The runner's batch order is its own: reversed here so that schedulers cannot rely on it.
        order = list(reversed(list(so.num_scheduled_tokens)))
        extra = {}
        if "req_id_to_index" in ModelRunnerOutput.__dataclass_fields__:  # vLLM < 0.34
            extra["req_id_to_index"] = {r: i for i, r in enumerate(order)}
        if reported:
            from vllm.v1.outputs import KVConnectorOutput

            extra["kv_connector_output"] = KVConnectorOutput(invalid_block_ids=reported)
        return ModelRunnerOutput(req_ids=order, sampled_token_ids=[sampled[r] for r in order], **extra)


@dataclass
class FakeEngine:
    """vLLM's engine-core loop around a scheduler and a FakeWorker; collects what clients receive."""

    scheduler: Any
    worker: FakeWorker
    async_scheduling: bool = False
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish_reasons: dict[str, Any] = field(default_factory=dict)
    queue: deque = field(default_factory=deque)
    steps: int = 0

    def add(self, request) -> None:
        self.tokens[request.request_id] = []
        self.scheduler.add_request(request)

    def step(self) -> None:
        self.steps += 1
        if self.scheduler.has_requests():
            so = self.scheduler.schedule()
            self.queue.appendleft((so, self.worker.execute(so)))
            if self.async_scheduling and len(self.queue) < 2:
                return
        if self.queue:
            so, out = self.queue.pop()
            self._collect(self.scheduler.update_from_output(so, out))

    def _collect(self, engine_outputs) -> None:
        for outputs in engine_outputs.values():
            for out in outputs.outputs:
                assert out.request_id not in self.finish_reasons, f"output after finish: {out.request_id}"
                self.tokens[out.request_id].extend(out.new_token_ids)
                if out.finish_reason is not None:
                    self.finish_reasons[out.request_id] = out.finish_reason

    def run(self, max_steps: int = 100_000, on_step: Callable[["FakeEngine"], None] | None = None) -> None:
        while self.scheduler.has_requests() or self.queue:
            self.step()
            if on_step is not None:
                on_step(self)
            assert self.steps < max_steps, "no progress"
