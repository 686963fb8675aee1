"""A real fleet on Ray: each engine server in a Ray actor, kvsched's router in another.

Glossary
  engine server  one process serving the OpenAI API on a port, publishing its load on /metrics:
                 ``vllm serve`` with kvsched's scheduler (``--scheduler-cls``), or any other server.
                 Given as a command line; ``{host}`` and ``{port}`` in it are filled in on the node.
  EngineServer   the actor that owns one engine server on its node, leashed to it
                 (kvsched.cluster.leash): when the actor dies (``ray.kill``, its node lost) the server's
                 whole process group dies with it, so a killed engine is gone, never half-alive.
  RouterActor    the actor that runs kvsched's router (kvsched.cluster.proxy.RouterServer) over the
                 engines' URLs: placement from their published load, forwarding, failover.
  RayFleet       starts the engines, waits until each answers /health, starts the router, and kills
                 or stops them.

Why actors rather than Ray Serve deployments: Serve puts its own HTTP proxy and request router
(power of two choices on queue length) in front of its replicas. kvsched's router is that layer: it
places by the engines' KV load as their /metrics publish it, and it fails over per engine. Actors
give what a fleet needs of Ray, namely placement (``num_gpus`` per engine, any node), the handles to
kill or restart an engine, and nothing between the router and the engines.

This module imports no engine: the engine is its command line. Needs the ``ray`` and ``router``
extras (``pip install 'kvsched[ray,router]'``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

from .ray import _ray

HEALTH_POLL_S = 0.5
START_SLACK_S = 120.0  # for Ray to place and start an actor, beyond an engine's own health wait
PORT_RETRIES = 3  # starts on another free port when the one chosen was taken meanwhile


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _node_address() -> str:
    return _ray().util.get_node_ip_address()


class EngineServer:
    """One engine server, started by the actor's constructor (see the module docstring).

    ``command``: the server's command line, ``{host}`` and ``{port}`` filled in (``port`` 0: a free
    one on this node; ``host`` None: this node's address). ``env``: added to the actor's environment.
    ``log_path``: where the server's output goes (None: discarded)."""

    def __init__(self, command: Sequence[str], host: Optional[str] = None, port: int = 0,
                 env: Optional[dict] = None, log_path: Optional[str] = None):
        if not command:
            raise ValueError("command: give the engine server's command line")
        self._bind = host or _node_address()
        # Where others reach it: this node's address when it binds every interface.
        self.host = _node_address() if self._bind in ("0.0.0.0", "::") else self._bind
        self._command, self._env = list(command), env
        # A port this actor chose may be taken by another process before the server binds it (two
        # engines started at once on one node): the server is then started again on another.
        self._port_retries = 0 if port else PORT_RETRIES
        self.port = port or _free_port(self._bind)
        self.log_path = log_path
        self._launch()

    def _launch(self) -> None:
        args = [part.replace("{host}", self._bind).replace("{port}", str(self.port)) for part in self._command]
        with open(self.log_path or os.devnull, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "kvsched.cluster.leash", "--parent",
                                             str(os.getpid()), "--", *args],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **(self._env or {})},
                                            # out of the actor's process group: Ray kills a worker's
                                            # group, and the leash must outlive the actor to act
                                            start_new_session=True)

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def pid(self) -> int:
        """The leash's process id (the server's group is its child's)."""
        return self.process.pid

    def returncode(self) -> Optional[int]:
        return self.process.poll()

    def wait_healthy(self, timeout_s: float = 300.0) -> str:
        """Blocks until the server answers /health with 200; returns its URL. RuntimeError (with the
        end of its log) when it exits first or does not answer within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self._port_retries and self._port_taken():
                    self._port_retries -= 1
                    self.port = _free_port(self._bind)
                    self._launch()
                    continue
                raise RuntimeError(f"engine server {self.url()} exited with {self.process.returncode}"
                                   f"{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url() + "/health", timeout=5) as response:
                    if response.status == 200:
                        return self.url()
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(HEALTH_POLL_S)
        raise RuntimeError(f"engine server {self.url()} did not answer /health within {timeout_s:g} s{self._log_tail()}")

    def _port_taken(self) -> bool:
        """Whether another process holds the server's port now (its start then failed for that)."""
        try:
            with socket.socket() as s:
                s.bind((self._bind, self.port))
        except OSError:
            return True
        return False

    def stop(self, timeout_s: float = 30.0) -> Optional[int]:
        """Stops the server (the leash kills its group) and returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def _log_tail(self, chars: int = 4000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(max(0, os.path.getsize(self.log_path) - chars))
            return "\n--- its log ---\n" + log.read().decode(errors="replace")


class RouterActor:
    """kvsched's router in an actor: ``start()`` serves until the actor dies; ``stats()`` is what
    /router/stats answers. ``options`` go to RouterServer (dispatch, load_period_s, read_timeout_s...)."""

    def __init__(self, engine_urls: Sequence[str], host: Optional[str] = None, port: int = 0, **options):
        from .proxy import RouterServer  # needs aiohttp, which only the router's node must have

        bind = host or _node_address()
        self.server = RouterServer(list(engine_urls), host=bind, port=port or _free_port(bind), **options)
        self.advertised = _node_address() if bind in ("0.0.0.0", "::") else bind
        self._task: Optional[asyncio.Task] = None

    async def start(self) -> str:
        """Starts serving; returns the router's URL once it listens (raises what stopped it)."""
        ready = asyncio.Event()
        self._task = asyncio.ensure_future(self.server.run(ready))
        waiting = asyncio.ensure_future(ready.wait())
        await asyncio.wait([self._task, waiting], return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            waiting.cancel()
            self._task.result()
        return f"http://{self.advertised}:{self.server.port}"

    async def stats(self) -> dict:
        return self.server.snapshot()


class RayFleet:
    """Engines and a router on the Ray cluster ``ray.init()`` joined.

    ``engine_commands``: one command line per engine (see EngineServer). ``engine_env``: added to
    every engine's environment, or one dict per engine (e.g. each its own PROMETHEUS_MULTIPROC_DIR,
    which ``vllm serve`` needs for the engine core's gauges to show). ``engine_options``: Ray actor
    options for each engine, e.g. ``{"num_gpus": 1}`` on a GPU cluster (default: no resources, so
    that a small local cluster holds the fleet). ``router_options``: RouterServer's. Every engine is
    healthy, and the router listening, when the constructor returns; ``router_url`` is where clients
    go."""

    def __init__(self, engine_commands: Sequence[Sequence[str]], *, host: Optional[str] = None,
                 engine_env: Optional[dict | Sequence[dict]] = None, log_dir: Optional[str] = None,
                 engine_options: Optional[dict] = None, health_timeout_s: float = 300.0,
                 router_options: Optional[dict] = None):
        ray = _ray()
        if not ray.is_initialized():
            raise RuntimeError("RayFleet: call ray.init() first")
        if not engine_commands:
            raise ValueError("engine_commands: give at least one engine")
        envs = list(engine_env) if isinstance(engine_env, (list, tuple)) else [engine_env] * len(engine_commands)
        if len(envs) != len(engine_commands):
            raise ValueError(f"engine_env: {len(envs)} environments for {len(engine_commands)} engines")
        engine_actor = ray.remote(EngineServer).options(num_cpus=0, **(engine_options or {}))
        self.engines = [engine_actor.remote(list(command), host, 0, envs[i],
                                            os.path.join(log_dir, f"engine-{i}.log") if log_dir else None)
                        for i, command in enumerate(engine_commands)]
        self.router = None
        try:
            # Bounded also where Ray cannot place an engine (no free GPU): its health wait never starts.
            self.engine_urls = ray.get([engine.wait_healthy.remote(health_timeout_s) for engine in self.engines],
                                       timeout=health_timeout_s + START_SLACK_S)
            router_actor = ray.remote(RouterActor).options(num_cpus=0, max_concurrency=64)
            self.router = router_actor.remote(self.engine_urls, host, 0, **(router_options or {}))
            self.router_url = ray.get(self.router.start.remote(), timeout=START_SLACK_S)
        except BaseException:
            self.shutdown()
            raise

    def stats(self) -> dict:
        return _ray().get(self.router.stats.remote())

    def kill_engine(self, index: int) -> None:
        """Kills engine ``index``'s actor as a failure would (no cleanup runs in it); its leash then
        kills the server's processes."""
        _ray().kill(self.engines[index], no_restart=True)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stops every engine server (all at once, up to ``timeout_s``), then kills the actors (an
        engine's leash kills whatever of its server is left)."""
        ray = _ray()
        stops = [engine.stop.remote() for engine in self.engines]
        try:
            ray.wait(stops, num_returns=len(stops), timeout=timeout_s)
        except Exception:  # noqa: BLE001 (an engine already dead or killed: its leash cleaned up)
            pass
        for actor in [*self.engines, *([self.router] if self.router is not None else [])]:
            ray.kill(actor, no_restart=True)
