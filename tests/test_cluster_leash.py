"""kvsched.cluster.leash: a server started under it dies with its parent, its whole process group
with it (also when the leash itself is SIGKILLed with the parent, as Ray kills an actor's children),
and otherwise ends with the server's own exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

LEASH = [sys.executable, "-m", "kvsched.cluster.leash", "--"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, OSError):
        return False


def test_the_leash_ends_with_the_servers_exit_code():
    assert subprocess.run([*LEASH, sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3
    assert subprocess.run([*LEASH], capture_output=True).returncode == 2  # no command: usage


@pytest.mark.parametrize("killed", ["the parent", "the parent and the leash"])
def test_a_parent_killed_outright_takes_the_servers_whole_group_with_it(killed, tmp_path):
    pids = tmp_path / "pids"
    # The parent (standing in for a Ray actor) starts the leash, which starts a server that starts a
    # child of its own (as vllm serve starts its engine core); then the parent is SIGKILLed, and
    # with it, as Ray does, the leash.
    server = (f"import os, subprocess, time; c = subprocess.Popen(['sleep', '300']); "
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}'); time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, time; p = subprocess.Popen({[*LEASH, sys.executable, '-c', server]!r}); "
                               f"print(p.pid, flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        leash = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while not (pids.exists() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        server_pid, child_pid = map(int, pids.read_text().split())
        assert _alive(server_pid) and _alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        if killed == "the parent and the leash":
            os.kill(leash, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while (_alive(server_pid) or _alive(child_pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server_pid) and not _alive(child_pid), "the server's group outlived its parent"
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_an_owner_that_dies_while_the_leash_starts_leaves_no_server(tmp_path):
    """The owner passes its pid (--parent) and exits at once, before the leash has even read its
    parent: the server never runs, or dies within the poll."""
    pids = tmp_path / "pid"
    server = f"import os, time; open({str(pids)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    owner = subprocess.run([sys.executable, "-c",
                            "import os, subprocess, sys; subprocess.Popen([sys.executable, '-m', 'kvsched.cluster.leash', "
                            f"'--parent', str(os.getpid()), '--', sys.executable, '-c', {server!r}]); os._exit(0)"])
    assert owner.returncode == 0
    time.sleep(3)
    if pids.exists() and pids.read_text():
        assert not _alive(int(pids.read_text())), "the server outlived an owner that died at its start"


def test_the_leash_refuses_a_bad_parent_by_name():
    result = subprocess.run([sys.executable, "-m", "kvsched.cluster.leash", "--parent", "x", "--", "true"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--parent" in result.stderr


def test_an_engine_whose_chosen_port_was_taken_starts_again_on_another(tmp_path, monkeypatch):
    """Two engines started at once on one node may be handed the same free port: the one that lost
    it exits, and its actor starts it again on another port instead of failing (or answering for the
    other engine's /health)."""
    import socket

    from kvsched.cluster import ray_fleet

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    free = ray_fleet._free_port
    monkeypatch.setattr(ray_fleet, "_free_port", lambda host: next(ports, None) or free(host))
    server = ("import http.server, sys\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200); self.end_headers()\n"
              "    def log_message(self, *args): pass\n"
              "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    engine = ray_fleet.EngineServer([sys.executable, "-c", server, "{port}"], host="127.0.0.1",
                                    log_path=str(tmp_path / "engine.log"))
    try:
        assert engine.port == taken.getsockname()[1]
        url = engine.wait_healthy(timeout_s=30)
        assert engine.port != taken.getsockname()[1] and url == f"http://127.0.0.1:{engine.port}"
    finally:
        engine.stop()
        taken.close()
