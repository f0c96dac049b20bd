"""Reuse passage KV caches at inference for a model fine-tuned with ``block_attention=True``.

Trained with the passage block mask, a passage's keys and values depend on that passage alone, so they can be
computed once, stored, and reused for every query that retrieves the passage: the prefill of a query then
costs only its block-0 tokens (the prompt's header, the passage markers "[k]", the separators and the
question). The markers are block 0, so a passage's cache does not depend on the number the prompt gives it.

Position scheme: a passage is encoded alone at positions ``0 .. L-1``. When a prompt places it at position
``p``, its cached keys are re-rotated by ``p`` (RoPE composes: ``R(p + i) = R(p) R(i)``), so attention sees the
real prompt positions, exactly as in training (positions are never reset per passage). Values need no change.
Block-0 tokens are computed fresh with the assembled cache, seeing every earlier token::

    prompt      <s><|user|> Passages: [1] alpha ...  [2] beta ...   Question: ... <|assistant|>
    block_ids   0 ................... 0 0 1 1 1 1 ... 0 0 2 2 2 2 ... 0 ............................
    prefill     computed                  cached @0,      cached @0,   computed (sees all earlier)
                                          rotated to p1   rotated to p2

Usage::

    store = {text: encode_passage(model, ids) for text, ids in ...}   # once, offline
    save_caches("passages.safetensors", store)
    cache, logits, n_computed = prefill(model, segments)               # per query
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

_STATIC_ROPE = (None, "default", "linear", "llama3")


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


@dataclass
class PassageCache:
    """Keys and values of one passage, encoded alone at positions 0..L-1.

    ``keys[l]`` and ``values[l]`` are ``(Hkv, L, D)`` for layer ``l``; ``input_ids`` is ``(L,)``.
    """

    input_ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    fingerprint: str

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` in newer transformers 5.x, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rerotate(model: torch.nn.Module, keys: torch.Tensor, delta: int) -> torch.Tensor:
    """Move RoPE keys ``(..., L, D)`` encoded at positions ``i`` to positions ``i + delta``."""
    if delta == 0:
        return keys
    rotary = _rotary(model)
    pos = torch.tensor([[delta]], device=keys.device)
    cos, sin = rotary(keys.float(), pos)  # (1, 1, D), scaled by attention_scaling
    scale = getattr(rotary, "attention_scaling", 1.0)
    cos, sin = (cos[0, 0] / scale).float(), (sin[0, 0] / scale).float()
    if cos.shape[-1] != keys.shape[-1]:
        raise NotImplementedError("partial rotary embeddings are not supported for cache reuse")
    k = keys.float()
    return (k * cos + _rotate_half(k) * sin).to(keys.dtype)


@torch.no_grad()
def encode_passage(model: torch.nn.Module, input_ids: torch.Tensor | list[int]) -> PassageCache:
    """Run one passage alone (positions 0..L-1) and keep its per-layer keys and values."""
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=next(model.parameters()).device).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("a passage needs at least one token")
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[None], use_cache=True, **{_cache_kwarg(model): cache})
    keys = [layer.keys[0].clone() for layer in cache.layers]  # (Hkv, L, D) each
    values = [layer.values[0].clone() for layer in cache.layers]
    return PassageCache(ids.cpu(), keys, values, model_fingerprint(model))


def save_caches(path: str, caches: dict[str, PassageCache]) -> None:
    """Store passage caches (keyed by a name, e.g. the passage id) in one safetensors file."""
    tensors, meta = {}, {}
    for name, c in caches.items():
        if "/" in name:
            raise ValueError(f"cache name {name!r} must not contain '/'")
        tensors[f"{name}/input_ids"] = c.input_ids.contiguous()
        for layer, (k, v) in enumerate(zip(c.keys, c.values)):
            tensors[f"{name}/k{layer}"] = k.contiguous()
            tensors[f"{name}/v{layer}"] = v.contiguous()
        meta[name] = c.fingerprint
    save_file(tensors, path, metadata={"ragkern_fingerprints": json.dumps(meta)})


def load_caches(path: str) -> dict[str, PassageCache]:
    """Load what :func:`save_caches` wrote."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["ragkern_fingerprints"])
    tensors = load_file(path)
    out = {}
    for name, fingerprint in meta.items():
        n_layers = sum(1 for key in tensors if key.startswith(f"{name}/k"))
        out[name] = PassageCache(
            tensors[f"{name}/input_ids"],
            [tensors[f"{name}/k{i}"] for i in range(n_layers)],
            [tensors[f"{name}/v{i}"] for i in range(n_layers)],
            fingerprint,
        )
    return out


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


@torch.no_grad()
def prefill(
    model: torch.nn.Module, segments: list[list[int] | torch.Tensor | PassageCache]
) -> tuple[DynamicCache, torch.Tensor, int]:
    """Build the KV cache of a prompt from computed block-0 segments and cached passages, in order.

    Args:
        segments: token ids (computed, block 0) or a :class:`PassageCache` (reused, re-rotated).

    Returns:
        ``(cache, logits, computed_tokens)``: the cache of the whole prompt, the logits ``(V,)`` at its last
        position (the prompt must end with a computed segment), and how many tokens were run through the model.
    """
    if not segments or isinstance(segments[-1], PassageCache):
        raise ValueError("the prompt must end with computed tokens (the question), not a cached passage")
    fingerprint = model_fingerprint(model)
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None)
    total = sum(len(s) for s in segments)
    if limit is not None and total > limit:
        raise ValueError(f"the assembled prompt has {total} positions > max_position_embeddings={limit}")
    cache = DynamicCache(config=model.config)
    pos, computed, logits = 0, 0, None
    for seg in segments:
        if isinstance(seg, PassageCache):
            if seg.fingerprint != fingerprint:
                raise ValueError(
                    "this passage cache was built with another model or dtype; rebuild it with encode_passage"
                )
            for layer, (k, v) in enumerate(zip(seg.keys, seg.values)):
                k = rerotate(model, k.to(device), pos)
                cache.update(k[None], v.to(device)[None], layer)
            pos += len(seg)
        else:
            ids = torch.as_tensor(seg, dtype=torch.long, device=device).reshape(1, -1)
            n = ids.shape[1]
            positions = torch.arange(pos, pos + n, device=device)[None]
            out = model(input_ids=ids, position_ids=positions, use_cache=True, **{_cache_kwarg(model): cache})
            logits = out.logits[0, -1]
            pos += n
            computed += n
    return cache, logits, computed


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
            **{_cache_kwarg(model): cache},
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
