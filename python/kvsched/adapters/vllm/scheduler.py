"""kvsched as vLLM's scheduler: ``vllm serve MODEL --scheduler-cls kvsched.adapters.vllm.Scheduler``.

vLLM's engine core calls ``schedule()`` once per step, runs the model on the returned
``SchedulerOutput`` and hands the sampled tokens to ``update_from_output()``. This class keeps that
contract (request lifecycle, new and cached request data with block ids, finish and abort, stats,
prefix caching, preemption by recompute, asynchronous scheduling) and puts kvsched's native batch
former where the decisions are made: which requests run, how many tokens each computes (chunked
prefill), admission through the peak-memory estimator (Past-Future) instead of vLLM's aggressive
admission, block allocation with prefix caching, and who is preempted. vLLM's KVCacheManager and
BlockPool are not built: the native allocator owns the block ids the workers see.

Options come from vLLM's config: ``max_num_seqs``, ``max_num_batched_tokens``,
``long_prefill_token_threshold`` (the prefill chunk), ``enable_prefix_caching``, ``watermark``,
``policy`` (``fcfs`` or ``priority``), and kvsched's own under ``additional_config``::

    --additional-config '{"kvsched": {"admission": "past_future", "quantile": 0.9}}'

Glossary
  handle      the int64 id the native core knows a request by (vLLM ids are strings). Handles are
              reused once a request is gone; ``generation[handle]`` tells a step's rows apart from
              a later request that took the same handle.
  commit      schedule() reports its plan to the core at once, as if every request whose chunk
              reaches the end of its sequence sampled one token. That is what vLLM's asynchronous
              scheduling does with output placeholders. The true tokens arrive later in
              update_from_output(); a request that stopped early (EOS, a stop token) is then
              stopped in the core with its true length. One code path serves both engine modes.
              A request that reaches max_tokens is finished at commit, so its blocks may go to
              another request in the next step, one step before the runner hears of the finish
              (vLLM frees them when the output arrives). Safe: the runner executes steps in order
              on one stream, so the old owner's last KV writes precede the new owner's, and the new
              owner reads only KV written by then (tests/test_vllm_adapter.py checks every read
              against vLLM's AsyncScheduler). Pipeline parallelism, where steps overlap on the
              device, is refused.
  row         one scheduled request of a step, in plan order. ``_Step`` keeps a step's rows until
              its output arrives; vLLM answers steps in the order they were scheduled.
  fast row    a row that needs nothing but its one sampled token appended: no logprobs, repetition
              check or trace headers, at most 4 stop token ids (none of them sampled); not the
              request's first token; not stopping.
              Fast rows are handled with array operations, the others one by one as vLLM does.
  null block  vLLM reserves block 0 for padding; the core's block b is vLLM's block b + 1.

Supported: vLLM 0.33.x (``SUPPORTED_VLLM``), decoder-only text models with one KV cache group of
full attention, synchronous or asynchronous scheduling, v1 or v2 model runner.

Refused at construction, with the reason: speculative decoding, KV or encoder-cache connectors,
multimodal and encoder-decoder models, pooling models, LoRA, pipeline or context parallelism,
hybrid KV cache groups (sliding window, Mamba), disabled chunked prefill, prefill cadence.
Refused per request (finished with reason ``error``): structured output, streaming input sessions.
Not kept: ``Request.block_hashes`` (kvsched hashes prompts natively) and ``num_computed_tokens`` of
requests after they were first sent to the workers (the core holds token counts).
"""

from __future__ import annotations

import zlib
from collections import defaultdict, deque
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterable

import numpy as np

import kvsched

try:
    import vllm
    from vllm.config import VllmConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY, MultiModalRegistry
    from vllm.v1.core.sched.interface import PauseState, SchedulerInterface
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.core.sched.utils import check_stop
    from vllm.v1.engine import EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig
    from vllm.v1.metrics.stats import PrefixCacheStats, SchedulerStats
    from vllm.v1.request import Request, RequestStatus
except ImportError as error:  # pragma: no cover - exercised only without vLLM
    raise ImportError(f"kvsched.adapters.vllm needs vLLM 0.33.x importable ({error})") from error

SUPPORTED_VLLM = ((0, 33), (0, 34))  # [lowest, first unsupported)
KVSCHED_OPTIONS = (
    "admission", "policy", "window", "quantile", "adaptive", "target_preemption_rate", "adapt_gain",
    "min_quantile", "max_quantile", "sampling", "num_scenarios", "keyed_draws", "seed", "prior", "max_bypass",
    "placement", "hash_algorithm", "prefill_attention_budget",
)
_POLICIES = ("fcfs", "priority")
_MAX_FAST_STOP_IDS = 4

# Handle states: where a live request stands with vLLM's workers.
_UNSENT, _RUNNING, _PREEMPTED = 0, 1, 2


def _version_tuple(text: str) -> tuple[int, int]:
    parts = text.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def check_vllm_version(version: str | None = None) -> None:
    """Raises RuntimeError when the installed vLLM is outside ``SUPPORTED_VLLM``."""
    version = version or vllm.__version__
    low, high = SUPPORTED_VLLM
    if not low <= _version_tuple(version) < high:
        raise RuntimeError(
            f"kvsched.adapters.vllm supports vLLM >= {low[0]}.{low[1]}, < {high[0]}.{high[1]}; found {version}"
        )


def unsupported_features(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> list[str]:
    """What in this configuration the adapter does not implement (empty when it can run)."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    sched = vllm_config.scheduler_config
    found = []
    if vllm_config.speculative_config is not None:
        found.append("speculative decoding")
    if vllm_config.kv_transfer_config is not None:
        found.append("KV connectors (kv_transfer_config)")
    if vllm_config.ec_transfer_config is not None:
        found.append("encoder-cache connectors (ec_transfer_config)")
    if model.is_encoder_decoder or model.supports_multimodal_inputs:
        found.append("multimodal or encoder-decoder models")
    if model.runner_type == "pooling":
        found.append("pooling models")
    if vllm_config.lora_config is not None:
        found.append("LoRA (max_loras is not enforced by the batch former)")
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
    return found


def kvsched_config(vllm_config: VllmConfig, num_blocks: int, block_size: int) -> tuple[kvsched.SchedulerConfig, str]:
    """kvsched's SchedulerConfig and policy name from vLLM's config and ``additional_config['kvsched']``."""
    extra = vllm_config.additional_config
    options = dict(extra.get("kvsched", {})) if isinstance(extra, dict) else {}
    unknown = sorted(set(options) - set(KVSCHED_OPTIONS))
    if unknown:
        raise ValueError(f"additional_config['kvsched']: unknown option(s) {unknown}; known: {list(KVSCHED_OPTIONS)}")
    sched = vllm_config.scheduler_config
    policy = str(options.pop("policy", sched.policy))
    if policy not in _POLICIES:
        raise ValueError(f"policy must be one of {_POLICIES}, got {policy!r}")
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
        **options,
    )
    config.native_options()  # validates the choices now, naming the bad one
    return config, policy


class _Handles:
    """Per-request columns indexed by handle, grown by doubling; freed handles are reused."""

    def __init__(self, capacity: int = 1024) -> None:
        self.generation = np.zeros(capacity, np.int64)
        self.alive = np.zeros(capacity, bool)
        self.state = np.zeros(capacity, np.int8)
        self.prompt_len = np.zeros(capacity, np.int64)
        self.num_output = np.zeros(capacity, np.int64)  # tokens appended to the vLLM Request
        self.eos = np.full(capacity, -1, np.int64)
        # Stop token ids (generation configs add several EOS ids); -1 pads; more than fit: not plain.
        self.stop_ids = np.full((capacity, _MAX_FAST_STOP_IDS), -1, np.int64)
        self.plain = np.zeros(capacity, bool)  # needs no per-token work beyond the append
        self.has_events = np.zeros(capacity, bool)  # events recorded, not yet sent
        self.in_core = np.zeros(capacity, bool)  # the native core still holds it
        self.last_step = np.full(capacity, -2, np.int64)  # last step that scheduled it
        self.client = np.zeros(capacity, np.int64)
        self.request = np.empty(capacity, object)
        self.req_id = np.empty(capacity, object)
        # The Request's own token lists (vLLM creates them once), for appends without attribute lookups.
        self.output_ids = np.empty(capacity, object)
        self.all_ids = np.empty(capacity, object)
        self._free: list[int] = []
        self._next = 0

    def take(self, request: Request) -> int:
        if self._free:
            handle = self._free.pop()
        else:
            handle = self._next
            self._next += 1
            if handle == self.alive.size:
                self._grow()
        params = request.sampling_params
        eos = params.eos_token_id
        self.generation[handle] += 1
        self.alive[handle] = True
        self.state[handle] = _UNSENT
        self.prompt_len[handle] = request.num_prompt_tokens
        self.num_output[handle] = 0
        self.eos[handle] = -1 if eos is None else eos
        stop_ids = params.stop_token_ids or ()
        self.stop_ids[handle] = -1
        self.stop_ids[handle, : len(stop_ids)] = stop_ids[:_MAX_FAST_STOP_IDS]
        self.plain[handle] = (
            params.logprobs is None and params.prompt_logprobs is None and len(stop_ids) <= _MAX_FAST_STOP_IDS
            and getattr(params, "repetition_detection", None) is None and request.trace_headers is None
        )
        self.last_step[handle] = -2
        self.has_events[handle] = False
        self.in_core[handle] = False
        self.client[handle] = request.client_index
        self.request[handle] = request
        self.req_id[handle] = request.request_id
        self.output_ids[handle] = request._output_token_ids
        self.all_ids[handle] = request._all_token_ids
        return handle

    def release(self, handle: int) -> None:
        self.alive[handle] = False
        self.in_core[handle] = False
        self.request[handle] = None
        self.output_ids[handle] = None
        self.all_ids[handle] = None
        self._free.append(handle)

    def _grow(self) -> None:
        for name, column in list(vars(self).items()):
            if isinstance(column, np.ndarray):
                size = column.shape[0]
                grown = np.empty((size * 2,) + column.shape[1:], column.dtype)
                grown[:size] = column
                grown[size:] = None if column.dtype == object else -1 if name in ("eos", "stop_ids", "last_step") else 0
                setattr(self, name, grown)


def _consume(iterator) -> None:
    """Runs an iterator of side effects at C speed."""
    deque(iterator, maxlen=0)


@dataclass
class _Step:
    """A scheduled step whose model output has not come back yet."""

    output: SchedulerOutput
    handles: np.ndarray
    generations: np.ndarray
    req_ids: list[str]
    samples: np.ndarray  # the row's chunk reaches the end of its sequence: one token comes back
    capped: np.ndarray  # the core finished the request at this row (max tokens, or what the cache holds)


class Scheduler(SchedulerInterface):
    """vLLM's ``SchedulerInterface`` over kvsched's native batch former (see the module docstring)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        kv_cache_config: KVCacheConfig,
        structured_output_manager: Any,
        block_size: int,
        hash_block_size: int | None = None,
        mm_registry: MultiModalRegistry = MULTIMODAL_REGISTRY,
        include_finished_set: bool = False,
        log_stats: bool = False,
    ) -> None:
        check_vllm_version()
        missing = unsupported_features(vllm_config, kv_cache_config)
        if missing:
            raise ValueError("kvsched.adapters.vllm.Scheduler does not support: " + "; ".join(missing))
        self.vllm_config = vllm_config
        self.scheduler_config = vllm_config.scheduler_config
        self.cache_config = vllm_config.cache_config
        self.kv_cache_config = kv_cache_config
        self.structured_output_manager = structured_output_manager
        self.block_size = block_size
        self.log_stats = log_stats
        self.max_model_len = vllm_config.model_config.max_model_len
        self.use_v2_model_runner = bool(vllm_config.use_v2_model_runner)
        self.uses_mrope = bool(vllm_config.model_config.uses_mrope)
        self.connector = None
        self.ec_connector = None

        config, policy = kvsched_config(vllm_config, kv_cache_config.num_blocks - 1, block_size)
        self.kvsched_config = config
        self.core = kvsched.Scheduler(config, policy=policy)

        self.requests: dict[str, Request] = {}
        self._handles = _Handles()
        self._handle_of: dict[str, int] = {}
        self._to_add: list[Request] = []  # added since the last schedule(); passed to the core in one call
        self._steps: deque[_Step] = deque()
        self._step_index = 0
        self.finished_req_ids: set[str] = set()
        self.finished_req_ids_dict: dict[int, set[str]] | None = defaultdict(set) if include_finished_set else None
        self._preempted_req_ids: set[str] = set()
        # (client, output) of requests finished outside a step (rejected, refused)
        self._pending_outputs: list[tuple[int, EngineCoreOutput]] = []
        self._pause_state = PauseState.UNPAUSED
        self._prefix_stats_seen = (0, 0, 0)
        self._prefix_cache_reset = False

    # ---- requests ----
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the scheduler")
        self.requests[request.request_id] = request
        refusal = self._refusal(request)
        if refusal is not None:
            request.status = RequestStatus.FINISHED_ERROR
            self._emit_finished(request, refusal)
            return
        handle = self._handles.take(request)
        self._handle_of[request.request_id] = handle
        self._to_add.append(request)
        self._record(request, handle, EngineCoreEventType.QUEUED)

    def _record(self, request: Request, handle: int, event: EngineCoreEventType, timestamp: float | None = None) -> None:
        if self.log_stats:
            request.record_event(event, timestamp)
            self._handles.has_events[handle] = True

    @staticmethod
    def _refusal(request: Request) -> str | None:
        if request.use_structured_output:
            return "structured output is not supported by kvsched's vLLM adapter"
        if request.resumable:
            return "streaming input sessions are not supported by kvsched's vLLM adapter"
        if request.pooling_params is not None:
            return "pooling requests are not supported by kvsched's vLLM adapter"
        return None

    def _flush_adds(self) -> None:
        if not self._to_add:
            return
        adds, self._to_add = self._to_add, []
        handles = np.fromiter((self._handle_of[r.request_id] for r in adds), np.int64, len(adds))
        prompt_lens = self._handles.prompt_len[handles]
        room = np.maximum(self.max_model_len - prompt_lens, 1)
        max_new = np.minimum(np.fromiter((r.max_tokens for r in adds), np.int64, len(adds)), room)
        keys = None
        if self.kvsched_config.enable_prefix_caching:
            keys = [self._prefix_keys(r) for r in adds]
        self._handles.in_core[handles] = True
        self.core.add_requests(
            handles, prompt_lens, max_new,
            arrival_times=np.fromiter((r.arrival_time for r in adds), np.float64, len(adds)),
            priorities=np.fromiter((r.priority for r in adds), np.float64, len(adds)),
            client_ids=self._handles.client[handles].astype(np.int32), block_keys=keys,
        )

    def _prefix_keys(self, request: Request) -> np.ndarray | None:
        if request.prompt_token_ids is None or request.skip_reading_prefix_cache:
            return None
        salt = 0 if request.cache_salt is None else zlib.crc32(request.cache_salt.encode()) + 1
        return self.core.block_keys(np.asarray(request.prompt_token_ids, np.int32), salt)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests

    def finish_requests(self, request_ids: str | Iterable[str] | None, finished_status: RequestStatus) -> list[Request]:
        assert RequestStatus.is_finished(finished_status)
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        elif request_ids is None:
            request_ids = list(self.requests)
        finished = []
        aborted, stopped, stopped_lens = [], [], []
        for req_id in dict.fromkeys(request_ids):
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            handle = self._handle_of.get(req_id)
            if handle is not None and self._handles.in_core[handle]:
                if finished_status == RequestStatus.FINISHED_ABORTED:
                    aborted.append(handle)
                else:  # a stop string found by the frontend: a true output length
                    stopped.append(handle)
                    stopped_lens.append(int(self._handles.num_output[handle]))
            elif handle is not None and request in self._to_add:
                self._to_add.remove(request)
            request.status = finished_status
            finished.append(request)
        if aborted:
            self.core.abort(np.asarray(aborted, np.int64))
        if stopped:
            self.core.stop(np.asarray(stopped, np.int64), np.asarray(stopped_lens, np.int64))
        for request in finished:
            self._retire(request)
        return finished

    def _retire(self, request: Request) -> None:
        """Forgets a finished request; the core has already let it go."""
        req_id = request.request_id
        del self.requests[req_id]
        self.finished_req_ids.add(req_id)
        if self.finished_req_ids_dict is not None:
            self.finished_req_ids_dict[request.client_index].add(req_id)
        handle = self._handle_of.pop(req_id, None)
        if handle is not None:
            self._handles.release(handle)

    def _emit_finished(self, request: Request, reason: str | None = None) -> None:
        """Finishes a request outside a step; its output goes out with the next update."""
        if reason is not None:
            from vllm.logger import init_logger

            init_logger(__name__).warning("request %s refused: %s", request.request_id, reason)
        self._pending_outputs.append((request.client_index, EngineCoreOutput(
            request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason(),
            events=request.take_events(), trace_headers=request.trace_headers,
        )))
        self._retire(request)

    # ---- steps ----
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        # throttle_prefills (prefill cadence across data-parallel ranks) is not implemented: ignored.
        self._step_index += 1
        self._flush_adds()
        if self._pause_state == PauseState.PAUSED_ALL:
            return self._empty_output()
        h = self._handles
        plan = self.core.schedule()
        hs = plan.req_ids
        samples = plan.samples
        done = self.core.update(hs, samples.astype(np.int64), None)
        capped = np.isin(hs, done) if done.size else np.zeros(hs.size, bool)
        h.in_core[done] = False
        h.in_core[plan.rejected_ids] = False
        if plan.copy_on_writes.size:
            raise RuntimeError("kvsched bug: a copy-on-write without forked sequences")
        self._handle_rejected(plan.rejected_ids)
        self._handle_preempted(plan.preempted_ids)

        timestamp = None
        rows_state = h.state[hs]
        req_ids: list[str] = h.req_id[hs].tolist()
        sent_rows = np.flatnonzero(rows_state != _RUNNING)
        # The Request objects are needed for rows sent afresh and rows the v1 runner did not see last
        # step: at steady state, none.
        requests: list[Request] = h.request[hs].tolist() if sent_rows.size else []
        new_reqs: list[NewRequestData] = []
        resumed_rows = []
        for row in sent_rows.tolist():
            request, handle = requests[row], int(hs[row])
            computed = int(plan.computed_offsets[row])
            if rows_state[row] == _UNSENT and request.prefill_stats is not None:
                request.prefill_stats.set(request.num_prompt_tokens, min(computed, request.num_prompt_tokens), 0)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = computed
            if self.log_stats:
                timestamp = timestamp or _monotonic()
                self._record(request, handle, EngineCoreEventType.SCHEDULED, timestamp)
            if rows_state[row] == _PREEMPTED and not self.use_v2_model_runner:
                resumed_rows.append(row)
                continue
            blocks = (self._row_blocks(plan, row),)
            prefill = request._all_token_ids if self.use_v2_model_runner else None
            new_reqs.append(NewRequestData.from_request(request, blocks, prefill, uses_mrope=self.uses_mrope))
        h.state[hs] = _RUNNING

        cached = self._cached_request_data(plan, hs, rows_state, req_ids, requests, resumed_rows)
        h.last_step[hs] = self._step_index
        num_tokens = plan.num_tokens.tolist()
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=dict(zip(req_ids, num_tokens)),
            total_num_scheduled_tokens=sum(num_tokens),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=[],
            preempted_req_ids=self._preempted_req_ids,
        )
        self.finished_req_ids = set()
        self._preempted_req_ids = set()
        self._steps.append(_Step(output, hs, h.generation[hs], req_ids, samples, capped))
        return output

    def _empty_output(self) -> SchedulerOutput:
        output = SchedulerOutput.make_empty()
        output.finished_req_ids = self.finished_req_ids
        output.preempted_req_ids = self._preempted_req_ids
        self.finished_req_ids = set()
        self._preempted_req_ids = set()
        empty = np.zeros(0, np.int64)
        self._steps.append(_Step(output, empty, empty, [], np.zeros(0, bool), np.zeros(0, bool)))
        return output

    @staticmethod
    def _row_blocks(plan: kvsched.StepPlan, row: int) -> list[int]:
        # A request that starts or restarts gets its whole table as new blocks (prefix hits too).
        return (plan.blocks_of(row) + 1).tolist()

    def _cached_request_data(self, plan, hs, rows_state, req_ids, requests, resumed_rows) -> CachedRequestData:
        running = np.flatnonzero(rows_state == _RUNNING)
        rows = np.concatenate([running, np.asarray(resumed_rows, np.int64)]) if resumed_rows else running
        counts = np.diff(plan.block_indptr)[rows]
        new_block_ids: list[tuple[list[int], ...] | None] = [None] * rows.size
        if counts.any():
            starts = plan.block_indptr[rows]
            blocks = plan.new_blocks + 1
            for k in np.flatnonzero(counts).tolist():
                new_block_ids[k] = (blocks[starts[k] : starts[k] + counts[k]].tolist(),)
        for k in range(running.size, rows.size):  # resumed: their whole table replaces the old one
            new_block_ids[k] = (self._row_blocks(plan, int(rows[k])),)
        row_list = rows.tolist()
        every_row = not resumed_rows and rows.size == len(req_ids)  # then rows is 0..n-1
        cached_ids = list(req_ids) if every_row else [req_ids[r] for r in row_list]
        all_token_ids: dict[str, list[int]] = {}
        if not self.use_v2_model_runner:
            # The v1 runner needs the tokens of a request it did not see in the previous step.
            absent = np.flatnonzero(self._handles.last_step[hs[rows]] != self._step_index - 1)
            if absent.size:
                if not requests:
                    requests = self._handles.request[hs].tolist()
                for k in absent.tolist():
                    request = requests[row_list[k]]
                    all_token_ids[request.request_id] = list(request.all_token_ids)
        return CachedRequestData(
            req_ids=cached_ids,
            resumed_req_ids={req_ids[r] for r in resumed_rows},
            new_token_ids=[],
            all_token_ids=all_token_ids,
            new_block_ids=new_block_ids,
            num_computed_tokens=plan.computed_offsets[rows].tolist(),
            num_output_tokens=plan.num_generated[rows].tolist(),
        )

    def _handle_rejected(self, rejected_ids: np.ndarray) -> None:
        # The core rejects a prompt its cache can never hold; vLLM calls that "ignored" (length).
        for handle in rejected_ids.tolist():
            request = self._handles.request[handle]
            request.status = RequestStatus.FINISHED_IGNORED
            self._emit_finished(request)

    def _handle_preempted(self, preempted_ids: np.ndarray) -> None:
        if not preempted_ids.size:
            return
        timestamp = _monotonic() if self.log_stats else None
        for handle, request in zip(preempted_ids.tolist(), self._handles.request[preempted_ids].tolist()):
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
            request.num_preemptions += 1
            self._record(request, handle, EngineCoreEventType.PREEMPTED, timestamp)
            self._preempted_req_ids.add(request.request_id)
        self._handles.state[preempted_ids] = _PREEMPTED

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> dict[int, EngineCoreOutputs]:
        step = self._steps.popleft()
        if step.output is not scheduler_output:
            raise RuntimeError("update_from_output: outputs must come back in the order their steps were scheduled")
        h = self._handles
        outputs: dict[int, list[EngineCoreOutput]] = defaultdict(list)
        for client, output in self._pending_outputs:
            outputs[client].append(output)
        self._pending_outputs = []

        hs = step.handles
        live = h.alive[hs] & (h.generation[hs] == step.generations) & step.samples
        rows = np.flatnonzero(live)
        if rows.size and model_runner_output.sampled_token_ids:
            self._apply_tokens(step, rows, model_runner_output, outputs)

        engine_outputs = {client: EngineCoreOutputs(outputs=outs) for client, outs in outputs.items()}
        if self.finished_req_ids_dict:
            for client, finished in self.finished_req_ids_dict.items():
                engine_outputs.setdefault(client, EngineCoreOutputs()).finished_requests = finished
            self.finished_req_ids_dict.clear()
        stats = self.make_stats()
        if stats is not None:  # to one front end only, even in a step without outputs
            if not engine_outputs:
                engine_outputs[0] = EngineCoreOutputs()
            next(iter(engine_outputs.values())).scheduler_stats = stats
        return engine_outputs

    def _apply_tokens(self, step: _Step, rows: np.ndarray, runner: Any, outputs: dict) -> None:
        h = self._handles
        every_row = rows.size == len(step.req_ids)
        hs = step.handles if every_row else step.handles[rows]
        row_ids = step.req_ids if every_row else [step.req_ids[r] for r in rows.tolist()]
        if runner.req_ids == step.req_ids:
            index = rows.tolist()
        else:
            index = list(map(runner.req_id_to_index.__getitem__, row_ids))
        sampled = list(map(runner.sampled_token_ids.__getitem__, index))
        single = np.fromiter(map(len, sampled), np.int64, len(sampled)) == 1
        if single.all():
            tokens = np.fromiter(chain.from_iterable(sampled), np.int64, len(sampled))
        else:
            tokens = np.fromiter((s[0] if len(s) == 1 else -1 for s in sampled), np.int64, len(sampled))
        fast = (
            single & h.plain[hs] & ~h.has_events[hs] & (h.num_output[hs] > 0) & ~step.capped[rows]
            & (tokens != h.eos[hs]) & ~(h.stop_ids[hs] == tokens[:, None]).any(axis=1)
        )  # length stops (max_tokens, max_model_len) are the core's capped rows
        if runner.num_nans_in_logits:
            fast[:] = False
        fast_rows = np.flatnonzero(fast)
        all_fast = fast_rows.size == len(sampled)
        fast_hs = hs if all_fast else hs[fast_rows]
        fast_tokens = (tokens if all_fast else tokens[fast_rows]).tolist()
        # Request.append_output_token_ids() without its block hasher (kvsched hashes natively), as
        # C-level appends to the request's own lists.
        _consume(map(list.append, h.output_ids[fast_hs].tolist(), fast_tokens))
        _consume(map(list.append, h.all_ids[fast_hs].tolist(), fast_tokens))
        h.num_output[fast_hs] += 1
        fast_ids = row_ids if all_fast else [row_ids[k] for k in fast_rows.tolist()]
        fast_sampled = sampled if all_fast else [sampled[k] for k in fast_rows.tolist()]
        fast_outputs = list(map(EngineCoreOutput, fast_ids, fast_sampled))
        clients = h.client[fast_hs]
        if not clients.any():
            outputs[0].extend(fast_outputs)
        else:
            for client, output in zip(clients.tolist(), fast_outputs):
                outputs[client].append(output)

        stopped_handles, stopped_lens = [], []
        for k in np.flatnonzero(~fast).tolist():
            request = h.request[hs[k]]
            output, stopped = self._apply_row(request, sampled[k], index[k], bool(step.capped[rows[k]]), runner)
            if output is not None:
                outputs[request.client_index].append(output)
            if stopped:
                if h.in_core[hs[k]]:
                    stopped_handles.append(int(hs[k]))
                    stopped_lens.append(request.num_output_tokens)
                self._retire(request)
        if stopped_handles:
            self.core.stop(np.asarray(stopped_handles, np.int64), np.asarray(stopped_lens, np.int64))

    def _apply_row(self, request: Request, new_token_ids: list[int], index: int, capped: bool,
                   runner: Any) -> tuple[EngineCoreOutput | None, bool]:
        """One row the way vLLM's scheduler does it: append, check stop, build the output."""
        if not new_token_ids:
            return None, False
        stopped = False
        for count, token in enumerate(new_token_ids, 1):
            request._output_token_ids.append(token)
            request._all_token_ids.append(token)
            if check_stop(request, self.max_model_len):
                del new_token_ids[count:]
                stopped = True
                break
        handle = self._handle_of[request.request_id]
        self._handles.num_output[handle] = request.num_output_tokens
        self._handles.has_events[handle] = False
        if capped and not stopped:  # the core cut max_tokens to what the KV cache can ever hold
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            stopped = True
        nans = runner.num_nans_in_logits
        if nans and request.request_id in nans:
            request.num_nans_in_logits = nans[request.request_id]
        new_logprobs = None
        params = request.sampling_params
        if params.logprobs is not None and runner.logprobs is not None and new_token_ids:
            new_logprobs = runner.logprobs.slice_request(index, len(new_token_ids))
        prefill_stats = request.take_prefill_stats()
        if prefill_stats is not None:
            cached = request.num_prompt_tokens if self.kvsched_config.enable_prefix_caching else 0
            prefill_stats.finalize(cached - cached % self.block_size)
        output = EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=new_token_ids,
            finish_reason=request.get_finished_reason() if stopped else None,
            new_logprobs=new_logprobs,
            new_prompt_logprobs_tensors=runner.prompt_logprobs_dict.get(request.request_id),
            stop_reason=request.stop_reason,
            events=request.take_events(),
            prefill_stats=prefill_stats,
            trace_headers=request.trace_headers,
            num_nans_in_logits=request.num_nans_in_logits,
        )
        return output, stopped

    # ---- features kvsched's adapter refuses at construction ----
    def get_grammar_bitmask(self, scheduler_output: SchedulerOutput) -> None:
        return None  # structured output requests are refused in add_request

    def update_draft_token_ids(self, draft_token_ids: Any) -> None:
        raise RuntimeError("speculative decoding is not supported by kvsched's vLLM adapter")

    def update_draft_token_ids_in_output(self, draft_token_ids: Any, scheduler_output: SchedulerOutput) -> None:
        raise RuntimeError("speculative decoding is not supported by kvsched's vLLM adapter")

    # ---- state ----
    def load(self) -> dict:
        """This engine's load report for a kvsched.cluster dispatcher (``kvsched.Scheduler.load()``:
        tokens running and queued, capacity, and the predicted peak KV of running and of all live
        requests). Requests vLLM handed over but not yet added to the core count as queued."""
        report = self.core.load()
        report["num_waiting"] += len(self._to_add)
        report["queued_tokens"] += sum(r.num_tokens for r in self._to_add)
        return report

    def get_request_counts(self) -> tuple[int, int]:
        stats = self.core.stats()
        return int(stats["num_running"]), int(stats["num_waiting"]) + len(self._to_add)

    def get_num_unfinished_requests(self) -> int:
        if self._pause_state == PauseState.PAUSED_ALL:
            return 0
        if self._pause_state == PauseState.PAUSED_NEW:
            return self.get_request_counts()[0]
        return len(self.requests)

    def has_finished_requests(self) -> bool:
        return bool(self.finished_req_ids or self._pending_outputs)

    @property
    def pause_state(self) -> PauseState:
        return self._pause_state

    def set_pause_state(self, pause_state: PauseState) -> None:
        self._pause_state = pause_state
        self.core.pause_admission(pause_state != PauseState.UNPAUSED)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        if reset_running_requests:
            # Their tokens in flight are still delivered; they come back after sitting out a step.
            self._handle_preempted(self.core.preempt_running())
        elif self.core.num_running:
            return False
        self.core.reset_prefix_cache()
        self._prefix_cache_reset = True
        return True

    def reset_encoder_cache(self) -> None:
        pass  # no encoder inputs: multimodal models are refused

    def get_kv_cache_usage(self) -> float:
        kv = self.core.stats()["kv"]
        return kv["num_used"] / kv["num_blocks"]

    def make_stats(self, *args: Any, **kwargs: Any) -> SchedulerStats | None:
        if not self.log_stats:
            return None
        stats = self.core.stats()
        kv = stats["kv"]
        seen = (kv["prefix_queries"], kv["prefix_query_blocks"], kv["prefix_hit_blocks"])
        requests, queries, hits = (now - before for now, before in zip(seen, self._prefix_stats_seen))
        self._prefix_stats_seen = seen
        prefix = PrefixCacheStats(reset=self._prefix_cache_reset, requests=requests,
                                  queries=queries * self.block_size, hits=hits * self.block_size)
        self._prefix_cache_reset = False
        return SchedulerStats(
            num_running_reqs=int(stats["num_running"]),
            num_waiting_reqs=int(stats["num_waiting"]) + len(self._to_add),
            kv_cache_usage=kv["num_used"] / kv["num_blocks"],
            prefix_cache_stats=prefix,
        )

    def shutdown(self) -> None:
        self._steps.clear()


def _monotonic() -> float:
    import time

    return time.monotonic()


__all__ = ["KVSCHED_OPTIONS", "SUPPORTED_VLLM", "Scheduler", "check_vllm_version", "kvsched_config",
           "unsupported_features"]
