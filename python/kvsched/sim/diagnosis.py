"""What a `kvsched simulate` run concludes: what binds, what to try next, and a verdict per mode.

Glossary (every figure is a run's mean over its seeds; a "run" is one admission mode, or fleet):

- backlog: engine time with requests left waiting after a step's plan (not admitted, preempted and
  not yet back, or admitted and left out of the step); ``backlog_share`` is that time over the
  run's span (first arrival to last finish, times the instances).
- KV-held backlog: backlog time whose step still had room for more: its tokens under
  ``STEP_FULL_SHARE`` of max_num_batched_tokens, its prefill attention under that share of
  prefill_attention_budget, fewer than max_num_seqs running. Only the KV cache or the admission's
  predicted peak held the waiting requests back; the rest of the backlog waited for compute (a full
  step). ``backlog_kv_share`` is its share of the span.
- queueing: the time before a request's first token that no step computed it: waiting to be
  admitted, or admitted and left out of steps (long prompts share the prefill attention budget).
- KV peak: the largest fraction of KV blocks in use at any step.
- rejected share: prompts rejected (beyond the context, or larger than the whole KV cache) over all.
- queue growth: how fast queueing delay grows with arrival time (the median delay of the last
  quarter of arrivals minus the first quarter's, over the time between them). A queue that keeps
  growing means the engine serves only about ``1 / (1 + growth)`` of the arrival rate: overload.
- burstiness: arrivals in the busiest tenth of windows of about 50 arrivals each, over the mean
  (the 90th percentile window; Poisson arrivals give about 1.2).
- paired difference: a run's SLO attainment minus the first run's, seed by seed, with the 95%
  interval of its mean (kvsched.sim.metrics.interval95), clipped to what a difference can take.

Bottlenecks, checked in this order:

- ``context``: at least ``CONTEXT_REJECTED_MIN`` of prompts rejected: the attainment counts them as
  misses whatever the scheduler does.
- ``idle``: backlog under ``BACKLOG_MIN`` of the span, or queueing p90 under ``QUEUE_SHORT_S``, and, unless KV reached ``KV_FULL`` with
  preemptions, nothing binds: every admission mode serves this load alike.
- ``kv``: KV filled (peak >= ``KV_FULL`` with preemptions) without backlog, or most backlog was
  KV-held (``KV_HELD_MIN`` of it): admission decides who waits and how full batches run, so the
  modes can differ (also when the queue grows through the run: then KV limits throughput).
- ``compute``: most backlog waited for full steps: more load only queues, in every mode alike.
  Overall, compute binds when it binds the run with the best attainment (no admission escapes it).
- ``bursts``: backlog under ``SUSTAINED_MIN`` of the span while arrivals are bursty
  (``BURSTY_MIN``): the engine keeps up on average and queues at the arrival peaks.

Advice follows from the bottleneck and uses only options the next run accepts (the load knob of
this kind of workload: ``--clients`` in closed loop, ``--rate-scale`` for a trace with its own
arrival times, ``--rate`` otherwise), and never more load where compute or bursts bind; where they
bind yet the SLO holds and the KV cache never filled, a smaller KV cache instead of less load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

CONTEXT_REJECTED_MIN = 0.05  # a twentieth of the prompts rejected outweighs most scheduling differences
BACKLOG_MIN = 0.05  # requests waiting for less than 5% of the run: no queue worth the name
QUEUE_SHORT_S = 0.5  # nor when 90% of requests start within half a second (a step or two of prefill)
KV_FULL = 0.95  # KV use this close to full at its peak (a block's rounding leaves a little free)
KV_HELD_MIN = 0.5  # KV binds when at least half the backlog was held back with room in the step
OVERLOAD_GROWTH = 0.2  # queueing grows 0.2 s per second of arrivals: about 83% of the arrival rate served
SUSTAINED_MIN = 0.5  # a queue present half the run or more is overload, not bursts
BURSTY_MIN = 1.5  # the busiest tenth of arrival windows at 1.5x the mean rate (Poisson: about 1.2)
BURST_WINDOW_ARRIVALS = 50  # arrivals per window: Poisson noise about 14% of a window's count
LOAD_STEP = 2.0  # advice changes the load by this factor
SLO_HELD = 0.99  # the SLO holds at this attainment: less load cannot show anything more
AUTO_MIN_SEEDS = 3  # --seeds auto starts with this many seeds (the former default)
AUTO_MAX_SEEDS = 6  # and stops here: twice the former default's time, the budget of the default run

BOTTLENECK_TEXT = {
    "context": "context (prompts rejected)",
    "idle": "nothing (idle)",
    "kv": "KV capacity (admission matters)",
    "compute": "compute (more load only queues)",
    "bursts": "bursts (queueing at arrival peaks)",
}


def queue_growth(arrival_s: np.ndarray, queueing_s: np.ndarray) -> float:
    """Seconds of queueing delay gained per second of arrivals, from the first quarter of arrivals
    to the last (0.0 for too few requests to tell)."""
    sent = ~np.isnan(arrival_s)
    order = np.argsort(arrival_s[sent], kind="stable")
    arrivals, delays = arrival_s[sent][order], queueing_s[sent][order]
    quarter = arrivals.size // 4
    if quarter < 4:
        return 0.0
    early, late = slice(0, quarter), slice(arrivals.size - quarter, arrivals.size)
    elapsed = float(np.median(arrivals[late]) - np.median(arrivals[early]))
    if elapsed <= 0 or np.all(np.isnan(delays[early])) or np.all(np.isnan(delays[late])):
        return 0.0
    return max(0.0, float(np.nanmedian(delays[late]) - np.nanmedian(delays[early])) / elapsed)


def burstiness(arrival_s: np.ndarray) -> float:
    """The 90th-percentile arrival count of windows of about BURST_WINDOW_ARRIVALS arrivals, over
    the mean count (1.0 for too few arrivals to tell)."""
    arrivals = np.sort(arrival_s[~np.isnan(arrival_s)])
    windows = arrivals.size // BURST_WINDOW_ARRIVALS
    if windows < 4 or arrivals[-1] <= arrivals[0]:
        return 1.0
    counts, _ = np.histogram(arrivals, bins=windows, range=(arrivals[0], arrivals[-1]))
    return float(np.percentile(counts, 90) / counts.mean())


@dataclass
class Diagnosis:
    """One run's bottleneck (a key of BOTTLENECK_TEXT) and the facts it was decided from."""

    bottleneck: str
    facts: str
    resource: str = ""  # for bursts: what binds at the peaks, "kv" or "compute"
    overloaded: bool = False  # the queue grew through the run (OVERLOAD_GROWTH)


def diagnose(record: dict) -> Diagnosis:
    """The bottleneck of one run from its record (kvsched.sim.metrics.summarize, or its aggregate)."""
    rejected = record["rejected"] / max(record["num_requests"], 1)
    backlog, held = record["backlog_share"], record["backlog_kv_share"]
    peak, preempted = record["kv_peak"], record["preemptions"] > 0
    growth = record["queue_growth"]
    facts = (f"KV cache {peak:.0%} full at its peak; requests waited during {backlog:.0%} of the run "
             f"({held:.0%} with room in the step, held back by KV), queueing p90 {record['queueing_p90_s']:.2f} s; "
             f"arrivals' busiest tenth at {record['arrival_burstiness']:.1f}x the mean rate")
    if growth >= OVERLOAD_GROWTH:
        facts += f"; queueing grew {growth:.2f} s per s of arrivals (served about {1 / (1 + growth):.0%} of the arrival rate)"
    if rejected >= CONTEXT_REJECTED_MIN:
        return Diagnosis("context", f"{rejected:.0%} of prompts rejected (beyond the context "
                         f"{record.get('max_model_len', '')} tokens or the KV cache); " + facts)
    if backlog < BACKLOG_MIN or record["queueing_p90_s"] < QUEUE_SHORT_S:
        if peak >= KV_FULL and preempted:
            return Diagnosis("kv", facts + "; KV filled and requests were preempted")
        return Diagnosis("idle", facts)
    overloaded = growth >= OVERLOAD_GROWTH
    resource = "kv" if held >= KV_HELD_MIN * backlog else "compute"
    if not overloaded and backlog < SUSTAINED_MIN and record["arrival_burstiness"] >= BURSTY_MIN:
        return Diagnosis("bursts", facts, resource)
    return Diagnosis(resource, facts, resource, overloaded)


def overall(diagnoses: Sequence[Diagnosis], attainments: Optional[Sequence[float]] = None) -> Diagnosis:
    """The runs' common bottleneck: context if any run has it (it is the workload's); compute when
    the run with the best attainment is overloaded (no admission keeps up); else the most frequent,
    ties going to the earliest run's."""
    names = [d.bottleneck for d in diagnoses]
    if "context" in names:
        return diagnoses[names.index("context")]
    if attainments is not None:
        best = int(np.argmax(attainments))
        if names[best] == "compute" and diagnoses[best].overloaded:
            return diagnoses[best]
    best = max(names, key=lambda n: (names.count(n), -names.index(n)))
    return diagnoses[names.index(best)]


# ---- verdicts ----

def clip_interval(mean: float, half: float, low: float, high: float) -> Tuple[float, float]:
    """The 95% interval ``mean ± half`` clipped to what the figure can take, [low, high]."""
    return max(low, mean - half), min(high, mean + half)


def verdict(mean: float, half: float, seeds: int, exact: bool) -> str:
    """better / worse / indistinguishable, from a paired difference (its mean and 95% half-width
    over ``seeds`` seeds): indistinguishable whenever the interval includes zero. One seed gives no
    interval: indistinguishable, unless the runs are ``exact`` (no seed changes them), where the
    difference is what it is."""
    if seeds < 2 and not exact:
        return "indistinguishable"
    if mean - half > 0:
        return "better"
    if mean + half < 0:
        return "worse"
    return "indistinguishable"


def decided(diffs: Sequence[float]) -> bool:
    """Whether more seeds could still change a paired difference's verdict: not when its interval
    excludes zero, nor when it is the same in every seed (identical runs stay identical)."""
    from .metrics import interval95

    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size >= 2 and np.all(diffs == diffs[0]):
        return True
    half = interval95(diffs)
    return diffs.size >= 2 and abs(float(diffs.mean())) > half


def auto_seeds_done(diffs_by_run: Dict[str, Sequence[float]], seeds: int, seeded: bool,
                    cap: int = AUTO_MAX_SEEDS) -> Optional[str]:
    """Why ``--seeds auto`` stops after ``seeds`` seeds, or None to add one: "unseeded" (no run
    depends on the seed: one is enough), "decided" (every paired difference excludes zero or is the
    same in every seed), "cap"."""
    if not seeded:
        return "unseeded"
    if seeds < AUTO_MIN_SEEDS:
        return None
    if all(decided(d) for d in diffs_by_run.values()):
        return "decided"
    return "cap" if seeds >= cap else None


# ---- advice ----

@dataclass
class Knobs:
    """What the next run may change, and how this one was set (the CLI fills it)."""

    clients: int = 0
    timed: bool = False  # a trace with its own arrival times: its load is --rate-scale
    rate: Optional[float] = None  # the arrival rate of a built-in workload or a length trace
    rate_scale: float = 1.0
    span_s: float = 0.0  # the scaled arrivals' span (a lower rate scale lengthens it)
    max_span_s: float = float("inf")
    kv_capacity_tokens: int = 0
    block_size: int = 16
    context: int = 0
    largest_prompt: int = 0  # of the whole workload, rejected ones included
    kv_peak_tokens: int = 0  # the most KV tokens any run held at once
    best_attainment: float = 0.0  # the best run's SLO attainment
    max_tokens: int = 1 << 24  # the CLI's bound on --max-model-len
    seeds: int = 1
    auto: bool = True  # --seeds auto
    max_seeds: int = 100
    undecided: List[str] = field(default_factory=list)  # runs whose difference stayed undecided at the cap


@dataclass
class Advice:
    """A sentence, and the options that carry it out (empty: nothing to change)."""

    text: str
    options: Dict[str, str] = field(default_factory=dict)


def _load(knobs: Knobs, factor: float) -> Optional[Dict[str, str]]:
    """The option that multiplies the load by ``factor``, as this run accepts it, or None."""
    if knobs.clients:
        clients = int(round(knobs.clients * factor))
        return {"--clients": str(clients)} if clients >= 1 and clients != knobs.clients else None
    if knobs.timed or knobs.rate is None:
        if knobs.span_s / factor > knobs.max_span_s:
            return None
        return {"--rate-scale": f"{knobs.rate_scale * factor:g}"}
    return {"--rate": f"{knobs.rate * factor:g}"}


def _smaller_kv(knobs: Knobs) -> Optional[int]:
    """A KV cache about three quarters of the peak use (a power of two under the peak, so that it
    binds without starving every mode alike) that still holds the largest prompt, or None."""
    target = 3 * knobs.kv_peak_tokens // 4
    floor = knobs.largest_prompt + 2 * knobs.block_size
    if target <= 0 or target < floor:
        return None
    tokens = 1 << int(np.round(np.log2(target)))  # a power of two, for a figure people recognise
    if tokens >= knobs.kv_peak_tokens:
        tokens //= 2
    tokens = max(tokens, 1 << int(np.ceil(np.log2(floor))))
    return tokens if tokens < min(knobs.kv_capacity_tokens, knobs.kv_peak_tokens) else None


def advise(diagnosis: Diagnosis, knobs: Knobs) -> List[Advice]:
    """What the next run should change, given what binds (never more load where compute binds)."""
    out: List[Advice] = []
    b = diagnosis.bottleneck
    if b == "context":
        context = min(knobs.max_tokens, 1 << int(np.ceil(np.log2(knobs.largest_prompt + 1))))
        options = {"--max-model-len": str(context)}
        if context > knobs.context:
            if knobs.kv_capacity_tokens < context + knobs.block_size:
                options["--kv-capacity-tokens"] = str(2 * context)
            out.append(Advice("the attainment counts the rejected prompts as misses whatever the admission; "
                              "a longer context admits them", options))
        else:
            out.append(Advice("the rejected prompts are larger than the KV cache",
                              {"--kv-capacity-tokens": str(2 * context)}))
    elif b == "idle":
        kv = _smaller_kv(knobs)
        if kv is not None:
            out.append(Advice("no admission mode can matter here; a smaller KV cache makes admission decide "
                              "at this load", {"--kv-capacity-tokens": str(kv)}))
        else:
            more = _load(knobs, LOAD_STEP)
            if more:
                out.append(Advice("no admission mode can matter here; more load may make KV bind", more))
    elif b in ("compute", "bursts"):
        less = _load(knobs, 1 / LOAD_STEP)
        why = ("the steps are full: more load only queues, in every mode alike" if b == "compute" else
               f"the queue forms at arrival peaks ({'KV' if diagnosis.resource == 'kv' else 'compute'} binds "
               "there): more load only deepens them")
        kv = _smaller_kv(knobs) if knobs.kv_peak_tokens < KV_FULL * knobs.kv_capacity_tokens else None
        if knobs.best_attainment >= SLO_HELD and kv is not None:
            # Less load only shortens a queue the SLO already absorbs; the KV cache never filled.
            out.append(Advice(f"{why}; yet the SLO holds and the KV cache never filled, so no admission mode "
                              "can matter here; a smaller KV cache makes admission decide at this load",
                              {"--kv-capacity-tokens": str(kv)}))
        elif less:
            out.append(Advice(f"{why}; less load shows where the KV cache, and so admission, decides", less))
        else:
            out.append(Advice(why))
    else:  # kv
        out.append(Advice("the verdicts below say which admission serves this load best"))
        less = _load(knobs, 1 / LOAD_STEP) if diagnosis.overloaded else None
        if less:
            out.append(Advice("the queue grows through the run, so more load only queues; at less load the "
                              "modes may differ more clearly", less))
    if knobs.undecided and not knobs.auto:
        out.append(Advice(f"{', '.join(knobs.undecided)} undecided after {knobs.seeds} seed"
                          f"{'s' if knobs.seeds > 1 else ''}: seeds until decided", {"--seeds": "auto"}))
    elif knobs.undecided and knobs.seeds < knobs.max_seeds:
        more = min(knobs.max_seeds, 2 * knobs.seeds)
        out.append(Advice(f"{', '.join(knobs.undecided)} undecided after {knobs.seeds} seeds: more seeds may "
                          "decide", {"--seeds": str(more)}))
    return out


def next_command(argv: Sequence[str], options: Dict[str, str]) -> List[str]:
    """``argv`` (``simulate ...``) with each of ``options`` set: replaced where given, else added."""
    out: List[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            skip = "=" not in arg
            continue
        out.append(arg)
    for name, value in options.items():
        out += [name, value]
    return out
