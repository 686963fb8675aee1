"""Built-in synthetic workloads whose parameters come from published trace statistics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .traces import Trace

# Azure LLM inference trace 2023, conversation service: input mean 1155 / median 1020 tokens,
# output mean 211 / median 129, about 5.5 requests/s with near-Poisson arrivals.
AZURE_CONV_STATS = {"input_mean": 1155.0, "input_median": 1020.0, "output_mean": 211.0, "output_median": 129.0}


def _lognormal(rng: np.random.Generator, mean: float, median: float, size: int) -> np.ndarray:
    # For a log-normal, median = exp(mu) and mean = exp(mu + sigma^2 / 2).
    mu = np.log(median)
    sigma = np.sqrt(2.0 * np.log(mean / median))
    return rng.lognormal(mu, sigma, size)


def synthetic_chat(num_requests: int, rate_per_s: float = 5.5, seed: int = 0, max_tokens: int = 8192) -> Trace:
    """Chat requests with log-normal lengths fitted to the Azure conv statistics, Poisson arrivals."""
    if num_requests <= 0:
        raise ValueError(f"num_requests must be > 0, got {num_requests}")
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    rng = np.random.default_rng(seed)
    s = AZURE_CONV_STATS
    prompts = np.clip(_lognormal(rng, s["input_mean"], s["input_median"], num_requests), 1, max_tokens)
    outputs = np.clip(_lognormal(rng, s["output_mean"], s["output_median"], num_requests), 1, max_tokens)
    arrival = np.cumsum(rng.exponential(1.0 / rate_per_s, num_requests))
    return Trace(arrival - arrival[0], prompts.astype(np.int64), outputs.astype(np.int64))


# Azure code completion (2023): input median ~1500 / mean ~2048, output median 13 / mean 28.
AZURE_CODE_STATS = {"input_mean": 2048.0, "input_median": 1500.0, "output_mean": 28.0, "output_median": 13.0}
# Mooncake (FAST'25) reports an average input of 7,590 and output of 182 tokens (long contexts).
LONG_CONTEXT_STATS = {"input_mean": 7590.0, "input_median": 6000.0, "output_mean": 182.0, "output_median": 100.0}
# Decode-heavy chat in the manner of ShareGPT: short prompts, outputs longer than prompts.
DECODE_HEAVY_STATS = {"input_mean": 300.0, "input_median": 150.0, "output_mean": 450.0, "output_median": 350.0}

WORKLOADS = {
    "chat": AZURE_CONV_STATS,
    "code": AZURE_CODE_STATS,
    "long_context": LONG_CONTEXT_STATS,
    "decode_heavy": DECODE_HEAVY_STATS,
}


def poisson_arrivals(count: int, rate_per_s: float, seed: int = 0, burstiness: float = 1.0) -> np.ndarray:
    """Arrival times (s, from 0) with Gamma inter-arrivals of mean 1/rate; burstiness is the
    squared coefficient of variation (1: Poisson, > 1: burstier)."""
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = np.random.default_rng(seed)
    shape = 1.0 / burstiness
    gaps = rng.gamma(shape, 1.0 / (rate_per_s * shape), count)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic(name: str, num_requests: int, rate_per_s: float, seed: int = 0, max_tokens: int = 8192) -> Trace:
    """A built-in workload from :data:`WORKLOADS`: log-normal lengths fitted to its published mean
    and median, Poisson arrivals at ``rate_per_s``."""
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {name!r}")
    if num_requests <= 0:
        raise ValueError(f"num_requests must be > 0, got {num_requests}")
    rng = np.random.default_rng(seed)
    s = WORKLOADS[name]
    prompts = np.clip(_lognormal(rng, s["input_mean"], s["input_median"], num_requests), 1, max_tokens)
    outputs = np.clip(_lognormal(rng, s["output_mean"], s["output_median"], num_requests), 1, max_tokens)
    arrival = poisson_arrivals(num_requests, rate_per_s, seed + 1)
    return Trace(arrival, prompts.astype(np.int64), outputs.astype(np.int64))


@dataclass(frozen=True)
class PriorityPlan:
    """Priorities of a prepared trace's requests (0 is the most urgent) and how they change while
    the requests live: at ``change_s[k]``, request ``change_index[k]`` takes ``change_priority[k]``
    (changes to a request that has ended are ignored by the engine)."""

    initial: np.ndarray
    change_s: np.ndarray
    change_index: np.ndarray
    change_priority: np.ndarray


PRIORITY_KINDS = ("random", "markov")


def priority_plan(trace: Trace, kind: str, num_classes: int = 3, interval_s: float = 2.0, horizon_s: float = 120.0,
                  stay: float = 0.8, seed: int = 0) -> PriorityPlan:
    """Priorities that change every ``interval_s`` for ``horizon_s`` after each arrival, as in
    FastSwitch's evaluation: ``random`` draws a new class uniformly each time; ``markov`` keeps the
    class with probability ``stay`` and otherwise moves one class up or down (reflected at the ends)."""
    if kind not in PRIORITY_KINDS:
        raise ValueError(f"priorities must be one of {', '.join(PRIORITY_KINDS)}, got {kind!r}")
    if num_classes < 2 or interval_s <= 0 or horizon_s < interval_s or not 0 <= stay <= 1:
        raise ValueError("priority_plan: need num_classes >= 2, 0 < interval_s <= horizon_s, 0 <= stay <= 1")
    rng = np.random.default_rng(seed)
    n = len(trace)
    initial = rng.integers(0, num_classes, n)
    steps = int(horizon_s // interval_s)
    current = initial.copy()
    columns = []
    for _ in range(steps):  # vectorized over requests; one pass per change time
        if kind == "random":
            current = rng.integers(0, num_classes, n)
        else:
            move = np.where(rng.random(n) < 0.5, -1, 1) * (rng.random(n) >= stay)
            outside = (current + move < 0) | (current + move >= num_classes)
            current = current + np.where(outside, -move, move)  # reflect at the ends
        columns.append(current)
    priority = np.stack(columns, axis=1).reshape(-1) if columns else np.zeros(0, np.int64)
    index = np.repeat(np.arange(n), steps)
    times = (trace.arrival_s[:, None] + interval_s * np.arange(1, steps + 1)[None, :]).reshape(-1)
    order = np.argsort(times, kind="stable")
    return PriorityPlan(initial.astype(np.float64), times[order], index[order], priority[order].astype(np.float64))
