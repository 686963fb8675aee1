"""What the model runner is told each step: kvsched's step plan as vLLM's request data.

A request sent afresh (first scheduled, or resumed where the runner takes resumed requests as new)
becomes a ``NewRequestData`` with its whole block table; a request the runner holds becomes a row of
``CachedRequestData`` with the blocks added this step. The core's block b is vLLM's block b + 1 (vLLM
reserves block 0 for padding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy import count_nonzero
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData
from vllm.v1.request import Request

import kvsched

from . import versions
from .state import RUNNING

if TYPE_CHECKING:
    from .scheduler import Scheduler


def row_blocks(plan: kvsched.StepPlan, row: int) -> list[int]:
    # A request that starts or restarts gets its whole table as new blocks (prefix hits too).
    return (plan.blocks_of(row) + 1).tolist()


def new_request_data(sched: Scheduler, request: Request, plan: kvsched.StepPlan, row: int) -> NewRequestData:
    return versions.new_request_data(request, (row_blocks(plan, row),), sched.use_v2_model_runner, sched.uses_mrope)


def cached_request_data(sched: Scheduler, plan: kvsched.StepPlan, hs: np.ndarray, rows_state: np.ndarray,
                        req_ids: list[str], requests: list[Request], resumed_rows: list[int]) -> CachedRequestData:
    """The rows the runner holds (running last step, or resumed in place by the v1 runner)."""
    indptr = plan.block_indptr
    is_running = rows_state == RUNNING
    # The steady state: every row was running, and rows is 0..n-1 (indexes nothing).
    every_row = bool(rows_state.size) and count_nonzero(is_running) == rows_state.size
    if every_row:
        num_rows = num_running = rows_state.size
    else:
        running = np.flatnonzero(is_running)
        rows = np.concatenate([running, np.asarray(resumed_rows, np.int64)]) if resumed_rows else running
        num_rows, num_running = rows.size, running.size
    new_block_ids: list[tuple[list[int], ...] | None] = [None] * num_rows
    if plan.new_blocks.size:  # most decode steps add no block
        counts = indptr[1:] - indptr[:-1] if every_row else (indptr[1:] - indptr[:-1])[rows]
        starts = indptr[:-1] if every_row else indptr[rows]
        blocks = plan.new_blocks + 1
        for k in np.flatnonzero(counts).tolist():
            new_block_ids[k] = (blocks[starts[k] : starts[k] + counts[k]].tolist(),)
    for k in range(num_running, num_rows):  # resumed: their whole table replaces the old one
        new_block_ids[k] = (row_blocks(plan, int(rows[k])),)
    row_list = None if every_row else rows.tolist()
    cached_ids = list(req_ids) if every_row else [req_ids[r] for r in row_list]
    all_token_ids: dict[str, list[int]] = {}
    # The v1 runner needs the tokens of a request it did not see in the previous step (none, when
    # the previous step had exactly these rows).
    if not sched.use_v2_model_runner and not (every_row and sched._previous_rows == (sched._step_index - 1, req_ids)):
        absent = sched._handles.last_step[hs if every_row else hs[rows]] != sched._step_index - 1
        if count_nonzero(absent):
            absent = np.flatnonzero(absent)
            if not requests:
                requests = sched._handles.request[hs].tolist()
            for k in absent.tolist():
                request = requests[k if every_row else row_list[k]]
                all_token_ids[request.request_id] = list(request.all_token_ids)
    return versions.cached_request_data(
        req_ids=cached_ids,
        resumed_req_ids={req_ids[r] for r in resumed_rows},
        all_token_ids=all_token_ids,
        new_block_ids=new_block_ids,
        num_computed_tokens=(plan.computed_offsets if every_row else plan.computed_offsets[rows]).tolist(),
        num_output_tokens=(plan.num_generated if every_row else plan.num_generated[rows]).tolist(),
    )
