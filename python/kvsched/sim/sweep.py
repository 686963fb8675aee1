"""Load sweeps: the highest arrival rate at which a policy still meets an SLO attainment target."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .driver import FleetSpec, simulate, simulate_fleet
from .engine import SLO, EngineConfig, prepare
from .metrics import slo_met
from .traces import Trace
from .workloads import priority_plan


MAX_RATE_SCALE = 64.0


def attainment_at(trace: Trace, engine: EngineConfig, admission: str, rate_scale: float, slo: SLO,
                  priorities: Optional[str] = None, seed: int = 0, fleet: Optional[FleetSpec] = None) -> float:
    """SLO attainment of ``trace`` at ``rate_scale`` times its rate; with ``priorities`` (a kind of
    :func:`priority_plan`, drawn with ``seed`` on the scaled trace) under changing priorities; over
    a ``fleet`` of instances when given."""
    scaled = trace.with_arrivals(trace.arrival_s / rate_scale)
    prepared = prepare(scaled, engine)
    plan = None if priorities is None else priority_plan(prepared.trace, priorities, seed=seed)
    if fleet is None:
        log = simulate(prepared, engine, admission, priorities=plan)
    else:
        log = simulate_fleet(prepared, engine, admission, fleet, priorities=plan).log
    total = len(prepared.trace) + prepared.rejected_too_long
    return float(slo_met(log, slo).sum() / total)


def max_rate_scale(
    trace: Trace,
    engine: EngineConfig,
    admission: str,
    slo: SLO,
    target: float = 0.9,
    iterations: int = 7,
    on_run: Callable[[], None] | None = None,
    priorities: Optional[str] = None,
    seed: int = 0,
    fleet: Optional[FleetSpec] = None,
) -> float:
    """The largest rate scale (bisection, geometric) whose attainment is at least ``target``;
    0.0 when even 1/64 of the trace's rate misses it, and :data:`MAX_RATE_SCALE` when 64 times it
    still meets it (a session trace may: its later turns keep their own pace however fast the
    sessions start)."""

    def meets(scale: float) -> bool:
        if on_run is not None:
            on_run()
        return attainment_at(trace, engine, admission, scale, slo, priorities, seed, fleet) >= target

    low, high = 1.0, 1.0
    if meets(1.0):
        while high < MAX_RATE_SCALE and meets(high * 2):
            high *= 2
        if high >= MAX_RATE_SCALE:
            return MAX_RATE_SCALE
        low, high = high, high * 2
    else:
        while not meets(low / 2):
            low /= 2
            if low < 1 / 64:
                return 0.0
        low, high = low / 2, low
    for _ in range(iterations):
        middle = float(np.sqrt(low * high))
        if meets(middle):
            low = middle
        else:
            high = middle
    return low
