"""An OpenAI-compatible router in front of real engines: places each request, forwards it, fails over.

``kvsched route --engine URL --engine URL ...`` serves ``/v1/completions`` and
``/v1/chat/completions`` (plain and streamed), ``/v1/models``, ``/health`` and ``/router/stats``.
Each request is placed by a :class:`~kvsched.cluster.router.Router` (the dispatch policy over the
engines' loads, plus what it placed since the last poll) and forwarded as it came; the answer is
passed back as it streams. The loads are read from each engine's ``/metrics`` every
``load_period_s``: the kvsched adapter's gauges (``kvsched:*``: tokens running and queued, KV
capacity and predicted demand), or, from an engine without them, vLLM's own (requests running and
waiting, KV usage), which least_load and round_robin can use.

Failover. An engine that refuses the connection, answers 5xx, or breaks the connection is marked
down (until a later poll reaches it) and the request goes to another engine, from the start, as
long as nothing of the answer has reached the client: always for a plain request (its answer is
read whole first), and for a stream until its first byte. A stream broken after that ends with an
SSE error event naming the engine (a client cannot be handed a second, different start). When no
engine answers, the client gets HTTP 503 with the reasons. Every forwarded call has a timeout
between bytes (``read_timeout_s``), so a hung engine is a failed one, not a hung client.

Idle connections. The router keeps connections to each engine open between requests for at most
``KEEPALIVE_S`` seconds, under the 5 s after which uvicorn (``vllm serve``) closes an idle one. A
call whose connection the engine closed before answering anything (it was closing the idle
connection as the request went out) goes to the same engine once more, on a new connection, before
the engine counts as failed: a healthy engine is not marked down for closing an idle connection.

Glossary
  engine     one OpenAI-compatible server (``vllm serve`` with kvsched's adapter, or any other).
  prompt     estimated in tokens for placement: token-id prompts by their length, text by its
             UTF-8 bytes / 4 (the router has no tokenizer).
  expected   tokens a request will generate, for its predicted blocks: the median of the
             completions the router has seen (``usage``), capped by the request's ``max_tokens``.
  history    with ``prefix_affinity``: the prompt prefixes sent to each engine, the router's estimate
             of its prefix cache (kvsched.cluster.prefix_history); forgotten when the engine fails.

Needs aiohttp (``pip install 'kvsched[router]'``; vLLM installs it too).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .dispatch import Dispatcher, InstanceLoads
from .prefix_history import PrefixHistory, prompt_keys
from .router import Router

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)$")
_FORWARDED = ("/v1/completions", "/v1/chat/completions")
_RECENT_OUTPUTS = 256


def _aiohttp():
    try:
        import aiohttp
        from aiohttp import web
    except ImportError:
        raise ImportError("kvsched route needs aiohttp: pip install 'kvsched[router]'") from None
    return aiohttp, web


def parse_metrics(text: str) -> dict:
    """Prometheus text -> {name: sum over label sets} (an engine's data-parallel ranks add up)."""
    values: dict = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            try:
                value = float(match.group(2))
            except ValueError:
                continue
            if math.isfinite(value):
                values[match.group(1)] = values.get(match.group(1), 0.0) + value
    return values


def loads_from_metrics(metrics: list, default_block_size: int) -> InstanceLoads:
    """One entry per engine (None: not reached at the last poll, so not available)."""
    def column(name: str, fallback=lambda m: 0.0) -> np.ndarray:
        return np.array([int(m.get(name, fallback(m))) if m is not None else 0 for m in metrics], np.int64)

    block_size = next((int(m["kvsched:kv_block_size"]) for m in metrics if m and m.get("kvsched:kv_block_size")),
                      default_block_size)
    capacity = column("kvsched:kv_capacity_blocks")
    # Without kvsched's gauges (another scheduler): requests stand in for tokens, and KV usage for demand.
    load = column("kvsched:running_tokens", lambda m: m.get("vllm:num_requests_running", 0.0)
                  + m.get("vllm:num_requests_waiting", 0.0)) + column("kvsched:queued_tokens")
    demand = column("kvsched:kv_predicted_demand_blocks")
    return InstanceLoads(np.array([m is not None for m in metrics]), load, capacity - demand,
                         column("kvsched:kv_predicted_peak_blocks"), np.maximum(capacity, 1), block_size)


def prompt_tokens(path: str, body: dict) -> int:
    """The prompt's size in tokens, estimated (see the glossary)."""
    if path.endswith("/chat/completions"):
        text = "".join(str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))
        return max(1, len(text.encode()) // 4)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list):  # several prompts, text or token ids
        return sum(len(p) if isinstance(p, list) else max(1, len(str(p).encode()) // 4) for p in prompt)
    return max(1, len(str(prompt).encode()) // 4)


@dataclass
class EngineState:
    url: str
    up: bool = True
    metrics: Optional[dict] = None
    sent: int = 0  # requests forwarded (attempts)
    answered: int = 0
    failed: int = 0  # attempts that failed here
    last_error: str = ""


@dataclass
class RouterStats:
    requests: int = 0
    retried: int = 0  # requests sent again to another engine after a failure
    broken_streams: int = 0  # streams ended with an error event after their first byte
    unanswered: int = 0  # requests no engine answered (HTTP 503)
    reconnected: int = 0  # calls sent again to the same engine after it closed the connection unanswered
    polls: int = 0
    errors: list = field(default_factory=list)


class EngineFailed(Exception):
    """A forwarded call failed at ``engine``; ``stream``: the client's stream, when it has bytes of
    the answer already (it can then only be ended, not sent again); ``closed_unanswered``: the engine
    closed the connection before any answer (possibly an idle connection it was closing)."""

    def __init__(self, engine: int, reason: str, stream=None, closed_unanswered: bool = False):
        super().__init__(reason)
        self.engine, self.reason, self.stream = engine, reason, stream
        self.closed_unanswered = closed_unanswered


KEEPALIVE_S = 3.0  # idle connections to an engine: closed by the router before uvicorn's 5 s


class RouterServer:
    """The router (see the module docstring). ``run()`` serves until cancelled."""

    def __init__(self, engines: list, dispatch: str = "headroom", load_period_s: float = 1.0,
                 count_placed: bool = True, host: str = "127.0.0.1", port: int = 8000,
                 read_timeout_s: float = 120.0, connect_timeout_s: float = 5.0, block_size: int = 16,
                 imbalance_limit: float = 0.1):
        if not engines:
            raise ValueError("engines: give at least one engine URL")
        self.engines = [EngineState(url.rstrip("/")) for url in engines]
        self.router = Router(Dispatcher(dispatch, imbalance_limit), load_period_s, count_placed)
        # prefix_affinity: the engines' caches as the router can estimate them, from what it sent where.
        self.history = PrefixHistory(len(self.engines)) if self.router.dispatcher.uses_prefix_hits else None
        self.load_period_s = load_period_s
        self.host, self.port = host, port
        self.read_timeout_s, self.connect_timeout_s = read_timeout_s, connect_timeout_s
        self.block_size = block_size
        self.stats = RouterStats()
        self._outputs: deque = deque(maxlen=_RECENT_OUTPUTS)
        self._session = None

    # ---- loads ----
    async def poll(self) -> None:
        """Reads every engine's /metrics once; an engine not reached is down until it answers again."""
        aiohttp, _ = _aiohttp()

        async def one(engine: EngineState):
            try:
                async with self._session.get(engine.url + "/metrics",
                                             timeout=aiohttp.ClientTimeout(total=max(2.0, self.load_period_s))) as r:
                    if r.status != 200:
                        raise EngineFailed(0, f"/metrics answered HTTP {r.status}")
                    engine.metrics, engine.up = parse_metrics(await r.text()), True
            except asyncio.TimeoutError:  # busy, not gone: its last report stands
                engine.last_error = "/metrics: no answer within the poll's timeout (its last report kept)"
            except (aiohttp.ClientError, EngineFailed, OSError) as error:
                engine.metrics, engine.up = None, False
                engine.last_error = f"/metrics: {error!r}"

        await asyncio.gather(*(one(e) for e in self.engines))
        if self.history is not None:
            for i, engine in enumerate(self.engines):
                if not engine.up:
                    self.history.forget(i)  # gone, or back without its cache
                elif engine.metrics is not None:
                    self.history.set_capacity(i, engine.metrics.get("kvsched:kv_capacity_blocks"))
        loads = loads_from_metrics([e.metrics if e.up else None for e in self.engines], self.block_size)
        if self.history is not None and loads.block_size != self.block_size:
            self.history.forget_all()  # keys of another chunk size never match again
        self.block_size = loads.block_size  # the engines' own, once they publish it
        self.router.report(loads, time.monotonic())
        self.stats.polls += 1

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.load_period_s)
            await self.poll()

    def _place(self, path: str, body: dict, tried: set) -> Optional[int]:
        tokens = prompt_tokens(path, body)
        expected = int(np.median(self._outputs)) if self._outputs else 0
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(max_tokens, int) and max_tokens > 0:
            expected = min(expected, max_tokens)
        blocks = -(-(tokens + expected) // self.block_size)
        available = np.array([e.up and i not in tried for i, e in enumerate(self.engines)])
        if not available.any():
            return None
        keys = hits = None
        if self.history is not None:
            keys = prompt_keys(path, body, self.block_size)
            hits = self.history.hits(keys)[None, :]
        placed = self.router.place(time.monotonic(), None, available, np.array([tokens], np.int64),
                                   np.array([blocks], np.int64), hits)
        if placed is None or placed[0] < 0:  # no report yet, or held by a global queue: the first available
            index = int(np.flatnonzero(available)[0])
        else:
            index = int(placed[0])
        if keys is not None:
            self.history.record(index, keys)
        return index

    # ---- forwarding ----
    async def _forward(self, index: int, path: str, raw: bytes, headers: dict, body: dict, request):
        """Sends the request to engine ``index``: the plain answer (status, headers, bytes), or, for a
        stream, the StreamResponse it wrote to the client. Raises EngineFailed."""
        aiohttp, web = _aiohttp()
        engine = self.engines[index]
        engine.sent += 1
        timeout = aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s, sock_read=self.read_timeout_s)
        response = None
        answered = False
        try:
            async with self._session.post(engine.url + path, data=raw, headers=headers, timeout=timeout) as r:
                answered = True
                if r.status >= 500:
                    raise EngineFailed(index, f"HTTP {r.status}: {(await r.text())[:500]}")
                if not body.get("stream") or r.status != 200:
                    data = await r.read()
                    self._learn(data)
                    return r.status, r.headers.get("Content-Type", "application/json"), data
                response = web.StreamResponse(status=200, headers={"Content-Type": r.headers.get(
                    "Content-Type", "text/event-stream"), "Cache-Control": "no-cache"})
                async for chunk in r.content.iter_any():
                    if not await self._to_client(response, request, chunk):
                        return response  # the client hung up: leaving closes the engine's stream, which aborts it
                await self._to_client(response, request, b"", eof=True)
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            started = response is not None and response.prepared
            # A refused connection (ClientConnectorError) is a down engine; a connection closed or reset
            # before the status line may be an idle one the engine was closing.
            closed = (not answered and isinstance(error, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError))
                      and not isinstance(error, aiohttp.ClientConnectorError))
            raise EngineFailed(index, f"{type(error).__name__}: {error}", response if started else None,
                               closed_unanswered=closed) from None

    @staticmethod
    async def _to_client(response, request, chunk: bytes, eof: bool = False) -> bool:
        """Writes to the client; False when the client has gone (not the engine's failure)."""
        try:
            if not response.prepared:
                await response.prepare(request)
            if chunk:
                await response.write(chunk)
            if eof:
                await response.write_eof()
        except (ConnectionError, RuntimeError):
            return False
        return True

    def _learn(self, data: bytes) -> None:
        try:
            usage = json.loads(data).get("usage") or {}
        except (ValueError, AttributeError):
            return
        if isinstance(usage.get("completion_tokens"), int):
            self._outputs.append(usage["completion_tokens"])

    async def handle(self, request):
        _, web = _aiohttp()
        path = request.path
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            return web.json_response({"error": {"message": f"the body must be a JSON object: {error}",
                                                "type": "invalid_request_error"}}, status=400)
        self.stats.requests += 1
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("content-type", "authorization", "accept")}
        tried: set = set()
        reasons = []
        while True:
            index = self._place(path, body, tried)
            if index is None:
                break
            tried.add(index)
            if len(tried) > 1:
                self.stats.retried += 1
            try:
                try:
                    result = await self._forward(index, path, raw, headers, body, request)
                except EngineFailed as failure:
                    if not failure.closed_unanswered:
                        raise
                    self.stats.reconnected += 1  # once more, on a new connection (module docstring)
                    result = await self._forward(index, path, raw, headers, body, request)
            except EngineFailed as failure:
                engine = self.engines[index]
                engine.failed += 1
                engine.up = False  # until a poll reaches it again
                if self.history is not None:
                    self.history.forget(index)
                engine.last_error = failure.reason
                reasons.append(f"{engine.url}: {failure.reason}")
                if failure.stream is not None:  # the client has part of a stream: end it with an error event
                    self.stats.broken_streams += 1
                    event = {"error": {"message": f"the engine {engine.url} failed mid-stream ({failure.reason}); "
                                                  "the answer is incomplete", "type": "engine_failure"}}
                    try:
                        await failure.stream.write(f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode())
                        await failure.stream.write_eof()
                    except (ConnectionError, RuntimeError):
                        pass  # the client has gone too
                    return failure.stream
                continue
            self.engines[index].answered += 1
            if isinstance(result, tuple):
                status, content_type, data = result
                return web.Response(status=status, body=data, content_type=content_type.split(";")[0])
            return result
        self.stats.unanswered += 1
        self.stats.errors = (self.stats.errors + reasons)[-20:]
        return web.json_response({"error": {"message": "no engine answered: " + ("; ".join(reasons) or
                                                                                 "every engine is down"),
                                            "type": "service_unavailable"}}, status=503)

    async def models(self, request):
        _, web = _aiohttp()
        for engine in self.engines:
            if engine.up:
                try:
                    async with self._session.get(engine.url + "/v1/models") as r:
                        return web.Response(status=r.status, body=await r.read(), content_type="application/json")
                except OSError:
                    continue
        return web.json_response({"error": {"message": "every engine is down", "type": "service_unavailable"}},
                                 status=503)

    async def health(self, request):
        _, web = _aiohttp()
        up = sum(e.up for e in self.engines)
        return web.json_response({"engines_up": up}, status=200 if up else 503)

    def snapshot(self) -> dict:
        """What /router/stats answers: the router's counts and each engine's state."""
        return {**vars(self.stats), "engines": [vars(e) | {"metrics": None} for e in self.engines]}

    async def stats_page(self, request):
        _, web = _aiohttp()
        return web.json_response(self.snapshot())

    async def run(self, ready: Optional[asyncio.Event] = None) -> None:
        aiohttp, web = _aiohttp()
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S))
        app = web.Application(client_max_size=64 << 20)
        for path in _FORWARDED:
            app.router.add_post(path, self.handle)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/router/stats", self.stats_page)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            await self.poll()
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            poller = asyncio.ensure_future(self._poll_forever())
            if ready is not None:
                ready.set()
            try:
                await asyncio.Event().wait()
            finally:
                poller.cancel()
        finally:
            await runner.cleanup()
            await self._session.close()
