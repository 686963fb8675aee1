"""Device arrays for GPU tests without a hard dependency: CuPy when installed, else PyTorch."""

from __future__ import annotations

import numpy as np


def backend():
    try:
        import cupy
        return "cupy", cupy
    except ImportError:
        import torch
        return "torch", torch


def to_device(array: np.ndarray):
    name, lib = backend()
    if name == "cupy":
        return lib.asarray(array)
    return lib.from_numpy(np.ascontiguousarray(array)).cuda()


def to_host(device_array) -> np.ndarray:
    name, lib = backend()
    if name == "cupy":
        return lib.asnumpy(device_array)
    return device_array.cpu().numpy()


def fill(device_array, value: int) -> None:
    device_array.fill(value) if backend()[0] == "cupy" else device_array.fill_(value)


def new_stream() -> tuple[object, int]:
    """A created (non-default) stream and its cudaStream_t as an int."""
    name, lib = backend()
    if name == "cupy":
        stream = lib.cuda.Stream(non_blocking=True)
        return stream, stream.ptr
    stream = lib.cuda.Stream()
    return stream, stream.cuda_stream


def synchronize() -> None:
    name, lib = backend()
    lib.cuda.Device().synchronize() if name == "cupy" else lib.cuda.synchronize()
