"""How much of a step's KV copies the forward pass hides on a GPU: StepCopyRunner's overlapping
sections (out_overlap, into_overlap) against the same copies waited for, in one run.

An engine step here is what vLLM does with kvsched's connector: ``StepCopyRunner.run`` with the
step's copies, then the forward pass on the compute stream. The forward pass is modelled by bf16
matrix products (busy multiprocessors and memory, as a real one) sized to a multiple ``ratio`` of
the copies' own time, measured first in the same run. The KV cache is Llama-3-8B's in vLLM's
flash-attention layout (32 layers of (2, blocks, 16, 8, 128) fp16: 2 MiB a block), and each step
copies --blocks blocks drawn at random (a run per block per piece, as prefetches and
write-throughs of scattered blocks are).

For each direction (in: prefetches; out: write-throughs; both) and ratio it times, as medians of
--repeats rounds of --steps steps, in interleaved rounds (drift hits all alike):

  compute      forward passes alone
  copies       copies alone, waited (as a step without a forward pass)
  waited       copies the forward pass waits for (into / out), then the forward pass
  overlapping  the same copies as overlapping sections, then the forward pass

and reports per step ms, the ideal (max of compute and copies) and the share of the copies'
time hidden, (waited - overlapping) / copies. It does so under the copy engine's default cost
model and again after ``calibrate_swap_cost`` measured this GPU ("cost_model" in each row).

First, the copies alone per copy strategy (the engine's auto choice under either cost model, and
each strategy forced), against one plain copy of the same bytes (the ceiling), in GB/s.

    python bench/gpu/step_copy_overlap.py --out overlap.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import numpy as np
import torch

import kvsched
from kvsched.cuda import CopyEngine, calibrate_swap_cost, pinned_empty
from kvsched.step_copies import StepCopies, StepCopyRunner

LAYERS, BLOCK, HEADS, DIM = 32, 16, 8, 128
DIRECTIONS = ("in", "out", "both")


def step_copies(direction: str, extents_out: np.ndarray, extents_in: np.ndarray, overlap: bool,
                host_blocks: int) -> StepCopies:
    out = extents_out if direction in ("out", "both") else np.zeros((0, 3), np.int64)
    into = extents_in if direction in ("in", "both") else np.zeros((0, 3), np.int64)
    if overlap:
        return StepCopies(host_blocks, out_overlap=out, into_overlap=into)
    return StepCopies(host_blocks, out=out, into=into)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-blocks", type=int, default=1024)
    parser.add_argument("--host-blocks", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=32, help="blocks copied per step and direction")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not (kvsched.has_cuda() and torch.cuda.is_available()):
        raise SystemExit("needs a CUDA device and a kvsched built with CUDA")

    rng = np.random.default_rng(args.seed)
    tensors = {f"layer.{i}": torch.randint(0, 30000, (2, args.device_blocks, BLOCK, HEADS, DIM), dtype=torch.int16,
                                           device="cuda").view(torch.float16) for i in range(LAYERS)}
    runner = StepCopyRunner(tensors, args.device_blocks)
    bytes_per_step = args.blocks * LAYERS * 2 * BLOCK * HEADS * DIM * 2

    def random_extents(n_sets: int) -> tuple[list, list]:
        outs, ins = [], []
        for _ in range(n_sets):
            dev = rng.choice(args.device_blocks, size=2 * args.blocks, replace=False)
            host = rng.choice(args.host_blocks, size=2 * args.blocks, replace=False)
            ones = np.ones(args.blocks, np.int64)
            # out reads the first half of dev and writes the first half of host; in reads the other
            # half of host and writes the other half of dev: both at once never touch one block twice.
            outs.append(np.stack([dev[:args.blocks], host[:args.blocks], ones], axis=1).astype(np.int64))
            ins.append(np.stack([host[args.blocks:], dev[args.blocks:], ones], axis=1).astype(np.int64))
        return outs, ins

    outs, ins = random_extents(args.steps)
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    c = torch.empty_like(a)

    def forward(products: int) -> None:
        for _ in range(products):
            torch.matmul(a, b, out=c)

    def timed(direction: str, mode: str, products: int) -> float:
        """ms per step over args.steps steps."""
        torch.cuda.synchronize()
        began = time.perf_counter()
        for s in range(args.steps):
            if mode != "compute":
                runner.run(step_copies(direction, outs[s], ins[s], mode == "overlapping", args.host_blocks))
            else:
                runner.run(StepCopies(args.host_blocks))
            if mode != "copies":
                forward(products)
        runner.run(StepCopies(args.host_blocks))  # the last overlapping copies land before the clock stops
        torch.cuda.synchronize()
        return (time.perf_counter() - began) * 1e3 / args.steps

    # Warm-up: the copier's pool and lanes, cuBLAS, and one of each mode.
    for direction in DIRECTIONS:
        for mode in ("copies", "waited", "overlapping"):
            timed(direction, mode, 1)
    one_product = float(np.median([timed("in", "compute", 10) / 10 for _ in range(5)]))
    engine = runner.copier.engine
    cost_models = {"default": engine.cost_model().copy()}
    calibration_device = torch.empty(2 * (32 << 10) * 2048, dtype=torch.uint8, device="cuda")
    cost_models["calibrated"] = calibrate_swap_cost(engine, calibration_device, pinned_empty(calibration_device.numel()))
    del calibration_device

    # The copies alone, per strategy, in interleaved rounds; the ceiling is one plain copy of the bytes.
    plain_device = torch.empty(bytes_per_step, dtype=torch.uint8, device="cuda")
    plain_host = torch.empty(bytes_per_step, dtype=torch.uint8).pin_memory()
    contenders = [("auto", "default"), ("auto", "calibrated"), ("per_descriptor", None), ("batched", None),
                  ("gather_kernel", None)]
    if not CopyEngine.batched_supported():
        contenders.remove(("batched", None))
    strategy_rows = []
    copy_stream = torch.cuda.Stream()  # a created stream: batched copies refuse the legacy default one
    for direction in ("in", "out"):
        samples = {name: [] for name in contenders + [("ceiling", None)]}
        for _ in range(args.repeats):
            for strategy, model in contenders:
                if model:
                    engine.set_cost_model(cost_models[model])
                extents = ins if direction == "in" else outs
                torch.cuda.synchronize()
                began = time.perf_counter()
                for s in range(args.steps):
                    runner.copier.copy(extents[s], direction, stream=copy_stream.cuda_stream, strategy=strategy)
                torch.cuda.synchronize()
                samples[(strategy, model)].append((time.perf_counter() - began) / args.steps)
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(args.steps):
                (plain_device.copy_(plain_host, non_blocking=True) if direction == "in"
                 else plain_host.copy_(plain_device, non_blocking=True))
            torch.cuda.synchronize()
            samples[("ceiling", None)].append((time.perf_counter() - began) / args.steps)
        for (strategy, model), seconds in samples.items():
            gbps = [bytes_per_step / x / 1e9 for x in seconds]
            strategy_rows.append(dict(direction=direction, strategy=strategy, cost_model=model,
                                      gbps_median=float(np.median(gbps)), gbps_range=[min(gbps), max(gbps)]))
            print(f"copies {direction:>3} {strategy:>14} {model or '':>10}: {np.median(gbps):5.1f} GB/s "
                  f"({min(gbps):5.1f}-{max(gbps):5.1f})", flush=True)

    rows = []
    for model, table in cost_models.items():
        engine.set_cost_model(table)
        for direction in DIRECTIONS:
            copies_ms = float(np.median([timed(direction, "copies", 0) for _ in range(args.repeats)]))
            for ratio in args.ratios:
                products = max(1, round(ratio * copies_ms / one_product))
                samples = {m: [] for m in ("compute", "copies", "waited", "overlapping")}
                for _ in range(args.repeats):
                    for mode in samples:
                        samples[mode].append(timed(direction, mode, products))
                med = {m: float(np.median(v)) for m, v in samples.items()}
                hidden = (med["waited"] - med["overlapping"]) / med["copies"] if med["copies"] > 0 else 0.0
                ideal = max(med["compute"], med["copies"])
                row = dict(cost_model=model, direction=direction, ratio=ratio, products=products, ms_per_step=med,
                           samples_ms=samples, ideal_ms=ideal, hidden_share=hidden,
                           overlapping_over_ideal=med["overlapping"] / ideal,
                           copy_gbps=(bytes_per_step * (2 if direction == "both" else 1)) / med["copies"] / 1e6)
                rows.append(row)
                print(f"{model:>10} {direction:>4} ratio {ratio:3.1f}: compute {med['compute']:6.2f}  copies "
                      f"{med['copies']:6.2f}  waited {med['waited']:6.2f}  overlapping {med['overlapping']:6.2f}  "
                      f"ideal {ideal:6.2f} ms/step; hidden {hidden:5.1%}; copies {row['copy_gbps']:5.1f} GB/s",
                      flush=True)
    result = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(),
                  command="python bench/gpu/step_copy_overlap.py " + " ".join(
                      f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in vars(args).items() if k != "out"),
                  bytes_per_step_and_direction=bytes_per_step, one_product_ms=one_product,
                  cost_models={k: v.tolist() for k, v in cost_models.items()}, copies_by_strategy=strategy_rows,
                  rows=rows,
                  failed_blocks=sorted(runner.take_failed_blocks()))
    if result["failed_blocks"]:
        raise SystemExit(f"copies failed: {result['failed_blocks'][:10]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
