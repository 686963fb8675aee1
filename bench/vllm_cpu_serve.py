"""A real `vllm serve` with vLLM's scheduler against kvsched's adapter, answering a real client.

    python bench/vllm_cpu_serve.py [--pairs 3] [--requests 200] [--rate 8] [--out results.json]

bench/vllm_cpu_admission.py steps an engine by hand with every request there at t=0; this script
measures what a user of a server sees. Each configuration starts its own OpenAI-compatible server
(vllm-cpu 0.32, ``python -m vllm.entrypoints.openai.api_server``: an API server process and an
engine-core process, as ``vllm serve`` runs them) on the tiny float32 Llama of
tests/vllm_tiny_model.py with a small KV cache, and a client on 127.0.0.1 sends streamed
``/v1/completions`` requests at Poisson arrivals: prompts of random token ids, seeded sampling at
temperature 1 that ends at any of 20 stop ids or at max_tokens (lengths no scheduler can know; the
same workload as the stepped script, from the same --seed). Configurations alternate over --pairs
repetitions, each repetition starting at the next configuration.

Per run: the client's clock gives TTFT (first streamed token minus send), TPOT (a request's last
token minus its first, over its tokens minus one) and throughput (output tokens over first send to
last answer); the server's /metrics gives preemptions (``vllm:num_preemptions_total``, which the
adapter reports as vLLM's scheduler does) and successes. Outputs are compared token for token
(``return_token_ids``) with the first run: in float32 with per-request seeds they do not depend on
the schedule. A request that fails (an HTTP error, a broken stream, no finish reason) is counted and
reported, never dropped: a run's failures, and a run that failed as a whole, are in the table and
the JSON.

Needs vllm-cpu 0.32 with kvsched importable (see ../shared/DESIGN.md, "A real vLLM engine on CPU").
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from vllm_cpu_admission import (KVSCHED, add_workload_arguments, cell, config_names, kv_transfer_config,  # noqa: E402
                                pct, provenance, workload)

# name -> additional_config["kvsched"] (None: vLLM's own scheduler)
CONFIGS: dict[str, dict | None] = {
    "vllm": None,
    "kvsched": {},  # overflow_scenarios "auto" (the adapter's default)
    "kvsched risk 0": {"overflow_scenarios": 0},  # the default before 2026-12-04
}
START_TIMEOUT_S = 300
CALL_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_TARGET_DEVICE="cpu",
               VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the engine core in its own process, as a user's runs
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    return env


class Server:
    def __init__(self, model: Path, options: dict, kv: dict | None, log_path: Path, threads: int,
                 extra: list[str], prefix_caching: bool = False, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(self.port),
                   "--dtype", "float32", "--enforce-eager", "--seed", "0", "--gpu-memory-utilization", "0.1",
                   "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
        for name, value in options.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        command += extra
        if kv is not None:
            command += ["--scheduler-cls", KVSCHED, "--additional-config", json.dumps({"kvsched": kv})]
            if kv_transfer_config(kv) is not None:  # swap or the host tier: kvsched's KV connector
                command += ["--kv-transfer-config", json.dumps(kv_transfer_config(kv))]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**server_env(threads), **(env or {})}, start_new_session=True)

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"} if body is not None else {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode}:\n{self.tail()}")
            try:
                if self.call("GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"no healthy server within {START_TIMEOUT_S} s:\n{self.tail()}")

    def metric(self, name: str) -> float:
        """The sum of a counter's samples in /metrics (0 when absent)."""
        code, data = self.call("GET", "/metrics")
        if code != 200:
            raise RuntimeError(f"GET /metrics: HTTP {code}")
        total = 0.0
        for line in data.decode().splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) so far of each process of the server (its process group), by name:
        the API server, the engine core, the worker."""
        tick = os.sysconf("SC_CLK_TCK")
        found: dict[str, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == self.process.pid:  # fields[2]: the process group
                found[name] = found.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        return found

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # as Ctrl-C: the server drains and exits
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        return self.process.returncode


def one_request(server: Server, body: dict, send_at: float, t0: float, record: dict) -> None:
    """Sends one streamed completion at ``send_at`` (seconds after t0) and records its token times."""
    time.sleep(max(0.0, t0 + send_at - time.perf_counter()))
    sent = time.perf_counter()
    record.update(sent=sent - t0, tokens=[], times=[], error=None)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=CALL_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            record["error"] = f"HTTP {response.status}: {response.read()[:300]!r}"
            return
        finish = None
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", ()):
                ids = choice.get("token_ids") or []
                if ids:
                    record["tokens"] += ids
                    record["times"].append((time.perf_counter() - t0, len(record["tokens"])))
                finish = choice.get("finish_reason") or finish
        record["finish_reason"] = finish
        if not record["tokens"] or finish is None:
            record["error"] = f"stream ended with {len(record['tokens'])} tokens, finish_reason {finish}"
    except (OSError, http.client.HTTPException, ValueError) as e:
        record["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def run_client(server: Server, work: dict, arrivals: list[float]) -> tuple[list[dict], float]:
    records: list[dict] = [{} for _ in arrivals]
    t0 = time.perf_counter() + 0.5
    threads = []
    for i, (prompt, seed, at) in enumerate(zip(work["prompts"], work["seeds"], arrivals)):
        body = dict(model="tiny", prompt=prompt, max_tokens=work["max_tokens"], temperature=1.0, seed=seed,
                    stop_token_ids=work["stop_token_ids"], stream=True, return_token_ids=True)
        thread = threading.Thread(target=one_request, args=(server, body, at, t0, records[i]), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(CALL_TIMEOUT_S + 60)
    return records, t0


def summarize(records: list[dict], preemptions: float, successes: float) -> dict:
    ok = [r for r in records if r.get("error") is None and r.get("tokens")]
    ttft = [r["times"][0][0] - r["sent"] for r in ok]
    # From the first streamed chunk to the last, over the tokens after the first chunk (a chunk may
    # carry several tokens when the client falls behind).
    tpot = [(r["times"][-1][0] - r["times"][0][0]) / (len(r["tokens"]) - r["times"][0][1])
            for r in ok if len(r["tokens"]) > r["times"][0][1]]
    end = max((r["times"][-1][0] for r in ok), default=0.0)
    begin = min((r["sent"] for r in records if "sent" in r), default=0.0)
    out_tokens = sum(len(r["tokens"]) for r in ok)
    return dict(requests=len(records), failed=len(records) - len(ok),
                errors=sorted({str(r.get("error")) for r in records if r.get("error")})[:5],
                preemptions=int(preemptions), successes=int(successes), output_tokens=out_tokens,
                seconds=end - begin, tokens_per_s=out_tokens / (end - begin) if end > begin else 0.0,
                ttft_mean_ms=1e3 * statistics.fmean(ttft) if ttft else None,
                ttft_p50_ms=1e3 * pct(ttft, 50) if ttft else None, ttft_p99_ms=1e3 * pct(ttft, 99) if ttft else None,
                tpot_mean_ms=1e3 * statistics.fmean(tpot) if tpot else None,
                tpot_p99_ms=1e3 * pct(tpot, 99) if tpot else None)


COLUMNS = (("preemptions", "preempt", "{:.0f}"), ("failed", "failed", "{:.0f}"), ("tokens_per_s", "out tok/s", "{:.0f}"),
           ("ttft_mean_ms", "TTFT mean ms", "{:.0f}"), ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
           ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"), ("tpot_mean_ms", "TPOT mean ms", "{:.1f}"),
           ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"))


def _cell(values: list, fmt: str) -> str:
    known = [v for v in values if v is not None]
    return cell(known, fmt) if known else "-"


def table(runs: dict[str, list[dict]]) -> str:
    lines = ["| config | " + " | ".join(title for _, title, _ in COLUMNS) + " | outputs differ |",
             "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, rs in runs.items():
        if rs:
            mismatches = [r["mismatches"] for r in rs if r["mismatches"] is not None]
            lines.append(f"| {name} | " + " | ".join(_cell([r[key] for r in rs], fmt) for key, _, fmt in COLUMNS)
                         + f" | {max(mismatches) if mismatches else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="repetitions of every configuration (alternated)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals, requests per second")
    add_workload_arguments(parser, CONFIGS)  # --seed (also the arrivals'), the engine's options, --configs
    parser.add_argument("--threads", type=int, default=1, help="the engine's torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--server-args", default="", help="more arguments for every server, e.g. '--no-async-scheduling'")
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    args = parser.parse_args()

    began = time.monotonic()
    names = config_names(parser, args, CONFIGS)

    tmp = Path(tempfile.mkdtemp(prefix="kvsched-vllm-serve-"))
    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp / "tiny-llama")
    work = workload(args)
    rng = random.Random(args.seed + 1)
    arrivals, t = [], 0.0
    for _ in work["prompts"]:
        arrivals.append(t)
        t += rng.expovariate(args.rate)
    options = dict(block_size=args.block_size, num_gpu_blocks_override=args.num_blocks,
                   max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.budget)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    failures: list[dict] = []
    reference = reference_name = None
    for pair in range(args.pairs):
        for name in names[pair % len(names):] + names[:pair % len(names)]:
            log_path = tmp / f"{name.replace(' ', '_')}-{pair}.log"
            server = Server(model, options, CONFIGS[name], log_path, args.threads, shlex.split(args.server_args))
            try:
                server.wait_healthy()
                cpu_before = server.cpu_seconds()
                records, _ = run_client(server, work, arrivals)
                cpu = {k: v - cpu_before.get(k, 0.0) for k, v in server.cpu_seconds().items()}
                preemptions = server.metric("vllm:num_preemptions_total")
                successes = server.metric("vllm:request_success_total")
                steps = server.metric("vllm:iteration_tokens_total_count")
            except Exception as e:  # a run that fails is reported with the server's log, never dropped
                failures.append(dict(config=name, pair=pair, error=str(e)[:3000], log=server.tail()))
                print(f"[{pair}] {name}: FAILED: {e}", file=sys.stderr, flush=True)
                continue
            finally:
                exit_code = server.stop()
            s = summarize(records, preemptions, successes)
            tokens = [r.get("tokens") for r in records]
            if reference is None and not s["failed"]:
                reference, reference_name = tokens, f"{name} (pair {pair})"
            s.update(pair=pair, exit_code=exit_code, engine_steps=int(steps), cpu_seconds=cpu,
                     mismatches=sum(a != b for a, b in zip(tokens, reference)) if reference else None)
            runs[name].append(s)
            print(f"[{pair}] {name}: {s['tokens_per_s']:.0f} tok/s, TTFT mean {s['ttft_mean_ms'] or 0:.0f} ms, "
                  f"TPOT p99 {s['tpot_p99_ms'] or 0:.1f} ms, {s['preemptions']} preemptions, {s['failed']} failed, "
                  f"{s['mismatches']} outputs differ, server exit {exit_code}, {s['engine_steps']} steps, CPU s "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items())), file=sys.stderr, flush=True)

    out_lens = [len(t) for t in reference] if reference else [0]
    total = time.monotonic() - began
    if args.out:  # first: whatever the summary below makes of the runs, they are kept
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(
            command=shlex.join(["python", "bench/vllm_cpu_serve.py"] + sys.argv[1:]), seconds=round(total),
            options={k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
            workload=dict(requests=args.requests, rate=args.rate, output_tokens=sum(out_lens),
                          stop_token_ids=work["stop_token_ids"]),
            server=options, configs={n: CONFIGS[n] for n in names}, reference=reference_name, kvsched=provenance(),
            runs=runs, failures=failures), indent=1) + "\n")
    print(f"\n{args.requests} requests at {args.rate} req/s (Poisson), prompts {sum(map(len, work['prompts']))} "
          f"tokens ({args.prompt_len[0]}-{args.prompt_len[1]}), outputs {sum(out_lens)} tokens (mean "
          f"{statistics.fmean(out_lens):.0f}), KV {args.num_blocks} x {args.block_size} = "
          f"{args.num_blocks * args.block_size} tokens, max_num_seqs {args.max_num_seqs}; {args.pairs} alternated "
          "pairs; medians (range)\n")
    print(table(runs))
    if failures:
        print(f"{len(failures)} run(s) failed: " + ", ".join(f"{f['config']} (pair {f['pair']})" for f in failures))
    print(f"\n{total:.0f} s in all")

if __name__ == "__main__":
    main()
