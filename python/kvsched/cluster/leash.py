"""A server process that cannot outlive its owner:
``python -m kvsched.cluster.leash [--parent PID] -- CMD ...``.

CMD runs in a process group of its own, so that everything it starts (``vllm serve`` runs its
engine core and workers in child processes) can be killed at once. The leash exits with CMD's code
when CMD ends; when the owner is gone (a Ray actor killed by ``ray.kill``, a lost node's raylet, any
owner killed by SIGKILL), or on SIGTERM/SIGINT, CMD's whole group is killed with SIGKILL. The owner
is ``--parent PID`` (the spawner passes its own pid, so that an owner that dies while the leash is
still starting is noticed too), else the leash's parent when it starts.

Two processes, because the first may be killed outright with its owner: Ray kills an actor
worker's child processes with SIGKILL when the worker dies, and a SIGKILLed process can clean up
nothing. So the leash (the owner's child) only starts and watches a keeper in a session of its
own, and the keeper starts and watches CMD. Each polls ``getppid()`` against its owner's pid: a
keeper whose leash is gone kills CMD's group; a leash whose owner is gone stops its keeper with
SIGTERM. (Polling, not ``PR_SET_PDEATHSIG``: the death signal fires when the parent *thread* that
forked ends, and a Ray actor's methods may run on threads that come and go.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2  # how soon CMD's group dies after its owner
USAGE = "usage: python -m kvsched.cluster.leash [--parent PID] -- COMMAND [ARG ...]"


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says


def _watch(command: list, parent: int, keeper: bool) -> int:
    """Runs ``command`` in a session of its own until it ends (its exit code) or ``parent`` is no
    longer this process's parent (then it is stopped, 137). SIGTERM and SIGINT also stop it. A
    keeper stops its command by killing the command's group; the leash, by SIGTERM to its keeper
    (which then kills the group)."""
    process = None
    stopping = []

    def stop_now() -> None:  # no waiting here: it may run inside a signal handler
        if process is None:
            return
        try:
            if keeper:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def on_signal(signum, frame):  # noqa: ARG001 (a signal handler's signature)
        stopping.append(signum)
        stop_now()
        os._exit(128 + signum)

    # The handlers come first: a signal while the command starts still stops it.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if os.getppid() != parent:
        return 137  # the owner died before the command started
    process = subprocess.Popen(command, start_new_session=True)
    while True:
        code = process.poll()
        if code is not None:
            if keeper:
                stop_now()  # what the command left running in its group
            return _exit_code(code)
        if os.getppid() != parent:
            stop_now()
            process.wait()
            return 137
        time.sleep(POLL_S)


def main(argv: list) -> int:
    keeper = argv[:1] == ["--keeper"]
    argv = argv[1:] if keeper else argv
    parent = os.getppid()
    if argv[:1] == ["--parent"]:
        if len(argv) < 2 or not argv[1].isdigit():
            print(f"--parent: a process id, got {argv[1:2]}\n{USAGE}", file=sys.stderr)
            return 2
        parent, argv = int(argv[1]), argv[2:]
    argv = argv[1:] if argv[:1] == ["--"] else argv
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if keeper:
        return _watch(argv, parent, keeper=True)
    return _watch([sys.executable, "-m", "kvsched.cluster.leash", "--keeper", "--parent", str(os.getpid()), "--",
                   *argv], parent, keeper=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
