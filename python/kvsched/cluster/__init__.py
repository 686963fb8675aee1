"""kvsched.cluster: a global scheduler over many engine instances.

Dispatch (``Dispatcher``, one native call per batch of new requests) and Llumnix-style live
migration (``MigrationPolicy``, ``Link``) decide placement and moves from plain per-instance arrays;
every per-request decision stays in each instance's native scheduler. An engine instance is whatever
answers ``Instance``'s calls (``kvsched.cluster.instance``): this package imports no engine and no
simulator. Simulated by ``kvsched simulate --instances N`` (kvsched.sim.driver, whose engine
instances live in this process or, with ``simulate_on_ray``, one Ray actor each through
``kvsched.cluster.ray``; ``pip install 'kvsched[ray]'``). Real engines: ``kvsched route``
(``kvsched.cluster.proxy``) in front of engine servers, and ``kvsched.cluster.ray_fleet`` to run
both as Ray actors.
"""

from .dispatch import DISPATCH_POLICIES, Dispatcher, InstanceLoads
from .instance import Instance, InstanceLost, LocalPool
from .migration import LINKS, REASONS, Link, Migration, MigrationPolicy, MigrationStats

__all__ = ["DISPATCH_POLICIES", "LINKS", "REASONS", "Dispatcher", "Instance", "InstanceLoads", "InstanceLost",
           "Link", "LocalPool", "Migration", "MigrationPolicy", "MigrationStats"]
