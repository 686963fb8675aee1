"""The simulator and `kvsched simulate`: readers, conservation, policy behaviour, determinism, CLI."""

from __future__ import annotations

import json

from dataclasses import replace

import numpy as np
import pytest

from kvsched.cli import main
from kvsched.sim.driver import simulate
from kvsched.sim.engine import LAX, EngineConfig, prepare
from kvsched.sim.metrics import summarize
from kvsched.sim.profiles import PROFILES
from kvsched.sim.traces import TraceError, guess_format, read_length_csv, read_mooncake, read_trace
from kvsched.sim.workloads import BUILT_IN_DEFAULTS, poisson_arrivals, priority_plan, synthetic

A100 = PROFILES["llama3-8b-a100"]


def run(trace, admission, capacity, **kw):
    engine = EngineConfig(A100, capacity, **kw)
    prepared = prepare(trace, engine)
    return prepared, simulate(prepared, engine, admission)


def test_vidur_and_sharegpt_readers(tmp_path):
    vidur = tmp_path / "v.csv"
    vidur.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,100,20\n0.1,50,5\n")
    with pytest.warns(UserWarning, match="1 requests come before .* timestamp order"):
        trace = read_trace(vidur, "vidur")
    assert trace.arrival_s.tolist() == [0.0, 0.4] and trace.prompt_tokens.tolist() == [50, 100]
    share = tmp_path / "s.csv"
    share.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n74,918,992,0.08\n")
    assert read_trace(share, "sharegpt").output_tokens.tolist() == [918]
    assert guess_format(vidur) == "vidur" and guess_format(share) == "sharegpt"
    with pytest.raises(TraceError, match="missing column.*arrived_at"):
        read_length_csv(share, require_arrivals=True)
    bad = tmp_path / "b.csv"
    bad.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.1,50,5\n0.2,-3,5\n")
    with pytest.raises(TraceError, match=r"b.csv:3: field 'num_prefill_tokens' must be >= 1"):
        read_trace(bad, "vidur")


def test_mooncake_reader_keeps_prefix_ids(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"timestamp": 1000, "input_length": 600, "output_length": 3, "hash_ids": [0, 1]}\n'
        '{"timestamp": 0, "input_length": 100, "output_length": 2, "hash_ids": [0]}\n'
    )
    with pytest.warns(UserWarning, match="timestamp order"):
        trace = read_mooncake(path)
    assert trace.arrival_s.tolist() == [0.0, 1.0] and trace.prefix_block_tokens == 512
    assert [ids.tolist() for ids in trace.prefix_ids] == [[0], [0, 1]]
    path.write_text('{"timestamp": 0, "input_length": 10}\n')
    with pytest.raises(TraceError, match="m.jsonl:1: field 'output_length' is missing"):
        read_mooncake(path)
    path.write_text("{not json\n")
    with pytest.raises(TraceError, match="m.jsonl:1: not valid JSON"):
        read_mooncake(path)


def test_shared_prefixes_hit_the_prefix_cache(tmp_path):
    lines = [
        f'{{"timestamp": {i * 100}, "input_length": 1500, "output_length": 4, "hash_ids": [7, 8, {100 + i}]}}'
        for i in range(5)
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prepared, log = run(read_mooncake(path), "past_future", 65536)
    assert np.isnan(log.finish_s).sum() == 0
    # Later requests reuse the first two 512-token prefix blocks: less prefill, so a faster TTFT.
    ttft = log.first_token_s - log.arrival_s
    assert ttft[1:].max() < ttft[0]


def test_every_request_completes_or_is_rejected_and_oracle_never_preempts():
    trace = synthetic("chat", 300, 5.0, seed=3)
    prepared, log = run(trace, "oracle", 400_000)
    assert (~np.isnan(log.finish_s)).sum() + log.rejected.sum() == len(prepared.trace)
    assert log.preemptions.sum() == 0
    record = summarize(log, LAX)
    assert record["completed"] == 300 and record["slo_attainment"] > 0.9


def test_tight_memory_aggressive_preempts_and_past_future_preempts_less():
    trace = synthetic("chat", 600, 8.0, seed=1)
    _, aggressive = run(trace, "aggressive", 32768)
    _, past_future = run(trace, "past_future", 32768)
    assert aggressive.preemptions.sum() > 50
    assert past_future.preemptions.sum() * 3 < aggressive.preemptions.sum()


def test_keyed_draws_preempt_less_than_fresh_draws_each_step():
    # Fresh draws at every step admit at the first step whose draws are low; keyed draws keep
    # each request's draws, so the scenarios' margin holds. Summed over seeds (deterministic).
    preemptions = {}
    for keyed in (False, True):
        engine = EngineConfig(PROFILES["llama3-8b-a100"], 32768, scheduler_overrides=dict(keyed_draws=keyed))
        preemptions[keyed] = sum(
            summarize(simulate(prepare(trace, engine), engine, "past_future"), LAX)["preemptions"]
            for trace in (synthetic("decode_heavy", 400, 7.0, seed=seed) for seed in range(1, 9))
        )
    assert preemptions[True] < 0.8 * preemptions[False], preemptions


def test_swap_preemption_moves_kv_instead_of_recomputing_and_costs_time():
    trace = synthetic("chat", 600, 8.0, seed=1)
    _, recompute = run(trace, "aggressive", 32768)
    prepared, swap = run(trace, "aggressive", 32768, preemption="swap")
    assert swap.swap_preemptions > 0 and swap.swap_bytes > 0 and swap.swap_time_s > 0
    assert (~np.isnan(swap.finish_s)).sum() + swap.rejected.sum() == len(prepared.trace)
    # Bytes: each swap moves at most the evicted request's whole context, out and back.
    bytes_per_token = A100.kv_bytes_per_token
    assert swap.swap_bytes <= 2 * swap.swap_preemptions * 8192 * bytes_per_token
    # Evicted requests keep their KV: no prefill is wasted, so more requests meet the SLO.
    record_swap, record_recompute = summarize(swap, LAX), summarize(recompute, LAX)
    assert record_swap["swap_preemptions"] == swap.swap_preemptions
    assert record_swap["goodput_req_s"] > record_recompute["goodput_req_s"]
    # A host pool too small for any request falls back to recompute.
    _, tiny = run(trace, "aggressive", 32768, preemption="swap", host_kv_tokens=16)
    assert tiny.swap_preemptions == 0 and tiny.preemptions.sum() > 0


def test_priority_plans_change_classes_as_asked():
    trace = synthetic("chat", 200, 5.0, seed=4)
    markov = priority_plan(trace, "markov", num_classes=3, interval_s=2.0, horizon_s=20.0, seed=1)
    assert markov.change_s.size == 200 * 10 and np.all(np.diff(markov.change_s) >= 0)
    per_request = {}
    for i, p in zip(markov.change_index.tolist(), markov.change_priority.tolist()):
        per_request.setdefault(i, [markov.initial[i]]).append(p)
    steps = np.concatenate([np.diff(v) for v in per_request.values()])
    assert set(np.abs(steps).tolist()) <= {0.0, 1.0} and (steps != 0).mean() == pytest.approx(0.2, abs=0.05)
    assert markov.initial.min() >= 0 and markov.initial.max() <= 2
    with pytest.raises(ValueError, match="priorities"):
        priority_plan(trace, "sometimes")


def test_changing_priorities_evict_and_swap_keeps_tail_latency_down():
    trace = synthetic("chat", 300, 7.0, seed=6)
    engine_recompute = EngineConfig(A100, 32768)
    engine_swap = EngineConfig(A100, 32768, preemption="swap")
    prepared = prepare(trace, engine_recompute)
    plan = priority_plan(prepared.trace, "random", seed=2)
    recompute = simulate(prepared, engine_recompute, "past_future", priorities=plan)
    swap = simulate(prepared, engine_swap, "past_future", priorities=plan)
    assert recompute.preemptions.sum() > 0 and swap.swap_preemptions > 0
    for log in (recompute, swap):
        assert (~np.isnan(log.finish_s)).sum() + log.rejected.sum() == len(prepared.trace)
    # Priority evictions by recompute re-prefill whole contexts; by swap they resume.
    assert summarize(swap, LAX)["ttft_p99_s"] < summarize(recompute, LAX)["ttft_p99_s"]


def test_prompts_beyond_the_context_are_rejected_and_counted():
    trace = synthetic("chat", 50, 5.0, seed=2)
    prompts = trace.prompt_tokens.copy()
    prompts[:3] = 9000
    trace = type(trace)(trace.arrival_s, prompts, trace.output_tokens)
    prepared, log = run(trace, "past_future", 65536)
    assert prepared.rejected_too_long == 3
    record = summarize(log, LAX)
    assert record["num_requests"] == 50 and record["rejected"] == 3 and record["completed"] == 47


def test_results_are_deterministic_for_a_seed():
    trace = synthetic("code", 300, 6.0, seed=5)
    first = summarize(run(trace, "past_future", 32768)[1], LAX)
    second = summarize(run(trace, "past_future", 32768)[1], LAX)
    for timing in ("scheduler_cpu_s", "step_cpu_us_mean", "step_cpu_us_p99"):  # wall-clock, not simulated
        first.pop(timing), second.pop(timing)
    assert first == second


def test_poisson_arrivals_have_the_asked_rate():
    arrivals = poisson_arrivals(20000, 4.0, seed=1)
    assert arrivals[0] == 0 and abs(20000 / arrivals[-1] - 4.0) < 0.1
    with pytest.raises(ValueError, match="rate_per_s"):
        poisson_arrivals(10, 0.0)


def test_cli_default_run_prints_every_admission_mode_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["simulate", "--num-requests", "300", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for admission in ("aggressive", "conservative", "past_future", "oracle"):
        assert admission in table
    assert f"wrote {out}" in table and "Δ pp" in table
    records = json.loads(out.read_text())
    required = {
        "admission", "policy", "num_requests", "completed", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
        "max_gap_p99_s", "goodput_req_s", "goodput_tok_s", "slo_attainment", "preemptions", "swap_bytes",
        "scheduler_cpu_s",
    }
    assert [r["admission"] for r in records] == ["aggressive", "conservative", "past_future", "oracle"]
    assert {r["policy"] for r in records} == {"fcfs"}
    assert all(required <= set(r) for r in records)
    # Enough to reproduce the run: the command line, the seed, every option, the version.
    first = records[0]
    assert first["command"] == f"kvsched simulate --num-requests 300 --json {out}"
    # --seeds auto (the default): from 3 seeds up to the cap, one more while a paired difference is undecided.
    assert first["seeds"] == list(range(len(first["seeds"]))) and 3 <= len(first["seeds"]) <= 6
    assert len(first["per_seed"]) == len(first["seeds"])
    assert first["seeds_rule"]["stopped"] in ("decided", "cap")
    assert first["options"]["max_prefill_chunk"] == 2048 and first["kvsched_version"]
    # Means of the seeds, with a 95% interval beside each figure.
    attainments = [r["slo_attainment"] for r in first["per_seed"]]
    assert first["slo_attainment"] == pytest.approx(np.mean(attainments))
    assert first["slo_attainment_ci95"] >= 0 and "ttft_p99_s_ci95" in first
    assert 0 < first["step_cpu_us_mean"] <= first["step_cpu_us_p99"]
    # The chat workload's defaults, printed and recorded.
    assert first["kv_capacity_tokens"] == 65536 and first["max_model_len"] == 8192
    assert f"Poisson {BUILT_IN_DEFAULTS['chat'].rate:g} req/s" in first["workload"]
    # Paired differences: each mode's attainment minus aggressive's, seed by seed.
    for record in records:
        per_seed = [r["slo_lax"]["attainment"] for r in record["per_seed"]]
        base = [r["slo_lax"]["attainment"] for r in first["per_seed"]]
        assert record["paired_difference"]["from"] == "aggressive"
        assert record["paired_difference"]["attainment"] == pytest.approx(np.mean(np.subtract(per_seed, base)))
    assert records[0]["paired_difference"]["attainment_ci95"] == 0


def test_cli_reuses_runs_that_no_seed_changes(trace_dir, tmp_path):
    # A timed trace without priorities: only past_future's draws depend on the seed.
    out = tmp_path / "r.json"
    argv = ["simulate", "--trace", str(trace_dir / "AzureLLMInferenceTrace_conv.csv"), "--num-requests", "300",
            "--kv-capacity-tokens", "16384", "--admission", "aggressive,past_future", "--json", str(out)]
    assert main(argv) == 0
    aggressive, past_future = json.loads(out.read_text())
    same = [r.get("same_run_as_seed") for r in aggressive["per_seed"]]  # --seeds auto: 3 or more
    assert len(same) >= 3 and same[0] is None and all(s == 0 for s in same[1:]), same
    assert aggressive["slo_attainment_ci95"] == pytest.approx(0, abs=1e-12)
    assert all("same_run_as_seed" not in r for r in past_future["per_seed"])


def test_cli_per_request_export_has_every_request_of_every_run(tmp_path, capsys):
    import csv

    out = tmp_path / "requests.csv"
    argv = ["simulate", "--workload", "long_context", "--max-model-len", "8192", "--num-requests", "120",
            "--seeds", "2", "--admission", "aggressive,oracle", "--per-request", str(out), "--json",
            str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert f"wrote {out} (480 rows)" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    records = json.loads((tmp_path / "r.json").read_text())
    assert len(rows) == 2 * 2 * 120
    for record in records:
        for seed_record in record["per_seed"]:
            mine = [r for r in rows if r["admission"] == record["admission"] and int(r["seed"]) == seed_record["seed"]]
            assert [int(r["request"]) for r in mine] == list(range(120))
            outcomes = [r["outcome"] for r in mine]
            assert outcomes.count("completed") == seed_record["completed"]
            # Prompts beyond the 8192-token context never ran: too_long rows, counted as rejected.
            assert outcomes.count("too_long") + outcomes.count("rejected") == seed_record["rejected"]
            assert outcomes.count("too_long") == seed_record["rejected_too_long"]
            assert all(r["ttft_s"] == "" for r in mine if r["outcome"] == "too_long")
            # A prompt never sent still arrived: its row says when.
            assert all(r["arrival_s"] != "" for r in mine)
            ttft = [float(r["ttft_s"]) for r in mine if r["outcome"] == "completed"]
            assert np.percentile(ttft, 99) == pytest.approx(seed_record["ttft_p99_s"], rel=1e-4)
            assert sum(int(r["preemptions"]) for r in mine) == seed_record["preemptions"]
    assert any(r["outcome"] == "too_long" for r in rows)
    # Counts are integers in the JSON where the seeds' mean is whole (a request count always is).
    assert all(isinstance(record["num_requests"], int) for record in records)
    assert all(isinstance(s["completed"], int) for record in records for s in record["per_seed"])


def test_cli_per_request_writes_a_run_reused_across_seeds_once(tmp_path, capsys):
    import csv

    # A timed trace under aggressive admission draws nothing from the seed: seed 1 reuses seed 0's run.
    trace = tmp_path / "azure.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{10 + i // 10:02d}.{i % 10}000000,{200 + 37 * i},{5 + i}\n" for i in range(30)))
    out = tmp_path / "requests.csv"
    argv = ["simulate", "--trace", str(trace), "--seeds", "2", "--admission", "aggressive,past_future",
            "--per-request", str(out), "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    runs = {(r["admission"], r["seed"]) for r in rows}
    assert runs == {("aggressive", "0"), ("past_future", "0"), ("past_future", "1")}
    assert len(rows) == 3 * 30
    records = {r["admission"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert records["aggressive"]["per_seed"][1]["same_run_as_seed"] == 0


def test_cli_vtc_runs_with_clients(capsys):
    argv = ["simulate", "--clients", "4", "--num-requests", "40", "--seeds", "1", "--admission", "aggressive",
            "--policy", "vtc"]
    assert main(argv) == 0
    assert "ordering policy vtc" in capsys.readouterr().out


def test_cli_compact_table_and_wide(capsys):
    argv = ["simulate", "--num-requests", "100", "--seeds", "1", "--admission", "oracle"]
    assert main(argv) == 0
    compact = capsys.readouterr().out
    assert main([*argv, "--wide"]) == 0
    wide = capsys.readouterr().out
    for column in ("TPOT50 s", "strict %", "good t/s", "KV use", "step99 us"):
        assert column not in compact and column in wide
    assert max(map(len, compact.splitlines())) <= 110


def test_cli_plot_writes_the_png_and_says_so(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cdf.png"
    assert main(["simulate", "--num-requests", "100", "--seeds", "1", "--plot", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and out.stat().st_size > 10_000


def test_cli_not_memory_bound_runs_say_so(capsys):
    argv = ["simulate", "--num-requests", "100", "--seeds", "1", "--rate", "1", "--admission", "aggressive,oracle"]
    assert main(argv) == 0
    assert "bottleneck: nothing (idle)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trace", "/no/such/file.csv"], "no such file"),
        (["--trace-format", "azure"], "--trace-format needs --trace"),
        # Options that would not act are refused, by name, before anything runs.
        (["--think-time", "5"], "--think-time: only multi_turn conversations and --clients"),
        (["--clients", "4", "--rate", "3"], "--rate: with --clients the load is set by the number of clients"),
        (["--json", "/no/such/folder/out.json"], "--json: folder /no/such/folder does not exist"),
        (["--plot", "/no/such/folder/out.png"], "--plot: folder /no/such/folder does not exist"),
        (["--kv-capacity-tokens", "16"], "--kv-capacity-tokens: a KV cache of 16 tokens holds none of the prompts"),
        (["--per-request", "/no/such/folder/r.csv"], "--per-request: folder /no/such/folder does not exist"),
        (["--per-request", "r.txt"], "--per-request: r.txt must end in .csv or .parquet"),
        (["--policy", "priority"], "--policy priority: every request would have the same priority"),
        (["--policy", "fcfs", "--priorities", "markov"], "--priorities: only the priority policy uses priorities"),
        (["--max-num-batched-tokens", "1"], "max_num_batched_tokens (1) must be >= max_num_seqs (256)"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(argv, message, capsys):
    assert main(["simulate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_options_that_do_not_act_on_a_trace(tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,100,10\n")
    assert main(["simulate", "--trace", str(path), "--rate", "3"]) == 2
    assert "--rate: a azure trace has its own arrival times; use --rate-scale" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(path), "--workload", "code"]) == 2
    assert "--workload: a built-in workload and --trace exclude each other" in capsys.readouterr().err


def test_cli_cuts_long_lines_in_errors(tmp_path, capsys):
    path = tmp_path / "wrong.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "x" * 40_000 + ",1,1\n")
    assert main(["simulate", "--trace", str(path)]) == 2
    err = capsys.readouterr().err
    assert "characters)" in err and len(err) < 1000


def test_cli_ends_quietly_when_the_reader_goes_away(tmp_path):
    import subprocess
    import sys

    # `true` exits at once without reading: every write of the table meets a closed pipe.
    command = f"set -o pipefail; {sys.executable} -m kvsched.cli simulate --num-requests 100 --admission oracle | true"
    result = subprocess.run(command, shell=True, executable="/bin/bash", capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr


def test_cli_rejects_bad_rates_and_policies(capsys):
    for argv in (["--rate-scale", "-1"], ["--rate", "0"], ["--rate", "inf"], ["--admission", "lottery"],
                 ["--seed", "-1"], ["--num-requests", "0"], ["--policy", "lottery"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["simulate", *argv])
        assert exit_info.value.code == 2
    assert "lottery" in capsys.readouterr().err
    # --policy is the ordering policy, as in the API; an admission mode there is pointed to --admission.
    with pytest.raises(SystemExit):
        main(["simulate", "--policy", "past_future"])
    assert "is an admission mode: compare those with --admission" in capsys.readouterr().err


def test_cli_empty_trace_is_an_error(tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    assert main(["simulate", "--trace", str(path)]) == 2
    assert "no requests" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, fmt, extra",
    [
        ("AzureLLMInferenceTrace_conv.csv", "azure", []),
        ("AzureLLMInferenceTrace_code.csv", "azure", []),
        ("mooncake_synthetic_trace.jsonl", "mooncake", ["--max-model-len", "131072"]),
        ("sharegpt_8k_filtered_stats_llama2_tokenizer.csv", "sharegpt", []),
    ],
)
def test_real_traces_run_end_to_end(trace_dir, name, fmt, extra, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["simulate", "--trace", str(trace_dir / name), "--num-requests", "200", "--admission", "past_future,oracle"]
    assert main([*argv, *extra, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert all(r["completed"] + r["rejected"] == r["num_requests"] for r in records)
    assert guess_format(trace_dir / name) == fmt


@pytest.mark.parametrize("name", ["chat", "decode_heavy", "long_prompt", "reasoning"])
def test_num_requests_takes_the_first_requests_of_the_same_workload(name):
    short, long = synthetic(name, 300, 5.0, seed=4), synthetic(name, 1500, 5.0, seed=4)
    assert np.array_equal(short.prompt_tokens, long.prompt_tokens[:300])
    assert np.array_equal(short.output_tokens, long.output_tokens[:300])
    assert np.allclose(short.arrival_s, long.arrival_s[:300])


def test_reasoning_outputs_are_long_heavy_tailed_and_from_two_classes():
    trace = synthetic("reasoning", 4000, 1.0, seed=1)
    outputs = trace.output_tokens
    assert outputs.min() >= 1024 and outputs.max() == 32768  # the tail reaches the cut
    assert outputs.mean() > 1.5 * np.median(outputs)  # heavy-tailed: the mean far above the median
    assert 0.3 < np.mean(outputs > 6000) < 0.5  # about the deep class's share lies beyond the quick one's bulk
    assert np.median(trace.prompt_tokens) < 500  # short questions
    assert synthetic("reasoning", 10, 1.0, max_tokens=4096).output_tokens.max() <= 4096


def test_trace_class_ids_are_checked_and_follow_selection():
    trace = synthetic("reasoning", 50, 1.0, seed=2)
    assert trace.class_ids.dtype == np.int32 and trace.class_ids.shape == (50,)
    for bad, match in ((trace.class_ids[:3], "one per request"), (trace.class_ids - 5, r"every class must be in \[0, 2\*\*31 - 1\]")):
        with pytest.raises(ValueError, match="class_ids: " + match):
            replace(trace, class_ids=bad)
    assert np.array_equal(trace.head(7).class_ids, trace.class_ids[:7])
    assert synthetic("chat", 5, 1.0).class_ids is None  # one class: nothing declared


def test_cli_reasoning_runs_with_its_long_outputs(capsys):
    assert main(["simulate", "--workload", "reasoning", "--num-requests", "20", "--admission", "past_future"]) == 0
    out = capsys.readouterr().out
    assert "context 40960 tokens" in out and "KV 262144 tokens" in out
    assert "outputs clipped" not in out  # --max-new-tokens follows the workload: 32768


def test_cli_unequal_fleet_gives_each_instance_its_capacity(tmp_path, capsys):
    out = tmp_path / "fleet.json"
    argv = ["simulate", "--instances", "3", "--instance-kv-tokens", "65536,16384,16384", "--num-requests", "150",
            "--dispatch", "least_load", "--json", str(out)]
    assert main(argv) == 0
    assert "KV caches of 65536, 16384, 16384 tokens" in capsys.readouterr().out
    (record,) = json.loads(out.read_text())
    assert record["instance_kv_tokens"] == [65536, 16384, 16384] and record["kv_capacity_tokens"] == 16384
    served = record["fleet"]["served"]
    assert served[0] > max(served[1:])  # the large instance takes the most


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--instances", "3", "--instance-kv-tokens", "65536,16384"], "--instance-kv-tokens: 2 capacities for --instances 3"),
        (["--instance-kv-tokens", "65536"], "--instance-kv-tokens: only a fleet has it"),
        (["--instances", "2", "--instance-kv-tokens", "65536,0"], "each capacity must be >= 1, got 0"),
        (["--instances", "2", "--instance-kv-tokens", "65536,16384", "--kv-capacity-tokens", "4096"],
         "--instance-kv-tokens: gives each instance its KV capacity; not with --kv-capacity-tokens"),
    ],
)
def test_cli_refuses_bad_instance_capacities_by_name(argv, message, capsys):
    try:
        code = main(["simulate", "--num-requests", "20", *argv])
    except SystemExit as exit_:  # refused by argparse, while parsing
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_aggregate_gives_means_and_student_intervals():
    from kvsched.sim.metrics import aggregate, interval95

    records = [{"policy": "p", "seed": k, "x": v, "slo_lax": {"attainment": v / 10}, "capped": True}
               for k, v in enumerate([1.0, 2.0, 3.0])]
    out = aggregate(records)
    assert out["x"] == 2.0 and out["x_ci95"] == pytest.approx(4.303 * 1.0 / np.sqrt(3), rel=1e-3)
    assert out["slo_lax"]["attainment"] == pytest.approx(0.2) and out["capped"] is True
    assert out["seeds"] == [0, 1, 2] and "seed" not in out
    assert interval95([5.0]) == 0.0 and aggregate(records[:1])["x"] == 1.0


def test_a_fleet_with_migration_and_a_global_queue_on_a_small_cache_ends(tmp_path, capsys):
    # Once a livelock: a stalled instance was told "now" was the next event while requests waited
    # to be placed, so its clock never moved and a migration due later never came.
    out = tmp_path / "r.json"
    argv = ["simulate", "--kv-capacity-tokens", "2048", "--num-requests", "100", "--seeds", "1", "--instances", "2",
            "--admission", "aggressive", "--dispatch", "round_robin", "--migration", "on", "--global-queue", "on",
            "--json", str(out)]
    assert main(argv) == 0
    (record,) = json.loads(out.read_text())
    assert record["completed"] + record["rejected"] == record["num_requests"] == 100


def test_a_host_prefetch_plan_without_rows_is_progress_not_a_stall(tmp_path, capsys):
    # Once "the scheduler planned nothing while requests wait": a plan that only prefetches a
    # request's host hits has no row yet; its prefill comes in the next plan.
    out = tmp_path / "r.json"
    argv = ["simulate", "--workload", "multi_turn", "--kv-capacity-tokens", "16384", "--host-kv-tokens", "8192",
            "--num-requests", "100", "--seeds", "1", "--admission", "aggressive", "--json", str(out)]
    assert main(argv) == 0
    (record,) = json.loads(out.read_text())
    assert record["completed"] == record["num_requests"] == 100
    assert record["host_hit_tokens"] > 0
