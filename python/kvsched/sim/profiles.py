"""Iteration-time models of a simulated engine (published fits, 32 layers, TP=1).

    T_ms = max(F, a + b*N) + d*sum(decode context) + e*sum(chunk*(context + chunk/2)) + overhead

with N = prefill-chunk tokens + decode sequences. The Llama-3-8B/A100 fit is used as published.
For Llama-2-7B/H100 the design gives F, a, b and d; its prefill-attention term e is not
published, so it is the A100 value scaled by the ratio of the two linear terms (b).
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def swap_cost(self) -> np.ndarray:
        """The swap planner's default cost table with bandwidths capped at this machine's host link."""
        from ..swap import default_cost_model

        table = default_cost_model()
        table[:, :, 2] = np.minimum(table[:, :, 2], self.host_link_bytes_per_s)
        return table

    def step_time_s(self, num_tokens: np.ndarray, computed_offsets: np.ndarray, is_prefill: np.ndarray) -> float:
        """Simulated duration of one step over the plan's arrays."""
        decode = ~is_prefill
        n = float(num_tokens[is_prefill].sum()) + float(decode.sum())
        chunk = num_tokens[is_prefill].astype(np.float64)
        context = computed_offsets[is_prefill].astype(np.float64)
        ms = max(self.floor_ms, self.base_ms + self.per_token_ms * n)
        ms += self.decode_context_ms * float((computed_offsets[decode] + num_tokens[decode]).sum())
        ms += self.prefill_attention_ms * float((chunk * (context + chunk / 2)).sum())
        return (ms + self.overhead_ms) / 1000.0

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
