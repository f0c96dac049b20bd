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
@pytest.mark.parametrize("distinct", [True, False], ids=["distinct", "shared"])
def test_answer_only_in_oracle_passage(num_passages, distinct):
    recipe = DemoRecipe(distinct_relations=distinct)
    records = make_records(500, seed=0, num_passages=num_passages, recipe=recipe)
    vocab = task_vocabulary(recipe)
    assert not set(vocab.names) & set(vocab.relations)
    all_values = [set(vocab.values[r]) for r in vocab.relations]
    assert all(not a & b for i, a in enumerate(all_values) for b in all_values[i + 1 :])
    for r in records:
        (oracle,) = r["oracle"]
        relation, value = r["answer"].split()
        assert value in vocab.values[relation]
        name = r["question"].split()[0]
        assert r["question"].split() == [name, relation, "?"]
        words = [p.split() for p in r["passages"]]
        assert words[oracle] == [name, relation, value]
        relations = [w[1] for w in words]
        assert len(set(relations)) == (len(words) if distinct else 1)
        for k, w in enumerate(words):
            if k != oracle:
                assert value not in w and name not in w  # distractors: other names, other values
        lo, hi = (num_passages, num_passages) if isinstance(num_passages, int) else num_passages
        assert lo <= len(r["passages"]) <= hi


@pytest.mark.parametrize("questions", [2, 4])
def test_training_records_ask_about_several_passages(questions):
    """A training record asks about 1..questions of its passages; each answer pair is its passage's fact."""
    records = make_records(600, seed=5, num_passages=(1, 4), questions=questions)
    counts = set()
    for r in records:
        asked = r["question"].split(" ?")[:-1]
        pairs = r["answer"].split()
        assert len(pairs) == 2 * len(asked) == 2 * len(r["oracle"]) and len(asked) <= len(r["passages"])
        counts.add(len(asked))
        facts = {tuple(p.split()[:2]): p.split()[2] for p in r["passages"]}
        for q, relation, value in zip(asked, pairs[::2], pairs[1::2]):
            name, asked_relation = q.split()
            assert asked_relation == relation and facts[(name, relation)] == value
        assert sorted(r["oracle"]) == r["oracle"]
        assert {tuple(r["passages"][k].split()[:2]) for k in r["oracle"]} == {tuple(q.split()) for q in asked}
    assert counts == set(range(1, questions + 1))
    with pytest.raises(ValueError, match="questions"):
        make_records(3, seed=0, questions=0)


def test_answers_are_fresh_per_record():
    """Values are re-drawn per record: a (name, relation)'s value changes between records."""
    seen: dict[tuple[str, str], set[str]] = {}
    for r in make_records(4000, seed=1):
        relation, value = r["answer"].split()
        seen.setdefault((r["question"].split()[0], relation), set()).add(value)
    assert sum(len(v) > 1 for v in seen.values()) > 0.9 * len(seen)


def test_bad_task_sizes_are_refused():
    with pytest.raises(ValueError, match="num_passages"):
        task_vocabulary(DemoRecipe(num_passages=9))
    with pytest.raises(ValueError, match="num_passages"):
        make_records(3, seed=0, num_passages=(0, 2))


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
        "accuracy_without_oracle",
    ):
        assert key in saved
    assert saved["accuracy_after"] == metrics["accuracy_after"]
    assert 0.0 <= saved["accuracy_after"] <= 1.0 and saved["chance"] == 0.25
    assert 0.0 < saved["fill_ratio"] <= 1.0 and saved["tokens_per_second"] > 0
    assert [p["step"] for p in saved["learning_curve"]] == [2, 3]
    assert saved["cache_reuse"] is None and saved["block_attention"] is False
    assert saved["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and saved["torch_threads"] == 1
    # The demo's answers cite no passage: no "cites_oracle" noise in its metrics.
    assert saved["examples"] and not any("cites_oracle" in e for e in saved["examples"])
    assert (tmp_path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model(input_ids=torch.tensor([[2, 4, 5]])).logits, torch.Tensor)


def test_run_demo_block_attention_reports_cache_reuse(tmp_path):
    recipe = DemoRecipe(train_records=100, eval_records=12, curve_records=4, curve_points=1)
    metrics = run_demo(tmp_path, seed=1, max_steps=2, recipe=recipe, quiet=True, block_attention=True)
    reuse = metrics["cache_reuse"]
    assert metrics["block_attention"] is True and reuse["count"] == 12
    # Reused caches reproduce the block-masked prefill (exactly equal logits are tested in test_block_attention;
    # an untrained model's near-tied logits may flip an argmax rarely).
    assert reuse["agreement"] >= 0.9
    assert abs(reuse["exact_match_cached"] - reuse["exact_match_full_prefill"]) <= 1 - reuse["agreement"]
    # At query time only block-0 tokens (header, markers outside passages, question) are computed.
    assert 0 < reuse["prefill_tokens_cached"] < reuse["prefill_tokens_full"]
    assert reuse["prefill_saved_fraction"] == pytest.approx(
        1 - reuse["prefill_tokens_cached"] / reuse["prefill_tokens_full"]
    )
    assert reuse["passage_tokens_encoded"] > 0
    # accuracy_after and the learning curve answer under the block mask the model was trained with.
    assert metrics["accuracy_after"] == pytest.approx(
        reuse["exact_match_full_prefill"], abs=1 - reuse["agreement"]
    )


def test_demo_command_prints_its_summary_once(tmp_path, capsys):
    from ragkern.cli import main

    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "full")]) == 0
    out = capsys.readouterr().out
    assert out.count("accuracy after training: ") == 1 and out.count("control: ") == 1
    assert '"accuracy_after"' not in out  # metrics.json holds the numbers; they are not printed again
    assert "'loss': '" not in out and "'loss': " in out  # Trainer's logs show numbers, not quoted strings
    assert main(["demo", "--quick", "--block-attention", "--output-dir", str(tmp_path / "block")]) == 0
    out = capsys.readouterr().out
    assert out.count("accuracy after training (block-masked, as trained): ") == 1
    assert out.count("block attention: accuracy with reused passage caches") == 1
