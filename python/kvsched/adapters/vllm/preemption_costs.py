"""What a copy and a recompute cost on this engine, measured: the prices ``preemption: "auto"`` and
the host tier weigh against each other.

A swap or a host-tier load is chosen when the swap cost model says the copy beats recomputing the
tokens at ``recompute_seconds_per_token``. Both sides are measured here unless the user set them:

  copy       on an engine whose KV cache is in host memory (a CPU engine), the swap cost table is
             timed at start: memmove bandwidth, and the cost of one more descriptor, on this
             machine (``kvsched.swap.host_copy_cost``, called by config.py). On CUDA the engine core has no GPU to time, and the table
             stays the default (published PCIe figures; ``kvsched.cuda.calibrate_swap_cost``
             measures one on a GPU).
  recompute  each step's period, rows and scheduled tokens are fitted (``kvsched.risk.RiskPricer``:
             seconds = a + b x rows + c x tokens) every REFIT_STEPS steps; a recomputed token costs c
             (its marginal cost in a step), set on the core between steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger

from kvsched.risk import RiskPricer

from .admission_risk import StepClock
from .state import LOGGER_NAME

if TYPE_CHECKING:
    import kvsched

REFIT_STEPS = 64


class RecomputeCost(StepClock):
    """Sets the core's ``recompute_seconds_per_token`` from the engine's measured steps."""

    def __init__(self, core: kvsched.Scheduler) -> None:
        super().__init__()
        self.core = core
        self.fitter = RiskPricer(num_scenarios=1)  # its step-cost fit only
        self._since_fit = 0

    def observe(self, seconds: float, rows: int, tokens: int) -> None:
        self.fitter.observe(seconds, rows, tokens)
        self._since_fit += 1
        if self._since_fit < REFIT_STEPS:
            return
        self._since_fit = 0
        cost = self.fitter.fit()
        if cost is None or cost.c <= 0:
            return
        old = self.core.config.recompute_seconds_per_token
        self.core.set_recompute_seconds_per_token(cost.c)
        if abs(cost.c - old) > 0.25 * old:
            init_logger(LOGGER_NAME).info("kvsched preemption costs: a recomputed token %.4f ms (was %.4f ms)",
                                          cost.c * 1e3, old * 1e3)
