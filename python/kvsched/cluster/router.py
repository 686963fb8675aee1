"""A router's view of the fleet: loads polled on a timer, and what it placed since.

A real router does not read every instance's load before each request: it polls them on a timer
(Prometheus scrapes, KV events, a load endpoint), and several router replicas decide at once,
none seeing what the others just placed. Between polls every request sees the same loads, so a
burst lands on the instance that looked emptiest at the last poll (a thundering herd).
:class:`Router` keeps one router's view: the last report, plus (``count_placed``) the tokens and
blocks it placed itself since, which the next report replaces.

Glossary
  report         the instances' loads as polled (``InstanceLoads``), ``period_s`` apart; 0 polls
                 before every decision (an oracle no real router has).
  phase          when in the period this router polls: replicas poll at staggered times.
  placed since   tokens and predicted blocks this router sent to each instance after its last
                 report; added to the report's load and taken from its headroom.

Not modelled: reports delivered late (a report's age here is 0 at the poll and grows to
``period_s``), and placements other replicas made (a replica learns them at its next poll only).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from . import _args
from .dispatch import Dispatcher, InstanceLoads


class Router:
    """One router replica: ``dispatcher`` deciding from loads polled every ``period_s`` seconds
    (starting at ``phase_s``), plus what it placed since when ``count_placed``."""

    def __init__(self, dispatcher: Dispatcher, period_s: float = 0.0, count_placed: bool = True,
                 phase_s: float = 0.0):
        if not isinstance(dispatcher, Dispatcher):
            raise TypeError(f"dispatcher must be a kvsched.cluster.Dispatcher, got {dispatcher!r}")
        self.dispatcher = dispatcher
        self.period_s = _args.real("period_s", period_s, 0)
        self.count_placed = _args.flag("count_placed", count_placed)
        self.phase_s = _args.real("phase_s", phase_s, 0)
        self._report: Optional[InstanceLoads] = None
        self._next_poll = -math.inf
        self._placed_tokens: Optional[np.ndarray] = None
        self._placed_blocks: Optional[np.ndarray] = None
        self.polls = 0

    def report(self, loads: InstanceLoads, now: float) -> None:
        """A new report (polled by the caller, or by :meth:`place`): it replaces what was placed since."""
        self._report = loads
        self.polls += 1
        k = loads.available.size
        self._placed_tokens, self._placed_blocks = np.zeros(k, np.int64), np.zeros(k, np.int64)
        if self.period_s > 0:
            self._next_poll = self.phase_s + (math.floor((now - self.phase_s) / self.period_s) + 1) * self.period_s

    def place(self, now: float, poll: Optional[Callable[[], InstanceLoads]], available: np.ndarray,
              request_tokens: np.ndarray, request_blocks: np.ndarray,
              prefix_hits: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """The instance of each request (-1: held by the global queue), decided from this router's
        view at ``now``; ``poll()`` is called when a report is due (None: the caller polls on its
        own timer and hands reports to :meth:`report`). ``available``: the instances that take
        requests now (a router learns at once that one is gone or draining). None when no
        instance takes requests, or there is no report yet."""
        if poll is not None and (self._report is None or now >= self._next_poll):
            self.report(poll(), now)
        report = self._report
        if report is None:
            return None
        view = InstanceLoads(np.asarray(available, bool) & report.available,
                             report.load_tokens + self._placed_tokens, report.headroom_blocks - self._placed_blocks,
                             report.peak_blocks, report.capacity_blocks, report.block_size, report.head_blocks)
        if not view.available.any():
            return None
        placed = self.dispatcher.place(view, request_tokens, request_blocks, prefix_hits)
        if self.count_placed:
            sent = placed >= 0
            np.add.at(self._placed_tokens, placed[sent], np.asarray(request_tokens)[sent])
            np.add.at(self._placed_blocks, placed[sent], np.asarray(request_blocks)[sent])
        return placed
