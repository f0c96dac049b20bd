"""The causal-LM loss of a packed batch, with per-token losses kept for logging."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.encode import IGNORE_INDEX


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` labels -> targets aligned with the logits: position t predicts ``labels[:, t + 1]``."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(
    model: torch.nn.Module,
    inputs: dict,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``inputs`` and return ``(loss, token_loss)``.

    ``token_loss`` is ``(B, T)`` float32 aligned with ``inputs["labels"]``: ``token_loss[b, t]`` is the loss
    of predicting ``labels[b, t]`` from position ``t - 1`` (0 where the label is -100; column 0 is always 0).
    ``loss = token_loss.sum() / num_items_in_batch``, or over the number of targets when that is ``None``,
    so a step accumulated over micro-batches (or ranks) sums to the mean over all of its target tokens.

    ``fused`` selects the fused linear + cross-entropy path when the model supports it; the plain path
    materialises the logits.
    """
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs).logits  # (B, T, V)
    targets = shifted_targets(labels)
    per_pos = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    token_loss = F.pad(per_pos[:, :-1], (1, 0))  # realign with labels
    denom = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE_INDEX).sum()
    if torch.is_tensor(denom):
        denom = denom.to(token_loss.device)
    return token_loss.sum() / denom, token_loss
