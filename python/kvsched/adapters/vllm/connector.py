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
cache (before its blocks are written or read); the connector executes there, in the plan's copy
order, device -> host (swap-outs, cache writes: the blocks they read may be handed to others in
this step) and then host -> device (swap-ins, cache loads). On CUDA both go on the copier's own
stream, which first waits for the work already queued (the last step's writes); the forward pass
waits for those copies only. The copies no row of the step needs (the plan's
``cache_overlap_seconds``) are queued after them and overlap the forward pass: write-throughs of
blocks the step neither hands to a row nor loads into, to host blocks no load of the step reads
(``out_overlap``), and prefetches, loads into blocks no row of the step holds (``into_overlap``). The next step's forward pass waits for them,
as for everything on that stream, and its rows are the first to read what they wrote. A direction
that has copies to wait for takes its overlapping ones into the same call (a second call on a copy
lane would wait on the CPU for the first). On CPU every copy is a memmove in this call, the
overlapping ones last. (CUDA overlap is not measured on a GPU yet.)

A copy that fails is reported, and only the requests it touched are recomputed
(``copy_failures``): the worker logs the error and reports the blocks whose bytes it cannot vouch
for through vLLM's ``invalid_block_ids`` of that step: device blocks (vLLM ids, >= 0) that a
failed host -> device call was writing, and host blocks h, as ``-1 - h``, that a failed device ->
host call was writing. Each call is one direction's extents; when it fails, all blocks it was
writing count as failed. The step itself goes on (vLLM runs its forward pass; the adapter discards
what the touched requests sampled from it). On CUDA a copy error that surfaces only when the stream
is synchronized is not caught here: it fails the step, as every CUDA error does.

The scheduler side of this class does nothing: kvsched's adapter is the scheduler, and it builds
the metadata itself (``metadata_from_plan``). vLLM's own connectors are refused by the adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                KVConnectorRole)

from kvsched.block_copier import BlockCopier, block_pieces

from .copy_failures import extent_blocks, extent_touches
from .state import LOGGER_NAME

CONNECTOR_NAME = "KvschedConnector"
CONNECTOR_MODULE = __name__
_NO_EXTENTS = np.zeros((0, 3), np.int64)


@dataclass
class KvschedConnectorMetadata(KVConnectorMetadata):
    """One step's copies, as ``(src_block, dst_block, n_blocks)`` rows in vLLM's block ids (device)
    and host pool block ids, in execution order: ``out`` (device -> host), then ``into`` (host ->
    device), which the forward pass waits for; then ``out_overlap`` and ``into_overlap``, which it
    does not (the module docstring)."""

    num_host_blocks: int = 0
    out: np.ndarray = field(default_factory=lambda: _NO_EXTENTS)
    into: np.ndarray = field(default_factory=lambda: _NO_EXTENTS)
    out_overlap: np.ndarray = field(default_factory=lambda: _NO_EXTENTS)
    into_overlap: np.ndarray = field(default_factory=lambda: _NO_EXTENTS)

    @property
    def empty(self) -> bool:
        return not (self.out.size or self.into.size or self.out_overlap.size or self.into_overlap.size)

    @property
    def waited(self) -> tuple:
        """(extents, direction) the forward pass waits for, in execution order."""
        return (self.out, "out"), (self.into, "in")

    @property
    def overlapping(self) -> tuple:
        """(extents, direction) that may overlap the forward pass, after ``waited``, in order."""
        return (self.out_overlap, "out"), (self.into_overlap, "in")

    def one_call_per_lane(self) -> tuple[list, list]:
        """``waited`` and ``overlapping`` for CUDA, where each direction is a copy lane and a lane's
        second call in a step waits on the CPU for the first's descriptor upload
        (cuda_copy_engine.cu), which sits behind the last forward pass: a direction that has copies
        to wait for takes its overlapping ones into the same call."""
        waited, overlapping = [], []
        for (now, direction), (later, _) in zip(self.waited, self.overlapping):
            if now.size and later.size:
                now, later = np.concatenate([now, later]), _NO_EXTENTS
            waited.append((now, direction))
            overlapping.append((later, direction))
        return waited, overlapping


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
        self._kv_caches: dict[str, Any] = {}
        self.copier: BlockCopier | None = None
        self._stream = None  # CUDA: the copier's stream
        self.num_copied = {"out": 0, "into": 0}  # extents executed, for tests and logs
        self._failed_blocks: set[int] = set()  # this step's, until vLLM collects them (module docstring)
        self._overlapping = False  # CUDA: copies queued that no forward pass has waited for yet

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
        self._kv_caches = dict(unique.values())

    def _copier(self, num_host_blocks: int) -> BlockCopier:
        if self.copier is None:
            if not self._kv_caches:
                raise RuntimeError("KvschedConnector: copies planned before vLLM registered its KV caches")
            first = next(iter(self._kv_caches.values()))
            cuda = first.device.type == "cuda"
            self.copier = BlockCopier(self._kv_caches, self._kv_cache_config.num_blocks, num_host_blocks,
                                      cuda=cuda, cuda_device=(first.device.index or 0) if cuda else 0)
            if cuda:
                import torch

                self._stream = torch.cuda.Stream(device=first.device)
        elif self.copier.num_host_blocks != num_host_blocks:
            raise RuntimeError(f"KvschedConnector: the host pool has {self.copier.num_host_blocks} blocks, "
                               f"the plan {num_host_blocks}")
        return self.copier

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        meta = kv_connector_metadata
        if not isinstance(meta, KvschedConnectorMetadata):
            raise TypeError(f"KvschedConnector: expected kvsched's metadata, got {type(meta).__name__} "
                            "(is the scheduler kvsched.adapters.vllm.Scheduler?)")
        if meta.empty:
            if self._overlapping:  # the last step's overlapping copies wrote what this step's rows read
                import torch

                torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
                self._overlapping = False
            return
        copier = self._copier(meta.num_host_blocks)
        if self._stream is None:  # CPU: memmoves, in order
            for extents, direction in meta.waited + meta.overlapping:
                self._copy(copier, extents, direction)
            return
        import torch

        compute = torch.cuda.current_stream(self._stream.device)
        self._stream.wait_stream(compute)  # the KV the last steps' forward passes wrote
        waited, overlapping = meta.one_call_per_lane()
        for extents, direction in waited:
            self._copy(copier, extents, direction, self._stream.cuda_stream)
        compute.wait_stream(self._stream)  # these, and every copy queued before (one stream, in order)
        self._overlapping = False
        for extents, direction in overlapping:
            if extents.size:
                self._copy(copier, extents, direction, self._stream.cuda_stream)
                self._overlapping = True

    def _copy(self, copier: BlockCopier, extents: np.ndarray, direction: str, stream: Any = None) -> None:
        """One direction's copies; a failure is logged and its destination blocks reported, and the
        step's other copies still run (a load that reads what a failed out copy was writing copies
        its garbage: the adapter traces that too, copy_failures.py)."""
        if not extents.size:
            return
        try:
            if stream is None:
                copier.copy(extents, direction)
            else:
                copier.copy(extents, direction, stream=stream)
        except Exception as error:  # noqa: BLE001 (any failure: the blocks are reported, the step goes on)
            written = extent_blocks(extents, 1)
            failed = (-1 - written) if direction == "out" else written
            self._failed_blocks.update(failed.tolist())
            logging.getLogger(LOGGER_NAME).error(
                "KvschedConnector: %d %s-copies failed (%s: %s); their %d blocks are reported, and the requests "
                "that read or wrote them are recomputed", extents.shape[0], direction, type(error).__name__, error,
                written.size)
            return
        self.num_copied["out" if direction == "out" else "into"] += int(extents.shape[0])

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

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
