"""Per-step CPU cost of kvsched.Scheduler against vLLM v1's Scheduler, side by side in one run.

Both schedulers hold N running requests that are all decoding plus W waiting ones that cannot be
admitted (max_num_seqs = N), which is the steady state of a saturated server. One step is
``schedule()`` plus the engine's report (``update()`` / ``update_from_output()``); the engine's
own output objects are built outside the timed region. vLLM runs on CPU with a mocked model: a
two-layer Llama config.json in a temporary folder, no weights and no tokenizer.

    python bench/compare_vllm_scheduler.py --running 256 1024 --waiting 10000 --steps 200

Prints the median of each part per scheduler and the ratios. Needs vLLM importable (and einops).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

import kvsched

PROMPT_LEN = 128
BLOCK_SIZE = 16


def kvsched_step_times(running: int, waiting: int, steps: int) -> tuple[list[float], list[float]]:
    total = running + waiting
    blocks = running * (PROMPT_LEN + steps + 64) // BLOCK_SIZE + 64
    s = kvsched.Scheduler(
        num_blocks=blocks, block_size=BLOCK_SIZE, max_num_seqs=running, max_num_batched_tokens=8192,
        admission="aggressive", enable_prefix_caching=False,
    )
    s.add_requests(np.arange(total), PROMPT_LEN, 100_000)
    while True:  # prefill everyone who fits
        plan = s.schedule()
        done = plan.computed_offsets + plan.num_tokens >= PROMPT_LEN
        s.update(plan.req_ids, done.astype(np.int64), np.zeros(len(plan), bool))
        if len(plan) == running and not plan.is_prefill.any():
            break
    schedule_s, update_s = [], []
    ones = np.ones(running, np.int64)
    no = np.zeros(running, bool)
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = s.schedule()
        t1 = time.perf_counter()
        s.update(plan.req_ids, ones, no)
        t2 = time.perf_counter()
        assert len(plan) == running
        schedule_s.append(t1 - t0)
        update_s.append(t2 - t1)
    return schedule_s, update_s


def _vllm_scheduler(running: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    import torch

    model_dir = tempfile.mkdtemp(prefix="kvsched-mock-llama-")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
            "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
            "vocab_size": 32000, "max_position_embeddings": 8192, "torch_dtype": "float16",
        }, f)
    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, max_model_len=8192, dtype="float16")
    scheduler_config = SchedulerConfig(
        max_num_seqs=running, max_num_batched_tokens=8192, max_model_len=8192, is_encoder_decoder=False
    )
    cache = CacheConfig(block_size=BLOCK_SIZE, gpu_memory_utilization=0.9, cache_dtype="auto",
                        enable_prefix_caching=False)
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model, cache_config=cache,
                             device_config=DeviceConfig("cpu"))
    num_blocks = running * (PROMPT_LEN + 4096) // BLOCK_SIZE
    cache.num_gpu_blocks = num_blocks
    kv = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=4, head_size=64, dtype=torch.float16))],
    )
    return Scheduler(vllm_config, kv, StructuredOutputManager(vllm_config), block_size=BLOCK_SIZE)


def vllm_step_times(running: int, waiting: int, steps: int) -> tuple[list[float], list[float]]:
    from vllm import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    sched = _vllm_scheduler(running)
    params = SamplingParams(max_tokens=100_000, ignore_eos=True)
    for i in range(running + waiting):
        sched.add_request(Request(str(i), list(range(PROMPT_LEN)), params, None, arrival_time=float(i)))

    def output_for(scheduler_output):
        ids = list(scheduler_output.num_scheduled_tokens)
        return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                                 sampled_token_ids=[[7]] * len(ids))

    while True:
        out = sched.schedule()
        sched.update_from_output(out, output_for(out))
        if len(out.num_scheduled_tokens) == running and all(n == 1 for n in out.num_scheduled_tokens.values()):
            break
    schedule_s, update_s = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        runner_output = output_for(out)
        t2 = time.perf_counter()
        sched.update_from_output(out, runner_output)
        t3 = time.perf_counter()
        assert len(out.num_scheduled_tokens) == running
        schedule_s.append(t1 - t0)
        update_s.append(t3 - t2)
    return schedule_s, update_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--running", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print(f"kvsched {kvsched.__version__}; medians of {args.steps} steps, {args.waiting} waiting")
    for running in args.running:
        k_sched, k_update = kvsched_step_times(running, args.waiting, args.steps)
        ks, ku = statistics.median(k_sched) * 1e6, statistics.median(k_update) * 1e6
        line = f"N={running:5d}  kvsched schedule {ks:8.1f} us  update {ku:8.1f} us  total {ks + ku:8.1f} us"
        try:
            import vllm

            v_sched, v_update = vllm_step_times(running, args.waiting, args.steps)
            vs, vu = statistics.median(v_sched) * 1e6, statistics.median(v_update) * 1e6
            line += (
                f"\n         vLLM {vllm.__version__} schedule {vs:8.1f} us  update {vu:8.1f} us  total {vs + vu:8.1f} us"
                f"\n         ratio schedule {vs / ks:6.1f}x  update {vu / ku:6.1f}x  total {(vs + vu) / (ks + ku):6.1f}x"
            )
        except ImportError as error:
            line += f"\n         vLLM not importable ({error}); kvsched only"
        print(line, flush=True)


if __name__ == "__main__":
    main()
