"""``ragkern selftest``: check packing invariants on a small random model of the user's architecture, or on a
real checkpoint's own weights.

Run it before a long job: it builds a shrunken, randomly initialised copy of the model described by a
``config.json`` (or an architecture name transformers ships, e.g. ``llama``, ``qwen3``, ``gemma``), keeping
what changes attention (head ratio, biases, norms, rope, windows, soft-capping), and checks with the
"ragkern" attention, in fp32 on CPU:

1. packing equivalence: per-token losses and every parameter gradient of a packed row equal those of
   its examples run one by one (relative error < 1e-5);
2. no leakage: changing one example leaves the logits of the others bit-for-bit unchanged.

``ragkern selftest --model PATH`` (:func:`run_selftest_model`) runs the same two checks on a checkpoint folder's
real weights, loaded in fp32 on CPU, with a few short examples (24 tokens): slower than the shrunken model (a
full backward of the real model), but it tests the exact layers, norms and rope that training will run.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

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


def _packed_run(model: torch.nn.Module, examples: list[dict]) -> tuple[torch.Tensor, dict, int]:
    """One packed row: ``(token losses (T,), {parameter: gradient}, target count)``."""
    batch = PackingCollator()(examples)
    model.zero_grad()
    loss, token_loss = causal_lm_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return token_loss[0].detach(), grads, int((batch["labels"][:, 1:] != -100).sum())


def _one_by_one(
    model: torch.nn.Module, examples: list[dict], n_targets: int, *, fused: bool = True
) -> tuple[torch.Tensor, dict]:
    """Each example alone, gradients accumulated: ``(token losses (T,), {parameter: gradient})``."""
    model.zero_grad()
    token_losses = []
    for ex in examples:
        one = PackingCollator()([ex])
        loss, token_loss = causal_lm_loss(
            model,
            {"input_ids": one["input_ids"], "labels": one["labels"]},
            num_items_in_batch=n_targets,
            fused=fused,
        )
        loss.backward()
        token_losses.append(token_loss[0].detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return torch.cat(token_losses), grads


def check_packing_equivalence(
    model: torch.nn.Module, reference: torch.nn.Module | None = None, lengths=(7, 1, 12, 4), seed: int = 0
) -> CheckResult:
    """Invariant 1: ``model`` on a packed row vs ``reference`` (default: ``model``; give it the same weights)
    on each example alone."""
    reference = model if reference is None else reference
    examples = _examples(model, list(lengths), seed)
    packed_loss, packed, n_targets = _packed_run(model, examples)
    single_loss, single = _one_by_one(reference, examples, n_targets)
    if packed.keys() != single.keys():
        return CheckResult(
            "packing equivalence", False, "packed and one-by-one runs reach different parameters"
        )
    loss_err = _rel(packed_loss, single_loss)
    grad_err = max(_rel(g, single[n]) for n, g in packed.items())
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


def _run_checks(model: torch.nn.Module, checks, **kwargs) -> list[CheckResult]:
    """Each check's result; a model feature the path refuses is a failed check, with its reason."""
    results = []
    for check in checks:
        try:
            results.append(check(model, **kwargs))
        except Exception as e:
            results.append(
                CheckResult(check.__name__.removeprefix("check_").replace("_", " "), False, repr(e))
            )
    return results


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
    return _run_checks(model, (check_packing_equivalence, check_no_leakage))


class ModelPathError(ValueError):
    """``selftest --model`` was given something that is not a checkpoint folder; the message says what to do."""


def check_model_path(path: str | os.PathLike) -> Path:
    """``path`` if it is a checkpoint folder (holding ``config.json``), else :class:`ModelPathError`."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        raise ModelPathError(
            f"{p} is a GGUF file: convert it to a checkpoint first with `ragkern convert-gguf {p} OUTDIR`, "
            "then run selftest --model OUTDIR"
        )
    if not p.exists():
        raise ModelPathError(f"{p}: no such checkpoint folder (selftest --model needs a local folder)")
    if not (p / "config.json").is_file():
        raise ModelPathError(
            f"{p} holds no config.json: give the folder a model was saved to with save_pretrained"
        )
    return p


def check_packing_equivalence_real(
    model: torch.nn.Module, lengths=(7, 1, 12, 4), seed: int = 0
) -> CheckResult:
    """Invariant 1 on real weights, against an exact reference.

    Real weights have outlier activations, so fp32 rounding alone moves some gradients (norm weights, summed
    over tokens with cancellation) by ~1e-4 relative, whichever way they are computed. The reference is
    therefore each example alone in float64 (eager attention, plain loss): the packed row's gradients must be
    as close to it as the one-by-one fp32 run is (within 2x, or 1e-5), and its token losses equal the one-by-one
    fp32 losses (relative error < 1e-5).
    """
    examples = _examples(model, list(lengths), seed)
    packed_loss, packed, n_targets = _packed_run(model, examples)
    single_loss, single = _one_by_one(model, examples, n_targets)
    exact_model = copy.deepcopy(model).double()
    exact_model.set_attn_implementation("eager")
    _, exact = _one_by_one(exact_model, examples, n_targets, fused=False)
    del exact_model
    if packed.keys() != exact.keys() or single.keys() != exact.keys():
        return CheckResult(
            "packing equivalence", False, "packed and one-by-one runs reach different parameters"
        )
    loss_err = _rel(packed_loss, single_loss)
    packed_err = max(_rel(g.double(), exact[n]) for n, g in packed.items())
    floor = max(_rel(g.double(), exact[n]) for n, g in single.items())
    ok = loss_err < 1e-5 and packed_err <= max(1e-5, 2 * floor)
    return CheckResult(
        "packing equivalence",
        ok,
        f"token-loss rel err {loss_err:.2e}; max gradient rel err vs the float64 one-by-one reference "
        f"{packed_err:.2e} (one-by-one fp32: {floor:.2e})",
    )


def run_selftest_model(
    path: str | os.PathLike, attn_implementation: str = "ragkern", lengths: tuple[int, ...] = (7, 1, 12, 4)
) -> list[CheckResult]:
    """Load the checkpoint in ``path`` (fp32, CPU, ``attn_implementation``) and check invariants 1
    (:func:`check_packing_equivalence_real`) and 2 (:func:`check_no_leakage`) on its real weights with random
    token ids, examples of ``lengths`` tokens packed in one row; returns their results."""
    path = check_model_path(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=torch.float32
    )
    model.train(False)
    return _run_checks(model, (check_packing_equivalence_real, check_no_leakage), lengths=lengths)
