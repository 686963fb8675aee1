"""CUDA copy engines for swap plans, and pinned host memory.

Device buffers come in through ``__cuda_array_interface__`` (CuPy, PyTorch, Numba), so kvsched has
no hard dependency on any of them; host buffers are numpy arrays in pinned memory (``pinned_empty``
or ``pin``). Everything here needs ``kvsched.has_cuda()``; in a build without CUDA the calls raise
RuntimeError.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import _core
from .swap import STRATEGIES, SwapPlan, host_span

_MEMORY_KINDS = ("pageable", "pinned_host", "device", "managed")


def device_span(tensor: Any, name: str) -> tuple[int, int]:
    """(pointer, nbytes) of a C-contiguous device array exposing ``__cuda_array_interface__``."""
    interface = getattr(tensor, "__cuda_array_interface__", None)
    if interface is None:
        raise TypeError(f"{name}: expected a CUDA array (an object with __cuda_array_interface__), "
                        f"got {type(tensor).__name__}")
    shape = tuple(interface["shape"])
    itemsize = np.dtype(interface["typestr"]).itemsize
    strides = interface.get("strides")
    if strides is not None:
        expected, step = [], itemsize
        for extent in reversed(shape):
            expected.append(step)
            step *= extent
        if tuple(strides) != tuple(reversed(expected)) and int(np.prod(shape)) > 1:
            raise ValueError(f"{name}: must be C-contiguous")
    return int(interface["data"][0]), int(np.prod(shape, dtype=np.int64)) * itemsize


def memory_kind(pointer: int) -> tuple[str, int]:
    """Where a pointer lives: ("pageable" | "pinned_host" | "device" | "managed", device)."""
    kind, device = _core.cuda_memory_kind(pointer)
    return _MEMORY_KINDS[kind], device


def pinned_empty(nbytes: int) -> np.ndarray:
    """A uint8 numpy array of `nbytes` in pinned (page-locked) host memory, freed with the array."""
    pointer = _core.cuda_host_alloc(nbytes)
    buffer = (np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(pointer)))
    return _Owned(buffer, lambda: _core.cuda_host_free(pointer))


def pin(array: np.ndarray) -> np.ndarray:
    """Page-locks an existing C-contiguous numpy array (cudaHostRegister); returns a view that
    unregisters it when the view is garbage collected. Keep the view alive while copies run."""
    pointer, nbytes = host_span(array, "array", False)
    _core.cuda_host_register(pointer, nbytes)
    return _Owned(array.reshape(-1).view(np.uint8), lambda: _core.cuda_host_unregister(pointer))


class _Owned(np.ndarray):
    """A numpy view that runs a release function when it is garbage collected."""

    def __new__(cls, base: np.ndarray, release):
        view = base.view(cls)
        view._release = release
        return view

    def __array_finalize__(self, obj):
        self._release = None  # views and slices of the owner never release

    def __del__(self):
        if self._release is not None:
            self._release()
            self._release = None


class CopyEngine:
    """Executes swap plans between a device and pinned host memory, asynchronously.

    ``copy(plan, device_tensors, host_tensors, stream=...)`` enqueues the plan on a CUDA stream
    (an int handle, e.g. ``torch.cuda.current_stream().cuda_stream`` or ``cupy_stream.ptr``; 0 is
    the legacy default stream) and returns a ``CopyEvent`` with ``done()`` and ``wait()``.
    ``strategy`` is "auto" (cheapest under the cost model), or one of ``STRATEGIES``.
    """

    def __init__(self, device: int = 0, staging_bytes: int = 64 << 20, cost: np.ndarray | None = None, *,
                 batch_staging_copies: bool = True) -> None:
        # staging_bytes: the gather strategy's device buffer per direction (two slots, so kernels
        # overlap PCIe copies). batch_staging_copies: that strategy issues each chunk's host runs as
        # one cudaMemcpyBatchAsync where the CUDA runtime has it, instead of one call per run.
        self._core = _core.CudaCopyEngine(device, staging_bytes, cost, bool(batch_staging_copies))

    @property
    def device(self) -> int:
        return self._core.device

    @staticmethod
    def batched_supported() -> bool:
        return bool(_core.CudaCopyEngine.batched_supported())

    def cost_model(self) -> np.ndarray:
        return self._core.cost_model()

    def set_cost_model(self, cost: np.ndarray) -> None:
        self._core.set_cost_model(cost)

    def choose(self, plan: SwapPlan) -> str:
        return STRATEGIES[self._core.choose(_direction(plan.direction), plan.descriptors)]

    def copy(self, plan: SwapPlan, device_tensors: Sequence[Any], host_tensors: Sequence[np.ndarray], *,
             strategy: str = "auto", stream: int = 0):
        direction, src, dst = self._spans(plan, device_tensors, host_tensors)
        return self._core.copy(direction, plan.descriptors, src, dst, _strategy(strategy), int(stream))

    def copy_descriptors(self, direction: str, descriptors: np.ndarray, device_tensors: Sequence[Any],
                         host_tensors: Sequence[np.ndarray], *, strategy: str = "auto", stream: int = 0):
        """``copy`` for bare descriptor rows, such as a StepPlan's ``swap_out_descriptors`` ("out")
        and ``swap_in_descriptors`` ("in"). Enqueue a step's swap-out before its swap-in on one
        stream: a swap-in may reuse the host blocks a swap-out of the same step reads."""
        if direction not in ("out", "in"):
            raise ValueError(f"direction: expected 'out' or 'in', got {direction!r}")
        descriptors = np.asarray(descriptors)
        rows = descriptors.shape[0] if descriptors.ndim == 2 else 0
        plan = SwapPlan(direction, np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros((0, 3), np.int64),
                        descriptors, rows, 0, int(descriptors[:, 3].sum()) if rows else 0, rows, 0.0)
        return self.copy(plan, device_tensors, host_tensors, strategy=strategy, stream=stream)

    def time_copy(self, plan: SwapPlan, device_tensors: Sequence[Any], host_tensors: Sequence[np.ndarray], *,
                  strategy: str = "auto", repeats: int = 5) -> float:
        """Median seconds of `repeats` runs of the plan (synchronous, timed with CUDA events)."""
        direction, src, dst = self._spans(plan, device_tensors, host_tensors)
        return self._core.time_copy(direction, plan.descriptors, src, dst, _strategy(strategy), int(repeats))

    def _spans(self, plan: SwapPlan, device_tensors, host_tensors):
        if len(device_tensors) != len(host_tensors):
            raise ValueError(f"host_tensors: {len(host_tensors)} buffers for {len(device_tensors)} device tensors")
        if plan.descriptors.shape[0] == 0 and plan.blocks_copied > 0:
            raise ValueError("plan: has no byte descriptors (plan it with a SwapPlanner that has a layout)")
        device = [device_span(t, f"device_tensors[{i}]") for i, t in enumerate(device_tensors)]
        host = [host_span(a, f"host_tensors[{i}]", plan.direction == "out") for i, a in enumerate(host_tensors)]
        direction = _direction(plan.direction)
        return (direction, device, host) if direction == 0 else (direction, host, device)


def _direction(direction: str) -> int:
    return {"out": 0, "in": 1}[direction]


def _strategy(strategy: str) -> int:
    if strategy == "auto":
        return -1
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown {strategy!r}; expected 'auto' or one of {', '.join(STRATEGIES)}")
    return STRATEGIES.index(strategy)


def calibrate_swap_cost(engine: CopyEngine, device_buffer: Any, host_buffer: np.ndarray, *,
                        piece_bytes: int = 32 << 10, num_pieces: int = 2048, repeats: int = 5) -> np.ndarray:
    """Measures the cost table on this GPU and sets it on `engine` (and returns it, for SwapPlanner).

    For each direction and strategy it times a fragmented set (`num_pieces` pieces of `piece_bytes`,
    every other slot, so nothing coalesces) and the same bytes as one piece, then solves
    ``time = per_call + n * per_descriptor + bytes / bandwidth`` from the two. `device_buffer` and
    `host_buffer` (pinned) must each hold at least ``2 * piece_bytes * num_pieces`` bytes.
    """
    need = 2 * piece_bytes * num_pieces
    device_ptr, device_bytes = device_span(device_buffer, "device_buffer")
    host_ptr, host_bytes = host_span(host_buffer, "host_buffer", True)
    if min(device_bytes, host_bytes) < need:
        raise ValueError(f"device_buffer/host_buffer: need {need} bytes each")
    slots = np.arange(num_pieces, dtype=np.int64) * 2 * piece_bytes
    fragmented = np.stack([np.zeros(num_pieces, np.int64), slots, slots, np.full(num_pieces, piece_bytes)], axis=1)
    whole = np.array([[0, 0, 0, piece_bytes * num_pieces]], dtype=np.int64)
    table = engine.cost_model().copy()
    for direction in (0, 1):
        src, dst = ([(device_ptr, device_bytes)], [(host_ptr, host_bytes)]) if direction == 0 else \
            ([(host_ptr, host_bytes)], [(device_ptr, device_bytes)])
        for strategy in range(len(STRATEGIES)):
            if strategy == 1 and not engine.batched_supported():
                continue
            small = engine._core.time_copy(direction, fragmented, src, dst, strategy, repeats)
            large = engine._core.time_copy(direction, whole, src, dst, strategy, repeats)
            bandwidth = piece_bytes * num_pieces / large
            per_descriptor = max(0.0, (small - large) / (num_pieces - 1))
            table[direction, strategy] = (0.0, per_descriptor, bandwidth)
    engine.set_cost_model(table)
    return table


__all__ = ["CopyEngine", "calibrate_swap_cost", "device_span", "memory_kind", "pin", "pinned_empty"]
