"""RagTrainer as a drop-in for transformers.Trainer: the settings a Trainer (or TRL) script passes either behave
as they do there or fail with a clear error. A plain Trainer run on the same examples is the reference."""

import numpy as np
import pytest
import torch

from ragkern import RagTrainer
from ragkern.data.training import encode_for_training
from tests.ragkern.tiny import GradCapture, plain_trainer_step, random_examples, tiny_model, word_tokenizer
from tests.ragkern.tiny import trainer_args as args

EXAMPLES = dict(lengths=[9, 4, 11, 6, 13, 5, 8], answer_tail=3, seed=21)


def examples():
    return random_examples(**EXAMPLES)


def reference_logits(model, exs):
    """Each example alone through the stock attention: ``[(L_i, V)]``."""
    reference = tiny_model("llama", attn="sdpa")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        return [reference(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in exs]


def test_model_init_models_are_switched_to_boundary_aware_attention(tmp_path, one_thread):
    """Trainer builds the model from model_init at construction and again in train(): both must keep packed
    examples apart, and train exactly as model= does."""
    built = []

    def model_init():
        built.append(tiny_model("llama", attn="sdpa"))
        return built[-1]

    captures = [GradCapture(), GradCapture()]
    a = args(tmp_path, max_steps=1)
    trainer = RagTrainer(model_init=model_init, args=a, train_dataset=examples(), callbacks=[captures[0]])
    trainer.train()
    assert len(built) == 2 and all(m.config._attn_implementation == "ragkern" for m in built)
    assert trainer.model is built[-1]
    RagTrainer(
        model=tiny_model("llama", attn="sdpa"), args=a, train_dataset=examples(), callbacks=[captures[1]]
    ).train()
    for name, g in captures[1].grads.items():
        torch.testing.assert_close(captures[0].grads[name], g, rtol=1e-6, atol=0)


def test_peft_config_and_a_model_path_as_sft_trainer_takes_them(tmp_path, one_thread):
    from peft import LoraConfig, PeftModel

    tok = word_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    records = [{"question": "who lives in rome?", "passages": ["alpha lives in rome"], "answer": "alpha"}] * 3
    trainer = RagTrainer(
        model=str(tmp_path / "base"),
        args=args(tmp_path, max_length=64, max_steps=2, learning_rate=0.1),
        train_dataset=records,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.config._attn_implementation == "ragkern"
    assert next(trainer.model.parameters()).dtype == torch.float32
    assert trainer.processing_class.vocab_size == tok.vocab_size
    trainer.train()
    with pytest.raises(ValueError, match="already a PeftModel"):
        RagTrainer(
            model=trainer.model,
            args=args(tmp_path),
            train_dataset=examples(),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )


def test_compute_metrics_is_called_with_default_arguments(tmp_path, one_thread):
    """As in Trainer: prediction_loss_only defaults to False, compute_metrics runs, its metric can pick the
    best model."""
    seen = []

    def compute_metrics(pred):
        seen.append(pred)
        return {"my_metric": 0.5}

    a = args(
        tmp_path,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        metric_for_best_model="my_metric",
        load_best_model_at_end=True,
    )
    trainer = RagTrainer(
        model=tiny_model("llama"),
        args=a,
        train_dataset=examples(),
        eval_dataset=examples(),
        compute_metrics=compute_metrics,
    )
    assert trainer.args.prediction_loss_only is False
    trainer.train()
    assert len(seen) == 2 and trainer.state.best_metric == 0.5
    assert trainer.evaluate()["eval_my_metric"] == 0.5


@pytest.mark.parametrize("eval_bins", [1, 3])
def test_predictions_are_logits_per_example_in_dataset_order(tmp_path, one_thread, eval_bins):
    exs = examples()
    model = tiny_model("llama")
    trainer = RagTrainer(
        model=model, args=args(tmp_path, per_device_eval_batch_size=eval_bins), train_dataset=exs
    )
    out = trainer.predict(exs)
    longest = max(len(e["input_ids"]) for e in exs)
    assert out.predictions.shape == (len(exs), longest, model.config.vocab_size)
    assert out.label_ids.shape == (len(exs), longest)
    for i, (ex, ref) in enumerate(zip(exs, reference_logits(model, exs))):
        n = len(ex["input_ids"])
        np.testing.assert_allclose(out.predictions[i, :n], ref.numpy(), rtol=1e-5, atol=1e-5)
        assert (out.predictions[i, n:] == -100).all()
        assert out.label_ids[i, 1:n].tolist() == ex["labels"][1:] and (out.label_ids[i, n:] == -100).all()


def test_preprocess_logits_for_metrics_gets_examples(tmp_path, one_thread):
    """What preprocess_logits_for_metrics returns is kept per example: argmax ids (n, L) instead of logits."""
    exs = examples()
    model = tiny_model("llama")
    shapes = []

    def argmax(logits, labels):
        shapes.append((tuple(logits.shape), tuple(labels.shape)))
        return logits.argmax(-1)

    def accuracy(pred):
        ids, labels = pred.predictions[:, :-1], pred.label_ids[:, 1:]
        mask = labels != -100
        return {"accuracy": float((ids[mask] == labels[mask]).mean())}

    trainer = RagTrainer(
        model=model,
        args=args(tmp_path, per_device_eval_batch_size=2),
        train_dataset=exs,
        eval_dataset=exs,
        compute_metrics=accuracy,
        preprocess_logits_for_metrics=argmax,
    )
    metrics = trainer.evaluate()
    assert all(lg[:2] == lb and lg[2] == model.config.vocab_size for lg, lb in shapes)
    assert sum(lb[0] for _, lb in shapes) == len(exs)
    hits = total = 0
    for ex, ref in zip(exs, reference_logits(model, exs)):
        pred, lab = ref.argmax(-1)[:-1], torch.tensor(ex["labels"][1:])
        mask = lab != -100
        hits, total = hits + int((pred[mask] == lab[mask]).sum()), total + int(mask.sum())
    assert metrics["eval_accuracy"] == pytest.approx(hits / total)
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(hits / total)


def test_predict_encodes_records_and_keeps_rows_within_max_length(tmp_path, one_thread):
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    records = [
        {
            "question": "who lives in rome?",
            "passages": ["alpha lives in rome", "beta lives in paris"],
            "answer": "alpha",
        },
        {
            "messages": [
                {"role": "user", "content": "where is rome?"},
                {"role": "assistant", "content": "italy"},
            ]
        },
        {"text": "the river of rome is the river"},
    ] * 3
    rows = []

    class Spy(RagTrainer):
        def prediction_step(self, model, inputs, *a, **kw):
            rows.append(inputs["cu_seq_lens_q"].tolist())
            return super().prediction_step(model, inputs, *a, **kw)

    trainer = Spy(
        model=model, args=args(tmp_path, max_length=40, per_device_eval_batch_size=1), processing_class=tok
    )
    out = trainer.predict(records)
    assert out.predictions.shape[0] == len(records)
    assert [n for cu in rows for n in np.diff(cu)] == [
        len(e["input_ids"]) for e in encode_for_training(records, tok, max_length=40, purpose="predict")
    ]
    assert all(cu[-1] <= 40 for cu in rows) and len(rows) > 1
    with pytest.raises(ValueError, match="predict: 1 records do not fit max_length=40"):
        trainer.predict(records + [{"question": "who?", "passages": ["alpha"], "answer": "alpha " * 60}])


def test_eval_and_predict_accept_tokenized_examples_longer_rows_split(tmp_path, one_thread):
    exs = random_examples([30, 25, 20, 15], seed=5)
    trainer = RagTrainer(model=tiny_model("llama"), args=args(tmp_path, max_length=32), train_dataset=exs)
    batches = []
    real = trainer.prediction_step

    def spy(model, inputs, *a, **kw):
        batches.append(inputs["input_ids"].shape[1])
        return real(model, inputs, *a, **kw)

    trainer.prediction_step = spy
    trainer.predict(exs)
    assert batches and max(batches) <= 32 * trainer.args.per_device_eval_batch_size
    trainer.args.per_device_eval_batch_size = 1
    batches.clear()
    trainer.predict(exs)
    assert batches == [30, 25, 20, 15]
    with pytest.raises(ValueError, match="longer than max_length=32"):
        trainer.predict(random_examples([40]))


@pytest.mark.parametrize("fused", [True, False], ids=["fused_loss", "plain_loss"])
def test_label_smoothing_matches_trainer(tmp_path, one_thread, fused):
    exs = examples()
    model = tiny_model("llama")
    reference = tiny_model("llama", attn="sdpa")
    reference.load_state_dict(model.state_dict())
    ours = GradCapture()
    a = args(tmp_path, max_length=64, max_steps=1, label_smoothing_factor=0.2, fused_loss=fused)
    trainer = RagTrainer(model=model, args=a, train_dataset=exs, callbacks=[ours])
    trainer.train()
    reference_trainer, theirs = plain_trainer_step(tmp_path, reference, exs, label_smoothing_factor=0.2)
    ours_loss = trainer.state.log_history[-1]["train_loss"]
    assert ours_loss == pytest.approx(reference_trainer.state.log_history[-1]["train_loss"], rel=1e-5)
    for name, g in theirs.items():
        torch.testing.assert_close(ours.grads[name], g, rtol=1e-4, atol=1e-6)
    no_smoothing = RagTrainer(
        model=tiny_model("llama"), args=args(tmp_path, max_length=64, max_steps=1), train_dataset=exs
    )
    no_smoothing.train()
    assert abs(no_smoothing.state.log_history[-1]["train_loss"] - ours_loss) > 1e-3  # smoothing took effect


def test_compute_loss_func_is_honoured(tmp_path, one_thread):
    calls = []

    def double_loss(outputs, labels, num_items_in_batch=None):
        calls.append((tuple(outputs.logits.shape), tuple(labels.shape), num_items_in_batch))
        logits = outputs.logits[:, :-1].flatten(0, 1).float()
        ce = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), reduction="sum")
        return 2 * ce / num_items_in_batch

    exs = examples()
    losses = []
    for func in (None, double_loss):
        t = RagTrainer(
            model=tiny_model("llama"),
            args=args(tmp_path, max_length=64, max_steps=1, learning_rate=0.0),
            train_dataset=exs,
            compute_loss_func=func,
        )
        t.train()
        losses.append(t.state.log_history[0]["loss"])
    total = sum(len(e["input_ids"]) for e in exs)
    assert calls and calls[0][0][:2] == (1, total) and calls[0][1] == (1, total)
    assert losses[1] == pytest.approx(2 * losses[0], rel=1e-5)


def test_empty_data_and_everything_dropped_raise_clear_errors(tmp_path):
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    with pytest.raises(ValueError, match="train dataset is empty"):
        RagTrainer(model=model, args=args(tmp_path), train_dataset=[], processing_class=tok)
    too_long = [{"question": "who?", "passages": ["alpha"], "answer": "alpha " * 60}] * 2
    with pytest.raises(
        ValueError, match=r"no train example is left: 2 records, 2 dropped .* raise max_length"
    ):
        RagTrainer(model=model, args=args(tmp_path), train_dataset=too_long, processing_class=tok)
    with pytest.raises(ValueError, match="no eval example is left"):
        RagTrainer(
            model=model,
            args=args(tmp_path),
            train_dataset=random_examples([5]),
            eval_dataset=random_examples([40]),
        )


def test_a_datasets_dataset_mixing_record_kinds_trains_like_the_list(tmp_path):
    """datasets gives every row the union of the columns and fills those a row lacks with None: the kind comes
    from the fields that are set."""
    import json

    from datasets import load_dataset

    tok = word_tokenizer()
    records = [
        {"question": "who lives in rome?", "passages": ["alpha lives in rome"], "answer": "alpha"},
        {
            "messages": [
                {"role": "user", "content": "where is rome?"},
                {"role": "assistant", "content": "italy"},
            ]
        },
        {"text": "the river of rome is the river"},
        {"prompt": "capital of italy?", "completion": "rome"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert dataset[1]["question"] is None and dataset[0]["messages"] is None
    a = args(tmp_path, max_length=64)
    model = tiny_model("llama", vocab_size=len(tok))
    as_list = RagTrainer(model=model, args=a, train_dataset=records, processing_class=tok)
    as_dataset = RagTrainer(model=model, args=a, train_dataset=dataset, processing_class=tok)
    assert as_dataset.train_dataset.examples == as_list.train_dataset.examples
    assert [e["source"] for e in as_list.train_dataset.examples] == ["raft", "instruct", "dap", "instruct"]


def test_mean_token_accuracy_is_logged_with_one_source(tmp_path, one_thread):
    trainer = RagTrainer(
        model=tiny_model("llama"),
        args=args(tmp_path, max_steps=2),
        train_dataset=examples(),
        eval_dataset=examples(),
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(0 <= h["mean_token_accuracy"] <= 1 for h in logged)
    assert 0 <= trainer.evaluate()["eval_mean_token_accuracy"] <= 1
    assert not any(k.startswith("loss/") for h in logged for k in h)


def test_sft_trainer_runs_on_the_ragkern_attention_under_bf16(tmp_path, one_thread):
    """TRL's SFTTrainer with padding-free packing on a model loaded with attn_implementation='ragkern' and
    bf16 autocast (TRL's default): trains, and its per-token losses are those of RagTrainer's packed row."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    exs = examples()
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=len(exs),
        padding_free=True,
        max_length=None,
        bf16=True,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        learning_rate=1e-3,
        logging_steps=1,
    )
    data = Dataset.from_list(
        [{"input_ids": e["input_ids"], "completion_mask": [int(t != -100) for t in e["labels"]]} for e in exs]
    )
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))
    ours = RagTrainer(
        model=tiny_model("llama", vocab_size=len(tok)),
        args=args(tmp_path, max_length=64, max_steps=1, bf16=True, use_cpu=True),
        train_dataset=exs,
    )
    ours.train()
    assert losses[0] == pytest.approx(ours.state.log_history[0]["loss"], rel=4 * 2.0**-8)


def test_unpacked_evaluation_gives_the_packed_predictions_and_loss(tmp_path, one_thread):
    """packing=False pads batches (Trainer's way): same per-example predictions and eval_loss as packed."""
    exs = examples()
    tok = word_tokenizer()
    model = tiny_model("llama")
    results = []
    for packing in (True, False):
        trainer = RagTrainer(
            model=model,
            args=args(tmp_path, packing=packing, per_device_eval_batch_size=3),
            train_dataset=exs,
            eval_dataset=exs,
            processing_class=tok,
        )
        results.append((trainer.predict(exs), trainer.evaluate()["eval_loss"]))
    (packed, packed_loss), (padded, padded_loss) = results
    np.testing.assert_allclose(padded.predictions, packed.predictions, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(padded.label_ids, packed.label_ids)
    assert padded_loss == pytest.approx(packed_loss, rel=1e-5)


def test_peft_wrapping_raises_no_future_warning():
    import warnings

    from peft import LoraConfig

    from ragkern.trainer import get_peft_model_quietly

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = get_peft_model_quietly(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert sum(p.requires_grad for p in model.parameters()) == 4  # lora_A and lora_B of 2 layers
