"""What comes back from the model runner: sampled tokens applied to vLLM's requests, and the
``EngineCoreOutput`` each front end receives.

Fast rows (see the glossary in ``scheduler.py``) are handled with array operations; the others one by
one, the way vLLM's scheduler does (stop checks, grammar, logprobs, events, prefill stats).
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy import count_nonzero
from vllm.logger import init_logger
from vllm.v1.core.sched.utils import check_stop
from vllm.v1.engine import EngineCoreOutput
from vllm.v1.request import Request, RequestStatus

from . import versions
from .state import LOGGER_NAME, Step, consume

if TYPE_CHECKING:
    from .scheduler import Scheduler


class RunnerOrder:
    """Where each row sits in the model runner's output. A runner keeps its own batch order, which
    at steady state is the same from step to step, as are the rows: the positions are then reused
    (two list comparisons, C-level and mostly identity checks) instead of rebuilt from a dict."""

    def __init__(self) -> None:
        self._runner_ids: list[str] = []
        self._row_ids: list[str] = []
        self._index: list[int] = []

    def index(self, runner: Any, row_ids: list[str]) -> list[int]:
        if runner.req_ids != self._runner_ids or row_ids != self._row_ids:
            self._index = versions.runner_index(runner, row_ids)
            self._runner_ids, self._row_ids = list(runner.req_ids), list(row_ids)
        return self._index


def apply_tokens(sched: Scheduler, step: Step, rows: np.ndarray | None, runner: Any, outputs: dict) -> None:
    """The tokens of ``step``'s ``rows`` (None: every row, the steady state). At a few rows a step's
    cost is the number of numpy calls (each microseconds when a forward pass left the caches cold):
    reductions are count_nonzero (a plain C call, no ufunc machinery) and every-row steps index
    nothing."""
    h = sched._handles
    every_row = rows is None
    hs = step.handles if every_row else step.handles[rows]
    row_ids = step.req_ids if every_row else [step.req_ids[r] for r in rows.tolist()]
    if runner.req_ids == step.req_ids:
        index = range(len(row_ids)) if every_row else rows.tolist()
    else:
        index = sched._runner_order.index(runner, row_ids)
    sampled = list(map(runner.sampled_token_ids.__getitem__, index))
    capped = step.capped if every_row else step.capped[rows]
    spec_tokens = step.output.scheduled_spec_decode_tokens
    if spec_tokens:  # accepted drafts reach the core before any stop below
        done = sched.drafts.accept(sched, hs, row_ids, sampled, spec_tokens)
        if done.size:
            capped = capped | np.isin(hs, done)
    fast = h.fast[hs]
    if count_nonzero(capped):
        fast &= ~capped
    if set(map(len, sampled)) == {1}:
        tokens = np.fromiter(chain.from_iterable(sampled), np.int64, len(sampled))
    else:
        fast &= np.fromiter(map(len, sampled), np.int64, len(sampled)) == 1
        tokens = np.fromiter((s[0] if len(s) == 1 else -1 for s in sampled), np.int64, len(sampled))
    # EOS and stop ids in one gather; length stops (max_tokens, max_model_len) are the core's capped
    # rows. Most steps stop nothing: one flat test, the per-row reduction only when a row stops.
    stops = h.stop_ids[hs] == tokens[:, None]
    if count_nonzero(stops):
        fast &= ~stops.any(axis=1)
    if runner.num_nans_in_logits:
        fast[:] = False
    all_fast = count_nonzero(fast) == fast.size
    fast_rows = None if all_fast else np.flatnonzero(fast)  # positions in this call's rows
    fast_hs = hs if all_fast else hs[fast_rows]
    fast_tokens = (tokens if all_fast else tokens[fast_rows]).tolist()
    # Request.append_output_token_ids() without its block hasher (kvsched hashes natively), as
    # C-level appends to the request's own lists.
    consume(map(list.append, h.output_ids[fast_hs].tolist(), fast_tokens))
    all_ids = h.all_ids[fast_hs].tolist()
    if all_ids:  # a list, or from vLLM 0.34 a TokenBuffer (an int32 array.array)
        consume(map(type(all_ids[0]).append, all_ids, fast_tokens))
    h.num_output[fast_hs] += 1
    fast_ids = row_ids if all_fast else [row_ids[k] for k in fast_rows.tolist()]
    fast_sampled = sampled if all_fast else [sampled[k] for k in fast_rows.tolist()]
    fast_outputs = list(map(EngineCoreOutput, fast_ids, fast_sampled))
    clients = h.client[fast_hs]
    if not count_nonzero(clients):
        outputs[0].extend(fast_outputs)
    else:
        for client, output in zip(clients.tolist(), fast_outputs):
            outputs[client].append(output)

    stopped_handles, stopped_lens = [], []
    for k in [] if all_fast else np.flatnonzero(~fast).tolist():
        request = h.request[hs[k]]
        output, stopped = apply_row(sched, request, sampled[k], index[k], bool(capped[k]), runner)
        if output is not None:
            outputs[request.client_index].append(output)
        if stopped:
            if h.in_core[hs[k]]:
                stopped_handles.append(int(hs[k]))
                stopped_lens.append(request.num_output_tokens)
            sched._retire(request)
    if stopped_handles:
        sched.core.stop(np.asarray(stopped_handles, np.int64), np.asarray(stopped_lens, np.int64))


def apply_row(sched: Scheduler, request: Request, new_token_ids: list[int], index: int, capped: bool,
               runner: Any) -> tuple[EngineCoreOutput | None, bool]:
    """One row the way vLLM's scheduler does it: append, check stop, build the output."""
    if not new_token_ids:
        return None, False
    stopped = False
    for count, token in enumerate(new_token_ids, 1):
        request._output_token_ids.append(token)
        request._all_token_ids.append(token)
        if check_stop(request, sched.max_model_len):
            del new_token_ids[count:]
            stopped = True
            break
    if new_token_ids and not sched.structured_output_manager.accept_tokens(request, new_token_ids):
        # The bitmask allowed only what the grammar accepts: a rejection is a bug somewhere, not
        # something to go on from (vLLM ends the request the same way).
        init_logger(LOGGER_NAME).error("grammar rejected tokens %s of request %s: finishing it with an error",
                                    new_token_ids, request.request_id)
        request.status = RequestStatus.FINISHED_ERROR
        stopped = True
    handle = sched._handle_of[request.request_id]
    h = sched._handles
    h.num_output[handle] = request.num_output_tokens
    h.has_events[handle] = False
    h.fast[handle] = h.plain[handle] and request.num_output_tokens > 0
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
        cached = request.num_prompt_tokens if sched.kvsched_config.enable_prefix_caching else 0
        prefill_stats.finalize(cached - cached % sched.block_size)
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
