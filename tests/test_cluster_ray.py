"""The fleet on Ray (kvsched.cluster.ray): a local Ray cluster, one actor per instance."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvsched.cluster import Dispatcher, MigrationPolicy
from kvsched.sim.driver import Driver, FleetSpec, simulate_fleet, simulate_on_ray
from kvsched.sim.engine import EngineConfig, EngineInstance, prepare
from kvsched.sim.profiles import PROFILES
from kvsched.sim.traces import read_trace

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'kvsched[ray]')")
if "libasan" in os.environ.get("LD_PRELOAD", ""):
    # Ray's own native processes inherit the sanitizer preload and are not built for it.
    pytest.skip("Ray's processes do not run under the AddressSanitizer preload", allow_module_level=True)

from kvsched.cluster.ray import RayPool  # noqa: E402
from test_cluster_faults import POLICY, conversations  # noqa: E402

A100 = PROFILES["llama3-8b-a100"]
PER_REQUEST = ("arrival_s", "first_token_s", "finish_s", "prefill_start_s", "max_gap_s", "num_gaps", "preemptions",
               "rejected")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def workload(trace_dir):
    """The Azure conversation trace's first 320 requests at 4x its rate (one instance's load each)."""
    trace = read_trace(trace_dir / "AzureLLMInferenceTrace_conv.csv", "azure").head(320)
    trace = trace.with_arrivals(trace.arrival_s / 4)
    engine = EngineConfig(A100, 32768)
    return prepare(trace, engine), engine


@pytest.mark.parametrize("spec", [FleetSpec(4, "headroom", MigrationPolicy()), FleetSpec(4, "least_load", shared_history=True)],
                         ids=["headroom+migration", "least_load+shared"])
def test_ray_gives_the_in_process_results(local_ray, trace_dir, spec):
    prepared, engine = workload(trace_dir)
    local = simulate_fleet(prepared, engine, "past_future", spec)
    remote = simulate_on_ray(prepared, engine, "past_future", spec)
    for name in PER_REQUEST:
        assert np.array_equal(getattr(local.log, name), getattr(remote.log, name), equal_nan=True), name
    assert remote.migration == local.migration
    assert spec.migration is None or remote.migration["committed"] > 0
    assert remote.served.tolist() == local.served.tolist()


def test_a_killed_actor_requests_are_retried_and_none_is_lost(local_ray, trace_dir):
    prepared, engine = workload(trace_dir)
    killed = []

    def kill_one(now, pool):
        if now > 10.0 and not killed:  # mid-run: it holds requests then
            ray.kill(pool.actors[2])
            killed.append(now)

    result = simulate_on_ray(prepared, engine, "past_future", FleetSpec(4, "least_load", MigrationPolicy()),
                             hook=kill_one, check_every_round=True)
    log = result.log
    assert killed and result.lost_instances == [2] and result.retried > 0
    completed = ~np.isnan(log.finish_s)
    assert completed.sum() + log.rejected.sum() == len(prepared.trace)
    assert result.summary()["retried"] == result.retried


def test_actors_killed_at_migration_stages_lose_no_request_and_leak_no_reservation(local_ray):
    """The destination of a last stage in flight, then the source of a first stage: killed actors."""
    engine = EngineConfig(A100, 8192)
    prepared = prepare(conversations(), engine)
    pool = RayPool(EngineInstance, (prepared, engine, "aggressive", None, None), 3)
    killed: list = []

    def hook(now, _pool):
        for m in driver.migrations:
            last = m.record is not None
            if (not killed and last) or (len(killed) == 1 and not last and m.stage == 1 and m.src not in killed):
                victim = m.dst if last else m.src
                ray.kill(pool.actors[victim])
                killed.append(victim)
                return

    try:
        driver = Driver(prepared, engine, pool, admission="aggressive", dispatcher=Dispatcher("round_robin"),
                        migration=POLICY, hook=hook, check_every_round=True)
        driver.run()
        result = driver.result("round_robin", "ray faults")
        finished = ~np.isnan(result.log.finish_s)
        assert len(killed) == 2 and sorted(result.lost_instances) == sorted(killed)
        assert np.all(finished ^ result.log.rejected) and np.all(driver.times_ended == 1)
        assert result.served.sum() == finished.sum() and not driver.migrations
        for i in set(range(3)) - set(killed):
            load = pool.call(i, "load")
            assert load["num_incoming"] == 0 and load["num_running"] == 0 and load["num_waiting"] == 0
    finally:
        pool.shutdown()
