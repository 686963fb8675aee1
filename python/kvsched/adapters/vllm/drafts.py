"""Speculative decoding (n-gram drafts) through kvsched's lookahead slots.

Glossary
  draft       a token the proposer guesses will come next (vLLM's n-gram proposer: prompt lookup).
              After a step, the engine hands the scheduler each request's drafts
              (``update_draft_token_ids``); the next step verifies them: the runner computes the
              request's last token and its drafts in one row, and samples up to 1 + drafts tokens.
  lookahead   the core gives every decode row ``num_lookahead_tokens`` (vLLM's
              ``num_speculative_tokens``) extra KV slots and tokens of the step budget, within its
              ``max_new_tokens``. A row sends the runner its last token plus as many drafts as it has
              (at most the slots it got); unused slots stay reserved for the next step.
  accepted    drafts the runner's sampler confirmed: a row returns 1 + accepted tokens. The adapter
              reports every step to the core as one token per sampling row when it schedules it
              (see ``commit`` in ``scheduler.py``); the accepted drafts are added when the tokens
              come back (``Scheduler.accept_drafts``). Rejected drafts roll back for free: the core
              never counted them, and their KV slots are overwritten by the next step.

Only synchronous scheduling is supported: with asynchronous scheduling the next step would be formed
before the accepted count is known (config.py refuses it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.v1.spec_decode.metrics import SpecDecodingStats

if TYPE_CHECKING:
    from .scheduler import Scheduler


class Drafts:
    """Each request's drafts for its next decode, keyed by handle, and the acceptance statistics."""

    def __init__(self, num_speculative_tokens: int) -> None:
        self.num_speculative_tokens = num_speculative_tokens
        self._by_handle: dict[int, list[int]] = {}
        self.stats: SpecDecodingStats | None = None  # since the last make_stats()

    def set(self, sched: Scheduler, draft_token_ids: Any) -> None:
        """vLLM's ``update_draft_token_ids``: drafts for requests that are still live; under a grammar,
        only the drafts it accepts (vLLM's ``validate_tokens``)."""
        for req_id, tokens in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids):
            request = sched.requests.get(req_id)
            handle = sched._handle_of.get(req_id)
            if request is None or handle is None or request.is_finished():
                continue
            if request.use_structured_output:
                tokens = sched.structured_output_manager.validate_tokens(request, tokens)
            if tokens:
                self._by_handle[handle] = list(tokens)
            else:
                self._by_handle.pop(handle, None)

    def drop(self, handle: int) -> None:
        """A request preempted or gone: its drafts no longer follow its computed tokens."""
        self._by_handle.pop(handle, None)

    def rows(self, plan: Any, hs: np.ndarray, req_ids: list[str]) -> tuple[np.ndarray, dict[str, list[int]]]:
        """The tokens each row sends the runner, and the drafts it verifies. A decode row holds
        1 + lookahead tokens in the plan and sends 1 + its drafts (cut to its slots); prefill and
        recompute rows send what the plan says."""
        num_tokens = plan.num_tokens.copy()
        decodes = plan.is_prefill == 0
        num_tokens[decodes] = 1
        scheduled: dict[str, list[int]] = {}
        if self._by_handle:
            drafts, self._by_handle = self._by_handle, {}
            handles = np.fromiter(drafts, np.int64, len(drafts))
            row_of = np.full(max(int(hs.max(initial=-1)), int(handles.max())) + 1, -1, np.int64)
            row_of[hs] = np.arange(hs.size)
            for handle, row in zip(handles.tolist(), row_of[handles].tolist()):
                if row < 0 or not decodes[row]:
                    continue  # not scheduled this step, or recomputing: drafts of an old position
                tokens = drafts[handle][: int(plan.num_tokens[row]) - 1]
                if tokens:
                    scheduled[req_ids[row]] = tokens
                    num_tokens[row] = 1 + len(tokens)
        return num_tokens, scheduled

    def accept(self, sched: Scheduler, hs: np.ndarray, row_ids: list[str], sampled: list[list[int]],
               scheduled: dict[str, list[int]]) -> np.ndarray:
        """Reports each row's accepted drafts to the core (before any stop, which needs the true
        length); returns the handles the core finished at their max_new_tokens."""
        if not scheduled:
            return np.zeros(0, np.int64)
        accepted = np.fromiter(map(len, sampled), np.int64, len(sampled)) - 1
        rows = np.flatnonzero((accepted > 0) & sched._handles.in_core[hs])
        if sched.log_stats:
            for k, req_id in enumerate(row_ids):
                drafts = scheduled.get(req_id)
                if drafts and sampled[k]:
                    if self.stats is None:
                        self.stats = SpecDecodingStats.new(self.num_speculative_tokens)
                    self.stats.observe_draft(num_draft_tokens=len(drafts), num_accepted_tokens=int(accepted[k]))
        if not rows.size:
            return np.zeros(0, np.int64)
        done = sched.core.accept_drafts(hs[rows], accepted[rows])
        sched._handles.in_core[done] = False
        return done

    def take_stats(self) -> SpecDecodingStats | None:
        stats, self.stats = self.stats, None
        return stats
