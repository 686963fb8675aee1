"""kvsched as vLLM's scheduler: ``vllm serve MODEL --scheduler-cls kvsched.adapters.vllm.Scheduler``
(see ``scheduler.py``)."""

from .scheduler import (KVSCHED_OPTIONS, SUPPORTED_VLLM, Scheduler, check_vllm_version, kvsched_config,
                        unsupported_features)

__all__ = ["KVSCHED_OPTIONS", "SUPPORTED_VLLM", "Scheduler", "check_vllm_version", "kvsched_config",
           "unsupported_features"]
