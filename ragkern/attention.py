"""The "ragkern" attention implementation for Hugging Face models, and its dispatch.

``import ragkern`` registers it, so ``from_pretrained(..., attn_implementation="ragkern")`` works for the
model families whose attention goes through ``AttentionInterface`` (Llama, Qwen2/3, Mistral, Gemma, ...).

Where the example boundaries come from, in order:
  1. ``cu_seq_lens_q/k`` and ``max_length_q/k`` from :class:`ragkern.PackingCollator` (the normal path);
  2. ``position_ids`` restarting at 0 (a fallback, inferred per row; an example that does not start at 0 is
     merged into its predecessor, which is why the collator passes boundaries explicitly);
  3. neither: each row is one example (an ordinary batch; a padding ``attention_mask`` is honoured).

Dispatch for packed rows::

    CUDA + flash-attn installed + no block mask -> flash_attn_varlen_func
    CUDA otherwise                             -> ragkern.kernels.varlen_attention (Triton)
    CPU                                        -> exact attention example by example

Padded batches and decoding with a KV cache (query shorter than keys) run SDPA with an explicit mask.

Sliding-window layers (the ``sliding_window`` transformers passes: Mistral, Qwen2/3, Phi-3, Gemma 2/3's sliding
layers) and attention logit soft-capping (Gemma 2's ``softcap``) are honoured on every path: a query sees the
``sliding_window`` most recent keys of its own example, itself included; scores become
``softcap * tanh(scores / softcap)`` before the mask, as in the models' eager attention.

Block-masked packed rows on the Triton path build their tile lists (``block_tiles``) in the first layer of a
forward and reuse them in every other layer, the backward and checkpointed recomputes (memoised on the batch's
``block_ids`` and ``cu_seq_lens_q`` tensors): no per-layer metadata work, no host sync.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ragkern.kernels import attention as _kernel
from ragkern.kernels.attention import BlockTiles, block_tiles, varlen_attention, window_mask
from ragkern.packing import cu_seqlens_from_position_ids

try:  # optional: the `gpu` extra
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

NAME = "ragkern"


# Packed rows whose boundaries were checked: id(cu_seq_lens_q) -> (ref to it, its version, ref to
# cu_seq_lens_k, longest example). Every layer of a forward gets the same tensors, so only the first pays the
# device-to-host copy; RagTrainer checks its batches on the host before moving them (no copy at all).
_checked: dict[int, tuple[weakref.ref, int, weakref.ref | None, int]] = {}


def check_packed_row(
    cu_q: torch.Tensor, cu_k: torch.Tensor | None, total: int, max_length: int | None = None
) -> int:
    """Check one packed row's boundaries and return its longest example; remember the tensors as checked.

    ``cu_q`` (and ``cu_k``, which must equal it) are the ``(n + 1,)`` example offsets of a row of ``total``
    tokens; ``max_length`` (the collator's ``max_length_q``) must be at least the longest example. One
    device-to-host copy when the offsets live on a GPU, none on the CPU.
    """
    bounds = cu_q.tolist()
    if cu_k is not None and cu_k is not cu_q and cu_k.tolist() != bounds:
        raise NotImplementedError("the 'ragkern' attention needs cu_seq_lens_k == cu_seq_lens_q")
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seq_lens_q must run from 0 to the row's {total} tokens; got {bounds[:3]}...{bounds[-2:]}"
        )
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        raise ValueError("cu_seq_lens_q must be non-decreasing")
    longest = max(lengths)
    if max_length is not None and int(max_length) < longest:
        raise ValueError(f"max_length_q={int(max_length)} is smaller than the longest example ({longest})")
    mark_checked(cu_q, cu_k, longest)
    return longest


def mark_checked(cu_q: torch.Tensor, cu_k: torch.Tensor | None, longest: int) -> None:
    """Record ``cu_q``/``cu_k`` (e.g. after moving checked host tensors to the GPU) as checked, with the row's
    longest example, so the attention layers skip :func:`check_packed_row`."""
    if cu_q.is_inference():
        return  # no version counter to tell an in-place edit: every layer checks the row itself
    if len(_checked) > 64:
        _checked.clear()
    k_ref = None if cu_k is None or cu_k is cu_q else weakref.ref(cu_k)
    _checked[id(cu_q)] = (weakref.ref(cu_q), cu_q._version, k_ref, longest)


def _checked_longest(cu_q: torch.Tensor, cu_k: torch.Tensor | None) -> int | None:
    entry = None if cu_q.is_inference() else _checked.get(id(cu_q))
    if entry is None or entry[0]() is not cu_q or entry[1] != cu_q._version:
        return None
    if cu_k is not None and cu_k is not cu_q and (entry[2] is None or entry[2]() is not cu_k):
        return None
    return entry[3]


# Block-mask tile lists of the rows being run: the batch's block_ids tensor -> {(cu_seq_lens_q id, versions, kernel
# configuration): (ref to cu_seq_lens_q, offsets and block ids on the device, their BlockTiles)}. The first layer of
# a forward builds them; the other layers, the backward and checkpointed recomputes reuse them. An entry dies with
# its batch.
_row_tiles: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _triton_path(q: torch.Tensor) -> bool:
    """Whether a block-masked packed row runs ragkern's Triton kernel (CUDA with triton installed)."""
    return q.is_cuda and _kernel.triton is not None


def _block_row(
    block_arg: torch.Tensor,
    cu_arg: torch.Tensor,
    cu: torch.Tensor,
    max_len: int,
    causal: bool,
    q: torch.Tensor,
    backward: bool,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, BlockTiles]:
    """A packed row's int32 offsets ``(n + 1,)`` and block ids ``(T,)`` on q's device, and their tile lists, built
    once per batch: keyed on the batch's ``block_ids`` and ``cu_seq_lens_q`` tensors (identity and in-place
    version) and the kernel configuration, the layer's sliding ``window`` included (Gemma's sliding and full
    layers each get their lists). ``backward``: the lists of the backward are needed too."""
    extra = {} if window is None else {"window": window}  # windowed rows only: block_tiles' newer argument
    if block_arg.is_inference() or cu_arg.is_inference():  # no version counters: build for this call only
        blk = block_arg.reshape(-1).to(device=q.device, dtype=torch.int32)
        D, dtype = q.shape[2], q.dtype
        return (
            cu,
            blk,
            block_tiles(cu, blk, max_len, head_dim=D, dtype=dtype, causal=causal, backward=False, **extra),
        )
    config = (max_len, bool(causal), q.shape[2], q.dtype, q.device, window)
    key = (id(cu_arg), cu_arg._version, block_arg._version, *config)
    entries = _row_tiles.get(block_arg)
    if entries is None:
        entries = _row_tiles[block_arg] = {}
    hit = entries.get(key)
    if hit is not None and hit[0]() is cu_arg and (hit[3].dq is not None or not backward):
        return hit[1], hit[2], hit[3]
    # detached: a plain reshape would keep block_arg as its _base, and the entry (the value) its own key alive
    blk = block_arg.detach().reshape(-1).to(device=q.device, dtype=torch.int32)
    D = q.shape[2]
    tiles = block_tiles(
        cu, blk, max_len, head_dim=D, dtype=q.dtype, causal=causal, backward=backward, **extra
    )
    if len(entries) > 8:
        entries.clear()
    entries[key] = (weakref.ref(cu_arg), cu, blk, tiles)
    return cu, blk, tiles


def _unsupported(dropout: float, kwargs: dict) -> None:
    """Raise for model features this path cannot honour rather than compute something else."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by the 'ragkern' attention")
    if dropout > 0.0:
        raise NotImplementedError(
            f"attention dropout {dropout} is not supported by the 'ragkern' attention; set attention_dropout=0"
        )


def _packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    scale: float | None,
    block_ids: torch.Tensor | None,
    tiles: BlockTiles | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q ``(T, Hq, D)``, k/v ``(T, Hkv, D)`` -> ``(T, Hq, D)``; ``tiles``: the row's prebuilt block-mask lists;
    ``window``/``softcap``: transformers' ``sliding_window`` and attention logit soft-capping (None: off)."""
    if not q.is_cuda and torch.compiler.is_compiling():
        # the exact CPU path reads the offsets on the host; a compiled graph cannot: mask the row instead
        return _row_masked_sdpa(
            q,
            k,
            v,
            cu_seqlens,
            causal=causal,
            scale=scale,
            block_ids=block_ids,
            window=window,
            softcap=softcap,
        )
    if q.is_cuda and flash_attn_varlen_func is not None and block_ids is None and q.dtype != torch.float32:
        extra = {}
        if window is not None:  # flash-attn's (left, right) reach: i - window < j <= i once causal
            extra["window_size"] = (window - 1, window - 1)
        if softcap is not None:
            extra["softcap"] = softcap
        return flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            softmax_scale=scale,
            causal=causal,
            **extra,
        )
    return varlen_attention(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        causal=causal,
        softmax_scale=scale,
        block_ids=block_ids,
        block_tiles=tiles,
        window=window,
        softcap=softcap,
        backend="triton" if tiles is not None else "auto",  # tiles are built for the Triton path only
        validate=False,  # the offsets were checked once per row (check_packed_row) or built here
    )


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """q ``(B, Hq, Q, D)``, k/v ``(B, Hkv, K, D)``, ``allowed`` bool broadcastable to ``(B, 1, Q, K)`` ->
    ``(B, Hq, Q, D)``: the kernel module's masked attention (SDPA; with ``softcap`` the scores explicitly, since
    SDPA has no soft-capping)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _kernel.masked_attention(q, k, v, allowed, scale, softcap)


def _row_masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    block_ids: torch.Tensor | None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The packed row as one SDPA call with a ``(T, T)`` mask built on the device (no host read, so it
    traces under ``torch.compile(fullgraph=True)``): q ``(T, Hq, D)``, k/v ``(T, Hkv, D)`` -> ``(T, Hq, D)``.
    Same result as the per-example path; memory grows with T^2, which is why it is only the compiled CPU path.
    """
    T = q.shape[0]
    pos = torch.arange(T, device=q.device)
    example = torch.searchsorted(cu_seqlens.to(torch.int64), pos, right=True)  # (T,) example of each token
    # positions inside one example differ as in the row, so the window is a distance in the row
    allowed = (example[:, None] == example[None, :]) & window_mask(pos, pos, window, causal)
    if block_ids is not None:
        allowed &= (block_ids[:, None] == block_ids[None, :]) | (block_ids[:, None] == 0)
    out = _sdpa(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        allowed,
        scale=scale,
        softcap=softcap,
    )  # (1, Hq, T, D)
    return out[0].transpose(0, 1)


def _masked_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    causal: bool,
    scale: float | None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Padded batch or cached decoding: q ``(B, Hq, Q, D)``, k/v ``(B, Hkv, K, D)`` -> ``(B, Q, Hq, D)``.

    Causality and the window are aligned bottom-right (query i is key position i + K - Q, as in transformers'
    masks, which count cache positions); padded keys are masked; a query that would see no key (a padding
    position) sees all keys instead, so its output stays finite.
    """
    B, _, Q, _ = query.shape
    K = key.shape[2]
    dev = query.device
    allowed = window_mask(torch.arange(K - Q, K, device=dev), torch.arange(K, device=dev), window, causal)
    allowed = allowed.expand(B, 1, Q, K)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -K:].bool()
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    out = _sdpa(query, key, value, allowed, scale=scale, softcap=softcap)
    return out.transpose(1, 2)


def _compute_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype under autocast, else the value's when q, k, v differ.

    Under autocast the projections are half precision but RoPE returns q and k in fp32 (its cos/sin are
    fp32), so q, k, v reach attention in mixed dtypes; transformers' flash-attention integration casts them to
    the autocast dtype, as this does.
    """
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if query.dtype == key.dtype == value.dtype:
        return query.dtype
    return value.dtype


def ragkern_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry point: q ``(B, Hq, Q, D)``, k/v ``(B, Hkv, K, D)`` -> ``(B, Q, Hq, D)``."""
    B, Hq, Q, D = query.shape
    K = key.shape[2]
    dtype = _compute_dtype(query, key, value)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    cu = kwargs.get("cu_seq_lens_q")
    block_ids = kwargs.get("block_ids")
    # Gemma 2/3, Mistral, Qwen2/3, Phi-3 pass sliding_window (None on full-attention layers); Gemma 2 softcap
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    packed = cu is not None  # boundaries from the collator: the same tensors in every layer of the forward

    if cu is not None:
        if B != 1 or Q != K:
            raise ValueError(
                f"cu_seq_lens_q describes one packed row; got batch {B}, {Q} queries and {K} keys "
                "(packed rows have batch size 1 and no KV cache)"
            )
        cu_k, max_len = kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_q")
        if torch.compiler.is_compiling():  # no host read in a graph: check rows before (RagTrainer does)
            max_len = Q if max_len is None else int(max_len)
        else:
            longest = _checked_longest(cu, cu_k)
            if longest is None:  # the first layer of a forward on unchecked offsets: one host copy
                longest = check_packed_row(cu, cu_k, Q, max_len)
            max_len = longest if max_len is None else int(max_len)
        cu = cu.to(device=query.device, dtype=torch.int32)
    elif attention_mask is None and Q == K and kwargs.get("position_ids") is not None:
        # Fallback: infer boundaries per row from position_ids restarting at 0; rows are flattened.
        pos = kwargs["position_ids"].expand(B, -1)
        cus = [cu_seqlens_from_position_ids(pos[b]) + b * Q for b in range(B)]
        cu = torch.cat([cus[0]] + [c[1:] for c in cus[1:]]).to(device=query.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
    elif attention_mask is None and Q == K:
        cu = torch.arange(0, (B + 1) * Q, Q, dtype=torch.int32, device=query.device)
        max_len = Q
    else:
        _unsupported(dropout, kwargs)
        opts = dict(causal=causal, scale=scaling, window=window, softcap=softcap)
        return _masked_sdpa(query, key, value, attention_mask, **opts), None

    _unsupported(dropout, kwargs)
    if window is not None and window >= max_len:
        window = None  # the window reaches every key of the longest example: plain causal attention
    q = query.transpose(1, 2).reshape(B * Q, Hq, D)  # (T, Hq, D)
    k = key.transpose(1, 2).reshape(B * K, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * K, value.shape[1], D)
    tiles = None
    if block_ids is not None and packed and _triton_path(q) and not torch.compiler.is_compiling():
        grads = module.training or torch.is_grad_enabled()
        cu_arg = kwargs["cu_seq_lens_q"]
        cu, block_ids, tiles = _block_row(block_ids, cu_arg, cu, max_len, causal, q, grads, window)
    elif block_ids is not None:
        block_ids = block_ids.reshape(-1).to(device=query.device, dtype=torch.int32)
    opts = dict(
        causal=causal, scale=scaling, block_ids=block_ids, tiles=tiles, window=window, softcap=softcap
    )
    out = _packed_attention(q, k, v, cu, max_len, **opts)
    return out.reshape(B, Q, Hq, D), None


def ragkern_mask(batch_size: int, q_length: int, kv_length: int, *args, attention_mask=None, **kwargs):
    """Mask hook: keep only a 2-D padding mask (``(B, K)`` bool) when it masks something, else ``None``."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if bool(attention_mask.all()) else attention_mask


def register() -> None:
    """Register "ragkern" with transformers' attention and mask interfaces (done by ``import ragkern``)."""
    AttentionInterface.register(NAME, ragkern_attention_forward)
    AttentionMaskInterface.register(NAME, ragkern_mask)


register()  # importing this module (which ``import ragkern`` arranges) makes "ragkern" available
