"""The causal-LM loss of a packed batch, with per-token losses kept for logging."""

from __future__ import annotations

import contextlib
import logging
import types

import torch
import torch.nn.functional as F

from .data.encode import IGNORE_INDEX
from .kernels import fused_linear_cross_entropy

logger = logging.getLogger(__name__)

# Model types whose logits are exactly lm_head(final hidden states), then optional final_logit_softcapping.
FUSED_MODEL_TYPES = ("llama", "mistral", "phi3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_logged: set[str] = set()
_FSDP_METHOD = "_ragkern_fsdp2_forward"  # instance method set on an FSDP2 unit that holds the lm_head


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


def _fsdp_module_class() -> type | None:
    """FSDP2's ``FSDPModule`` when a process group is up (``fully_shard`` needs one), else None; imported
    only then, so a single-process run does not import ``torch.distributed.fsdp``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:  # pragma: no cover - older torch: no FSDP2 to see through
        return None
    return FSDPModule


def _plain_type(m: torch.nn.Module) -> type:
    """``m``'s class, seen through the ``FSDP<cls>`` subclass that FSDP2's ``fully_shard`` swaps in."""
    cls = type(m)
    fsdp_module = _fsdp_module_class()
    if fsdp_module is not None and isinstance(m, fsdp_module):
        bases = [b for b in cls.__bases__ if b is not fsdp_module]
        if len(bases) == 1:
            return bases[0]
    return cls


def _lm_head_parts(head: torch.nn.Module) -> tuple[torch.nn.Linear, list]:
    """The lm_head's ``nn.Linear`` and its active LoRA adapters ``[(lora_A, lora_B, scale)]``, or _NotFusable.

    Reads no parameter values, so it is safe while FSDP2 holds the parameters sharded."""
    if _plain_type(head) is torch.nn.Linear:
        return head, []
    if not (hasattr(head, "lora_A") and hasattr(head, "get_base_layer")):  # peft lora.Linear
        raise _NotFusable(
            f"the lm_head is a {_plain_type(head).__name__}, not an nn.Linear or a peft LoRA Linear"
        )
    base = head.get_base_layer()
    if _plain_type(base) is not torch.nn.Linear:
        raise _NotFusable(f"the LoRA lm_head wraps a {type(base).__name__}, not an nn.Linear")
    if head.disable_adapters and head.merged:
        raise _NotFusable("the lm_head adapter is merged but disabled")
    adapters = []
    if not head.disable_adapters and not head.merged:
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            if getattr(head, "lora_variant", {}).get(name) is not None:
                raise _NotFusable(f"the lm_head adapter {name!r} is a LoRA variant (e.g. DoRA)")
            dropout = head.lora_dropout[name]
            if head.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                raise _NotFusable(f"the lm_head adapter {name!r} has lora_dropout={dropout.p}")
            adapters.append((head.lora_A[name], head.lora_B[name], head.scaling[name]))
    return base, adapters


def _is_sharded(weight: torch.Tensor) -> bool:
    """A parameter held sharded: an FSDP2 DTensor outside its unit's forward, an FSDP1 / ZeRO-3 empty shard."""
    return weight.dim() != 2 or weight.numel() == 0 or type(weight.data) is not torch.Tensor


def _lm_head_params(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (V, H), bias (V,) | None)`` of the lm_head, LoRA adapters included (merged in the graph,
    so A and B get their gradients)."""
    base, adapters = _lm_head_parts(head)
    weight, bias = base.weight, base.bias
    if _is_sharded(weight):
        raise _NotFusable("the lm_head weight is sharded (FSDP / ZeRO-3)")
    for lora_a, lora_b, scale in adapters:
        weight = weight + scale * (lora_b.weight @ lora_a.weight).to(weight.dtype)
        if lora_b.bias is not None:
            bias = (0 if bias is None else bias) + scale * lora_b.bias
    return weight, bias


def _fsdp2_unit(model: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Module | None:
    """The FSDP2 unit (a ``fully_shard``-ed module) that manages the lm_head's parameters: the lm_head itself or
    its nearest ``fully_shard``-ed ancestor in ``model``; None without FSDP2 (no process group, or no unit)."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None:
        return None
    for m in head.modules():
        if m is not head and isinstance(m, fsdp_module):
            raise _NotFusable("a part of the lm_head is a separate FSDP unit from the lm_head")
    path = next((name for name, m in model.named_modules() if m is head), None)
    if path is None:
        return None
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        m = model.get_submodule(".".join(parts[:depth]))
        if isinstance(m, fsdp_module):
            return m
    return None


def _call_fn(self: torch.nn.Module, fn, *args):
    """Bound to an FSDP2 unit as ``_FSDP_METHOD`` and registered as one of its forward methods."""
    return fn(*args)


def _fsdp2_state(unit: torch.nn.Module):
    """FSDP2's (private) state of ``unit``, or None where this torch has no such accessor."""
    return getattr(unit, "_get_fsdp_state", lambda: None)()


def _holds_lm_head_only(unit: torch.nn.Module, head: torch.nn.Module) -> bool:
    """Whether the FSDP2 ``unit`` manages the lm_head alone (no other module of the model runs in it); False
    where FSDP2's (private) list of the unit's modules is missing, the safe answer."""
    modules = getattr(_fsdp2_state(unit), "_modules", None)
    inside = {id(m) for m in head.modules()}
    return bool(modules) and all(id(m) in inside for m in modules)


def _in_fsdp2_forward(unit: torch.nn.Module, head: torch.nn.Module, fn, hidden: torch.Tensor):
    """``fn(hidden)`` run as a forward of the FSDP2 ``unit`` (``register_fsdp_forward_method``): its parameters
    are all-gathered (module attributes are then the unsharded tensors), resharded afterwards as the unit's
    ``reshard_after_forward`` says, and all-gathered again for the backward; gradients are reduce-scattered
    into the sharded ones.

    ``hidden`` is handed to the unit's pre-forward (which then reduce-scatters the unit's gradients and
    frees its unsharded parameters as soon as the gradient reaches ``hidden``) only when the unit holds the
    lm_head alone; a unit that also ran earlier in the model's forward (the root, or an embedding grouped
    with a tied lm_head) must reduce once, after the whole backward, as FSDP2 does for it by itself.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    if _FSDP_METHOD not in vars(unit):
        setattr(unit, _FSDP_METHOD, types.MethodType(_call_fn, unit))
        register_fsdp_forward_method(unit, _FSDP_METHOD)
    if _holds_lm_head_only(unit, head):
        return getattr(unit, _FSDP_METHOD)(fn, hidden)
    return getattr(unit, _FSDP_METHOD)(lambda: fn(hidden))


class _NoLogits(torch.nn.Module):
    """Stands in for an lm_head that is its own FSDP2 unit while the model runs with ``logits_to_keep``
    selecting no position: the real lm_head would be all-gathered only to produce no logits (and FSDP2 would
    then count two lm_head forwards, and prefetch it once more in the backward)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.vocab_size)


@contextlib.contextmanager
def _fsdp2_model_forward(hf: torch.nn.Module, head: torch.nn.Module, unit: torch.nn.Module | None):
    """While the model runs its forward for the fused loss, spare the FSDP2 ``unit`` that holds the lm_head the
    all-gathers the loss would otherwise add to a step (the loss runs right after, as the unit's forward).

    * the unit is the lm_head alone: the model calls a stand-in (:class:`_NoLogits`) instead, so the lm_head
      runs (and is all-gathered) once, in the loss;
    * the unit also holds other modules (the root; an embedding grouped with a tied lm_head), all-gathered
      from the start of the model's forward: it is kept unsharded at the end of that forward (FSDP2's
      private ``post_forward_mesh_info`` set to None) and the loss reuses the all-gather; it reshards as
      configured after the loss. No memory is added (it is unsharded until the end of the forward anyway).

    Neither is done before FSDP2's lazy initialisation (in the root's first forward): it must see the real
    lm_head among the root's modules, and it sets the root's own ``post_forward_mesh_info``. Without FSDP2,
    or where its private state differs, nothing is changed (one all-gather more; the loss is still right).
    """
    state = None if unit is None else _fsdp2_state(unit)
    if getattr(state, "_is_root", None) is None:  # no FSDP2, or not yet lazily initialised
        yield
        return
    if _holds_lm_head_only(unit, head):
        path = next((name for name, m in hf.named_modules() if m is head), "")
        parent_path, _, leaf = path.rpartition(".")
        parent = hf.get_submodule(parent_path) if leaf else None
        if parent is not None and getattr(parent, leaf, None) is head:
            setattr(parent, leaf, _NoLogits(_lm_head_parts(head)[0].out_features))
            try:
                yield
            finally:
                setattr(parent, leaf, head)
            return
    groups = getattr(state, "_fsdp_param_groups", None)
    if not isinstance(groups, list) or not all(hasattr(g, "post_forward_mesh_info") for g in groups):
        yield
        return
    saved = [g.post_forward_mesh_info for g in groups]
    for g in groups:
        g.post_forward_mesh_info = None
    try:
        yield
    finally:
        for g, info in zip(groups, saved, strict=True):
            g.post_forward_mesh_info = info


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
    product runs in the dtype the unfused ``F.linear`` would use: the autocast dtype under autocast (the loss
    casts the final hidden states and fp32 master weights to it, and hands an fp32 weight its gradient from the
    fp32 accumulator, never rounded), else the hidden states' dtype; the loss is accumulated in fp32 either way.
    """
    hf = _hf_model(model)
    model_type = getattr(hf.config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        raise _NotFusable(f"model type {model_type!r} is not one of {FUSED_MODEL_TYPES}")
    head = hf.get_output_embeddings()
    unit = _fsdp2_unit(model, head)
    if unit is None:
        weight, bias = _lm_head_params(head)
    else:  # FSDP2: the parameters are DTensor shards until the unit all-gathers them (_in_fsdp2_forward)
        _lm_head_parts(head)
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    none = torch.empty(0, dtype=torch.long, device=targets.device)
    with _fsdp2_model_forward(hf, head, unit):
        out = model(**model_inputs, output_hidden_states=True, logits_to_keep=none)
    hidden = out.hidden_states[-1]  # (B, T, H), after the final norm; fp32 under autocast (fp32 residual)
    del out

    def head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        # Under autocast the loss casts, as F.linear would, and hands fp32 master weights their fp32 gradient
        # unrounded; without it, the product runs in the hidden states' dtype.
        if not torch.is_autocast_enabled(hidden.device.type):
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        return fused_linear_cross_entropy(
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

    def unsharded_head_loss(hidden: torch.Tensor):
        try:
            weight, bias = _lm_head_params(head)  # the unit's all-gathered parameters
        except _NotFusable as why:  # the forward has run: falling back now would run it twice
            raise RuntimeError(
                f"ragkern: FSDP2 did not all-gather the lm_head for the fused loss: {why}"
            ) from None
        return head_loss(hidden, weight, bias)

    if unit is None:
        out = head_loss(hidden, weight, bias)
    else:
        out = _in_fsdp2_forward(unit, head, unsharded_head_loss, hidden)
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
    for Llama-, Mistral-, Phi-3-, Qwen2/3- and Gemma-family models, peft-wrapped or not, also under torch FSDP2
    (``fully_shard``, the lm_head in the root unit or its own): the loss then runs as a registered forward
    method of the unit that holds the lm_head (``register_fsdp_forward_method``), so its weight is all-gathered
    for it and its gradient reduce-scattered (FSDP1 and DeepSpeed ZeRO-3 shards fall back). Anything it cannot
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
