"""RagTrainer under Trainer settings that a packed loader could get wrong, each checked against what a stock
``transformers.Trainer`` does: auto_find_batch_size, per-run speed metrics, NEFTune, the sampling strategy, and
the order of the source tags (issue 21)."""

import dataclasses
import logging

import pytest
import torch
from transformers import Trainer, TrainingArguments

from ragkern import PackingCollator, RagTrainer
from ragkern.collator import PaddingCollator
from tests.ragkern.tiny import Recording, random_examples, tiny_model
from tests.ragkern.tiny import trainer_args as args

pytestmark = pytest.mark.usefixtures("one_thread")


def oom_above(model, rows: int, tokens: int):
    """Make ``model`` run out of memory (as CUDA reports it) on a micro-batch of more than ``rows`` rows of
    ``tokens`` tokens each: the embedding sees ``(B, T)`` unpacked or ``(1, B * T)`` packed."""
    sizes = []

    def hook(module, inputs):
        ids = inputs[0]
        sizes.append(ids.numel() // tokens)
        if ids.numel() > rows * tokens:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.get_input_embeddings().register_forward_pre_hook(hook)
    return sizes


def test_auto_find_batch_size_steps_down_like_trainer(tmp_path):
    examples = random_examples([32] * 10, seed=3)  # every example fills a 32-token bin: rows = bins
    stock_model = tiny_model("llama", attn="sdpa")
    stock_sizes = oom_above(stock_model, 3, 32)
    stock = Trainer(
        model=stock_model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "stock"),
            per_device_train_batch_size=8,
            auto_find_batch_size=True,
            num_train_epochs=1,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            remove_unused_columns=False,
        ),
        data_collator=PaddingCollator(pad_token_id=0),
        train_dataset=examples,
    )
    stock.train()

    model = tiny_model("llama")
    sizes = oom_above(model, 3, 32)
    a = args(tmp_path, per_device_train_batch_size=8, auto_find_batch_size=True, num_train_epochs=1)
    trainer = RagTrainer(model=model, args=a, train_dataset=examples)
    trainer.train()  # before: "No executable batch size found, reached zero." (every retry packed 8 bins)
    # accelerate's steps: 8 -> 7 -> 6 -> 5 -> 4 -> 3, the first that fits.
    assert stock.state.train_batch_size == trainer.state.train_batch_size == 3
    assert sizes[:5] == stock_sizes[:5] == [8, 7, 6, 5, 4]
    assert sizes[5:] == stock_sizes[5:] == [3, 3, 3, 1]
    assert trainer.state.global_step == stock.state.global_step == 4


def test_speed_metrics_are_per_run(tmp_path):
    a = args(tmp_path, num_train_epochs=1)
    trainer = RagTrainer(model=tiny_model("llama"), args=a, train_dataset=random_examples([9, 12, 7, 20, 15]))
    first = trainer.train().metrics
    second = trainer.train().metrics  # the same one-epoch run again: before, 63 -> 126 tokens
    assert first["train_tokens"] == second["train_tokens"] == 63
    runtime = second["train_runtime"]
    assert second["train_tokens_per_second"] == pytest.approx(63 / runtime, rel=0.02)


def neftune_noise(trainer_cls, model, examples, run_args, **kw):
    """The noise NEFTune added to the embeddings of the first training forward: ``(T,)`` per token of the
    batch, the largest absolute noise over the hidden dimension, and the batch's input_ids."""
    embed = model.get_input_embeddings()
    clean = embed.weight.detach().clone()
    captured = []

    def hook(module, inputs, kwargs):
        if not captured:
            captured.append((inputs[0] if inputs else kwargs["hidden_states"]).detach().clone())

    model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    batches = []

    def record(module, inputs):
        batches.append(inputs[0].detach().clone())

    embed.register_forward_pre_hook(record)
    trainer_cls(model=model, args=run_args, train_dataset=examples, **kw).train()
    ids = batches[0]
    noise = captured[0] - clean[ids]
    return noise.abs().amax(-1), ids


def test_neftune_noise_is_scaled_per_example_as_trainer_does(tmp_path):
    alpha, d = 5.0, 64
    lengths = [6, 12, 4, 9]
    examples = random_examples(lengths, seed=5)
    common = dict(max_steps=1, learning_rate=0.0, neftune_noise_alpha=alpha, seed=11)
    # The packed row: every example in one 32-token bin.
    packed, ids = neftune_noise(RagTrainer, tiny_model("llama"), examples, args(tmp_path, **common))
    assert ids.shape == (1, sum(lengths))
    order = []  # which example each packed segment is (packing sorts them by length)
    start = 0
    for n in sorted(lengths, reverse=True):
        e = lengths.index(n)
        order.append(e)
        assert ids[0, start : start + n].tolist() == examples[e]["input_ids"]
        start += n
    # Stock Trainer, one example per batch: the noise is uniform in +-alpha / sqrt(L * d), L its length.
    plain_args = TrainingArguments(
        output_dir=str(tmp_path / "stock"),
        per_device_train_batch_size=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        **common,
    )
    start = 0
    for e in order:
        n = lengths[e]
        bound = alpha / (n * d) ** 0.5
        stock, _ = neftune_noise(
            Trainer,
            tiny_model("llama", attn="sdpa"),
            [examples[e]],
            plain_args,
            data_collator=PaddingCollator(0),
        )
        mine = packed[0, start : start + n]
        start += n
        # Before: +-alpha / sqrt(31 * d) on every example of the row, half what Trainer gives a 9-token one.
        for noise in (stock[0], mine):
            assert noise.max() <= bound * (1 + 1e-5)
            assert noise.max() >= 0.9 * bound  # the max of n * 64 uniform draws is close to the bound


def test_sequential_sampling_trains_examples_in_dataset_order(tmp_path):
    if "train_sampling_strategy" not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        pytest.skip("this transformers has no train_sampling_strategy")
    examples = random_examples([9, 20, 7, 14, 3, 11, 18, 5], seed=8)
    collator = Recording()
    a = args(tmp_path, num_train_epochs=1, learning_rate=0.0, train_sampling_strategy="sequential")
    trainer = RagTrainer(model=tiny_model("llama"), args=a, train_dataset=examples, data_collator=collator)
    trainer.train()
    seen = [x for batch in collator.seen for x in batch]
    assert seen == [tuple(e["input_ids"]) for e in examples]  # before: best-fit bins in a shuffled order
    assert all(sum(map(len, batch)) <= 32 for batch in collator.seen)


def test_length_grouping_strategies_are_what_packing_does_and_others_are_refused(tmp_path, caplog):
    if "train_sampling_strategy" not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        pytest.skip("this transformers has no train_sampling_strategy")
    with caplog.at_level(logging.WARNING, logger="ragkern.training_args"):
        args(tmp_path, train_sampling_strategy="group_by_length")
    assert "packing already groups examples by length" in caplog.text
    with pytest.raises(ValueError, match="train_sampling_strategy='by_source' is not supported with packing"):
        args(tmp_path, train_sampling_strategy="by_source")
    assert args(tmp_path, train_sampling_strategy="by_source", packing=False).packing is False


def sourced(examples):
    for i, ex in enumerate(examples):
        ex["source"] = "a" if i % 3 else "b"
    return examples


def test_source_weights_and_logs_follow_the_collators_source_order(tmp_path):
    """Weights and per-source logs are matched to the batch's source_ids by name, whatever order the user's
    collator lists the sources in."""
    examples = sourced(random_examples([11, 4, 9, 6, 8, 5, 10], seed=11))
    logs = []
    for collator in (None, PackingCollator(source_names=("b", "a"))):
        a = args(
            tmp_path,
            max_steps=1,
            max_length=64,
            learning_rate=0.0,
            loss_normalization="source",
            source_weights={"a": 1, "b": 0},
        )
        trainer = RagTrainer(
            model=tiny_model("llama"), args=a, train_dataset=examples, data_collator=collator
        )
        trainer.train()
        logs.append(next(h for h in trainer.state.log_history if "loss" in h))
    default, reordered = logs
    # Before: 4.854110 with the default collator, 4.847800 with ("b", "a"), and loss/a and loss/b swapped.
    assert reordered["loss"] == pytest.approx(default["loss"], rel=1e-6)
    assert reordered["loss/a"] == default["loss/a"] and reordered["loss/b"] == default["loss/b"]
    assert default["loss"] == pytest.approx(default["loss/a"], abs=1e-4)  # weight 0 on "b": a's loss alone
    assert default["loss/a"] != default["loss/b"]


def test_neftune_noise_bound_per_example_and_per_row():
    from ragkern.neftune import neftune_noise

    torch.manual_seed(0)
    x = torch.zeros(1, 40, 64)
    cu = torch.tensor([0, 4, 40], dtype=torch.int32)
    noise = neftune_noise(x, 5.0, cu).abs().amax(-1)[0]
    for a, b in ((0, 4), (4, 40)):
        bound = 5.0 / ((b - a) * 64) ** 0.5
        assert bound * 0.9 <= noise[a:b].max() <= bound
    row = neftune_noise(torch.zeros(2, 40, 64), 5.0).abs().max()  # unpacked: Trainer's per-row formula
    assert 0.9 * 5.0 / (40 * 64) ** 0.5 <= row <= 5.0 / (40 * 64) ** 0.5
