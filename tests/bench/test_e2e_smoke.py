"""Smoke test of bench/e2e_cpu.py: every way trains the same few short examples and reports sane numbers."""

import importlib.util
import tempfile
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


def test_trl_arm_trains_the_same_tokens_and_targets(e2e):
    """The --real timing loop with TRL's SFTTrainer arm (bfd packing, padding-free, completion-only loss), on the
    tiny Llama: both modes, rotating repeats, per-step times, and TRL's packed rows keep examples apart."""
    examples = e2e.make_examples(5, 200, lo=20, hi=80, seed=3)
    tokenizer = e2e.make_tokenizer(200)
    base = e2e.make_model(tokenizer, hidden=16, layers=1)
    base.config.use_cache = False
    for initial in (base, e2e.with_lora(base, 4)):
        summary = e2e.time_arms(
            initial, examples, tokenizer, arms=("packed", "trl"), repeats=2, max_length=128, warmup_steps=1
        )
        packed, trl = summary["packed"], summary["trl"]
        assert packed["real_tokens"] == trl["real_tokens"] == sum(len(x["input_ids"]) for x in examples)
        targets = sum(sum(t != -100 for t in x["labels"][1:]) for x in examples)
        assert packed["target_tokens"] == trl["target_tokens"] == targets
        for s in (packed, trl):
            assert [r["position"] for r in s["runs"]] == ([0, 1] if s is packed else [1, 0])
            for r in s["runs"]:
                assert len(r["step_seconds"]) == r["steps"] == len(r["tokens_per_step"])
                assert max(r["tokens_per_step"]) <= 128 and r["real_tokens_per_s"] > 0
            assert s["min_real_tokens_per_s"] <= s["median_real_tokens_per_s"] <= s["max_real_tokens_per_s"]
        assert set(e2e.median_ratios(summary)) == {"packed_over_trl"}
    with tempfile.TemporaryDirectory() as out:
        trainer = e2e._trl_trainer(base, examples[:2], tokenizer, out, max_length=128)
        leak = e2e.trl_leak_check(trainer, examples[0], examples[1])
    assert leak["leaks"] is False and leak["attn_implementation"] == "sdpa"
    assert leak["max_abs_diff_logits_vs_alone"] < 1e-4
    assert abs(leak["loss_b_in_row"] - leak["loss_b_alone"]) < 1e-4
