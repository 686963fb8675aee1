"""When each request of a trace reaches the engine.

Requests without a parent arrive at their trace time. A request with a parent (the next turn of a
conversation, a closed-loop client's next request) arrives ``think_s`` after its parent finishes;
if the parent never finishes (rejected), neither it nor the rest of its session arrives.
"""

from __future__ import annotations

import heapq

import numpy as np

from .traces import Trace


class ArrivalQueue:
    """Hands out due request indices in arrival order; ``arrival_s`` holds the real arrival times
    (NaN for a follower not sent yet)."""

    def __init__(self, trace: Trace):
        n = len(trace)
        roots = np.arange(n, dtype=np.int64)
        self.arrival_s = trace.arrival_s.astype(np.float64, copy=True)
        self._child = np.full(n, -1, np.int64)
        self._think = trace.think_s
        if trace.has_sessions:
            followers = np.flatnonzero(trace.parent_index >= 0)
            self._child[trace.parent_index[followers]] = followers
            roots = np.flatnonzero(trace.parent_index < 0)
            self.arrival_s[followers] = np.nan
        self._roots = roots[np.argsort(self.arrival_s[roots], kind="stable")]
        self._root_times = self.arrival_s[self._roots]
        self._next_root = 0
        self._followers: list = []  # heap of (arrival time, index)

    def next_time(self) -> float:
        """When the next request arrives (inf when none is scheduled to)."""
        root = self._root_times[self._next_root] if self._next_root < self._roots.size else np.inf
        follower = self._followers[0][0] if self._followers else np.inf
        return float(min(root, follower))

    def due(self, now: float) -> np.ndarray:
        """Indices of the requests arrived by ``now`` and not handed out yet, in arrival order."""
        end = int(np.searchsorted(self._root_times, now, side="right"))
        roots = self._roots[self._next_root:end]
        self._next_root = max(self._next_root, end)
        if not self._followers or self._followers[0][0] > now:
            return roots
        followers = []
        while self._followers and self._followers[0][0] <= now:
            followers.append(heapq.heappop(self._followers)[1])
        ids = np.concatenate([roots, np.array(followers, np.int64)])
        return ids[np.argsort(self.arrival_s[ids], kind="stable")]

    def finished(self, ids: np.ndarray, now: float) -> None:
        """``ids`` finished at ``now``: their followers are sent after their think time."""
        children = self._child[ids]
        for child in children[children >= 0].tolist():
            self.arrival_s[child] = now + float(self._think[child])
            heapq.heappush(self._followers, (self.arrival_s[child], child))

    def cancelled(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` will never finish: returns the followers that will therefore never arrive."""
        lost = []
        frontier = self._child[ids]
        frontier = frontier[frontier >= 0]
        while frontier.size:
            lost.append(frontier)
            frontier = self._child[frontier]
            frontier = frontier[frontier >= 0]
        return np.concatenate(lost) if lost else np.zeros(0, np.int64)
