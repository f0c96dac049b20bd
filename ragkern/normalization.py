"""Loss normalisation of an optimizer step, as pure functions of batches and per-token losses.

``loss_normalization`` (RagTrainingArguments) picks what an optimizer step averages:

    "token"    sum of target-token losses / the step's target tokens         (Trainer's num_items_in_batch)
    "example"  mean over the step's examples of each example's mean token loss
    "source"   sum_s w_s L_s / sum_s w_s over the sources s present in the step, L_s their mean token loss

A step spans gradient accumulation and ranks, so its divisors (:func:`step_divisors`) are counted over all of
its micro-batches first; each micro-batch then weighs its token losses (:func:`token_weights`) so that the
weighted sums of the step's micro-batches add up to the step's loss. Token losses follow
``ragkern.loss.causal_lm_loss``: ``(B, T)``, position t the loss of predicting ``labels[:, t]``, column 0 never a
target. Source ids ``(B, T)`` index the list of source names the collator was given.
"""

from __future__ import annotations

import torch

from .data.encode import IGNORE_INDEX

LOSS_NORMALIZATIONS = ("token", "example", "source")


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: positions that carry a loss in ``causal_lm_loss``'s ``token_loss`` (column 0 never)."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return mask


def example_index(batch: dict) -> tuple[torch.Tensor, int]:
    """``(B, T)`` index of the example each token belongs to, and the number of examples.

    A packed row ``(1, T)`` holds the examples that ``cu_seq_lens_q`` delimits; a padded batch one per row.
    """
    labels = batch["labels"]
    cu = batch.get("cu_seq_lens_q")
    if cu is None:
        rows = torch.arange(labels.shape[0], device=labels.device)
        return rows[:, None].expand_as(labels), labels.shape[0]
    n = cu.numel() - 1
    index = torch.repeat_interleave(torch.arange(n, device=labels.device), (cu[1:] - cu[:-1]).long())
    return index.view_as(labels), n


def example_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index (B, T), target mask (B, T), target count per example (n,) float64)`` of a batch."""
    index, n = example_index(batch)
    mask = target_mask(batch["labels"])
    counts = torch.zeros(n, dtype=torch.float64, device=mask.device).index_add_(
        0, index[mask], torch.ones(int(mask.sum()), dtype=torch.float64, device=mask.device)
    )
    return index, mask, counts


def source_weight_vector(sources: tuple[str, ...], weights: dict | None) -> torch.Tensor:
    """``(S,)`` float64 weight of each of ``sources`` (1 for a source ``weights`` does not name)."""
    weights = weights or {}
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise ValueError(f"source_weights names {unknown}, which are not sources of the data {sources}")
    return torch.tensor([float(weights.get(name, 1.0)) for name in sources], dtype=torch.float64)


def step_divisors(batches: list[dict], mode: str, num_sources: int, device=None) -> torch.Tensor:
    """The divisors of an optimizer step made of ``batches`` (its micro-batches): ``(1,)`` the examples with a
    target ("example"), or ``(S,)`` the target tokens of each source ("source"), float64. Sum them over ranks
    for a multi-rank step."""
    if mode == "example":
        counts = torch.zeros(1, dtype=torch.float64, device=device)
        for batch in batches:
            counts += (example_targets(batch)[2] > 0).sum().to(device)
        return counts
    if mode != "source":
        raise ValueError(f"step_divisors is for loss_normalization 'example' or 'source', not {mode!r}")
    counts = torch.zeros(num_sources, dtype=torch.float64, device=device)
    for batch in batches:
        ids = require_source_ids(batch)[target_mask(batch["labels"])]
        counts += torch.bincount(ids, minlength=num_sources).to(device, torch.float64)
    return counts


def require_source_ids(batch: dict) -> torch.Tensor:
    """The batch's ``source_ids`` ``(B, T)``, or an error that says where they come from."""
    if batch.get("source_ids") is None:
        raise ValueError(
            "loss_normalization='source' needs the batch's source_ids: use packing=True with RagTrainer's "
            "PackingCollator (or a data_collator that emits source_ids)"
        )
    return batch["source_ids"]


def token_weights(
    batch: dict,
    mode: str,
    *,
    source_ids: torch.Tensor | None = None,
    source_weight: torch.Tensor | None = None,
    divisors: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, T)`` float32 weight of each token loss of ``batch`` so that their weighted sum is its share of the
    step's loss.

    "example": ``1 / (n_e * E)`` on the targets of example e, with ``n_e`` its target tokens and ``E`` the
    examples with a target in the step. "source": ``w_s / (n_s * W)`` on the targets of source s, with ``n_s``
    the step's target tokens of s and ``W`` the sum of the weights (``source_weight`` ``(S,)``) of the sources
    present in the step. ``divisors`` are the step's (:func:`step_divisors`); None: this batch's own.
    """
    if mode == "example":
        index, mask, per_example = example_targets(batch)
        examples = divisors if divisors is not None else (per_example > 0).sum()
        coef = 1.0 / (per_example.clamp_min(1) * examples.to(per_example.device).clamp_min(1))
        return (coef[index] * mask).float()
    if mode != "source":
        raise ValueError(f"token_weights is for loss_normalization 'example' or 'source', not {mode!r}")
    mask = target_mask(batch["labels"])
    if divisors is None:
        divisors = torch.bincount(source_ids[mask], minlength=len(source_weight)).double()
    counts = divisors.to(mask.device)
    weights = source_weight.to(mask.device)
    present = (weights * (counts > 0)).sum()
    coef = weights / (counts.clamp_min(1) * present.clamp_min(1e-30))
    return (coef[source_ids] * mask).float()


def target_stats(
    token_loss: torch.Tensor,
    hits: torch.Tensor | None,
    labels: torch.Tensor,
    source_ids: torch.Tensor | None,
    num_sources: int,
) -> torch.Tensor:
    """``(3, S)`` float64 per source: target-token loss sum, target count, argmax hits (one column, S = 1,
    when the batch has no ``source_ids``). ``token_loss``, ``hits``, ``labels``, ``source_ids``: ``(B, T)``."""
    mask = target_mask(labels)
    n = num_sources if source_ids is not None else 1
    ids = source_ids[mask] if source_ids is not None else torch.zeros_like(labels[mask])
    sums = torch.bincount(ids, weights=token_loss[mask].double(), minlength=n)
    counts = torch.bincount(ids, minlength=n).double()
    right = torch.bincount(ids, weights=hits[mask].double(), minlength=n) if hits is not None else counts * 0
    return torch.stack([sums, counts, right])


def example_stats(token_loss: torch.Tensor, batch: dict) -> torch.Tensor:
    """``(3, 1)`` float64: the sum of the batch's per-example mean target-token losses, the number of
    examples with a target, 0 (for ``loss_normalization="example"`` over a whole evaluation)."""
    index, mask, counts = example_targets(batch)
    sums = torch.zeros_like(counts).index_add_(0, index[mask], token_loss[mask].double())
    has = counts > 0
    means = (sums[has] / counts[has]).sum()
    return torch.stack([means, has.sum().double(), means * 0]).view(3, 1)


def set_loss(stats: torch.Tensor, mode: str, source_weight: torch.Tensor | None = None) -> float:
    """The loss of a whole set from its summed stats ``(3, S + 1)``: :func:`target_stats` columns per source,
    then the :func:`example_stats` column. "source" needs ``source_weight`` ``(S,)`` (else: "token")."""
    (sums, counts, _), (example_means, examples, _) = stats[:, :-1], stats[:, -1]
    if mode == "example":
        return float(example_means / examples.clamp_min(1))
    if mode == "source" and source_weight is not None and len(sums) == len(source_weight):
        w = source_weight * (counts > 0)
        return float((w * sums / counts.clamp_min(1)).sum() / w.sum().clamp_min(1e-30))
    return float(sums.sum()) / float(counts.sum())
