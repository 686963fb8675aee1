"""The scheduler contract: vLLM's ``SchedulerInterface`` over kvsched's native batch former.

vLLM's engine core calls ``schedule()`` once per step, runs the model on the returned
``SchedulerOutput`` and hands the sampled tokens to ``update_from_output()``. This class keeps that
contract (request lifecycle, finish and abort, stats, pause states, prefix-cache reset) and puts
kvsched's native core where the decisions are made. What the runner is told is built in
``to_runner``, what comes back is applied in ``from_runner``, version differences live in
``versions``.

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
  row         one scheduled request of a step, in plan order. ``Step`` keeps a step's rows until
              its output arrives; vLLM answers steps in the order they were scheduled.
  fast row    a row that needs nothing but its one sampled token appended: no logprobs, repetition
              check, grammar or trace headers, at most 4 stop token ids (none of them sampled); not the
              request's first token; not stopping.
              Fast rows are handled with array operations, the others one by one as vLLM does.
  null block  vLLM reserves block 0 for padding; the core's block b is vLLM's block b + 1.
  grammar     structured output (JSON schema, regex, choice, grammar): vLLM's front end starts
              compiling a request's grammar when it arrives. The request reaches the core only once
              its grammar is ready (one that failed to compile finishes it with an error); each step,
              its sampling rows get a bitmask row from vLLM's StructuredOutputManager
              (get_grammar_bitmask), and its sampled tokens advance the grammar (from_runner).
  stop-string end  vLLM 0.32-0.34 find stop strings in the front end (the detokenizer) and end the
              request in the engine by an abort (FINISHED_ABORTED), the same call a client's
              disconnect makes. An abort of a request that has stop strings and has produced a
              token is taken as a stop-string end: the core counts it finished with the tokens it
              holds (a step or two past the match when the front end lags: KV that was really
              held), so admission learns its length. A client that disconnects from such a
              request is then learned as a short length; without this every stop-string request
              would be learned as nothing, and admission would keep its prior.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict, deque
from typing import Any, Iterable

import numpy as np
from numpy import count_nonzero
from vllm.config import VllmConfig
from vllm.multimodal import MULTIMODAL_REGISTRY, MultiModalRegistry
from vllm.v1.core.sched.interface import PauseState, SchedulerInterface
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.engine import EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.metrics.stats import PrefixCacheStats, SchedulerStats
from vllm.v1.request import Request, RequestStatus

import kvsched

from . import copy_failures, events, from_runner, metrics, to_runner, versions
from .config import kvsched_config, num_speculative_tokens, request_tags, unsupported_features, user_options
from .connector import is_kvsched_connector, metadata_from_plan
from .hosted_connector import HostedConnector
from .admission_risk import PricedRisk
from .preemption_costs import RecomputeCost
from .drafts import Drafts
from .state import LOGGER_NAME, PREEMPTED, RUNNING, UNSENT, Handles, Step, monotonic

_NO_ROWS = np.zeros(0, np.int64)
_NORMAL_FINISHES = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)


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
        versions.check_vllm_version()
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
        self.use_v2_model_runner = versions.uses_v2_model_runner(vllm_config)
        self.uses_mrope = bool(vllm_config.model_config.uses_mrope)
        self.ec_connector = None

        group = kv_cache_config.kv_cache_groups[0]
        config, policy, priced = kvsched_config(vllm_config, kv_cache_config.num_blocks - 1, block_size,
                                                group.kv_cache_spec.page_size_bytes * len(group.layer_names),
                                                len(group.layer_names))
        self.kvsched_config = config
        # A KV connector vLLM ships, its scheduler side called as vLLM's scheduler does
        # (hosted_connector.py); built once kvsched's options were accepted.
        self.hosted = HostedConnector.create(vllm_config, kv_cache_config)
        self.connector = self.hosted.connector if self.hosted else None
        self.core = kvsched.Scheduler(config, policy=policy)
        self.priced_risk = PricedRisk(self.core) if priced else None  # overflow_scenarios: "auto"
        # Copies (swap, the host tier) weighed against recomputes priced from this engine's steps,
        # unless the user set the price (preemption_costs.py).
        measured = config.num_host_blocks and "recompute_seconds_per_token" not in user_options(vllm_config)
        self.recompute_cost = RecomputeCost(self.core) if measured else None

        self.requests: dict[str, Request] = {}
        self._handles = Handles()
        self._runner_order = from_runner.RunnerOrder()
        self._handle_of: dict[str, int] = {}
        self._to_add: list[Request] = []  # added since the last schedule(); passed to the core in one call
        self._steps: deque[Step] = deque()
        self._step_index = 0
        self._previous_rows: tuple[int, list[str]] = (-1, [])  # (step index, row ids) of the last step with rows
        self.stop_string_ends = 0  # aborts taken for stop-string ends (see the glossary)
        self.finished_req_ids: set[str] = set()
        self.finished_req_ids_dict: dict[int, set[str]] | None = defaultdict(set) if include_finished_set else None
        self._preempted_req_ids: set[str] = set()
        # (client, output) of requests finished outside a step (rejected, refused)
        self._pending_outputs: list[tuple[int, EngineCoreOutput]] = []
        self._pause_state = PauseState.UNPAUSED
        # Prefix-cache lookups since the last make_stats(), recorded at admission as vLLM does.
        self._prefix_stats = PrefixCacheStats() if log_stats else None
        self._reads_prefix_cache = bool(vllm_config.cache_config.enable_prefix_caching)
        self.kv_events = events.KvEvents.create(self, hash_block_size)  # None without --kv-events-config
        self.load_gauges = metrics.LoadGauges.create(self)  # None with stats off
        num_drafts = num_speculative_tokens(vllm_config)
        self.drafts = Drafts(num_drafts) if num_drafts else None  # None without speculative decoding
        # kvsched's KV connector runs on the workers: every step carries its copies (none: empty metadata).
        self._copies = is_kvsched_connector(vllm_config.kv_transfer_config)
        self.recomputed_after_copy_failures = 0  # requests recomputed because a copy of their KV failed

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
            self._handles.fast[handle] = False

    def _refusal(self, request: Request) -> str | None:
        if request.resumable:
            return "streaming input sessions are not supported by kvsched's vLLM adapter"
        if request.pooling_params is not None:
            return "pooling requests are not supported by kvsched's vLLM adapter"
        tags = request_tags(request)
        if isinstance(tags, str):
            return tags
        slos = getattr(self.core.policy, "ttft_slo_s", None)
        if slos is not None and slos.size > 1 and tags[1] >= slos.size:
            return f"extra_args['kvsched_class'] is {tags[1]}, but ttft_slo_s has {slos.size} classes"
        return None

    def _flush_adds(self) -> None:
        if not self._to_add:
            return
        adds, self._to_add = self._to_add, []
        if any(r.status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR for r in adds):
            adds = self._grammars_ready(adds)
            if not adds:
                return
        handles = np.fromiter((self._handle_of[r.request_id] for r in adds), np.int64, len(adds))
        prompt_lens = self._handles.prompt_len[handles]
        room = np.maximum(self.max_model_len - prompt_lens, 1)
        max_new = np.minimum(np.fromiter((r.max_tokens for r in adds), np.int64, len(adds)), room)
        keys = None
        if self.kvsched_config.enable_prefix_caching:
            keys = [self._prefix_keys(r) for r in adds]
        external = None
        if self.hosted is not None:  # prompt tokens the connector can load
            external = np.fromiter((self.hosted.added(r) for r in adds), np.int64, len(adds))
        self._handles.in_core[handles] = True
        self.core.add_requests(
            handles, prompt_lens, max_new,
            arrival_times=np.fromiter((r.arrival_time for r in adds), np.float64, len(adds)),
            priorities=np.fromiter((r.priority for r in adds), np.float64, len(adds)),
            client_ids=np.fromiter((request_tags(r)[0] for r in adds), np.int64, len(adds)),
            class_ids=np.fromiter((request_tags(r)[1] for r in adds), np.int64, len(adds)), block_keys=keys,
            lora_ids=np.fromiter((r.lora_request.lora_int_id if r.lora_request else 0 for r in adds), np.int64,
                                 len(adds)),
            external_tokens=external,
        )

    def _grammars_ready(self, adds: list[Request]) -> list[Request]:
        """The requests of ``adds`` that may enter the core; those whose grammar is still compiling
        stay in ``_to_add``, those whose grammar failed finish with an error (as in vLLM)."""
        ready = []
        for request in adds:
            if request.status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR:
                grammar = request.structured_output_request.grammar  # None while compiling
                if grammar is None:
                    self._to_add.append(request)
                    continue
                if isinstance(grammar, Exception):
                    request.status = RequestStatus.FINISHED_ERROR
                    self._emit_finished(request, f"its grammar failed to compile: {grammar}")
                    continue
                request.status = RequestStatus.WAITING
            ready.append(request)
        return ready

    def _prefix_keys(self, request: Request) -> np.ndarray | None:
        if request.prompt_token_ids is None or not versions.reads_prefix_cache(request):
            return None
        # Blocks computed under another cache salt or LoRA adapter hold other KV: other keys.
        lora = request.lora_request.lora_int_id if request.lora_request else 0
        salt = 0 if request.cache_salt is None and not lora else zlib.crc32(f"{request.cache_salt}|{lora}".encode()) + 1
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
                if finished_status == RequestStatus.FINISHED_ABORTED and not self._ended_by_stop_string(request, handle):
                    aborted.append(handle)
                else:  # ended by the front end at a stop string: a true output length
                    stopped.append(handle)
                    stopped_lens.append(int(self._handles.num_output[handle]))
                    if finished_status == RequestStatus.FINISHED_ABORTED:  # else _retire tells priced risk
                        self.stop_string_ends += 1
                        if self.priced_risk is not None:
                            self.priced_risk.finished(stopped_lens[-1])
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

    def _ended_by_stop_string(self, request: Request, handle: int) -> bool:
        """An abort that is taken for a stop-string end (see the glossary)."""
        params = request.sampling_params
        return params is not None and bool(params.stop) and int(self._handles.num_output[handle]) > 0

    def _retire(self, request: Request) -> None:
        """Forgets a finished request; the core has already let it go."""
        req_id = request.request_id
        del self.requests[req_id]
        self.finished_req_ids.add(req_id)
        if self.finished_req_ids_dict is not None:
            self.finished_req_ids_dict[request.client_index].add(req_id)
        if self.priced_risk is not None and request.status in _NORMAL_FINISHES:
            self.priced_risk.finished(request.num_output_tokens)
        if self.hosted is not None:
            self.hosted.finished(request)
        handle = self._handle_of.pop(req_id, None)
        if handle is not None:
            self._handles.release(handle)
            if self.drafts is not None:
                self.drafts.drop(handle)

    def _emit_finished(self, request: Request, reason: str | None = None) -> None:
        """Finishes a request outside a step; its output goes out with the next update."""
        if reason is not None:
            from vllm.logger import init_logger

            init_logger(LOGGER_NAME).warning("request %s refused: %s", request.request_id, reason)
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
        plan = self.core.schedule(commit=True)
        if self.kv_events:
            self.kv_events.collect(plan)
        hs = plan.req_ids
        samples = plan.samples
        done = plan.finished_ids
        if done.size:
            capped = np.isin(hs, done)
            h.in_core[done] = False
        else:
            capped = np.zeros(hs.size, bool)
        if plan.rejected_ids.size:
            h.in_core[plan.rejected_ids] = False
        if plan.copy_on_writes.size:
            raise RuntimeError("kvsched bug: a copy-on-write without forked sequences")
        self._handle_rejected(plan.rejected_ids)
        self._handle_preempted(plan.preempted_ids)
        self._handle_preempted(plan.swapped_out_ids, swapped=True)

        timestamp = None
        rows_state = h.state[hs]
        req_ids: list[str] = h.req_id[hs].tolist()
        sent = rows_state != RUNNING
        sent_rows = np.flatnonzero(sent) if count_nonzero(sent) else _NO_ROWS
        # The Request objects are needed for rows sent afresh and rows the v1 runner did not see last
        # step: at steady state, none.
        requests: list[Request] = h.request[hs].tolist() if sent_rows.size else []
        new_reqs: list[NewRequestData] = []
        resumed_rows = []
        external_loads = dict(zip(plan.external_load_ids.tolist(), plan.external_load_tokens.tolist())) \
            if plan.external_load_ids.size else {}
        for row in sent_rows.tolist():
            request, handle = requests[row], int(hs[row])
            computed = int(plan.computed_offsets[row])
            if rows_state[row] == UNSENT and request.prefill_stats is not None:
                request.prefill_stats.set(request.num_prompt_tokens, min(computed, request.num_prompt_tokens), 0)
            external = external_loads.get(handle, 0)
            if self.hosted is not None:  # before num_computed_tokens changes, as vLLM calls it
                self.hosted.admitted(request, to_runner.row_blocks(plan, row), external, computed - external)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = computed
            if self.log_stats:
                timestamp = timestamp or monotonic()
                self._record(request, handle, EngineCoreEventType.SCHEDULED, timestamp)
                if self._reads_prefix_cache and versions.reads_prefix_cache(request):
                    # vLLM's accounting: all of its tokens queried, the cached ones hit; a resumed
                    # request counts apart (preempted_*).
                    self._prefix_stats.record(num_tokens=request.num_tokens, num_hits=computed - external,
                                              preempted=request.num_preemptions > 0)
            if rows_state[row] == PREEMPTED and not self.use_v2_model_runner:
                resumed_rows.append(row)
                continue
            new_reqs.append(to_runner.new_request_data(self, request, plan, row))
        h.state[hs] = RUNNING

        cached = to_runner.cached_request_data(self, plan, hs, rows_state, req_ids, requests, resumed_rows)
        h.last_step[hs] = self._step_index
        self._previous_rows = (self._step_index, req_ids)
        spec_tokens: dict[str, list[int]] = {}
        if self.drafts is None:
            num_tokens = plan.num_tokens.tolist()
        else:
            row_tokens, spec_tokens = self.drafts.rows(plan, hs, req_ids)
            num_tokens = row_tokens.tolist()
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=dict(zip(req_ids, num_tokens)),
            total_num_scheduled_tokens=sum(num_tokens),
            scheduled_spec_decode_tokens=spec_tokens,
            scheduled_encoder_inputs={},
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=[],
            preempted_req_ids=self._preempted_req_ids,
        )
        if self.drafts is not None:  # the runner's proposer drafts this many for the next step
            output.num_spec_tokens_to_schedule = self.drafts.num_speculative_tokens
        self._connector_metadata(output, plan, loads=bool(external_loads))
        self.finished_req_ids = set()
        self._preempted_req_ids = set()
        structured_ids = self._structured_rows(output, hs, samples, req_ids)
        step = Step(output, hs, h.generation[hs], req_ids, samples, capped, structured_ids, plan,
                    handle_changes=h.changes)
        if self._copies and (plan.swapped_out_ids.size or plan.swapped_in_ids.size or plan.cache_load_ids.size):
            # Requests the step's copies name, rows or not: a failed copy is traced to them by generation.
            step.copy_handles = np.concatenate([plan.swapped_out_ids, plan.swapped_in_ids, plan.cache_load_ids])
            step.copy_generations = h.generation[step.copy_handles]
        self._steps.append(step)
        return output

    def _structured_rows(self, output: SchedulerOutput, hs: np.ndarray, samples: np.ndarray,
                         req_ids: list[str]) -> list[str]:
        """The step's rows that sample under a grammar, and vLLM's two flags for them: the step needs a
        bitmask, and (asynchronous scheduling) a row's previous token is still in flight, so the
        engine computes the bitmask only once that token has advanced the grammar."""
        if not self._handles.num_structured:
            return []
        rows = np.flatnonzero(self._handles.structured[hs] & samples)
        if not rows.size:
            return []
        ids = [req_ids[r] for r in rows.tolist()]
        output.has_structured_output_requests = True
        in_flight = {req_id for step in self._steps for req_id in step.structured_ids}
        output.pending_structured_output_tokens = not in_flight.isdisjoint(ids)
        return ids

    def _empty_output(self) -> SchedulerOutput:
        output = SchedulerOutput.make_empty()
        output.finished_req_ids = self.finished_req_ids
        output.preempted_req_ids = self._preempted_req_ids
        self._connector_metadata(output, None, loads=False)
        self.finished_req_ids = set()
        self._preempted_req_ids = set()
        empty = np.zeros(0, np.int64)
        self._steps.append(Step(output, empty, empty, [], np.zeros(0, bool), np.zeros(0, bool), []))
        return output

    def _connector_metadata(self, output: SchedulerOutput, plan: kvsched.StepPlan | None, loads: bool) -> None:
        """Every step's metadata for the workers' KV connector (vLLM requires it on each step once
        one is configured): kvsched's plan copies, or what a hosted connector builds."""
        if self._copies:
            output.kv_connector_metadata = metadata_from_plan(plan, self.kvsched_config.num_host_blocks)
        elif self.hosted is not None:
            self.hosted.metadata(output, loads)

    def _handle_rejected(self, rejected_ids: np.ndarray) -> None:
        # The core rejects a prompt its cache can never hold; vLLM calls that "ignored" (length).
        for handle in rejected_ids.tolist():
            request = self._handles.request[handle]
            request.status = RequestStatus.FINISHED_IGNORED
            self._emit_finished(request)

    def _handle_preempted(self, preempted_ids: np.ndarray, swapped: bool = False) -> None:
        """Requests preempted by recompute (their KV is gone) or swapped out (their KV is copied to
        the host pool by this step's connector metadata and comes back with them): the runner drops
        both, and takes them back as resumed."""
        if not preempted_ids.size:
            return
        timestamp = monotonic() if self.log_stats else None
        # A request admitted by a host prefetch holds blocks before its first row: preempted then, the
        # runner has never seen it, and it is sent afresh when it comes back.
        seen = self._handles.state[preempted_ids] != UNSENT
        for handle, request, told in zip(preempted_ids.tolist(), self._handles.request[preempted_ids].tolist(),
                                         seen.tolist()):
            request.status = RequestStatus.PREEMPTED
            if not swapped:
                request.num_computed_tokens = 0
            if self.drafts is not None:
                self.drafts.drop(handle)
            request.num_preemptions += 1
            self._record(request, handle, EngineCoreEventType.PREEMPTED, timestamp)
            if told:
                self._preempted_req_ids.add(request.request_id)
        self._handles.state[preempted_ids[seen]] = PREEMPTED

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> dict[int, EngineCoreOutputs]:
        step = self._steps.popleft()
        if step.output is not scheduler_output:
            raise RuntimeError("update_from_output: outputs must come back in the order their steps were scheduled")
        if self.priced_risk is not None:
            self.priced_risk.step_reported(scheduler_output)
        if self.recompute_cost is not None:
            self.recompute_cost.step_reported(scheduler_output)
        if self.hosted is not None:
            self.hosted.reported(model_runner_output)
        kv_output = getattr(model_runner_output, "kv_connector_output", None)
        if self._copies and kv_output is not None and kv_output.invalid_block_ids:
            self._recompute_after_failed_copies(step, kv_output.invalid_block_ids)
        h = self._handles
        outputs: dict[int, list[EngineCoreOutput]] = defaultdict(list)
        for client, output in self._pending_outputs:
            outputs[client].append(output)
        self._pending_outputs = []

        hs = step.handles
        if h.changes == step.handle_changes:  # no row retired or recomputed since it was scheduled
            live = step.samples
        else:
            live = h.alive[hs] & (h.generation[hs] == step.generations) & step.samples
        num_live = count_nonzero(live)
        if num_live and model_runner_output.sampled_token_ids:
            rows = None if num_live == live.size else np.flatnonzero(live)  # None: every row
            from_runner.apply_tokens(self, step, rows, model_runner_output, outputs)

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
        if self.kv_events:
            self.kv_events.publish()
        if self.load_gauges:
            self.load_gauges.update()
        if not self.requests:
            for clock in (self.priced_risk, self.recompute_cost):
                if clock is not None:
                    clock.idle()
        return engine_outputs

    def _recompute_after_failed_copies(self, step: Step, reported: set) -> None:
        """kvsched's connector could not copy some blocks in ``step`` (connector.py): the requests
        those bytes reached (copy_failures.py) are recomputed from the tokens they had before it, and
        what they sampled from it, and from later steps in flight, is discarded (their generation
        changes, so those rows are not applied). A request the core already finished at its max
        tokens cannot be run again: it ends with an error (it could be added back with the tokens it
        has: not built). Every cached prefix is forgotten: a bad block may be cached, and a failed
        copy is rare enough not to track which."""
        h = self._handles
        steps = [step, *self._steps]
        touched = copy_failures.touched_requests(*copy_failures.split_reported(reported),
                                                 [s.plan for s in steps if s.plan is not None])
        # A handle named in these steps may since belong to another request: only the one named counts.
        named, capped = {}, set()
        for s in steps:
            if s.copy_handles is not None:
                named.update(zip(s.copy_handles.tolist(), s.copy_generations.tolist()))
            named.update(zip(s.handles.tolist(), s.generations.tolist()))
            capped.update((t, g) for t, g in zip(s.handles[s.capped].tolist(), s.generations[s.capped].tolist()))
        handles = [t for t in sorted(touched) if h.alive[t] and named.get(t) == h.generation[t]]
        logging.getLogger(LOGGER_NAME).error(
            "KV copies failed in a step (blocks %s; host blocks h as -1 - h): requests recomputed: %s; every "
            "cached prefix forgotten", sorted(reported), [h.req_id[t] for t in handles] or "none")
        again, generated, ended = [], [], []
        for handle in handles:
            if h.in_core[handle]:
                again.append(handle)
                generated.append(min(int(h.num_output[handle]), self.core.info(handle)["num_generated"]))
            elif (handle, int(h.generation[handle])) in capped:
                ended.append(h.request[handle])
            else:
                continue  # not in the core for another reason (its grammar still compiling): nothing ran
            h.generation[handle] += 1  # rows of this step and later ones in flight are not applied
            h.changes += 1
        if again:
            ids = np.asarray(again, np.int64)
            self.core.recompute(ids, np.asarray(generated, np.int64))
            running = ids[h.state[ids] == RUNNING]
            self._handle_preempted(running)
            for request in h.request[ids].tolist():
                request.num_computed_tokens = 0
                request.status = RequestStatus.PREEMPTED
        for request in ended:
            request.status = RequestStatus.FINISHED_ERROR
            self._emit_finished(request)
        self.recomputed_after_copy_failures += len(again)
        self.core.reset_prefix_cache()
        if self._prefix_stats is not None:
            self._prefix_stats.reset = True
        if self.kv_events:
            self.kv_events.flush()

    def get_grammar_bitmask(self, scheduler_output: SchedulerOutput) -> Any:
        """vLLM's GrammarOutput for a scheduled step: a bitmask row per row sampling under a grammar
        (requests finished since are left out), or None when it has none."""
        if not scheduler_output.has_structured_output_requests:
            return None
        step = next((s for s in reversed(self._steps) if s.output is scheduler_output), None)
        if step is None:
            raise RuntimeError("get_grammar_bitmask: the step was not scheduled here or its output came back")
        req_ids = [req_id for req_id in step.structured_ids if req_id in self.requests]
        if not req_ids:
            return None
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        bitmask = self.structured_output_manager.grammar_bitmask(self.requests, req_ids, spec_tokens)
        return versions.grammar_output(req_ids, bitmask, spec_tokens)

    # ---- speculative decoding (drafts.py) ----
    def update_draft_token_ids(self, draft_token_ids: Any) -> None:
        if self.drafts is None:
            raise RuntimeError("update_draft_token_ids: speculative decoding is not configured")
        self.drafts.set(self, draft_token_ids)

    def update_draft_token_ids_in_output(self, draft_token_ids: Any, scheduler_output: SchedulerOutput) -> None:
        # Asynchronous scheduling's path: refused with speculative decoding at construction (drafts.py).
        raise RuntimeError("speculative decoding with asynchronous scheduling is not supported by kvsched's vLLM adapter")

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
        if self._prefix_stats is not None:
            self._prefix_stats.reset = True
        if self.kv_events:
            self.kv_events.flush()
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
        prefix, self._prefix_stats = self._prefix_stats, PrefixCacheStats()
        return SchedulerStats(
            num_running_reqs=int(stats["num_running"]),
            num_waiting_reqs=int(stats["num_waiting"]) + len(self._to_add),
            kv_cache_usage=kv["num_used"] / kv["num_blocks"],
            prefix_cache_stats=prefix,
            spec_decoding_stats=self.drafts.take_stats() if self.drafts is not None else None,
        )

    def get_kv_event_publisher_config(self) -> Any:
        return self.kv_events.publisher_config() if self.kv_events else None

    def get_kv_connector(self) -> Any:
        return self.connector  # a hosted vLLM connector's scheduler side, or None

    def shutdown(self) -> None:
        self._steps.clear()
        if self.hosted is not None:
            self.hosted.shutdown()
        if self.kv_events:
            self.kv_events.shutdown()
