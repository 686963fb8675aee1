"""The adapter's per-request and per-step state (see the glossary in ``scheduler.py``)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.request import Request

# Stop token ids checked by the array path; a request with more takes the per-row path. The
# matrix is as wide as the most any request brought (a stop list of tens of ids is common).
MAX_FAST_STOP_IDS = 64
# Under vLLM's logger tree, so that its handlers and format (level, time, process) apply.
LOGGER_NAME = "vllm.kvsched_adapter"

# Handle states: where a live request stands with vLLM's workers.
UNSENT, RUNNING, PREEMPTED = 0, 1, 2


class Handles:
    """Per-request columns indexed by handle, grown by doubling; freed handles are reused."""

    def __init__(self, capacity: int = 1024) -> None:
        self.generation = np.zeros(capacity, np.int64)
        self.alive = np.zeros(capacity, bool)
        self.state = np.zeros(capacity, np.int8)
        self.prompt_len = np.zeros(capacity, np.int64)
        self.num_output = np.zeros(capacity, np.int64)  # tokens appended to the vLLM Request
        # Column 0: the EOS id (-1 when ignored); then the stop token ids (generation configs add
        # several EOS ids); -1 pads; more than MAX_FAST_STOP_IDS: not plain. One gather checks
        # every stop; columns are added when a request brings more stop ids than fit.
        self.stop_ids = np.full((capacity, 1 + 4), -1, np.int64)
        self.plain = np.zeros(capacity, bool)  # needs no per-token work beyond the append
        self.structured = np.zeros(capacity, bool)  # its tokens follow a grammar (structured output)
        self.num_structured = 0  # live handles with structured set: steps without any skip the bitmask rows
        self.has_events = np.zeros(capacity, bool)  # events recorded, not yet sent
        # plain, no events pending and a token already out (a first token takes the per-row path):
        # its next token is applied by the array path. Kept where those change, so that a step reads
        # one column instead of three.
        self.fast = np.zeros(capacity, bool)
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
        # Counts releases and generation bumps: a step scheduled when it had the value it has now
        # has every row still alive and of the same generation (update_from_output skips the check).
        self.changes = 0

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
        self.state[handle] = UNSENT
        self.prompt_len[handle] = request.num_prompt_tokens
        self.num_output[handle] = 0
        stop_ids = params.stop_token_ids or ()
        fast_stops = list(stop_ids[:MAX_FAST_STOP_IDS])
        if 1 + len(fast_stops) > self.stop_ids.shape[1]:
            wider = np.full((self.stop_ids.shape[0], 1 + len(fast_stops)), -1, np.int64)
            wider[:, : self.stop_ids.shape[1]] = self.stop_ids
            self.stop_ids = wider
        self.stop_ids[handle] = -1
        self.stop_ids[handle, 0] = -1 if eos is None else eos
        self.stop_ids[handle, 1 : 1 + len(fast_stops)] = fast_stops
        self.plain[handle] = (
            params.logprobs is None and params.prompt_logprobs is None and len(stop_ids) <= MAX_FAST_STOP_IDS
            and getattr(params, "repetition_detection", None) is None and request.trace_headers is None
            and not request.use_structured_output
        )
        self.structured[handle] = request.use_structured_output
        self.num_structured += bool(request.use_structured_output)
        self.last_step[handle] = -2
        self.has_events[handle] = False
        self.fast[handle] = False
        self.in_core[handle] = False
        self.client[handle] = request.client_index
        self.request[handle] = request
        self.req_id[handle] = request.request_id
        self.output_ids[handle] = request._output_token_ids
        self.all_ids[handle] = request._all_token_ids
        return handle

    def release(self, handle: int) -> None:
        self.changes += 1
        self.alive[handle] = False
        self.in_core[handle] = False
        self.num_structured -= bool(self.structured[handle])
        self.structured[handle] = False
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
                grown[size:] = None if column.dtype == object else -1 if name in ("stop_ids", "last_step") else 0
                setattr(self, name, grown)


@dataclass
class Step:
    """A scheduled step whose model output has not come back yet."""

    output: SchedulerOutput
    handles: np.ndarray
    generations: np.ndarray
    req_ids: list[str]
    samples: np.ndarray  # the row's chunk reaches the end of its sequence: one token comes back
    capped: np.ndarray  # the core finished the request at this row (max tokens, or what the cache holds)
    structured_ids: list[str]  # rows that sample under a grammar, in row order (the bitmask's rows)
    plan: Any = None  # the core's plan (kvsched.StepPlan); None for an empty step
    # With kvsched's connector: the handles its copies name (swapped out or in, loaded from the host
    # tier) and their generations then, rows or not (scheduler.py, failed copies).
    copy_handles: Any = None  # np.ndarray, or None when none
    copy_generations: Any = None
    handle_changes: int = -1  # Handles.changes when the step was scheduled


def consume(iterator) -> None:
    """Runs an iterator of side effects at C speed."""
    deque(iterator, maxlen=0)


def monotonic() -> float:
    return time.monotonic()
