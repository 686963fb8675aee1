"""Built-in synthetic workloads whose parameters come from published trace statistics."""

from __future__ import annotations

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
