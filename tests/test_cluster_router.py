"""Loads as a real router sees them (kvsched.cluster.router): polled on a timer, several replicas."""

from __future__ import annotations

import numpy as np
import pytest

from kvsched.cluster import Dispatcher, InstanceLoads
from kvsched.cluster.router import Router
from kvsched.sim.driver import FleetSpec, simulate_fleet
from kvsched.sim.engine import EngineConfig, prepare
from kvsched.sim.profiles import PROFILES
from kvsched.sim.workloads import synthetic


class Fleet:
    """Three instances whose true load the test controls; each poll returns it."""

    def __init__(self):
        self.load = np.zeros(3, np.int64)
        self.polls = 0

    def poll(self) -> InstanceLoads:
        self.polls += 1
        k = self.load.size
        return InstanceLoads(np.ones(k, bool), self.load.copy(), 1000 - self.load // 16, np.zeros(k, np.int64),
                             np.full(k, 1000, np.int64), 16)


def place_one_by_one(router: Router, fleet: Fleet, times) -> list:
    placed = []
    for now in times:
        (target,) = router.place(now, fleet.poll, np.ones(3, bool), np.array([100]), np.array([7]))
        fleet.load[target] += 100  # the instance now holds it; the router learns at its next poll
        placed.append(int(target))
    return placed


def test_between_polls_an_uncounting_router_sends_everything_to_one_instance():
    fleet = Fleet()
    herd = place_one_by_one(Router(Dispatcher("least_load"), period_s=1.0, count_placed=False), fleet,
                            np.arange(9) * 0.1)  # nine requests within one period
    assert herd == [0] * 9 and fleet.polls == 1


def test_counting_what_it_placed_since_the_poll_spreads_the_same_burst():
    fleet = Fleet()
    spread = place_one_by_one(Router(Dispatcher("least_load"), period_s=1.0), fleet, np.arange(9) * 0.1)
    assert sorted(spread) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and fleet.polls == 1


def test_polls_come_once_a_period_at_the_router_phase():
    fleet = Fleet()
    router = Router(Dispatcher("headroom"), period_s=1.0, phase_s=0.25)
    place_one_by_one(router, fleet, [0.0, 0.2, 0.25, 0.9, 1.24, 1.25, 3.0])
    assert fleet.polls == 4  # at 0.0 (the first), 0.25, 1.25 and 3.0
    fresh = Fleet()
    place_one_by_one(Router(Dispatcher("headroom")), fresh, [0.0, 0.0, 0.1])
    assert fresh.polls == 3  # period 0: a poll before every decision


def test_router_refuses_bad_settings_by_name():
    with pytest.raises(ValueError, match="period_s"):
        Router(Dispatcher("least_load"), period_s=-1.0)
    with pytest.raises(TypeError, match="count_placed"):
        Router(Dispatcher("least_load"), count_placed="no")
    with pytest.raises(TypeError, match="dispatcher"):
        Router("least_load")
    with pytest.raises(ValueError, match="routers"):
        FleetSpec(2, "least_load", routers=0)
    with pytest.raises(ValueError, match="load_period_s"):
        FleetSpec(2, "least_load", load_period_s=float("nan"))


def test_stale_loads_in_a_fleet_end_every_request_and_counting_keeps_the_herd_off():
    engine = EngineConfig(PROFILES["llama3-8b-a100"], 32768)
    prepared = prepare(synthetic("chat", 600, 4 * 7.0, seed=3), engine)
    runs = {}
    for counted in (False, True):
        fleet = FleetSpec(4, "least_load", load_period_s=2.0, routers=2, count_placed=counted)
        result = simulate_fleet(prepared, engine, "past_future", fleet, check_every_round=True)
        assert np.isfinite(result.log.finish_s).all()
        runs[counted] = result
    # Uncounted, a 2 s poll sends each replica's share of two seconds of arrivals (about 28 requests)
    # to one instance; counted, they spread as with fresh loads.
    assert runs[True].load_spread < runs[False].load_spread
    assert runs[True].log.preemptions.sum() <= runs[False].log.preemptions.sum()
