"""Dispatch: which instance gets each new request, decided for a batch in one native call.

The instances' state comes in as plain arrays, one entry per instance (``InstanceLoads``, built
from each scheduler's ``load()``); the decision is ``kvsched._core.dispatch`` (see
cpp/include/kvsched/dispatch.h for the policies).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .. import _core
from . import _args

DISPATCH_POLICIES = ("round_robin", "least_load", "headroom", "prefix_affinity")


@dataclass
class InstanceLoads:
    """One entry per instance: whether it takes new requests, its load in tokens (running and
    queued), its headroom (capacity minus the predicted peak of every live request, in blocks,
    negative when it will have to preempt or queue), its predicted peak of running requests alone,
    its capacity, and the predicted blocks of the request it admits next."""

    available: np.ndarray
    load_tokens: np.ndarray
    headroom_blocks: np.ndarray
    peak_blocks: np.ndarray
    capacity_blocks: np.ndarray
    block_size: int
    head_blocks: Optional[np.ndarray] = None  # what the next queued request adds to peak_blocks (0: none)

    @classmethod
    def from_reports(cls, reports: Sequence[Optional[dict]], available: np.ndarray, block_size: int) -> "InstanceLoads":
        """From each instance's ``Scheduler.load()`` (None for one that is gone)."""
        def column(name: str) -> np.ndarray:
            return np.array([r[name] if r is not None else 0 for r in reports], np.int64)
        capacity = column("capacity_blocks")
        return cls(
            available=np.asarray(available, bool) & np.array([r is not None for r in reports]),
            load_tokens=column("running_tokens") + column("queued_tokens"),
            headroom_blocks=capacity - column("demand_blocks"),
            peak_blocks=column("peak_blocks"),
            capacity_blocks=capacity,
            block_size=block_size,
            head_blocks=column("head_blocks"),
        )


class Dispatcher:
    """Places batches of requests by ``policy`` (one of DISPATCH_POLICIES). Loads are compared as
    shares of each instance's KV capacity (a large instance of an unequal fleet takes more).
    ``imbalance_limit`` bounds prefix affinity: an instance whose load share exceeds the least
    loaded one's by more than this is not chosen for its cache. With ``global_queue``, only an
    instance with room for a request (headroom for its predicted blocks, or nothing live) takes
    it; one that fits nowhere waits at the dispatcher (``place`` gives -1), first come first
    served, for the first instance that frees room."""

    def __init__(self, policy: str, imbalance_limit: float = 0.1, global_queue: bool = False):
        if not isinstance(policy, str):
            raise TypeError(f"dispatch policy must be a str, one of {DISPATCH_POLICIES}, got {policy!r}")
        if policy not in DISPATCH_POLICIES:
            raise ValueError(f"dispatch policy must be one of {DISPATCH_POLICIES}, got {policy!r}")
        self.policy = policy
        self.imbalance_limit = _args.real("imbalance_limit", imbalance_limit, 0)
        self.global_queue = _args.flag("global_queue", global_queue)
        self._next = 0  # the round-robin cursor
        self._lock = threading.Lock()  # place() from several router threads: one at a time

    @property
    def uses_prefix_hits(self) -> bool:
        return self.policy == "prefix_affinity"

    @property
    def uses_loads(self) -> bool:
        return self.policy != "round_robin" or self.global_queue

    def place(self, loads: InstanceLoads, request_tokens: np.ndarray, request_blocks: np.ndarray,
              prefix_hits: Optional[np.ndarray] = None) -> np.ndarray:
        """The instance of each request, -1 for one held (``prefix_hits``: requests x instances, for
        prefix affinity)."""
        hits = None
        if self.uses_prefix_hits:
            if prefix_hits is None:
                raise ValueError("prefix_hits: prefix_affinity needs each request's cached blocks per instance")
            hits = prefix_hits  # checked natively: shape (requests, instances), integers >= 0
        block_size = loads.block_size
        if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"loads.block_size must be an int >= 1, got {block_size!r}")
        capacity = np.asarray(loads.capacity_blocks)
        if capacity.dtype.kind not in "iu":
            raise TypeError(f"loads.capacity_blocks must be integers, got dtype {capacity.dtype}")
        if capacity.size and (capacity.min() < 0 or capacity.max() > (1 << 60) // int(block_size)):
            raise ValueError("loads.capacity_blocks times block_size must be in [0, 2**60]")
        capacity_tokens = capacity.astype(np.int64) * int(block_size)
        with self._lock:
            placed, self._next = _core.dispatch(
                DISPATCH_POLICIES.index(self.policy), loads.available, loads.load_tokens, loads.headroom_blocks,
                capacity_tokens,  # the loads as given: dtypes, shapes and ranges are checked natively
                request_tokens, request_blocks, hits,  # the caller's: the native call checks dtype, shape and range
                self.imbalance_limit, self._next, self.global_queue)
        return placed
