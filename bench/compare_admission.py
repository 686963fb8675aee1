"""past_future variants against oracle and aggressive on workloads where admission decides.

    python bench/compare_admission.py

Deterministic simulated runs (llama3-8b-a100 profile) through the real Scheduler; prints SLO
attainment (lax, strict), P99 TTFT, preemptions and KV use per variant. bench/README.md records
the figures.
"""

from __future__ import annotations

from kvsched.sim.driver import simulate
from kvsched.sim.engine import LAX, EngineConfig, prepare
from kvsched.sim.metrics import summarize
from kvsched.sim.profiles import PROFILES
from kvsched.sim.workloads import synthetic

VARIANTS = {
    "quantile 0.9 adaptive": dict(sampling=False),
    "quantile 0.5 fast": dict(sampling=False, quantile=0.5, adapt_gain=1.0, min_quantile=0.05),
    "sampling x1, fresh draws": dict(num_scenarios=1, keyed_draws=False),
    "sampling x3, fresh draws": dict(num_scenarios=3, keyed_draws=False),
    "sampling x5, fresh draws": dict(keyed_draws=False),
    "sampling x1, keyed": dict(num_scenarios=1),
    "sampling x3, keyed": dict(num_scenarios=3),
    "sampling x5, keyed (default)": {},
}
WORKLOADS = {
    "chat 7 req/s, 64k KV": (synthetic("chat", 1500, 7.0, seed=0), 65536),
    "decode_heavy 7 req/s, 32k KV": (synthetic("decode_heavy", 1500, 7.0, seed=0), 32768),
}


def main() -> None:
    profile = PROFILES["llama3-8b-a100"]
    for workload, (trace, capacity) in WORKLOADS.items():
        print(workload)
        runs = [(name, "past_future", overrides) for name, overrides in VARIANTS.items()]
        runs += [("oracle", "oracle", {}), ("aggressive", "aggressive", {})]
        for name, admission, overrides in runs:
            engine = EngineConfig(profile, capacity, scheduler_overrides=overrides)
            record = summarize(simulate(prepare(trace, engine), engine, admission), LAX)
            print(
                f"  {name:29s} lax {record['slo_lax']['attainment']:6.1%}  strict {record['slo_strict']['attainment']:6.1%}"
                f"  TTFT p99 {record['ttft_p99_s']:6.2f} s  preemptions {record['preemptions']:5d}"
                f"  KV use {record['kv_utilization']:.1%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
