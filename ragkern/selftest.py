"""``ragkern selftest``: check packing invariants on a small random model of the user's architecture.

Run it before a long job: it builds a shrunken, randomly initialised copy of the model described by a
``config.json`` (or an architecture name transformers ships, e.g. ``llama``, ``qwen3``, ``gemma``), keeping
what changes attention (head ratio, biases, norms, rope, windows, soft-capping), and checks with the
"ragkern" attention, in fp32 on CPU:

1. packing equivalence: per-token losses and every parameter gradient of a packed row equal those of
   its examples run one by one (relative error < 1e-5);
2. no leakage: changing one example leaves the logits of the others bit-for-bit unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .collator import PackingCollator
from .loss import causal_lm_loss

# Sizes of the shrunken model; attention's shape (heads per kv head) is kept.
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512)
_VOCAB = 128


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str


def small_config(config_or_name: str | PretrainedConfig) -> PretrainedConfig:
    """A shrunken copy of a model config: from a path to ``config.json`` (or its folder), a model type name,
    or a config object."""
    if isinstance(config_or_name, PretrainedConfig):
        values = config_or_name.to_dict()
    elif os.path.exists(config_or_name):
        path = (
            os.path.join(config_or_name, "config.json") if os.path.isdir(config_or_name) else config_or_name
        )
        with open(path) as f:
            values = json.load(f)
    else:
        values = AutoConfig.for_model(config_or_name).to_dict()
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{config_or_name!r} has no model_type")
    heads = values.get("num_attention_heads") or 4
    kv = values.get("num_key_value_heads") or heads
    ratio = max(1, heads // kv)
    kv_small = 2 if ratio <= 2 else 1
    values.update(
        _SMALL, vocab_size=_VOCAB, num_attention_heads=kv_small * ratio, num_key_value_heads=kv_small
    )
    values["head_dim"] = 16
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids of the full vocabulary (phi3: 32000)
        ids = values.get(key)
        if isinstance(ids, int) and ids >= _VOCAB or isinstance(ids, list) and any(i >= _VOCAB for i in ids):
            values[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
    for key in ("quantization_config", "auto_map", "architectures", "_name_or_path", "torch_dtype", "dtype"):
        values.pop(key, None)
    if isinstance(values.get("layer_types"), list):  # keep the pattern of sliding/full layers, shortened
        values["layer_types"] = values["layer_types"][: _SMALL["num_hidden_layers"]]
    return AutoConfig.for_model(model_type, **values)


def _examples(model: torch.nn.Module, lengths: list[int], seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return [{"input_ids": torch.randint(4, vocab, (n,), generator=g).tolist()} for n in lengths]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_packing_equivalence(
    model: torch.nn.Module, reference: torch.nn.Module | None = None, lengths=(7, 1, 12, 4), seed: int = 0
) -> CheckResult:
    """Invariant 1: ``model`` on a packed row vs ``reference`` (default: ``model``; give it the same weights)
    on each example alone."""
    reference = model if reference is None else reference
    examples = _examples(model, list(lengths), seed)
    batch = PackingCollator()(examples)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    model.zero_grad()
    loss, token_loss = causal_lm_loss(model, batch)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    reference.zero_grad()
    singles = []
    for ex in examples:
        one = PackingCollator()([ex])
        l_i, t_i = causal_lm_loss(
            reference, {"input_ids": one["input_ids"], "labels": one["labels"]}, num_items_in_batch=n_targets
        )
        l_i.backward()  # gradients accumulate: their sum is the packed row's gradient
        singles.append(t_i[0])
    loss_err = _rel(token_loss[0], torch.cat(singles))
    ref_grads = dict(reference.named_parameters())
    if packed_grads.keys() != {n for n, p in ref_grads.items() if p.grad is not None}:
        return CheckResult(
            "packing equivalence", False, "packed and one-by-one runs reach different parameters"
        )
    grad_err = max(_rel(g, ref_grads[n].grad) for n, g in packed_grads.items())
    model.zero_grad()
    reference.zero_grad()
    ok = loss_err < 1e-5 and grad_err < 1e-5
    return CheckResult(
        "packing equivalence", ok, f"token-loss rel err {loss_err:.2e}, max gradient rel err {grad_err:.2e}"
    )


def check_no_leakage(model: torch.nn.Module, lengths=(7, 1, 12, 4), seed: int = 0) -> CheckResult:
    """Invariant 2 on ``model``: edit example 2, compare every other example's logits bit for bit."""
    examples = _examples(model, list(lengths), seed)
    edited = [dict(e) for e in examples]
    vocab = model.config.vocab_size
    edited[2] = {"input_ids": [4 + (t + 1) % (vocab - 4) for t in examples[2]["input_ids"]]}
    with torch.no_grad():
        logits = []
        for exs in (examples, edited):
            batch = PackingCollator()(exs)
            batch.pop("labels")
            logits.append(model(**batch).logits[0])
    cu = PackingCollator()(examples)["cu_seq_lens_q"].tolist()
    a, b = cu[2], cu[3]
    others_same = torch.equal(logits[0][:a], logits[1][:a]) and torch.equal(logits[0][b:], logits[1][b:])
    edited_changed = not torch.equal(logits[0][a:b], logits[1][a:b])
    ok = others_same and edited_changed
    detail = (
        "other examples bit-identical"
        if others_same
        else "other examples' logits changed: packed examples leak"
    )
    if not edited_changed:
        detail += "; the edit did not change its own example (check is void)"
    return CheckResult("no leakage", ok, detail)


def run_selftest(
    config_or_name: str | PretrainedConfig, attn_implementation: str = "ragkern"
) -> list[CheckResult]:
    """Build the small model and run both checks; returns their results."""
    config = small_config(config_or_name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    model.train(False)
    results = []
    for check in (check_packing_equivalence, check_no_leakage):
        try:
            results.append(check(model))
        except Exception as e:  # a model feature the path refuses is a failed check, with its reason
            results.append(
                CheckResult(check.__name__.removeprefix("check_").replace("_", " "), False, repr(e))
            )
    return results
