"""Swap bandwidth on a GPU, all in one run: a fragmented set of 16-token blocks of Llama-3-8B
(32 layers, 8 KV heads, head dim 128, fp16: 32 KiB per layer-block per K or V tensor) moved
device -> pinned host and back by

  * per_block_baseline  one cudaMemcpyAsync per block per tensor (the vLLM v0 swap path),
  * each kvsched strategy (per_descriptor, batched, gather_kernel, auto) on kvsched's plan,
  * raw_ceiling         one cudaMemcpyAsync of the same bytes between contiguous buffers.

GB/s are medians of --repeats runs timed with CUDA events. Prints a table and writes JSON.
Targets (issue 5): kvsched >= 85% of the raw ceiling in both directions and >= 4x the baseline.

    python bench/gpu/swap_bandwidth.py --out swap.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys

import numpy as np

import kvsched
from kvsched.cuda import CopyEngine, calibrate_swap_cost, pinned_empty
from kvsched.swap import STRATEGIES, KvLayout, SwapPlanner


def device_buffers(sizes):
    try:
        import cupy
        return [cupy.empty(n, dtype=cupy.uint8) for n in sizes], cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except ImportError:
        import torch
        return [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes], torch.cuda.get_device_name(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device-blocks", type=int, default=2048, help="blocks in the device pool (2 MiB each)")
    parser.add_argument("--swap-blocks", type=int, default=512, help="blocks in the fragmented swap set")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate", action="store_true", help="calibrate the cost model first (auto uses it)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not kvsched.has_cuda():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2

    layout = KvLayout.per_layer(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype_bytes=2)
    rng = np.random.default_rng(args.seed)
    # Fragmented: a random subset of device blocks, in random order (what a long-running pool gives).
    table = rng.choice(args.device_blocks, size=args.swap_blocks, replace=False).astype(np.int32)
    num_tokens = 16 * args.swap_blocks
    planner = SwapPlanner(args.swap_blocks, 16, layout=layout)
    out_plan = planner.plan_swap_out([0], [num_tokens], [0, args.swap_blocks], table)
    in_plan = planner.plan_swap_in([0], [0, args.swap_blocks], table)

    device, gpu_name = device_buffers(layout.buffer_nbytes(args.device_blocks, "device"))
    host = [pinned_empty(n) for n in layout.buffer_nbytes(args.swap_blocks, "host")]
    engine = CopyEngine(0)
    if args.calibrate:
        scratch_device, _ = device_buffers([2 * (32 << 10) * 2048])
        calibrate_swap_cost(engine, scratch_device[0], pinned_empty(2 * (32 << 10) * 2048))

    total_bytes = out_plan.bytes
    block_bytes = int(layout.tensors[0, 0])
    host_blocks = planner.host_blocks(0)
    # The baseline: one descriptor per block per tensor, never merged.
    def per_block(direction_out: bool) -> np.ndarray:
        rows = []
        for t in range(layout.num_tensors):
            for logical, device_block in enumerate(table):
                dev, hst = int(device_block) * block_bytes, int(host_blocks[logical]) * block_bytes
                rows.append((t, dev, hst, block_bytes) if direction_out else (t, hst, dev, block_bytes))
        return np.array(rows, dtype=np.int64)

    def gbps(seconds: float) -> float:
        return total_bytes / seconds / 1e9

    results = {"date": datetime.date.today().isoformat(), "gpu": gpu_name, "bytes": total_bytes,
               "swap_blocks": args.swap_blocks, "layout": "llama-3-8b per-layer K,V (64 tensors, 32 KiB/block)",
               "descriptors_kvsched": {"out": out_plan.num_descriptors, "in": in_plan.num_descriptors},
               "batched_supported": CopyEngine.batched_supported(), "directions": {}}
    for name, plan in (("out", out_plan), ("in", in_plan)):
        row = {}
        baseline_plan = dataclasses.replace(plan, descriptors=per_block(name == "out"))
        row["per_block_baseline"] = gbps(engine.time_copy(baseline_plan, device, host, strategy="per_descriptor",
                                                          repeats=args.repeats))
        for strategy in ("auto",) + STRATEGIES:
            if strategy == "batched" and not CopyEngine.batched_supported():
                continue
            row[strategy] = gbps(engine.time_copy(plan, device, host, strategy=strategy, repeats=args.repeats))
        row["auto_choice"] = engine.choose(plan)
        # Raw ceiling: the same bytes as one copy between contiguous device and pinned host memory.
        whole = np.array([[0, 0, 0, total_bytes]], dtype=np.int64)
        raw_plan = dataclasses.replace(plan, descriptors=whole)
        big_device, _ = device_buffers([total_bytes])
        big_host = [pinned_empty(total_bytes)]
        row["raw_ceiling"] = gbps(engine.time_copy(raw_plan, big_device, big_host, strategy="per_descriptor",
                                                   repeats=args.repeats))
        best = max(v for k, v in row.items() if k in STRATEGIES or k == "auto")
        row["best_kvsched_vs_ceiling"] = best / row["raw_ceiling"]
        row["auto_vs_ceiling"] = row["auto"] / row["raw_ceiling"]
        row["auto_vs_baseline"] = row["auto"] / row["per_block_baseline"]
        results["directions"][name] = row
        del big_device, big_host

    print(f"{gpu_name}, {total_bytes / 2**20:.0f} MiB in {args.swap_blocks} fragmented blocks, GB/s (median of {args.repeats})")
    keys = [k for k in results["directions"]["out"] if isinstance(results["directions"]["out"][k], float)]
    for key in keys:
        print(f"  {key:<26}" + "".join(f"{results['directions'][d][key]:>10.2f}" for d in ("out", "in")))
    print("  auto chose: " + ", ".join(f"{d}={results['directions'][d]['auto_choice']}" for d in ("out", "in")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
