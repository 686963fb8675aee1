"""The fleet on Ray: each engine instance a Ray actor.

:class:`RayPool` holds ``count`` actors, each built from the same factory (any class whose
instances answer :class:`kvsched.cluster.instance.Instance`), and is called like a
:class:`~kvsched.cluster.instance.LocalPool`: one call per instance and method, or a batch of calls
submitted together so that the actors run them in parallel. An actor that dies (``ray.kill``, a
lost node) surfaces as :class:`~kvsched.cluster.instance.InstanceLost`. The simulated fleet on Ray
is ``kvsched.sim.driver.simulate_on_ray``.

Needs the ``ray`` extra: ``pip install 'kvsched[ray]'``.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .instance import InstanceLost


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("kvsched.cluster.ray needs Ray: pip install 'kvsched[ray]'") from None
    return ray


class RayPool:
    """``count`` actors, each ``factory(*args)``. The arguments are put in Ray's object store once
    and shared. The actors ask Ray for ``num_cpus`` each (0 by default, so that a small local
    cluster holds a fleet; give them one each on a real cluster)."""

    def __init__(self, factory: Callable, args: Sequence, count: int, num_cpus: float = 0):
        ray = _ray()
        if not ray.is_initialized():
            raise RuntimeError("RayPool: call ray.init() first (e.g. ray.init(num_cpus=2) for a local cluster)")
        remote_instance = ray.remote(factory)
        shared = [ray.put(arg) for arg in args]
        self.actors = [remote_instance.options(num_cpus=num_cpus).remote(*shared) for _ in range(count)]

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
