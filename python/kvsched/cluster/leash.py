"""A server process that cannot outlive its parent: ``python -m kvsched.cluster.leash -- CMD ...``.

CMD runs in a process group of its own, so that everything it starts (``vllm serve`` runs its
engine core and workers in child processes) can be killed at once. The leash exits with CMD's code
when CMD ends; when the parent that started the leash is gone (a Ray actor killed by ``ray.kill``,
a lost node's raylet, any parent killed by SIGKILL), or on SIGTERM/SIGINT, CMD's whole group is
killed with SIGKILL.

Two processes, because the first may be killed outright with its parent: Ray kills an actor
worker's child processes with SIGKILL when the worker dies, and a SIGKILLed process can clean up
nothing. So the leash (the parent's child) only starts and watches a keeper in a session of its
own, and the keeper starts and watches CMD. Each polls ``getppid()``: a keeper whose leash is gone
kills CMD's group; a leash whose parent is gone stops its keeper with SIGTERM. (Polling, not
``PR_SET_PDEATHSIG``: the death signal fires when the parent *thread* that forked ends, and a Ray
actor's methods may run on threads that come and go.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2  # how soon CMD's group dies after the parent
USAGE = "usage: python -m kvsched.cluster.leash -- COMMAND [ARG ...]"


def _watch(command: list, stop) -> int:
    """Runs ``command`` in a session of its own until it ends (its exit code) or this process's
    parent changes (``stop(process)``, then 137). SIGTERM and SIGINT also stop it."""
    parent = os.getppid()
    process = subprocess.Popen(command, start_new_session=True)

    def on_signal(signum, frame):  # noqa: ARG001 (a signal handler's signature)
        stop(process)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        code = process.poll()
        if code is not None:
            stop(process)  # what it left running in its group
            return code
        if os.getppid() != parent:
            stop(process)
            return 137
        time.sleep(POLL_S)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _stop_keeper(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # the keeper kills CMD's group, then exits
        process.wait()


def main(argv: list) -> int:
    keeper = argv[:1] == ["--keeper"]
    argv = argv[1:] if keeper else argv
    argv = argv[1:] if argv[:1] == ["--"] else argv
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if keeper:
        return _watch(argv, _kill_group)
    return _watch([sys.executable, "-m", "kvsched.cluster.leash", "--keeper", "--", *argv], _stop_keeper)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
