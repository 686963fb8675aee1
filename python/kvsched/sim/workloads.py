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
