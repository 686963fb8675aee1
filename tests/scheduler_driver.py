"""A minimal engine for scheduler tests: it knows each request's true output length, reports one
token per request whose scheduled chunk reaches the end of its sequence, and finishes requests
at their true length. It also checks the plan against the budgets after every step.

With ``kv_check=True`` it also keeps a real (numpy) KV cache: each computed token writes a value
that names its request and position into its block, the plan's swap and copy-on-write copies are
executed with the host executor, and before every forward pass the KV a request already has
must read back exactly. A value names its request, unless ``shared`` says that the request's
first tokens have another one's content (``shared[req] = (owner, tokens)``: a common prefix, as
its block keys say), so that KV found in the prefix cache, on either tier, reads back right."""

from __future__ import annotations

import numpy as np

import kvsched
from kvsched.swap import KvLayout, copy_host

SLOT_BYTES = 8  # one int64 per token


def kv_layout(block_size: int) -> KvLayout:
    """Two tensors (think K and V), one int64 per token slot."""
    block = block_size * SLOT_BYTES
    return KvLayout(np.array([[block, block, block], [block, block, block]], dtype=np.int64))


class KvCache:
    def __init__(self, config: kvsched.SchedulerConfig) -> None:
        self.block_size = config.block_size
        self.layout = config.swap_layout
        self.device = [np.zeros((config.num_blocks, config.block_size), np.int64) for _ in range(2)]
        self.host = [np.zeros((max(config.num_host_blocks, 1), config.block_size), np.int64) for _ in range(2)]
        self.shared: dict[int, tuple[int, int]] = {}

    def value(self, tensor: int, req: int, position: int) -> int:
        owner, tokens = self.shared.get(req, (req, 0))
        req = owner if position < tokens else req
        return (req << 32 | position) + 1 if tensor == 0 else -((req << 32 | position) + 1)

    def apply_copies(self, plan: kvsched.StepPlan) -> None:
        for descriptors in (plan.swap_out_descriptors, plan.cache_write_descriptors):  # device -> host first
            if descriptors.size:
                copy_host(descriptors, self.device, self.host)
        for descriptors in (plan.swap_in_descriptors, plan.cache_load_descriptors):
            if descriptors.size:
                copy_host(descriptors, self.host, self.device)
        for _, src, dst in plan.copy_on_writes.tolist():
            for t in range(2):
                self.device[t][dst] = self.device[t][src]

    def check_plan(self, plan: kvsched.StepPlan, scheduler: kvsched.Scheduler, totals: np.ndarray) -> None:
        """Runs the plan's copies, then checks each row's KV so far and writes this step's tokens.
        `totals` is each row's prompt + generated tokens before the step."""
        self.apply_copies(plan)
        for i, req in enumerate(plan.req_ids.tolist()):
            computed = int(plan.computed_offsets[i])
            self.verify_and_write(req, scheduler.block_table(req), computed,
                                  min(int(totals[i]), computed + int(plan.num_tokens[i])))

    def verify_and_write(self, req: int, table: np.ndarray, computed: int, end: int) -> None:
        positions = np.arange(computed)
        slots = (table[positions // self.block_size], positions % self.block_size)
        for t in range(2):
            expected = [self.value(t, req, p) for p in range(computed)]
            assert self.device[t][slots].tolist() == expected, f"request {req}: KV lost or corrupted"
        for p in range(computed, end):
            for t in range(2):
                self.device[t][table[p // self.block_size], p % self.block_size] = self.value(t, req, p)


class FakeEngine:
    def __init__(self, scheduler: kvsched.Scheduler, check: bool = True, kv_check: bool = False, kv=None) -> None:
        self.scheduler = scheduler
        self.check = check
        self.kv = kv if kv is not None else KvCache(scheduler.config) if kv_check else None
        self.swaps_out = 0
        self.prompt: dict[int, int] = {}
        self.true_len: dict[int, int] = {}
        self.generated: dict[int, int] = {}
        self.finished: set[int] = set()
        self.rejected: set[int] = set()
        self.preemptions = 0
        self.steps = 0

    def add(self, req_id: int, prompt_len: int, true_len: int, max_new_tokens: int | None = None, **kw) -> None:
        self.scheduler.add_request(
            req_id, prompt_len, max_new_tokens if max_new_tokens is not None else max(true_len, 1), **kw
        )
        self.prompt[req_id] = prompt_len
        self.true_len[req_id] = true_len
        self.generated[req_id] = 0

    def step(self) -> kvsched.StepPlan:
        plan = self.scheduler.schedule()
        config = self.scheduler.config
        if self.check:
            assert plan.num_scheduled_tokens <= config.max_num_batched_tokens
            assert len(plan) <= config.max_num_seqs
            assert len(set(plan.req_ids.tolist())) == len(plan)
            assert np.all(plan.num_tokens > 0)
            self.scheduler.check_invariants()
            for i, req in enumerate(plan.req_ids.tolist()):  # new blocks extend the end of the table
                new = plan.new_blocks[plan.block_indptr[i]:plan.block_indptr[i + 1]]
                table = self.scheduler.block_table(req)
                assert new.size <= table.size and np.array_equal(new, table[table.size - new.size:]), req
        self.rejected.update(plan.rejected_ids.tolist())
        self.preemptions += plan.preempted_ids.size
        self.swaps_out += plan.swapped_out_ids.size
        if self.kv is not None:
            totals = np.array([self.prompt[r] + self.generated[r] for r in plan.req_ids.tolist()], dtype=np.int64)
            self.kv.check_plan(plan, self.scheduler, totals)
        new_tokens = np.zeros(len(plan), dtype=np.int64)
        done = np.zeros(len(plan), dtype=bool)
        for i, req in enumerate(plan.req_ids.tolist()):
            total = self.prompt[req] + self.generated[req]
            if plan.computed_offsets[i] + plan.num_tokens[i] >= total:
                new_tokens[i] = 1
                self.generated[req] += 1
                done[i] = self.generated[req] >= self.true_len[req]
        finished = self.scheduler.update(plan.req_ids, new_tokens, done)
        self.finished.update(finished.tolist())
        if self.check:
            self.scheduler.check_invariants()
        self.steps += 1
        return plan

    def run(self, max_steps: int = 100_000) -> None:
        while self.scheduler.has_unfinished_requests() and self.steps < max_steps:
            self.step()
        # One more plan collects rejections added after the last step.
        if not self.scheduler.has_unfinished_requests():
            plan = self.scheduler.schedule()
            if self.kv is not None:  # an empty plan may still copy (host tier write-throughs)
                self.kv.apply_copies(plan)
            self.rejected.update(plan.rejected_ids.tolist())
            self.scheduler.update(plan.req_ids, np.zeros(len(plan), np.int64), np.zeros(len(plan), bool))
        assert not self.scheduler.has_unfinished_requests(), f"not done after {max_steps} steps"


def add_document_requests(engine: FakeEngine, rng: np.random.Generator, num_requests: int,
                          num_documents: int = 6, block_size: int = 16) -> None:
    """Requests whose prompts start with one of a few long documents (their shared, keyed blocks)
    followed by a question of their own: prefix-cache reuse on both tiers under memory pressure."""
    lengths = rng.integers(8, 40, num_documents) * block_size
    for req in range(num_requests):
        doc = int(rng.integers(0, num_documents))
        question, output = int(rng.integers(1, 100)), int(rng.integers(1, 60))
        prompt = int(lengths[doc]) + question
        owner = 1 << 30 | doc
        engine.kv.shared[req] = (owner, int(lengths[doc]))
        keys = np.empty((prompt // block_size, 2), dtype=np.uint64)
        keys[:, 0] = [owner if (b + 1) * block_size <= lengths[doc] else (2 << 30) + req
                      for b in range(prompt // block_size)]
        keys[:, 1] = np.arange(1, prompt // block_size + 1)
        engine.add(req, prompt, output, arrival_time=float(req // 4), block_keys=keys)
