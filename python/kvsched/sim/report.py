"""What `kvsched simulate` writes: the results table, the per-request export and the CDF plot.

A record is one admission mode's aggregate over its seeds (kvsched.sim.metrics.aggregate); a run is
one (record, RunLog) pair of one seed.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Dict, List, Optional

import numpy as np

PER_REQUEST_COLUMNS = ("run", "admission", "seed", "request", "session", "arrival_s", "prompt_tokens", "output_tokens",
                       "ttft_s", "tpot_s", "max_gap_s", "e2e_s", "preemptions", "outcome")


def per_request_rows(log, seed: int, prepared) -> dict:
    """One run's requests as columns, in workload order, with the prompts beyond the context
    (never sent) as ``too_long`` rows."""
    workload, at = prepared.workload, prepared.source_index
    n = len(workload)
    out = {name: np.full(n, np.nan) for name in ("arrival_s", "ttft_s", "tpot_s", "max_gap_s", "e2e_s")}
    out["prompt_tokens"] = workload.prompt_tokens.copy()
    out["output_tokens"] = workload.output_tokens.copy()
    out["output_tokens"][at] = log.output_tokens  # as clipped to the context
    out["preemptions"] = np.zeros(n, np.int64)
    out["preemptions"][at] = log.preemptions
    completed = ~np.isnan(log.finish_s)
    multi = completed & (log.output_tokens > 1)
    # When a too_long prompt came, though never sent; a later turn of a conversation has no such time
    # (its nominal arrival only orders it: it would have come a think time after an answer).
    out["arrival_s"] = workload.arrival_s.astype(np.float64)
    if workload.has_sessions:
        out["arrival_s"][workload.parent_index >= 0] = np.nan
    out["arrival_s"][at] = log.arrival_s
    out["ttft_s"][at] = log.first_token_s - log.arrival_s
    out["tpot_s"][at] = np.where(multi, (log.finish_s - log.first_token_s) / np.maximum(log.output_tokens - 1, 1),
                                 np.nan)
    out["max_gap_s"][at] = np.where(multi, log.max_gap_s, np.nan)
    out["e2e_s"][at] = log.finish_s - log.arrival_s
    outcome = np.full(n, "too_long", dtype=object)
    outcome[at] = np.where(completed, "completed", np.where(log.rejected, "rejected", "unfinished"))
    out["outcome"] = outcome
    out["admission"] = np.full(n, log.admission, dtype=object)
    out["run"] = np.full(n, log.run or log.admission, dtype=object)
    out["seed"] = np.full(n, seed, np.int64)
    out["request"] = np.arange(n, dtype=np.int64)
    out["session"] = workload.sessions() if workload.has_sessions else np.full(n, -1, np.int64)
    return out


def write_per_request(path: str, runs: dict, prepared_of_seed: dict) -> int:
    """Every request of every run (admission mode or fleet, x seed) to a CSV or Parquet file; the row count.
    A run that a later seed reused unchanged (``same_run_as_seed``) is written once, under the seed it ran."""
    parts = [per_request_rows(log, record["seed"], prepared_of_seed[record["seed"]])
             for name in runs for record, log in runs[name] if "same_run_as_seed" not in record]
    columns = {name: np.concatenate([part[name] for part in parts]) for name in PER_REQUEST_COLUMNS}
    rows = columns["request"].size
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({name: values.tolist() if values.dtype == object else values
                                 for name, values in columns.items()}), path)
        return rows
    import csv

    floats = {"arrival_s", "ttft_s", "tpot_s", "max_gap_s", "e2e_s"}
    cells = [[("" if np.isnan(v) else f"{v:.6f}") for v in columns[name].tolist()] if name in floats
             else columns[name].tolist() for name in PER_REQUEST_COLUMNS]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PER_REQUEST_COLUMNS)
        writer.writerows(zip(*cells))
    return rows


def table(records: List[dict], with_max_rate: bool, with_swap: bool = False, with_cache: bool = False,
           wide: bool = False, host_tier: bool = False, fleet: bool = False) -> str:
    slo = records[0]["slo"]
    other = "strict" if slo == "lax" else "lax"
    paired = len(records) > 1 and len(records[0].get("seeds", [])) > 1
    columns = [  # title (with its unit), value of a record, format (its width sets the column's), wide only
        ("admission", lambda r: r["admission"], "{:<13}", False),
        ("done", lambda r: r["completed"], "{:>6.0f}", False), ("rej", lambda r: r["rejected"], "{:>5.0f}", False),
        ("TTFT50 s", lambda r: r["ttft_p50_s"], "{:>9.2f}", False),
        ("TTFT99 s", lambda r: r["ttft_p99_s"], "{:>9.2f}", False),
        ("TPOT50 s", lambda r: r["tpot_p50_s"], "{:>9.3f}", True),
        ("TPOT99 s", lambda r: r["tpot_p99_s"], "{:>9.3f}", False),
        ("gap99 s", lambda r: r["max_gap_p99_s"], "{:>8.2f}", False),
        (f"{slo} %", lambda r: with_interval(r[f"slo_{slo}"], "attainment", 100, bounds=(0, 100)), "{:>16}", False),
        ("Δ pp", lambda r: with_interval(r["paired_difference"], "attainment", 100, signed=True,
                                         bounds=(-100, 100)), "{:>12}", not paired),
        (f"{other} %", lambda r: with_interval(r[f"slo_{other}"], "attainment", 100, bounds=(0, 100)), "{:>16}",
         True),
        ("good r/s", lambda r: r["goodput_req_s"], "{:>9.2f}", False),
        ("good t/s", lambda r: r["goodput_tok_s"], "{:>9.0f}", True),
        ("preempt", lambda r: r["preemptions"], "{:>8.0f}", False),
        ("KV use", lambda r: r["kv_utilization"], "{:>7.1%}", True),
        ("step us", lambda r: r["step_cpu_us_mean"], "{:>8.0f}", False),
        ("step99 us", lambda r: r["step_cpu_us_p99"], "{:>10.0f}", True),
    ]
    if with_swap:
        columns.insert(-3, ("swapped", lambda r: r["swap_preemptions"], "{:>8.0f}", False))
        columns.insert(-3, ("swap GB", lambda r: r["swap_bytes"] / 1e9, "{:>8.1f}", False))
    if with_cache:  # prompt tokens the prefix cache saved, of all prompt tokens sent
        columns.insert(-3, ("GPU hit", lambda r: r["prefix_hit_tokens"] / max(r["prompt_tokens"], 1), "{:>8.1%}", False))
    if with_cache and host_tier:
        columns.insert(-3, ("host hit", lambda r: r["host_hit_tokens"] / max(r["prompt_tokens"], 1), "{:>9.1%}", False))
        columns.insert(-3, ("copy GB", lambda r: (r["cache_write_bytes"] + r["cache_load_bytes"]) / 1e9, "{:>8.1f}",
                            False))
    if fleet:  # a row per (admission, dispatch, migration): the run's name, and what the fleet did
        width = max(len(r["run"]) for r in records) + 1
        columns[0] = ("run", lambda r: r["run"], f"{{:<{width}}}", False)
        columns.insert(-3, ("migr", lambda r: (r["fleet"]["migration"] or {}).get("committed", 0), "{:>6.0f}", False))
        columns.insert(-3, ("spread", lambda r: r["fleet"]["load_spread"], "{:>7.1%}", False))
    if with_max_rate:
        columns.append(("max r/s@90%", max_rate_text, "{:>14}", False))
    columns = [(title, value, fmt) for title, value, fmt, wide_only in columns if wide or not wide_only]
    header = "".join(pad(title, fmt) for title, _, fmt in columns)
    lines = [header, "-" * len(header)]
    lines += ["".join(fmt.format(value(r)) for _, value, fmt in columns) for r in records]
    return "\n".join(lines)


def with_interval(record: dict, key: str, scale: float = 1.0, signed: bool = False,
                  bounds: Optional[tuple] = None) -> str:
    """``mean±half-width`` of a figure (the mean alone for one seed); an interval that would pass
    ``bounds`` (what the figure can take, e.g. 0-100%) is clipped there and shown as ``mean[low,high]``."""
    value, half = record[key] * scale, (record.get(f"{key}_ci95") or 0.0) * scale
    text = tenths(value, signed)
    if half <= 0:
        return text
    if bounds is not None and (value - half < bounds[0] or value + half > bounds[1]):
        low, high = max(bounds[0], value - half), min(bounds[1], value + half)
        return f"{text}[{_short(low, signed)},{_short(high, signed)}]"
    return f"{text}±{tenths(half)}"


def tenths(value: float, signed: bool = False) -> str:
    """One decimal; a nonzero value that would read 0.0 keeps two significant digits instead (one
    request in thousands is a difference, and a verdict may rest on it)."""
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    if value != 0 and float(text) == 0:
        text = f"{value:+.2g}" if signed else f"{value:.2g}"
    return text


def _short(value: float, signed: bool) -> str:
    """A bound in few characters: 100, 0, 97.3."""
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def max_rate_text(record: dict) -> str:
    text = f"{record['max_rate_req_s_90']:.2f}"
    half = record.get("max_rate_req_s_90_ci95")
    if half and half > record["max_rate_req_s_90"]:  # a rate is at least 0
        text += f"[0,{record['max_rate_req_s_90'] + half:.2f}]"
    elif half:
        text += f"±{half:.2f}"
    return (">=" if record.get("max_rate_capped") else "") + text


def pad(name: str, fmt: str) -> str:
    """The column title aligned like the values that ``fmt`` (e.g. ``{:>9.2f}``) formats."""
    spec = fmt[fmt.index(":") + 1 : -1]
    width = int(re.match(r"[<>]?(\d+)", spec).group(1))
    return name.ljust(width) if spec.startswith("<") else name.rjust(width)


def plot_formats() -> List[str]:
    """File extensions :func:`plot_cdfs` can write (matplotlib's, with the Agg backend)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def plot_cdfs(logs: list, path: str, title: str, slo, image_format: Optional[str] = None) -> None:
    """Writes the CDFs to ``path`` as ``image_format`` (default: from the path's extension)."""
    import matplotlib  # present: _check_options refused --plot before the run otherwise

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for log in logs:
        done = ~np.isnan(log.finish_s)
        for ax, values in ((axes[0], (log.first_token_s - log.arrival_s)[done]), (axes[1], log.max_gap_s[done])):
            ordered = np.sort(values)
            ax.plot(ordered, np.arange(1, ordered.size + 1) / max(ordered.size, 1), label=log.run or log.admission)
    gap_label = f"SLO {slo.name}: {'worst' if slo.gap_kind == 'max' else 'p99'} gap {slo.gap_s:g} s"
    for ax, bound, label, xlabel in ((axes[0], slo.ttft_s, f"SLO {slo.name}: TTFT {slo.ttft_s:g} s", "TTFT (s)"),
                                     (axes[1], slo.gap_s, gap_label, "worst inter-token gap (s)")):
        ax.axvline(bound, color="black", linestyle="--", linewidth=1, label=label)
        ax.set_xlabel(xlabel)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(left=0)  # times are never negative: no margin, and no tick, below zero
        ax.set_ylabel("fraction of completed requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=image_format or os.path.splitext(path)[1][1:].lower())
    plt.close(fig)


class OutputFiles:
    """The files one command writes, all or nothing.

    Each target (``{option: path}``; None or "" for an option not given) is checked and reserved
    before the run by creating a temporary file beside it, so that a directory, a missing folder
    or a folder that cannot be written is refused before any work. Writers write to
    :meth:`temp`; :meth:`commit` renames every temporary file over its target once all are written.
    Leaving the ``with`` block without a commit (an error in the run or in any writer) removes the
    temporary files and touches no target.
    """

    def __init__(self, targets: Dict[str, Optional[str]], inputs: Optional[Dict[str, Optional[str]]] = None):
        self._targets: Dict[str, str] = {}  # option -> the real path it replaces
        self._temps: Dict[str, str] = {}
        given = {option: path for option, path in targets.items() if path is not None}
        # An input named as an output would be replaced by the run's results.
        seen = {os.path.realpath(path): option for option, path in (inputs or {}).items() if path}
        for option, path in given.items():
            real = _check_target(option, path)
            if real in seen:
                raise ValueError(f"{option}: {path} is also {seen[real]}'s file")
            seen[real] = option
            self._targets[option] = real
        try:
            for option, real in self._targets.items():
                folder, name = os.path.split(real)
                try:
                    handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
                except OSError as error:
                    raise ValueError(f"{option}: cannot write in {folder}: {error.strerror}") from None
                os.close(handle)
                self._temps[option] = temp
        except BaseException:
            self.discard()
            raise

    def __enter__(self) -> "OutputFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def temp(self, option: str) -> str:
        """Where ``option``'s file is written until the commit."""
        return self._temps[option]

    def commit(self) -> None:
        """Moves every written file into place (permissions as a plain ``open`` would give)."""
        umask = os.umask(0)
        os.umask(umask)
        for option, temp in list(self._temps.items()):
            target = self._targets[option]
            mode = os.stat(target).st_mode & 0o7777 if os.path.exists(target) else 0o666 & ~umask
            os.chmod(temp, mode)
            os.replace(temp, target)
            del self._temps[option]

    def discard(self) -> None:
        for temp in self._temps.values():
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
        self._temps.clear()


def _check_target(option: str, path: str) -> str:
    """The real path ``option`` would replace, refused (ValueError naming the option) unless it
    is, or can become, a regular file in an existing folder."""
    if not path.strip():
        raise ValueError(f"{option}: the file name is empty")
    folder = os.path.dirname(os.path.abspath(path))
    real = os.path.realpath(path)
    if not os.path.isdir(os.path.dirname(real)):
        raise ValueError(f"{option}: folder {folder} does not exist")
    if os.path.isdir(real):
        raise ValueError(f"{option}: {path} is a directory")
    if os.path.lexists(real) and not os.path.isfile(real):
        raise ValueError(f"{option}: {path} exists and is not a regular file")
    if os.path.exists(real) and not os.access(real, os.W_OK):
        raise ValueError(f"{option}: {path} is not writable")
    return real
