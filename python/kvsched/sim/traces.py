"""Readers for request traces. Each returns a :class:`Trace` of numpy arrays.

A malformed line raises :class:`TraceError` naming the file, the line and the field.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import numpy.typing as npt


class TraceError(ValueError):
    """A trace file that cannot be read; the message names file, line and field."""


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order: arrival time (s, from the first request), prompt and output tokens."""

    arrival_s: npt.NDArray[np.float64]
    prompt_tokens: npt.NDArray[np.int64]
    output_tokens: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def head(self, count: int) -> "Trace":
        return Trace(self.arrival_s[:count], self.prompt_tokens[:count], self.output_tokens[:count])


def _count(path: Path, line: int, field: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TraceError(f"{path}:{line}: field {field!r} is not an integer: {text!r}") from None
    if value < minimum:
        raise TraceError(f"{path}:{line}: field {field!r} must be >= {minimum}, got {value}")
    return value


def read_azure(path: Union[str, Path]) -> Trace:
    """Azure LLM inference trace CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens``."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    stamps, prompts, outputs = [], [], []
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        expected = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
        if header is None or [h.strip() for h in header] != expected:
            raise TraceError(f"{path}:1: header must be {','.join(expected)}, got {header}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 3:
                raise TraceError(f"{path}:{line}: expected 3 fields, got {len(row)}")
            try:
                stamps.append(np.datetime64(row[0].strip().replace(" ", "T"), "ns"))
            except ValueError:
                raise TraceError(f"{path}:{line}: field 'TIMESTAMP' is not a timestamp: {row[0]!r}") from None
            prompts.append(_count(path, line, "ContextTokens", row[1], 1))
            outputs.append(_count(path, line, "GeneratedTokens", row[2], 1))
    if not stamps:
        raise TraceError(f"{path}: the trace has no requests")
    times = np.array(stamps, dtype="datetime64[ns]")
    arrival = (times - times.min()).astype(np.int64) / 1e9
    order = np.argsort(arrival, kind="stable")
    return Trace(
        arrival[order].astype(np.float64),
        np.array(prompts, dtype=np.int64)[order],
        np.array(outputs, dtype=np.int64)[order],
    )
