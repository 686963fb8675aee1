"""Metrics of a simulated run: latency percentiles, SLO attainment and goodput in the field's forms."""

from __future__ import annotations

from typing import Any

import numpy as np

from .diagnosis import burstiness, queue_growth
from .engine import SLO, SLOS, RunLog


def slo_met(log: RunLog, slo: SLO) -> np.ndarray:
    """Per request: completed with TTFT and token gaps within ``slo`` (rejected ones fail)."""
    completed = ~np.isnan(log.finish_s)
    ttft = log.first_token_s - log.arrival_s
    with np.errstate(invalid="ignore"):
        ok = completed & (ttft <= slo.ttft_s)
    if slo.gap_kind == "max":
        return ok & (log.max_gap_s <= slo.gap_s)
    # The request's 99th-percentile gap is within the bound when at most 1% of its gaps exceed it.
    return ok & (log.slow_gaps[slo.name] <= np.floor(0.01 * log.num_gaps))


def _percentile(values: np.ndarray, q: float) -> float:
    values = values[~np.isnan(values)]
    return float(np.percentile(values, q)) if values.size else float("nan")


def summarize(log: RunLog, slo: SLO) -> dict[str, Any]:
    """One record with the fields the design's JSON contract lists, plus more."""
    n = log.arrival_s.size
    completed = ~np.isnan(log.finish_s)
    ttft = log.first_token_s - log.arrival_s
    multi = completed & (log.output_tokens > 1)
    tpot = np.where(multi, (log.finish_s - log.first_token_s) / np.maximum(log.output_tokens - 1, 1), np.nan)
    gaps = np.where(multi, log.max_gap_s, np.nan)
    e2e = log.finish_s - log.arrival_s
    queueing = log.prefill_start_s - log.arrival_s  # before the first token, neither queued nor left out of a step
    end = np.nanmax(log.finish_s) if completed.any() else np.nanmax(log.arrival_s)
    duration = max(float(end - np.nanmin(log.arrival_s)), 1e-9)
    record: dict[str, Any] = {
        "admission": log.admission,
        "policy": log.policy,
        "num_requests": int(n + log.rejected_too_long),
        "completed": int(completed.sum()),
        "rejected": int(log.rejected.sum() + log.rejected_too_long),
        "rejected_too_long": int(log.rejected_too_long),  # prompts beyond the context (--max-model-len)
        "clipped_outputs": int(log.clipped_outputs),
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "tpot_p50_s": _percentile(tpot, 50),
        "tpot_p99_s": _percentile(tpot, 99),
        "max_gap_p99_s": _percentile(gaps, 99),
        "e2e_p50_s": _percentile(e2e, 50),
        "e2e_p99_s": _percentile(e2e, 99),
        "queueing_p50_s": _percentile(queueing, 50),
        "queueing_p90_s": _percentile(queueing, 90),
        "queueing_p99_s": _percentile(queueing, 99),
        "preemptions": int(log.preemptions.sum()),
        "preempted_requests": int((log.preemptions > 0).sum()),
        "swap_bytes": int(log.swap_bytes),
        "swap_preemptions": int(log.swap_preemptions),
        "swap_time_s": float(log.swap_time_s),
        "prompt_tokens": int(log.prompt_tokens[~np.isnan(log.arrival_s)].sum()),
        "prefix_hit_tokens": int(log.prefix_hit_tokens),
        "host_hit_tokens": int(log.host_hit_tokens),
        "cache_write_bytes": int(log.cache_write_bytes),
        "cache_load_bytes": int(log.cache_load_bytes),
        "computed_tokens": int(log.computed_tokens),
        "kv_utilization": float(log.kv_utilization),
        # What bound the run (kvsched.sim.diagnosis): shares of the span of every instance.
        "kv_peak": float(log.kv_peak),
        "kv_peak_tokens": int(round(log.kv_peak * (log.kv_capacity_tokens or 0))),
        "busy_share": float(log.busy_s / (duration * log.instances)),
        "backlog_share": float(log.backlog_s / (duration * log.instances)),
        "backlog_kv_share": float(log.backlog_kv_s / (duration * log.instances)),
        "arrival_burstiness": burstiness(log.arrival_s),
        "queue_growth": queue_growth(log.arrival_s, queueing),
        "scheduler_cpu_s": float(log.scheduler_cpu_s),
        "steps": int(log.steps),
        # One step's scheduler cost (schedule() + update(), Python API included), microseconds.
        "step_cpu_us_mean": float(log.step_cpu_us.mean()) if log.step_cpu_us.size else 0.0,
        "step_cpu_us_p99": float(np.percentile(log.step_cpu_us, 99)) if log.step_cpu_us.size else 0.0,
        "duration_s": duration,
        "throughput_tok_s": float(log.output_tokens[completed].sum() / duration),
    }
    total = n + log.rejected_too_long
    for each in SLOS.values():
        met = slo_met(log, each)
        record[f"slo_{each.name}"] = {
            "attainment": float(met.sum() / total),
            "goodput_req_s": float(met.sum() / duration),
            "goodput_tok_s": float(log.output_tokens[met].sum() / duration),
        }
    chosen = record[f"slo_{slo.name}"]
    record["slo"] = slo.name
    record["slo_attainment"] = chosen["attainment"]
    record["goodput_req_s"] = chosen["goodput_req_s"]
    record["goodput_tok_s"] = chosen["goodput_tok_s"]
    return record


# Two-sided 95% Student t quantiles for n - 1 degrees of freedom (n runs); 1.96 beyond 30.
_T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262, 11: 2.228,
        12: 2.201, 13: 2.179, 14: 2.160, 15: 2.145, 16: 2.131, 17: 2.120, 18: 2.110, 19: 2.101, 20: 2.093,
        21: 2.086, 22: 2.080, 23: 2.074, 24: 2.069, 25: 2.064, 26: 2.060, 27: 2.056, 28: 2.052, 29: 2.048, 30: 2.045}


def interval95(values) -> float:
    """Half-width of the 95% confidence interval of the mean of `values` (0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return 0.0
    return float(_T95.get(values.size, 1.96) * values.std(ddof=1) / np.sqrt(values.size))


def aggregate(records: list) -> dict:
    """One record from the records of several seeds: numbers become their means, each with a
    ``<name>_ci95`` half-width beside it (nested SLO records too); ``seeds`` and ``per_seed`` keep
    the runs. One record comes back as it is, with ``seeds`` added."""
    def number(value) -> bool:
        return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)

    def merge(group: list) -> dict:
        out = {}
        for key, value in group[0].items():
            present = [r[key] for r in group if r.get(key) is not None]
            if isinstance(value, dict):
                out[key] = merge([r[key] for r in group])
            elif present and all(number(v) for v in present):
                # A figure some seeds lack (None: e.g. no migration to time) is the mean of the others.
                out[key] = float(np.mean(present)) if len(group) > 1 else value
                if all(isinstance(v, (int, np.integer)) for v in present) and float(out[key]).is_integer():
                    out[key] = int(out[key])  # a count stays a count where its mean over seeds is whole
                out[f"{key}_ci95"] = interval95(present)
            elif isinstance(value, bool):
                out[key] = all(r[key] for r in group)
            else:
                out[key] = value
        return out

    out = merge(records)
    out.pop("seed", None)
    out.pop("seed_ci95", None)
    out["seeds"] = [r.get("seed") for r in records]
    if len(records) > 1:
        out["per_seed"] = records
    return out
