"""Trace reading, the built-in workload, the allocator replay and its command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvsched.cli import main
from kvsched.sim.allocator_replay import replay_placement
from kvsched.sim.traces import Trace, TraceError, read_azure
from kvsched.sim.workloads import synthetic_chat

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path, text, name="trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_azure_excerpt(tmp_path):
    path = write(
        tmp_path,
        AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109",
    )
    trace = read_azure(path)
    assert len(trace) == 2
    assert trace.prompt_tokens.tolist() == [374, 396] and trace.output_tokens.tolist() == [44, 109]
    assert trace.arrival_s[0] == 0.0 and trace.arrival_s[1] == pytest.approx(4.314579)


@pytest.mark.parametrize(
    "body,message",
    [
        ("2023-11-16 18:15:46.68,374\n", r"trace.csv:2: expected 3 fields"),
        ("2023-11-16 18:15:46.68,abc,44\n", r"trace.csv:2: field 'ContextTokens' is not an integer"),
        ("2023-11-16 18:15:46.68,374,44\nnot-a-time,1,1\n", r"trace.csv:3: field 'TIMESTAMP'"),
        ("2023-11-16 18:15:46.68,374,-4\n", r"trace.csv:2: field 'GeneratedTokens' must be >= 1"),
        ("", r"has no requests"),
    ],
)
def test_read_azure_names_file_line_and_field(tmp_path, body, message):
    with pytest.raises(TraceError, match=message):
        read_azure(write(tmp_path, AZURE_HEADER + body))


def test_read_azure_rejects_wrong_header_and_missing_file(tmp_path):
    with pytest.raises(TraceError, match="header must be"):
        read_azure(write(tmp_path, "a,b,c\n1,2,3\n"))
    with pytest.raises(TraceError, match="no such file"):
        read_azure(tmp_path / "missing.csv")


def test_synthetic_chat_matches_published_statistics():
    trace = synthetic_chat(20000, seed=3)
    assert np.median(trace.prompt_tokens) == pytest.approx(1020, rel=0.05)
    assert trace.prompt_tokens.mean() == pytest.approx(1155, rel=0.05)
    assert np.median(trace.output_tokens) == pytest.approx(129, rel=0.06)
    assert trace.output_tokens.mean() == pytest.approx(211, rel=0.08)
    assert np.all(np.diff(trace.arrival_s) >= 0)
    with pytest.raises(ValueError, match="rate_per_s"):
        synthetic_chat(10, rate_per_s=0)


def test_replay_completes_every_request_and_placement_matters():
    trace = synthetic_chat(600, seed=1)
    reports = {p: replay_placement(trace, p, num_blocks=4096) for p in ("contiguous", "fifo", "lifo")}
    for report in reports.values():
        assert report.completed == 600
    # Same request sequence, same admission decisions: only placement differs.
    assert len({r.preemptions for r in reports.values()}) == 1
    assert reports["contiguous"].mean_blocks_per_extent > 5 * reports["fifo"].mean_blocks_per_extent
    assert reports["contiguous"].mean_blocks_per_extent > 5 * reports["lifo"].mean_blocks_per_extent


def test_replay_under_memory_pressure_preempts_and_still_completes():
    trace = synthetic_chat(400, rate_per_s=40.0, seed=2)
    report = replay_placement(trace, "contiguous", num_blocks=2048)
    assert report.completed == 400
    assert report.preemptions > 0


def test_contiguity_on_azure_conv_is_several_times_a_free_list(trace_dir):
    trace = read_azure(trace_dir / "AzureLLMInferenceTrace_conv.csv").head(3000)
    assert len(trace) == 3000
    for rate in (1.0, 2.0):
        scaled = Trace(trace.arrival_s / rate, trace.prompt_tokens, trace.output_tokens)
        contiguous = replay_placement(scaled, "contiguous").mean_blocks_per_extent
        for baseline in ("fifo", "lifo"):
            assert contiguous > 4 * replay_placement(scaled, baseline).mean_blocks_per_extent


def test_cli_allocator_replay_prints_table_and_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["allocator-replay", "--num-requests", "300", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "contiguous" in printed and "blocks/extent" in printed
    records = json.loads(out.read_text())
    assert [r["placement"] for r in records] == ["contiguous", "lifo", "fifo"]
    assert all(r["completed"] == 300 for r in records)


def test_cli_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["allocator-replay", "--trace", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["allocator-replay", "--rate-scale", "0"])
