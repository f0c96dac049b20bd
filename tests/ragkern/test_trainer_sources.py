"""RagTrainer: loss normalisation (token / example / source), per-source accuracy, per-epoch RAFT re-sampling."""

import pytest
import torch

from ragkern import PackingCollator, RagTrainer
from ragkern.data import RaftBuilder, RaftEpochDataset
from ragkern.loss import causal_lm_loss
from ragkern.packing import pack_lengths
from tests.ragkern.tiny import GradCapture, Recording, raft_qa, random_examples, tiny_model, word_tokenizer
from tests.ragkern.tiny import trainer_args as args

pytestmark = pytest.mark.usefixtures("one_thread")


def max_rel_diff(a, b):
    assert a.keys() == b.keys() and a
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in a)


def tagged_examples():
    # Every token a target, so examples have 3..10 targets each: token, example and source means differ.
    examples = random_examples([11, 4, 9, 6, 8, 5, 10], seed=11)
    for i, ex in enumerate(examples):
        ex["source"] = "a" if i % 3 else "b"
    return examples


def reference_loss(model, examples, mode, weights=None):
    """The step loss from per-example token losses, computed one example at a time."""
    per = []
    for ex in examples:
        batch = PackingCollator()([ex])
        _, token_loss = causal_lm_loss(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
        n = int((batch["labels"][0, 1:] != -100).sum())
        per.append((ex["source"], token_loss.sum(), n))
    if mode == "token":
        return sum(s for _, s, _ in per) / sum(n for *_, n in per)
    if mode == "example":
        return sum(s / n for _, s, n in per) / len(per)
    weights = weights or {}
    means = {
        name: sum(s for src, s, _ in per if src == name) / sum(n for src, _, n in per if src == name)
        for name in sorted({src for src, *_ in per})
    }
    total = sum(weights.get(name, 1.0) for name in means)
    return sum(weights.get(name, 1.0) * m for name, m in means.items()) / total


@pytest.mark.parametrize(
    "mode,weights", [("token", None), ("example", None), ("source", None), ("source", {"a": 3.0, "b": 0.5})]
)
def test_normalisation_matches_per_example_reference(tmp_path, mode, weights):
    examples = tagged_examples()
    # Several bins of 16 tokens, all in one optimizer step through gradient accumulation.
    accum = len(pack_lengths([len(e["input_ids"]) for e in examples], 16))
    assert accum > 1
    model = tiny_model("llama")
    reference = tiny_model("llama", attn="sdpa")
    reference.load_state_dict(model.state_dict())
    capture = GradCapture()
    a = args(
        tmp_path,
        max_steps=1,
        max_length=16,
        gradient_accumulation_steps=accum,
        loss_normalization=mode,
        source_weights=weights,
    )
    trainer = RagTrainer(model=model, args=a, train_dataset=examples, callbacks=[capture])
    trainer.train()

    expected = reference_loss(reference, examples, mode, weights)
    expected.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    assert max_rel_diff(capture.grads, ref_grads) < 1e-5
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert logged["loss"] == pytest.approx(expected.item(), abs=1e-4)
    # The modes really differ on this data (else the test could not tell them apart).
    with torch.no_grad():
        others = {m: reference_loss(reference, examples, m).item() for m in ("token", "example", "source")}
    assert (
        min(abs(x - y) for i, x in enumerate(others.values()) for y in list(others.values())[i + 1 :]) > 1e-3
    )


@pytest.mark.parametrize("mode", ["example", "source"])
def test_normalisation_is_invariant_to_gradient_accumulation(tmp_path, mode):
    examples = tagged_examples() + random_examples([7, 12, 3], seed=12)
    for ex in examples[-3:]:
        ex["source"] = "a"
    grads = []
    for bins, accum in [(1, 4), (4, 1), (2, 2)]:
        capture = GradCapture()
        a = args(
            tmp_path,
            max_steps=1,
            max_length=24,
            per_device_train_batch_size=bins,
            gradient_accumulation_steps=accum,
            loss_normalization=mode,
        )
        RagTrainer(model=tiny_model("llama"), args=a, train_dataset=examples, callbacks=[capture]).train()
        grads.append(capture.grads)
    assert max_rel_diff(grads[0], grads[1]) < 1e-5
    assert max_rel_diff(grads[2], grads[1]) < 1e-5


@pytest.mark.parametrize("mode", ["token", "example", "source"])
def test_eval_loss_is_the_whole_sets_loss_whatever_the_batching(tmp_path, mode):
    """eval_loss normalises over the whole evaluation set (Trainer averages batch means, which depends on how
    examples fall into batches); the last training step's counts must not leak into it either."""
    examples = tagged_examples()
    model = tiny_model("llama")
    losses = []
    for eval_bins in (1, 8):  # rows of one 16-token bin each, or every example in one row
        a = args(
            tmp_path,
            max_length=16,
            loss_normalization=mode,
            learning_rate=0.0,
            gradient_accumulation_steps=2,
            max_steps=1,
            per_device_eval_batch_size=eval_bins,
        )
        trainer = RagTrainer(model=model, args=a, train_dataset=examples, eval_dataset=examples)
        trainer.train()
        losses.append(trainer.evaluate()["eval_loss"])
    assert len(pack_lengths([len(e["input_ids"]) for e in examples], 16)) > 2
    expected = reference_loss(model, examples, mode).item()
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert losses[1] == pytest.approx(expected, rel=1e-5)


def test_bad_normalisation_options_raise(tmp_path):
    with pytest.raises(ValueError, match="loss_normalization='mean' is not one of"):
        args(tmp_path, loss_normalization="mean")
    with pytest.raises(ValueError, match="source_weights must be finite numbers >= 0"):
        args(tmp_path, loss_normalization="source", source_weights={"a": -1.0})
    assert args(tmp_path, loss_normalization="source", source_weights='{"a": 2}').source_weights == {"a": 2}
    with pytest.raises(ValueError, match=r"source_weights names \['c'\], which are not sources"):
        RagTrainer(
            model=tiny_model("llama"),
            args=args(tmp_path, loss_normalization="source", source_weights={"c": 1.0}),
            train_dataset=tagged_examples(),
        )


@pytest.mark.parametrize("fused", [True, False], ids=["fused_loss", "plain_loss"])
def test_accuracy_per_source_on_known_predictions(tmp_path, fused):
    """Labels are set from the model's own argmax: source "right" predicts every target, "wrong" none, "half"
    every other one, so the logged accuracies are known exactly."""
    model = tiny_model("llama")
    reference = tiny_model("llama", attn="sdpa")
    reference.load_state_dict(model.state_dict())
    examples, expected = [], {"right": [0, 0], "wrong": [0, 0], "half": [0, 0]}
    for i, ex in enumerate(random_examples([9, 7, 12, 6, 10, 8], seed=13)):
        source = ("right", "wrong", "half")[i % 3]
        with torch.no_grad():
            pred = reference(input_ids=torch.tensor([ex["input_ids"]])).logits[0].argmax(-1).tolist()
        labels = [-100] * len(pred)
        for t in range(len(pred) - 4, len(pred)):  # the last 4 tokens are targets
            hit = source == "right" or (source == "half" and t % 2 == 0)
            labels[t] = pred[t - 1] if hit else (pred[t - 1] + 1) % 64
            expected[source][0] += hit
            expected[source][1] += 1
        examples.append({**ex, "labels": labels, "source": source})
    a = args(tmp_path, max_steps=1, max_length=64, learning_rate=0.0, fused_loss=fused)
    trainer = RagTrainer(model=model, args=a, train_dataset=examples)
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert logged["accuracy/right"] == 1.0 and logged["accuracy/wrong"] == 0.0
    assert logged["accuracy/half"] == pytest.approx(expected["half"][0] / expected["half"][1], abs=1e-4)
    assert 0 < expected["half"][0] < expected["half"][1]


def raft_dataset(tok, *, seed=3, p_oracle=0.8, split_source=False, n_questions=12):
    corpus, qa = raft_qa(n_questions=n_questions)
    builder = RaftBuilder(corpus, num_distractors=2, p_oracle=p_oracle, seed=seed, split_source=split_source)
    return RaftEpochDataset(qa, builder, tok, max_length=96)


def test_raft_oracle_split_is_logged_per_source(tmp_path):
    tok = word_tokenizer()
    ds = raft_dataset(tok, p_oracle=0.5, split_source=True, n_questions=8)
    assert {e["source"] for e in ds.examples} == {"raft/oracle", "raft/no_oracle"}
    model = tiny_model("llama", vocab_size=len(tok))
    reference = tiny_model("llama", vocab_size=len(tok), attn="sdpa")
    reference.load_state_dict(model.state_dict())
    a = args(tmp_path, max_steps=1, max_length=96, per_device_train_batch_size=8, learning_rate=0.0)
    trainer = RagTrainer(model=model, args=a, train_dataset=ds, processing_class=tok)
    assert trainer.train_dataset is ds
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert len(trainer.get_train_dataloader()) == 1  # one step holds every example
    for name in ("raft/oracle", "raft/no_oracle"):
        loss_sum = hits = count = 0
        for ex in (e for e in ds.examples if e["source"] == name):
            batch = PackingCollator()([ex])
            inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
            with torch.no_grad():
                _, token_loss = causal_lm_loss(reference, inputs)
                pred = reference(input_ids=batch["input_ids"]).logits[0].argmax(-1)
            targets = batch["labels"][0, 1:] != -100
            loss_sum += token_loss.sum().item()
            hits += int((pred[:-1] == batch["labels"][0, 1:])[targets].sum())
            count += int(targets.sum())
        assert logged[f"loss/{name}"] == pytest.approx(loss_sum / count, rel=1e-4)
        assert logged[f"accuracy/{name}"] == pytest.approx(hits / count, abs=1e-4)


def per_epoch_run(tmp_path, tok, *, out="out", resume=None, seed=3, **kw):
    collator = Recording()
    model = tiny_model("llama", vocab_size=len(tok), seed=0 if resume is None else 99)
    a = args(
        tmp_path,
        output_dir=str(tmp_path / out),
        max_length=96,
        num_train_epochs=2,
        optim="adamw_torch",
        learning_rate=1e-2,
        **kw,
    )
    trainer = RagTrainer(
        model=model,
        args=a,
        train_dataset=raft_dataset(tok, seed=seed),
        processing_class=tok,
        data_collator=collator,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, collator.seen


def epoch_examples(tok, epoch, seed=3):
    ds = raft_dataset(tok, seed=seed)
    ds.build_epoch(epoch)
    return sorted(tuple(e["input_ids"]) for e in ds.examples)


def test_each_epoch_trains_its_own_raft_draw_once(tmp_path):
    tok = word_tokenizer()
    trainer, seen = per_epoch_run(tmp_path, tok)
    steps = len(trainer.get_train_dataloader())
    assert len(seen) == 2 * steps
    first = sorted(x for batch in seen[:steps] for x in batch)
    second = sorted(x for batch in seen[steps:] for x in batch)
    assert first == epoch_examples(tok, 0) and second == epoch_examples(tok, 1)
    # New distractors, order or oracle draw for most questions.
    assert len(set(first) & set(second)) <= 2
    # Epoch 0 needs 7 bins of 96 tokens and epoch 1 only 6: both are packed for themselves, and epoch 1 splits
    # a bin so that every epoch has the same number of steps.
    assert [len(pack_lengths(sorted(map(len, e)), 96)) for e in (first, second)] == [7, 6]
    assert steps == 7

    again = per_epoch_run(tmp_path, tok, out="again")[1]
    assert again == seen  # same seed: same examples in the same order


def test_resume_mid_second_epoch_matches_uninterrupted_run(tmp_path):
    tok = word_tokenizer()
    steps = len(
        RagTrainer(
            model=tiny_model("llama", vocab_size=len(tok)),
            args=args(tmp_path, max_length=96, num_train_epochs=2),
            train_dataset=raft_dataset(tok),
            processing_class=tok,
        ).get_train_dataloader()
    )
    save = steps + steps // 2  # a checkpoint in the middle of epoch 2
    full, seen = per_epoch_run(tmp_path, tok, save_strategy="steps", save_steps=save)
    resumed, seen_resumed = per_epoch_run(
        tmp_path, tok, out="resumed", resume=str(tmp_path / "out" / f"checkpoint-{save}")
    )
    assert seen_resumed == seen[save:]
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)


def test_epoch_start_reaches_the_sampler_whatever_wraps_it(tmp_path):
    """On a multi-rank resume accelerate puts the sampler behind SkipBatchSampler(BatchSamplerShard(...)), which
    do not forward set_epoch; RagTrainer sets the epoch at every epoch start itself."""
    from transformers import TrainerState

    tok = word_tokenizer()
    ds = raft_dataset(tok)
    trainer = RagTrainer(
        model=tiny_model("llama", vocab_size=len(tok)),
        args=args(tmp_path, max_length=96, num_train_epochs=2),
        train_dataset=ds,
        processing_class=tok,
    )
    trainer.get_train_dataloader()
    trainer.callback_handler.on_epoch_begin(trainer.args, TrainerState(epoch=1.5), trainer.control)
    assert ds.epoch == 1 and sorted(tuple(e["input_ids"]) for e in ds.examples) == epoch_examples(tok, 1)
    assert trainer._train_sampler.epoch == 1
    assert sorted(trainer._train_sampler.lengths.tolist()) == sorted(ds.lengths)


def test_strict_length_needs_a_strict_raft_epoch_dataset(tmp_path):
    tok = word_tokenizer()
    corpus, qa = raft_qa(n_questions=4)
    lenient = RaftEpochDataset(qa, RaftBuilder(corpus, num_distractors=2, seed=3), tok, max_length=96)
    a = args(tmp_path, max_steps=1, max_length=96, strict_length=True)
    with pytest.raises(ValueError, match="build it with strict=True"):
        RagTrainer(model=tiny_model("llama", vocab_size=len(tok)), args=a, train_dataset=lenient)
    # strict: an example over max_length raises (naming it) instead of being trimmed or dropped.
    with pytest.raises(ValueError, match="max_length"):
        RaftEpochDataset(qa, RaftBuilder(corpus, num_distractors=2, seed=3), tok, max_length=12, strict=True)
