from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kvsched

# ../shared/data beside the project (the repository root's parent): read from there, never copied.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRACES = SHARED_DATA / "traces"


def snapshot(allocator: kvsched.BlockAllocator, seq_ids=()) -> tuple:
    """Everything observable about an allocator, to prove that a failed call changed nothing."""
    stats = allocator.stats()
    tables = tuple(
        (s, tuple(allocator.block_table(s).tolist()), allocator.num_tokens(s)) for s in seq_ids if s in allocator
    )
    return tuple(sorted(stats.items())), tables, allocator.num_free_blocks


@pytest.fixture
def trace_dir() -> Path:
    if not TRACES.is_dir():
        pytest.skip("../shared/data/traces is absent")
    return TRACES


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
