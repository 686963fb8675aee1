"""What a simulated request costs: one instance against a fleet of four, in process and on Ray.

Each row replays a built-in workload (300 requests per instance, 100 of reasoning's long ones; the
workload's default load per instance) and reports the wall time per simulated request, median of --repeats runs in this one
process (same-run ratios against the single instance of the same workload beside it).

Usage: python bench/fleet_sim_cost.py [--repeats 3] [--ray]   (about 3 minutes on 2 cores; Ray adds 1-2)
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvsched.cluster import MigrationPolicy
from kvsched.sim.driver import FleetSpec, simulate, simulate_fleet, simulate_on_ray
from kvsched.sim.engine import EngineConfig, prepare
from kvsched.sim.profiles import PROFILES
from kvsched.sim.workloads import BUILT_IN_DEFAULTS, multi_turn_chat, synthetic

PER_INSTANCE = {"chat": 300, "multi_turn": 300, "reasoning": 100}
A100 = PROFILES["llama3-8b-a100"]


def workload(name: str, instances: int):
    defaults = BUILT_IN_DEFAULTS[name]
    engine = EngineConfig(A100, defaults.kv_capacity_tokens, max_model_len=defaults.max_model_len,
                          max_new_tokens=defaults.max_new_tokens)
    count, rate = PER_INSTANCE[name] * instances, defaults.rate * instances
    if name == "multi_turn":
        trace = multi_turn_chat(count, rate, seed=0, max_requests=count)
    else:
        trace = synthetic(name, count, rate, seed=0)
    return prepare(trace, engine), engine


def timed(run, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also the 4-instance chat fleet on a local Ray cluster")
    args = parser.parse_args()
    rows = []
    for name, dispatch in (("chat", "headroom"), ("multi_turn", "prefix_affinity"), ("reasoning", "headroom")):
        one, engine = workload(name, 1)
        single = timed(lambda: simulate(one, engine, "past_future"), args.repeats) / len(one.trace)
        rows.append((name, "1 instance", single, 1.0))
        four, engine4 = workload(name, 4)
        for label, fleet in ((dispatch, FleetSpec(4, dispatch)),
                             (f"{dispatch}+migration", FleetSpec(4, dispatch, MigrationPolicy()))):
            cost = timed(lambda: simulate_fleet(four, engine4, "past_future", fleet), args.repeats) / len(four.trace)
            rows.append((name, f"4 instances, {label}", cost, cost / single))
        if args.ray and name == "chat":
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                cost = timed(lambda: simulate_on_ray(four, engine4, "past_future", FleetSpec(4, dispatch)),
                             args.repeats) / len(four.trace)
            finally:
                ray.shutdown()
            rows.append((name, f"4 instances on Ray, {dispatch}", cost, cost / single))
    print("| workload | run | ms per simulated request | against 1 instance |")
    print("|---|---|---|---|")
    for name, run, cost, ratio in rows:
        print(f"| {name} | {run} | {cost * 1e3:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
