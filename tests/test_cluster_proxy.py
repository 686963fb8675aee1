"""`kvsched route` (kvsched.cluster.proxy) against fake OpenAI-compatible engines on 127.0.0.1.

Each fake engine serves /metrics (kvsched's load gauges, set by the test) and /v1/completions, and
can be told to fail: refuse the completion (break the connection before answering) or break a
stream after its first chunks. The real engines are in tests/test_vllm_fleet.py.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the router needs aiohttp (pip install 'kvsched[router]')")
from aiohttp import web  # noqa: E402

from kvsched.cluster.proxy import RouterServer, loads_from_metrics, parse_metrics, prompt_tokens  # noqa: E402

CALL_TIMEOUT_S = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeEngine:
    """An engine whose load and failures the test sets. ``mode``: ok, refuse, break_stream."""

    def __init__(self, running_tokens: int = 0, demand_blocks: int = 0):
        self.port = free_port()
        self.running_tokens, self.demand_blocks = running_tokens, demand_blocks
        self.mode = "ok"
        self.answered = 0

    async def metrics(self, request):
        return web.Response(text=(
            f'kvsched:kv_capacity_blocks{{engine="0"}} 1000\n'
            f'kvsched:kv_predicted_demand_blocks{{engine="0"}} {self.demand_blocks}\n'
            f'kvsched:kv_predicted_peak_blocks{{engine="0"}} {self.demand_blocks}\n'
            f'kvsched:running_tokens{{engine="0"}} {self.running_tokens}\n'
            f'kvsched:queued_tokens{{engine="0"}} 0\nkvsched:kv_block_size{{engine="0"}} 16\n'))

    async def completions(self, request):
        body = await request.json()
        if self.mode in ("refuse", "close_once"):
            if self.mode == "close_once":  # as an engine closing an idle keep-alive connection would
                self.mode = "ok"
            request.transport.close()  # the connection breaks before any answer
            await asyncio.sleep(1)
            return web.Response()
        self.answered += 1
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": f"from {self.port}"}], "usage": {"completion_tokens": 7}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(4):
            await response.write(f'data: {json.dumps({"choices": [{"text": str(i)}]})}\n\n'.encode())
            await asyncio.sleep(0.05)
            if self.mode == "break_stream" and i == 1:
                request.transport.close()
                return response
        await response.write(b"data: [DONE]\n\n")
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Loop:
    """An event loop on a thread, for the fake engines and the router."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = CALL_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start_router(self, engines, **options) -> RouterServer:
        router = RouterServer([e.url for e in engines], port=free_port(), **options)
        ready = asyncio.Event()

        async def start():
            self.router_task = asyncio.ensure_future(router.run(ready))
            await asyncio.wait_for(ready.wait(), CALL_TIMEOUT_S)

        self.run(start())
        return router

    def close(self):
        async def cancel():
            task = getattr(self, "router_task", None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        self.run(cancel())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def loop():
    each = Loop()
    yield each
    each.close()


def post(router: RouterServer, body: dict, path: str = "/v1/completions") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=CALL_TIMEOUT_S)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def engines(loop: Loop, *loads) -> list:
    made = [FakeEngine(*load) for load in loads]
    for engine in made:
        loop.run(engine.start())
    return made


def test_requests_go_where_the_polled_loads_say(loop):
    busy, idle = engines(loop, (5000, 900), (0, 0))
    router = loop.start_router([busy, idle], dispatch="headroom", load_period_s=30)
    for _ in range(5):
        status, data = post(router, {"model": "m", "prompt": [1, 2, 3], "max_tokens": 8})
        assert status == 200 and json.loads(data)["choices"][0]["text"] == f"from {idle.port}"
    # Counting what it placed since the poll, the router would in time turn to the busy one; five
    # small requests do not close a gap of 900 blocks.
    assert idle.answered == 5 and busy.answered == 0


def test_a_request_an_engine_drops_is_answered_by_another(loop):
    dropping, good = engines(loop, (0, 0), (100, 10))
    dropping.mode = "refuse"
    router = loop.start_router([dropping, good], dispatch="least_load", load_period_s=30)
    status, data = post(router, {"model": "m", "prompt": "hello", "max_tokens": 8})
    assert status == 200 and json.loads(data)["choices"][0]["text"] == f"from {good.port}"
    assert router.stats.retried == 1 and not router.engines[0].up  # down until a poll reaches it
    assert router.stats.reconnected == 1  # refused twice: once more on a new connection, then given up
    status, _ = post(router, {"model": "m", "prompt": "again", "stream": True})
    assert status == 200 and router.stats.retried == 1  # the next goes straight to the good one


def test_a_connection_closed_unanswered_goes_once_more_to_the_same_engine(loop):
    """An engine that closes a connection before answering (it was closing an idle one) gets the
    request again on a new connection; it is not marked down and no other engine is tried."""
    closing, other = engines(loop, (0, 0), (100, 10))
    closing.mode = "close_once"
    router = loop.start_router([closing, other], dispatch="least_load", load_period_s=30)
    status, data = post(router, {"model": "m", "prompt": "hello", "max_tokens": 8})
    assert status == 200 and json.loads(data)["choices"][0]["text"] == f"from {closing.port}"
    assert router.stats.reconnected == 1 and router.stats.retried == 0 and router.engines[0].up
    assert other.answered == 0


def test_a_stream_broken_after_its_first_bytes_ends_with_an_error_event(loop):
    (breaking,) = engines(loop, (0, 0))
    breaking.mode = "break_stream"
    router = loop.start_router([breaking], load_period_s=30)
    status, data = post(router, {"model": "m", "prompt": "hi", "stream": True})
    text = data.decode()
    assert status == 200 and '"text": "0"' in text  # what the client had already
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["type"] == "engine_failure" and breaking.url in events[-1]["error"]["message"]
    assert text.rstrip().endswith("data: [DONE]") and router.stats.broken_streams == 1


def test_no_engine_answering_is_a_503_naming_each_failure(loop):
    first, second = engines(loop, (0, 0), (0, 0))
    first.mode = second.mode = "refuse"
    router = loop.start_router([first, second], load_period_s=30)
    status, data = post(router, {"model": "m", "prompt": "hi"})
    error = json.loads(data)["error"]
    assert status == 503 and error["type"] == "service_unavailable"
    assert first.url in error["message"] and second.url in error["message"]
    assert router.stats.unanswered == 1


def test_an_engine_down_at_start_is_left_out_until_it_answers_a_poll(loop):
    (good,) = engines(loop, (0, 0))
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    router = RouterServer([gone, good.url], port=free_port(), load_period_s=0.2)
    ready = asyncio.Event()

    async def start():
        loop.router_task = asyncio.ensure_future(router.run(ready))
        await asyncio.wait_for(ready.wait(), CALL_TIMEOUT_S)

    loop.run(start())
    assert [e.up for e in router.engines] == [False, True]
    for _ in range(3):
        assert post(router, {"model": "m", "prompt": [5] * 10})[0] == 200
    assert good.answered == 3 and router.stats.retried == 0


def test_a_client_that_hangs_up_mid_stream_does_not_take_the_engine_down(loop):
    (engine,) = engines(loop, (0, 0))
    router = loop.start_router([engine], load_period_s=30)
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=CALL_TIMEOUT_S)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "m", "prompt": "x", "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.readline()
    conn.close()
    time.sleep(0.5)
    assert router.engines[0].up and router.engines[0].failed == 0
    assert post(router, {"model": "m", "prompt": "y"})[0] == 200


def test_loads_and_prompt_sizes_are_read_as_documented():
    metrics = parse_metrics('kvsched:running_tokens{engine="0"} 10\nkvsched:running_tokens{engine="1"} 5\n'
                            "vllm:num_requests_waiting 3\nbad line\nkvsched:queued_tokens NaN\n")
    assert metrics == {"kvsched:running_tokens": 15.0, "vllm:num_requests_waiting": 3.0}
    loads = loads_from_metrics([metrics, None, {"vllm:num_requests_running": 2.0}], 16)
    assert loads.available.tolist() == [True, False, True]
    assert loads.load_tokens.tolist() == [15, 0, 2]  # vLLM's request counts stand in without kvsched's gauges
    assert prompt_tokens("/v1/completions", {"prompt": [1, 2, 3]}) == 3
    assert prompt_tokens("/v1/completions", {"prompt": "abcdefgh"}) == 2
    assert prompt_tokens("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 40}]}) == 10


def test_prefix_affinity_keeps_a_conversation_on_the_engine_that_has_its_prefix(loop):
    """Two idle engines; conversations of several turns, each turn the last one's prompt and more:
    under prefix_affinity every turn of a conversation goes where its first went, and the
    conversations still spread over both engines (the imbalance limit). Chat requests, by text.
    (Under least_load the first conversation's second turn moves.)"""
    first, second = engines(loop, (0, 0), (0, 0))
    router = loop.start_router([first, second], dispatch="prefix_affinity", load_period_s=30)
    where = {}
    for turn in range(3):
        for c in range(5):  # an odd count: load alone would move them from turn to turn
            messages = [{"role": "user", "content": f"conversation {c}: " + "lorem ipsum " * (30 + 10 * c)}]
            for t in range(turn):
                messages += [{"role": "assistant", "content": f"answer {t} " * 20},
                             {"role": "user", "content": f"question {t} " * 20}]
            before = (first.answered, second.answered)
            status, _ = post(router, {"model": "m", "messages": messages, "max_tokens": 8}, "/v1/chat/completions")
            assert status == 200
            engine = 0 if first.answered > before[0] else 1
            assert where.setdefault(c, engine) == engine, f"conversation {c} turn {turn} moved"
    assert set(where.values()) == {0, 1}, where  # both engines hold conversations


def test_prefix_history_keys_hits_and_forgetting():
    from kvsched.cluster.prefix_history import PrefixHistory, prompt_keys

    ids = list(range(100, 164))  # four blocks of 16 token ids
    keys = prompt_keys("/v1/completions", {"prompt": ids}, 16)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert prompt_keys("/v1/completions", {"prompt": ids + [1] * 15}, 16) == keys  # a partial block adds none
    assert prompt_keys("/v1/completions", {"prompt": [7] + ids[1:]}, 16)[1:] != keys[1:]  # keys chain
    text = prompt_keys("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 200}]}, 16)
    assert len(text) == 3  # 64 characters a chunk
    history = PrefixHistory(2)
    history.record(1, keys[:3])
    assert history.hits(keys).tolist() == [0, 3]
    history.set_capacity(1, 2)  # remembers two keys: the prefix's head, forgotten last (as a cache does)
    assert history.hits(keys).tolist() == [0, 2]
    other = prompt_keys("/v1/completions", {"prompt": list(range(500, 564))}, 16)
    history.record(1, other)  # another prompt pushes the first out whole, tail first
    assert history.hits(keys).tolist() == [0, 0] and history.hits(other).tolist() == [0, 2]
    # A prompt this cannot read has no keys (placed by load; the engine answers it), never an error.
    assert prompt_keys("/v1/completions", {"prompt": [2 ** 64]}, 16) == []
    assert prompt_keys("/v1/completions", {"prompt": [[1, [2]]]}, 16) == []
    history.record(0, keys)
    history.forget(0)
    assert history.hits(keys).tolist() == [0, 0]
