"""Iteration-time models of a simulated engine: published fits, or measured on a real engine.

    T_ms = max(F, a + b*N) + r*rows + d*sum(decode context) + e*sum(chunk*(context + chunk/2)) + overhead

with N = prefill-chunk tokens + decode sequences. Built in (32 layers, TP=1): the Llama-3-8B/A100
fit as published; for Llama-2-7B/H100 the design gives F, a, b and d, its prefill-attention term e
is not published, so it is the A100 value scaled by the ratio of the two linear terms (b). Neither
has a per-row term (r = 0).

Measured: ``kvsched calibrate`` steps a real engine through :func:`calibration_workload` and
:func:`open_calibration_workload`, records
each step's features (:data:`STEP_FEATURES`) and seconds, and :func:`fit_profile` fits a, b, r, d
and e (F = 0) by least squares on relative error, since a fidelity target is a relative error and
a small decode step matters as much as a long prefill, then scaled so that the total time of the
measured steps is right (the relative fit alone comes out a few percent low). The profile is a JSON file
(:meth:`ModelProfile.save`) that ``kvsched simulate --model-profile FILE`` loads (:func:`load_profile`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np


@dataclass(frozen=True)
class ModelProfile:
    name: str
    floor_ms: float  # F
    base_ms: float  # a
    per_token_ms: float  # b
    decode_context_ms: float  # d, per token of decode context
    prefill_attention_ms: float  # e
    kv_bytes_per_token: int
    max_model_len: int
    default_kv_capacity_tokens: int  # from GPU memory after weights and activations
    overhead_ms: float = 0.0
    num_layers: int = 32
    host_link_bytes_per_s: float = 25e9  # PCIe to host memory: Gen4 x16 ~25 GB/s, Gen5 ~50 GB/s
    per_row_ms: float = 0.0  # r: per scheduled request (input preparation, sampling); 0 in the published fits
    calibration: dict = field(default_factory=dict, compare=False)  # how a measured profile was made

    def save(self, path: Union[str, Path]) -> None:
        """Writes the profile as JSON (what :func:`load_profile` reads)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    def swap_cost(self) -> np.ndarray:
        """The swap planner's default cost table with bandwidths capped at this machine's host link."""
        from ..swap import default_cost_model

        table = default_cost_model()
        table[:, :, 2] = np.minimum(table[:, :, 2], self.host_link_bytes_per_s)
        return table

    def step_time_s(self, num_tokens: np.ndarray, computed_offsets: np.ndarray, is_prefill: np.ndarray) -> float:
        """Simulated duration of one step over the plan's arrays."""
        return float(self.time_ms(step_features(num_tokens, computed_offsets, is_prefill))) / 1000.0

    def time_ms(self, features: dict):
        """Step time in ms from step features (:func:`step_features`): one step's, or arrays of many."""
        ms = np.maximum(self.floor_ms, self.base_ms + self.per_token_ms * np.asarray(features["tokens"], np.float64))
        return (ms + self.per_row_ms * np.asarray(features["rows"], np.float64)
                + self.decode_context_ms * np.asarray(features["decode_context"], np.float64)
                + self.prefill_attention_ms * np.asarray(features["prefill_attention"], np.float64) + self.overhead_ms)

    def prefill_time_s(self, tokens: int) -> float:
        """Duration of a lone prefill of ``tokens`` tokens (the cost of recomputing them)."""
        return self.step_time_s(np.array([tokens]), np.array([0]), np.array([True]))


_KV_LLAMA = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x KV heads x head dim x fp16 = 128 KiB
_KV_LLAMA2 = 32 * 2 * 32 * 128 * 2  # Llama-2-7B has no GQA: 512 KiB per token

PROFILES = {
    "llama3-8b-a100": ModelProfile(
        "llama3-8b-a100", 10.46, 6.43, 0.0668, 8.0e-5, 2.9e-6, _KV_LLAMA, 8192,
        # 80 GB x 0.9 - 16 GB weights - ~4 GB activations, in 128 KiB tokens
        (int(80e9 * 0.9) - int(16e9) - int(4e9)) // _KV_LLAMA, host_link_bytes_per_s=25e9,  # A100: PCIe Gen4
    ),
    "llama2-7b-h100": ModelProfile(
        "llama2-7b-h100", 5.79, 2.88, 0.0202, 2.0e-4, 2.9e-6 * 0.0202 / 0.0668, _KV_LLAMA2, 4096,
        (int(80e9 * 0.9) - int(13.5e9) - int(4e9)) // _KV_LLAMA2, host_link_bytes_per_s=50e9,  # H100: PCIe Gen5
    ),
}


# ------------------------------------------------------------------------------ measured profiles

class ProfileError(ValueError):
    """A model profile file that cannot be read; the message names the file and the field."""


# Far beyond any engine, yet every step time and KV size stays finite and printable.
_INTEGER_LIMITS = {"kv_bytes_per_token": 1 << 40, "max_model_len": 1 << 24, "default_kv_capacity_tokens": 1 << 40,
                   "num_layers": 1 << 16}
_MAX_COST_MS = 1e6  # any per-step, per-token or per-row cost in ms
_MAX_COST = {"host_link_bytes_per_s": 1e15}
_REQUIRED = ("name", "floor_ms", "base_ms", "per_token_ms", "decode_context_ms", "prefill_attention_ms",
             "kv_bytes_per_token", "max_model_len", "default_kv_capacity_tokens")


def load_profile(name_or_path: Union[str, Path]) -> ModelProfile:
    """A built-in profile by name, or a profile JSON file (``kvsched calibrate --out``)."""
    if str(name_or_path) in PROFILES:
        return PROFILES[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise ProfileError(f"{path}: neither a built-in profile ({', '.join(PROFILES)}) nor a file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ProfileError(f"{path}: not a profile JSON file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: want a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in fields(ModelProfile)}
    unknown = sorted(set(data) - set(known))
    missing = [k for k in _REQUIRED if k not in data]
    if unknown or missing:
        raise ProfileError(f"{path}: " + "; ".join(filter(None, [
            f"unknown field(s) {', '.join(unknown)}" if unknown else "",
            f"missing field(s) {', '.join(missing)}" if missing else ""])))
    for name, value in data.items():
        if name == "name":
            ok = isinstance(value, str) and value
        elif name == "calibration":
            ok = isinstance(value, dict)
        elif name in _INTEGER_LIMITS:
            ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _INTEGER_LIMITS[name]
        else:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and 0 <= value <= _MAX_COST.get(name, _MAX_COST_MS) and (name != "host_link_bytes_per_s" or value > 0))
        if not ok:
            raise ProfileError(f"{path}: field {name!r} has a bad value {str(value)[:40]}")
    return ModelProfile(**data)


# A step's features, as kvsched calibrate records them (one array each, one entry per step).
STEP_FEATURES = ("rows", "tokens", "decode_rows", "decode_context", "prefill_attention")


def step_features(num_tokens: np.ndarray, computed_offsets: np.ndarray, is_prefill: np.ndarray) -> dict:
    """One step's features from its rows (the same quantities :meth:`ModelProfile.step_time_s` reads)."""
    decode = ~is_prefill
    chunk = num_tokens[is_prefill].astype(np.float64)
    return dict(rows=int(num_tokens.size), tokens=int(num_tokens[is_prefill].sum()) + int(decode.sum()),
                decode_rows=int(decode.sum()),
                decode_context=int((computed_offsets[decode] + num_tokens[decode]).sum()),
                prefill_attention=float((chunk * (computed_offsets[is_prefill] + chunk / 2)).sum()))


def fit_profile(steps: dict, seconds: np.ndarray, *, name: str, kv_bytes_per_token: int, max_model_len: int,
                kv_capacity_tokens: int, calibration: Optional[dict] = None) -> ModelProfile:
    """Fits base, per-token, per-row, decode-context and prefill-attention costs (all >= 0) to
    measured steps, minimizing the relative error; the fit's quality goes into ``calibration``."""
    y = 1e3 * np.asarray(seconds, np.float64)
    if y.ndim != 1 or y.size < 20:
        raise ValueError(f"seconds: want at least 20 steps, got {y.size}")
    if not np.all(np.isfinite(y) & (y > 0)):
        raise ValueError(f"seconds: every step's time must be finite and > 0 ({int(np.count_nonzero(~(y > 0)))} are not)")
    columns = [np.ones_like(y)]
    for feature in ("tokens", "rows", "decode_context", "prefill_attention"):
        if feature not in steps:
            raise ValueError(f"steps: missing feature {feature!r}")
        column = np.asarray(steps[feature], np.float64)
        if column.shape != y.shape or not np.all(np.isfinite(column) & (column >= 0)):
            raise ValueError(f"steps[{feature!r}]: want {y.size} finite values >= 0, one per step")
        columns.append(column)
    x = np.column_stack(columns)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:  # non-negative least squares on few columns: drop the most negative, refit
        solved, *_ = np.linalg.lstsq(x[:, active] / y[:, None], np.ones_like(y), rcond=None)
        if solved.min() >= 0:
            coef[:] = 0
            coef[active] = solved
            break
        active.pop(int(np.argmin(solved)))
    # Least squares on relative error is biased low when step times scatter (it pays less for
    # under-predicting a slow step than for over-predicting a fast one); one scale puts the total
    # time right, which sets throughput and queueing, and leaves the shape as fitted.
    bias = float((x @ coef).sum() / y.sum() - 1)
    coef /= 1 + bias
    predicted = x @ coef
    error = predicted / y - 1
    quality = dict(steps=int(y.size), median_step_ms=float(np.median(y)),
                   median_abs_error=float(np.median(np.abs(error))),
                   p90_abs_error=float(np.quantile(np.abs(error), 0.9)),
                   total_time_error=float(predicted.sum() / y.sum() - 1), relative_fit_bias=bias)
    base, per_token, per_row, decode_context, prefill_attention = map(float, coef)
    return ModelProfile(name, 0.0, base, per_token, decode_context, prefill_attention, int(kv_bytes_per_token),
                        int(max_model_len), int(kv_capacity_tokens), per_row_ms=per_row,
                        calibration={**(calibration or {}), "fit": quality})


CONTEXT_BANDS = ((8, 128), (128, 1024), (1024, 1 << 30))  # prompt lengths: short, medium, long


def calibration_workload(seed: int, max_model_len: int, max_num_seqs: int, kv_capacity_tokens: int,
                         output_tokens: tuple = (32, 64)):
    """Requests that sweep what a step's time depends on, independently of one another: a round for
    every batch size (1, 2, 4, ... up to ``max_num_seqs``) and prompt band (:data:`CONTEXT_BANDS`, cut
    to what the context and the KV cache hold for that many requests; a band that does not fit is
    left out), its requests arriving together with log-uniform prompts in the band and outputs in
    ``output_tokens``. So steps cover prefills alone and batched at short and long context, and decode
    batches of every size at every context. Returns (round of each request, prompt, output) arrays; a
    round starts when the previous one has finished (the replay's ``rounds`` argument)."""
    rng = np.random.default_rng(seed)
    rounds, prompts, outputs = [], [], []
    low_out, high_out = output_tokens
    size, index = 1, 0
    while size <= max(1, max_num_seqs):
        room = min(max_model_len, kv_capacity_tokens // size) - high_out
        for low, high in CONTEXT_BANDS:
            if room < low:
                continue
            high = min(high, room)
            prompt = np.exp(rng.uniform(np.log(low), np.log(high), size=size)).astype(np.int64)
            rounds += [index] * size
            prompts += np.clip(prompt, 1, room).tolist()
            outputs += rng.integers(low_out, high_out, size=size, endpoint=True).tolist()
            index += 1
        size *= 2
    return np.array(rounds), np.array(prompts, np.int64), np.array(outputs, np.int64)


def open_calibration_room(max_model_len: int, kv_capacity_tokens: int, output_tokens: tuple = (16, 256)) -> int:
    """The longest prompt :func:`open_calibration_workload` draws: eight requests share the KV cache."""
    return min(max_model_len, max(2, kv_capacity_tokens // 8)) - output_tokens[1]


def open_calibration_workload(seed: int, profile: ModelProfile, max_model_len: int, kv_capacity_tokens: int,
                              num_requests: int = 200, utilization: float = 0.7, output_tokens: tuple = (16, 256)):
    """Requests as a server sees them, to follow :func:`calibration_workload`'s rounds: Poisson
    arrivals, prompts log-uniform over the context, so that new prefills join running decodes (the
    mixed steps rounds seldom make). The rate loads the engine to about ``utilization`` by the
    provisional ``profile`` fitted on the rounds. Returns (arrival_s, prompt, output) arrays."""
    rng = np.random.default_rng(seed)
    room = open_calibration_room(max_model_len, kv_capacity_tokens, output_tokens)
    if num_requests < 1 or not 0 < utilization <= 1:
        raise ValueError(f"num_requests, utilization: want >= 1 and in (0, 1], got {num_requests}, {utilization}")
    if room < 2:
        raise ValueError(f"max_model_len, kv_capacity_tokens: {max_model_len}, {kv_capacity_tokens} leave no room for "
                         f"a prompt beside {output_tokens[1]} output tokens")
    prompts = np.clip(np.exp(rng.uniform(np.log(8), np.log(max(9, room)), num_requests)).astype(np.int64), 1, room)
    outputs = rng.integers(output_tokens[0], output_tokens[1], num_requests, endpoint=True)
    # Engine seconds a request costs, by the provisional profile, with its decodes batched eight at a time.
    decode_rows = outputs.astype(np.float64)
    ms = (profile.per_token_ms * (prompts + decode_rows) + profile.per_row_ms * (1 + decode_rows)
          + profile.prefill_attention_ms * prompts * (prompts / 2)
          + profile.decode_context_ms * decode_rows * (prompts + decode_rows / 2) + profile.base_ms * decode_rows / 8)
    if not np.isfinite(ms.mean()) or ms.mean() <= 0:
        raise ValueError(f"profile: a request would cost {ms.mean()} ms by it; want a finite cost > 0")
    rate = utilization / (1e-3 * float(ms.mean()))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests))
    return arrivals - arrivals[0], prompts, outputs
