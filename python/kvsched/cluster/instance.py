"""What the global scheduler asks of an engine instance, and the pools that reach instances.

kvsched.cluster decides placement (``Dispatcher``) and moves (``MigrationPolicy``) from plain
per-instance reports; it never imports an engine. An engine instance is anything that answers the
calls of :class:`Instance`; the simulated engine (``kvsched.sim.engine.EngineInstance``) is one.
A real vLLM engine is reached differently: ``kvsched route`` (``kvsched.cluster.proxy``) polls
the loads it publishes over HTTP and places with the same ``Router`` and ``Dispatcher``.

Glossary
  index      a request's id across the fleet: the same number on every instance it visits.
  pool       the instances, reached through ``call(index, method, *args)`` and ``call_many``: in
             this process (:class:`LocalPool`) or one Ray actor each (``kvsched.cluster.ray.RayPool``).
             A caller sees the same results either way; an instance that stops answering raises
             (or, in ``call_many``, returns) :class:`InstanceLost`.
  stage      one copy of a migrating request's KV: the destination reserves room, the source keeps
             running, stages repeat until the rest is small, then the source lets go
             (``migrate_out``) and the destination resumes it (``commit_incoming``).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np


class InstanceLost(RuntimeError):
    """An instance stopped answering (its process died); ``instance`` is its index in the pool."""

    def __init__(self, instance: int, cause: object = None):
        super().__init__(f"instance {instance} is gone: {cause}")
        self.instance = instance


@runtime_checkable
class Instance(Protocol):
    """The calls a global scheduler makes of one engine instance. Time is the instance's own
    clock in seconds; arrays are int64 request indices unless said otherwise."""

    # ---- requests ----
    def add(self, ids: np.ndarray, arrival_s: np.ndarray) -> None:
        """Takes requests dispatched here."""

    def busy(self) -> bool:
        """Whether a step would do anything (requests waiting, running or just added)."""

    def advance(self, until: float, next_arrival_s: float) -> Any:
        """Steps until ``until`` (or sooner, when an event needs the global scheduler); returns
        what finished and what was rejected, with the instance's clock (the engine's own type)."""

    def take_queued(self) -> np.ndarray:
        """Drops the requests waiting here (a draining instance's go to dispatch again); their ids."""

    def outcome(self) -> dict:
        """Per-request measurements and counters, merged by the caller at the end of a run."""

    # ---- reports for dispatch and migration ----
    def load(self) -> dict:
        """The scheduler's load report (``kvsched.Scheduler.load``) plus the instance's ``clock``."""

    def prefix_hits(self, ids: np.ndarray) -> np.ndarray:
        """Blocks of each request's prompt prefix cached here."""

    def learn_outputs(self, ids: np.ndarray) -> None:
        """Requests that finished on other instances (a fleet-wide history of output lengths):
        the instance's estimator learns their lengths as from its own finishes."""

    def migration_candidate(self, exclude: list) -> Optional[int]:
        """The running request this instance would move out first, or None."""

    # ---- live migration: this instance as the source or the destination ----
    def migration_state(self, index: int) -> Optional[tuple]:
        """(computed tokens, generated tokens, preemptions) of a running request, or None."""

    def reserve_incoming(self, index: int, arrival_s: float, num_generated: int, num_tokens: int) -> Optional[int]:
        """Reserves room for a migrating request's first ``num_tokens``; the tokens cached here
        already, or None when the room is not there (nothing changed)."""

    def extend_incoming(self, index: int, num_tokens: int, num_generated: int) -> bool:
        """Grows the reservation; False when the room is not there (nothing changed)."""

    def cancel_incoming(self, index: int) -> None:
        """Gives back a reservation (the migration was called off)."""

    def migrate_out(self, index: int) -> Any:
        """The last stage at the source: the request leaves; returns its record for the destination."""

    def commit_incoming(self, record: Any, now: float) -> None:
        """The last stage at the destination: the request goes on here with ``record``."""


class LocalPool:
    """Instances in this process."""

    def __init__(self, instances: Sequence[Instance]):
        self.instances = list(instances)

    def __len__(self) -> int:
        return len(self.instances)

    def call(self, index: int, method: str, *args):
        return getattr(self.instances[index], method)(*args)

    def call_many(self, calls: Sequence[tuple]) -> list:
        """[(index, method, args)] -> results in order (an instance in this process is not lost:
        its errors propagate)."""
        return [self.call(i, method, *args) for i, method, args in calls]
