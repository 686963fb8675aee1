"""Multi-turn chat through a real `vllm serve`: kvsched's host tier of the prefix cache against none.

    python bench/vllm_cpu_chat.py [--pairs 2] [--conversations 24] [--turns 4] [--out results.json]

Each configuration starts its own OpenAI-compatible server (vllm-cpu 0.32, the tiny float32 Llama of
tests/vllm_tiny_model.py, prefix caching on, a KV cache far smaller than the conversations) and a
client replays conversations: conversation c starts at a Poisson arrival, and each of its turns
sends the previous turn's prompt, the answer (token ids, ``return_token_ids``) and a new message of
random tokens, after a think time (exponential, --think-s mean) from the previous answer. The other
conversations run meanwhile, so a conversation's KV is evicted from the device between its turns.
Greedy decoding with a seeded length per turn: every configuration serves the very same tokens (the
outputs are compared).

Per run: TTFT of first turns and of later turns (the client's clock: first streamed token minus
send), the share of later turns' prompt tokens served from cache (vLLM's
``vllm:prefix_cache_hits_total`` over queries: the adapter counts a request's device and host hits
alike), the prompt tokens prefilled (queries minus hits: earlier turns' tokens computed again, and
each turn's new ones), and of the cached ones those the host tier loaded by copy (``kvsched:host_hit_blocks``, a gauge of the engine
core, on /metrics through PROMETHEUS_MULTIPROC_DIR), preemptions, failures.

Needs vllm-cpu 0.32 with kvsched importable (see ../shared/DESIGN.md, "A real vLLM engine on CPU").
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from vllm_cpu_admission import cell, config_names, pct, provenance  # noqa: E402
from vllm_cpu_serve import CALL_TIMEOUT_S, Server, one_request  # noqa: E402

# name -> additional_config["kvsched"] (None: vLLM's own scheduler)
CONFIGS: dict[str, dict | None] = {
    "vllm": None,
    "kvsched": {},
    "kvsched host tier": {"host_prefix_cache": True, "host_kv_gib": 0.25},
    "kvsched host tier + swap": {"host_prefix_cache": True, "preemption": "swap", "host_kv_gib": 0.25},
    # The prefill of a request whose prefix comes back by copy starts a step later (the copy would
    # overlap that step's forward pass where copies run during it; here they run before it).
    "kvsched host tier, prefetch": {"host_prefix_cache": True, "host_kv_gib": 0.25, "host_cache_load": "prefetch"},
}


def conversations(args) -> list[dict]:
    """Each conversation's start, first prompt, messages, answer lengths and think times: a function of
    --seed alone (answers come from the model)."""
    from vllm_tiny_model import VOCAB

    rng = random.Random(args.seed)
    out, start = [], 0.0
    for _ in range(args.conversations):
        tokens = lambda lo, hi: [rng.randrange(4, VOCAB) for _ in range(rng.randint(lo, hi))]  # noqa: E731
        out.append(dict(start=start, prompt=tokens(*args.first_prompt),
                        messages=[tokens(*args.message) for _ in range(args.turns - 1)],
                        max_tokens=[rng.randint(*args.answer) for _ in range(args.turns)],
                        think=[rng.expovariate(1 / args.think_s) for _ in range(args.turns - 1)]))
        start += rng.expovariate(args.rate)
    return out


def converse(server: Server, chat: dict, t0: float, records: list[dict]) -> None:
    history, at = list(chat["prompt"]), chat["start"]
    for turn, max_tokens in enumerate(chat["max_tokens"]):
        record = dict(turn=turn, prompt_tokens=len(history))
        body = dict(model="tiny", prompt=history, max_tokens=max_tokens, temperature=0.0, stream=True,
                    return_token_ids=True)
        one_request(server, body, at, t0, record)
        records.append(record)
        if record.get("error") is not None:
            return  # the rest of the conversation cannot be sent: counted as failed turns below
        if turn < len(chat["messages"]):  # the next turn: this prompt, its answer and a new message
            history = history + record["tokens"] + chat["messages"][turn]
            at = record["times"][-1][0] + chat["think"][turn]


def run_client(server: Server, chats: list[dict]) -> list[list[dict]]:
    records: list[list[dict]] = [[] for _ in chats]
    t0 = time.perf_counter() + 0.5
    threads = [threading.Thread(target=converse, args=(server, chat, t0, records[i]), daemon=True)
               for i, chat in enumerate(chats)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(len(chats[0]["max_tokens"]) * (CALL_TIMEOUT_S + 60))
    return records


def summarize(records: list[list[dict]], turns: int, metrics: dict) -> dict:
    flat = [r for conv in records for r in conv]
    ok = [r for r in flat if r.get("error") is None and r.get("tokens")]
    first = [r["times"][0][0] - r["sent"] for r in ok if r["turn"] == 0]
    later = [r["times"][0][0] - r["sent"] for r in ok if r["turn"] > 0]
    later_prompt = sum(r["prompt_tokens"] for r in ok if r["turn"] > 0)
    return dict(turns=len(records) * turns, failed=len(records) * turns - len(ok),
                errors=sorted({str(r.get("error")) for r in flat if r.get("error")})[:5],
                ttft_first_mean_ms=1e3 * statistics.fmean(first) if first else None,
                ttft_later_mean_ms=1e3 * statistics.fmean(later) if later else None,
                ttft_later_p50_ms=1e3 * pct(later, 50) if later else None,
                ttft_later_p99_ms=1e3 * pct(later, 99) if later else None,
                later_prompt_tokens=later_prompt,
                cached_share=metrics["hits"] / metrics["queries"] if metrics["queries"] else None,
                # Prompt tokens prefilled when each turn was first scheduled: what the tier saves is
                # earlier turns' tokens computed again (a preemption's recompute comes on top: preempt).
                prefilled_tokens=int(metrics["queries"] - metrics["hits"]),
                host_loaded_tokens=metrics["host_hit_blocks"] * metrics["block_size"],
                host_share_of_later=metrics["host_hit_blocks"] * metrics["block_size"] / later_prompt
                if later_prompt else None,
                preemptions=int(metrics["preemptions"]), swap_preemptions=int(metrics["swap_preemptions"]))


COLUMNS = (("failed", "failed", "{:.0f}"), ("preemptions", "preempt", "{:.0f}"),
           ("swap_preemptions", "by swap", "{:.0f}"), ("cached_share", "prompt cached", "{:.0%}"),
           ("prefilled_tokens", "prompt tokens prefilled", "{:,.0f}"),
           ("host_share_of_later", "later turns by host copy", "{:.0%}"),
           ("ttft_first_mean_ms", "TTFT turn 1 ms", "{:.0f}"), ("ttft_later_mean_ms", "TTFT later mean ms", "{:.0f}"),
           ("ttft_later_p50_ms", "p50", "{:.0f}"), ("ttft_later_p99_ms", "p99", "{:.0f}"))


def table(runs: dict[str, list[dict]]) -> str:
    lines = ["| config | " + " | ".join(t for _, t, _ in COLUMNS) + " | outputs differ |",
             "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, rs in runs.items():
        if not rs:
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            known = [r[key] for r in rs if r[key] is not None]
            cells.append(cell(known, fmt) if known else "-")
        mismatches = [r["mismatches"] for r in rs if r["mismatches"] is not None]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {max(mismatches) if mismatches else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2, help="repetitions of every configuration (alternated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2.0, help="conversation starts per second (Poisson)")
    parser.add_argument("--think-s", type=float, default=1.0, help="mean think time between an answer and the next turn")
    parser.add_argument("--first-prompt", type=int, nargs=2, default=(100, 250), metavar=("MIN", "MAX"))
    parser.add_argument("--message", type=int, nargs=2, default=(20, 60), metavar=("MIN", "MAX"))
    parser.add_argument("--answer", type=int, nargs=2, default=(16, 48), metavar=("MIN", "MAX"))
    parser.add_argument("--num-blocks", type=int, default=60, help="KV cache blocks (num_gpu_blocks_override)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="the engine's torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME")
    parser.add_argument("--add-config", action="append", default=[], metavar="NAME=JSON",
                        help="another kvsched configuration (its additional_config['kvsched']); may be repeated")
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    args = parser.parse_args()
    began = time.monotonic()
    names = config_names(parser, args, CONFIGS)
    longest = args.first_prompt[1] + (args.turns - 1) * (args.message[1] + args.answer[1]) + args.answer[1]
    if longest > args.max_model_len:
        parser.error(f"--max-model-len {args.max_model_len}: a conversation may reach {longest} tokens")

    tmp = Path(tempfile.mkdtemp(prefix="kvsched-vllm-chat-"))
    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp / "tiny-llama")
    chats = conversations(args)
    # The budget above the whole KV cache: no prefill is chunked (as in the other vllm-cpu scripts).
    options = dict(block_size=args.block_size, num_gpu_blocks_override=args.num_blocks,
                   max_model_len=args.max_model_len, max_num_batched_tokens=max(2048, args.max_model_len))
    runs: dict[str, list[dict]] = {name: [] for name in names}
    failures: list[dict] = []
    reference = reference_name = None
    for pair in range(args.pairs):
        for name in names[pair % len(names):] + names[:pair % len(names)]:
            metrics_dir = tmp / f"prometheus-{name.replace(' ', '_')}-{pair}"
            metrics_dir.mkdir()  # the engine core's kvsched gauges reach /metrics through it
            log_path = tmp / f"{name.replace(' ', '_')}-{pair}.log"
            server = Server(model, options, CONFIGS[name], log_path, args.threads, [], prefix_caching=True,
                            env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
            try:
                server.wait_healthy()
                records = run_client(server, chats)
                metrics = dict(hits=server.metric("vllm:prefix_cache_hits_total"),
                               queries=server.metric("vllm:prefix_cache_queries_total"),
                               preemptions=server.metric("vllm:num_preemptions_total"),
                               swap_preemptions=server.metric("kvsched:swap_preemptions"),
                               host_hit_blocks=server.metric("kvsched:host_hit_blocks"), block_size=args.block_size)
            except Exception as e:  # a run that fails is reported with the server's log, never dropped
                failures.append(dict(config=name, pair=pair, error=str(e)[:3000], log=server.tail()))
                print(f"[{pair}] {name}: FAILED: {e}", file=sys.stderr, flush=True)
                continue
            finally:
                exit_code = server.stop()
            s = summarize(records, args.turns, metrics)
            tokens = [[r.get("tokens") for r in conv] for conv in records]
            if reference is None and not s["failed"]:
                reference, reference_name = tokens, f"{name} (pair {pair})"
            s.update(pair=pair, exit_code=exit_code,
                     mismatches=sum(a != b for a, b in zip(tokens, reference)) if reference else None)
            runs[name].append(s)
            print(f"[{pair}] {name}: " + ", ".join(f"{k} {v}" for k, v in s.items() if k != "errors"),
                  file=sys.stderr, flush=True)

    total = time.monotonic() - began
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(
            command=shlex.join(["python", "bench/vllm_cpu_chat.py"] + sys.argv[1:]), seconds=round(total),
            options={k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
            server=options, configs={n: CONFIGS[n] for n in names}, reference=reference_name, kvsched=provenance(),
            runs=runs, failures=failures), indent=1) + "\n")
    print(f"\n{args.conversations} conversations of {args.turns} turns (starts {args.rate}/s, think {args.think_s} s), "
          f"KV {args.num_blocks} x {args.block_size} = {args.num_blocks * args.block_size} tokens; {args.pairs} "
          "alternated pairs; medians (range)\n")
    print(table(runs))
    if failures:
        print(f"{len(failures)} run(s) failed: " + ", ".join(f"{f['config']} (pair {f['pair']})" for f in failures))
    print(f"\n{total:.0f} s in all")


if __name__ == "__main__":
    main()
