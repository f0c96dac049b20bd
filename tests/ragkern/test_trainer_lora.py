"""RagTrainer with fused_lora: the same LoRA training as peft's own layers, and an adapter plain peft loads."""

import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import ragkern.lora as rl
from ragkern import PackingCollator, RagTrainer, RagTrainingArguments
from tests.ragkern.tiny import random_examples, tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 2 * len(TARGETS)  # tiny_model has 2 decoder layers


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused kernel calls made by ragkern.lora during a run."""
    count = [0]
    kernel = rl.lora_linear

    def counting(*args, **kwargs):
        count[0] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(rl, "lora_linear", counting)
    return count


class LossRecorder(RagTrainer):
    """Keeps every training micro-batch loss at full precision (the logged ones are rounded)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.losses.append(loss.item())
        return loss


def lora_model(dropout=0.0):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout)
    return get_peft_model(tiny_model("llama"), config)


def run(tmp_path, fused_lora, name, *, steps=5, dropout=0.0):
    model = lora_model(dropout)
    args = RagTrainingArguments(
        output_dir=str(tmp_path / name),
        max_length=32,
        per_device_train_batch_size=1,
        max_steps=steps,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=5,
        fused_lora=fused_lora,
    )
    examples = random_examples([20, 17, 9, 30, 12, 25, 8, 14], answer_tail=6, seed=21)
    trainer = LossRecorder(model=model, args=args, train_dataset=examples)
    trainer.losses = []
    trainer.train()
    return trainer


def fused_layers(model):
    return sum(bool(m.__dict__.get("_ragkern_fused_lora")) for m in model.modules())


def test_fused_lora_run_matches_peft_and_saves_a_plain_peft_adapter(tmp_path, calls, caplog):
    # LoRA dropout 0 only: with dropout the two runs cannot be compared step for step, since peft draws its mask
    # with torch's global generator over x while the fused path draws a seed and regenerates the mask from it
    # (never stored), so the same seed gives different masks. tests/ragkern/test_lora.py tests the fused
    # dropout against a reference that applies the kernel's own mask.
    plain = run(tmp_path, False, "plain")
    assert calls[0] == 0 and fused_layers(plain.model) == 0
    with caplog.at_level(logging.INFO, logger="ragkern.modeling"):
        fused = run(tmp_path, True, "fused")
    assert (
        f"fused LoRA (ragkern.kernels.lora_linear, torch path) serves {N_LAYERS} of {N_LAYERS}" in caplog.text
    )
    assert fused_layers(fused.model) == N_LAYERS
    assert calls[0] >= 5 * N_LAYERS  # at least every layer of every step's forward
    assert len(fused.losses) == len(plain.losses) == 5
    assert len(set(plain.losses)) == 5  # the adapter trains: the losses move
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)

    trained = {n: p for n, p in fused.model.named_parameters() if "lora_" in n}
    assert any(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)
    for n, p in plain.model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(trained[n], p, rtol=1e-4, atol=1e-6, msg=n)

    fused.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "adapter")).eval()
    assert fused_layers(loaded) == 0  # plain peft layers
    batch = PackingCollator()(random_examples([11, 7], seed=22))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    fused.model.eval()
    with torch.no_grad():
        want = fused.model(**inputs).logits
        got = loaded(**inputs).logits
        base = tiny_model("llama")(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the adapter changes the outputs


@pytest.mark.parametrize("setting,expected", [(None, 0), (False, 0), (True, N_LAYERS)])
def test_fused_lora_setting(tmp_path, setting, expected):
    """None (auto) fuses on CUDA only; the model here is on CPU."""
    model = lora_model()
    args = RagTrainingArguments(output_dir=str(tmp_path), report_to=[], fused_lora=setting)
    RagTrainer(model=model, args=args, train_dataset=random_examples([5, 6]))
    assert fused_layers(model) == expected


def test_fused_lora_without_lora_layers_is_a_no_op(tmp_path):
    model = tiny_model("llama")
    args = RagTrainingArguments(output_dir=str(tmp_path), report_to=[], fused_lora=True)
    RagTrainer(model=model, args=args, train_dataset=random_examples([5, 6]))
    assert fused_layers(model) == 0
