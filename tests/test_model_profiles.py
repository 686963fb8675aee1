"""Measured model profiles: the fit ``kvsched calibrate`` makes, the file it writes, the workload it
measures with, and ``kvsched simulate --model-profile FILE`` reading it (no engine needed here; the
real engine's calibration is in test_vllm_real_engine_calibrate.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from kvsched.cli import main
from kvsched.sim.profiles import (PROFILES, STEP_FEATURES, ModelProfile, ProfileError, calibration_workload,
                                  fit_profile, load_profile, open_calibration_workload, step_features)

TRUE = ModelProfile("true", 0.0, 2.0, 0.04, 5e-4, 2e-5, 4096, 4096, 65536, per_row_ms=0.1)


def synthetic_steps(profile: ModelProfile, n: int, seed: int, noise: float = 0.0):
    """Random steps (prefill chunks and decodes at random contexts) timed by ``profile``."""
    rng = np.random.default_rng(seed)
    features = {name: [] for name in STEP_FEATURES}
    seconds = []
    for _ in range(n):
        rows = int(rng.integers(1, 40))
        is_prefill = rng.random(rows) < 0.15
        tokens = np.where(is_prefill, rng.integers(2, 600, rows), 1)
        context = rng.integers(0, 3000, rows)
        for name, value in step_features(tokens, context, is_prefill).items():
            features[name].append(value)
        seconds.append(profile.step_time_s(tokens, context, is_prefill) * (1 + noise * rng.standard_normal()))
    return {k: np.asarray(v) for k, v in features.items()}, np.asarray(seconds)


def test_fit_recovers_a_known_profile():
    steps, seconds = synthetic_steps(TRUE, 400, seed=1)
    fitted = fit_profile(steps, seconds, name="fit", kv_bytes_per_token=4096, max_model_len=4096,
                         kv_capacity_tokens=8192)
    assert fitted.name == "fit"
    for field in ("base_ms", "per_token_ms", "per_row_ms", "decode_context_ms", "prefill_attention_ms"):
        assert getattr(fitted, field) == pytest.approx(getattr(TRUE, field), rel=1e-6), field
    assert fitted.calibration["fit"]["median_abs_error"] < 1e-9
    assert fitted.calibration["fit"]["steps"] == 400


def test_fit_keeps_costs_non_negative_and_reports_its_error():
    # A profile with no per-row cost, measured with noise: the fit may not go negative to chase it.
    truth = ModelProfile("true", 0.0, 3.0, 0.05, 3e-4, 0.0, 4096, 4096, 65536)
    steps, seconds = synthetic_steps(truth, 500, seed=2, noise=0.05)
    fitted = fit_profile(steps, seconds, name="fit", kv_bytes_per_token=1, max_model_len=1, kv_capacity_tokens=1)
    coefficients = [fitted.base_ms, fitted.per_token_ms, fitted.per_row_ms, fitted.decode_context_ms,
                    fitted.prefill_attention_ms]
    assert min(coefficients) >= 0
    assert fitted.base_ms == pytest.approx(3.0, rel=0.1)
    quality = fitted.calibration["fit"]
    assert 0.01 < quality["median_abs_error"] < 0.08  # the 5% noise, not a perfect fit
    assert quality["total_time_error"] == pytest.approx(0, abs=1e-9)  # rescaled to the measured total
    assert -0.05 < quality["relative_fit_bias"] < 0  # what the rescale corrected: the relative fit comes out low


def test_fit_refuses_too_few_or_bad_steps():
    steps, seconds = synthetic_steps(TRUE, 10, seed=3)
    with pytest.raises(ValueError, match="at least 20 steps"):
        fit_profile(steps, seconds, name="x", kv_bytes_per_token=1, max_model_len=1, kv_capacity_tokens=1)
    steps, seconds = synthetic_steps(TRUE, 30, seed=3)
    seconds[4] = 0.0
    with pytest.raises(ValueError, match="finite and > 0 .1 are not"):
        fit_profile(steps, seconds, name="x", kv_bytes_per_token=1, max_model_len=1, kv_capacity_tokens=1)
    seconds[4] = 1e-3
    for bad in (np.nan, np.inf, -1.0):
        broken = {k: v.astype(np.float64) for k, v in steps.items()}
        broken["tokens"][3] = bad
        with pytest.raises(ValueError, match=r"steps\['tokens'\]: want 30 finite values >= 0"):
            fit_profile(broken, seconds, name="x", kv_bytes_per_token=1, max_model_len=1, kv_capacity_tokens=1)
    with pytest.raises(ValueError, match="missing feature 'rows'"):
        fit_profile({"tokens": steps["tokens"]}, seconds, name="x", kv_bytes_per_token=1, max_model_len=1,
                    kv_capacity_tokens=1)


def test_profile_file_round_trip(tmp_path):
    profile = ModelProfile("measured", 0.0, 2.5, 0.03, 4e-4, 1e-5, 4096, 2048, 8192, per_row_ms=0.2, num_layers=2,
                           calibration={"engine": "vllm 0.32.0", "fit": {"steps": 10}})
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = load_profile(path)
    assert loaded == profile and loaded.calibration == profile.calibration
    assert load_profile("llama3-8b-a100") is PROFILES["llama3-8b-a100"]
    rows = (np.array([100, 1, 1]), np.array([0, 50, 70]), np.array([True, False, False]))
    assert loaded.step_time_s(*rows) == pytest.approx(
        (2.5 + 0.03 * 102 + 0.2 * 3 + 4e-4 * (51 + 71) + 1e-5 * 100 * 50) / 1e3)


@pytest.mark.parametrize("content, message", [
    ("not json", "not a profile JSON file"),
    ("[1, 2]", "want a JSON object"),
    ('{"name": "x"}', "missing field"),
    (None, "unknown field.*speed"),
    (None, "field 'base_ms' has a bad value -1"),
    (None, "field 'max_model_len' has a bad value 1.5"),
    (None, "field 'base_ms' has a bad value 1000000000"),
    ("[" * 200000, "not a profile JSON file"),
    (None, "field 'per_token_ms' has a bad value 1e\\+308"),
    (None, "field 'kv_bytes_per_token' has a bad value 10+"),
])
def test_bad_profile_files_are_refused_naming_the_field(tmp_path, content, message):
    good = json.loads(json.dumps(PROFILES["llama2-7b-h100"].__dict__))
    if content is None:
        if "speed" in message:
            good["speed"] = 1
        elif "per_token_ms" in message:
            good["per_token_ms"] = 1e308
        elif "kv_bytes_per_token" in message:
            good["kv_bytes_per_token"] = 10 ** 30
        elif "base_ms' has a bad value 1000" in message:
            good["base_ms"] = 10 ** 400  # beyond a float
        elif "base_ms" in message:
            good["base_ms"] = -1
        else:
            good["max_model_len"] = 1.5
        content = json.dumps(good)
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_calibration_workload_covers_batches_and_contexts_and_fits():
    kv, context, seqs = 65536, 4096, 64
    rounds, prompts, outputs = calibration_workload(0, context, seqs, kv)
    assert np.all(prompts >= 1) and np.all(prompts + outputs <= context)
    sizes = {int(np.count_nonzero(rounds == r)) for r in np.unique(rounds)}
    assert sizes == {1, 2, 4, 8, 16, 32, 64}
    for r in np.unique(rounds):  # every round fits the KV cache at once: no preemption while measuring
        assert (prompts[rounds == r] + outputs[rounds == r]).sum() <= kv
    assert prompts.min() < 128 and prompts.max() > 1024  # short and long contexts
    long_batches = {int(np.count_nonzero(rounds == r)) for r in np.unique(rounds) if prompts[rounds == r].min() >= 1024}
    assert max(long_batches) >= 16  # long contexts in large batches, not only alone
    again = calibration_workload(0, context, seqs, kv)
    assert all(np.array_equal(a, b) for a, b in zip((rounds, prompts, outputs), again))
    assert not np.array_equal(prompts, calibration_workload(1, context, seqs, kv)[1])


def test_open_calibration_workload_loads_the_engine_by_the_provisional_profile():
    fast = ModelProfile("fast", 0.0, 1.0, 0.01, 1e-4, 1e-6, 1, 4096, 65536)
    slow = ModelProfile("slow", 0.0, 4.0, 0.04, 4e-4, 4e-6, 1, 4096, 65536)
    a_fast, prompts, outputs = open_calibration_workload(0, fast, 4096, 65536)
    a_slow, prompts_slow, _ = open_calibration_workload(0, slow, 4096, 65536)
    assert np.array_equal(prompts, prompts_slow)  # the same requests, only the rate differs
    assert a_slow[-1] == pytest.approx(4 * a_fast[-1])  # four times the cost: a quarter of the rate
    assert np.all(np.diff(a_fast) >= 0) and a_fast[0] == 0
    assert np.all(prompts + outputs <= 4096) and prompts.min() < 128 and prompts.max() > 1024
    with pytest.raises(ValueError, match="max_model_len, kv_capacity_tokens"):
        open_calibration_workload(0, fast, 200, 65536)
    free = ModelProfile("free", 0.0, 0.0, 0.0, 0.0, 0.0, 1, 4096, 65536)
    with pytest.raises(ValueError, match="want a finite cost > 0"):
        open_calibration_workload(0, free, 4096, 65536)
    with pytest.raises(ValueError, match="num_requests, utilization"):
        open_calibration_workload(0, fast, 4096, 65536, num_requests=0)


def test_simulate_runs_on_a_profile_file(tmp_path, capsys):
    path = tmp_path / "measured.json"
    ModelProfile("measured-cpu", 0.0, 2.5, 0.04, 6e-4, 2e-5, 4096, 4096, 8192, per_row_ms=0.1).save(path)
    out = tmp_path / "out.json"
    assert main(["simulate", "--model-profile", str(path), "--num-requests", "60", "--seeds", "1",
                 "--admission", "past_future", "--kv-capacity-tokens", "8192", "--max-model-len", "4096",
                 "--json", str(out)]) == 0
    assert "model measured-cpu" in capsys.readouterr().out
    record = json.loads(out.read_text())[0]
    assert record["model_profile"] == "measured-cpu" and record["options"]["model_profile"] == "measured-cpu"


def test_simulate_refuses_a_missing_profile_naming_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--model-profile", str(tmp_path / "none.json")])
    assert exit_.value.code == 2
    assert "--model-profile" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_calibrate_without_vllm_says_so(tmp_path, capsys):
    assert main(["calibrate", "--model", str(tmp_path), "--out", str(tmp_path / "p.json")]) == 2
    assert "--engine vllm: vLLM is not importable" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--kvsched-options", "{bad"], "--kvsched-options: not JSON"),
    (["--kvsched-options", "[1]"], "--kvsched-options: want a JSON object"),
    (["--kv-capacity-tokens", "16"], "--kv-capacity-tokens 16: less than one block"),
    (["--max-model-len", "100"], "--max-model-len 100, --kv-capacity-tokens 65536: too small to measure"),
    (["--kv-capacity-tokens", "2048"], "--max-model-len 2048, --kv-capacity-tokens 2048: too small to measure"),
])
def test_calibrate_refuses_bad_options(tmp_path, capsys, argv, message):
    assert main(["calibrate", "--model", str(tmp_path), "--out", str(tmp_path / "p.json"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_calibrate_refuses_a_missing_model_directory(tmp_path, capsys):
    assert main(["calibrate", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "p.json")]) == 2
    assert "--model" in capsys.readouterr().err


def test_calibrate_help_lists_its_options():
    done = subprocess.run([sys.executable, "-m", "kvsched.cli", "calibrate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for option in ("--model", "--out", "--clock", "--repeats", "--kv-capacity-tokens"):
        assert option in done.stdout
