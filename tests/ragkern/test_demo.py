"""The demo's task generator (deterministic, answers only in the oracle) and a smoke run of run_demo."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ragkern.data import encode
from ragkern.demo import DemoRecipe, build_tokenizer, make_records, run_demo, task_vocabulary


def test_records_are_deterministic():
    assert make_records(50, seed=3) == make_records(50, seed=3)
    assert make_records(50, seed=3) != make_records(50, seed=4)
    assert task_vocabulary(DemoRecipe()) == task_vocabulary(DemoRecipe())


@pytest.mark.parametrize("num_passages", [1, 3, 4, (1, 4)], ids=str)
def test_answer_only_in_oracle_passage(num_passages):
    records = make_records(500, seed=0, num_passages=num_passages)
    names, codes = task_vocabulary(DemoRecipe())
    assert not set(names) & set(codes)
    for r in records:
        (oracle,) = r["oracle"]
        name, code = r["answer"].split()
        assert r["question"].split()[0] == name and code in codes
        words = [p.split() for p in r["passages"]]
        assert words[oracle] == [name, code]
        for k, w in enumerate(words):
            if k != oracle:
                assert code not in w and name not in w  # distractors: other names, other codes
        lo, hi = (num_passages, num_passages) if isinstance(num_passages, int) else num_passages
        assert lo <= len(r["passages"]) <= hi


def test_answers_are_fresh_per_record():
    """Values are re-drawn per record: a name's code changes between records (nothing to memorise)."""
    seen: dict[str, set[str]] = {}
    for r in make_records(2000, seed=1):
        name, code = r["answer"].split()
        seen.setdefault(name, set()).add(code)
    assert sum(len(v) > 1 for v in seen.values()) > 0.9 * len(seen)


def test_records_encode_with_the_demo_tokenizer():
    tok = build_tokenizer()
    for r in make_records(20, seed=2):
        ex = encode(r, tok)
        assert tok.unk_token_id not in ex["input_ids"]
        targets = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
        assert tok.decode(targets, skip_special_tokens=True) == r["answer"]


def test_run_demo_smoke(tmp_path):
    recipe = DemoRecipe(train_records=200, eval_records=16, curve_records=8, curve_points=2)
    metrics = run_demo(tmp_path, seed=0, max_steps=3, recipe=recipe, quiet=True)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "accuracy_before",
        "accuracy_after",
        "fill_ratio",
        "tokens_per_second",
        "learning_curve",
        "chance",
    ):
        assert key in saved
    assert saved["accuracy_after"] == metrics["accuracy_after"]
    assert 0.0 <= saved["accuracy_after"] <= 1.0 and saved["chance"] == 0.25
    assert 0.0 < saved["fill_ratio"] <= 1.0 and saved["tokens_per_second"] > 0
    assert [p["step"] for p in saved["learning_curve"]] == [2, 3]
    assert (tmp_path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model(input_ids=torch.tensor([[2, 4, 5]])).logits, torch.Tensor)
