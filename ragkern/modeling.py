"""The models RagTrainer trains: loaded by name, wrapped in peft, on an attention that keeps packed examples
apart, with peft LoRA layers on the fused kernel."""

from __future__ import annotations

import inspect
import logging
import warnings

import torch

from .attention import NAME as RAGKERN_ATTENTION
from .training_args import RagTrainingArguments

logger = logging.getLogger(__name__)

# Attention implementations that read the collator's cu_seq_lens_* and so keep packed examples apart.
BOUNDARY_AWARE_ATTENTION = (RAGKERN_ATTENTION, "flash_attention_2", "flash_attention_3")


def forward_names(model: torch.nn.Module) -> tuple[str, bool]:
    """The forward's name for the KV cache (``cache`` in newer transformers 5.x, ``past_key_values`` before), and
    whether it takes ``logits_to_keep``; a peft model answers for its base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def use_boundary_aware_attention(model: torch.nn.Module, wanted: str) -> None:
    """Make ``model`` use an attention that honours packing boundaries, or refuse with a fix."""
    if wanted not in BOUNDARY_AWARE_ATTENTION:
        raise ValueError(
            f"attn_implementation={wanted!r} cannot keep packed examples apart (sdpa and eager let them attend to "
            f"each other); use one of {BOUNDARY_AWARE_ATTENTION}, or set packing=False"
        )
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == wanted:
        return
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"{type(model).__name__} has no set_attn_implementation; load it with attn_implementation={wanted!r}"
        )
    model.set_attn_implementation(wanted)
    if model.config._attn_implementation != wanted:
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so "
            f"packed rows cannot be kept apart; set packing=False for this model"
        )
    logger.info("RagTrainer: attention implementation %s -> %s", current, wanted)


def load_model(name: str, args: RagTrainingArguments, tokenizer):
    """A model name or local path -> ``(model, tokenizer)``, as TRL's ``SFTTrainer`` accepts one.

    ``args.model_init_kwargs`` go to ``AutoModelForCausalLM.from_pretrained``; dtype defaults to float32 (fp32
    master weights; ``bf16=True`` adds autocast) and the attention to ``args.attn_implementation``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(args.model_init_kwargs or {})
    kwargs.setdefault("dtype", torch.float32)
    if args.packing:
        kwargs.setdefault("attn_implementation", args.attn_implementation)
    logger.info("RagTrainer: loading %s with %s", name, kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name)
    return model, tokenizer


def get_peft_model_quietly(model: torch.nn.Module, peft_config) -> torch.nn.Module:
    """``peft.get_peft_model`` without the FutureWarning transformers >= 5.2x raises when peft reads the
    deprecated ``is_gradient_checkpointing`` (peft's code, nothing a user can act on)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


def wrap_peft(model: torch.nn.Module, peft_config, args: RagTrainingArguments) -> torch.nn.Module:
    """``peft.get_peft_model(model, peft_config)``, with input gradients for gradient checkpointing."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError(
            "peft_config was given, but the model is already a PeftModel: pass the base model, or peft_config=None"
        )
    if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad-carrying input
    return get_peft_model_quietly(model, peft_config)


def apply_fused_lora(model: torch.nn.Module | None, wanted: bool | None, device: torch.device) -> None:
    """Route the model's peft LoRA Linear layers to the fused kernel as ``fused_lora`` (``wanted``) asks: None
    when the model (or ``device``, where training runs) is on CUDA, True also on CPU, False never."""
    if wanted is False or model is None:
        return
    from peft.tuners.lora import LoraLayer

    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        if wanted:
            logger.info("RagTrainer: fused_lora=True but the model has no peft LoRA layers; nothing to fuse")
        return
    on_cuda = device.type == "cuda" or any(p.is_cuda for p in model.parameters())
    if wanted is None and not on_cuda:
        return
    from . import lora

    summary = lora.apply(model)
    fused = summary.get(lora.FUSED, 0)
    kept = ", ".join(f"{n} ({why})" for why, n in summary.items() if why != lora.FUSED)
    logger.info(
        "RagTrainer: fused LoRA (ragkern.kernels.lora_linear, %s) serves %d of %d LoRA layers%s",
        "Triton" if on_cuda else "torch path",
        fused,
        sum(summary.values()),
        f"; peft's forward kept on {kept}" if kept else "",
    )
