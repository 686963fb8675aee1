"""Scheduling policies: each turns request attributes into ordering keys, in bulk.

The batch former (C++) orders waiting requests by key (smaller first; ties by arrival) and picks
preemption victims from the largest keys. A policy only computes keys with numpy, when requests
are added and, if it needs to, after each step; it never loops over requests in Python.

Write your own by subclassing :class:`Policy`::

    class ShortestPromptFirst(kvsched.policies.Policy):
        name = "spf"
        def keys(self, requests):
            return requests.prompt_lens.astype(np.float64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .scheduler import Scheduler, StepPlan


@dataclass(frozen=True)
class NewRequests:
    """The attributes of requests being added, as equal-length arrays."""

    req_ids: np.ndarray  # int64
    prompt_lens: np.ndarray  # int64
    max_new_tokens: np.ndarray  # int64
    arrival_times: np.ndarray  # float64, seconds
    priorities: np.ndarray  # float64, smaller is more urgent
    class_ids: np.ndarray  # int32
    client_ids: np.ndarray  # int32


class Policy:
    """Base policy: first come, first served."""

    name = "fcfs"
    #: Whether a waiting request with a smaller key may preempt running requests with larger ones.
    preempts_running = False

    def keys(self, requests: NewRequests) -> np.ndarray:
        """Ordering keys (float64, one per request) for requests being added."""
        return requests.arrival_times

    def on_priority_change(self, req_ids: np.ndarray, priorities: np.ndarray) -> np.ndarray | None:
        """New keys after a priority change, or None when this policy ignores priorities."""
        return None

    def after_update(self, scheduler: Scheduler, plan: StepPlan, num_new_tokens: np.ndarray) -> None:
        """Called after each ``update()``; may re-key requests through the scheduler."""

    def after_drafts(self, scheduler: Scheduler, client_ids: np.ndarray, num_accepted: np.ndarray) -> None:
        """Called after ``accept_drafts()`` with each request's client and its accepted draft tokens
        (output tokens the step's report did not count); may re-key through the scheduler."""


class FCFS(Policy):
    """First come, first served: key = arrival time."""


class PriorityPolicy(Policy):
    """Strict priority (smaller value first, as in vLLM), FCFS within a priority. A waiting request
    of higher priority preempts running ones of lower priority when it cannot be admitted otherwise."""

    name = "priority"
    preempts_running = True

    def keys(self, requests: NewRequests) -> np.ndarray:
        return requests.priorities

    def on_priority_change(self, req_ids: np.ndarray, priorities: np.ndarray) -> np.ndarray | None:
        return priorities


class DeadlinePolicy(Policy):
    """Earliest TTFT deadline first: key = arrival + the class's TTFT SLO. Waiting requests age by
    construction: an old request's deadline is earlier than any newcomer's of the same class.

    ``ttft_slo_s`` is one SLO for all classes, or a sequence indexed by class id.
    """

    name = "deadline"

    def __init__(self, ttft_slo_s: float | list[float] | np.ndarray = 2.0) -> None:
        slo = np.atleast_1d(np.asarray(ttft_slo_s, dtype=np.float64))
        if slo.ndim != 1 or slo.size == 0 or not np.all(np.isfinite(slo)) or np.any(slo <= 0):
            raise ValueError(f"ttft_slo_s must be positive and finite, got {ttft_slo_s!r}")
        self.ttft_slo_s = slo

    def keys(self, requests: NewRequests) -> np.ndarray:
        if self.ttft_slo_s.size == 1:
            return requests.arrival_times + self.ttft_slo_s[0]
        if requests.class_ids.size and int(requests.class_ids.max()) >= self.ttft_slo_s.size:
            raise ValueError(
                f"class_ids: class {int(requests.class_ids.max())} has no TTFT SLO "
                f"(ttft_slo_s has {self.ttft_slo_s.size} entries)"
            )
        return requests.arrival_times + self.ttft_slo_s[requests.class_ids]


_MAX_COUNTER = 1e300


class FairSharePolicy(Policy):
    """Fair share across clients by virtual token counters (VTC, Sheng et al., OSDI'24).

    Each client has a counter of the service it received (``input_weight`` per prefill token,
    ``output_weight`` per generated token); its requests are keyed by that counter, so the least
    served client goes first. A client that (re)appears is lifted to the smallest counter among the
    clients served in the last step (the floor), so idling does not bank credit.

    Memory grows with the clients that are ahead of the floor, not with client id values or every
    client ever seen: counters live in a table sorted by client id, and clients at or below the
    floor that were not served in the last step are dropped once the table doubles. A dropped
    client that comes back starts at the floor, which is where the lift would put it anyway.
    """

    name = "vtc"

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        for name, value in (("input_weight", input_weight), ("output_weight", output_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        self.input_weight = float(input_weight)
        self.output_weight = float(output_weight)
        self._clients = np.zeros(0, dtype=np.int64)  # sorted client ids
        self._counters = np.zeros(0, dtype=np.float64)  # their counters
        self._floor = 0.0
        self._prune_at = 1024  # table size that triggers the next prune

    def counter(self, client_ids: np.ndarray) -> np.ndarray:
        """Current counters of clients (the floor for a client the table does not hold)."""
        clients = np.atleast_1d(np.asarray(client_ids, dtype=np.int64))
        pos, known = self._find(clients)
        out = np.full(clients.shape, self._floor)
        out[known] = self._counters[pos[known]]
        return out

    def _find(self, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.searchsorted(self._clients, clients)
        if self._clients.size == 0:
            return pos, np.zeros(clients.shape, dtype=bool)
        known = self._clients[np.minimum(pos, self._clients.size - 1)] == clients
        return pos, known & (pos < self._clients.size)

    def _positions(self, clients: np.ndarray) -> np.ndarray:
        """Table positions of the clients, adding the new ones at the floor."""
        pos, known = self._find(clients)
        if not known.all():
            new = np.unique(clients[~known])
            merged = np.concatenate([self._clients, new])
            order = np.argsort(merged, kind="stable")
            self._clients = merged[order]
            self._counters = np.concatenate([self._counters, np.full(new.size, self._floor)])[order]
            pos, _ = self._find(clients)
        return pos

    def keys(self, requests: NewRequests) -> np.ndarray:
        if not requests.client_ids.size:
            return np.zeros(0, dtype=np.float64)
        # A lookup only: a client joins the table when it is first served (after_update), so adds
        # that are refused, or aborted before they run, leave nothing behind.
        clients = np.asarray(requests.client_ids, dtype=np.int64)
        pos, known = self._find(clients)
        keys = np.full(clients.shape, self._floor)
        lifted = np.maximum(self._counters[pos[known]], self._floor)  # a returning client banks no credit
        self._counters[pos[known]] = lifted
        keys[known] = lifted
        return keys

    def after_update(self, scheduler: Scheduler, plan: StepPlan, num_new_tokens: np.ndarray) -> None:
        if len(plan) == 0:
            return
        with np.errstate(over="ignore"):  # huge weights saturate below (inf is clipped to the max)
            service = np.where(plan.is_prefill, self.input_weight * plan.num_tokens, 0.0)
            service += self.output_weight * num_new_tokens
        self._charge(scheduler, np.asarray(plan.client_ids, dtype=np.int64), service)

    def after_drafts(self, scheduler: Scheduler, client_ids: np.ndarray, num_accepted: np.ndarray) -> None:
        with np.errstate(over="ignore"):
            service = self.output_weight * np.asarray(num_accepted, dtype=np.float64)
        # The floor stays: these clients are a subset of the step's, whose minimum set it.
        self._charge(scheduler, np.asarray(client_ids, dtype=np.int64), service, move_floor=False)

    def _charge(self, scheduler: Scheduler, clients: np.ndarray, service: np.ndarray, move_floor: bool = True) -> None:
        """Adds each row's service to its client's counter and re-keys the clients served; the
        floor (what a returning client starts from) becomes the least counter among them."""
        with np.errstate(over="ignore"):
            pos = self._positions(clients)
            np.add.at(self._counters, pos, service)
        np.minimum(self._counters, _MAX_COUNTER, out=self._counters)  # huge weights saturate, never inf
        served = np.unique(clients)
        served_pos = self._positions(served)
        if move_floor:
            self._floor = float(self._counters[served_pos].min())
        scheduler.set_client_keys(served, self._counters[served_pos])
        if self._clients.size >= self._prune_at:
            keep = self._counters > self._floor
            keep[served_pos] = True
            self._clients, self._counters = self._clients[keep], self._counters[keep]
            self._prune_at = max(1024, 2 * self._clients.size)


_BUILT_IN = {"fcfs": FCFS, "priority": PriorityPolicy, "deadline": DeadlinePolicy, "vtc": FairSharePolicy}


def make_policy(policy: str | Policy) -> Policy:
    """A policy instance from a name (fcfs, priority, deadline, vtc) or an instance."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str) and policy in _BUILT_IN:
        return _BUILT_IN[policy]()
    raise ValueError(f"policy must be one of {sorted(_BUILT_IN)} or a kvsched.policies.Policy, got {policy!r}")


__all__ = ["FCFS", "DeadlinePolicy", "FairSharePolicy", "NewRequests", "Policy", "PriorityPolicy", "make_policy"]
