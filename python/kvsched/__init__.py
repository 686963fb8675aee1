"""kvsched: a native scheduling core for LLM serving engines.

The C++ core (``kvsched._core``) decides where KV-cache blocks live; this package is the thin,
documented Python face over it.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from . import _core
from ._core import OutOfBlocks
from .allocator import BlockAllocator
from .block_copier import BlockCopier
from .estimator import PeakEstimator, future_peak
from .policies import Policy
from .scheduler import CacheEvents, Scheduler, SchedulerConfig, StepPlan
from .swap import KvLayout, SwapPlan, SwapPlanner

OutOfBlocks.__module__ = __name__
OutOfBlocks.__doc__ = "Not enough free KV blocks for the request; raised with no state change (a MemoryError)."

try:
    __version__ = _metadata.version("kvsched")
except _metadata.PackageNotFoundError:  # imported from a source tree without installation
    __version__ = "0.0.0+unknown"


def has_cuda() -> bool:
    """Whether CUDA support was compiled in and at least one CUDA device is usable."""
    return bool(_core.cuda_compiled()) and _core.cuda_device_count() > 0


def cuda_compiled() -> bool:
    """Whether this build contains the CUDA translation units (independent of any device)."""
    return bool(_core.cuda_compiled())


__all__ = [
    "BlockAllocator", "BlockCopier", "CacheEvents", "KvLayout", "OutOfBlocks", "PeakEstimator", "Policy", "Scheduler",
    "SchedulerConfig", "StepPlan", "SwapPlan", "SwapPlanner",
    "__version__", "cuda_compiled", "future_peak", "has_cuda",
]
