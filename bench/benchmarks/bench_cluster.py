"""The cluster layer's native calls: an instance's load report (what the dispatcher reads of each
instance per batch) and the dispatch of a batch of new requests over the fleet.

Run against the installed build: ``cd bench && asv run --python=same --quick``. Figures in
bench/README.md ("Cluster").
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

try:
    import kvsched
    from kvsched.cluster import Dispatcher, InstanceLoads
except ImportError:
    kvsched = None


class LoadReport:
    """Scheduler.load() with N running and 1,000 waiting requests under past_future (the predicted
    peak of every live request is the costly part)."""

    params = [256, 1024]
    param_names = ["running"]

    def setup(self, running):
        if kvsched is None:
            raise NotImplementedError("kvsched is not importable")
        rng = np.random.default_rng(0)
        self.scheduler = s = kvsched.Scheduler(
            num_blocks=running * 300 // 16 + 64, block_size=16, max_num_seqs=running, max_num_batched_tokens=8192,
            prior=np.clip(rng.lognormal(np.log(129), 1.0, 1000), 1, 4000).astype(np.int64))
        s.add_requests(np.arange(running + 1000), 128, 4000)
        for _ in range(8):
            plan = s.schedule()
            s.update(plan.req_ids, plan.samples.astype(np.int64))

    def time_load(self, running):
        self.scheduler.load()


class DispatchBatch:
    """Dispatcher.place for a batch of requests over a fleet, every policy."""

    params = ([8, 64], [32, 1024], ["least_load", "headroom", "prefix_affinity"])
    param_names = ["instances", "requests", "policy"]

    def setup(self, instances, requests, policy):
        if kvsched is None:
            raise NotImplementedError("kvsched is not importable")
        rng = np.random.default_rng(0)
        self.loads = InstanceLoads(np.ones(instances, bool), rng.integers(0, 50_000, instances),
                                   rng.integers(-500, 4000, instances), np.zeros(instances, np.int64),
                                   np.full(instances, 4096), 16)
        self.tokens = rng.integers(16, 4096, requests)
        self.blocks = -(-(self.tokens + 300) // 16)
        self.hits = rng.integers(0, 8, (requests, instances))
        self.dispatcher = Dispatcher(policy)

    def time_place(self, instances, requests, policy):
        self.dispatcher.place(self.loads, self.tokens, self.blocks, self.hits)
