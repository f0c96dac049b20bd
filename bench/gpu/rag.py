"""Synthetic RAG examples of realistic lengths, shared by the attention benchmark and the end-to-end part.

One example (``scale=1``; a dry run shrinks every length by ``scale``)::

    question 16..96 | passage 1 | passage 2 | ... 3..8 passages of 64..384 | answer 16..192
    block 0         | block 1   | block 2   |                               | block 0

Mean about 1,400 tokens, so a 16k-token packed row holds about a dozen examples of very different lengths.
"""

from __future__ import annotations

import numpy as np
import torch


def _parts(rng: np.random.Generator, scale: float) -> list[tuple[int, int]]:
    """(length, block id) segments of one example."""

    def n(lo: int, hi: int) -> int:
        return max(1, round(int(rng.integers(lo, hi + 1)) * scale))

    k = int(rng.integers(3, 9))
    return [(n(16, 96), 0), *[(n(64, 384), b) for b in range(1, k + 1)], (n(16, 192), 0)]


def packed_row(total: int, *, seed: int = 0, scale: float = 1.0) -> tuple[list[int], torch.Tensor]:
    """Example lengths summing to exactly ``total`` (the last example cut short) and the ``(total,)`` int32
    block ids of the row."""
    rng = np.random.default_rng(seed)
    lengths, blocks, used = [], [], 0
    while used < total:
        ids = [b for length, b in _parts(rng, scale) for b in [b] * length][: total - used]
        lengths.append(len(ids))
        blocks += ids
        used += len(ids)
    return lengths, torch.tensor(blocks, dtype=torch.int32)


def examples(
    n_tokens: int, vocab: int, *, seed: int = 0, scale: float = 1.0, max_length: int | None = None
) -> list[dict]:
    """RAFT-like tokenized examples, about ``n_tokens`` in all: random token ids, labels on the answer only,
    block ids as above. Examples longer than ``max_length`` are drawn again."""
    rng = np.random.default_rng(seed)
    out, used = [], 0
    while used < n_tokens:
        parts = _parts(rng, scale)
        length = sum(p[0] for p in parts)
        if max_length is not None and length > max_length:
            continue
        ids = rng.integers(10, vocab, size=length).tolist()
        answer = parts[-1][0]
        out.append({
            "input_ids": ids,
            "labels": [-100] * (length - answer) + ids[length - answer :],
            "block_ids": [b for n, b in parts for b in [b] * n],
        })  # fmt: skip
        used += length
    return out


def visible_pairs(lengths: list[int], block_ids: torch.Tensor | None = None) -> int:
    """(query, key) pairs the causal per-example mask lets through (and the passage rule, given block ids):
    attention's forward costs ``4 * pairs * heads * head_dim`` FLOPs."""
    if block_ids is None:
        return sum(n * (n + 1) // 2 for n in lengths)
    pairs, start = 0, 0
    for n in lengths:
        ids = block_ids[start : start + n].long()
        start += n
        for b in ids.unique().tolist():
            mask = ids == b
            if b == 0:  # a global query sees every earlier key of its example
                pairs += int((torch.arange(1, n + 1)[mask]).sum())
            else:  # a passage query sees the earlier keys of its passage
                pairs += int(mask.long().cumsum(0)[mask].sum())
    return pairs
