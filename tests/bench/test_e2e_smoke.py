"""Smoke test of bench/e2e_cpu.py: every way trains the same few short examples and reports sane numbers."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "e2e_cpu.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e_cpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_all_ways_train_the_same_tokens(e2e):
    examples = e2e.make_examples(4, 200, lo=20, hi=80, seed=3)
    results = e2e.run(examples, max_length=256, batch_size=2, hidden=16, layers=1, warmup_examples=0)
    assert set(results) == set(e2e.WAYS)
    real = sum(len(x["input_ids"]) for x in examples)
    for way, r in results.items():
        assert r["real_tokens"] == real, way
        assert 0 < r["fill_ratio"] <= 1, way
        assert r["real_tokens_per_s"] > 0 and r["final_loss"] > 0, way
    assert results["flattening"]["fill_ratio"] == 1.0
    assert results["padded"]["computed_tokens"] >= real


def test_leak_check_tells_the_cases_apart(e2e):
    leak = e2e.sdpa_flattening_leaks(hidden=32, layers=1)
    assert leak["position_ids, use_cache=False"]["leaks"] is False
    assert leak["position_ids, use_cache=False"]["max_abs_diff_vs_alone"] < 1e-5
