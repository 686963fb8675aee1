"""Built-in synthetic workloads whose parameters come from published trace statistics."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

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
    if not 0 < rate_per_s < np.inf:
        raise ValueError(f"rate_per_s must be finite and > 0, got {rate_per_s}")
    rng = np.random.default_rng(seed)
    s = AZURE_CONV_STATS
    prompts = np.clip(_lognormal(rng, s["input_mean"], s["input_median"], num_requests), 1, max_tokens)
    outputs = np.clip(_lognormal(rng, s["output_mean"], s["output_median"], num_requests), 1, max_tokens)
    arrival = np.cumsum(rng.exponential(1.0 / rate_per_s, num_requests))
    return Trace(arrival - arrival[0], prompts.astype(np.int64), outputs.astype(np.int64))


# Azure code completion (2023): input median ~1500 / mean ~2048, output median 13 / mean 28.
AZURE_CODE_STATS = {"input_mean": 2048.0, "input_median": 1500.0, "output_mean": 28.0, "output_median": 13.0}
# Mooncake (FAST'25) reports an average input of 7,590 and output of 182 tokens (long contexts).
# Prompts are cut at 32k tokens (the median is this simulator's assumption; a third of the prompts
# exceed 8k, so the workload runs with a 32k context by default).
LONG_CONTEXT_STATS = {"input_mean": 7590.0, "input_median": 6000.0, "output_mean": 182.0, "output_median": 100.0,
                      "prompt_limit": 32768}
# Decode-heavy chat in the manner of ShareGPT: short prompts, outputs longer than prompts.
DECODE_HEAVY_STATS = {"input_mean": 300.0, "input_median": 150.0, "output_mean": 450.0, "output_median": 350.0}

# Chat with occasional long documents (RAG, whole files): 5% of prompts drawn from a long
# log-normal up to 128k tokens, the rest as chat. The mix is this simulator's assumption, modelled on
# held-out traces with prompts up to ~123k tokens; it exists to test that long prefills never stall
# running decodes. Run it with --max-model-len 131072 and a KV cache that holds a 128k prompt.
LONG_PROMPT_STATS = {**AZURE_CONV_STATS, "long_share": 0.05, "long_input_mean": 40000.0,
                     "long_input_median": 24000.0, "max_prompt": 131072}

# Reasoning models (chain of thought before the answer): short questions, outputs of 1k-32k tokens
# with a heavy tail, from two kinds of question whose output distributions differ: "quick" (a few
# thousand tokens) and "deep" (several times longer). Published reasoning traces report mean
# outputs of several thousand tokens with a long tail up to the model's limit; the mix, medians and
# means here are this simulator's assumptions, chosen so that decode KV, not prefill, binds.
REASONING_STATS = {"input_mean": 600.0, "input_median": 300.0, "output_min": 1024, "output_max": 32768,
                   "classes": (("quick", 0.6, 2500.0, 1500.0), ("deep", 0.4, 11000.0, 8000.0))}

WORKLOADS = {
    "chat": AZURE_CONV_STATS,
    "code": AZURE_CODE_STATS,
    "long_context": LONG_CONTEXT_STATS,
    "decode_heavy": DECODE_HEAVY_STATS,
    "long_prompt": LONG_PROMPT_STATS,
    "reasoning": REASONING_STATS,
}


@dataclass(frozen=True)
class WorkloadDefaults:
    """What ``kvsched simulate --workload NAME`` runs when not told otherwise.

    The rate is the workload's memory-bound load on the default KV cache: the highest rate on a
    grid at which oracle admission (true output lengths, no preemption) still meets the lax SLO
    for 90% of requests on every one of five seeds. Faster, no admission policy can keep up;
    slower, the KV cache is rarely full and the policies coincide. ``bench/default_rates.py``
    measures it with the current code and says whether these figures still hold.
    """

    rate: float  # requests/s (conversations/s for multi_turn)
    kv_capacity_tokens: int = 65536  # a 24 GB-class GPU's KV space after an 8B model's weights
    max_model_len: int = 0  # 0: the model profile's
    max_new_tokens: int = 2048  # what the scheduler sees per request (--max-new-tokens)
    note: str = ""  # shown in the run's header


_PREFILL_BOUND = "prefill-bound here: long prompts or short outputs leave little to predict, so admission modes coincide"
BUILT_IN_DEFAULTS = {
    "chat": WorkloadDefaults(6.5),
    "code": WorkloadDefaults(6.5, note=_PREFILL_BOUND),
    "long_context": WorkloadDefaults(0.75, max_model_len=32768, note=_PREFILL_BOUND),
    "decode_heavy": WorkloadDefaults(10.0),
    "long_prompt": WorkloadDefaults(1.0, kv_capacity_tokens=400000, max_model_len=131072, note=_PREFILL_BOUND),
    "multi_turn": WorkloadDefaults(1.75),
    # An 80 GB-class GPU's KV (after an 8B model's weights), a context for 32k outputs.
    "reasoning": WorkloadDefaults(0.125, kv_capacity_tokens=262144, max_model_len=40960,
                                  max_new_tokens=32768),
}

def poisson_arrivals(count: int, rate_per_s: float, seed: int = 0, burstiness: float = 1.0) -> np.ndarray:
    """Arrival times (s, from 0) with Gamma inter-arrivals of mean 1/rate; burstiness is the
    squared coefficient of variation (1: Poisson, > 1: burstier)."""
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    if not 0 < rate_per_s < np.inf:
        raise ValueError(f"rate_per_s must be finite and > 0, got {rate_per_s}")
    if not 0 < burstiness < np.inf:
        raise ValueError(f"burstiness must be finite and > 0, got {burstiness}")
    rng = np.random.default_rng(seed)
    shape = 1.0 / burstiness
    gaps = rng.gamma(shape, 1.0 / (rate_per_s * shape), count)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def _class_mixture(class_rng: np.random.Generator, length_rngs: list, classes: tuple,
                   size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Lengths from a mixture of log-normals, and each one's class (an index into ``classes``,
    which is ((name, share, mean, median), ...)). One generator per drawn quantity, so that the
    first N of a longer draw are a draw of N."""
    shares = np.array([c[1] for c in classes])
    which = class_rng.choice(len(classes), size=size, p=shares / shares.sum())
    drawn = np.stack([_lognormal(rng, mean, median, size) for rng, (_, _, mean, median) in zip(length_rngs, classes)])
    return drawn[which, np.arange(size)], which.astype(np.int32)


def synthetic(name: str, num_requests: int, rate_per_s: float, seed: int = 0, max_tokens: Optional[int] = None) -> Trace:
    """A built-in workload from :data:`WORKLOADS`: log-normal lengths fitted to its published mean
    and median (a mixture of them for a workload with ``classes``, each request declaring its
    class in ``class_ids``), Poisson arrivals at ``rate_per_s``. Outputs, and prompts of a workload without its own ``prompt_limit``, are cut at
    ``max_tokens`` (default: the workload's ``output_max``, else 8192)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {name!r}")
    if num_requests <= 0:
        raise ValueError(f"num_requests must be > 0, got {num_requests}")
    # One generator per drawn quantity: request i's values do not depend on how many requests are
    # drawn, so a run of N requests is the first N of any longer run (--num-requests).
    children = np.random.SeedSequence(seed).spawn(5 + len(WORKLOADS[name].get("classes", ())))
    prompt_rng, output_rng, long_rng, long_length_rng, class_rng, *class_length_rngs = map(np.random.default_rng,
                                                                                            children)
    s = WORKLOADS[name]
    if max_tokens is None:
        max_tokens = s.get("output_max", 8192)
    prompt_limit = s.get("prompt_limit", max_tokens)
    prompts = np.clip(_lognormal(prompt_rng, s["input_mean"], s["input_median"], num_requests), 1, prompt_limit)
    classes = None
    if "classes" in s:  # a mixture: each request's class, then its output from that class's log-normal
        outputs, classes = _class_mixture(class_rng, class_length_rngs, s["classes"], num_requests)
        outputs = np.clip(outputs, s["output_min"], min(s["output_max"], max_tokens))
    else:
        outputs = np.clip(_lognormal(output_rng, s["output_mean"], s["output_median"], num_requests), 1, max_tokens)
    if "long_share" in s:  # a share of long documents
        long = long_rng.random(num_requests) < s["long_share"]
        lengths = _lognormal(long_length_rng, s["long_input_mean"], s["long_input_median"], num_requests)
        prompts = np.where(long, np.clip(lengths, 1, s["max_prompt"]), prompts)
    arrival = poisson_arrivals(num_requests, rate_per_s, seed + 1)
    return Trace(arrival, prompts.astype(np.int64), outputs.astype(np.int64), class_ids=classes)


# ShareGPT conversations (LMSYS-Chat-1M paper, table 1): 3.5 turns on average, user turns of 94.8
# tokens and responses of 348.5 tokens on average. The medians (the log-normal shapes) and the think
# time are this simulator's assumptions, not published figures.
SHAREGPT_TURN_STATS = {"turns_mean": 3.5, "input_mean": 94.8, "input_median": 50.0, "output_mean": 348.5,
                       "output_median": 250.0}
MAX_TURNS = 32


def multi_turn_chat(num_conversations: int, rate_per_s: float, think_time_s: float = 10.0, seed: int = 0,
                    max_tokens: int = 8192, max_requests: int = 0) -> Trace:
    """Multi-turn conversations: Poisson conversation starts at ``rate_per_s``, a geometric number of
    turns, log-normal user and response lengths (:data:`SHAREGPT_TURN_STATS`). Each turn is sent an
    exponential think time (mean ``think_time_s``) after the previous one's answer, and its prompt is
    the whole conversation so far plus the new user message (``shared_context``).

    ``max_requests`` > 0 keeps the first that many turns in conversation order (the last kept
    conversation may lose its later turns): the same requests at any rate, so a rate and a rate
    scale of the same load give the same run."""
    if num_conversations <= 0:
        raise ValueError(f"num_conversations must be > 0, got {num_conversations}")
    if not 0 < rate_per_s < np.inf:
        raise ValueError(f"rate_per_s must be finite and > 0, got {rate_per_s}")
    if not 0 <= think_time_s < np.inf:
        raise ValueError(f"think_time_s must be finite and >= 0, got {think_time_s}")
    rng = np.random.default_rng(seed)
    s = SHAREGPT_TURN_STATS
    turns = np.minimum(rng.geometric(1.0 / s["turns_mean"], num_conversations), MAX_TURNS)
    n = int(turns.sum())
    conversation = np.repeat(np.arange(num_conversations), turns)
    first = np.cumsum(turns) - turns  # index of each conversation's first turn
    turn = np.arange(n) - np.repeat(first, turns)
    user = np.clip(_lognormal(rng, s["input_mean"], s["input_median"], n), 1, max_tokens).astype(np.int64)
    outputs = np.clip(_lognormal(rng, s["output_mean"], s["output_median"], n), 1, max_tokens).astype(np.int64)
    think = rng.exponential(think_time_s, n) if think_time_s > 0 else np.zeros(n)
    # A turn's prompt: everything before it (earlier prompts' new tokens and all outputs) plus its message.
    context = np.cumsum(user + outputs) - outputs
    prompts = context - np.repeat(context[first] - user[first], turns)
    starts = poisson_arrivals(num_conversations, rate_per_s, seed + 1)
    # Nominal arrivals (think times without service) only order the requests; followers' real
    # arrivals come from the run.
    since_start = np.cumsum(think) - np.repeat(np.cumsum(think)[first], turns)
    nominal = np.repeat(starts, turns) + since_start
    if max_requests > 0 and max_requests < n:  # generation order is conversation, then turn
        n = max_requests
        conversation, turn, prompts, outputs, think, nominal = (
            a[:n] for a in (conversation, turn, prompts, outputs, think, nominal))
    order = np.lexsort((turn, nominal))
    new_index = np.empty(n, np.int64)
    new_index[order] = np.arange(n)
    parent = np.where(turn > 0, new_index[np.maximum(np.arange(n) - 1, 0)], -1)
    return Trace(nominal[order], prompts[order], outputs[order], session_ids=conversation[order],
                 parent_index=parent[order], think_s=np.where(turn > 0, think, 0.0)[order], shared_context=True)


def closed_loop(trace: Trace, num_clients: int, think_time_s: float = 0.0, seed: int = 0) -> Trace:
    """``trace``'s requests sent by ``num_clients`` clients in turn (request i by client i mod N),
    each waiting for its previous request's answer and an exponential think time (mean
    ``think_time_s``; a client's first request comes after one too). The load is then set by the
    clients, not by the trace's arrival times."""
    if num_clients <= 0:
        raise ValueError(f"num_clients must be > 0, got {num_clients}")
    if not 0 <= think_time_s < np.inf:
        raise ValueError(f"think_time_s must be finite and >= 0, got {think_time_s}")
    if trace.has_sessions:
        raise ValueError("closed_loop: the trace already has sessions")
    n = len(trace)
    rng = np.random.default_rng(seed)
    think = rng.exponential(think_time_s, n) if think_time_s > 0 else np.zeros(n)
    index = np.arange(n)
    parent = np.where(index >= num_clients, index - num_clients, -1)
    # Nominal arrivals (think times only) keep the trace ordered; followers' real ones come from the run.
    nominal = np.zeros(n)
    for client in range(min(num_clients, n)):
        nominal[client::num_clients] = np.cumsum(think[client::num_clients])
    order = np.lexsort((index, nominal))
    if not np.array_equal(order, index):  # keep parents first: reorder and remap
        new_index = np.empty(n, np.int64)
        new_index[order] = index
        parent = np.where(parent >= 0, new_index[np.maximum(parent, 0)], -1)[order]
        trace = trace.select(order)
        think, nominal, clients = think[order], nominal[order], (index % num_clients)[order]
    else:
        clients = index % num_clients
    return replace(trace, arrival_s=nominal, session_ids=clients.astype(np.int64), parent_index=parent,
                   think_s=think, shared_context=False)


@dataclass(frozen=True)
class PriorityPlan:
    """Priorities of a prepared trace's sessions (each request its own session in a trace without
    sessions; 0 is the most urgent) and how they change while the sessions live: at
    ``change_s[k]``, session ``change_index[k]`` takes ``change_priority[k]``; its live request, if
    any, takes it at once, and its later requests start with it."""

    initial: np.ndarray
    change_s: np.ndarray
    change_index: np.ndarray
    change_priority: np.ndarray


PRIORITY_KINDS = ("random", "markov")


def priority_plan(trace: Trace, kind: str, num_classes: int = 3, interval_s: float = 2.0,
                  horizon_s: Optional[float] = None, stay: float = 0.8, seed: int = 0) -> PriorityPlan:
    """Priorities that change every ``interval_s`` for ``horizon_s`` after each session starts
    (default 120 s; 600 s for a trace with sessions, whose conversations last longer), as in
    FastSwitch's evaluation: ``random`` draws a new class uniformly each time; ``markov`` keeps the
    class with probability ``stay`` and otherwise moves one class up or down (reflected at the ends)."""
    if horizon_s is None:
        horizon_s = 600.0 if trace.has_sessions else 120.0
    if kind not in PRIORITY_KINDS:
        raise ValueError(f"priorities must be one of {', '.join(PRIORITY_KINDS)}, got {kind!r}")
    if num_classes < 2 or interval_s <= 0 or horizon_s < interval_s or not 0 <= stay <= 1:
        raise ValueError("priority_plan: need num_classes >= 2, 0 < interval_s <= horizon_s, 0 <= stay <= 1")
    rng = np.random.default_rng(seed)
    session = trace.sessions()
    n = int(session.max()) + 1 if session.size else 0
    start = np.full(n, np.inf)
    roots = np.flatnonzero(trace.parent_index < 0) if trace.has_sessions else np.arange(len(trace))
    np.minimum.at(start, session[roots], trace.arrival_s[roots])
    initial = rng.integers(0, num_classes, n)
    steps = int(horizon_s // interval_s)
    current = initial.copy()
    columns = []
    for _ in range(steps):  # vectorized over sessions; one pass per change time
        if kind == "random":
            current = rng.integers(0, num_classes, n)
        else:
            move = np.where(rng.random(n) < 0.5, -1, 1) * (rng.random(n) >= stay)
            outside = (current + move < 0) | (current + move >= num_classes)
            current = current + np.where(outside, -move, move)  # reflect at the ends
        columns.append(current)
    priority = np.stack(columns, axis=1).reshape(-1) if columns else np.zeros(0, np.int64)
    index = np.repeat(np.arange(n), steps)
    times = (start[:, None] + interval_s * np.arange(1, steps + 1)[None, :]).reshape(-1)
    order = np.argsort(times, kind="stable")
    return PriorityPlan(initial.astype(np.float64), times[order], index[order], priority[order].astype(np.float64))
