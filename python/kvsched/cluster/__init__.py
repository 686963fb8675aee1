"""kvsched.cluster: a global scheduler over many engine instances.

Dispatch (``Dispatcher``, one native call per batch of new requests) and Llumnix-style live
migration (``MigrationPolicy``, ``Link``) decide placement and moves from plain per-instance arrays;
every per-request decision stays in each instance's native scheduler. Simulated by
``kvsched simulate --instances N`` (kvsched.sim.driver); on Ray with ``kvsched.cluster.ray``
(``pip install 'kvsched[ray]'``).
"""

from .dispatch import DISPATCH_POLICIES, Dispatcher, InstanceLoads
from .migration import LINKS, REASONS, Link, Migration, MigrationPolicy, MigrationStats

__all__ = ["DISPATCH_POLICIES", "LINKS", "REASONS", "Dispatcher", "InstanceLoads", "Link", "Migration",
           "MigrationPolicy", "MigrationStats"]
