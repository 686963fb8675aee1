"""Readers for request traces. Each returns a :class:`Trace` of numpy arrays.

A malformed line raises :class:`TraceError` naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import json
import re
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
    # Optional: a class each request declares to the scheduler (e.g. a reasoning effort the client
    # asks for), int32 >= 0. The estimator keeps a history of output lengths per class, and the
    # fleet's dispatcher prices a new request by its class's recent outputs.
    class_ids: Optional[npt.NDArray[np.int32]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.class_ids is not None:
            classes = np.asarray(self.class_ids)
            if classes.shape != (len(self),):
                raise ValueError(f"class_ids: one per request ({len(self)}), got shape {classes.shape}")
            if classes.size and (classes.min() < 0 or classes.max() > np.iinfo(np.int32).max):
                raise ValueError("class_ids: every class must be in [0, 2**31 - 1]")
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
        classes = None if self.class_ids is None else self.class_ids[indices]
        return replace(self, arrival_s=self.arrival_s[indices], prompt_tokens=self.prompt_tokens[indices],
                       output_tokens=self.output_tokens[indices], prefix_ids=prefix, class_ids=classes, **sessions)

    def with_arrivals(self, arrival_s: npt.NDArray[np.float64]) -> "Trace":
        return replace(self, arrival_s=np.asarray(arrival_s, dtype=np.float64))


# Bounds on what a trace may hold. Token counts: far beyond any model's context (longer prompts are
# then rejected as too long) yet summable in int64 with any other count. Arrivals: a span whose
# float64 seconds still resolve a microsecond, so simulated steps of a few ms keep advancing the clock.
MAX_TRACE_TOKENS = (1 << 31) - 1
MAX_ARRIVAL_SPAN_S = 1e9  # about 31.7 years
# Prefix ids below 2**63: the simulator tags session keys with the top bit (sim/engine.py).
MAX_PREFIX_ID = (1 << 63) - 1
_DIGITS = re.compile(r"\s*[+-]?\d+\s*")
# ISO dates with an optional time, as the Azure traces write them ("2023-11-16 18:15:46.6805900");
# numpy alone would also take "now", "today", "NaT" and an empty field.
_TIMESTAMP = re.compile(r"(\d{4})-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?")
_NS_YEARS = (1678, 2261)  # whole years a datetime64[ns] can hold


def _count(path: Path, line: int, field: str, text: str, minimum: int) -> int:
    """A token count written as decimal digits, in [minimum, MAX_TRACE_TOKENS]."""
    if not _DIGITS.fullmatch(text):
        raise TraceError(f"{path}:{line}: field {field!r} is not an integer: {text!r}")
    try:
        value = int(text)
    except ValueError:  # thousands of digits: Python refuses to convert them
        raise TraceError(f"{path}:{line}: field {field!r} must be <= {MAX_TRACE_TOKENS}, got "
                         f"{_short_number(text.strip())}") from None
    return _in_range(path, line, field, value, minimum)


def _in_range(path: Path, line: int, field: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise TraceError(f"{path}:{line}: field {field!r} must be >= {minimum}, got {value}")
    if value > MAX_TRACE_TOKENS:
        raise TraceError(f"{path}:{line}: field {field!r} must be <= {MAX_TRACE_TOKENS}, "
                         f"got {_short_number(value)}")
    return value


def _short_number(value) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} digits)"


def _lines(path: Path, handle):
    """(line number, text) of each line of a binary handle, decoded one line at a time so that a
    byte that is not UTF-8 is reported on its own line."""
    for line, raw in enumerate(handle, start=1):
        try:
            yield line, raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TraceError(f"{path}:{line}: not UTF-8 text") from None


def _csv_rows(path: Path, handle):
    """(line number, fields) of each non-empty CSV record; a record the csv module cannot read
    (a field past its size limit, a stray quote) is a TraceError naming its line."""
    reader = csv.reader(text for _, text in _lines(path, handle))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise TraceError(f"{path}:{reader.line_num}: not a valid CSV record: {error}") from None
        if row:  # line_num: the record's last line (a quoted field may span several)
            yield reader.line_num, row


def _open_checked(path: Union[str, Path]) -> Path:
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such file")
    if not path.is_file():
        raise TraceError(f"{path}: not a regular file")
    return path


def _timestamp(path: Path, line: int, text: str) -> np.datetime64:
    """An Azure TIMESTAMP in nanoseconds; NaT, empty, 'now' and years a datetime64[ns] cannot
    hold (it would wrap silently) are refused."""
    text = text.strip()
    match = _TIMESTAMP.fullmatch(text)
    if match is None or not _NS_YEARS[0] <= int(match.group(1)) <= _NS_YEARS[1]:
        raise TraceError(f"{path}:{line}: field 'TIMESTAMP' is not a timestamp (YYYY-MM-DD hh:mm:ss[.fraction], "
                         f"years {_NS_YEARS[0]}-{_NS_YEARS[1]}): {text!r}")
    try:
        return np.datetime64(text.replace(" ", "T"), "ns")
    except ValueError:
        raise TraceError(f"{path}:{line}: field 'TIMESTAMP' is not a valid date and time: {text!r}") from None


def _check_span(path: Path, span_s: float) -> None:
    if not span_s <= MAX_ARRIVAL_SPAN_S:
        raise TraceError(f"{path}: the arrivals span {span_s:.3g} s; must be <= {MAX_ARRIVAL_SPAN_S:g} s")


def read_azure(path: Union[str, Path]) -> Trace:
    """Azure LLM inference trace CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens``."""
    path = _open_checked(path)
    stamps, prompts, outputs = [], [], []
    expected = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    with path.open("rb") as handle:
        rows = _csv_rows(path, handle)
        line, header = next(rows, (1, None))
        if header is None or [h.strip() for h in header] != expected:
            raise TraceError(f"{path}:{line}: header must be {','.join(expected)}, got {header}")
        for line, row in rows:
            if len(row) != 3:
                raise TraceError(f"{path}:{line}: expected 3 fields, got {len(row)}")
            stamps.append(_timestamp(path, line, row[0]))
            prompts.append(_count(path, line, "ContextTokens", row[1], 1))
            outputs.append(_count(path, line, "GeneratedTokens", row[2], 1))
    if not stamps:
        raise TraceError(f"{path}: the trace has no requests")
    times = np.array(stamps, dtype="datetime64[ns]")
    # Checked in seconds first: 584 years of nanoseconds would wrap int64.
    seconds = times.astype("datetime64[s]").astype(np.int64)
    _check_span(path, float(seconds.max() - seconds.min()))
    arrival = (times - times.min()).astype(np.int64) / 1e9
    order = _arrival_order(path, arrival)
    return Trace(
        arrival[order].astype(np.float64),
        np.array(prompts, dtype=np.int64)[order],
        np.array(outputs, dtype=np.int64)[order],
    )


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
    with path.open("rb") as handle:
        rows = _csv_rows(path, handle)
        _, header = next(rows, (1, []))
        columns = [c.strip() for c in header]
        needed = ["num_prefill_tokens", "num_decode_tokens"] + (["arrived_at"] if require_arrivals else [])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise TraceError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {','.join(columns)})")
        has_arrivals = "arrived_at" in columns
        where = {name: columns.index(name) for name in ("num_prefill_tokens", "num_decode_tokens", "arrived_at")
                 if name in columns}
        for line, row in rows:
            if len(row) < len(columns):
                missing = [name for name, at in where.items() if at >= len(row)]
                if missing:
                    raise TraceError(f"{path}:{line}: field {missing[0]!r} is missing "
                                     f"({len(row)} fields, the header has {len(columns)})")
            prompts.append(_count(path, line, "num_prefill_tokens", row[where["num_prefill_tokens"]], 1))
            outputs.append(_count(path, line, "num_decode_tokens", row[where["num_decode_tokens"]], 1))
            arrivals.append(_float_field(path, line, "arrived_at", row[where["arrived_at"]].strip())
                            if has_arrivals else 0.0)
    if not prompts:
        raise TraceError(f"{path}: the trace has no requests")
    arrival = np.array(arrivals, dtype=np.float64)
    _check_span(path, float(arrival.max() - arrival.min()))
    order = _arrival_order(path, arrival)
    return Trace((arrival - arrival.min())[order], np.array(prompts, np.int64)[order], np.array(outputs, np.int64)[order])


def _json_count(path: Path, line: int, name: str, value) -> int:
    # JSON's own integers only: "50" or 50.0 would be a silent conversion.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(f"{path}:{line}: field {name!r} must be an integer, got {_json_type(value)}")
    return _in_range(path, line, name, value, 1)


def _hash_ids(path: Path, line: int, ids) -> np.ndarray:
    if not isinstance(ids, list):
        raise TraceError(f"{path}:{line}: field 'hash_ids' must be a list of integers, got {_json_type(ids)}")
    for k, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PREFIX_ID:
            raise TraceError(f"{path}:{line}: field 'hash_ids' item {k} must be an integer in [0, 2**63), "
                             f"got {_json_type(value)}")
    return np.array(ids, dtype=np.int64)


def _json_milliseconds(path: Path, line: int, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TraceError(f"{path}:{line}: field 'timestamp' must be a number, got {_json_type(value)}")
    try:
        milliseconds = float(value)
    except OverflowError:  # an integer past float's range
        milliseconds = float("inf")
    if not 0 <= milliseconds < float("inf"):
        raise TraceError(f"{path}:{line}: field 'timestamp' must be finite and >= 0, got {_json_type(value)}")
    return milliseconds


def _json_type(value) -> str:
    if isinstance(value, (bool, int, float)) or value is None:
        return _short_number(json.dumps(value))
    return {str: "a string", list: "a list", dict: "an object"}[type(value)]


def read_mooncake(path: Union[str, Path]) -> Trace:
    """Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``
    (512-token prefix blocks; equal ids are a shared prefix)."""
    path = _open_checked(path)
    arrivals, prompts, outputs, prefix = [], [], [], []
    with path.open("rb") as handle:
        for line, text in _lines(path, handle):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except RecursionError:
                raise TraceError(f"{path}:{line}: not valid JSON: nested too deeply") from None
            except json.JSONDecodeError as error:
                raise TraceError(f"{path}:{line}: not valid JSON: {error.msg}") from None
            except ValueError:  # Python refuses to convert integers of thousands of digits
                raise TraceError(f"{path}:{line}: not valid JSON: a number has too many digits") from None
            if not isinstance(record, dict):
                raise TraceError(f"{path}:{line}: expected a JSON object")
            for name in ("timestamp", "input_length", "output_length"):
                if name not in record:
                    raise TraceError(f"{path}:{line}: field {name!r} is missing")
            arrivals.append(_json_milliseconds(path, line, record["timestamp"]) / 1000.0)
            prompts.append(_json_count(path, line, "input_length", record["input_length"]))
            outputs.append(_json_count(path, line, "output_length", record["output_length"]))
            prefix.append(_hash_ids(path, line, record.get("hash_ids", [])))
    if not prompts:
        raise TraceError(f"{path}: the trace has no requests")
    arrival = np.array(arrivals, dtype=np.float64)
    _check_span(path, float(arrival.max() - arrival.min()))
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
    with path.open("rb") as handle:
        first = handle.readline(4096).decode("utf-8", "replace").strip()
    if first.startswith("{"):
        return "mooncake"
    if first.startswith("TIMESTAMP"):
        return "azure"
    if "num_prefill_tokens" in first:
        return "vidur" if "arrived_at" in first else "sharegpt"
    raise TraceError(f"{path}:1: cannot tell the trace format from the header; pass --trace-format")
