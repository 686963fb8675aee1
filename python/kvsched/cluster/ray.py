"""The fleet on Ray: each instance a Ray actor, the global scheduler in the driver process.

Each actor holds one :class:`kvsched.sim.engine.EngineInstance` (its Scheduler and an executor:
the simulated engine here; in production, the user's engine in its place). The driver
(:class:`kvsched.sim.driver.Driver`) talks to the actors in batches: one call per busy instance
per round (``advance``), one per instance for loads and prefix hits when dispatching, a few per
migration stage. Its protocol is the in-process one, so a seed gives the same per-request results.
An actor that dies (``ray.kill``, a lost node) surfaces as ``InstanceLost``: its requests are
dispatched again and counted as retried.

Needs the ``ray`` extra: ``pip install 'kvsched[ray]'``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..sim.driver import Driver, FleetResult, FleetSpec, InstanceLost
from ..sim.engine import EngineConfig, EngineInstance, PreparedTrace


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("kvsched.cluster.ray needs Ray: pip install 'kvsched[ray]'") from None
    return ray


class RayPool:
    """``count`` EngineInstance actors. They ask Ray for no CPU of their own (``num_cpus``), so a
    small local cluster holds a fleet; give them one each on a real cluster."""

    def __init__(self, prepared: PreparedTrace, engine: EngineConfig, admission: str, count: int,
                 policy: Optional[str] = None, priorities=None, num_cpus: float = 0):
        ray = _ray()
        if not ray.is_initialized():
            raise RuntimeError("RayPool: call ray.init() first (e.g. ray.init(num_cpus=2) for a local cluster)")
        remote_instance = ray.remote(EngineInstance)
        shared = ray.put(prepared)
        self.actors = [remote_instance.options(num_cpus=num_cpus).remote(shared, engine, admission, policy, priorities)
                       for _ in range(count)]

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, index: int, method: str, *args):
        ray = _ray()
        try:
            return ray.get(getattr(self.actors[index], method).remote(*args))
        except ray.exceptions.RayActorError as error:
            raise InstanceLost(index, error) from None

    def call_many(self, calls: Sequence[tuple]) -> list:
        """[(index, method, args)] -> results in order, submitted together (the actors run them in
        parallel); an InstanceLost in place of a call whose actor died."""
        ray = _ray()
        futures = [getattr(self.actors[i], method).remote(*args) for i, method, args in calls]
        results = []
        for (i, _, _), future in zip(calls, futures):
            try:
                results.append(ray.get(future))
            except ray.exceptions.RayActorError as error:
                results.append(InstanceLost(i, error))
        return results

    def shutdown(self) -> None:
        ray = _ray()
        for actor in self.actors:
            ray.kill(actor)


def simulate_on_ray(
    prepared: PreparedTrace,
    engine: EngineConfig,
    admission: str,
    fleet: FleetSpec,
    policy: Optional[str] = None,
    priorities=None,
    drains: Optional[dict] = None,
    hook: Optional[Callable] = None,
    check_every_round: bool = False,
) -> FleetResult:
    """:func:`kvsched.sim.driver.simulate_fleet`, with each instance a Ray actor (``ray.init()`` first).
    ``hook(now, pool)`` runs every round (e.g. to kill an actor: ``ray.kill(pool.actors[i])``)."""
    pool = RayPool(prepared, engine, admission, fleet.instances, policy, priorities)
    try:
        driver = Driver(prepared, engine, pool, admission=admission, policy=policy,
                        dispatcher=fleet.dispatcher(), migration=fleet.migration,
                        drains=drains, hook=hook, check_every_round=check_every_round)
        driver.run()
        return driver.result(fleet.dispatch, f"{admission} {fleet.label}")
    finally:
        pool.shutdown()
