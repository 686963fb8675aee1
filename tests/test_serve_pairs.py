"""bench/serve_pairs.py: pooling real-serve pairs into one paired comparison."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "serve_pairs.py"
spec = importlib.util.spec_from_file_location("serve_pairs", SCRIPT)
serve_pairs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_pairs)


def run(pair: int, tokens_per_s: float, failed: int = 0) -> dict:
    return dict(pair=pair, failed=failed, tokens_per_s=tokens_per_s, ttft_mean_ms=100.0, ttft_p99_ms=200.0,
                tpot_p99_ms=10.0, preemptions=10)


def write(path: Path, vllm: list, kvsched: list) -> Path:
    path.write_text(json.dumps(dict(options=dict(rate=8, seed=0), kvsched=dict(commit="0" * 40),
                                    runs=dict(vllm=vllm, kvsched=kvsched))))
    return path


def test_pairs_are_matched_by_pair_and_failed_runs_left_out(tmp_path):
    path = write(tmp_path / "a.json", [run(0, 100), run(1, 100), run(2, 100, failed=3), run(3, 100)],
                 [run(1, 120), run(0, 90), run(2, 500), run(3, 90, failed=1), run(4, 100)])
    _, pairs, left_out = serve_pairs.pairs_of(path, "kvsched")
    assert [(v["pair"], k["tokens_per_s"]) for v, k in pairs] == [(0, 90), (1, 120)]
    assert left_out == ["pair 2: vllm failed 3", "pair 3: kvsched failed 1", "pair 4: no vllm run"]
    with pytest.raises(SystemExit, match="no config 'other'"):
        serve_pairs.pairs_of(path, "other")


def test_the_pooled_ratio_is_the_geometric_mean_with_its_wins():
    s = serve_pairs.summarize([1.2, 0.9, 1.1], higher_is_better=True)
    assert s["ratio"] == pytest.approx(math.exp((math.log(1.2) + math.log(0.9) + math.log(1.1)) / 3))
    assert s["low"] < s["ratio"] < s["high"] and s["wins"] == 2 and s["pairs"] == 3
    assert serve_pairs.summarize([1.2, 0.9, 1.1], higher_is_better=False)["wins"] == 1


def test_a_count_of_zero_keeps_its_ratio_finite():
    assert serve_pairs.ratio("preemptions", dict(preemptions=0), dict(preemptions=10)) == pytest.approx(1 / 11)
    assert serve_pairs.ratio("tokens_per_s", dict(tokens_per_s=110), dict(tokens_per_s=100)) == pytest.approx(1.1)
