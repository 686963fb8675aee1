"""Peak-memory future estimation and admission (Python face of ``kvsched._core.PeakEstimator``)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

from . import _core

IntArray = Union[npt.NDArray[np.integer], Sequence[int]]

MODES = {"aggressive": 0, "conservative": 1, "past_future": 2, "oracle": 3, "predicted": 4}


def _mode(mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    return MODES[mode]


def future_peak(held: IntArray, remaining: IntArray, block_size: int = 0) -> int:
    """Exact future peak of requests holding ``held`` tokens with ``remaining`` tokens still to
    generate: each grows by one token per step and frees everything when done.

    Counts tokens, or blocks of ``block_size`` tokens when it is > 0. O(n log n).
    """
    return _core.future_peak(held, remaining, block_size)


class PeakEstimator:
    """Admission control by the predicted peak KV use of the batch (Past-Future, and beyond).

    The history keeps the last ``window`` finished output lengths (per request class, plus all
    classes pooled for classes with no history yet). A running request that has generated ``g``
    tokens is predicted to end at a quantile of the lengths ``L > g``; admission takes the longest
    prefix of the waiting candidates for which the exact future peak of running + admitted stays
    within ``capacity - reserve``.

    Modes (the ``mode`` argument): ``"aggressive"`` (no future growth: admit while current use
    fits), ``"conservative"`` (reserve ``max_new_tokens``), ``"past_future"`` (the history),
    ``"oracle"`` (true lengths; simulation only) and ``"predicted"`` (your predictor's lengths).
    Only the last two read the ``*_lengths`` arrays; no other mode ever sees a true length.

    Thread safety: calls are serialized by an internal lock; heavy calls release the GIL.

    Parameters
    ----------
    window : int, default 1000
        Finished output lengths remembered per class.
    block_size : int, default 0
        Count peaks in blocks of this many tokens (0: in tokens).
    quantile : float, default 0.9
        Safety quantile of the conditional remaining length (the starting value when adaptive).
    adaptive : bool, default True
        Adjust the quantile from :meth:`observe` feedback so that preemptions per admitted
        request track ``target_preemption_rate``: each preemption raises it (in logit space by
        ``adapt_gain``), each admission relaxes it by ``adapt_gain * target_preemption_rate``.
        The quantile is what quantile mode predicts with; sampled draws (``sampling=True``) do
        not use it, so with sampling these options are refused when given (``None``: not given).
    min_quantile, max_quantile : float
        Bounds of the adaptive quantile, in (0, 1).
    sampling : bool, default False
        Draw each remaining length from the conditional history (the original algorithm) instead
        of taking the quantile; with ``num_scenarios > 1`` admission must fit every scenario
        but ``overflow_scenarios``.
    overflow_scenarios : int, default 0
        With sampling: in how many of the ``num_scenarios`` scenarios the admitted batch may
        overflow, in [0, num_scenarios). The risk admission takes: a batch overflows with a
        probability of about (overflow_scenarios + 1) / (num_scenarios + 1). Worth taking where a
        preemption costs the engine little beside the steps a fuller batch saves (bench/README.md,
        "Admission on a real engine"). Refused without sampling, where it would not act.
    keyed_draws : bool, default True
        When request ids are passed (``ids``, ``running_ids``, ``candidate_ids``), a request's
        draw is a function of its id, the scenario and ``seed``: it keeps its place in the
        distribution from step to step. Fresh draws at every call make admission a lottery that
        some step wins; keyed draws preempted 1.5-3x less in bench/README.md.
    seed : int
        Seed of the draws.
    prior : array of int, optional
        Output lengths that fill each window until real ones push them out. Without a prior and
        without history, past_future reserves ``max_new_tokens``.
    """

    __slots__ = ("_core",)

    def __init__(
        self,
        *,
        window: int = 1000,
        block_size: int = 0,
        quantile: Optional[float] = None,
        adaptive: Optional[bool] = None,
        target_preemption_rate: Optional[float] = None,
        adapt_gain: Optional[float] = None,
        min_quantile: Optional[float] = None,
        max_quantile: Optional[float] = None,
        sampling: bool = False,
        num_scenarios: int = 1,
        keyed_draws: bool = True,
        seed: int = 0,
        prior: Optional[IntArray] = None,
        overflow_scenarios: int = 0,
    ) -> None:
        if overflow_scenarios and not sampling:
            raise ValueError("overflow_scenarios: only sampled scenarios (sampling=True) can overflow")
        q = quantile_options(sampling, quantile=quantile, adaptive=adaptive, adapt_gain=adapt_gain,
                             target_preemption_rate=target_preemption_rate, min_quantile=min_quantile,
                             max_quantile=max_quantile)
        self._core = _core.PeakEstimator(
            window, block_size, q["quantile"], q["adaptive"], q["target_preemption_rate"], q["adapt_gain"],
            q["min_quantile"], q["max_quantile"], sampling, num_scenarios, keyed_draws, seed, prior,
            overflow_scenarios,
        )  # types checked natively, by name

    @property
    def quantile(self) -> float:
        """The safety quantile in use now."""
        return self._core.quantile

    def history_size(self, class_id: int = -1) -> int:
        """Lengths in the window of ``class_id`` (-1: all classes pooled)."""
        return self._core.history_size(class_id)

    def record(self, lengths: IntArray, class_ids: Optional[IntArray] = None) -> None:
        """Add finished requests' output lengths (and their classes, default 0) to the history."""
        self._core.record(lengths, class_ids)

    def observe(self, preempted: int, admitted: int) -> None:
        """Report preemptions and admissions since the last call (drives the adaptive quantile)."""
        self._core.observe(preempted, admitted)

    def predict_remaining(
        self,
        generated: IntArray,
        max_new_tokens: IntArray,
        *,
        class_ids: Optional[IntArray] = None,
        lengths: Optional[IntArray] = None,
        ids: Optional[IntArray] = None,
        mode: str = "past_future",
    ) -> npt.NDArray[np.int64]:
        """Predicted tokens still to generate per request, capped by ``max_new_tokens - generated``.

        ``lengths`` are true (oracle) or predicted (predicted) total output lengths; other modes
        ignore them. ``ids`` key the draws when sampling (see ``keyed_draws``).
        """
        return self._core.predict_remaining(_mode(mode), generated, max_new_tokens, class_ids, lengths, ids)

    def admit(
        self,
        capacity: int,
        *,
        running_held: IntArray,
        running_generated: IntArray,
        running_max_new_tokens: IntArray,
        candidate_prompt: IntArray,
        candidate_max_new_tokens: IntArray,
        running_class_ids: Optional[IntArray] = None,
        candidate_class_ids: Optional[IntArray] = None,
        running_lengths: Optional[IntArray] = None,
        candidate_lengths: Optional[IntArray] = None,
        running_ids: Optional[IntArray] = None,
        candidate_ids: Optional[IntArray] = None,
        reserve: int = 0,
        mode: str = "past_future",
    ) -> int:
        """How many leading candidates can be admitted with the future peak within capacity.

        Parameters
        ----------
        capacity : int
            KV capacity, in tokens (or blocks when ``block_size`` > 0); must be > 0.
        running_held, running_generated, running_max_new_tokens : int arrays
            Per running request: KV tokens held now, tokens generated so far, its limit.
        candidate_prompt, candidate_max_new_tokens : int arrays
            Per waiting candidate, in admission order: prompt tokens and limit.
        running_class_ids, candidate_class_ids : int arrays, optional
            Request classes for per-class histories (default 0).
        running_lengths, candidate_lengths : int arrays, optional
            Total output lengths for the oracle and predicted modes.
        running_ids, candidate_ids : int arrays, optional
            Request ids: with sampling, they key each request's draws (see ``keyed_draws``).
        reserve : int
            Capacity held back (a watermark); admission targets ``capacity - reserve``.
        mode : str
            One of ``aggressive``, ``conservative``, ``past_future``, ``oracle``, ``predicted``.

        Returns
        -------
        int
            The number K of candidates to admit: ``candidates[:K]``. Adding a candidate never
            lowers the peak, so the admissible candidates always form a prefix.
        """
        return self._core.admit(
            _mode(mode), capacity, reserve, running_held, running_generated, running_max_new_tokens,
            running_class_ids, running_lengths, running_ids, candidate_prompt, candidate_max_new_tokens,
            candidate_class_ids, candidate_lengths, candidate_ids,
        )


# The safety quantile's options and their defaults (``None`` in a signature: not given).
QUANTILE_DEFAULTS = dict(quantile=0.9, adaptive=True, target_preemption_rate=0.01, adapt_gain=0.1,
                         min_quantile=0.5, max_quantile=0.999)


def quantile_options(sampling: bool, **given: Any) -> dict:
    """The safety quantile's options, defaults filled in. With ``sampling`` each remaining length is
    drawn from the history and no quantile is used, so a quantile option given there would not act:
    it is refused, naming it; the controller is off."""
    unknown = set(given) - set(QUANTILE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown quantile options {sorted(unknown)}")
    # adaptive=False says what sampling does anyway; anything else would claim an effect.
    set_ = sorted(name for name, value in given.items() if value is not None and (name, value) != ("adaptive", False))
    if sampling and set_:
        raise ValueError(f"{', '.join(set_)}: the safety quantile is used by quantile mode only (sampling=False); "
                         "with sampling=True remaining lengths are drawn from the history")
    options = {name: default if given.get(name) is None else given[name] for name, default in QUANTILE_DEFAULTS.items()}
    if sampling:
        options["adaptive"] = False  # nothing to steer
    return options
