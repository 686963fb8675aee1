"""Hypothesis state machine: random adds, aborts, priority changes and steps against the real
Scheduler, with the budgets, block conservation and request accounting checked after every step,
and every surviving request run to its exact true length at the end."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from scheduler_driver import FakeEngine, kv_layout

import kvsched


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        admission=st.sampled_from(["aggressive", "conservative", "past_future", "oracle"]),
        policy=st.sampled_from(["fcfs", "priority"]),
        num_blocks=st.integers(4, 40),
        budget=st.integers(8, 300),
        max_seqs=st.integers(1, 8),
        chunk=st.integers(0, 64),
        lookahead=st.integers(0, 2),
        preemption=st.sampled_from(["recompute", "swap", "auto"]),
        num_host_blocks=st.integers(1, 60),
        host_tier=st.sampled_from(["off", "evict", "finish"]),
        host_load=st.sampled_from(["prefetch", "inline"]),
    )
    def setup(self, admission, policy, num_blocks, budget, max_seqs, chunk, lookahead, preemption, num_host_blocks,
              host_tier, host_load):
        self.scheduler = kvsched.Scheduler(
            num_blocks=num_blocks, block_size=8, max_num_batched_tokens=budget, max_num_seqs=max_seqs,
            max_prefill_chunk=chunk, num_lookahead_tokens=lookahead, admission=admission, policy=policy, window=20,
            preemption=preemption,
            num_host_blocks=num_host_blocks if preemption != "recompute" or host_tier != "off" else 0,
            swap_layout=kv_layout(8), recompute_seconds_per_token=1e-5, host_prefix_cache=host_tier != "off",
            host_cache_write=None if host_tier == "off" else host_tier,
            host_cache_load=None if host_tier == "off" else host_load,
        )
        # Real KV bytes: swaps and copy-on-writes are executed and checked every step.
        self.engine = FakeEngine(self.scheduler, kv_check=True)
        self.next_id = 0
        self.aborted: set[int] = set()
        self.capacity = num_blocks * 8

    @rule(prompt=st.integers(1, 200), true_len=st.integers(1, 60), slack=st.integers(0, 40), priority=st.integers(0, 3),
          document=st.integers(-1, 2), shared=st.integers(0, 200))
    def add(self, prompt, true_len, slack, priority, document, shared):
        req = self.next_id
        self.next_id += 1
        keys = None
        if document >= 0:  # the prompt starts with one of three documents: prefix-cache hits, both tiers
            shared = min(shared, prompt)
            owner = 1_000_000 + document
            self.engine.kv.shared[req] = (owner, shared)
            keys = np.empty((prompt // 8, 2), dtype=np.uint64)
            keys[:, 0] = [owner if (b + 1) * 8 <= shared else 2_000_000 + req for b in range(prompt // 8)]
            keys[:, 1] = np.arange(1, prompt // 8 + 1)
        self.engine.add(
            req, prompt, true_len, max_new_tokens=true_len + slack, priority=priority, arrival_time=float(req),
            true_output_len=true_len, block_keys=keys,
        )
        if req in self.scheduler:
            # The engine ends a request at its true length or at the (possibly capped) max_new_tokens.
            self.engine.true_len[req] = min(true_len, self.scheduler.info(req)["max_new_tokens"])

    @rule()
    def step(self):
        decodes = []  # running requests whose next token is a decode: each must run, or be preempted
        for req in self.scheduler.running_ids().tolist():
            info = self.scheduler.info(req)
            if info["num_computed"] == info["prompt_len"] + info["num_generated"] - 1:
                decodes.append(req)
        plan = self.engine.step()
        accounted = set(plan.req_ids.tolist()) | set(plan.preempted_ids.tolist()) | set(plan.swapped_out_ids.tolist())
        skipped = [req for req in decodes if req not in accounted]
        assert not skipped, f"running decodes {skipped} got no token and were not preempted"
        assert np.array_equal(plan.samples, plan.computed_offsets + plan.num_tokens >= plan.prompt_lens + plan.num_generated)
        for req in plan.preempted_ids.tolist():
            info = self.scheduler.info(req)
            assert info["state"] == "waiting" and info["num_computed"] == 0
        for req in plan.swapped_out_ids.tolist():
            info = self.scheduler.info(req)
            assert info["state"] == "swapped" and info["num_computed"] > 0

    @precondition(lambda self: self.next_id > 0)
    @rule(data=st.data())
    def abort(self, data):
        live = sorted(set(self.scheduler.running_ids().tolist()) | set(self.scheduler.waiting_ids().tolist())
                      | set(self.scheduler.swapped_ids().tolist()))
        if not live:
            return
        req = data.draw(st.sampled_from(live))
        self.scheduler.abort([req])
        self.aborted.add(req)

    @precondition(lambda self: self.scheduler.policy.name == "priority")
    @rule(data=st.data(), priority=st.integers(0, 3))
    def change_priority(self, data, priority):
        live = sorted(set(self.scheduler.running_ids().tolist()) | set(self.scheduler.waiting_ids().tolist()))
        if live:
            self.scheduler.set_priority([data.draw(st.sampled_from(live))], [priority])

    @invariant()
    def accounted(self):
        if not hasattr(self, "scheduler"):
            return
        self.scheduler.check_invariants()
        stats = self.scheduler.stats()
        live = stats["num_waiting"] + stats["num_running"] + stats["num_swapped"]
        assert stats["added"] == stats["finished"] + stats["aborted"] + stats["rejected"] + live
        assert stats["aborted"] == len(self.aborted)
        kv = stats["kv"]
        assert kv["num_free"] + kv["num_used"] + kv["num_cached"] == kv["num_blocks"]
        assert stats["num_running"] <= self.scheduler.config.max_num_seqs

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        self.engine.run(max_steps=self.engine.steps + 20_000)
        for req, true_len in self.engine.true_len.items():
            if req in self.aborted or req in self.engine.rejected:
                continue
            assert req in self.engine.finished
            assert self.engine.generated[req] == true_len, (req, self.engine.generated[req], true_len)
        assert self.scheduler.stats()["kv"]["num_used"] == 0
        swap = self.scheduler.stats()["swap"]
        assert swap["num_swapped"] == 0 and swap["num_resident_copies"] == 0
        assert swap["num_free_host_blocks"] + swap["num_cached_host_blocks"] == swap["num_host_blocks"]


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_long_random_run_keeps_every_invariant():
    rng = np.random.default_rng(7)
    s = kvsched.Scheduler(num_blocks=48, block_size=16, max_num_batched_tokens=256, max_num_seqs=16,
                          max_prefill_chunk=96, admission="past_future")
    e = FakeEngine(s)
    next_id = 0
    for step in range(1500):
        for _ in range(rng.poisson(0.4)):
            true_len = int(rng.integers(1, 150))
            e.add(next_id, int(rng.integers(1, 400)), true_len, max_new_tokens=300, arrival_time=step)
            next_id += 1
        e.step()
    e.run()
    assert len(e.finished) + len(e.rejected) == next_id
    assert all(e.generated[r] == e.true_len[r] for r in e.finished)
