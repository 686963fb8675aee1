"""Command-line front: ``kvsched <command>``. User errors print a message and exit 2, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .sim.allocator_replay import replay_placement
from .sim.traces import Trace, TraceError, read_azure
from .sim.workloads import synthetic_chat

PLACEMENTS = ("contiguous", "lifo", "fifo")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _allocator_replay(args: argparse.Namespace) -> int:
    if args.trace:
        trace = read_azure(args.trace)
        source = f"{args.trace} (Azure format)"
    else:
        trace = synthetic_chat(args.num_requests, seed=args.seed)
        source = "built-in synthetic chat (Azure conv length statistics, 5.5 req/s Poisson)"
    trace = trace.head(args.num_requests)
    trace = Trace(trace.arrival_s / args.rate_scale, trace.prompt_tokens, trace.output_tokens)
    reports = [
        replay_placement(trace, placement, num_blocks=args.num_blocks, block_size=args.block_size)
        for placement in PLACEMENTS
    ]
    print(f"workload: {source}, {len(trace)} requests, rate x{args.rate_scale}")
    print(f"pool: {args.num_blocks} blocks of {args.block_size} tokens\n")
    header = f"{'placement':<12}{'blocks/extent':>15}{'vs fifo':>10}{'preemptions':>13}{'mean running':>14}"
    print(header)
    print("-" * len(header))
    fifo = next(r for r in reports if r.placement == "fifo").mean_blocks_per_extent
    for r in reports:
        ratio = r.mean_blocks_per_extent / fifo if fifo else float("nan")
        print(f"{r.placement:<12}{r.mean_blocks_per_extent:>15.2f}{ratio:>9.1f}x{r.preemptions:>13}{r.mean_running:>14.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([r.__dict__ for r in reports], handle, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsched", description="kvsched: a native scheduling core for LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser(
        "allocator-replay",
        help="replay a workload through the block allocator and compare KV placement modes",
        description="Replays requests (arrive, prefill, decode, finish; preempt the newest when full) "
        "through kvsched's BlockAllocator in each placement mode and reports mean blocks per "
        "contiguous extent of live block tables, which sets how many copies a swap needs.",
    )
    replay.add_argument("--trace", help="Azure LLM inference trace CSV (default: built-in synthetic chat)")
    replay.add_argument("--num-requests", type=_positive_int, default=4000, help="requests to replay (default 4000)")
    replay.add_argument("--rate-scale", type=_positive_float, default=1.0, help="multiply the arrival rate")
    replay.add_argument("--num-blocks", type=_positive_int, default=8192)
    replay.add_argument("--block-size", type=_positive_int, default=16)
    replay.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload")
    replay.add_argument("--json", help="also write the results to this JSON file")
    replay.set_defaults(run=_allocator_replay)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TraceError, ValueError, OSError) as error:
        print(f"kvsched {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
