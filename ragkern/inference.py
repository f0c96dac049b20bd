"""Reuse passage KV caches at inference for a model fine-tuned with ``block_attention=True``.

Trained with the passage block mask, a passage's keys and values depend on that passage alone, so they can be
computed once, stored, and reused for every query that retrieves the passage: the prefill of a query then
costs only its block-0 tokens (the prompt's header, the passage markers "[k]", the separators and the
question). The markers are block 0, so a passage's cache does not depend on the number the prompt gives it.

Position scheme: a passage is encoded alone at positions ``0 .. L-1``. When a prompt places it at position
``p``, its cached keys are re-rotated by ``p`` (RoPE composes: ``R(p + i) = R(p) R(i)``), so attention sees the
real prompt positions, exactly as in training (positions are never reset per passage). Values need no change.

A prefill is one model forward over the prompt's block-0 tokens only. Each layer's keys and values are one
buffer ``(B, Hkv, T, D)`` allocated once: the cached passages are written (re-rotated) into their slots first,
the forward writes the fresh tokens' keys and values into theirs, and its mask lets a fresh token see every
earlier position of its prompt (cached or fresh), which is what block 0 sees in the block-masked training
forward::

    prompt      <s><|user|> Passages: [1] alpha ...  [2] beta ...   Question: ... <|assistant|>
    block_ids   0 ................... 0 0 1 1 1 1 ... 0 0 2 2 2 2 ... 0 ............................
    K/V buffer  fresh ............... f f c c c c ... f f c c c c ... f ............................
                                          cached @0,      cached @0,
                                          rotated to p1   rotated to p2
    forward     the f tokens, one call; f at position p sees every key at positions <= p

Several prompts prefill together, left-padded (:func:`prefill_batch`), and decode with ``model.generate()``
from the assembled cache (:func:`generate_from_caches`). Passage caches live in a safetensors store
(:func:`save_caches`, :func:`load_caches`), read lazily from a memory map.

Usage::

    store = {pid: encode_passage(model, ids) for pid, ids in passages.items()}   # once, offline
    save_caches("passages.safetensors", store, dtype=torch.bfloat16)             # half the bytes of fp32
    store = load_caches("passages.safetensors", model=model)                     # lazy; refuses another model
    cache, logits, n_computed = prefill(model, [header, store["p7"], question])  # one query
    answers = generate_from_caches(model, prompts, max_new_tokens=32, stop_ids=stop)   # a batch of queries
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer

from .modeling import forward_names

_STATIC_ROPE = (None, "default", "linear", "llama3")
_STORE_FORMAT = "ragkern-passage-store-2"
# The attention the prefill forward runs on: SDPA with the explicit (B, 1, Q, K) mask the prefill builds.
PREFILL_ATTENTION = "ragkern_cached_prefill"


def model_fingerprint(model: torch.nn.Module) -> str:
    """What a passage cache depends on: architecture, sizes, rope, dtype and (a sample of) the weights."""
    cfg = model.config
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    fields = {
        k: getattr(text, k, None)
        for k in (
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
    }
    fields["head_dim"] = getattr(text, "head_dim", None)
    fields["rope"] = str(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None))
    fields["dtype"] = str(next(model.parameters()).dtype)
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():  # a strided sample of every tensor: cheap, yet any other
        flat = p.detach().reshape(-1)  # checkpoint or dtype gives another digest
        sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu()
        digest.update(name.encode() + sample.numpy().tobytes())
    fields["weights"] = digest.hexdigest()[:16]
    return json.dumps(fields, sort_keys=True)


_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(model: torch.nn.Module) -> str:
    """:func:`model_fingerprint`, remembered until a parameter or buffer is replaced or changed in place."""
    state = tuple((t.data_ptr(), t._version, t.dtype) for t in (*model.parameters(), *model.buffers()))
    hit = _fingerprints.get(model)
    if hit is None or hit[0] != state:
        hit = _fingerprints[model] = (state, model_fingerprint(model))
    return hit[1]


def _kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of the model's KV cache."""
    cfg = model.config
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def cache_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes one passage token takes in a store: ``2 * layers * kv_heads * head_dim * dtype size`` (K and V of
    every layer; ``dtype`` defaults to the model's). SmolLM2-135M: 2 * 30 * 3 * 64 * 4 = 46,080 in fp32."""
    layers, kv_heads, head_dim = _kv_shape(model)
    dtype = dtype or next(model.parameters()).dtype
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


@dataclass
class PassageCache:
    """Keys and values of one passage, encoded alone at positions 0..L-1.

    ``keys`` and ``values`` are ``(layers, Hkv, L, D)`` (layer ``l``: ``keys[l]``); ``input_ids`` is ``(L,)``.
    """

    input_ids: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    fingerprint: str

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def _rotary(model: torch.nn.Module) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise NotImplementedError(f"{type(base).__name__} has no rotary embedding that ragkern can re-rotate")
    rope_type = getattr(rotary, "rope_type", None)
    if rope_type not in _STATIC_ROPE:
        raise NotImplementedError(
            f"rope type {rope_type!r} has position-dependent frequencies; cannot re-rotate"
        )
    return rotary


def _rope_tables(model: torch.nn.Module, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``(n, D)`` (fp32, without attention scaling) of RoPE at positions ``deltas`` ``(n,)``."""
    rotary = _rotary(model)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32, device=deltas.device), deltas[None])  # (1, n, D)
    scale = getattr(rotary, "attention_scaling", 1.0)
    return (cos[0] / scale).float(), (sin[0] / scale).float()


def _rotate_into(out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``out = keys * cos + rotate_half(keys) * sin``, written into ``out`` (any strides) without temporaries.

    keys ``(..., L, D)`` in any float dtype; cos/sin ``(D,)``: RoPE of a position shift, so keys encoded at
    positions ``i`` land at ``i + shift``.
    """
    if cos.shape[-1] != keys.shape[-1]:
        raise NotImplementedError("partial rotary embeddings are not supported for cache reuse")
    h = keys.shape[-1] // 2
    k1, k2, o1, o2 = keys[..., :h], keys[..., h:], out[..., :h], out[..., h:]
    torch.mul(k1, cos[:h], out=o1)
    o1.addcmul_(k2, sin[:h], value=-1.0)  # rotate_half(k) = (-k2, k1)
    torch.mul(k2, cos[h:], out=o2)
    o2.addcmul_(k1, sin[h:])


def rerotate(model: torch.nn.Module, keys: torch.Tensor, delta: int) -> torch.Tensor:
    """Move RoPE keys ``(..., L, D)`` encoded at positions ``i`` to positions ``i + delta``."""
    if delta == 0:
        return keys
    cos, sin = _rope_tables(model, torch.tensor([delta], device=keys.device))
    out = torch.empty_like(keys)
    _rotate_into(out, keys, cos[0], sin[0])
    return out


@torch.no_grad()
def encode_passage(model: torch.nn.Module, input_ids: torch.Tensor | list[int]) -> PassageCache:
    """Run one passage alone (positions 0..L-1) and keep its keys and values ``(layers, Hkv, L, D)``."""
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=next(model.parameters()).device).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("a passage needs at least one token")
    cache = DynamicCache(config=model.config)
    if any(type(x) is not DynamicLayer for x in cache.layers):
        raise NotImplementedError(
            "passage cache reuse needs a plain dynamic cache (no sliding-window or hybrid layers): a sliding "
            "layer keeps only its window's keys"
        )
    model(input_ids=ids[None], use_cache=True, **{forward_names(model)[0]: cache})
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # (layers, Hkv, L, D)
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return PassageCache(ids.cpu(), keys, values, _fingerprint(model))


def save_caches(
    path: str | os.PathLike, caches: Mapping[str, PassageCache], *, dtype: torch.dtype | None = None
) -> None:
    """Store passage caches (keyed by a name, e.g. the passage id) in one safetensors file.

    All caches must come from one model (one fingerprint, kept in the file's metadata). ``dtype``
    (e.g. ``torch.bfloat16``) stores keys and values in that dtype, the bytes per token scaled to match
    (:func:`cache_bytes_per_token`); prefill casts them back to the model's dtype. Tensors per passage:
    ``{name}/input_ids`` ``(L,)``, ``{name}/k`` and ``{name}/v`` ``(layers, Hkv, L, D)``.
    """
    if not caches:
        raise ValueError("save_caches needs at least one passage cache")
    fingerprints = {c.fingerprint for c in caches.values()}
    if len(fingerprints) != 1:
        raise ValueError("the caches come from different models (fingerprints); store each model's apart")
    tensors = {}
    for name, c in caches.items():
        if "/" in name:
            raise ValueError(f"cache name {name!r} must not contain '/'")
        k, v = (c.keys, c.values) if dtype is None else (c.keys.to(dtype), c.values.to(dtype))
        tensors[f"{name}/input_ids"] = c.input_ids.contiguous().cpu()
        tensors[f"{name}/k"] = k.contiguous().cpu()
        tensors[f"{name}/v"] = v.contiguous().cpu()
    first = next(iter(caches.values()))
    layers, kv_heads, _, head_dim = first.keys.shape
    stored = dtype or first.keys.dtype
    meta = {
        "format": _STORE_FORMAT,
        "fingerprint": fingerprints.pop(),
        "dtype": str(stored),
        "bytes_per_token": str(2 * layers * kv_heads * head_dim * stored.itemsize),
    }
    save_file(tensors, str(path), metadata=meta)


class PassageStore(Mapping):
    """Passage caches in a safetensors file (:func:`save_caches`), read lazily.

    ``store[name]`` is a :class:`PassageCache` whose tensors are views of the memory-mapped file: nothing is
    read until a prefill touches it, and only the pages of the passages a prompt uses enter memory, so a store
    larger than memory works. ``bytes_per_token``: what one passage token takes in the file (K and V).
    """

    def __init__(self, path: str | os.PathLike, model: torch.nn.Module | None = None):
        self.path = str(path)
        self._file = safe_open(self.path, "pt")
        meta = self._file.metadata() or {}
        if meta.get("format") != _STORE_FORMAT:
            raise ValueError(
                f"{self.path} is not a ragkern passage store (or one written by an older ragkern); "
                "encode the passages with encode_passage and write them with save_caches"
            )
        self.fingerprint = meta["fingerprint"]
        self.dtype = meta["dtype"]
        self.bytes_per_token = int(meta["bytes_per_token"])
        self._names = sorted(k[: -len("/input_ids")] for k in self._file.keys() if k.endswith("/input_ids"))
        self._index = set(self._names)
        if model is not None and _fingerprint(model) != self.fingerprint:
            raise ValueError(
                f"{self.path} holds passage caches of another model or dtype (fingerprint "
                f"{self.fingerprint}, this model {_fingerprint(model)}); re-encode the passages with this model"
            )

    def __getitem__(self, name: str) -> PassageCache:
        if name not in self._index:
            raise KeyError(name)
        f = self._file
        return PassageCache(
            f.get_tensor(f"{name}/input_ids"),
            f.get_tensor(f"{name}/k"),
            f.get_tensor(f"{name}/v"),
            self.fingerprint,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_caches(path: str | os.PathLike, *, model: torch.nn.Module | None = None) -> PassageStore:
    """Open what :func:`save_caches` wrote, lazily (:class:`PassageStore`); with ``model``, refuse a store
    encoded by another model or dtype."""
    return PassageStore(path, model)


def segments_from_block_ids(input_ids: list[int], block_ids: list[int]) -> list[tuple[int, list[int]]]:
    """Split a prompt into runs of equal block id: ``[(block, token ids), ...]`` in order.

    Raises if a passage block appears in two separate runs (a passage must be one contiguous span).
    """
    if len(input_ids) != len(block_ids):
        raise ValueError(f"{len(input_ids)} input_ids but {len(block_ids)} block_ids")
    segments: list[tuple[int, list[int]]] = []
    for tok, blk in zip(input_ids, block_ids):
        if segments and segments[-1][0] == blk:
            segments[-1][1].append(tok)
        else:
            if blk != 0 and any(b == blk for b, _ in segments):
                raise ValueError(
                    f"passage block {blk} is split into several spans; a passage must be contiguous"
                )
            segments.append((blk, [tok]))
    return segments


class _PrefilledLayer(DynamicLayer):
    """A cache layer on preallocated ``(B, Hkv, T, D)`` buffers whose next update (the prefill forward)
    writes the new keys and values into reserved columns ``slots`` ``(B, Q)`` instead of appending them;
    afterwards it grows like any :class:`DynamicLayer` (decoding)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._slots = slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._slots is None:
            return super().update(key_states, value_states, *args, **kwargs)
        index = self._slots[:, None, :, None].expand_as(key_states)  # (B, Hkv, Q, D)
        self.keys.scatter_(2, index, key_states.to(self.dtype))
        self.values.scatter_(2, index, value_states.to(self.dtype))
        self._slots = None
        return self.keys, self.values


def _prefill_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """q ``(B, Hq, Q, D)``, k/v ``(B, Hkv, K, D)``, mask ``(B, 1, Q, K)`` (True: attend) -> ``(B, Q, Hq, D)``.

    With ``ragkern_prefill_plan`` (from :func:`prefill_batch`): one SDPA call per group of queries, over only
    the keys that group can see (a prompt's header does not scan the passages after it).
    """
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            "passage cache reuse does not support soft-capped logits or attention sinks"
        )
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise NotImplementedError(f"passage cache reuse does not support sliding-window attention ({window})")
    gqa = query.shape[1] != key.shape[1]
    plan = kwargs.get("ragkern_prefill_plan")
    if plan is None:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=gqa
        )
        return out.transpose(1, 2), None
    B, Hq, Q, D = query.shape
    out = query.new_empty(B, Q, Hq, D)
    for qs, qe, ke, mask in plan:  # mask (B, 1, qe - qs, ke), additive, in the query's dtype
        part = F.scaled_dot_product_attention(
            query[:, :, qs:qe],
            key[:, :, :ke],
            value[:, :, :ke],
            attn_mask=mask if mask.dtype == torch.bool else mask.to(query.dtype),
            scale=scaling,
            enable_gqa=gqa,
        )
        out[:, qs:qe] = part.transpose(1, 2)
    return out, None


def _query_groups(key_end: list[int], call_cost: int = 1024) -> list[tuple[int, int]]:
    """Split queries ``0..Q-1`` into runs ``[(start, end), ...]`` that minimise the attention work
    ``sum((end - start) * key_end[end - 1]) + call_cost * runs``; ``key_end[j]`` (non-decreasing): the keys
    query j may see lie in columns ``< key_end[j]``. Runs break only where ``key_end`` jumps (a cached passage
    lies between two fresh tokens), so the search is over the prompt's few segments."""
    cuts = [0] + [j for j in range(1, len(key_end)) if key_end[j] > key_end[j - 1] + 1] + [len(key_end)]
    best = [0.0] + [float("inf")] * (len(cuts) - 1)  # best[i]: cheapest split of queries [0, cuts[i])
    prev = [0] * len(cuts)
    for i in range(1, len(cuts)):
        for s in range(i):
            cost = best[s] + call_cost + (cuts[i] - cuts[s]) * key_end[cuts[i] - 1]
            if cost < best[i]:
                best[i], prev[i] = cost, s
    groups, i = [], len(cuts) - 1
    while i > 0:
        groups.append((cuts[prev[i]], cuts[i]))
        i = prev[i]
    return groups[::-1]


AttentionInterface.register(PREFILL_ATTENTION, _prefill_attention)


@contextlib.contextmanager
def _attention(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run the model on attention ``name`` inside the block. Not safe against a concurrent forward of the same
    model on another thread (the setting lives in its config)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


Segment = Sequence[int] | torch.Tensor | PassageCache


@dataclass
class Prefill:
    """What :func:`prefill_batch` returns; B prompts left-padded to T positions.

    ``cache``: the K/V of every prompt, ``(B, Hkv, T, D)`` per layer; ``logits`` ``(B, V)`` at each prompt's
    last position; ``input_ids`` and ``attention_mask`` ``(B, T)`` (padding: ``pad_token_id`` and 0) to
    continue with ``model.generate``; ``computed``: the tokens run through the model (block 0), ``prompt_tokens``:
    all prompt tokens, over the batch.
    """

    cache: DynamicCache
    logits: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    computed: int
    prompt_tokens: int


def _check_prompt(i: int, segments: Sequence[Segment], fingerprint: str, kv: tuple[int, int, int]) -> None:
    if not segments or isinstance(segments[-1], PassageCache):
        raise ValueError(
            f"prompt {i}: the prompt must end with computed tokens (the question), not a cached passage"
        )
    for seg in segments:
        if isinstance(seg, PassageCache):
            if seg.fingerprint != fingerprint:
                raise ValueError(
                    "this passage cache was built with another model or dtype; rebuild it with encode_passage"
                )
            layers, kv_heads, _, head_dim = seg.keys.shape
            if (layers, kv_heads, head_dim) != kv:
                raise ValueError(f"prompt {i}: a passage cache of shape {tuple(seg.keys.shape)} for K/V {kv}")
        elif len(seg) == 0:
            raise ValueError(f"prompt {i}: an empty segment; drop it")


@torch.no_grad()
def prefill_batch(
    model: torch.nn.Module, prompts: Sequence[Sequence[Segment]], *, pad_token_id: int = 0
) -> Prefill:
    """Build the KV cache of B prompts, each a list of computed block-0 segments and cached passages, in order.

    Args:
        prompts: per prompt, its segments: token ids (computed, block 0) or a :class:`PassageCache` (reused,
            re-rotated to where the prompt places it). Each prompt must end with computed tokens.
        pad_token_id: the id in ``input_ids``'s left padding.

    One forward runs every prompt's block-0 tokens ``(B, Qmax)`` (right-aligned, left-padded) against the
    ``(B, Hkv, T, D)`` K/V buffers, with a ``(B, 1, Qmax, T)`` mask: a fresh token at position p sees the keys of
    its prompt at positions <= p. Positions count from each prompt's first real token. Padding queries write
    their keys into padding columns (T is widened if needed) that no real query sees.
    """
    if not prompts:
        raise ValueError("prefill_batch needs at least one prompt")
    fingerprint = _fingerprint(model)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    kv = _kv_shape(model)
    for i, segments in enumerate(prompts):
        _check_prompt(i, segments, fingerprint, kv)
    lengths = [sum(len(s) for s in segs) for segs in prompts]  # T_b
    fresh = [sum(len(s) for s in segs if not isinstance(s, PassageCache)) for segs in prompts]  # Q_b
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(lengths) > limit:
        raise ValueError(
            f"the assembled prompt has {max(lengths)} positions > max_position_embeddings={limit}"
        )
    B, Q = len(prompts), max(fresh)
    T = max(n + Q - q for n, q in zip(lengths, fresh))  # room for each row's padding queries in its padding
    layers, kv_heads, head_dim = kv

    with torch.profiler.record_function("ragkern.prefill.assemble"):
        keys = torch.empty(layers, B, kv_heads, T, head_dim, dtype=dtype, device=device)
        values = torch.empty_like(keys)
        input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
        q_ids = torch.full((B, Q), pad_token_id, dtype=torch.long)
        q_pos = torch.full((B, Q), -1, dtype=torch.long)  # -1: a padding query
        slots = torch.empty(B, Q, dtype=torch.long)
        starts = torch.empty(B, dtype=torch.long)
        placed = []  # (row, column, position, passage cache)
        for b, segments in enumerate(prompts):
            pad = T - lengths[b]
            starts[b] = pad
            keys[:, b, :, :pad].zero_()  # masked, but finite: 0 * NaN would poison the softmax-weighted sum
            values[:, b, :, :pad].zero_()
            n_pad_q = Q - fresh[b]
            slots[b, :n_pad_q] = torch.arange(n_pad_q)  # padding queries write into padding columns
            col, qi = pad, n_pad_q
            for seg in segments:
                n = len(seg)
                if isinstance(seg, PassageCache):
                    placed.append((b, col, col - pad, seg))
                    input_ids[b, col : col + n] = seg.input_ids
                else:
                    ids = torch.as_tensor(seg, dtype=torch.long).reshape(-1)
                    input_ids[b, col : col + n] = ids
                    q_ids[b, qi : qi + n] = ids
                    q_pos[b, qi : qi + n] = torch.arange(col - pad, col - pad + n)
                    slots[b, qi : qi + n] = torch.arange(col, col + n)
                    qi += n
                col += n
        if placed:
            cos, sin = _rope_tables(model, torch.tensor([p for _, _, p, _ in placed], device=device))
            for i, (b, col, _, seg) in enumerate(placed):
                n = len(seg)
                k = seg.keys.to(device, non_blocking=True)
                _rotate_into(keys[:, b, :, col : col + n], k, cos[i], sin[i])
                values[:, b, :, col : col + n].copy_(seg.values, non_blocking=True)

        key_pos = torch.arange(T)[None, :] - starts[:, None]  # (B, T): position of each column, < 0 padding
        real = q_pos >= 0
        allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= q_pos[:, :, None])  # (B, Q, T)
        allowed |= ~real[:, :, None] & (torch.arange(T)[None, None, :] == slots[:, :, None])  # sees itself
        attention_mask = key_pos >= 0
        cache = DynamicCache(config=model.config)
        if len(cache.layers) not in (0, layers) or any(type(x) is not DynamicLayer for x in cache.layers):
            raise NotImplementedError(
                "passage cache reuse needs a plain dynamic cache (no sliding-window or hybrid layers)"
            )
        slots_on_device = slots.to(device)
        cache.layers[:] = [_PrefilledLayer(keys[i], values[i], slots_on_device) for i in range(layers)]

        allowed = allowed[:, None].to(device)  # (B, 1, Q, T)
        key_end = (slots.max(dim=0).values + 1).tolist()  # (Q,) the columns each query index may see
        fill = torch.finfo(dtype).min
        plan = []  # (first query, end query, key end, additive mask (B, 1, queries, keys)): built once per forward
        for qs, qe in _query_groups(key_end):
            ke = key_end[qe - 1]
            mask = torch.zeros(B, 1, qe - qs, ke, dtype=dtype, device=device)
            plan.append((qs, qe, ke, mask.masked_fill_(~allowed[:, :, qs:qe, :ke], fill)))

    extra = {"logits_to_keep": 1} if forward_names(model)[1] else {}
    with torch.profiler.record_function("ragkern.prefill.forward"), _attention(model, PREFILL_ATTENTION):
        out = model(
            input_ids=q_ids.to(device),
            position_ids=q_pos.clamp_min(0).to(device),
            attention_mask=allowed,
            use_cache=True,
            ragkern_prefill_plan=plan,
            **{forward_names(model)[0]: cache},
            **extra,
        )
    return Prefill(
        cache=cache,
        logits=out.logits[:, -1],  # every row's last query is its prompt's last token (right-aligned)
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.long().to(device),
        computed=sum(fresh),
        prompt_tokens=sum(lengths),
    )


@torch.no_grad()
def prefill(model: torch.nn.Module, segments: Sequence[Segment]) -> tuple[DynamicCache, torch.Tensor, int]:
    """Build the KV cache of one prompt from computed block-0 segments and cached passages, in order.

    Args:
        segments: token ids (computed, block 0) or a :class:`PassageCache` (reused, re-rotated).

    Returns:
        ``(cache, logits, computed_tokens)``: the cache of the whole prompt, the logits ``(V,)`` at its last
        position (the prompt must end with a computed segment), and how many tokens were run through the model.
        One forward over the computed tokens (:func:`prefill_batch` with one prompt).
    """
    out = prefill_batch(model, [segments])
    return out.cache, out.logits[0], out.computed


@torch.no_grad()
def generate_from_caches(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[Segment]],
    *,
    max_new_tokens: int,
    stop_ids: set[int] | None = None,
    pad_token_id: int | None = None,
    **generate_kwargs,
) -> list[list[int]]:
    """Greedy answers of B prompts (segments as in :func:`prefill_batch`): one batched prefill from the cached
    passages, then ``model.generate`` from the assembled cache. Returns each answer's token ids, cut before the
    first of ``stop_ids`` (default: the model's EOS ids). ``generate_kwargs`` go to ``generate``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if stop_ids is None:
        eos = model.generation_config.eos_token_id
        stop_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
        pad_token_id = pad_token_id if pad_token_id is not None else min(stop_ids, default=0)
    pre = prefill_batch(model, prompts, pad_token_id=pad_token_id)
    first = pre.logits.argmax(-1)  # (B,) the first answer token, from the prefill's own logits
    rows = first[:, None]
    if max_new_tokens > 1 and not all(int(t) in stop_ids for t in first):
        # generate runs only what the cache lacks: the first answer token, then one token per step
        ids = torch.cat([pre.input_ids, rows], dim=1)  # (B, T + 1)
        mask = torch.cat([pre.attention_mask, torch.ones_like(rows)], dim=1)
        options = dict(
            do_sample=False,
            max_new_tokens=max_new_tokens - 1,
            eos_token_id=sorted(stop_ids) or None,
            pad_token_id=pad_token_id,
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **{forward_names(model)[0]: pre.cache},
            **options,
            **generate_kwargs,
        )
        rows = out[:, pre.input_ids.shape[1] :]
    answers = []
    for row in rows.tolist():
        cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
        answers.append(row[:cut])
    return answers


@torch.no_grad()
def greedy_continue(
    model: torch.nn.Module,
    cache: DynamicCache,
    logits: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: set[int],
) -> list[int]:
    """Greedy decoding from a prefilled cache (positions continue after the prompt)."""
    device = logits.device
    out: list[int] = []
    pos = cache.get_seq_length()
    for _ in range(max_new_tokens):
        tok = int(logits.argmax())
        if tok in stop_ids:
            break
        out.append(tok)
        step = model(
            input_ids=torch.tensor([[tok]], device=device),
            position_ids=torch.tensor([[pos]], device=device),
            use_cache=True,
            **{forward_names(model)[0]: cache},
        )
        logits = step.logits[0, -1]
        pos += 1
    return out


@torch.no_grad()
def block_masked_greedy(
    model: torch.nn.Module,
    input_ids: list[int],
    block_ids: list[int],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
) -> list[int]:
    """Greedy answer with a full prefill of the whole prompt under the passage block mask (no cache reuse).

    The reference that cache reuse must match: every step runs the prompt and the tokens generated so far
    as one example, with ``block_ids`` (generated tokens are block 0), through the "ragkern" attention.
    """
    if len(input_ids) != len(block_ids) or not input_ids:
        raise ValueError(f"{len(input_ids)} input_ids and {len(block_ids)} block_ids: need equal, non-zero")
    if getattr(model.config, "_attn_implementation", None) != "ragkern":
        raise ValueError(
            "block_masked_greedy needs the model on the 'ragkern' attention (the block mask is applied there); "
            "call model.set_attn_implementation('ragkern')"
        )
    device = next(model.parameters()).device
    ids, blocks, out = list(input_ids), list(block_ids), []
    for _ in range(max_new_tokens):
        n = len(ids)
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        logits = model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=torch.arange(n, device=device)[None],
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=n,
            max_length_k=n,
            block_ids=torch.tensor([blocks], dtype=torch.int32, device=device),
        ).logits[0, -1]
        tok = int(logits.argmax())
        if tok in stop_ids:
            break
        out.append(tok)
        ids.append(tok)
        blocks.append(0)
    return out


@torch.no_grad()
def evaluate_cache_reuse(
    model: torch.nn.Module, tokenizer, records: list[dict], *, max_new_tokens: int = 16
) -> dict:
    """Answer RAFT ``records`` twice, with a full block-masked prefill and with reused passage caches.

    Each distinct passage (its token ids, as the prompt renders it) is encoded once with
    :func:`encode_passage` and reused by every query that lists it; at query time only block-0 tokens are run.
    Returns exact match both ways, how often the two answers agree, and the prefill token counts::

        {"exact_match_full_prefill", "exact_match_cached", "f1_full_prefill", "f1_cached", "agreement", "count",
         "prompt_tokens",
         "prefill_tokens_full", "prefill_tokens_cached", "prefill_saved_fraction", "passage_tokens_encoded"}
    """
    from .data import encode
    from .evaluate import score_predictions

    if not records:
        raise ValueError("evaluate_cache_reuse needs at least one record")
    stop = set(tokenizer.all_special_ids)
    was_training = model.training
    model.eval()
    store: dict[tuple[int, ...], PassageCache] = {}
    agree = prompt_tokens = computed_tokens = encoded_tokens = 0
    full_answers: list[str] = []
    cached_answers: list[str] = []
    try:
        for i, record in enumerate(records):
            ex = encode(record, tokenizer)
            cut = next((j for j, lab in enumerate(ex["labels"]) if lab != -100), None)
            if cut is None:
                raise ValueError(f"record {i} has no answer tokens to evaluate")
            ids, blocks = ex["input_ids"][:cut], ex["block_ids"][:cut]
            full = block_masked_greedy(model, ids, blocks, max_new_tokens=max_new_tokens, stop_ids=stop)
            segments: list = []
            for block, toks in segments_from_block_ids(ids, blocks):
                if block == 0:
                    segments.append(toks)
                    continue
                key = tuple(toks)
                if key not in store:
                    store[key] = encode_passage(model, toks)
                    encoded_tokens += len(toks)
                segments.append(store[key])
            cache, logits, computed = prefill(model, segments)
            cached = greedy_continue(model, cache, logits, max_new_tokens=max_new_tokens, stop_ids=stop)
            full_answers.append(tokenizer.decode(full, skip_special_tokens=True).strip())
            cached_answers.append(tokenizer.decode(cached, skip_special_tokens=True).strip())
            agree += full == cached
            prompt_tokens += len(ids)
            computed_tokens += computed
    finally:
        model.train(was_training)
    n = len(records)
    full_scores = score_predictions(records, full_answers)  # parses "Answer:", scores citations apart
    cached_scores = score_predictions(records, cached_answers)
    return {
        "exact_match_full_prefill": full_scores["exact_match"],
        "exact_match_cached": cached_scores["exact_match"],
        "f1_full_prefill": full_scores["f1"],
        "f1_cached": cached_scores["f1"],
        "agreement": agree / n,
        "count": n,
        "prompt_tokens": prompt_tokens,
        "prefill_tokens_full": prompt_tokens,
        "prefill_tokens_cached": computed_tokens,
        "prefill_saved_fraction": 1.0 - computed_tokens / prompt_tokens,
        "passage_tokens_encoded": encoded_tokens,
    }
