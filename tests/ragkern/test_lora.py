"""ragkern.lora.apply: peft LoRA layers of a tiny Llama on the fused kernel, and every case routed to peft."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import ragkern.lora as rl

from .tiny import tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 2 * len(TARGETS)  # tiny_model has 2 decoder layers


@pytest.fixture
def calls(monkeypatch):
    """Counts lora_linear calls made by ragkern.lora (0 means every layer ran peft's forward)."""
    count = [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return rl_lora_linear(*args, **kwargs)

    rl_lora_linear = rl.lora_linear
    monkeypatch.setattr(rl, "lora_linear", counting)
    return count


def _peft_model(seed: int = 0, **cfg):
    model = tiny_model("llama", seed=seed, attn="sdpa")
    cfg = dict(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0) | cfg
    model = get_peft_model(model, LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:  # peft starts B at 0: make the update visible
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _ids(seed: int = 0):
    return torch.randint(4, 64, (2, 11), generator=torch.Generator().manual_seed(seed))


def _run(model, ids, **kw):
    out = model(input_ids=ids, **kw).logits
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _same(a, b, atol=1e-5):
    (oa, ga), (ob, gb) = a, b
    torch.testing.assert_close(oa, ob, atol=atol, rtol=atol)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=atol, rtol=atol, msg=n)


def test_apply_same_outputs_and_grads(calls):
    model = _peft_model().train()
    ref = copy.deepcopy(model)
    assert rl.apply(model) == {"fused": N_LAYERS}
    assert rl.apply(model) == {"fused": N_LAYERS}  # idempotent
    ids = _ids()
    _same(_run(model, ids), _run(ref, ids))
    assert calls[0] == N_LAYERS
    assert rl.remove(model) == N_LAYERS
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, LoraLayer))
    _run(model, ids)
    assert calls[0] == N_LAYERS


def test_apply_with_bias_and_dropout(calls):
    model = _peft_model(lora_dropout=0.2)
    with torch.no_grad():  # a bias on the frozen base layers
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.base_layer.bias = torch.nn.Parameter(torch.randn(m.out_features) * 0.1, requires_grad=False)
    ref = copy.deepcopy(model)
    rl.apply(model)
    ids = _ids()
    _same(_run(model.eval(), ids), _run(ref.eval(), ids))  # eval: dropout off, exact
    model.train()
    torch.manual_seed(3)
    a = _run(model, ids)
    torch.manual_seed(3)
    b = _run(model, ids)
    _same(a, b, atol=0)  # the masks come from torch's generator: reproducible
    assert not torch.equal(a[0], _run(model.eval(), ids)[0])  # and dropout did something
    assert calls[0] == 4 * N_LAYERS


def test_save_load_with_plain_peft(tmp_path):
    model = _peft_model()
    ids = _ids()
    rl.apply(model)
    with torch.no_grad():
        fused_out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_model("llama", seed=0, attn="sdpa"), tmp_path)
    assert not any("forward" in m.__dict__ for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, fused_out, atol=1e-5, rtol=1e-5)


def test_merge_and_unload(calls):
    model = _peft_model()
    ids = _ids()
    rl.apply(model)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def test_merged_and_switched_after_apply_defer_or_follow(calls):
    model = _peft_model()
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.other" in n:
                p.normal_(0, 0.1)
    ref = copy.deepcopy(model)
    assert rl.apply(model) == {"fused": N_LAYERS}
    ids = _ids()
    with torch.no_grad():
        # switching the adapter: the fused path follows the active one
        for m in (model, ref):
            m.set_adapter("other")
        torch.testing.assert_close(
            model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
        assert calls[0] == N_LAYERS
        # merging: the fused forward defers to peft, which adds nothing on top of the merged weight
        for m in (model, ref):
            m.merge_adapter()
        torch.testing.assert_close(
            model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
        for m in (model, ref):
            m.unmerge_adapter()
        # two active adapters after apply: peft's forward
        for m in (model, ref):
            m.base_model.set_adapter(["default", "other"])
        torch.testing.assert_close(
            model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
        with model.disable_adapter(), ref.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert calls[0] == N_LAYERS


def _two_active(model):
    model.add_adapter("other", LoraConfig(r=4, target_modules=TARGETS))
    model.base_model.set_adapter(["default", "other"])


def _merged(model):
    model.merge_adapter()


def _float64(model):
    model.double()


def _overridden(model):
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.forward = m.forward  # a bound method stored on the instance, as accelerate's hooks do


@pytest.mark.parametrize(
    "cfg,prepare,reason",
    [
        (dict(use_dora=True), None, "DoRA"),
        (dict(lora_bias=True), None, "lora_bias"),
        ({}, _two_active, "2 active adapters"),
        ({}, _merged, "merged"),
        ({}, _float64, "unsupported dtype torch.float64"),
        ({}, _overridden, "forward already overridden"),
        (dict(target_modules=["embed_tokens"]), None, "layer type peft.tuners.lora.layer.Embedding"),
    ],
    ids=["dora", "lora_bias", "two_active", "merged", "float64", "overridden", "embedding"],
)
def test_routed_to_peft(calls, cfg, prepare, reason):
    model = _peft_model(**cfg)
    if prepare is not None:
        prepare(model)
    ref = copy.deepcopy(model)
    summary = rl.apply(model)
    assert rl.FUSED not in summary
    (key,) = summary
    assert reason in key and summary[key] > 0
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=0, rtol=0)
    assert calls[0] == 0


def test_call_time_reasons_defer(calls, caplog):
    model = _peft_model()
    ref = copy.deepcopy(model)
    rl.apply(model)
    ids = _ids()
    with torch.no_grad():
        # adapters in fp32, base in bf16, no autocast: peft's forward (it casts x to the adapter dtype)
        for m in (model, ref):
            m.to(torch.bfloat16)
            for mod in m.modules():
                if isinstance(mod, LoraLayer):
                    mod.lora_A.float(), mod.lora_B.float()
        rl._logged.clear()
        with caplog.at_level("INFO", logger="ragkern.lora"):
            out = model(input_ids=ids).logits
        torch.testing.assert_close(out, ref(input_ids=ids).logits, atol=0, rtol=0)
        assert calls[0] == 0
        assert sum("mixed dtypes" in r.message for r in caplog.records) == 1  # logged once
        # mixed-batch adapter_names: peft's forward
        for m in (model, ref):
            m.float().eval()
        kw = dict(input_ids=ids, adapter_names=["default", "__base__"])
        torch.testing.assert_close(model(**kw).logits, ref(**kw).logits, atol=0, rtol=0)
        assert calls[0] == 0
        # autocast bf16 (CPU): fused, with every operand in bf16 as autocast's F.linear
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, expect = model(input_ids=ids).logits, ref(input_ids=ids).logits
        assert calls[0] == N_LAYERS
        torch.testing.assert_close(out.float(), expect.float(), atol=0.1, rtol=0.05)
