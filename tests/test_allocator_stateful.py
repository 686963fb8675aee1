"""Random operation sequences against a pure-Python model of the allocator.

The model knows which blocks every live table and pin holds, the token counts, and which prefix is
findable under which block; it predicts success or OutOfBlocks, block counts, copy-on-writes and the
exact prefix-cache hits. Block ids themselves are the allocator's choice; the model checks that a
newly taken block was not held by anyone.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvsched import BlockAllocator, OutOfBlocks

NUM_BLOCKS = 24
BLOCK = 4


def ceil_blocks(tokens: int) -> int:
    return -(-tokens // BLOCK)


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.a = BlockAllocator(NUM_BLOCKS, BLOCK, placement="contiguous")
        self.live: dict[int, dict] = {}  # id -> {"tokens": int, "table": list}
        self.pins: dict[int, dict] = {}  # id -> {"tokens", "table", "expires"}
        self.prefix_block: dict[tuple, int] = {}  # findable prefix -> block
        self.block_prefix: dict[int, tuple] = {}
        self.clock = 0
        self.next_id = 0

    # ------------------------------------------------------------ model helpers
    def held(self) -> list[int]:
        blocks = [b for s in self.live.values() for b in s["table"]]
        return blocks + [b for p in self.pins.values() for b in p["table"]]

    def available(self) -> int:
        return NUM_BLOCKS - len(set(self.held()))

    def refs(self, block: int) -> int:
        return self.held().count(block)

    def needs_copy(self, seq: dict, tokens: int) -> bool:
        return tokens > seq["tokens"] and seq["tokens"] % BLOCK != 0 and self.refs(seq["table"][-1]) > 1

    def claim_fresh(self, blocks, held_before: set) -> None:
        for b in blocks:
            assert b not in held_before, f"block {b} was taken while still held"
            prefix = self.block_prefix.pop(b, None)  # an evicted cached block loses its key
            if prefix is not None:
                del self.prefix_block[prefix]

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def apply_growth(self, seq_id: int, tokens: int, added, copies) -> None:
        """Model side of growing a live sequence; checks what the allocator reported."""
        seq = self.live[seq_id]
        held_before = set(self.held())
        if self.needs_copy(seq, tokens):
            row = copies.pop(0)
            assert row[0] == seq_id and row[1] == seq["table"][-1]
            self.claim_fresh([row[2]], held_before)
            seq["table"][-1] = row[2]
            held_before = set(self.held())
        assert len(added) == max(0, ceil_blocks(tokens) - len(seq["table"]))
        self.claim_fresh(added, held_before)
        seq["table"] += list(added)
        seq["tokens"] = max(seq["tokens"], tokens)

    # ------------------------------------------------------------ rules
    @rule(tokens=st.integers(0, 40), prompt_bits=st.one_of(st.none(), st.integers(0, 3)))
    def allocate_new(self, tokens, prompt_bits):
        seq_id = self.new_id()
        prompt = None if prompt_bits is None else tuple(((i * 7) // (prompt_bits + 5)) % 3 for i in range(tokens))
        hits = 0
        if prompt is not None and tokens > 0:
            while hits < (tokens - 1) // BLOCK and prompt[: BLOCK * (hits + 1)] in self.prefix_block:
                hits += 1
        hit_blocks = [self.prefix_block[prompt[: BLOCK * (i + 1)]] for i in range(hits)]
        hit_evictable = len(set(hit_blocks) - set(self.held()))
        needed = ceil_blocks(tokens) - hits
        if needed > self.available() - hit_evictable:
            before = self.a.stats()
            try:
                self.a.allocate(seq_id, tokens, tokens=None if prompt is None else np.array(prompt, dtype=np.int32))
                raise AssertionError("expected OutOfBlocks")
            except OutOfBlocks:
                pass
            assert self.a.stats() == before and seq_id not in self.a
            return
        held_before = set(self.held())
        added = self.a.allocate(seq_id, tokens, tokens=None if prompt is None else np.array(prompt, dtype=np.int32))
        added = added.tolist()
        assert added[:hits] == hit_blocks
        assert self.a.num_cached_tokens(seq_id) == hits * BLOCK
        self.claim_fresh(added[hits:], held_before)
        self.live[seq_id] = {"tokens": tokens, "table": added}
        if prompt is not None:
            for j in range(hits, tokens // BLOCK):
                prefix = prompt[: BLOCK * (j + 1)]
                if prefix not in self.prefix_block and added[j] not in self.block_prefix:
                    self.prefix_block[prefix] = added[j]
                    self.block_prefix[added[j]] = prefix

    @precondition(lambda self: self.live)
    @rule(data=st.data(), grow=st.integers(0, 13))
    def grow(self, data, grow):
        seq_id = data.draw(st.sampled_from(sorted(self.live)))
        seq = self.live[seq_id]
        tokens = seq["tokens"] + grow
        if tokens > NUM_BLOCKS * BLOCK:
            before = self.a.stats()
            with pytest.raises(ValueError, match="exceeds the pool's capacity"):
                self.a.allocate(seq_id, tokens)
            assert self.a.stats() == before
            return
        needed = max(0, ceil_blocks(tokens) - len(seq["table"])) + self.needs_copy(seq, tokens)
        if needed > self.available():
            before = self.a.stats()
            try:
                self.a.allocate(seq_id, tokens)
                raise AssertionError("expected OutOfBlocks")
            except OutOfBlocks:
                pass
            assert self.a.stats() == before
            return
        added = self.a.allocate(seq_id, tokens).tolist()
        self.apply_growth(seq_id, tokens, added, self.a.pop_copy_on_writes().tolist())

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def grow_batch(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.live)), min_size=1, max_size=5, unique=True))
        grows = data.draw(st.lists(st.integers(0, 9), min_size=len(ids), max_size=len(ids)))
        targets = [self.live[s]["tokens"] + g for s, g in zip(ids, grows)]
        if max(targets) > NUM_BLOCKS * BLOCK:
            before = self.a.stats()
            with pytest.raises(ValueError, match=r"num_tokens\[\d+\] must be in"):
                self.a.allocate_batch(np.array(ids), np.array(targets))
            assert self.a.stats() == before
            return
        # Predict the total need by playing the growth forward on a copy of the model.
        shadow = {s: {"tokens": v["tokens"], "table": list(v["table"])} for s, v in self.live.items()}
        saved, self.live = self.live, shadow
        needed = 0
        for s, t in zip(ids, targets):
            copy = self.needs_copy(self.live[s], t)
            needed += max(0, ceil_blocks(t) - len(self.live[s]["table"])) + copy
            if copy:
                self.live[s]["table"][-1] = -1 - s  # a placeholder private block
            self.live[s]["table"] += [-1000 - s * 100 - k for k in range(max(0, ceil_blocks(t) - len(self.live[s]["table"])))]
            self.live[s]["tokens"] = max(self.live[s]["tokens"], t)
        self.live = saved
        if needed > self.available():
            before = self.a.stats()
            try:
                self.a.allocate_batch(np.array(ids), np.array(targets))
                raise AssertionError("expected OutOfBlocks")
            except OutOfBlocks:
                pass
            assert self.a.stats() == before
            return
        indptr, blocks = self.a.allocate_batch(np.array(ids), np.array(targets))
        copies = self.a.pop_copy_on_writes().tolist()
        for i, (s, t) in enumerate(zip(ids, targets)):
            self.apply_growth(s, t, blocks[indptr[i] : indptr[i + 1]].tolist(), copies)
        assert copies == []

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.live)))
        child = self.new_id()
        self.a.fork(parent, child)
        self.live[child] = {"tokens": self.live[parent]["tokens"], "table": list(self.live[parent]["table"])}

    @precondition(lambda self: self.live)
    @rule(data=st.data(), ttl=st.integers(0, 3))
    def free(self, data, ttl):
        seq_id = data.draw(st.sampled_from(sorted(self.live)))
        self.a.free(seq_id, ttl_steps=ttl)
        seq = self.live.pop(seq_id)
        if ttl:
            self.pins[seq_id] = dict(seq, expires=self.clock + ttl)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_batch(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.live)), min_size=1, max_size=4, unique=True))
        self.a.free_batch(np.array(ids, dtype=np.int64))
        for s in ids:
            del self.live[s]

    @rule(steps=st.integers(0, 3))
    def advance(self, steps):
        self.clock += steps
        expired = [s for s, p in self.pins.items() if p["expires"] <= self.clock]
        assert self.a.advance_steps(steps) == len(expired)
        for s in expired:
            del self.pins[s]

    @precondition(lambda self: self.pins)
    @rule(data=st.data(), restore=st.booleans())
    def end_pin(self, data, restore):
        seq_id = data.draw(st.sampled_from(sorted(self.pins)))
        pin = self.pins.pop(seq_id)
        if restore:
            self.a.restore(seq_id)
            self.live[seq_id] = {"tokens": pin["tokens"], "table": pin["table"]}
        else:
            self.a.unpin(seq_id)

    # ------------------------------------------------------------ invariants
    @invariant()
    def matches_model(self):
        self.a.check_invariants()
        assert self.a.num_free_blocks == self.available()
        for seq_id, seq in self.live.items():
            assert self.a.block_table(seq_id).tolist() == seq["table"]
            assert self.a.num_tokens(seq_id) == seq["tokens"]
        for seq_id in self.pins:
            assert self.a.is_pinned(seq_id)
        stats = self.a.stats()
        assert stats["num_sequences"] == len(self.live)
        assert stats["num_pinned_sequences"] == len(self.pins)
        for prefix, block in self.prefix_block.items():
            keys_prefix = np.array(prefix, dtype=np.int32)
            assert self.a.match_prefix(keys_prefix).tolist()[-1:] == [block]


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
