"""`kvsched simulate` (and `allocator-replay`) under hostile input: bad traces, bad option values,
bad output paths. Every refusal is one line on stderr naming the file, line and field or the option
(with the bound it breaks), exit status 2, no traceback and no output file left behind; good input
still runs. Runs are tiny (a few requests, one seed, one admission mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import kvsched.cli
import kvsched.sim.driver
from kvsched.cli import main

TINY = ["--num-requests", "12", "--seeds", "1", "--admission", "oracle"]
AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZURE_ROW = "2023-11-16 18:15:46.6805900,100,10\n"
VIDUR = "arrived_at,num_prefill_tokens,num_decode_tokens\n"
MOONCAKE_ROW = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}\n'


def refusal(argv, capsys) -> str:
    """Runs the CLI with ``argv``; asserts exit status 2 and a one-line error; returns the line."""
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's refusals
        status = exit_info.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def files(folder) -> set:
    return {entry.name for entry in folder.iterdir()}


@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if a simulation starts: a refusal must come before any run."""

    def never(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(kvsched.sim.driver, "simulate", never)
    monkeypatch.setattr(kvsched.sim.driver, "simulate_fleet", never)


# ---- traces: the file, the line and the field --------------------------------------------------------

AZURE_CASES = [
    # (the bad line, the field the error must name)
    ("NaT,100,10\n", "'TIMESTAMP'"),
    (",100,10\n", "'TIMESTAMP'"),
    ("now,100,10\n", "'TIMESTAMP'"),
    ("9999-01-01 00:00:00,100,10\n", "'TIMESTAMP'"),  # past datetime64[ns]: wrapped silently
    ("2023-02-30 00:00:00,100,10\n", "'TIMESTAMP'"),
    ("2023-11-16 18:15:47,1000000000000000000000000000000,10\n", "'ContextTokens'"),
    ("2023-11-16 18:15:47,1e30,10\n", "'ContextTokens'"),
    ("2023-11-16 18:15:47,100,-5\n", "'GeneratedTokens'"),
    ("2023-11-16 18:15:47,100,nan\n", "'GeneratedTokens'"),
    ("2023-11-16 18:15:47,100,inf\n", "'GeneratedTokens'"),
    ("2023-11-16 18:15:47,100,10.5\n", "'GeneratedTokens'"),
    ("2023-11-16 18:15:47,100\n", "expected 3 fields"),
    ("2023-11-16 18:15:47,100," + "9" * 5000 + "\n", "'GeneratedTokens'"),
    ("x" * 200_000 + ",1,1\n", "not a valid CSV record"),  # past the csv module's field limit
]


@pytest.mark.parametrize("row, field", AZURE_CASES)
def test_bad_azure_lines_name_the_file_line_and_field(row, field, tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text(AZURE + AZURE_ROW + row)
    line = refusal(["simulate", "--trace", str(path), *TINY, "--json", str(tmp_path / "r.json")], capsys)
    assert f"{path}:3:" in line and field in line
    assert files(tmp_path) == {"t.csv"}


def test_azure_bytes_that_are_not_utf8_name_their_line(tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_bytes((AZURE + AZURE_ROW).encode() + b"2023-11-16 18:15:47,\xff\xfe,10\n")
    assert f"{path}:3: not UTF-8" in refusal(["simulate", "--trace", str(path), *TINY], capsys)


def test_azure_timestamps_spanning_centuries_are_refused(tmp_path, capsys):
    # 550 years of nanoseconds wrap int64: the arrivals came out negative and unordered.
    path = tmp_path / "t.csv"
    path.write_text(AZURE + "1700-01-01 00:00:00,100,10\n2250-01-01 00:00:00,100,10\n")
    line = refusal(["simulate", "--trace", str(path), *TINY], capsys)
    assert str(path) in line and "arrivals span" in line and "must be <=" in line


MOONCAKE_CASES = [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    # Python 3.12's parser takes 5000 levels where 3.11's recursed too deeply: refused either way.
    ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": ' + "[" * 5000 + "]" * 5000 + "}",
     ("nested too deeply", "'hash_ids' item 0 must be an integer")),
    ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 18446744073709551621]}',
     "'hash_ids' item 1"),
    ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [9223372036854775813]}',
     "'hash_ids' item 0"),
    ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [-1]}', "'hash_ids' item 0"),
    ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [true]}', "'hash_ids' item 0"),
    ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": 7}', "'hash_ids'"),
    ('{"timestamp": 0, "input_length": 1000000000000000000000000000000, "output_length": 5}', "'input_length'"),
    ('{"timestamp": 0, "input_length": 1e30, "output_length": 5}', "'input_length'"),
    ('{"timestamp": 0, "input_length": "600", "output_length": 5}', "'input_length'"),
    ('{"timestamp": 0, "input_length": true, "output_length": 5}', "'input_length'"),
    ('{"timestamp": 0, "input_length": 600, "output_length": -5}', "'output_length'"),
    ('{"timestamp": 0, "input_length": 600}', "'output_length' is missing"),
    ('{"timestamp": NaN, "input_length": 600, "output_length": 5}', "'timestamp'"),
    ('{"timestamp": Infinity, "input_length": 600, "output_length": 5}', "'timestamp'"),
    ('{"timestamp": -1, "input_length": 600, "output_length": 5}', "'timestamp'"),
    ('{"timestamp": "0", "input_length": 600, "output_length": 5}', "'timestamp'"),
    ('{"timestamp": ' + "9" * 400 + ', "input_length": 600, "output_length": 5}', "'timestamp'"),
    ('{"timestamp": 0, "input_length": ' + "9" * 5000 + ', "output_length": 5}', "too many digits"),
    ("[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("text, what", MOONCAKE_CASES, ids=range(len(MOONCAKE_CASES)))
def test_bad_mooncake_lines_name_the_file_line_and_field(text, what, tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text(MOONCAKE_ROW + text + "\n")
    argv = ["simulate", "--trace", str(path), "--trace-format", "mooncake", *TINY, "--json", str(tmp_path / "r.json")]
    line = refusal(argv, capsys)
    assert f"{path}:2:" in line and any(w in line for w in ((what,) if isinstance(what, str) else what))
    assert files(tmp_path) == {"t.jsonl"}


def test_mooncake_timestamps_too_far_apart_are_refused(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text(MOONCAKE_ROW + '{"timestamp": 1e300, "input_length": 600, "output_length": 5}\n')
    line = refusal(["simulate", "--trace", str(path), *TINY], capsys)
    assert str(path) in line and "arrivals span" in line


VIDUR_CASES = [
    ("nan,100,10", "'arrived_at'"),
    ("inf,100,10", "'arrived_at'"),
    ("-1,100,10", "'arrived_at'"),
    ("0.5,100", "'num_decode_tokens' is missing"),
    ("0.5,1000000000000000000000000000000,10", "'num_prefill_tokens'"),
    ("0.5,100,1_000", "'num_decode_tokens'"),
]


@pytest.mark.parametrize("row, field", VIDUR_CASES)
def test_bad_vidur_lines_name_the_file_line_and_field(row, field, tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text(VIDUR + "0.1,100,10\n" + row + "\n")
    line = refusal(["simulate", "--trace", str(path), *TINY], capsys)
    assert f"{path}:3:" in line and field in line


def test_a_trace_that_is_a_directory_is_named(tmp_path, capsys):
    assert f"{tmp_path}: not a regular file" in refusal(["simulate", "--trace", str(tmp_path), *TINY], capsys)


# ---- options: refused by name, with the bound --------------------------------------------------------

OPTION_CASES = [
    # (arguments, what the error must say)
    (["--num-requests", str(10**12)], "--num-requests: must be <= 1000000"),
    (["--num-requests", "1e3"], "--num-requests: must be an integer"),
    (["--num-requests", "0"], "--num-requests: must be >= 1"),
    (["--clients", str(10**12)], "--clients: must be <= 1000000"),
    (["--seeds", str(10**6)], "--seeds: must be <= 100"),
    (["--seed", str(2**70)], "--seed: must be <="),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--rate-scale", "0"], "--rate-scale: must be >="),
    (["--rate-scale", "-2"], "--rate-scale: must be >="),
    (["--rate-scale", "nan"], "--rate-scale: must be a finite number"),
    (["--rate-scale", "inf"], "--rate-scale: must be a finite number"),
    (["--rate-scale", "1e-300"], "--rate-scale: must be >= 1e-06"),
    (["--rate", "nan"], "--rate: must be a finite number"),
    (["--rate", "1e-300"], "--rate: must be >= 1e-06"),
    (["--think-time", "nan", "--workload", "multi_turn"], "--think-time: must be a finite number"),
    (["--think-time", "-1", "--workload", "multi_turn"], "--think-time: must be >= 0"),
    (["--think-time", "1e300", "--workload", "multi_turn"], "--think-time: must be <="),
    (["--kv-capacity-tokens", str(10**12)], "--kv-capacity-tokens 1000000000000: 62500000000 blocks"),
    (["--kv-capacity-tokens", "-5"], "--kv-capacity-tokens: must be >= 1"),
    (["--host-kv-tokens", str(10**12)], "--host-kv-tokens 1000000000000:"),
    (["--host-kv-tokens", "4"], "--host-kv-tokens 4: less than one block"),
    (["--block-size", str(10**12)], "--block-size: must be <= 65536"),
    (["--block-size", "0"], "--block-size: must be >= 1"),
    (["--block-size", "65536", "--kv-capacity-tokens", "1000"], "--block-size 65536: larger than the KV cache"),
    (["--max-model-len", str(10**12)], "--max-model-len: must be <= 16777216"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--max-num-seqs", str(10**12)], "--max-num-seqs: must be <="),
    (["--max-num-batched-tokens", str(10**12)], "--max-num-batched-tokens: must be <="),
    (["--max-num-batched-tokens", "8"], "--max-num-batched-tokens: max_num_batched_tokens (8) must be >="),
    (["--max-prefill-chunk", "-1"], "--max-prefill-chunk: must be >= 0"),
    (["--prefill-attention-budget", str(2**62)], "--prefill-attention-budget: must be <="),
    (["--instances", str(10**6)], "--instances: must be <="),
    (["--instances", "2", "--kv-capacity-tokens", "67108864", "--block-size", "1"],
     "--kv-capacity-tokens 67108864: 67108864 blocks of 1 tokens; must be <= 4194304"),
    (["--instances", "4096", "--kv-capacity-tokens", "200000"], "--instances 4096:"),
    (["--instances", "2", "--migration", "on", "--link-bandwidth-gbps", "1e-300"], "--link-bandwidth-gbps: must be >="),
    (["--instances", "2", "--migration", "on", "--link-bandwidth-gbps", "nan"],
     "--link-bandwidth-gbps: must be a finite"),
    (["--instances", "2", "--migration", "on", "--link-latency-us", "inf"], "--link-latency-us: must be a finite"),
    (["--instances", "2", "--migration", "on", "--link-latency-us", "-1"], "--link-latency-us: must be >= 0"),
    (["--instances", "2", "--dispatch", "prefix_affinity", "--imbalance-limit", "nan"], "--imbalance-limit: must be a"),
    (["--instances", "2", "--dispatch", "prefix_affinity", "--imbalance-limit", "5"],
     "--imbalance-limit: must be <= 1"),
    (["--policy", "deadline"], "--policy deadline orders by arrival + each class's TTFT SLO"),
    (["--policy", "vtc"], "--policy vtc shares the engine among clients, and this run's requests have none"),
    (["--policy", "vtc", "--priorities", "markov"], "--priorities: only the priority policy uses priorities"),
    (["--policy", "sjf"], "--policy: unknown ordering policy 'sjf'; choose from fcfs, priority, vtc, deadline"),
]


@pytest.mark.parametrize("argv, message", OPTION_CASES, ids=[" ".join(a)[:60] for a, _ in OPTION_CASES])
def test_bad_option_values_are_refused_by_name_before_running(argv, message, tmp_path, capsys, no_run):
    out = tmp_path / "r.json"
    line = refusal(["simulate", *TINY, *argv, "--json", str(out)], capsys)
    assert message in line
    assert "num_blocks" not in line.replace("--", "")  # the option, not the scheduler's field
    assert files(tmp_path) == set()


def test_default_request_count_of_a_large_fleet_is_bounded(capsys, no_run):
    line = refusal(["simulate", "--instances", "1000", "--seeds", "1"], capsys)
    assert "--instances 1000:" in line and "must be <= 1000000" in line and "--num-requests" in line


def test_a_block_size_that_holds_no_prompt_is_named_not_the_capacity(tmp_path, capsys):
    # 5000 tokens hold a 3000-token prompt, but blocks of 3000 tokens leave room for only one block.
    path = tmp_path / "t.csv"
    path.write_text(VIDUR + "0.0,3000,10\n0.5,3500,10\n")
    line = refusal(["simulate", "--trace", str(path), *TINY, "--kv-capacity-tokens", "5000", "--block-size", "3000"],
                   capsys)
    assert line.startswith("kvsched simulate: error: --block-size 3000:") and "none of the prompts" in line


def test_a_rate_scale_too_small_for_the_trace_is_named(tmp_path, capsys, no_run):
    path = tmp_path / "t.csv"
    path.write_text(VIDUR + "0.0,100,10\n2000.0,100,10\n")
    line = refusal(["simulate", "--trace", str(path), *TINY, "--rate-scale", "1e-6"], capsys)
    assert "--rate-scale 1e-06: the arrivals would span" in line and "must be <=" in line


def test_a_rate_too_low_for_the_workload_is_named(capsys, no_run):
    line = refusal(["simulate", "--num-requests", "2000", "--seeds", "1", "--rate", "1e-6"], capsys)
    assert "--rate 1e-06: the arrivals would span" in line


# ---- outputs: checked before the run, all or nothing ----------------------------------------------------

@pytest.mark.parametrize("option", ["--json", "--per-request", "--plot"])
def test_an_output_that_is_a_directory_is_refused_before_the_run(option, tmp_path, capsys, no_run):
    pytest.importorskip("matplotlib")
    folder = tmp_path / ("out.csv" if option == "--per-request" else "out.png")
    folder.mkdir()
    line = refusal(["simulate", *TINY, option, str(folder)], capsys)
    assert f"{option}: {folder} is a directory" in line


def test_outputs_that_are_not_regular_files_or_collide_are_refused(tmp_path, capsys, no_run):
    assert "--json: /dev/null exists and is not a regular file" in refusal(
        ["simulate", *TINY, "--json", "/dev/null"], capsys)
    same = str(tmp_path / "r.csv")
    assert "is also --json's file" in refusal(["simulate", *TINY, "--json", same, "--per-request", same], capsys)
    trace = tmp_path / "t.csv"
    trace.write_text(VIDUR + "0.0,100,10\n")
    assert "is also --trace's file" in refusal(["simulate", "--trace", str(trace), *TINY, "--json", str(trace)],
                                               capsys)
    assert "--json: the file name is empty" in refusal(["simulate", *TINY, "--json", ""], capsys)
    assert "--plot:" in refusal(["simulate", *TINY, "--plot", str(tmp_path / "p.xyz")], capsys)
    assert files(tmp_path) == {"t.csv"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any folder")
def test_an_unwritable_output_folder_is_refused_before_the_run(tmp_path, capsys, no_run):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    assert "--json: cannot write in" in refusal(["simulate", *TINY, "--json", str(folder / "r.json")], capsys)


@pytest.mark.parametrize("failing", ["write_per_request", "plot_cdfs"])
def test_a_failing_later_output_leaves_no_earlier_one_behind(failing, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kvsched.cli, failing, disk_full)
    old = tmp_path / "old.json"
    old.write_text("[]")  # an earlier run's file is left as it was
    argv = ["simulate", *TINY, "--json", str(old), "--per-request", str(tmp_path / "r.csv"),
            "--plot", str(tmp_path / "p.png")]
    assert "No space left on device" in refusal(argv, capsys)
    assert files(tmp_path) == {"old.json"} and old.read_text() == "[]"


# ---- good input still works ------------------------------------------------------------------------------

def test_every_output_is_written_and_no_temporary_file_is_left(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["simulate", *TINY, "--json", str(tmp_path / "r.json"), "--per-request", str(tmp_path / "r.csv"),
            "--plot", str(tmp_path / "p.png")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert files(tmp_path) == {"r.json", "r.csv", "p.png"}
    assert len(json.loads((tmp_path / "r.json").read_text())) == 1
    assert "wrote" in out and (tmp_path / "r.csv").read_text().count("\n") == 13
    assert oct((tmp_path / "r.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_good_traces_of_every_format_run(tmp_path, capsys):
    azure = tmp_path / "a.csv"
    azure.write_text(AZURE + AZURE_ROW + "2023-11-16 18:15:47.1,200,20\n2023-11-16T18:15:48,50,5\n")
    mooncake = tmp_path / "m.jsonl"
    mooncake.write_text(MOONCAKE_ROW + '{"timestamp": 500.5, "input_length": 700, "output_length": 8}\n')
    vidur = tmp_path / "v.csv"
    vidur.write_text(VIDUR + "0.0,100,10\n 0.5 , +120 , 12 \n")
    for path in (azure, mooncake, vidur):
        assert main(["simulate", "--trace", str(path), *TINY, "--json", str(tmp_path / "r.json")]) == 0
        assert json.loads((tmp_path / "r.json").read_text())[0]["completed"] >= 2
    capsys.readouterr()


def test_limits_themselves_are_accepted(tmp_path, capsys):
    argv = ["simulate", *TINY, "--rate-scale", "1e6", "--seed", str(2**62), "--max-model-len", str(2**24),
            "--think-time", "1e6", "--workload", "multi_turn", "--block-size", "65536", "--kv-capacity-tokens",
            str(2**22 * 2**16)]
    assert main(argv) == 0
    capsys.readouterr()


def test_allocator_replay_refuses_bad_outputs_and_options(tmp_path, capsys):
    assert "--json: " in refusal(["allocator-replay", "--num-requests", "20", "--json", str(tmp_path)], capsys)
    assert "--num-blocks: must be <=" in refusal(["allocator-replay", "--num-blocks", str(10**12)], capsys)
    assert "--seed: must be >= 0" in refusal(["allocator-replay", "--seed", "-1"], capsys)
    assert main(["allocator-replay", "--num-requests", "20", "--json", str(tmp_path / "a.json")]) == 0
    assert files(tmp_path) == {"a.json"}
    capsys.readouterr()


def test_real_azure_trace_runs(trace_dir, capsys):
    argv = ["simulate", "--trace", str(trace_dir / "AzureLLMInferenceTrace_conv.csv"), *TINY]
    assert main(argv) == 0
    capsys.readouterr()


# ---- in a child process: a hang or a crash is a failure ---------------------------------------------

@pytest.mark.parametrize("case", ["deep_json", "nat", "tiny_rate_scale"])
def test_child_process_gets_one_line_and_status_2(case, tmp_path):
    argv = ["simulate", *TINY]
    if case == "deep_json":
        path = tmp_path / "t.jsonl"
        path.write_text('{"a": ' * 200_000 + "0" + "}" * 200_000 + "\n")
        argv += ["--trace", str(path), "--trace-format", "mooncake"]
    elif case == "nat":
        path = tmp_path / "t.csv"
        path.write_text(AZURE + AZURE_ROW + "NaT,100,10\n")
        argv += ["--trace", str(path)]
    else:
        argv += ["--rate-scale", "1e-320"]
    result = subprocess.run([sys.executable, "-m", "kvsched.cli", *argv, "--json", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "r.json" not in files(tmp_path)


@pytest.mark.parametrize("argv, hint", [
    (["--polcy", "fcfs"], "--polcy: did you mean --policy?"),
    (["--admision", "oracle"], "--admision: did you mean --admission?"),
    (["--kv-capacty-tokens=4096"], "--kv-capacty-tokens: did you mean --kv-capacity-tokens?"),
])
def test_a_misspelt_option_is_named_by_simulate_with_the_closest_one(argv, hint, capsys, no_run):
    line = refusal(["simulate", *TINY, *argv], capsys)
    assert line.startswith("kvsched simulate: error: unrecognized arguments: ")  # simulate's, not the top level's
    assert hint in line and "(see kvsched simulate --help)" in line


def test_an_option_nothing_resembles_gets_no_guess(capsys, no_run):
    line = refusal(["simulate", *TINY, "--zzzzzz"], capsys)
    assert "unrecognized arguments: --zzzzzz" in line and "did you mean" not in line


def test_an_unknown_option_before_the_command_is_the_top_levels(capsys):
    line = refusal(["--bogus", "simulate", *TINY], capsys)
    assert line.startswith("kvsched: error: unrecognized arguments: --bogus")


def test_an_admission_mode_given_twice_is_refused(capsys, no_run):
    line = refusal(["simulate", "--num-requests", "12", "--seeds", "1", "--admission", "aggressive,aggressive"],
                   capsys)
    assert "admission mode aggressive given more than once" in line
