"""``overflow_scenarios: "auto"``: admission's risk priced from this engine's measured steps (the
adapter's default wherever admission draws scenarios: config.py).

The adapter times each step as the interval between consecutive ``update_from_output()`` calls (the
engine's step period: forward pass plus scheduling, in synchronous and asynchronous scheduling
alike; the clock restarts after the engine ran out of requests, and the pricer leaves out a step
far slower than its fit) and reports it, with the step's rows and scheduled tokens, to
:class:`kvsched.risk.PricedAdmission`, which sets the core's ``overflow_scenarios``; a change is
logged with the fitted step cost.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

from vllm.logger import init_logger

from kvsched.risk import PricedAdmission, StepCost

from .state import LOGGER_NAME

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

    import kvsched

REPRICE_STEPS = 64


def _log_change(old: int, new: int, cost: StepCost) -> None:
    init_logger(LOGGER_NAME).info(
        "kvsched admission risk: overflow_scenarios %d -> %d (step %.3f ms + %.4f ms/row + %.5f ms/token)",
        old, new, cost.a * 1e3, cost.b * 1e3, cost.c * 1e3)


class StepClock:
    """Times the engine's steps as the periods between update_from_output() calls and hands each
    period, with the step's rows and scheduled tokens, to ``observe``."""

    def __init__(self) -> None:
        self._last_update: float | None = None

    def idle(self) -> None:
        """No request is left: the engine stops stepping, and the wait until the next one is no step."""
        self._last_update = None

    def step_reported(self, output: SchedulerOutput) -> None:
        """At the start of update_from_output() for ``output``."""
        now = perf_counter()
        if self._last_update is not None:
            self.observe(now - self._last_update, len(output.num_scheduled_tokens), output.total_num_scheduled_tokens)
        self._last_update = now

    def observe(self, seconds: float, rows: int, tokens: int) -> None:
        raise NotImplementedError


class PricedRisk(StepClock):
    def __init__(self, core: kvsched.Scheduler) -> None:
        super().__init__()
        self.admission = PricedAdmission(core, REPRICE_STEPS, on_change=_log_change)

    @property
    def overflow_scenarios(self) -> int:
        return self.admission.overflow_scenarios

    def finished(self, num_output_tokens: int) -> None:
        self.admission.finished(num_output_tokens)

    def observe(self, seconds: float, rows: int, tokens: int) -> None:
        self.admission.step(seconds, rows, tokens)
