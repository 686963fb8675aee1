"""Load sweeps (`kvsched simulate --sweep rate|kv`): every admission mode over a range of loads, where
the KV cache starts to bind, and each mode's max load at the SLO target, with intervals.

Glossary:

- load point: one rate scale (``rate``: arrivals come that many times faster) or one KV capacity
  (``kv``: a smaller cache is more load on it). Points are kept in order of increasing load.
- attainment: the share of requests meeting the SLO (kvsched.sim.metrics.summarize), per seed.
- KV binds at a point when the runs' common bottleneck there (kvsched.sim.diagnosis.overall, as a
  plain run reports it) is the KV cache: admission then decides who waits, and the modes can differ.
- max load: per seed, the highest load whose attainment meets the target, interpolated (on a log
  scale) between the last point that meets it and the first that misses; for ``rate`` a rate scale,
  for ``kv`` the smallest KV capacity in tokens. A mode that meets the target at every point is
  capped at the grid's end (``capped``); one that misses it even at the lightest load has none
  (NaN for that seed; ``never_met`` when no seed met it).
- paired difference: at one point, a mode's attainment minus the first mode's, seed by seed, with
  the interval of its mean and a verdict; the table names, for each mode, the KV-bound point where
  it is largest.
- gain: a mode's max load over the first mode's, seed by seed (for ``kv``, the first mode's capacity
  over this mode's: how many times less KV it needs); its verdict comes from the interval of the
  mean gain minus one, as a plain run's verdict comes from the paired difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .diagnosis import AUTO_MIN_SEEDS, decided, diagnose, overall, verdict
from .engine import SLO, EngineConfig, PreparedTrace
from .metrics import aggregate, interval95, summarize
from .report import with_interval

SWEEP_KINDS = ("rate", "kv")
TARGET = 0.9  # the SLO attainment a load must keep, as --find-max-rate uses
STEP = 2.0  # neighbouring points differ by this factor


def grid(kind: str, centre: float, points: int) -> List[float]:
    """Load points in order of increasing load: rate scales from ``centre``/4 up by factors of two;
    KV capacities (tokens) from ``centre`` down by halves."""
    if kind == "rate":
        return [centre * STEP ** (i - 2) for i in range(points)]
    return [float(int(centre / STEP ** i)) for i in range(points)]


@dataclass
class PointResult:
    """One load point: each mode's per-seed attainment, its record aggregated over seeds, and what
    bound the runs there."""

    load: float
    attainment: Dict[str, List[float]] = field(default_factory=dict)
    records: Dict[str, dict] = field(default_factory=dict)
    bottleneck: str = ""


@dataclass
class SweepResult:
    kind: str
    modes: List[str]
    points: List[PointResult]
    seeds: List[int]
    seeds_stopped: str  # why the seeds stopped: unseeded, decided, cap, or fixed (--seeds K)
    seeded_modes: List[str] = field(default_factory=list)  # the modes whose runs depend on the seed

    def kv_binds_from(self) -> Optional[float]:
        """The lightest load at which the KV cache binds, or None if it binds nowhere on the grid."""
        return next((p.load for p in self.points if p.bottleneck == "kv"), None)

    def exact(self, mode: str) -> bool:
        """Whether no seed changes this mode's runs or the first mode's: their difference is exact."""
        return mode not in self.seeded_modes and self.modes[0] not in self.seeded_modes

    def gain_verdict(self, mode: str) -> str:
        """better / worse / indistinguishable against the first mode, by the gain's interval; a mode
        that met the target where the first never did is better (and the reverse worse)."""
        gains = self.gains(mode)
        finite = [g for g in gains if math.isfinite(g)]
        if finite:
            return verdict(float(np.mean(finite)) - 1.0, _interval(finite), len(finite), self.exact(mode))
        mine_met = any(math.isfinite(v) for v in self.max_loads(mode))
        first_met = any(math.isfinite(v) for v in self.max_loads(self.modes[0]))
        if mine_met != first_met:
            return "better" if mine_met else "worse"
        return "neither meets the target"

    def max_loads(self, mode: str) -> List[float]:
        """``mode``'s max load per seed (module docstring)."""
        loads = [p.load for p in self.points]
        return [max_load(loads, [p.attainment[mode][s] for p in self.points])
                for s in range(len(self.seeds))]

    def gains(self, mode: str) -> List[float]:
        first, mine = self.max_loads(self.modes[0]), self.max_loads(mode)
        # NaN where either never met the target in that seed: no ratio to take.
        if self.kind == "kv":
            return [f / m for f, m in zip(first, mine)]
        return [m / f for f, m in zip(first, mine)]

    def summary(self) -> dict:
        """Everything the table and the JSON say, in one record."""
        loads = [p.load for p in self.points]
        first = self.modes[0]
        out = {"kind": self.kind, "target": TARGET, "loads": loads, "seeds": self.seeds,
               "seeds_stopped": self.seeds_stopped, "kv_binds_from": self.kv_binds_from(),
               "bottlenecks": [p.bottleneck for p in self.points],
               # What the load does to the workload itself (the same for every mode): prompts rejected
               # (beyond the context, or larger than the whole cache) and outputs cut, per point.
               "rejected_share": [p.records[first]["rejected"] / max(p.records[first]["num_requests"], 1)
                                  for p in self.points],
               "clipped_outputs": [p.records[first]["clipped_outputs"] for p in self.points],
               "modes": {}}
        for mode in self.modes:
            exact = self.exact(mode)
            per_seed = self.max_loads(mode)
            gains = self.gains(mode)
            finite = [g for g in gains if math.isfinite(g)]
            gain, half = (float(np.mean(finite)), _interval(finite)) if finite else (math.nan, 0.0)
            # Paired over seeds, point by point: this mode's attainment minus the first mode's.
            diffs = [np.subtract(p.attainment[mode], p.attainment[self.modes[0]]) for p in self.points]
            met = [v for v in per_seed if math.isfinite(v)]
            out["modes"][mode] = {
                "attainment": [float(np.mean(p.attainment[mode])) for p in self.points],
                "attainment_ci95": [_interval(p.attainment[mode]) for p in self.points],
                "max_load": float(np.mean(met)) if met else None,
                "max_load_ci95": _interval(met),
                "max_load_per_seed": [v if math.isfinite(v) else None for v in per_seed],
                "met_seeds": len(met),  # the max load is the mean over these; the others never met it
                "capped": bool(met) and all(v == loads[-1] for v in met),
                "never_met": not met,
                "gain": gain if finite else None, "gain_ci95": half,
                "paired_difference": [float(d.mean()) for d in diffs],
                "paired_difference_ci95": [_interval(d) for d in diffs],
                "paired_verdict": [verdict(float(d.mean()), _interval(d), len(d), exact) for d in diffs],
                "verdict": "first" if mode == self.modes[0] else self.gain_verdict(mode),
            }
        return out


def _interval(values: Sequence[float]) -> float:
    """interval95, with 0 for values equal but for rounding (a run reused across seeds gives the same
    figure each time; its spread is no interval)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size and np.allclose(values, values[0], rtol=1e-9, atol=0.0):
        return 0.0
    return interval95(values)


def _gain_decided(result: SweepResult, mode: str) -> bool:
    """Whether more seeds could change ``mode``'s verdict: not when its gain's interval excludes one,
    nor when no seed gives a gain to compare (a mode, or the first, never met the target)."""
    gains = [g - 1.0 for g in result.gains(mode) if math.isfinite(g)]
    return decided(gains) if gains else True


def max_load(loads: Sequence[float], attainments: Sequence[float]) -> float:
    """The highest load meeting TARGET (module docstring), from points in order of increasing load."""
    failing = next((i for i, a in enumerate(attainments) if a < TARGET), None)
    if failing is None:
        return float(loads[-1])
    if failing == 0:
        return math.nan
    low, high = loads[failing - 1], loads[failing]
    a_low, a_high = attainments[failing - 1], attainments[failing]
    t = (a_low - TARGET) / (a_low - a_high)
    return float(math.exp(math.log(low) + t * (math.log(high) - math.log(low))))


def run_sweep(
    kind: str,
    loads: Sequence[float],
    modes: Sequence[str],
    prepare_point: Callable[[float, int], tuple],
    slo: SLO,
    simulate: Callable[[PreparedTrace, EngineConfig, str], object],
    first_seed: int,
    seeds: Optional[int],
    depends_on_seed: Callable[[str], bool],
    max_seeds: int,
    on_run: Optional[Callable[[str], None]] = None,
) -> SweepResult:
    """Runs every mode at every load point for each seed from ``first_seed``. ``prepare_point(load,
    seed)`` gives the (prepared trace, engine) of a point; ``simulate(prepared, engine, mode)`` a
    run's log. ``seeds`` is how many to run, or None for the automatic rule: add seeds (at least
    AUTO_MIN_SEEDS) until every mode's gain over the first is decided, at most ``max_seeds``; one
    seed when no mode depends on it (``depends_on_seed(mode)``). A run no seed changes is run once
    and reused."""
    auto = seeds is None
    count = max_seeds if auto else seeds
    points = [PointResult(load) for load in loads]
    first_records: Dict[tuple, dict] = {}
    raw: Dict[tuple, List[dict]] = {}
    used: List[int] = []
    stopped = "fixed"
    seeded_modes = [m for m in modes if depends_on_seed(m)]
    seeded = bool(seeded_modes)
    for seed in range(first_seed, first_seed + count):
        used.append(seed)
        for point in points:
            prepared, engine = prepare_point(point.load, seed)
            for mode in modes:
                key = (point.load, mode)
                if key in first_records and not depends_on_seed(mode):
                    record = first_records[key]  # nothing here depends on the seed: the first seed's run
                else:
                    if on_run is not None:
                        on_run(f"{mode} at {describe(kind, point.load)}, seed {seed}")
                    record = summarize(simulate(prepared, engine, mode), slo)
                    first_records.setdefault(key, record)
                raw.setdefault(key, []).append(record)
                point.attainment.setdefault(mode, []).append(record["slo_attainment"])
        if auto:
            if not seeded:
                stopped = "unseeded"
                break
            if len(used) >= AUTO_MIN_SEEDS:
                partial = SweepResult(kind, list(modes), points, used, "", seeded_modes)
                if all(_gain_decided(partial, m) for m in modes[1:]):
                    stopped = "decided"
                    break
                if len(used) >= max_seeds:
                    stopped = "cap"
    for point in points:
        point.records = {mode: aggregate(raw[(point.load, mode)]) for mode in modes}
        diagnoses = [diagnose(point.records[m]) for m in modes]
        point.bottleneck = overall(diagnoses, [point.records[m]["slo_attainment"] for m in modes]).bottleneck
    return SweepResult(kind, list(modes), points, used, stopped, seeded_modes)


def describe(kind: str, load: float) -> str:
    return f"x{load:g} rate" if kind == "rate" else f"KV {int(load)} tokens"


def table(result: SweepResult) -> str:
    """Attainment per mode and load point, what bound each point, then each mode's max load."""
    summary = result.summary()
    modes, loads = result.modes, summary["loads"]
    head = f"{'load':>16} {'binds':>8} {'rej':>6} " + " ".join(f"{m:>16}" for m in modes)
    lines = [f"{result.points[0].records[modes[0]]['slo']} attainment (%) by load; binds: what bound the runs there; "
             "rej: prompts rejected (beyond the context or the whole cache), counted as misses", head, "-" * len(head)]
    for i, load in enumerate(loads):
        cells = []
        for m in modes:
            figure = {"a": summary["modes"][m]["attainment"][i], "a_ci95": summary["modes"][m]["attainment_ci95"][i]}
            cells.append(f"{with_interval(figure, 'a', 100, bounds=(0, 100)):>16}")
        lines.append(f"{describe(result.kind, load):>16} {result.points[i].bottleneck:>8} "
                     f"{summary['rejected_share'][i]:>6.1%} " + " ".join(cells))
    lines.append("")
    unit = "rate scale" if result.kind == "rate" else "KV tokens (fewer is better)"
    lines.append(f"max load at {TARGET:.0%} attainment ({unit}; interpolated between the grid's points), "
                 f"and gain over {modes[0]}:")
    for m in modes:
        entry = summary["modes"][m]
        if entry["never_met"]:
            value = "never met on this grid"
        else:
            fmt = "{:.3g}" if result.kind == "rate" else "{:.0f}"
            low = max(0.0, entry["max_load"] - entry["max_load_ci95"])  # a load is never negative
            value = fmt.format(entry["max_load"]) + (
                f" [{fmt.format(low)}, {fmt.format(entry['max_load'] + entry['max_load_ci95'])}]"
                if entry["max_load_ci95"] > 0 else "")
            if entry["capped"]:
                value = (">= " if result.kind == "rate" else "<= ") + value + " (met at every point)"
            if entry["met_seeds"] < len(result.seeds):
                value += f" (met in {entry['met_seeds']} of {len(result.seeds)} seeds)"
        if m == modes[0]:
            gain = ""
        elif entry["gain"] is None:
            gain = f": {entry['verdict']}"
        else:
            gain = (f"; x{entry['gain']:.2f}" + (f" ± {entry['gain_ci95']:.2f}" if entry["gain_ci95"] > 0 else "")
                    + f": {entry['verdict']}")
        lines.append(f"  {m:<13} {value}{gain}")
    kv_points = [i for i, b in enumerate(summary["bottlenecks"]) if b == "kv"]
    if kv_points and len(modes) > 1:
        lines.append(f"where KV binds, attainment against {modes[0]} (paired over seeds), at the point that "
                     "separates them most:")
        for m in modes[1:]:
            entry = summary["modes"][m]
            i = max(kv_points, key=lambda k: abs(entry["paired_difference"][k]))
            half = entry["paired_difference_ci95"][i]
            lines.append(f"  {m:<13} {100 * entry['paired_difference'][i]:+.1f}"
                         + (f" ± {100 * half:.1f}" if half > 0 else "")
                         + f" pp at {describe(result.kind, result.points[i].load)}: {entry['paired_verdict'][i]}")
    lines.append("KV binds at " + ", ".join(describe(result.kind, result.points[i].load) for i in kv_points)
                 if kv_points else "KV binds at no point of this grid")
    return "\n".join(lines)


def plot(result: SweepResult, path: str, title: str, image_format: Optional[str] = None) -> None:
    """Attainment against load per mode (95% intervals as bars), the target, and where KV binds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.summary()
    loads = summary["loads"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in result.modes:
        entry = summary["modes"][m]
        mean = 100 * np.asarray(entry["attainment"])
        half = 100 * np.asarray(entry["attainment_ci95"])
        # Intervals clipped to what attainment can take, as the table shows them.
        ax.errorbar(loads, mean, yerr=[np.minimum(half, mean), np.minimum(half, 100 - mean)], marker="o",
                    capsize=3, label=m)
    kv = [load for load, b in zip(loads, summary["bottlenecks"]) if b == "kv"]
    if kv:  # half a grid step either side, so that one point shows too
        ax.axvspan(min(kv) / math.sqrt(STEP), max(kv) * math.sqrt(STEP), color="tab:orange", alpha=0.12,
                   label="KV binds")
    ax.axhline(100 * TARGET, color="black", linestyle="--", linewidth=1, label=f"target {TARGET:.0%}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(loads, [f"{load:g}" for load in loads])
    ax.minorticks_off()
    if result.kind == "kv":
        ax.invert_xaxis()  # load grows to the right: a smaller cache
    ax.set_xlabel("rate scale" if result.kind == "rate" else "KV capacity (tokens)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=image_format)
    plt.close(fig)


__all__ = ["SWEEP_KINDS", "TARGET", "PointResult", "SweepResult", "grid", "max_load", "plot", "run_sweep", "table"]
