"""One engine step's KV copies, executed in the order its forward pass needs (no engine imports).

An engine adapter turns a step plan's copies into ``StepCopies`` and hands them, before the step's
forward pass touches the KV cache, to a ``StepCopyRunner`` on the worker that holds the KV tensors
(vLLM's KV connector does: adapters/vllm/connector.py).

Glossary
  extent       a copy's ``(src_block, dst_block, n_blocks)`` row (``kvsched.block_copier``): device
               block ids are the engine's, host block ids the runner's host pool's.
  out / into   device -> host and host -> device.
  waited       copies the step's forward pass reads or overwrites: ``out`` (swap-outs, and
               write-throughs of blocks the step hands to a row or loads into) then ``into``
               (swap-ins, and loads into blocks a row of the step holds).
  overlapping  copies no row of the step needs: ``out_overlap`` (write-throughs) and
               ``into_overlap`` (prefetches). They may run during the forward pass.
  lane         on CUDA, one direction's copy engine (cuda_copy_engine.cu); a lane's second call in
               a step waits on the CPU for the first's descriptor upload.

Order on CUDA: every copy goes on the runner's own stream, which first waits for the compute
stream (the KV the last forward passes wrote); the compute stream then waits for the waited copies,
and the overlapping ones are queued after them, so they run beside this step's forward pass. The
next step's forward pass waits for them, as for everything on that stream (a step with no copies
too), and its rows are the first that may read what they wrote. A direction that has waited copies
takes its overlapping ones into the same call (``one_call_per_lane``). On CPU every copy is a
memmove during ``run``, the overlapping ones last.

Failures: a copy call that raises is logged, and the blocks it was writing are kept for the engine
to collect (``take_failed_blocks``: device blocks as ids >= 0, host blocks h as ``-1 - h``); the
step's other calls still run. A CUDA error that surfaces only when a stream is synchronized is not
caught here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .block_copier import BlockCopier, extent_blocks

NO_EXTENTS = np.zeros((0, 3), np.int64)


@dataclass
class StepCopies:
    """One step's copies by when they must be done (the glossary), each in execution order."""

    num_host_blocks: int = 0
    out: np.ndarray = field(default_factory=lambda: NO_EXTENTS)
    into: np.ndarray = field(default_factory=lambda: NO_EXTENTS)
    out_overlap: np.ndarray = field(default_factory=lambda: NO_EXTENTS)
    into_overlap: np.ndarray = field(default_factory=lambda: NO_EXTENTS)

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
        """``waited`` and ``overlapping`` for CUDA: a direction with copies to wait for takes its
        overlapping ones into the same call (its lane's second call would wait on the CPU for the
        first's upload, which sits behind the last forward pass)."""
        waited, overlapping = [], []
        for (now, direction), (later, _) in zip(self.waited, self.overlapping):
            if now.size and later.size:
                now, later = np.concatenate([now, later]), NO_EXTENTS
            waited.append((now, direction))
            overlapping.append((later, direction))
        return waited, overlapping


class StepCopyRunner:
    """Executes ``StepCopies`` over an engine's KV tensors (the module docstring says in which order).

    Args:
        kv_tensors: name -> KV tensor (torch on CPU or CUDA, or numpy), as ``BlockCopier`` takes them.
        num_device_blocks: blocks of the KV cache.
        log: where failed copies are logged, under ``label`` (the engine's name for the runner).
    The host pool is allocated at the first step with copies, whose ``num_host_blocks`` it takes;
    a later step naming another size is refused.
    """

    def __init__(self, kv_tensors: Mapping[str, Any], num_device_blocks: int,
                 log: logging.Logger | None = None, label: str = "StepCopyRunner") -> None:
        if not kv_tensors:
            raise ValueError("kv_tensors: no KV tensors to copy")
        self._kv_tensors = dict(kv_tensors)
        self.num_device_blocks = int(num_device_blocks)
        self._log, self._label = log or logging.getLogger(__name__), label
        first = next(iter(self._kv_tensors.values()))
        device = getattr(first, "device", None)
        self._cuda_device = device if getattr(device, "type", "cpu") == "cuda" else None
        if self._cuda_device is None and hasattr(first, "__cuda_array_interface__"):
            # The stream order is kept with torch's streams: another framework's arrays have none here.
            raise TypeError("kv_tensors: CUDA arrays other than torch tensors are not supported "
                            f"(got {type(first).__name__}); use BlockCopier with your own streams")
        self.copier: BlockCopier | None = None
        self._stream = None  # CUDA: the copier's stream (torch)
        self._overlapping = False  # CUDA: copies queued that no forward pass has waited for yet
        self.num_copied = {"out": 0, "into": 0}  # extents executed, for tests and logs
        self._failed_blocks: set[int] = set()

    def _copier(self, num_host_blocks: int) -> BlockCopier:
        if self.copier is None:
            cuda = self._cuda_device is not None
            self.copier = BlockCopier(self._kv_tensors, self.num_device_blocks, num_host_blocks, cuda=cuda,
                                      cuda_device=(self._cuda_device.index or 0) if cuda else 0)
            if cuda:
                import torch

                self._stream = torch.cuda.Stream(device=self._cuda_device)
        elif self.copier.num_host_blocks != num_host_blocks:
            raise RuntimeError(f"num_host_blocks: the host pool has {self.copier.num_host_blocks} blocks, "
                               f"the step {num_host_blocks}")
        return self.copier

    def run(self, copies: StepCopies) -> None:
        """Executes (CPU) or queues (CUDA) one step's copies, before its forward pass is queued."""
        if copies.empty:
            if self._overlapping:  # the last step's overlapping copies wrote what this step's rows read
                import torch

                torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
                self._overlapping = False
            return
        copier = self._copier(copies.num_host_blocks)
        if self._stream is None:  # CPU: memmoves, in order
            for extents, direction in copies.waited + copies.overlapping:
                self._copy(copier, extents, direction)
            return
        import torch

        compute = torch.cuda.current_stream(self._stream.device)
        self._stream.wait_stream(compute)  # the KV the last steps' forward passes wrote
        waited, overlapping = copies.one_call_per_lane()
        for extents, direction in waited:
            self._copy(copier, extents, direction, self._stream.cuda_stream)
        compute.wait_stream(self._stream)  # these, and every copy queued before (one stream, in order)
        self._overlapping = False
        for extents, direction in overlapping:
            if extents.size:
                self._copy(copier, extents, direction, self._stream.cuda_stream)
                self._overlapping = True

    def _copy(self, copier: BlockCopier, extents: np.ndarray, direction: str, stream: Any = None) -> None:
        """One direction's copies; a failure is logged and its destination blocks kept, and the
        step's other copies still run (a load that reads what a failed out copy was writing copies
        its garbage: the engine adapter traces that, e.g. adapters/vllm/copy_failures.py)."""
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
            self._log.error("%s: %d %s-copies failed (%s: %s); their %d blocks are reported, and the requests "
                            "that read or wrote them are recomputed", self._label, extents.shape[0], direction,
                            type(error).__name__, error, written.size)
            return
        self.num_copied["out" if direction == "out" else "into"] += int(extents.shape[0])

    def take_failed_blocks(self) -> set[int]:
        """The blocks failed copies were writing since the last call (module docstring)."""
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed


__all__ = ["NO_EXTENTS", "StepCopies", "StepCopyRunner"]
