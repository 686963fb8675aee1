"""`kvsched simulate`'s conclusion: the bottleneck from measured facts, advice the next run accepts,
a verdict per compared mode from its paired interval, --seeds auto, intervals clipped to 0-100%."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest

from kvsched.cli import _mean_range, main
from kvsched.sim import diagnosis as dx
from kvsched.sim.report import with_interval

SMALL = ["--num-requests", "240", "--seeds", "1"]


# ---- verdicts and the stopping rule, on synthetic paired differences ----

@pytest.mark.parametrize("mean, half, seeds, exact, expected", [
    (0.10, 0.05, 5, False, "better"),
    (-0.10, 0.05, 5, False, "worse"),
    (0.02, 0.05, 5, False, "indistinguishable"),  # the interval includes zero
    (-0.05, 0.05, 5, False, "indistinguishable"),  # touches zero
    (0.0, 0.0, 4, False, "indistinguishable"),  # identical in every seed
    (0.30, 0.0, 1, False, "indistinguishable"),  # one seed: no interval
    (0.30, 0.0, 1, True, "better"),  # but no seed changes these runs: the difference is exact
    (-0.30, 0.0, 1, True, "worse"),
])
def test_verdict_by_the_paired_interval(mean, half, seeds, exact, expected):
    assert dx.verdict(mean, half, seeds, exact) == expected


def test_auto_seeds_stop_when_every_difference_is_decided_or_at_the_cap():
    decided = [0.30, 0.32, 0.29]  # tight: excludes zero
    noisy = [0.30, -0.20, 0.10]
    same = [0.0, 0.0, 0.0]  # identical runs: more seeds change nothing
    assert dx.decided(decided) and not dx.decided(noisy) and dx.decided(same)
    assert not dx.decided([0.3])  # one seed decides nothing
    assert dx.auto_seeds_done({"a": decided[:2]}, 2, seeded=True) is None  # fewer than AUTO_MIN_SEEDS
    assert dx.auto_seeds_done({"a": decided, "b": same}, 3, seeded=True) == "decided"
    assert dx.auto_seeds_done({"a": decided, "b": noisy}, 3, seeded=True) is None
    assert dx.auto_seeds_done({"a": noisy * 2}, dx.AUTO_MAX_SEEDS, seeded=True) == "cap"
    assert dx.auto_seeds_done({"a": noisy[:1]}, 1, seeded=False) == "unseeded"
    assert dx.auto_seeds_done({}, 3, seeded=True) == "decided"  # one mode: nothing to compare


def test_intervals_are_clipped_to_what_the_figure_takes():
    assert dx.clip_interval(0.95, 0.2, 0.0, 1.0) == (0.75, 1.0)
    assert dx.clip_interval(0.05, 0.2, 0.0, 1.0) == (0.0, 0.25)
    assert with_interval({"a": 0.694, "a_ci95": 0.597}, "a", 100, bounds=(0, 100)) == "69.4[9.7,100]"
    assert with_interval({"a": 1.0, "a_ci95": 0.001}, "a", 100, bounds=(0, 100)) == "100.0[99.9,100]"
    assert with_interval({"a": 0.5, "a_ci95": 0.1}, "a", 100, bounds=(0, 100)) == "50.0±10.0"
    assert with_interval({"a": -0.9, "a_ci95": 0.3}, "a", 100, signed=True, bounds=(-100, 100)) == "-90.0[-100,-60]"
    assert with_interval({"a": 0.5}, "a", 100, bounds=(0, 100)) == "50.0"


def test_header_counts_are_per_seed_means_with_their_range():
    assert _mean_range([1500, 1500]) == "1500"
    assert _mean_range([0, 1, 0, 2]) == "0.8 (mean of the seeds; 0-2)"


def test_next_command_replaces_or_adds_options():
    argv = ["simulate", "--rate", "2", "--kv-capacity-tokens=100", "--seeds", "1"]
    assert dx.next_command(argv, {"--rate": "1", "--kv-capacity-tokens": "64"}) == [
        "simulate", "--seeds", "1", "--rate", "1", "--kv-capacity-tokens", "64"]


def test_advice_uses_the_load_knob_of_the_workload_and_never_more_load_when_compute_binds():
    compute = dx.Diagnosis("compute", "")
    knobs = dx.Knobs(clients=8, rate_scale=1.0, kv_capacity_tokens=65536, largest_prompt=1000)
    (advice,) = dx.advise(compute, knobs)
    assert advice.options == {"--clients": "4"}  # never --rate-scale with --clients
    (advice,) = dx.advise(compute, dx.Knobs(timed=True, rate_scale=2.0, span_s=10.0))
    assert advice.options == {"--rate-scale": "1"}
    (advice,) = dx.advise(dx.Diagnosis("bursts", "", "compute"), dx.Knobs(rate=6.5))
    assert advice.options == {"--rate": "3.25"}
    # Idle: a smaller KV cache that still holds the largest prompt, else more load.
    (advice,) = dx.advise(dx.Diagnosis("idle", ""), dx.Knobs(rate=1.0, kv_capacity_tokens=65536,
                                                            largest_prompt=3000, kv_peak_tokens=15000))
    assert advice.options == {"--kv-capacity-tokens": "8192"}
    (advice,) = dx.advise(dx.Diagnosis("idle", ""), dx.Knobs(rate=1.0, kv_capacity_tokens=65536,
                                                            largest_prompt=60000, kv_peak_tokens=15000))
    assert advice.options == {"--rate": "2"}
    # Compute binds yet the SLO holds and KV never filled: less load shows nothing; a smaller KV cache
    # does (but not where the cache was full, nor where the SLO is missed: then less load).
    held = dict(timed=True, kv_capacity_tokens=65536, largest_prompt=3000, kv_peak_tokens=42000)
    (advice,) = dx.advise(compute, dx.Knobs(**held, best_attainment=1.0))
    assert advice.options == {"--kv-capacity-tokens": "32768"}
    (advice,) = dx.advise(compute, dx.Knobs(**held, best_attainment=0.5))
    assert advice.options == {"--rate-scale": "0.5"}
    (advice,) = dx.advise(compute, dx.Knobs(**{**held, "kv_peak_tokens": 65000}, best_attainment=1.0))
    assert advice.options == {"--rate-scale": "0.5"}


def test_overall_is_compute_only_where_even_the_best_run_cannot_keep_up():
    kv, compute = dx.Diagnosis("kv", "", "kv"), dx.Diagnosis("compute", "", "compute")
    overloaded = dx.Diagnosis("compute", "", "compute", overloaded=True)
    # The best run queues for full steps but keeps up, the other is held by KV: admission decided.
    assert dx.overall([kv, compute], [0.89, 0.93]).bottleneck == "kv"
    assert dx.overall([kv, overloaded], [0.02, 0.03]).bottleneck == "compute"
    assert dx.overall([compute, compute], [1.0, 1.0]).bottleneck == "compute"


# ---- the diagnosis of crafted runs, and their advice run as the next command ----

def _azure(path, prompts, outputs, gap_s):
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for k, (p, o) in enumerate(zip(prompts, outputs)):
        t = k * gap_s
        lines.append(f"2023-11-16 18:{int(t // 60):02d}:{t % 60:09.6f},{p},{o}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _conclude(argv, tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["simulate", *argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    return json.loads(out.read_text()), text


def _advice_commands(text):
    return [shlex.split(line.split("kvsched ", 1)[1]) for line in text.splitlines()
            if line.startswith("  kvsched simulate ")]


def _crafted(name, tmp_path):
    if name == "kv":
        return [*SMALL, "--kv-capacity-tokens", "16384"]
    if name == "compute":  # small steps, a KV cache that never fills, twice the default rate
        return [*SMALL, "--rate", "13", "--kv-capacity-tokens", "1048576", "--max-num-batched-tokens", "256",
                "--max-prefill-chunk", "256", "--max-num-seqs", "64"]
    if name == "long prompts":  # admitted at once into a cache that never fills, then starved of steps:
        # deep in a long prompt the chunks shrink to the prefill attention budget (compute, not KV)
        rng = np.random.default_rng(0)
        trace = _azure(tmp_path / "long.csv", rng.integers(30000, 60000, 60), rng.integers(20, 100, 60), 1.0)
        return ["--trace", trace, "--seeds", "1", "--max-model-len", "65536", "--kv-capacity-tokens", "4194304"]
    if name == "context":  # a third of the prompts beyond the 8192-token context
        rng = np.random.default_rng(0)
        prompts = np.where(np.arange(150) % 3 == 0, 20000, rng.integers(100, 2000, 150))
        trace = _azure(tmp_path / "long.csv", prompts, rng.integers(10, 200, 150), 0.5)
        return ["--trace", trace, "--seeds", "1"]
    if name == "idle":
        return [*SMALL, "--rate", "0.5"]
    raise AssertionError(name)


@pytest.mark.parametrize("case", ["kv", "compute", "context", "idle", "long prompts"])
def test_diagnosis_of_crafted_runs_and_advice_the_cli_accepts(case, tmp_path, capsys):
    argv = _crafted(case, tmp_path)
    bottleneck = "compute" if case == "long prompts" else case
    records, text = _conclude([*argv, "--admission", "aggressive,oracle"], tmp_path, capsys)
    assert records[0]["bottleneck"] == bottleneck, text
    assert f"bottleneck: {dx.BOTTLENECK_TEXT[bottleneck]}" in text
    if case == "long prompts":  # the starved prefills count as queueing, held by compute
        assert records[0]["queueing_p90_s"] > 10 and records[0]["backlog_kv_share"] < 0.05, text
    if case == "compute":
        assert "--rate 6.5" in text and "--rate 26" not in text  # less load, never more
    commands = _advice_commands(text)
    assert commands or bottleneck == "kv"
    for command in commands:  # the next run accepts it (cut short: one seed, one mode, few requests)
        assert command[0] == "simulate"
        short = dx.next_command(command, {"--seeds": "1", "--admission": "oracle", "--num-requests": "40"})
        assert main(short) == 0, command
        capsys.readouterr()


def test_verdict_lines_agree_with_the_intervals(tmp_path, capsys):
    records, text = _conclude(["--num-requests", "240", "--kv-capacity-tokens", "16384", "--seeds", "3",
                               "--admission", "aggressive,conservative,oracle"], tmp_path, capsys)
    assert "seeds: 3 (--seeds 3)" in text
    for record in records[1:]:
        pd = record["paired_difference"]
        low, high = pd["attainment_ci95_range"]
        expected = "better" if low > 0 else "worse" if high < 0 else "indistinguishable"
        assert pd["verdict"] == expected
        verdicts = text.split("\nverdict (", 1)[1].splitlines()[1:]
        line = next(l for l in verdicts if l.strip().startswith(record["run"] + " "))
        assert expected in line
        assert -1.0 <= low <= high <= 1.0
    for record in records:
        low, high = record["slo_lax"]["attainment_ci95_range"]
        assert 0.0 <= low <= high <= 1.0


def test_seeds_auto_is_the_default_and_says_why_it_stopped(tmp_path, capsys):
    records, text = _conclude(["--num-requests", "120", "--admission", "aggressive,oracle"], tmp_path, capsys)
    rule = records[0]["seeds_rule"]
    assert rule["seeds"] == "auto" and dx.AUTO_MIN_SEEDS <= rule["used"] <= dx.AUTO_MAX_SEEDS
    assert re.search(rf"^seeds: {rule['used']} \(auto: ", text, re.M)
    if rule["stopped"] == "decided":
        assert records[1]["paired_difference"]["verdict"] != "indistinguishable" or \
            len(set(r["slo_lax"]["attainment"] for r in records[1]["per_seed"])) == 1
    else:
        assert rule["stopped"] == "cap" and rule["used"] == dx.AUTO_MAX_SEEDS and "undecided" in text


def test_seeds_auto_runs_once_when_no_run_depends_on_the_seed(tmp_path, capsys):
    rng = np.random.default_rng(1)
    trace = _azure(tmp_path / "t.csv", rng.integers(100, 1500, 120), rng.integers(10, 300, 120), 0.1)
    records, text = _conclude(["--trace", trace, "--admission", "aggressive,conservative"], tmp_path, capsys)
    assert records[0]["seeds"] == [0] and records[0]["seeds_rule"]["stopped"] == "unseeded"
    assert "no run depends on the seed" in text
    assert records[1]["paired_difference"]["exact"]


def test_seeds_refuses_what_is_neither_auto_nor_a_count(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--seeds", "many"])
    assert "--seeds: must be an integer" in capsys.readouterr().err


def test_a_difference_that_decides_a_verdict_never_reads_zero():
    from kvsched.sim.report import tenths, with_interval

    # One request in 19,365 (the Azure conversation trace): a verdict of "worse" on -0.0 pp read as
    # a contradiction; the figure keeps the digits that show it.
    assert tenths(-100 / 19365, signed=True) == "-0.0052"
    assert tenths(0.0, signed=True) == "+0.0" and tenths(2.34) == "2.3" and tenths(-0.04, signed=True) == "-0.04"
    assert with_interval({"attainment": -1 / 19365, "attainment_ci95": 1e-6}, "attainment", 100, signed=True) == \
        "-0.0052±0.0001"
