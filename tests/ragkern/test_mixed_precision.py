"""Mixed precision on CPU: bf16 / fp16 autocast over fp32 weights, and models loaded in bf16.

Tolerances. Under autocast every matmul takes half-precision operands and rounds its output to half
precision, the weight gradients included (they reach the fp32 master gradient already rounded). A packed row
rounds one sum per GEMM where the per-example reference rounds each example's share, so gradients can only
agree to a few unit roundoffs u (bf16: u = 2**-8; fp16: u = 2**-11), measured as the norm of the difference
over the norm of the reference, per parameter:

* the same loss path packed vs one example at a time: < 4u (measured up to 0.9u bf16, 1.5u fp16);
* ragkern (fused loss, fp32 logits) vs Hugging Face's plain loss on bf16 logits: < 8u (measured up to 2.9u
  bf16, 3.6u fp16), since the two also round the logits' gradient at different points.

The forward is exact: per-token losses and logits of a packed row equal the examples' one by one bit for bit.
"""

import pytest
import torch

import ragkern.loss
from ragkern import PackingCollator, RagTrainer
from ragkern.loss import causal_lm_loss
from ragkern.selftest import check_no_leakage
from tests.ragkern.tiny import GradCapture, plain_trainer_step, random_examples, tiny_model
from tests.ragkern.tiny import trainer_args as args

UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
HALF = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


def norm_rel(grads, ref):
    return max(((grads[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref)


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_and_single(family, dtype, fused_single=True, single_attn="ragkern"):
    """Token losses and gradients of a packed row, and of its examples one by one, under autocast."""
    examples = random_examples([9, 4, 11, 6], answer_tail=3, seed=1)
    model = tiny_model(family).train()
    single = tiny_model(family, attn=single_attn).train()
    single.load_state_dict(model.state_dict())
    batch = PackingCollator()(examples)
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.autocast("cpu", dtype=dtype):
        loss, token_loss = causal_lm_loss(model, batch)
    loss.backward()
    singles = []
    for ex in examples:
        one = PackingCollator()([ex])
        with torch.autocast("cpu", dtype=dtype):
            loss_i, token_i = causal_lm_loss(
                single,
                {"input_ids": one["input_ids"], "labels": one["labels"]},
                num_items_in_batch=n,
                fused=fused_single,
            )
        loss_i.backward()
        singles.append(token_i[0])
    return token_loss[0], torch.cat(singles), grads_of(model), grads_of(single)


@HALF
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_packed_row_equals_examples_one_by_one_under_autocast(one_thread, family, dtype):
    """Invariant 1 under autocast: same per-token losses bit for bit, gradients within 4 unit roundoffs."""
    packed, single, grads, ref = packed_and_single(family, dtype)
    assert torch.equal(packed, single)
    assert norm_rel(grads, ref) < 4 * UNIT[dtype]


@HALF
def test_packed_fused_loss_matches_hf_plain_loss_under_autocast(one_thread, dtype):
    """Against the stock path (sdpa per example, logits materialised in half precision, fp32 loss)."""
    packed, single, grads, ref = packed_and_single("llama", dtype, fused_single=False, single_attn="sdpa")
    assert (packed - single).abs().max() < 1e-5
    assert norm_rel(grads, ref) < 8 * UNIT[dtype]


@HALF
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_no_leakage_under_autocast(one_thread, family, dtype):
    """Invariant 2 under autocast: editing one example leaves the others' logits bit-identical."""
    with torch.autocast("cpu", dtype=dtype):
        result = check_no_leakage(tiny_model(family), lengths=(7, 1, 12, 4, 9))
    assert result.passed, result.detail


def test_fused_loss_runs_in_the_autocast_dtype(monkeypatch):
    """fp32 master weights under bf16 autocast: the fused loss gets them uncast and runs its product in bf16,
    as F.linear would (the loss equals the unfused one's); the per-token loss comes back fp32, and the lm_head
    weight's gradient fp32."""
    seen = []
    real = ragkern.loss.fused_linear_cross_entropy

    def spy(hidden, weight, *a, **kw):
        seen.append((hidden.dtype, weight.dtype, torch.is_autocast_enabled("cpu")))
        return real(hidden, weight, *a, **kw)

    monkeypatch.setattr(ragkern.loss, "fused_linear_cross_entropy", spy)
    batch = PackingCollator()(random_examples([5, 7], seed=3))
    model = tiny_model("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, token_loss = causal_lm_loss(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert seen == [(torch.float32, torch.float32, True)]  # the loss casts under autocast, not the caller
    assert token_loss.dtype == torch.float32
    unfused = torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), batch["labels"][0, 1:], ignore_index=-100, reduction="none"
    )
    mask = batch["labels"][0, 1:] != -100  # token_loss[b, t]: the loss of labels[b, t] from position t - 1
    assert mask.any() and torch.allclose(token_loss[0, 1:][mask], unfused[mask], atol=2e-2)
    token_loss.sum().backward()
    assert model.get_output_embeddings().weight.grad.dtype == torch.float32
    _, token_loss = causal_lm_loss(model, batch)  # no autocast: fp32 stays fp32
    assert seen[-1] == (torch.float32, torch.float32, False)


def test_rag_trainer_bf16_step_matches_a_plain_trainer_step(tmp_path, one_thread):
    """bf16=True (fp32 weights + autocast, the README's --bf16): RagTrainer's packed step has the gradient of a
    stock Trainer step on the same examples, padded, with sdpa and the model's own loss."""
    examples = random_examples([9, 4, 11, 6], answer_tail=3, seed=1)  # 30 tokens: one bin of 32
    model = tiny_model("llama")
    reference = tiny_model("llama", attn="sdpa")
    reference.load_state_dict(model.state_dict())
    ours = GradCapture()
    RagTrainer(
        model=model,
        args=args(tmp_path, max_steps=1, bf16=True, use_cpu=True),
        train_dataset=examples,
        callbacks=[ours],
    ).train()
    _, theirs = plain_trainer_step(tmp_path, reference, examples, bf16=True, use_cpu=True)
    assert ours.grads.keys() == theirs.keys()
    assert norm_rel(ours.grads, theirs) < 8 * UNIT[torch.bfloat16]


def test_rag_trainer_trains_a_model_loaded_in_bf16(tmp_path, one_thread):
    """bf16 weights, no autocast: the loss is finite and falls on a repeated batch."""
    model = tiny_model("llama").to(torch.bfloat16)
    examples = random_examples([9, 4, 11, 6], answer_tail=3, seed=2)
    trainer = RagTrainer(
        model=model,
        args=args(tmp_path, max_steps=6, learning_rate=0.05, optim="adamw_torch"),
        train_dataset=examples,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert next(model.parameters()).dtype == torch.bfloat16


def test_fp16_autocast_with_grad_scaler_matches_fp32(one_thread):
    """fp16=True's recipe (autocast + GradScaler) on a packed row: the unscaled gradients match fp32's."""
    examples = random_examples([9, 4, 11, 6], answer_tail=3, seed=4)
    batch = PackingCollator()(examples)
    model = tiny_model("llama").train()
    exact = tiny_model("llama").train()
    exact.load_state_dict(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _ = causal_lm_loss(model, batch)
    scaler.scale(loss).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.unscale_(optimizer)
    loss32, _ = causal_lm_loss(exact, batch)
    loss32.backward()
    assert abs(loss.item() - loss32.item()) < 4e-3 * loss32.item()
    grads, ref = grads_of(model), grads_of(exact)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert norm_rel(grads, ref) < 2e-2  # fp16 activations vs fp32: a few hundred unit roundoffs at most
