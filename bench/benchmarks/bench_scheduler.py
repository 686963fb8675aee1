"""Scheduler step through the Python API: schedule() + update() for an all-decode batch of N
running requests with 10,000 waiting that do not fit (max_num_seqs = N).

vLLM v1's scheduler, side by side in one run: bench/compare_vllm_scheduler.py. Issue 4 target:
at least 50x less than vLLM (about 2.0 + 1.0 ms at N = 256, 8.8 + 4.6 ms at N = 1024).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

try:
    import kvsched
except ImportError:
    kvsched = None

PROMPT_LEN = 128
WAITING = 10_000


class SchedulerStep:
    params = ([256, 1024], ["aggressive", "past_future"])
    param_names = ["running", "admission"]

    def setup(self, running, admission):
        if kvsched is None:
            raise NotImplementedError("kvsched is not importable")
        rng = np.random.default_rng(0)
        self.scheduler = s = kvsched.Scheduler(
            num_blocks=running * (PROMPT_LEN + 4096) // 16, block_size=16, max_num_seqs=running,
            max_num_batched_tokens=8192, admission=admission, enable_prefix_caching=False,
            prior=np.clip(rng.lognormal(np.log(129), 1.0, 1000), 1, 4000).astype(np.int64),
        )
        s.add_requests(np.arange(running + WAITING), PROMPT_LEN, 4000)
        while True:
            plan = s.schedule()
            done = plan.computed_offsets + plan.num_tokens >= PROMPT_LEN
            s.update(plan.req_ids, done.astype(np.int64), np.zeros(len(plan), bool))
            if len(plan) == running and not plan.is_prefill.any():
                break
        self.ones = np.ones(running, np.int64)
        self.no = np.zeros(running, bool)

    def time_schedule_and_update(self, running, admission):
        plan = self.scheduler.schedule()
        self.scheduler.update(plan.req_ids, self.ones, self.no)


class SmallBatchStep:
    """The same all-decode step at a few rows, where the call's fixed cost is the step's cost: the
    two calls an engine that knows its tokens makes, against schedule(commit=True), the one call of
    an engine that learns them a step later (kvsched's vLLM adapter)."""

    params = ([4, 16], ["schedule + update", "schedule(commit=True)"])
    param_names = ["running", "calls"]

    def setup(self, running, calls):
        if kvsched is None:
            raise NotImplementedError("kvsched is not importable")
        self.scheduler = s = kvsched.Scheduler(
            num_blocks=running * (PROMPT_LEN + 4096) // 16, block_size=16, max_num_seqs=running,
            max_num_batched_tokens=8192, admission="aggressive", enable_prefix_caching=False)
        s.add_requests(np.arange(running + 100), PROMPT_LEN, 4000)
        while True:
            plan = s.schedule()
            s.update(plan.req_ids, plan.samples.astype(np.int64))
            if len(plan) == running and not plan.is_prefill.any():
                break
        self.ones = np.ones(running, np.int64)
        self.commit = calls == "schedule(commit=True)"

    def time_step(self, running, calls):
        if self.commit:
            self.scheduler.schedule(commit=True)
        else:
            plan = self.scheduler.schedule()
            self.scheduler.update(plan.req_ids, self.ones)
