"""The hostile-input suite (tests/hostile.py) in child processes: a crash or a hang fails the test.

Each target is driven for a few seeds; KVSCHED_HOSTILE_CALLS scales the calls per seed (CI runs
the default; run more by hand, e.g. KVSCHED_HOSTILE_CALLS=20000).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("hostile.py")
CALLS = int(os.environ.get("KVSCHED_HOSTILE_CALLS", "600"))
TARGETS = ["scheduler", "config", "allocator", "estimator", "swap", "dispatch"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", TARGETS)
def test_hostile_calls_end_in_a_named_error_or_a_valid_state(target: str, seed: int) -> None:
    try:
        done = subprocess.run([sys.executable, str(SCRIPT), target, str(seed), str(CALLS)], capture_output=True,
                              text=True, timeout=120 + CALLS / 10)
    except subprocess.TimeoutExpired as hang:
        pytest.fail(f"{target} seed {seed}: hung (no result in {hang.timeout} s)")
    if done.returncode < 0:
        pytest.fail(f"{target} seed {seed}: crashed with signal {-done.returncode}\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-3000:]}")
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
