"""peft LoRA ``Linear`` layers on the fused kernel (:func:`ragkern.kernels.lora_linear`), per instance.

:func:`apply` sets an instance ``forward`` on every peft ``lora.Linear`` it can serve; peft's classes are never
touched, so parameters, ``state_dict``, ``save_pretrained``, loading, ``merge_and_unload`` and adapter
switching are peft's own. :func:`remove` deletes the instance attribute again.

The fused forward re-checks the layer's state on every call and hands the call to peft's forward when it
cannot serve it (adapter switched, merged, disabled, DoRA added, mixed-batch ``adapter_names``...), logging
each reason once. Under autocast every operand is cast to the autocast dtype, as ``F.linear`` would.
"""

from __future__ import annotations

import logging
import types
from collections import Counter

import torch
from peft.tuners.lora.layer import Linear as PeftLinear
from peft.tuners.lora.layer import LoraLayer

from ragkern.kernels import lora_linear

logger = logging.getLogger(__name__)

FUSED = "fused"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MARK = "_ragkern_fused_lora"  # instance attribute set by apply()
_logged: set[str] = set()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.info("ragkern.lora: a LoRA layer keeps peft's forward: %s", reason)


def _layer_reason(m: LoraLayer) -> str | None:
    """Why the fused path cannot serve ``m`` in its current state (None: it can)."""
    if type(m) is not PeftLinear:
        return f"layer type {type(m).__module__}.{type(m).__name__} (only peft lora.Linear is fused)"
    if type(m.base_layer) is not torch.nn.Linear:
        return f"base layer {type(m.base_layer).__name__} (quantized or wrapped; only nn.Linear is fused)"
    if m.fan_in_fan_out:
        return "fan_in_fan_out (Conv1D-style transposed weight)"
    if m.disable_adapters:
        return "adapters disabled"
    if m.merged:
        return "adapter merged into the base weight"
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters on the layer (fused path serves exactly one)"
    a = active[0]
    if m.use_dora.get(a, False):
        return "DoRA"
    if a in m.lora_variant:
        return f"LoRA variant {type(m.lora_variant[a]).__name__}"
    if m.lora_B[a].bias is not None:
        return "lora_bias (bias on lora_B)"
    if not isinstance(m.lora_dropout[a], torch.nn.Dropout | torch.nn.Identity):
        return f"lora_dropout module {type(m.lora_dropout[a]).__name__}"
    for t in (m.base_layer.weight, m.lora_A[a].weight, m.lora_B[a].weight):
        if t.dtype not in _DTYPES:
            return f"unsupported dtype {t.dtype} (fused path takes float16, bfloat16, float32)"
    return None


def _call_reason(m: PeftLinear, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """Why this particular call cannot be fused (None: it can)."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (e.g. adapter_names for mixed batches)"
    a = m.active_adapters[0]
    tensors = [m.base_layer.weight, m.lora_A[a].weight, m.lora_B[a].weight]
    if m.base_layer.bias is not None:
        tensors.append(m.base_layer.bias)
    if any(t.device != x.device for t in tensors):
        return "input and weights on different devices"
    if torch.is_autocast_enabled(x.device.type):
        return None  # every operand is cast to the autocast dtype
    if x.dtype not in _DTYPES:
        return f"unsupported input dtype {x.dtype}"
    if any(t.dtype != x.dtype for t in tensors):
        dts = sorted({str(t.dtype) for t in [x, *tensors]})
        return f"mixed dtypes {', '.join(dts)} outside autocast"
    return None


def _fused_forward(self: PeftLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    reason = _layer_reason(self) or _call_reason(self, x, args, kwargs)
    if reason is not None:
        _log_once(reason)
        return type(self).forward(self, x, *args, **kwargs)
    a = self.active_adapters[0]
    w, bias = self.base_layer.weight, self.base_layer.bias
    lora_a, lora_b = self.lora_A[a].weight, self.lora_B[a].weight
    drop = self.lora_dropout[a]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, w, lora_a, lora_b = x.to(dt), w.to(dt), lora_a.to(dt), lora_b.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return lora_linear(x, w, lora_a, lora_b, self.scaling[a], bias=bias, dropout_p=p)
    return lora_linear(x, w, lora_a, lora_b, self.scaling[a], bias=bias, dropout_p=p)


def apply(model: torch.nn.Module) -> dict[str, int]:
    """Route every peft LoRA layer of ``model`` that the fused kernel can serve to it; returns {reason: count}.

    ``"fused"`` counts the layers switched; every other key is a reason a layer keeps peft's forward. Layers
    whose ``forward`` is already overridden on the instance (e.g. accelerate hooks) are left alone.
    Idempotent; undo with :func:`remove`.
    """
    summary: Counter[str] = Counter()
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        if getattr(m, _MARK, False):
            summary[FUSED] += 1
            continue
        reason = _layer_reason(m)
        if reason is None and "forward" in m.__dict__:
            reason = "forward already overridden on the instance (e.g. accelerate hooks)"
        if reason is not None:
            if summary[reason] == 0:
                logger.info("ragkern.lora: %s keeps peft's forward: %s", name, reason)
            summary[reason] += 1
            continue
        m.forward = types.MethodType(_fused_forward, m)
        setattr(m, _MARK, True)
        summary[FUSED] += 1
    for reason, n in summary.items():
        if reason == FUSED:
            logger.info("ragkern.lora: fused LoRA kernel on %d layer(s)", n)
        else:
            logger.info("ragkern.lora: peft's forward kept on %d layer(s): %s", n, reason)
    return dict(summary)


def remove(model: torch.nn.Module) -> int:
    """Undo :func:`apply`: every layer gets peft's forward back. Returns how many were restored."""
    n = 0
    for m in model.modules():
        if m.__dict__.pop(_MARK, False):
            m.__dict__.pop("forward", None)
            n += 1
    return n
