"""PeakEstimator admission round: 1024 running requests, 64 waiting candidates, Python API.

Beside it, in the same run, a numpy version of the original Past-Future step
(bench/past_future_reference.py). Issue 3 target: kvsched <= 20 us per round.
"""

import os
import sys

# numpy's BLAS threads spin on the second core after use and skew microsecond timings.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from past_future_reference import reference_admit  # noqa: E402

try:
    from kvsched import PeakEstimator
except ImportError:
    PeakEstimator = None


def _workload(n_running=1024, n_waiting=64, seed=0):
    rng = np.random.default_rng(seed)
    history = np.clip(rng.lognormal(np.log(129), 0.99, 1000), 1, 4096).astype(np.int64)
    generated = rng.integers(0, 300, n_running)
    return dict(
        history=history,
        running_held=rng.integers(100, 2000, n_running) + generated,
        running_generated=generated,
        running_max_new_tokens=np.full(n_running, 4096),
        candidate_prompt=rng.integers(100, 2000, n_waiting),
        candidate_max_new_tokens=np.full(n_waiting, 4096),
    )


def _capacity_admitting(estimator, w, mode, block_size, count):
    from kvsched import future_peak

    running = estimator.predict_remaining(w["running_generated"], w["running_max_new_tokens"], mode=mode)
    waiting = estimator.predict_remaining(np.zeros(count, np.int64), w["candidate_max_new_tokens"][:count], mode=mode)
    held = np.concatenate([w["running_held"], w["candidate_prompt"][:count]])
    return future_peak(held, np.concatenate([running, waiting]), block_size)


class AdmissionRound:
    params = (["past_future", "conservative", "aggressive"], [0, 16])
    param_names = ["mode", "block_size"]

    def setup(self, mode, block_size):
        if PeakEstimator is None:
            raise NotImplementedError("kvsched is not installed")
        w = _workload()
        self.estimator = PeakEstimator(block_size=block_size)
        self.estimator.record(w.pop("history"))
        self.args = w
        # A capacity that admits half of the queue, so the search does real work.
        self.capacity = _capacity_admitting(self.estimator, w, mode, block_size, 32)

    def time_admit(self, mode, block_size):
        self.estimator.admit(self.capacity, mode=mode, **self.args)


class ReferenceAdmissionRound:
    """The original algorithm in numpy (random draws, sort + cumsum per candidate)."""

    def setup(self):
        w = _workload()
        self.w = w
        if PeakEstimator is None:
            raise NotImplementedError("kvsched is not installed")
        estimator = PeakEstimator(adaptive=False)
        estimator.record(w["history"])
        self.capacity = _capacity_admitting(estimator, w, "past_future", 0, 32)
        self.rng = np.random.default_rng(1)

    def time_reference_admit(self):
        w = self.w
        reference_admit(
            w["history"], w["running_held"], w["running_generated"], w["running_max_new_tokens"],
            w["candidate_prompt"], w["candidate_max_new_tokens"], self.capacity, self.rng,
        )


class SteadyStep:
    """What an engine pays per step: a few finished lengths recorded, the adaptive quantile's
    feedback (which moves the quantile), then the admission round. The round alone reuses the
    quantile tables of an unchanged window; here they are rebuilt every step."""

    params = ([0, 16],)
    param_names = ["block_size"]

    def setup(self, block_size):
        if PeakEstimator is None:
            raise NotImplementedError("kvsched is not installed")
        w = _workload()
        self.estimator = PeakEstimator(block_size=block_size)
        history = w.pop("history")
        self.estimator.record(history)
        self.args = w
        self.capacity = _capacity_admitting(self.estimator, w, "past_future", block_size, 32)
        # Finished lengths to record, four a step, drawn like the history.
        self.finished = np.random.default_rng(2).permutation(history).reshape(-1, 4)
        self.step = 0

    def time_step(self, block_size):
        self.estimator.record(self.finished[self.step % len(self.finished)])
        self.estimator.observe(0, 4)
        self.step += 1
        self.estimator.admit(self.capacity, mode="past_future", **self.args)
