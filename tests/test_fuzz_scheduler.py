"""Runs the coverage-guided Scheduler fuzzer (tests/fuzz_scheduler.py) for a few seconds.

KVSCHED_FUZZ_SECONDS sets the time (default 20). Skipped without atheris (`pip install atheris`;
CI installs it), and under an ASan preload, whose runtime and atheris' own libFuzzer do not share
one process: the sanitizer run covers the same calls with tests/hostile.py instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")

SCRIPT = Path(__file__).with_name("fuzz_scheduler.py")
SECONDS = int(os.environ.get("KVSCHED_FUZZ_SECONDS", "20"))


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""), reason="atheris does not run under an ASan preload")
def test_fuzzed_programs_never_crash_lose_requests_or_corrupt_state(tmp_path: Path) -> None:
    try:
        done = subprocess.run(
            [sys.executable, str(SCRIPT), f"-max_total_time={SECONDS}", "-rss_limit_mb=4096", "-seed=1",
             f"-artifact_prefix={tmp_path}/"],
            capture_output=True, text=True, timeout=SECONDS + 120, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the fuzzer hung")
    crashes = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(p.name for p in tmp_path.glob("timeout-*"))
    assert done.returncode == 0 and not crashes, done.stderr[-6000:]
    assert "Done" in done.stderr, done.stderr[-3000:]
