"""Which requests a failed KV copy touched, so that only they are recomputed.

kvsched's KV connector reports, with a step's output, the blocks a failed copy was writing
(``connector.py``: device blocks as vLLM ids, host blocks h as ``-1 - h``). By the time that output
arrives the adapter may have scheduled later steps (asynchronous scheduling), which may already
have read the bad blocks or copied them on. ``touched_requests`` follows the bad bytes through the
reported step and every later step in flight, in each step's copy order (the out copies, device ->
host, then the loads, host -> device, then the forward pass), and returns the requests whose KV
they reached. Copies that overlap the forward pass run after it (kvsched.step_copies), but they touch no
block a row of their step uses, and an overlapping write-through writes no host block a load of
its step reads, so the trace is the same in either order:

- a step's rows whose block tables hold a bad device block (a request that started or restarted in
  a step is sent its whole table, and a running one only its new blocks, but a running request's
  older blocks were computed by its own forward passes, which a failed copy does not reach);
- requests swapped out of bad device blocks (their host copy is bad) and, in the reported step,
  those whose swap-out copies failed;
- requests swapped in or loaded from bad host blocks (a step's loads may read what its own failed
  out copies were writing: they run after them), and those whose swap-in or host-tier load failed
  (a prefetched request has no row in the step that loads it).

A device block loaded from a bad host block is bad, and a host block written from a bad device block
is bad, from that step on. Blocks freed and given to another request count as bad too: that request
is recomputed without need (rare; never wrong).

Glossary
  plan    a ``kvsched.StepPlan``; block ids in it are the core's (vLLM's id - 1).
  extent  a copy's ``(src_block, dst_block, n_blocks)`` row, read with ``kvsched.block_copier``'s
          ``extent_blocks`` and ``extent_touches``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

import kvsched
from kvsched.block_copier import extent_blocks, extent_touches


def split_reported(block_ids: Iterable[int]) -> tuple[set, set]:
    """(bad device blocks, bad host blocks) in the core's ids, from the connector's report."""
    device, host = set(), set()
    for block in block_ids:
        if block >= 0:
            device.add(block - 1)
        else:
            host.add(-1 - block)
    return device, host


def _copied(extents: np.ndarray, bad_sources: set) -> tuple[np.ndarray, np.ndarray]:
    """Per extent whether it read a bad source block, and the destination blocks those wrote."""
    reads_bad = extent_touches(extents, 0, bad_sources)
    return reads_bad, extent_blocks(np.asarray(extents).reshape(-1, 3)[reads_bad], 1)


def _owners(ids: np.ndarray, indptr: np.ndarray, extent_flags: np.ndarray) -> set:
    """The requests of a swap list (ids, extent indptr) with at least one flagged extent."""
    if not extent_flags.any():
        return set()
    return {int(ids[i]) for i in range(ids.size) if extent_flags[indptr[i]:indptr[i + 1]].any()}


def touched_requests(bad_device: set, bad_host: set, plans: Sequence[kvsched.StepPlan]) -> set:
    """Handles whose KV the bad blocks reached, through ``plans`` (the reported step first, then the
    later ones in flight, in order). ``bad_device`` and ``bad_host`` are what the reported step's
    copies failed to write; copies carry them on."""
    bad_device, bad_host = set(bad_device), set(bad_host)
    touched: set = set()
    for index, plan in enumerate(plans):
        if index == 0:
            # The reported step's own copies that failed: the requests they were writing for (a
            # prefetched request has no row in this step, so its load must name it).
            touched |= _owners(plan.swapped_out_ids, plan.swap_out_indptr, extent_touches(plan.swap_out, 1, bad_host))
            touched |= _owners(plan.swapped_in_ids, plan.swap_in_indptr, extent_touches(plan.swap_in, 1, bad_device))
            touched |= _owners(plan.cache_load_ids, plan.cache_load_indptr, extent_touches(plan.cache_load, 1, bad_device))
        else:
            # Out copies run first and read the device as the earlier steps left it.
            swapped, written = _copied(plan.swap_out, bad_device)
            touched |= _owners(plan.swapped_out_ids, plan.swap_out_indptr, swapped)
            bad_host.update(written.tolist())
            bad_host.update(_copied(plan.cache_write, bad_device)[1].tolist())
        # Then the loads, which may read host blocks this very step's out copies wrote: from a bad
        # host block, the device block is bad.
        swapped_in, written = _copied(plan.swap_in, bad_host)
        touched |= _owners(plan.swapped_in_ids, plan.swap_in_indptr, swapped_in)
        bad_device.update(written.tolist())
        loaded, written = _copied(plan.cache_load, bad_host)
        touched |= _owners(plan.cache_load_ids, plan.cache_load_indptr, loaded)
        bad_device.update(written.tolist())
        if bad_device and len(plan):
            hit = np.isin(plan.new_blocks, np.fromiter(bad_device, np.int64, len(bad_device)))
            if hit.any():
                row_of_block = np.searchsorted(plan.block_indptr, np.flatnonzero(hit), side="right") - 1
                touched.update(plan.req_ids[np.unique(row_of_block)].tolist())
    return touched


__all__ = ["split_reported", "touched_requests"]
