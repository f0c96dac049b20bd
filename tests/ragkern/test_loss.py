"""causal_lm_loss: the fused branch equals the plain (materialised logits) one: loss, every gradient and the
argmax hits."""

import copy
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ragkern import PackingCollator, RagTrainer, RagTrainingArguments
from ragkern import loss as loss_mod
from ragkern.loss import causal_lm_loss
from tests.ragkern.tiny import GradCapture, random_examples, tiny_model


def max_rel_diff(a, b):
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in a)


def run(model, batch, fused, n_items=None, **loss_args):
    model.zero_grad()
    loss, token_loss, hits = causal_lm_loss(
        model, batch, num_items_in_batch=n_items, fused=fused, return_hits=True, **loss_args
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), token_loss.detach(), grads, hits


def assert_fused_equals_plain(model, batch, n_items=None, impl="auto", **loss_args):
    """Loss, per-token loss, every gradient and the hits; half the targets are set to the model's own argmax
    first, so that the hits are neither all False nor all True."""
    batch = with_predicted_targets(model, batch)
    plain = run(copy.deepcopy(model), batch, fused=False, n_items=n_items, **loss_args)
    fused = run(model, batch, fused=True, n_items=n_items, impl=impl, **loss_args)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-6)
    assert fused[2].keys() == plain[2].keys() and fused[2]
    assert max_rel_diff(fused[2], plain[2]) < 1e-5
    assert fused[3].dtype == torch.bool and torch.equal(fused[3], plain[3])
    assert fused[3].any() and not fused[3][batch["labels"] != -100].all()
    return fused


def with_predicted_targets(model, batch):
    """``batch`` with every other target label replaced by the model's argmax at the position before it."""
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        pred = model(**inputs, use_cache=False).logits.argmax(-1)  # (B, T): predicts labels[:, t + 1]
    labels = batch["labels"].clone()
    b, t = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    b, t = b[::2], t[::2] + 1
    labels[b, t] = pred[b, t - 1]
    return {**batch, "labels": labels}


@pytest.fixture
def triton_backend(monkeypatch):
    """The fused loss on the triton backend, as on CUDA (the chunked path's row kernel in the interpreter);
    returns the keyword arguments of each call."""
    pytest.importorskip("triton")
    calls = []
    real = loss_mod.fused_linear_cross_entropy

    def on_triton(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs, backend="triton")

    monkeypatch.setattr(loss_mod, "fused_linear_cross_entropy", on_triton)
    return calls


def packed_batch(seed=1):
    return PackingCollator()(random_examples([9, 4, 11, 6], answer_tail=3, seed=seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
def test_fused_equals_plain_on_a_packed_row(family, fused_calls):
    batch = packed_batch()
    _, token_loss, _, _ = assert_fused_equals_plain(tiny_model(family), batch, n_items=17)
    assert len(fused_calls) == 1
    assert token_loss.shape == batch["labels"].shape and token_loss.dtype == torch.float32
    assert (token_loss[:, 0] == 0).all() and (token_loss[batch["labels"] == -100] == 0).all()


def gemma2(softcap=2.0):
    cfg = AutoConfig.for_model(
        "gemma2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=softcap,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 13))
    labels = ids.clone()
    labels[0, :5] = -100
    return model, {"input_ids": ids, "labels": labels}


def test_gemma2_final_logit_softcapping(fused_calls):
    assert_fused_equals_plain(*gemma2())
    assert fused_calls[0]["softcap"] == 2.0


def test_lora_on_lm_head_trains_the_adapter(fused_calls):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():  # lora_B starts at 0: give the adapter a value so its effect and gradients show
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    _, _, grads, _ = assert_fused_equals_plain(model, packed_batch(seed=2))
    assert len(fused_calls) == 1
    assert any("lm_head.lora_A" in n for n in grads) and any("lm_head.lora_B" in n for n in grads)


def test_lora_dropout_on_lm_head_falls_back_with_one_log_line(caplog, fused_calls):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1))
    model.train()
    with caplog.at_level(logging.WARNING, logger="ragkern.loss"):
        for _ in range(2):
            causal_lm_loss(model, packed_batch(), fused=True)[0].backward()
    assert not fused_calls
    assert sum("lora_dropout=0.1" in r.message for r in caplog.records) <= 1  # once per process
    assert any("lora_dropout" in m for m in loss_mod._logged)


def test_unrecognised_model_falls_back(caplog, fused_calls):
    cfg = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()  # no dropout
    ids = torch.randint(0, 64, (2, 9))
    with caplog.at_level(logging.WARNING, logger="ragkern.loss"):
        fused = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, fused=True)[0]
    plain = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, fused=False)[0]
    assert not fused_calls and torch.equal(fused, plain)
    assert any("'gpt2'" in m for m in loss_mod._logged)


def trainer_step_grads(tmp_path, **loss_args) -> list[dict]:
    """Parameter gradients of one RagTrainer SGD step on the same packed examples, fused loss then plain loss."""
    examples = random_examples([9, 4, 11, 6, 14, 7], answer_tail=3, seed=6)
    grads = []
    for fused in (True, False):
        capture = GradCapture()
        a = RagTrainingArguments(
            output_dir=str(tmp_path / str(fused)), max_length=32, per_device_train_batch_size=2, max_steps=1,
            optim="sgd", learning_rate=0.5, max_grad_norm=0.0, report_to=[], save_strategy="no",
            disable_tqdm=True, seed=7, fused_loss=fused, **loss_args,
        )  # fmt: skip
        RagTrainer(model=tiny_model("qwen3"), args=a, train_dataset=examples, callbacks=[capture]).train()
        grads.append(capture.grads)
    return grads


def test_trainer_step_fused_equals_plain(tmp_path, fused_calls):
    grads = trainer_step_grads(tmp_path)
    assert fused_calls  # the first run used the fused kernel
    assert max_rel_diff(grads[0], grads[1]) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_chunked_triton_equals_plain_on_a_packed_row(family, triton_backend):
    """impl="chunked" on the triton backend (cuBLAS-style GEMMs, the row kernel): loss, per-token loss and
    every parameter gradient equal the materialised-logits loss."""
    assert_fused_equals_plain(tiny_model(family), packed_batch(), n_items=17, impl="chunked")
    assert [k["impl"] for k in triton_backend] == ["chunked"]


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_trainer_step_fused_loss_impl_equals_plain(tmp_path, triton_backend, impl):
    """RagTrainingArguments.fused_loss_impl reaches the kernel: a training step with each design (triton
    backend) gives the plain loss's update."""
    grads = trainer_step_grads(tmp_path, fused_loss_impl=impl)
    assert triton_backend and all(k["impl"] == impl for k in triton_backend)
    assert max_rel_diff(grads[0], grads[1]) < 1e-5


def test_fused_loss_impl_is_checked(tmp_path):
    with pytest.raises(ValueError, match="fused_loss_impl='cublas' is not one of"):
        RagTrainingArguments(output_dir=str(tmp_path), fused_loss_impl="cublas", report_to=[])
    for impl in ("triton", "fused"):  # "fused": the deprecated name of "triton", still accepted
        assert RagTrainingArguments(
            output_dir=str(tmp_path), fused_loss_impl=impl, report_to=[]
        ).fused_loss_impl


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_hits_from_the_triton_backend_equal_the_plain_argmax(impl, triton_backend):
    """Both designs on the triton backend (the chunked path's row kernel, or the no-logits kernels, in the
    interpreter) take the argmax inside the loss: with Gemma 2's final-logit softcap and label smoothing, the
    hits, loss and gradients equal the materialised-logits path's."""
    assert_fused_equals_plain(*gemma2(), impl=impl, label_smoothing=0.1)
    assert [(k["impl"], k["return_hits"], k["softcap"]) for k in triton_backend] == [(impl, True, 2.0)]


def test_hits_cost_no_second_lm_head_pass():
    """return_hits=True on the fused path runs the lm_head product once (the loss's own chunk), not a second
    time over the target rows: every matmul with V columns is counted at dispatch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class VocabMatmuls(TorchDispatchMode):
        def __init__(self, V):
            super().__init__()
            self.V, self.shapes = V, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "matmul") and out.shape[-1] == self.V:
                self.shapes.append(tuple(out.shape))
            return out

    model, batch = tiny_model("llama", vocab_size=80), packed_batch()  # V unlike any hidden width
    counts = {}
    for hits in (False, True):
        with torch.no_grad(), VocabMatmuls(model.config.vocab_size) as mode:
            out = causal_lm_loss(model, batch, fused=True, return_hits=hits)
        counts[hits] = [s for s in mode.shapes if 0 not in s]  # the model's own lm_head runs on 0 positions
    assert len(out) == 3 and out[2].shape == batch["labels"].shape
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert counts[True] == counts[False] == [(n_targets, model.config.vocab_size)]
