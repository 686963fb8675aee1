"""kvsched's load signal for routers: Prometheus gauges beside vLLM's own on ``/metrics``.

Routers already read an engine's load from ``/metrics`` (llm-d's KV-utilization and queue scorers
take the metric's name as a flag; others read ``vllm:kv_cache_usage_perc`` and
``vllm:num_requests_waiting``). Those are current use; kvsched also predicts where the KV use of the
requests an engine holds is going (the peak estimator). These gauges publish that prediction under the
same labels as vLLM's (``model_name``, ``engine``), so a router reads it like any other metric, with
no kvsched code: ``kvsched:kv_predicted_usage_perc`` is a drop-in for ``vllm:kv_cache_usage_perc``
that counts the decode growth still to come. Not in the KV event stream: that stream says which
blocks an engine holds (deltas, decoded strictly as vLLM's event union by existing routers; an
event type of our own would break them), while load is a level a router samples when it decides.

Glossary (blocks, as ``kvsched.Scheduler.load()`` reports them)
  capacity  the blocks kvsched plans with (the KV cache less the watermark).
  peak      the predicted future peak of the running requests' KV.
  demand    the predicted future peak of every live request, waiting ones included.
  headroom  capacity - demand: what the engine can still admit without a predicted preemption
            (negative: it holds more than it is predicted to fit, and will preempt or queue).

Where they show: the gauges are set in the process that runs the scheduler (the engine core). vLLM's
``/metrics`` includes them when that is the API server's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
or when ``PROMETHEUS_MULTIPROC_DIR`` is set (vLLM sets it itself with ``--api-server-count`` > 1;
with one API server set it to an empty directory before ``vllm serve``), because then every process
writes its metrics there and ``/metrics`` reads them all. They are updated at most every
``interval`` seconds (``load()`` costs about 0.1 ms at 1024 requests) and when the engine falls
idle, and only with stats on (vLLM's ``--disable-log-stats`` turns them off with vLLM's own).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Gauge

_DOCS = {
    "kvsched:kv_capacity_blocks": "KV cache blocks kvsched plans with (the cache less the watermark).",
    "kvsched:kv_used_blocks": "KV cache blocks held by requests now.",
    "kvsched:kv_predicted_peak_blocks": "Predicted future peak KV blocks of the running requests.",
    "kvsched:kv_predicted_demand_blocks": "Predicted future peak KV blocks of every live request, waiting ones "
                                          "included.",
    "kvsched:kv_headroom_blocks": "KV blocks left after the predicted demand (negative: over-committed).",
    "kvsched:kv_predicted_usage_perc": "Predicted peak KV usage of every live request; 1 means 100 percent "
                                       "(vllm:kv_cache_usage_perc with the decode growth to come).",
    "kvsched:running_tokens": "Tokens (prompt and generated) of the running requests.",
    "kvsched:queued_tokens": "Prompt tokens of the requests waiting to run.",
    "kvsched:kv_block_size": "Tokens per KV block (the blocks of the kv_* gauges).",
    # Swap and the host tier (0 without a host pool); running totals since the engine started.
    "kvsched:host_free_blocks": "Free blocks of the host KV pool (swap and the host tier of the prefix cache).",
    "kvsched:swap_preemptions": "Requests preempted by swap so far (their KV copied to the host pool and back).",
    "kvsched:host_hit_blocks": "Prefix-cache blocks found in the host tier and loaded by copy, so far.",
    "kvsched:copy_failure_recomputes": "Requests recomputed because a KV copy that moved their KV failed, so far.",
}
_gauges: dict[str, Gauge] = {}  # one per name in the process, shared by every engine (label `engine`)


def _gauge(name: str) -> Gauge:
    if name not in _gauges:
        _gauges[name] = Gauge(name, _DOCS[name], labelnames=["model_name", "engine"], multiprocess_mode="mostrecent")
    return _gauges[name]


class LoadGauges:
    """Sets the gauges from the adapter's ``load()`` report, at most every ``interval`` seconds."""

    interval = 0.05

    @classmethod
    def create(cls, scheduler: Any) -> "LoadGauges | None":
        """The engine's gauges, or None with stats off."""
        return cls(scheduler) if scheduler.log_stats else None

    def __init__(self, scheduler: Any) -> None:
        config = scheduler.vllm_config
        labels = (config.model_config.served_model_name, str(config.parallel_config.data_parallel_index))
        self._scheduler = scheduler
        self._gauges = {name: _gauge(name).labels(*labels) for name in _DOCS}
        self._last = float("-inf")

    def update(self, force: bool = False) -> None:
        """After a step: at most every ``interval`` seconds, and always once the engine is idle (so that
        an idle engine never shows the load of its last busy step)."""
        now = time.monotonic()
        if not force and now - self._last < self.interval and self._scheduler.requests:
            return
        self._last = now
        load = self._scheduler.load()
        capacity, demand = load["capacity_blocks"], load["demand_blocks"]
        values = {
            "kvsched:kv_capacity_blocks": capacity,
            "kvsched:kv_used_blocks": load["used_blocks"],
            "kvsched:kv_predicted_peak_blocks": load["peak_blocks"],
            "kvsched:kv_predicted_demand_blocks": demand,
            "kvsched:kv_headroom_blocks": capacity - demand,
            "kvsched:kv_predicted_usage_perc": demand / capacity if capacity else 0.0,
            "kvsched:running_tokens": load["running_tokens"],
            "kvsched:queued_tokens": load["queued_tokens"],
            "kvsched:kv_block_size": self._scheduler.block_size,
        }
        if self._scheduler.kvsched_config.num_host_blocks:
            stats = self._scheduler.core.stats()
            values["kvsched:host_free_blocks"] = stats["swap"]["num_free_host_blocks"]
            values["kvsched:swap_preemptions"] = stats["swap_preemptions"]
            values["kvsched:host_hit_blocks"] = stats["host_hit_blocks"]
            values["kvsched:copy_failure_recomputes"] = self._scheduler.recomputed_after_copy_failures
        for name, value in values.items():
            self._gauges[name].set(value)
