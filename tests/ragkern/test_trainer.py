"""RagTrainer end to end on tiny fp32 models: invariants 1, 5 and 6 through real Trainer steps."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from ragkern import PackingCollator, RagTrainer
from ragkern.loss import causal_lm_loss
from tests.ragkern.tiny import GradCapture, random_examples, tiny_model, word_tokenizer
from tests.ragkern.tiny import trainer_args as args


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_rel_diff(a, b):
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in a)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_trainer_step_equals_examples_one_by_one(tmp_path, family):
    examples = random_examples([9, 4, 11, 6], answer_tail=3, seed=1)  # 30 tokens: one bin of 32
    model = tiny_model(family)
    reference = tiny_model(family, attn="sdpa")
    reference.load_state_dict(model.state_dict())
    capture = GradCapture()
    RagTrainer(
        model=model, args=args(tmp_path, max_steps=1), train_dataset=examples, callbacks=[capture]
    ).train()

    n_targets = sum(sum(t != -100 for t in PackingCollator()([e])["labels"][0].tolist()) for e in examples)
    for ex in examples:
        one = PackingCollator()([ex])
        loss, _ = causal_lm_loss(
            reference, {"input_ids": one["input_ids"], "labels": one["labels"]}, num_items_in_batch=n_targets
        )
        loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}
    assert capture.grads.keys() == expected.keys()
    assert max_rel_diff(capture.grads, expected) < 1e-5


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    examples = random_examples([20, 17, 9, 30, 12, 25, 8, 14], answer_tail=4, seed=2)
    grads = []
    for bins, accum in [(1, 2), (2, 1)]:
        capture = GradCapture()
        a = args(tmp_path, max_steps=1, per_device_train_batch_size=bins, gradient_accumulation_steps=accum)
        RagTrainer(model=tiny_model("llama"), args=a, train_dataset=examples, callbacks=[capture]).train()
        grads.append(capture.grads)
    assert max_rel_diff(grads[0], grads[1]) < 1e-5


def test_resume_mid_epoch_continues_the_same_order(tmp_path):
    examples = random_examples([20, 17, 9, 30, 12, 25, 8, 14, 22, 5], answer_tail=4, seed=3)
    full = tiny_model("llama")
    a = args(
        tmp_path, max_steps=5, save_strategy="steps", save_steps=2, optim="adamw_torch", learning_rate=1e-2
    )
    RagTrainer(model=full, args=a, train_dataset=examples).train()

    resumed = tiny_model("llama", seed=123)  # different init: everything must come from the checkpoint
    a2 = args(tmp_path, max_steps=5, optim="adamw_torch", learning_rate=1e-2, output_dir=str(tmp_path / "r"))
    RagTrainer(model=resumed, args=a2, train_dataset=examples).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2")
    )
    assert max_rel_diff(params(resumed), params(full)) < 1e-6


def test_raw_records_are_encoded_and_logged(tmp_path):
    tok = word_tokenizer()
    records = [
        {
            "question": "who lives in rome?",
            "passages": ["alpha lives in rome", "beta lives in paris"],
            "answer": "alpha",
        },
        {"question": "who lives in paris?", "passages": ["beta lives in paris"], "answer": "beta"},
        {"text": "the river of rome is the river"},
        # Long passages would be trimmed (the RAFT length policy); a long answer cannot be: dropped, counted.
        {"id": "too-long", "question": "who?", "passages": ["alpha"], "answer": "alpha " * 300},
    ]
    model = tiny_model("llama", vocab_size=len(tok))
    trainer = RagTrainer(
        model=model,
        args=args(tmp_path, max_length=64, max_steps=2),
        train_dataset=records,
        processing_class=tok,
    )
    assert trainer.train_dataset.stats.dropped_too_long == 1
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(0 < h["fill_ratio"] <= 1 and h["tokens_per_second"] > 0 for h in logged)
    assert all(h["target_tokens_per_second"] < h["tokens_per_second"] for h in logged)


def test_packed_run_refuses_attention_that_leaks(tmp_path):
    model = tiny_model("llama", attn="sdpa")
    with pytest.raises(ValueError, match="cannot keep packed examples apart.*'ragkern'"):
        RagTrainer(
            model=model, args=args(tmp_path, attn_implementation="sdpa"), train_dataset=random_examples([4])
        )
    # By default the trainer switches the model to the "ragkern" attention.
    RagTrainer(model=model, args=args(tmp_path), train_dataset=random_examples([4]))
    assert model.config._attn_implementation == "ragkern"


def test_peft_lora_model_trains_only_the_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = params(model)
    RagTrainer(
        model=model,
        args=args(tmp_path, max_steps=2, learning_rate=0.1),
        train_dataset=random_examples([9, 4, 11, 6], seed=4),
    ).train()
    after = params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_plain_trainer_with_packing_collator(tmp_path):
    """The collator serves a stock Trainer too; its loss matches ragkern's for the same row."""
    model = tiny_model("llama")
    examples = random_examples([9, 4, 11], answer_tail=3, seed=5)
    targs = TrainingArguments(
        output_dir=str(tmp_path / "t"),
        per_device_train_batch_size=3,
        max_steps=1,
        remove_unused_columns=False,
        report_to=[],
        learning_rate=0.0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, data_collator=PackingCollator(), train_dataset=examples)
    batch = PackingCollator()(examples)
    with torch.no_grad():
        stock = model(**batch).loss
        ours, _ = causal_lm_loss(model, batch)
    assert torch.allclose(stock, ours, rtol=1e-6)
    assert trainer.train().training_loss == pytest.approx(ours.item(), rel=1e-5)


def test_unpacked_run_pads_and_matches_the_packed_gradient(tmp_path):
    examples = random_examples([9, 4, 11, 6], answer_tail=3, seed=6)
    tok = word_tokenizer()
    grads = []
    for packing in (True, False):
        capture = GradCapture()
        a = args(tmp_path, max_steps=1, packing=packing, per_device_train_batch_size=1 if packing else 4)
        RagTrainer(
            model=tiny_model("llama"),
            args=a,
            train_dataset=examples,
            processing_class=tok,
            callbacks=[capture],
        ).train()
        grads.append(capture.grads)
    assert max_rel_diff(grads[1], grads[0]) < 1e-5


def test_unpacked_run_needs_a_pad_token(tmp_path):
    tok = word_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        RagTrainer(
            model=tiny_model("llama"),
            args=args(tmp_path, packing=False),
            train_dataset=random_examples([4]),
            processing_class=tok,
        )


def test_evaluation_on_packed_rows(tmp_path):
    examples = random_examples([9, 4, 11, 6], answer_tail=3, seed=7)
    model = tiny_model("llama")
    trainer = RagTrainer(model=model, args=args(tmp_path), train_dataset=examples, eval_dataset=examples)
    metrics = trainer.evaluate()
    loss, _ = causal_lm_loss(model, PackingCollator()(examples))
    # Sequential, unshuffled bins: one row here, so the eval loss is that row's mean target loss.
    assert metrics["eval_loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_loss_is_logged_per_source(tmp_path):
    examples = random_examples([9, 4, 11, 6, 8, 5], answer_tail=3, seed=8)
    for i, ex in enumerate(examples):
        ex["source"] = "raft" if i % 2 else "instruct"
    model = tiny_model("llama")
    trainer = RagTrainer(
        model=model,
        args=args(tmp_path, max_steps=1, max_length=64, learning_rate=0.0),
        train_dataset=examples,
    )
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    # Recompute each source's mean target loss directly (all six examples fit one bin: one step).
    for name in ("raft", "instruct"):
        mine = [ex for ex in examples if ex["source"] == name]
        total, count = 0.0, 0
        for ex in mine:
            _, token_loss = causal_lm_loss(model, PackingCollator()([ex]))
            total += token_loss.sum().item()
            count += sum(t != -100 for t in ex["labels"][1:])
        assert logged[f"loss/{name}"] == pytest.approx(total / count, rel=1e-4)
    assert logged["loss/raft"] != logged["loss/instruct"]


@pytest.mark.parametrize("disable_tqdm", [False, True], ids=["progress_bar", "printer"])
def test_progress_bar_logs_print_numbers_not_quoted_strings(tmp_path, capsys, disable_tqdm):
    """Trainer's ProgressCallback (and PrinterCallback, with disable_tqdm) prints "'loss': '0.3918'"; RagTrainer's
    logs print numbers."""
    tok = word_tokenizer()
    records = [{"question": "who lives in rome?", "passages": ["alpha lives in rome"], "answer": "alpha"}] * 4
    trainer = RagTrainer(
        model=tiny_model("llama", vocab_size=len(tok)),
        args=args(tmp_path, max_length=64, max_steps=2, disable_tqdm=disable_tqdm),
        train_dataset=records,
        processing_class=tok,
    )
    trainer.train()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(printed) == 3  # two steps and the final summary
    assert all("': '" not in line for line in printed)
    assert "'loss': " in printed[0] and "'train_runtime': " in printed[-1]
