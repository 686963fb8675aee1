"""Live migration of running requests between instances (after Llumnix, OSDI'24).

A migration copies a request's KV in stages while its source keeps decoding: the first stage
copies everything computed so far, each later stage what was computed during the one before,
and when what is left is at most ``final_stage_tokens`` (or after ``max_stages``) the source stops
the request, the last stage copies the rest, and the destination runs it from there. Before each
stage the destination reserves the blocks it will receive (all or nothing: ``OutOfBlocks`` aborts
the migration). An aborted migration frees the destination's reservation and changes nothing
on the source, which never stopped the request. The copy time of a stage is the link's latency
plus its bytes over the link's bandwidth.

``MigrationPolicy.pick`` decides who moves where from the instances' loads (plain arrays):
    drain      an instance being drained sends its running requests away;
    pressure   the predicted peak of an instance's running requests exceeds its capacity
               (it will preempt);
    queue      the predicted peak of an instance's running requests leaves no room for the next
               queued one (moving a running request makes room for it; the urgent first under the
               priority policy). Queued requests' own demand is no reason: moving a running request
               would not admit them sooner;
    rebalance  the room its running requests leave (1 - predicted peak / capacity) is the least
               in the fleet and more than ``rebalance_gap`` below the most.
Migration moves running requests, so it measures instances by their running requests' predicted
peak: the source gives its cheapest running request to move (the least KV, decoding); the
destination is the instance whose running requests and next queued one leave the most room, at
least ``min_gain`` more than the source's running requests leave (a drain takes any with room).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import _args
from .dispatch import InstanceLoads


@dataclass(frozen=True)
class Link:
    """The inter-instance link KV travels over."""

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {self.name!r}")
        # Frozen: the checked values are stored as plain floats.
        object.__setattr__(self, "bandwidth_bytes_per_s",
                           _args.real("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s, 0, strict=True))
        object.__setattr__(self, "latency_s", _args.real("latency_s", self.latency_s, 0))

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


# Per-direction figures of common links: NVLink 4 between GPUs of a node (H100: 450 GB/s per
# direction), RDMA at 400 Gb/s (one ConnectX-7 port) and TCP at 25 Gb/s, with typical latencies.
LINKS = {
    "nvlink": Link("nvlink", 450e9, 5e-6),
    "rdma": Link("rdma", 50e9, 10e-6),
    "tcp": Link("tcp", 25e9 / 8, 100e-6),
}

REASONS = ("drain", "pressure", "queue", "rebalance")


@dataclass
class Migration:
    """One migration in flight. ``stage`` counts copies begun; ``copied_tokens`` is what the
    destination holds once the current stage lands at ``event_s``; ``record`` is set once the
    source stopped the request (the last stage)."""

    index: int
    src: int
    dst: int
    reason: str
    started_s: float
    event_s: float
    copied_tokens: int
    preemptions_at_start: int
    stage: int = 1
    record: Optional[object] = None
    downtime_s: float = 0.0


@dataclass
class MigrationStats:
    started: int = 0
    committed: int = 0
    aborted: int = 0
    bytes: int = 0
    stages: int = 0
    downtime_s: list = field(default_factory=list)
    by_reason: dict = field(default_factory=lambda: {r: 0 for r in REASONS})

    def as_dict(self) -> dict:
        downtime = np.asarray(self.downtime_s)
        return {
            "started": self.started, "committed": self.committed, "aborted": self.aborted, "bytes": self.bytes,
            "stages": self.stages, "by_reason": dict(self.by_reason),
            "downtime_p50_ms": float(np.median(downtime) * 1e3) if downtime.size else None,
            "downtime_max_ms": float(downtime.max() * 1e3) if downtime.size else None,
        }


@dataclass(frozen=True)
class MigrationPolicy:
    """When to migrate and the cost model of a copy (see the module docstring)."""

    link: Link = LINKS["rdma"]
    check_interval_s: float = 0.05
    rebalance_gap: float = 0.25
    min_gain: float = 0.1
    max_stages: int = 8
    final_stage_tokens: int = 16
    max_in_flight_per_instance: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.link, Link):
            raise TypeError(f"link must be a kvsched.cluster.Link (e.g. LINKS['rdma']), got {self.link!r}")
        # Frozen: the checked values are stored as plain floats and ints.
        for name in ("check_interval_s", "rebalance_gap", "min_gain"):
            object.__setattr__(self, name, _args.real(name, getattr(self, name), 0))
        for name, minimum in (("max_stages", 1), ("final_stage_tokens", 0), ("max_in_flight_per_instance", 1)):
            object.__setattr__(self, name, _args.integer(name, getattr(self, name), minimum))

    @staticmethod
    def running_room(loads: InstanceLoads) -> np.ndarray:
        """The fraction of each instance's KV its running requests' predicted peak leaves free."""
        return 1.0 - loads.peak_blocks / np.maximum(loads.capacity_blocks, 1)

    def reasons(self, loads: InstanceLoads, num_waiting: np.ndarray, num_running: np.ndarray,
                draining: np.ndarray) -> list:
        """Each instance's reason to send a request away, or None."""
        free = self.running_room(loads)
        takers = loads.available & ~draining
        spread = (free[takers].max() - free.min()) if takers.any() else 0.0
        out: list = []
        for i in range(free.size):
            if num_running[i] == 0:
                out.append(None)
            elif draining[i]:
                out.append("drain")
            elif loads.peak_blocks[i] > loads.capacity_blocks[i]:
                out.append("pressure")
            elif num_waiting[i] > 0 and loads.head_blocks is not None and \
                    loads.peak_blocks[i] + loads.head_blocks[i] > loads.capacity_blocks[i]:
                out.append("queue")  # its running requests keep the next queued one out
            elif spread > self.rebalance_gap and free[i] == free.min():
                out.append("rebalance")
            else:
                out.append(None)
        return out

    def pick(self, loads: InstanceLoads, num_waiting: np.ndarray, num_running: np.ndarray, draining: np.ndarray,
             in_flight: np.ndarray) -> list:
        """(source, destination, reason) pairs to start now; ``in_flight`` counts each instance's
        migrations (either end)."""
        reasons = self.reasons(loads, num_waiting, num_running, draining)
        free = self.running_room(loads)
        # A destination's room also leaves out the request it admits next: one moved in must not
        # keep its own queue waiting.
        head = loads.head_blocks if loads.head_blocks is not None else np.zeros_like(loads.peak_blocks)
        room = free - head / np.maximum(loads.capacity_blocks, 1)
        order = sorted((i for i, r in enumerate(reasons) if r is not None),
                       key=lambda i: (REASONS.index(reasons[i]), free[i]))
        busy = in_flight >= self.max_in_flight_per_instance
        pairs = []
        for src in order:
            if busy[src]:
                continue
            candidates = [d for d in np.argsort(-room, kind="stable").tolist()
                          if d != src and loads.available[d] and not draining[d] and not busy[d]]
            for dst in candidates:
                gain = room[dst] - free[src]
                if room[dst] <= 0 or (reasons[src] != "drain" and gain < self.min_gain):
                    break  # the freest one is not free enough: neither is any other
                pairs.append((src, dst, reasons[src]))
                busy[src] = busy[dst] = True
                break
        return pairs
