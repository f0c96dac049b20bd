"""RagTrainingArguments: ``transformers.TrainingArguments`` plus packing, loss and data options."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .attention import NAME as RAGKERN_ATTENTION
from .kernels.cross_entropy import IMPLS as FUSED_LOSS_IMPLS
from .normalization import LOSS_NORMALIZATIONS

logger = logging.getLogger(__name__)


@dataclass
class RagTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus packing and data options. ``per_device_train_batch_size`` counts packed bins
    (rows of up to ``max_length`` tokens) per micro-batch."""

    max_length: int = field(
        default=2048,
        metadata={
            "help": "Tokens per packed bin. A longer RAFT example is trimmed by the length policy (distractors "
            "dropped, then passages truncated), a longer DAP document split into chunks, any other longer "
            "example dropped; all counted and logged (strict_length raises instead)."
        },
    )
    packing: bool = field(
        default=True, metadata={"help": "Pack examples into bins of max_length tokens with boundary masking."}
    )
    strict_length: bool = field(
        default=False,
        metadata={"help": "Raise on an example longer than max_length instead of dropping and counting it."},
    )
    block_attention: bool = field(
        default=False,
        metadata={"help": "Each retrieved passage attends only to itself (passage block mask)."},
    )
    attn_implementation: str = field(
        default=RAGKERN_ATTENTION,
        metadata={"help": "Attention used for packed rows: 'ragkern' or a flash_attention_* implementation."},
    )
    fused_loss: bool = field(
        default=True,
        metadata={
            "help": "Use the fused linear + cross-entropy loss (never materialises the logits of all tokens)."
        },
    )
    fused_loss_impl: str = field(
        default="auto",
        metadata={
            "help": "Design of the fused loss: 'chunked' (logits of <= 256 MiB of target rows at a time on cuBLAS, "
            "one Triton kernel per chunk for the softmax and its gradient), 'triton' (Triton kernels that never "
            "hold logits; CUDA only; 'fused' is its deprecated name) or 'auto' (chunked).",
            "choices": list(FUSED_LOSS_IMPLS),
        },
    )
    fused_lora: bool | None = field(
        default=None,
        metadata={
            "help": "Run peft LoRA Linear layers on ragkern.kernels.lora_linear. None: when the model is on CUDA "
            "(Triton); True: also on CPU (fused torch path); False: never. The model's layers stay switched after "
            "training (same outputs, saved files are peft's own); ragkern.lora.remove(model) switches them back."
        },
    )
    loss_normalization: str = field(
        default="token",
        metadata={
            "help": "Loss of an optimizer step: 'token' (mean over its target tokens), 'example' (mean over its "
            "examples of each example's mean token loss) or 'source' (per-source mean token loss, weighted by "
            "source_weights). Steps span gradient accumulation and ranks.",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    source_weights: dict | str | None = field(
        default=None,
        metadata={
            "help": "loss_normalization='source': weight per source tag, e.g. '{\"raft\": 2, \"instruct\": 1}' "
            "(JSON on the command line); unnamed sources weigh 1."
        },
    )
    token_accuracy: bool = field(
        default=True,
        metadata={
            "help": "Log mean_token_accuracy (argmax prediction == label over the target tokens) in training and "
            "evaluation. The fused loss takes the argmax inside its kernel: no extra lm_head pass."
        },
    )
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "When RagTrainer is given a model name or path: keyword arguments of "
            'AutoModelForCausalLM.from_pretrained (JSON on the command line), e.g. \'{"dtype": "bfloat16"}\'. '
            "dtype defaults to float32 (fp32 master weights; use bf16=True for mixed precision)."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs labels and block_ids."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters. False here (Trainer's None means True without gradient "
            "checkpointing): a causal LM uses every trainable parameter in each step, and the search costs an "
            "extra autograd traversal per step and a warning per rank. Set True for a model with parameters "
            "that a step may skip."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"loss_normalization={self.loss_normalization!r} is not one of {LOSS_NORMALIZATIONS}: 'token' "
                "averages target tokens, 'example' averages examples, 'source' weights sources by source_weights"
            )
        if self.fused_loss_impl not in FUSED_LOSS_IMPLS:
            raise ValueError(
                f"fused_loss_impl={self.fused_loss_impl!r} is not one of {FUSED_LOSS_IMPLS}: 'chunked' (cuBLAS "
                "logits per chunk of target rows), 'triton' (no-logits Triton kernels; 'fused' is its old name) or 'auto'"
            )
        self.model_init_kwargs = _parse_json_option(
            "model_init_kwargs", self.model_init_kwargs, "a JSON object", '{"dtype": "bfloat16"}'
        )
        if self.model_init_kwargs is not None and not isinstance(self.model_init_kwargs, dict):
            raise ValueError(f"model_init_kwargs must be a dict; got {self.model_init_kwargs!r}")
        self.source_weights = _parse_json_option(
            "source_weights", self.source_weights, "a JSON object of source tag -> weight", '{"raft": 2}'
        )
        if self.source_weights is not None:
            if not isinstance(self.source_weights, dict):
                raise ValueError(
                    f"source_weights must map source tags to weights; got {self.source_weights!r}"
                )
            bad = {
                k: v
                for k, v in self.source_weights.items()
                if isinstance(v, bool) or not (isinstance(v, int | float) and math.isfinite(v) and v >= 0)
            }
            if bad or not any(v > 0 for v in self.source_weights.values()):
                raise ValueError(
                    f"source_weights must be finite numbers >= 0 with at least one > 0; got {self.source_weights}"
                )
            if self.loss_normalization != "source":
                logger.warning(
                    "source_weights is set but loss_normalization=%r: the weights are used only with 'source'",
                    self.loss_normalization,
                )
        if self.packing:
            check_sampling_strategy(self)


def _parse_json_option(name: str, value, what: str, example: str):
    """An option given as a JSON string on the command line, parsed; any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} must be {what}, e.g. '{example}'; could not parse {value!r}: {e}") from None


def as_rag_args(args: TrainingArguments | None) -> RagTrainingArguments:
    """``args`` as RagTrainingArguments: defaults for None, a plain ``TrainingArguments`` copied field by field
    with the default packing options."""
    if args is None:
        return RagTrainingArguments(output_dir="ragkern-output")
    if isinstance(args, RagTrainingArguments):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    logger.info(
        "RagTrainer: converting TrainingArguments to RagTrainingArguments with default packing options"
    )
    return RagTrainingArguments(**values)


def sampling_strategy(args: TrainingArguments) -> str:
    """``train_sampling_strategy`` (transformers >= 5.2x; ``group_by_length=True`` before it)."""
    if getattr(args, "group_by_length", False):
        return "group_by_length"
    return getattr(args, "train_sampling_strategy", "random")


def check_sampling_strategy(args: TrainingArguments) -> None:
    """Packing draws its own order: bins shuffled per epoch ("random"), or consecutive examples in dataset order
    ("sequential"); a strategy that groups examples by length is what packing does already."""
    strategy = sampling_strategy(args)
    if strategy in ("random", "sequential"):
        return
    if strategy in ("group_by_length", "batch_rebalance"):
        logger.warning(
            "train_sampling_strategy=%r: packing already groups examples by length (best-fit bins of max_length "
            "tokens, no padding); the bins are shuffled as with 'random'",
            strategy,
        )
        return
    raise ValueError(
        f"train_sampling_strategy={strategy!r} is not supported with packing: use 'random' (shuffled bins) or "
        "'sequential' (examples in dataset order), or packing=False"
    )
