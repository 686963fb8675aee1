"""``kvsched calibrate`` for vLLM: a real engine's step time measured and fitted into a model profile
that ``kvsched simulate --model-profile FILE`` loads.

The engine runs kvsched's scheduler (the one the simulator drives), in this process, on the replay's
clock (replay.py). Each repeat is two phases: kvsched.sim.profiles.calibration_workload's rounds
(batch size against context), a provisional fit, then open_calibration_workload's Poisson stream at
a rate that provisional fit says loads the engine to about 70% (new prefills joining running
decodes, as in serving). The profile is kvsched.sim.profiles.fit_profile over every step. KV bytes per token come from the model's config (layers x
(K, V) x KV heads x head size x dtype bytes).
"""

from __future__ import annotations

import platform
import time

import numpy as np

from ...sim.profiles import ModelProfile, calibration_workload, fit_profile, open_calibration_workload
from .replay import engine_options, replay, start_engine


def calibrate(model: str, *, name: str, kv_capacity_tokens: int, block_size: int, max_model_len: int,
              max_num_seqs: int, max_num_batched_tokens: int, dtype: str = "float32", clock: str = "cpu",
              repeats: int = 2, seed: int = 0, kvsched_options: dict | None = None, llm=None) -> ModelProfile:
    """Measures and fits; ``repeats`` passes of the workload (different seeds) in one engine: ``llm``
    when given (started with these options by the caller), else one started here."""
    if repeats < 1:
        raise ValueError(f"repeats: want >= 1, got {repeats}")
    began = time.perf_counter()
    if llm is None:
        llm = start_engine(engine_options(model, kv_capacity_tokens=kv_capacity_tokens, block_size=block_size,
                                          max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                          max_num_batched_tokens=max_num_batched_tokens, dtype=dtype,
                                          kvsched_options=kvsched_options, seed=seed))
    steps: dict[str, list] = {}

    def measured(result) -> dict:
        for key, values in result.steps.items():
            steps.setdefault(key, []).append(values)
        return {key: np.concatenate(parts) for key, parts in steps.items()}

    for k in range(repeats):
        rounds, prompts, outputs = calibration_workload(seed + k, max_model_len, max_num_seqs, kv_capacity_tokens)
        arrays = measured(replay(llm, np.zeros(prompts.size), prompts, outputs, max_new_tokens=int(outputs.max()),
                                 clock=clock, seed=seed + k, rounds=rounds, warmup=4 if k == 0 else 0))
        provisional = fit_profile(arrays, arrays["seconds"], name=name, kv_bytes_per_token=1,
                                  max_model_len=max_model_len, kv_capacity_tokens=kv_capacity_tokens)
        arrival, prompts, outputs = open_calibration_workload(seed + k, provisional, max_model_len, kv_capacity_tokens,
                                                              num_requests=max(50, min(200, 4 * max_num_seqs)))
        arrays = measured(replay(llm, arrival, prompts, outputs, max_new_tokens=int(outputs.max()), clock=clock,
                                 seed=seed + k, warmup=0))
    model_config = llm.llm_engine.vllm_config.model_config
    dtype_bytes = model_config.dtype.itemsize
    num_layers = model_config.get_num_layers(llm.llm_engine.vllm_config.parallel_config)
    kv_heads = model_config.get_num_kv_heads(llm.llm_engine.vllm_config.parallel_config)
    kv_bytes = num_layers * 2 * kv_heads * model_config.get_head_size() * dtype_bytes
    import vllm

    provenance = dict(engine=f"vllm {vllm.__version__}", model=model, dtype=dtype, clock=clock,
                      kv_capacity_tokens=kv_capacity_tokens // block_size * block_size, block_size=block_size,
                      max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                      repeats=repeats, seed=seed, machine=platform.machine(), processor=platform.processor(),
                      seconds=round(time.perf_counter() - began, 1))
    profile = fit_profile(arrays, arrays["seconds"], name=name, kv_bytes_per_token=int(kv_bytes),
                          max_model_len=max_model_len, kv_capacity_tokens=kv_capacity_tokens // block_size * block_size,
                          calibration=provenance)
    import dataclasses

    return dataclasses.replace(profile, num_layers=int(num_layers))
