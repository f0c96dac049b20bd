"""Variable-length (packed) causal attention with optional passage block masks.

Layout follows flash-attn's varlen convention::

    q          (total, Hq, D)     tokens of all examples, back to back
    k, v       (total, Hkv, D)    Hq % Hkv == 0 (GQA: query head h reads kv head h // (Hq // Hkv))
    cu_seqlens (n + 1,) int32     example i owns tokens cu_seqlens[i]:cu_seqlens[i+1]
    block_ids  (total,) int32     optional; 0 = global, b > 0 = passage b

Mask, for a query i and a key j of the same example (never across examples)::

    causal:     j <= i
    block_ids:  block[i] == 0  or  block[j] == block[i]

so a passage token sees only earlier tokens of its own passage (its keys and values depend on that passage
alone), while question and answer tokens (block 0) see everything earlier in their example.

The plain PyTorch reference below is also the CPU path: it runs attention example by example, so its cost
grows with the sum of squared example lengths, never with the squared row length, and an example's output
is computed from its own tokens only (bit-for-bit independent of its neighbours).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "torch", "triton")


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    block_ids: torch.Tensor | None,
    backend: str,
) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (total, heads, head_dim); got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q{tuple(q.shape)} and k{tuple(k.shape)} must agree on total tokens (dim 0) and head_dim (dim 2)"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(
            f"q, k, v and cu_seqlens must be on one device; got {q.device}, {k.device}, {v.device}, {cu_seqlens.device}"
        )
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor of n+1 offsets; got {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must start at 0 and end at total={q.shape[0]}; got {cu[0]}..{cu[-1]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest example ({max(lengths)})")
    if block_ids is not None:
        if block_ids.shape != (q.shape[0],) or block_ids.dtype != torch.int32:
            raise ValueError(
                f"block_ids must be int32 of shape ({q.shape[0]},); got {block_ids.dtype} {tuple(block_ids.shape)}"
            )
        if block_ids.device != q.device:
            raise ValueError(f"block_ids is on {block_ids.device}, q on {q.device}")


def block_mask(block_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Boolean (L, L) mask of one example: True where query i may attend to key j.

    ``block_ids`` is the example's ``(L,)`` block ids (0 = global, b > 0 = passage b).
    """
    L = block_ids.shape[0]
    same = block_ids[:, None] == block_ids[None, :]
    allowed = same | (block_ids[:, None] == 0)
    if causal:
        allowed &= torch.ones(L, L, dtype=torch.bool, device=block_ids.device).tril()
    return allowed


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention example by example (the CPU path). Returns ``(total, Hq, D)`` in q's dtype.

    No checking here: :func:`varlen_attention` validates. Differentiable through autograd.
    """
    total, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qi = q[start:end].transpose(0, 1).unsqueeze(0)  # (1, Hq, L, D)
        ki = k[start:end].transpose(0, 1).unsqueeze(0)  # (1, Hkv, L, D)
        vi = v[start:end].transpose(0, 1).unsqueeze(0)
        mask = None
        if block_ids is not None:
            mask = block_mask(block_ids[start:end], causal)
        oi = F.scaled_dot_product_attention(
            qi,
            ki,
            vi,
            attn_mask=mask,
            is_causal=causal and mask is None,
            scale=scale,
            enable_gqa=Hq != Hkv,
        )
        outs.append(oi.squeeze(0).transpose(0, 1))  # (L, Hq, D)
    if not outs:
        return torch.empty_like(q)
    return torch.cat(outs, dim=0)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Packed attention over examples delimited by ``cu_seqlens``; differentiable.

    Args:
        q: ``(total, Hq, D)`` queries.
        k, v: ``(total, Hkv, D)`` keys and values, ``Hq % Hkv == 0``.
        cu_seqlens: ``(n + 1,)`` int32 offsets of the examples, starting at 0 and ending at ``total``.
        max_seqlen: length of the longest example.
        causal: mask keys after the query.
        softmax_scale: defaults to ``D ** -0.5``.
        block_ids: optional ``(total,)`` int32 passage ids (see the module docstring).
        backend: ``"torch"`` (the exact per-example reference), ``"triton"`` or ``"auto"``
            (Triton on CUDA, torch elsewhere).

    Returns:
        ``(total, Hq, D)`` in the dtype of ``q``.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, block_ids, backend)
    if backend == "triton":
        raise NotImplementedError("the Triton varlen attention kernel is not built yet; use backend='torch'")
    return varlen_attention_reference(q, k, v, cu_seqlens, causal=causal, softmax_scale=softmax_scale, block_ids=block_ids)
