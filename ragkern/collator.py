"""PackingCollator: the examples of a micro-batch as one padding-free row with explicit boundaries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.encode import IGNORE_INDEX
from .packing import cu_seqlens_from_lengths, position_ids_from_lengths


def _check_contiguous_blocks(block_ids, example: int) -> None:
    """Every passage block (id > 0) must be one contiguous span: a passage's cache is one piece."""
    seen, prev = set(), None
    for b in block_ids:
        if b != prev:
            if b != 0 and b in seen:
                raise ValueError(
                    f"example {example}: passage block {b} appears in two separate spans of block_ids"
                )
            seen.add(b)
            prev = b


@dataclass
class PackingCollator:
    """Concatenate examples into one row of shape ``(1, T)``, ``T = sum of lengths``, with no padding.

    For examples A (3 tokens) and B (2 tokens)::

        input_ids     a0 a1 a2 b0 b1
        labels        -- a1 a2 -- b1     the first token of every example is -100: b0 is never
                                         predicted from A's last token
        position_ids   0  1  2  0  1
        cu_seq_lens_q  [0, 3, 5]         int32 (cu_seq_lens_k is the same tensor)
        max_length_q   3                 int (max_length_k the same)

    Examples are dicts with ``input_ids`` and optionally ``labels`` (default: every token a target) and
    ``block_ids``. ``block_ids`` (``(1, T)`` int32) is returned only when ``block_attention=True``: it turns on
    the passage block mask of the "ragkern" attention. With ``source_names`` (RagTrainer sets it), the batch
    also holds ``source_ids`` ``(1, T)``: the index in ``source_names`` of each token's example ``source``, for
    per-source loss logging (not a model input). The output works with a plain ``transformers.Trainer``
    whose model uses ``attn_implementation="ragkern"`` (or flash-attention, which reads the same kwargs).
    """

    block_attention: bool = False
    source_names: tuple[str, ...] | None = None
    return_tensors: str = "pt"

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("PackingCollator got an empty batch")
        lengths = []
        ids, labels, blocks, sources = [], [], [], []
        for i, ex in enumerate(examples):
            seq = list(ex["input_ids"])
            if not seq:
                raise ValueError(f"example {i} of the batch has no tokens")
            lab = list(ex["labels"]) if ex.get("labels") is not None else list(seq)
            if len(lab) != len(seq):
                raise ValueError(f"example {i}: {len(lab)} labels for {len(seq)} input_ids")
            lab[0] = IGNORE_INDEX
            lengths.append(len(seq))
            if self.source_names is not None:
                sources += [self._source_id(ex.get("source", "default"), i)] * len(seq)
            ids += seq
            labels += lab
            if self.block_attention:
                blk = ex.get("block_ids")
                if blk is None or len(blk) != len(seq):
                    raise ValueError(
                        f"example {i}: block_attention needs block_ids of the same length as input_ids"
                    )
                _check_contiguous_blocks(blk, i)
                blocks += list(blk)
        max_len = max(lengths)
        cu = cu_seqlens_from_lengths(lengths)
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long).unsqueeze(0),
            "labels": torch.tensor(labels, dtype=torch.long).unsqueeze(0),
            "position_ids": position_ids_from_lengths(lengths).unsqueeze(0),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max_len,
            "max_length_k": max_len,
        }
        if self.block_attention:
            batch["block_ids"] = torch.tensor(blocks, dtype=torch.int32).unsqueeze(0)
        if self.source_names is not None:
            batch["source_ids"] = torch.tensor(sources, dtype=torch.long).unsqueeze(0)
        return batch

    def _source_id(self, source: str, example: int) -> int:
        try:
            return self.source_names.index(source)
        except ValueError:
            raise ValueError(
                f"example {example} of the batch has source {source!r}, not one of the source_names "
                f"{list(self.source_names)}; list every source tag of the data in "
                "PackingCollator(source_names=...) or PackedIterableDataset(source_names=...)"
            ) from None


@dataclass
class PaddingCollator:
    """The unpacked alternative (``packing=False``): right-pad examples to the longest in the batch.

    Returns ``input_ids`` and ``labels`` (padding is ``pad_token_id`` / -100) and ``attention_mask``, each
    ``(B, T_max)``; the "ragkern" attention masks the padded keys.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("PaddingCollator got an empty batch")
        longest = max(len(ex["input_ids"]) for ex in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[i, :n] = torch.as_tensor(ex["input_ids"])
            labels[i, :n] = torch.as_tensor(ex["labels"] if ex.get("labels") is not None else ex["input_ids"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def example_spans(batch: dict) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of every example of a batch, in order: the segments of a packed row
    (``cu_seq_lens_q``), or the rows of a right-padded batch up to their ``attention_mask`` length."""
    cu = batch.get("cu_seq_lens_q")
    if cu is not None:
        bounds = cu.tolist()
        return [(0, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    B, T = batch["input_ids"].shape[:2]
    mask = batch.get("attention_mask")
    lengths = mask.sum(1).tolist() if mask is not None else [T] * B
    return [(b, 0, int(n)) for b, n in enumerate(lengths)]


def per_example(t: torch.Tensor, spans: list[tuple[int, int, int]], pad) -> torch.Tensor:
    """``(B, T, ...)`` -> ``(n, L, ...)``: one row per span, padded with ``pad`` to the longest span."""
    longest = max(e - s for _, s, e in spans)
    out = t.new_full((len(spans), longest, *t.shape[2:]), pad)
    for i, (row, s, e) in enumerate(spans):
        out[i, : e - s] = t[row, s:e]
    return out
