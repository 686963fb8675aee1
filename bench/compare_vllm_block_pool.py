"""Per-block allocate+free: vLLM v1's BlockPool beside kvsched's BlockAllocator, in one run.

    python bench/compare_vllm_block_pool.py [--requests 1024] [--blocks-per-request 16] [--repeats 15]

vLLM's BlockPool runs on CPU: ``pip install torch==2.13.0`` then ``pip install --no-deps vllm==0.33.0``
plus the modules it imports (psutil, pyzmq, msgspec, cbor2, transformers, ...). Without vLLM the
script says so and times kvsched alone. Every figure is the median over --repeats rounds; a round
allocates --blocks-per-request blocks for each of --requests requests, then frees them all.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import kvsched


def median_ns_per_block(round_fn, repeats: int, blocks: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        round_fn()
        samples.append((time.perf_counter_ns() - start) / blocks)
    return statistics.median(samples)


def kvsched_rounds(requests: int, per_request: int, block_size: int):
    a = kvsched.BlockAllocator(requests * per_request + 1, block_size, enable_prefix_caching=True)
    ids = np.arange(requests, dtype=np.int64)
    tokens = np.full(requests, per_request * block_size, dtype=np.int64)

    def batched():
        a.allocate_batch(ids, tokens)
        a.free_batch(ids)

    def per_call():
        for s in range(requests):
            a.allocate(s, per_request * block_size)
        for s in range(requests):
            a.free(s)

    return batched, per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--blocks-per-request", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    blocks = args.requests * args.blocks_per_request
    batched, per_call = kvsched_rounds(args.requests, args.blocks_per_request, args.block_size)
    for warm in (batched, per_call):
        warm()
    results = {
        "kvsched allocate_batch+free_batch": median_ns_per_block(batched, args.repeats, blocks),
        "kvsched allocate+free per request": median_ns_per_block(per_call, args.repeats, blocks),
    }
    vllm_ns = None
    try:
        import vllm
        from vllm.v1.core.block_pool import BlockPool

        pool = BlockPool(blocks + 1, enable_caching=True, hash_block_size=args.block_size)
        # Time get_new_blocks and free_blocks separately, as they are quoted; the first round warms up.
        get_samples, free_samples = [], []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter_ns()
            held = [pool.get_new_blocks(args.blocks_per_request) for _ in range(args.requests)]
            t1 = time.perf_counter_ns()
            for b in held:
                pool.free_blocks(b)
            t2 = time.perf_counter_ns()
            get_samples.append((t1 - t0) / blocks)
            free_samples.append((t2 - t1) / blocks)
        get_samples, free_samples = get_samples[1:], free_samples[1:]
        vllm_get, vllm_free = statistics.median(get_samples), statistics.median(free_samples)
        vllm_ns = vllm_get + vllm_free
        print(f"vLLM {vllm.__version__} BlockPool: get_new_blocks {vllm_get:.1f} ns/block, free_blocks {vllm_free:.1f} ns/block")
        results["vLLM BlockPool get_new_blocks+free_blocks"] = vllm_ns
    except ImportError as error:
        print(f"vLLM is not importable here ({error}); timing kvsched alone.")
    print(f"\n{args.requests} requests x {args.blocks_per_request} blocks, median of {args.repeats} rounds")
    print(f"{'path':<45}{'ns/block':>10}{'vs vLLM':>10}")
    for name, ns in results.items():
        ratio = f"{vllm_ns / ns:.1f}x" if vllm_ns else "n/a"
        print(f"{name:<45}{ns:>10.1f}{ratio:>10}")


if __name__ == "__main__":
    main()
