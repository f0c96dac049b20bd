"""The causal-LM loss of a packed batch, with per-token losses kept for logging."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .data.encode import IGNORE_INDEX
from .kernels import fused_linear_cross_entropy

logger = logging.getLogger(__name__)

# Model types whose logits are exactly lm_head(final hidden states), then optional final_logit_softcapping.
FUSED_MODEL_TYPES = ("llama", "mistral", "phi3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_logged: set[str] = set()


class _NotFusable(Exception):
    """The fused loss cannot reproduce this model's logits; the message says why."""


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / DeepSpeed wrappers and a peft ``PeftModel``."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        if model.active_peft_config.is_prompt_learning:
            raise _NotFusable("peft prompt learning adds virtual tokens")
        model = model.get_base_model()
    return model


def _lm_head_params(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (V, H), bias (V,) | None)`` of the lm_head, LoRA adapters included (merged in the graph,
    so A and B get their gradients)."""
    if type(head) is torch.nn.Linear:
        weight, bias = head.weight, head.bias
    elif hasattr(head, "lora_A") and hasattr(head, "get_base_layer"):  # peft lora.Linear
        base = head.get_base_layer()
        if type(base) is not torch.nn.Linear:
            raise _NotFusable(f"the LoRA lm_head wraps a {type(base).__name__}, not an nn.Linear")
        weight, bias = base.weight, base.bias
        if head.disable_adapters and head.merged:
            raise _NotFusable("the lm_head adapter is merged but disabled")
        if not head.disable_adapters and not head.merged:
            for name in head.active_adapters:
                if name not in head.lora_A:
                    continue
                if getattr(head, "lora_variant", {}).get(name) is not None:
                    raise _NotFusable(f"the lm_head adapter {name!r} is a LoRA variant (e.g. DoRA)")
                dropout = head.lora_dropout[name]
                if head.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    raise _NotFusable(f"the lm_head adapter {name!r} has lora_dropout={dropout.p}")
                lora_a, lora_b, scale = head.lora_A[name], head.lora_B[name], head.scaling[name]
                weight = weight + scale * (lora_b.weight @ lora_a.weight).to(weight.dtype)
                if lora_b.bias is not None:
                    bias = (0 if bias is None else bias) + scale * lora_b.bias
    else:
        raise _NotFusable(f"the lm_head is a {type(head).__name__}, not an nn.Linear or a peft LoRA Linear")
    if weight.dim() != 2 or weight.numel() == 0 or type(weight.data) is not torch.Tensor:
        raise _NotFusable("the lm_head weight is sharded (FSDP / ZeRO-3)")
    return weight, bias


def _fused_token_loss(
    model: torch.nn.Module,
    model_inputs: dict,
    targets: torch.Tensor,
    with_hits: bool = False,
    label_smoothing: float = 0.0,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, T)`` fp32 loss at each position against ``targets`` (0 where ignored), without the logits, and
    (``with_hits``) the ``(B, T)`` bool ``argmax(logits) == targets`` (False where ignored), else None: the loss
    kernel takes the argmax where it visits every logit anyway, so hits cost no second lm_head pass.

    The model runs through its own (possibly wrapped) forward with ``logits_to_keep`` selecting no position,
    so the lm_head sees an empty input; the final hidden states come back in ``hidden_states[-1]``. The lm_head
    product runs in the dtype the unfused ``F.linear`` would use: the autocast dtype under autocast (the final
    hidden states and fp32 master weights are cast to it), else the hidden states' dtype; the loss is
    accumulated in fp32 either way.
    """
    hf = _hf_model(model)
    model_type = getattr(hf.config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        raise _NotFusable(f"model type {model_type!r} is not one of {FUSED_MODEL_TYPES}")
    weight, bias = _lm_head_params(hf.get_output_embeddings())
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    none = torch.empty(0, dtype=torch.long, device=targets.device)
    out = model(**model_inputs, output_hidden_states=True, logits_to_keep=none)
    hidden = out.hidden_states[-1]  # (B, T, H), after the final norm; fp32 under autocast (fp32 residual)
    del out
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    out = fused_linear_cross_entropy(
        hidden.flatten(0, 1),
        weight,
        targets.flatten(),
        bias=bias,
        ignore_index=IGNORE_INDEX,
        reduction="none",
        softcap=softcap or None,
        label_smoothing=label_smoothing,
        impl=impl,
        return_hits=with_hits,
    )
    per_pos, hits = out if with_hits else (out, None)
    return per_pos.view_as(targets), None if hits is None else hits.view_as(targets)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` labels -> targets aligned with the logits: position t predicts ``labels[:, t + 1]``."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def logits_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and argmax hits from materialised logits, aligned with ``labels``.

    ``logits`` ``(B, T, V)`` (any float dtype; the loss is computed in fp32), ``labels`` ``(B, T)`` ->
    ``token_loss`` ``(B, T)`` fp32 and ``hits`` ``(B, T)`` bool: entry ``t`` is about predicting
    ``labels[:, t]`` from position ``t - 1`` (0 / False where the label is -100; column 0 always).
    """
    targets = shifted_targets(labels)
    per_pos = F.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view_as(targets)
    hits = (logits.detach().argmax(-1) == targets) & (targets != IGNORE_INDEX)
    return F.pad(per_pos[:, :-1], (1, 0)), F.pad(hits[:, :-1], (1, 0))


def causal_lm_loss(
    model: torch.nn.Module,
    inputs: dict,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    fused: bool = True,
    return_hits: bool = False,
    label_smoothing: float = 0.0,
    impl: str = "auto",
) -> tuple[torch.Tensor, ...]:
    """Run ``model`` on ``inputs`` and return ``(loss, token_loss)``, or ``(loss, token_loss, hits)``.

    ``token_loss`` is ``(B, T)`` float32 aligned with ``inputs["labels"]``: ``token_loss[b, t]`` is the loss
    of predicting ``labels[b, t]`` from position ``t - 1`` (0 where the label is -100; column 0 is always 0).
    ``loss = token_loss.sum() / num_items_in_batch``, or over the number of targets when that is ``None``,
    so a step accumulated over micro-batches (or ranks) sums to the mean over all of its target tokens.
    With ``return_hits``, ``hits`` is ``(B, T)`` bool, aligned the same way: the argmax of the logits at
    ``t - 1`` equals ``labels[b, t]`` (False where the label is -100); for token accuracy, no gradient.

    ``fused`` selects the fused linear + cross-entropy path (``ragkern.kernels.fused_linear_cross_entropy``
    on the lm_head weight, LoRA adapters on the lm_head included, Gemma's final_logit_softcapping applied)
    for Llama-, Mistral-, Phi-3-, Qwen2/3- and Gemma-family models, peft-wrapped or not. Anything it cannot
    reproduce exactly falls back to the plain path, which materialises the logits, with a one-time log line.
    ``impl`` is the fused loss's design (``fused_linear_cross_entropy``'s ``impl``): ``"chunked"`` (cuBLAS
    logits of at most 256 MiB of target rows at a time), ``"triton"`` (Triton kernels that never hold logits;
    CUDA only; ``"fused"`` is its deprecated name) or ``"auto"`` (chunked).
    On the fused path ``hits`` come from the loss kernel itself (the argmax taken where the log-sum-exp visits
    every logit; the first index wins a tie, as ``torch.argmax`` on the plain path's logits).

    ``label_smoothing`` is ``F.cross_entropy``'s (and ``Trainer``'s ``label_smoothing_factor``): each target's
    loss is ``(1 - eps) * nll + eps * mean over the vocabulary of -log p``, on both paths.

    A packed row (``cu_seq_lens_q`` in ``inputs``) runs with ``use_cache=False``: it is never decoded
    further, and a cache would keep every layer's keys and values alive.
    """
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if "cu_seq_lens_q" in model_inputs:
        model_inputs.setdefault("use_cache", False)
    targets = shifted_targets(labels)
    token_loss = hits = None
    if fused:
        try:
            per_pos, hits = _fused_token_loss(
                model,
                model_inputs,
                targets,
                with_hits=return_hits,
                label_smoothing=label_smoothing,
                impl=impl,
            )
            token_loss = F.pad(per_pos[:, :-1], (1, 0))  # realign with labels
            hits = None if hits is None else F.pad(hits[:, :-1], (1, 0))
        except _NotFusable as why:
            _log_once(f"ragkern: fused loss off, using the plain loss (materialised logits): {why}")
    if token_loss is None:
        logits = model(**model_inputs).logits  # (B, T, V)
        token_loss, hits = logits_token_loss(logits, labels, label_smoothing=label_smoothing)
    denom = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE_INDEX).sum()
    if torch.is_tensor(denom):
        denom = denom.to(token_loss.device)
    if return_hits:
        return token_loss.sum() / denom, token_loss, hits
    return token_loss.sum() / denom, token_loss
