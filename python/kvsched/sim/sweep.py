"""Load sweeps: the highest arrival rate at which a policy still meets an SLO attainment target."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .engine import SLO, EngineConfig, prepare, simulate
from .metrics import slo_met
from .traces import Trace


def attainment_at(trace: Trace, engine: EngineConfig, admission: str, rate_scale: float, slo: SLO) -> float:
    scaled = trace.with_arrivals(trace.arrival_s / rate_scale)
    prepared = prepare(scaled, engine)
    log = simulate(prepared, engine, admission)
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
) -> float:
    """The largest rate scale (bisection, geometric) whose attainment is at least ``target``;
    0.0 when even 1/64 of the trace's rate misses it."""

    def meets(scale: float) -> bool:
        if on_run is not None:
            on_run()
        return attainment_at(trace, engine, admission, scale, slo) >= target

    low, high = 1.0, 1.0
    if meets(1.0):
        while meets(high * 2) and high < 64:
            high *= 2
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
