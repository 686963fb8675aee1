"""Readers for request traces. Each returns a :class:`Trace` of numpy arrays.

A malformed line raises :class:`TraceError` naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import numpy.typing as npt


class TraceError(ValueError):
    """A trace file that cannot be read; the message names file, line and field."""


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order: arrival time (s, from the first request), prompt and output tokens.

    ``prefix_ids`` (optional) holds, per request, the ids of its prompt's shared-prefix blocks of
    ``prefix_block_tokens`` tokens each (Mooncake's ``hash_ids``): equal ids mean equal content.

    Sessions (optional; multi-turn conversations, closed-loop clients): ``session_ids`` groups
    requests; a request whose ``parent_index`` is >= 0 is sent ``think_s`` after that earlier
    request finishes, so its ``arrival_s`` is only nominal (the engine knows the real one). With
    ``shared_context`` a request's prompt is its parent's whole sequence (prompt and output)
    followed by new tokens, so the session's KV can be reused from turn to turn.
    """

    arrival_s: npt.NDArray[np.float64]
    prompt_tokens: npt.NDArray[np.int64]
    output_tokens: npt.NDArray[np.int64]
    prefix_ids: Optional[Tuple[npt.NDArray[np.int64], ...]] = field(default=None, repr=False)
    prefix_block_tokens: int = 0
    session_ids: Optional[npt.NDArray[np.int64]] = field(default=None, repr=False)
    parent_index: Optional[npt.NDArray[np.int64]] = field(default=None, repr=False)
    think_s: Optional[npt.NDArray[np.float64]] = field(default=None, repr=False)
    shared_context: bool = False

    def __post_init__(self) -> None:
        if self.parent_index is not None:
            parents = self.parent_index
            index = np.arange(parents.size)
            if np.any(parents >= index) or np.any(parents < -1):
                raise ValueError("parent_index: every parent must be an earlier request (or -1)")
            followed = parents[parents >= 0]
            if np.unique(followed).size != followed.size:
                raise ValueError("parent_index: a request can be the parent of at most one request")
            if self.session_ids is None or self.think_s is None:
                raise ValueError("parent_index needs session_ids and think_s")

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def has_sessions(self) -> bool:
        return self.parent_index is not None

    def sessions(self) -> npt.NDArray[np.int64]:
        """Each request's session, numbered densely from 0 (each request its own without sessions)."""
        if self.session_ids is None:
            return np.arange(len(self), dtype=np.int64)
        return np.unique(self.session_ids, return_inverse=True)[1].astype(np.int64)

    def head(self, count: int) -> "Trace":
        return self.select(slice(0, count))

    def select(self, which) -> "Trace":
        """The requests at ``which`` (a slice or an index array), keeping prefix ids and sessions
        aligned; a selected request's parent must be selected too."""
        indices = np.arange(len(self))[which]
        prefix = None
        if self.prefix_ids is not None:
            prefix = tuple(self.prefix_ids[i] for i in indices.tolist())
        sessions = {}
        if self.has_sessions:
            new_index = np.full(len(self), -1, np.int64)
            new_index[indices] = np.arange(indices.size)
            parents = self.parent_index[indices]
            remapped = np.where(parents >= 0, new_index[np.maximum(parents, 0)], -1)
            if np.any((parents >= 0) & (remapped < 0)):
                raise ValueError("select: a selected request's parent is not selected")
            sessions = dict(session_ids=self.session_ids[indices], parent_index=remapped,
                            think_s=self.think_s[indices])
        return replace(self, arrival_s=self.arrival_s[indices], prompt_tokens=self.prompt_tokens[indices],
                       output_tokens=self.output_tokens[indices], prefix_ids=prefix, **sessions)

    def with_arrivals(self, arrival_s: npt.NDArray[np.float64]) -> "Trace":
        return replace(self, arrival_s=np.asarray(arrival_s, dtype=np.float64))


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
    order = _arrival_order(path, arrival)
    return Trace(
        arrival[order].astype(np.float64),
        np.array(prompts, dtype=np.int64)[order],
        np.array(outputs, dtype=np.int64)[order],
    )


def _open_checked(path: Union[str, Path]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    return path


def _float_field(path: Path, line: int, field_name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{path}:{line}: field {field_name!r} is not a number: {text!r}") from None
    if not np.isfinite(value) or value < 0:
        raise TraceError(f"{path}:{line}: field {field_name!r} must be finite and >= 0, got {text!r}")
    return value


def read_length_csv(path: Union[str, Path], require_arrivals: bool) -> Trace:
    """Vidur-style CSV: ``num_prefill_tokens,num_decode_tokens`` plus, for a replayable trace,
    ``arrived_at`` (seconds). Without arrivals (ShareGPT length statistics) every arrival is 0:
    give the trace arrivals with :func:`kvsched.sim.workloads.poisson_arrivals`."""
    path = _open_checked(path)
    arrivals, prompts, outputs = [], [], []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        needed = ["num_prefill_tokens", "num_decode_tokens"] + (["arrived_at"] if require_arrivals else [])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise TraceError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {','.join(columns)})")
        has_arrivals = "arrived_at" in columns
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            prompts.append(_count(path, line, "num_prefill_tokens", row["num_prefill_tokens"], 1))
            outputs.append(_count(path, line, "num_decode_tokens", row["num_decode_tokens"], 1))
            arrivals.append(_float_field(path, line, "arrived_at", row["arrived_at"]) if has_arrivals else 0.0)
    if not prompts:
        raise TraceError(f"{path}: the trace has no requests")
    arrival = np.array(arrivals, dtype=np.float64)
    order = _arrival_order(path, arrival)
    return Trace((arrival - arrival.min())[order], np.array(prompts, np.int64)[order], np.array(outputs, np.int64)[order])


def read_mooncake(path: Union[str, Path]) -> Trace:
    """Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``
    (512-token prefix blocks; equal ids are a shared prefix)."""
    path = _open_checked(path)
    arrivals, prompts, outputs, prefix = [], [], [], []
    with path.open() as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise TraceError(f"{path}:{line}: not valid JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise TraceError(f"{path}:{line}: expected a JSON object")
            for name in ("timestamp", "input_length", "output_length"):
                if name not in record:
                    raise TraceError(f"{path}:{line}: field {name!r} is missing")
            arrivals.append(_float_field(path, line, "timestamp", str(record["timestamp"])) / 1000.0)
            prompts.append(_count(path, line, "input_length", str(record["input_length"]), 1))
            outputs.append(_count(path, line, "output_length", str(record["output_length"]), 1))
            ids = record.get("hash_ids", [])
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise TraceError(f"{path}:{line}: field 'hash_ids' must be a list of non-negative integers")
            prefix.append(np.array(ids, dtype=np.int64))
    if not prompts:
        raise TraceError(f"{path}: the trace has no requests")
    arrival = np.array(arrivals, dtype=np.float64)
    order = _arrival_order(path, arrival)
    return Trace(
        (arrival - arrival.min())[order], np.array(prompts, np.int64)[order], np.array(outputs, np.int64)[order],
        tuple(prefix[i] for i in order), 512,
    )


def _arrival_order(path, arrival: np.ndarray) -> np.ndarray:
    """Replay order: by timestamp. A trace whose lines are out of order is replayed sorted, and said so."""
    late = int(np.count_nonzero(np.diff(arrival) < 0))
    if late:
        warnings.warn(f"{path}: {late} requests come before their predecessor's timestamp; "
                      "replaying the trace in timestamp order", stacklevel=3)
    return np.argsort(arrival, kind="stable")


TRACE_FORMATS = ("azure", "vidur", "mooncake", "sharegpt")


def read_trace(path: Union[str, Path], trace_format: str) -> Trace:
    """Reads ``path`` in one of :data:`TRACE_FORMATS`."""
    if trace_format == "azure":
        return read_azure(path)
    if trace_format == "vidur":
        return read_length_csv(path, require_arrivals=True)
    if trace_format == "sharegpt":
        return read_length_csv(path, require_arrivals=False)
    if trace_format == "mooncake":
        return read_mooncake(path)
    raise TraceError(f"unknown trace format {trace_format!r}; expected one of {', '.join(TRACE_FORMATS)}")


def guess_format(path: Union[str, Path]) -> str:
    """The format of a trace file from its first line."""
    path = _open_checked(path)
    with path.open() as handle:
        first = handle.readline().strip()
    if first.startswith("{"):
        return "mooncake"
    if first.startswith("TIMESTAMP"):
        return "azure"
    if "num_prefill_tokens" in first:
        return "vidur" if "arrived_at" in first else "sharegpt"
    raise TraceError(f"{path}:1: cannot tell the trace format from the header; pass --trace-format")
