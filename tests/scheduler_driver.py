"""A minimal engine for scheduler tests: it knows each request's true output length, reports one
token per request whose scheduled chunk reaches the end of its sequence, and finishes requests
at their true length. It also checks the plan against the budgets after every step."""

from __future__ import annotations

import numpy as np

import kvsched


class FakeEngine:
    def __init__(self, scheduler: kvsched.Scheduler, check: bool = True) -> None:
        self.scheduler = scheduler
        self.check = check
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
        self.rejected.update(plan.rejected_ids.tolist())
        self.preemptions += plan.preempted_ids.size
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
            self.rejected.update(plan.rejected_ids.tolist())
            self.scheduler.update(plan.req_ids, np.zeros(len(plan), np.int64), np.zeros(len(plan), bool))
        assert not self.scheduler.has_unfinished_requests(), f"not done after {max_steps} steps"
