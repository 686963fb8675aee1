"""The fleet's Python classes refuse, by name, what they would otherwise convert silently or fail on
later: NaN, inf, strings, fractions where a count is meant, and bools where a number is meant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_cluster import A100

from kvsched.cluster import LINKS, Dispatcher, Link, MigrationPolicy
from kvsched.sim.driver import MAX_INSTANCES, Driver, FleetSpec, LocalPool, simulate_fleet
from kvsched.sim.engine import EngineConfig, EngineInstance, prepare
from kvsched.sim.workloads import synthetic

NAN, INF = math.nan, math.inf


def refused(call, error, *names):
    with pytest.raises(error) as caught:
        call()
    for name in names:
        assert name in str(caught.value), (str(caught.value), name)


@pytest.mark.parametrize("field, value, error", [
    ("check_interval_s", NAN, ValueError), ("check_interval_s", INF, ValueError),
    ("check_interval_s", -0.1, ValueError), ("check_interval_s", "0.05", TypeError),
    ("check_interval_s", True, TypeError), ("check_interval_s", None, TypeError),
    ("rebalance_gap", NAN, ValueError), ("rebalance_gap", INF, ValueError), ("rebalance_gap", "0.25", TypeError),
    ("min_gain", NAN, ValueError), ("min_gain", -INF, ValueError), ("min_gain", False, TypeError),
    ("max_stages", 1.5, TypeError), ("max_stages", 2.0, TypeError), ("max_stages", "8", TypeError),
    ("max_stages", True, TypeError), ("max_stages", 0, ValueError), ("max_stages", NAN, TypeError),
    ("max_stages", INF, TypeError),
    ("final_stage_tokens", -1, ValueError), ("final_stage_tokens", 2.5, TypeError),
    ("final_stage_tokens", True, TypeError),
    ("max_in_flight_per_instance", 0, ValueError), ("max_in_flight_per_instance", 1.0, TypeError),
    ("max_in_flight_per_instance", np.bool_(True), TypeError),
    ("link", "rdma", TypeError), ("link", None, TypeError),
])
def test_migration_policy_refuses_by_name(field, value, error):
    refused(lambda: MigrationPolicy(**{field: value}), error, field, "got")


def test_migration_policy_error_reads_as_documented():
    refused(lambda: MigrationPolicy(max_stages=1.5), TypeError, "max_stages must be an int >= 1, got 1.5")


@pytest.mark.parametrize("kwargs, error, name", [
    ({"bandwidth_bytes_per_s": NAN}, ValueError, "bandwidth_bytes_per_s"),
    ({"bandwidth_bytes_per_s": INF}, ValueError, "bandwidth_bytes_per_s"),
    ({"bandwidth_bytes_per_s": 0}, ValueError, "bandwidth_bytes_per_s"),
    ({"bandwidth_bytes_per_s": "1e9"}, TypeError, "bandwidth_bytes_per_s"),
    ({"bandwidth_bytes_per_s": True}, TypeError, "bandwidth_bytes_per_s"),
    ({"latency_s": NAN}, ValueError, "latency_s"), ({"latency_s": INF}, ValueError, "latency_s"),
    ({"latency_s": -1e-6}, ValueError, "latency_s"), ({"latency_s": "0"}, TypeError, "latency_s"),
    ({"latency_s": None}, TypeError, "latency_s"), ({"name": 5}, TypeError, "name"),
])
def test_link_refuses_by_name(kwargs, error, name):
    args = {"name": "custom", "bandwidth_bytes_per_s": 1e9, "latency_s": 1e-5, **kwargs}
    refused(lambda: Link(**args), error, name)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"instances": 1.5}, TypeError, "instances"), ({"instances": 2.0}, TypeError, "instances"),
    ({"instances": "2"}, TypeError, "instances"), ({"instances": True}, TypeError, "instances"),
    ({"instances": 0}, ValueError, "instances"), ({"instances": MAX_INSTANCES + 1}, ValueError, str(MAX_INSTANCES)),
    ({"dispatch": 3}, TypeError, "dispatch policy"), ({"dispatch": None}, TypeError, "dispatch policy"),
    ({"dispatch": "random"}, ValueError, "dispatch policy"),
    ({"migration": "on"}, TypeError, "migration"), ({"migration": True}, TypeError, "migration"),
    *[({"imbalance_limit": value}, error, "imbalance_limit")
      for value, error in ((NAN, ValueError), (INF, ValueError), (-0.1, ValueError), (True, TypeError),
                           ("0.1", TypeError))],
    ({"global_queue": "false"}, TypeError, "global_queue"), ({"global_queue": 1}, TypeError, "global_queue"),
])
def test_fleet_spec_and_dispatcher_refuse_by_name(kwargs, error, name):
    args = {"instances": 2, "dispatch": "least_load", **kwargs}
    refused(lambda: FleetSpec(**args), error, name)
    if "instances" not in kwargs and "migration" not in kwargs:
        dispatcher_args = {"policy": args["dispatch"], **{k: v for k, v in kwargs.items() if k != "dispatch"}}
        refused(lambda: Dispatcher(**dispatcher_args), error, name)


@pytest.mark.parametrize("drains, error, name", [
    ({1.5: 2.0}, TypeError, "drains"), ({True: 1.0}, TypeError, "drains"), ({5: 1.0}, ValueError, "drains"),
    ({-1: 1.0}, ValueError, "drains"), ({0: NAN}, ValueError, "drains"), ({0: "1"}, TypeError, "drains"),
])
def test_driver_drains_refused_by_name(drains, error, name):
    engine = EngineConfig(A100, 8192)
    prepared = prepare(synthetic("chat", 10, 5.0, seed=0), engine)
    pool = LocalPool([EngineInstance(prepared, engine, "aggressive") for _ in range(2)])
    refused(lambda: Driver(prepared, engine, pool, admission="aggressive", dispatcher=Dispatcher("least_load"),
                           drains=drains), error, name)


def test_good_values_still_work_and_are_stored_as_plain_numbers():
    policy = MigrationPolicy(link=Link("custom", np.float64(1e10), 0), check_interval_s=np.float32(0.05),
                             rebalance_gap=1, max_stages=np.int64(4), final_stage_tokens=np.int32(0),
                             max_in_flight_per_instance=2)
    assert type(policy.max_stages) is int and policy.max_stages == 4 and type(policy.rebalance_gap) is float
    assert type(policy.link.bandwidth_bytes_per_s) is float and policy.link.latency_s == 0.0
    assert MigrationPolicy() == MigrationPolicy(link=LINKS["rdma"])
    spec = FleetSpec(np.int64(2), "least_load", policy, imbalance_limit=0, global_queue=np.bool_(True))
    assert type(spec.instances) is int and spec.global_queue is True and spec.label == "least_load+queue+migration"
    assert Dispatcher("headroom", np.float64(0.2), global_queue=False).imbalance_limit == 0.2
    engine = EngineConfig(A100, 16384)
    prepared = prepare(synthetic("chat", 40, 8.0, seed=0), engine)
    result = simulate_fleet(prepared, engine, "past_future", spec, drains={np.int64(1): 1.0}, check_every_round=True)
    assert (~np.isnan(result.log.finish_s)).sum() + result.log.rejected.sum() == len(prepared.trace)
