"""kvsched's KV connector: vLLM's workers execute the copies of kvsched's step plans.

Swap preemption and the host tier of the prefix cache move KV between the KV cache and a host pool;
the scheduler (kvsched's plan) decides what moves, vLLM's workers hold the bytes. This connector is
how the plan reaches them: the adapter puts the plan's copies in each step's
``kv_connector_metadata``, and the worker side executes them with a ``kvsched.BlockCopier`` over the
KV cache tensors vLLM registers (layout read from their strides) and a host pool it allocates.

Turn it on with::

    --kv-transfer-config '{"kv_connector": "KvschedConnector", "kv_role": "kv_both",
                           "kv_connector_module_path": "kvsched.adapters.vllm.connector"}'
    --additional-config '{"kvsched": {"preemption": "swap", "host_kv_gib": 4}}'

When copies run: vLLM calls ``handle_preemptions`` on every step before the step touches the KV
cache (before its blocks are written or read); the connector hands the step's copies to a
``kvsched.step_copies.StepCopyRunner``, which says in which order they run, and which overlap the
forward pass on CUDA: write-throughs of blocks the step neither hands to a row nor loads into, to
host blocks no load of the step reads (``out_overlap``), and prefetches, loads into blocks no row
of the step holds (``into_overlap``); ``metadata_from_plan`` sorts them.

A copy that fails is reported, and only the requests it touched are recomputed
(``copy_failures``): the runner logs the error and keeps the blocks whose bytes it cannot vouch
for, which the connector reports through vLLM's ``invalid_block_ids`` of that step: device blocks
(vLLM ids, >= 0) that a failed host -> device call was writing, and host blocks h, as ``-1 - h``,
that a failed device -> host call was writing. The step itself goes on (vLLM runs its forward
pass; the adapter discards what the touched requests sampled from it).

The scheduler side of this class does nothing: kvsched's adapter is the scheduler, and it builds
the metadata itself (``metadata_from_plan``). vLLM's own connectors are refused by the adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                KVConnectorRole)

from kvsched.block_copier import BlockCopier, block_pieces, extent_blocks, extent_touches
from kvsched.step_copies import StepCopies, StepCopyRunner

from .state import LOGGER_NAME

CONNECTOR_NAME = "KvschedConnector"
CONNECTOR_MODULE = __name__


@dataclass
class KvschedConnectorMetadata(StepCopies, KVConnectorMetadata):
    """One step's copies (``kvsched.step_copies.StepCopies``) as vLLM's connector metadata: device
    blocks are vLLM's block ids, host blocks the host pool's."""


def metadata_from_plan(plan: Any, num_host_blocks: int) -> KvschedConnectorMetadata:
    """The copies of a ``kvsched.StepPlan``. The core's device block b is vLLM's block b + 1."""
    if plan is None or not (plan.swap_out.size or plan.cache_write.size or plan.swap_in.size or plan.cache_load.size):
        return KvschedConnectorMetadata(num_host_blocks)
    extents = [np.asarray(e, np.int64).reshape(-1, 3) for e in (plan.swap_out, plan.cache_write, plan.swap_in,
                                                                plan.cache_load)]
    swap_out, cache_write, swap_in, cache_load = extents
    # What the step's rows hold (a row that starts lists its whole table), what its loads write on
    # the device and what they read on the host (a load may read a block this plan writes there).
    rows = np.asarray(plan.new_blocks, np.int64)
    loaded = np.concatenate([extent_blocks(e, 1) for e in (swap_in, cache_load)])
    read_on_host = np.concatenate([extent_blocks(e, 0) for e in (swap_in, cache_load)])
    later_write = ~(extent_touches(cache_write, 0, np.concatenate([rows, loaded]))
                    | extent_touches(cache_write, 1, read_on_host))
    later_load = ~extent_touches(cache_load, 1, rows)
    out = np.concatenate([swap_out, cache_write[~later_write]])
    into = np.concatenate([swap_in, cache_load[~later_load]])
    out_overlap, into_overlap = cache_write[later_write], cache_load[later_load]
    for e in (out, out_overlap):
        e[:, 0] += 1
    for e in (into, into_overlap):
        e[:, 1] += 1
    return KvschedConnectorMetadata(num_host_blocks, out, into, out_overlap, into_overlap)


class KvschedConnector(KVConnectorBase_V1):
    """vLLM's KV connector interface (v1) over ``kvsched.BlockCopier`` (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.runner: StepCopyRunner | None = None  # worker side, once vLLM registers its KV caches

    # ---- worker side ----
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        # Layers that share one tensor (KV sharing) are copied once. The layout is checked now, so
        # that a cache the copier cannot read fails at start, not at the first preemption.
        unique = {}
        for name, tensor in kv_caches.items():
            if not hasattr(tensor, "data_ptr"):
                raise TypeError(f"KvschedConnector: KV cache of layer {name!r} is a {type(tensor).__name__}, "
                                "not a tensor (this attention backend's cache cannot be copied)")
            if tensor.device.type not in ("cpu", "cuda"):
                raise ValueError(f"KvschedConnector: KV cache of layer {name!r} is on {tensor.device}; "
                                 "it copies between host memory and CPU or CUDA KV caches only")
            block_pieces(tensor, self._kv_cache_config.num_blocks, name)
            unique.setdefault((tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())), (name, tensor))
        self.runner = StepCopyRunner(dict(unique.values()), self._kv_cache_config.num_blocks,
                                     logging.getLogger(LOGGER_NAME), label=CONNECTOR_NAME)

    @property
    def copier(self) -> BlockCopier | None:
        return self.runner.copier if self.runner is not None else None

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        meta = kv_connector_metadata
        if not isinstance(meta, KvschedConnectorMetadata):
            raise TypeError(f"KvschedConnector: expected kvsched's metadata, got {type(meta).__name__} "
                            "(is the scheduler kvsched.adapters.vllm.Scheduler?)")
        if meta.empty and self.runner is None:
            return
        if self.runner is None:
            raise RuntimeError("KvschedConnector: copies planned before vLLM registered its KV caches")
        self.runner.run(meta)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.runner.take_failed_blocks() if self.runner is not None else set()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        pass  # loads ran in handle_preemptions, before the step

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        pass  # saves are the plan's, not per layer

    def wait_for_save(self) -> None:
        pass

    # ---- scheduler side: kvsched's adapter is the scheduler and builds the metadata itself ----
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        raise RuntimeError("KvschedConnector runs under kvsched.adapters.vllm.Scheduler, which builds its metadata")


def is_kvsched_connector(kv_transfer_config: Any) -> bool:
    """Whether vLLM's kv_transfer_config names this connector."""
    return (kv_transfer_config is not None and kv_transfer_config.kv_connector == CONNECTOR_NAME
            and kv_transfer_config.kv_connector_module_path == CONNECTOR_MODULE)


__all__ = ["CONNECTOR_MODULE", "CONNECTOR_NAME", "KvschedConnector", "KvschedConnectorMetadata",
           "is_kvsched_connector", "metadata_from_plan"]
