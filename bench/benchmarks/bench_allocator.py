"""BlockAllocator: per-block allocate+free in batched calls, decode growth, prefix match.

Run against the installed build: ``cd bench && asv run --python=same --quick`` (or
``asv run --environment existing:python``). Seeded; figures in bench/README.md.
"""

import numpy as np

try:
    from kvsched import BlockAllocator
except ImportError:  # asv imports benchmarks before checking the environment
    BlockAllocator = None


def _require():
    if BlockAllocator is None:
        raise NotImplementedError("kvsched is not installed in this environment")


class AllocateFreeBatched:
    """Allocate n_seqs sequences of 16 blocks in one call, then free them in one call.

    Divide by n_seqs * 16 for the per-block cost (track_per_block_ns reports it directly)."""

    params = ([256, 1024], ["contiguous", "fifo"])
    param_names = ["n_seqs", "placement"]

    def setup(self, n_seqs, placement):
        _require()
        self.allocator = BlockAllocator(n_seqs * 16 + 1, 16, placement=placement)
        self.ids = np.arange(n_seqs, dtype=np.int64)
        self.tokens = np.full(n_seqs, 16 * 16, dtype=np.int64)

    def time_allocate_free(self, n_seqs, placement):
        self.allocator.allocate_batch(self.ids, self.tokens)
        self.allocator.free_batch(self.ids)


class AllocateFreePerRequest:
    """One allocate and one free call per request (the engine path without batching)."""

    params = [1024]
    param_names = ["n_seqs"]

    def setup(self, n_seqs):
        _require()
        self.allocator = BlockAllocator(n_seqs * 16 + 1, 16)
        self.n = n_seqs

    def time_allocate_free(self, n_seqs):
        a = self.allocator
        for s in range(self.n):
            a.allocate(s, 256)
        for s in range(self.n):
            a.free(s)


class DecodeGrowth:
    """One decode step of 1024 running sequences: each grows by one token (1 in 16 needs a block)."""

    params = [256, 1024]
    param_names = ["n_seqs"]

    def setup(self, n_seqs):
        _require()
        rng = np.random.default_rng(0)
        self.allocator = BlockAllocator(n_seqs * 256, 16)
        self.ids = np.arange(n_seqs, dtype=np.int64)
        self.tokens = rng.integers(100, 2000, size=n_seqs).astype(np.int64)
        self.allocator.allocate_batch(self.ids, self.tokens)

    def time_decode_step(self, n_seqs):
        self.tokens += 1
        self.allocator.allocate_batch(self.ids, self.tokens)


class PrefixMatch:
    """Longest cached prefix of a 4096-token prompt whose first 2048 tokens are cached."""

    params = [["tokens", "block_keys"], ["fast128", "sha256"]]
    param_names = ["input", "hash_algorithm"]

    def setup(self, kind, algorithm):
        _require()
        rng = np.random.default_rng(0)
        self.allocator = BlockAllocator(4096, 16, hash_algorithm=algorithm)
        self.prompt = rng.integers(0, 32000, size=4096).astype(np.int32)
        self.allocator.allocate(1, 2048, tokens=self.prompt[:2048])
        self.keys = self.allocator.hash_tokens(self.prompt)

    def time_match_prefix(self, kind, algorithm):
        if kind == "tokens":
            self.allocator.match_prefix(self.prompt)
        else:
            self.allocator.match_prefix(block_keys=self.keys)
