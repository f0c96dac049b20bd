"""RagTrainer: a drop-in ``transformers.Trainer`` for packed retrieval-augmented fine-tuning."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .attention import NAME as RAGKERN_ATTENTION
from .attention import check_packed_row, mark_checked
from .collator import PackingCollator, PaddingCollator
from .data.encode import IGNORE_INDEX
from .data.prepare import EncodedDataset, EncodeStats, encode_records
from .data.raft import RaftEpochDataset
from .gguf import name_by_hub_id
from .kernels.cross_entropy import IMPLS as FUSED_LOSS_IMPLS
from .loss import causal_lm_loss, logits_token_loss
from .packing import PackedBatchSampler, PackedIterableDataset, pack_lengths, stream_dataloader

logger = logging.getLogger(__name__)

# Attention implementations that read the collator's cu_seq_lens_* and so keep packed examples apart.
BOUNDARY_AWARE_ATTENTION = (RAGKERN_ATTENTION, "flash_attention_2", "flash_attention_3")
LOSS_NORMALIZATIONS = ("token", "example", "source")


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
            "one Triton kernel per chunk for the softmax and its gradient), 'fused' (Triton kernels that never "
            "hold logits, 3-5x slower on an H200; CUDA only) or 'auto' (chunked).",
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
            "evaluation. With the fused loss it costs one no-grad lm_head pass over the target tokens only."
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
                "logits per chunk of target rows), 'fused' (no-logits Triton kernels) or 'auto'"
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


def _parse_json_option(name: str, value, what: str, example: str):
    """An option given as a JSON string on the command line, parsed; any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} must be {what}, e.g. '{example}'; could not parse {value!r}: {e}") from None


def _as_rag_args(args: TrainingArguments | None) -> RagTrainingArguments:
    if args is None:
        return RagTrainingArguments(output_dir="ragkern-output")
    if isinstance(args, RagTrainingArguments):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    logger.info(
        "RagTrainer: converting TrainingArguments to RagTrainingArguments with default packing options"
    )
    return RagTrainingArguments(**values)


def _use_boundary_aware_attention(model: torch.nn.Module, wanted: str) -> None:
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


def _source_names(datasets: list) -> tuple[str, ...] | None:
    """Sorted source tags of the encoded datasets (None when none of them is one of ours).

    A :class:`RaftEpochDataset` contributes every tag its later epochs can draw: its records' ``source``
    (``"raft"`` by default, as :meth:`RaftBuilder.build` sets it), split ``/oracle`` and ``/no_oracle`` when the
    builder has ``split_source``.
    """
    streams = [d for d in datasets if isinstance(d, PackedIterableDataset)]
    if streams:  # a stream's tags cannot be read ahead: it declares them (None: no per-source logging)
        declared = {n for d in streams if d.source_names for n in d.source_names}
        return tuple(sorted(declared)) if declared else None
    ours = [d for d in datasets if isinstance(d, EncodedDataset)]
    if not ours:
        return None
    names = {e.get("source", "default") for d in ours for e in d.examples}
    for d in ours:
        if isinstance(d, RaftEpochDataset):
            base = {r.get("source", "raft") for r in d.records}
            split = ("/oracle", "/no_oracle") if d.builder.split_source else ("",)
            names |= {b + tail for b in base for tail in split}
    return tuple(sorted(names))


def _target_mask(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: positions that carry a loss in ``causal_lm_loss``'s ``token_loss`` (column 0 never)."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return mask


def _example_index(batch: dict) -> tuple[torch.Tensor, int]:
    """``(B, T)`` index of the example each token belongs to, and the number of examples.

    A packed row ``(1, T)`` holds the examples that ``cu_seq_lens_q`` delimits; a padded batch one per row.
    """
    labels = batch["labels"]
    cu = batch.get("cu_seq_lens_q")
    if cu is None:
        rows = torch.arange(labels.shape[0], device=labels.device)
        return rows[:, None].expand_as(labels), labels.shape[0]
    n = cu.numel() - 1
    index = torch.repeat_interleave(torch.arange(n, device=labels.device), (cu[1:] - cu[:-1]).long())
    return index.view_as(labels), n


def _example_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index (B, T), target mask (B, T), target count per example (n,))`` of a batch."""
    index, n = _example_index(batch)
    mask = _target_mask(batch["labels"])
    counts = torch.zeros(n, dtype=torch.float64, device=mask.device).index_add_(
        0, index[mask], torch.ones(int(mask.sum()), dtype=torch.float64, device=mask.device)
    )
    return index, mask, counts


def _load_model(name: str, args: RagTrainingArguments, tokenizer):
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


def _wrap_peft(model: torch.nn.Module, peft_config, args: RagTrainingArguments) -> torch.nn.Module:
    """``peft.get_peft_model(model, peft_config)``, with input gradients for gradient checkpointing."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError(
            "peft_config was given, but the model is already a PeftModel: pass the base model, or peft_config=None"
        )
    if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad-carrying input
    return get_peft_model_quietly(model, peft_config)


def _require_examples(dataset, purpose: str, args: RagTrainingArguments):
    """``dataset`` if it holds an example; else a ValueError that says what was dropped and what to change."""
    if len(dataset):
        return dataset
    stats = getattr(dataset, "stats", None)
    if stats is None or not stats.records:
        raise ValueError(f"the {purpose} dataset is empty: give it at least one record or example")
    raise ValueError(
        f"no {purpose} example is left: {stats.records} records, {stats.dropped_too_long} dropped as longer than "
        f"max_length={args.max_length} even after the length policy (first: {stats.dropped_ids[:5]}), "
        f"{stats.skipped_invalid} invalid records skipped ({stats.errors[:2]}); raise max_length, shorten the "
        "records or fix the invalid ones"
    )


def _target_stats(token_loss, hits, labels, source_ids, num_sources: int) -> torch.Tensor:
    """``(3, S)`` float64 per source: target-token loss sum, target count, argmax hits (one column, S = 1,
    when the batch has no ``source_ids``)."""
    mask = _target_mask(labels)
    n = num_sources if source_ids is not None else 1
    ids = source_ids[mask] if source_ids is not None else torch.zeros_like(labels[mask])
    sums = torch.bincount(ids, weights=token_loss[mask].double(), minlength=n)
    counts = torch.bincount(ids, minlength=n).double()
    right = torch.bincount(ids, weights=hits[mask].double(), minlength=n) if hits is not None else counts * 0
    return torch.stack([sums, counts, right])


def _example_stats(token_loss, batch: dict) -> torch.Tensor:
    """``(3, 1)`` float64: the sum of the batch's per-example mean target-token losses, the number of
    examples with a target, 0 (for ``loss_normalization="example"`` over a whole evaluation)."""
    index, mask, counts = _example_targets(batch)
    sums = torch.zeros_like(counts).index_add_(0, index[mask], token_loss[mask].double())
    has = counts > 0
    means = (sums[has] / counts[has]).sum()
    return torch.stack([means, has.sum().double(), means * 0]).view(3, 1)


def _example_spans(batch: dict) -> list[tuple[int, int, int]]:
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


def _per_example(t: torch.Tensor, spans: list[tuple[int, int, int]], pad) -> torch.Tensor:
    """``(B, T, ...)`` -> ``(n, L, ...)``: one row per span, padded with ``pad`` to the longest span."""
    longest = max(e - s for _, s, e in spans)
    out = t.new_full((len(spans), longest, *t.shape[2:]), pad)
    for i, (row, s, e) in enumerate(spans):
        out[i, : e - s] = t[row, s:e]
    return out


class _SamplerEpoch(TrainerCallback):
    """Sets the train sampler's epoch at every epoch start.

    ``Trainer`` does it too, but on a multi-rank resume accelerate's ``skip_first_batches`` wraps the
    ``BatchSamplerShard`` around our sampler in a ``SkipBatchSampler``, and neither forwards ``set_epoch``: the
    sampler would replay epoch 0's order (and, for per-epoch RAFT data, epoch 0's examples). ``state.epoch`` is
    ``epoch + steps done / steps per epoch``, so its integer part is the epoch about to run.
    """

    def __init__(self, trainer: RagTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer._train_sampler
        if sampler is not None:
            sampler.set_epoch(int(state.epoch or 0))


def _shown(logs: dict, max_str_len: int | None = None) -> dict:
    """Logs as printed: floats as numbers of 4 significant digits (transformers prints them as quoted strings,
    ``'loss': '0.3918'``), long strings elided, ``total_flos`` left out."""
    shown = {}
    for k, v in logs.items():
        if isinstance(v, float):
            v = float(f"{v:.4g}")
        elif isinstance(v, str) and max_str_len is not None and len(v) > max_str_len:
            v = f"[String too long to display, length: {len(v)} > {max_str_len}]"
        shown[k] = v
    shown.pop("total_flos", None)
    return shown


class _NumericProgressCallback(ProgressCallback):
    """Trainer's progress bar, with logged numbers printed as numbers (see :func:`_shown`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(str(_shown(logs, self.max_str_len)))


class _NumericPrinterCallback(PrinterCallback):
    """What Trainer prints with ``disable_tqdm=True``, with logged numbers printed as numbers."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs is not None:
            print(_shown(logs))


class RagTrainer(Trainer):
    """A ``transformers.Trainer`` for retrieval-augmented fine-tuning, with the same constructor.

    On top of ``Trainer`` it:
      * encodes raw records (RAFT ``{"question", "passages", "answer"}``, DAP ``{"text"}``, instruction
        ``{"messages"}``) with ``processing_class`` when the datasets are not tokenized yet (length policy: see
        :func:`ragkern.data.encode_records`);
      * packs examples into bins of ``args.max_length`` tokens (:class:`~ragkern.packing.PackedBatchSampler`)
        and collates each micro-batch into one padding-free row (:class:`~ragkern.PackingCollator`);
      * switches every model it trains (``model=``, ``model_init=``, a model name or path) to the "ragkern"
        attention, which keeps packed examples apart; wraps it in peft with ``peft_config=``, as TRL does;
      * normalises the loss over the whole optimizer step (all micro-batches and ranks), by its target tokens
        (``loss_normalization="token"``), its examples (``"example"``: each example's mean token loss, averaged)
        or its sources (``"source"``: see :meth:`compute_loss`); ``label_smoothing_factor`` and
        ``compute_loss_func`` are honoured as in ``Trainer``;
      * re-draws a :class:`~ragkern.data.RaftEpochDataset` every epoch (new distractors, order, oracle draw) and
        packs that epoch's bins, deterministically from the seed and epoch, so a resumed run and every rank see
        the same data;
      * runs peft LoRA layers on the fused kernel (``fused_lora``, :func:`ragkern.lora.apply`; undone by
        :func:`ragkern.lora.remove`);
      * evaluates and predicts on packed rows that keep the dataset order: ``eval_loss`` is the loss of the
        whole evaluation set (independent of the batch size), ``compute_metrics`` and
        ``preprocess_logits_for_metrics`` get logits and labels per example, ``predict`` takes records too;
      * logs ``fill_ratio``, ``tokens_per_second``, ``target_tokens_per_second`` and ``mean_token_accuracy``
        next to the loss, and, when the data mixes sources, ``loss/<source>`` (mean target-token loss) and
        ``accuracy/<source>`` (fraction of target tokens whose argmax prediction is the label) per example
        ``source``; RAFT examples built with ``RaftBuilder(split_source=True)`` report ``raft/oracle`` and
        ``raft/no_oracle`` apart.

    Extra constructor arguments (TRL's ``SFTTrainer`` conventions): ``model`` may be a model name or a local
    path (loaded with ``args.model_init_kwargs``, fp32 by default, and its tokenizer when
    ``processing_class`` is None); ``peft_config`` wraps the model (or every ``model_init`` model) with
    ``peft.get_peft_model``.
    """

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        args = _as_rag_args(args)
        self._peft_config = peft_config
        if isinstance(model, str | os.PathLike):
            model, processing_class = _load_model(str(model), args, processing_class)
        if model is not None:
            model = self._prepare_model(model, args)
        if args.packing:
            if data_collator is None:
                data_collator = PackingCollator(block_attention=args.block_attention)
        elif data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            if pad is None:
                raise ValueError(
                    "packing=False pads batches, and the tokenizer has no pad token: pass processing_class with one "
                    "(e.g. tokenizer.pad_token = tokenizer.eos_token) or a data_collator"
                )
            data_collator = PaddingCollator(pad_token_id=pad)
        if train_dataset is not None:
            train_dataset = self._encode(train_dataset, processing_class, args, purpose="train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: self._encode(v, processing_class, args, purpose=f"eval_dataset[{k!r}]")
                for k, v in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._encode(eval_dataset, processing_class, args, purpose="eval")
        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        self._sources = _source_names([train_dataset, *evals])
        if (
            isinstance(data_collator, PackingCollator)
            and data_collator.source_names is None
            and self._sources
        ):
            data_collator = dataclasses.replace(data_collator, source_names=self._sources)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if args.fsdp and not self.is_fsdp_enabled:
            logger.warning(
                "fsdp=%r was requested but accelerate did not enable FSDP (distributed type %s; accelerate enables "
                "FSDP on accelerators only): training runs unsharded",
                args.fsdp,
                self.accelerator.distributed_type,
            )
        # Our compute_loss divides by num_items_in_batch itself: have Trainer count it, and not rescale.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._window = {"tokens": 0, "targets": 0, "start": time.perf_counter()}
        self._totals = {"tokens": 0, "targets": 0}
        self._train_sampler: PackedBatchSampler | None = None
        self._stats_window: torch.Tensor | None = None  # (3, S) loss sums, target counts, argmax hits
        self._eval_stats: torch.Tensor | None = None  # the same over an evaluation, plus example stats
        self._step_counts: torch.Tensor | None = None  # loss_normalization != "token": this step's divisors
        self._source_weight = self._check_source_weights()
        self.add_callback(_SamplerEpoch(self))
        handler = self.callback_handler
        for i, cb in enumerate(handler.callbacks):
            if type(cb) is ProgressCallback:
                handler.callbacks[i] = _NumericProgressCallback(max_str_len=cb.max_str_len)
            elif type(cb) is PrinterCallback:
                handler.callbacks[i] = _NumericPrinterCallback()
        self._apply_fused_lora()
        self._ready = True

    def _prepare_model(self, model: torch.nn.Module, args: RagTrainingArguments) -> torch.nn.Module:
        """Every model this trainer trains: named by its hub id when converted from a GGUF (so its adapters
        name a base any machine can load, :func:`ragkern.gguf.name_by_hub_id`), wrapped by ``peft_config``
        and on boundary-aware attention."""
        hub_id = name_by_hub_id(model)
        if hub_id is not None:
            self._hub_named = hub_id
        if self._peft_config is not None:
            model = _wrap_peft(model, self._peft_config, args)
        if args.packing:
            _use_boundary_aware_attention(model, args.attn_implementation)
        return model

    def _save(self, output_dir: str | None = None, state_dict=None):
        # peft checks the hub for the config of an adapter's base to see whether the vocabulary was resized;
        # name_by_hub_id named the base only after checking it was not, so offline its "Could not find a config
        # file" warning on every save says nothing.
        with warnings.catch_warnings():
            hub_id = getattr(self, "_hub_named", None)
            if hub_id is not None:
                warnings.filterwarnings(
                    "ignore", message=f"Could not find a config file in {re.escape(hub_id)}"
                )
            super()._save(output_dir, state_dict=state_dict)

    def call_model_init(self, trial=None):
        """``model_init``'s model, prepared as ``model=`` is (peft, attention, fused LoRA): ``Trainer`` calls
        this at construction and again at the start of ``train`` (and per ``hyperparameter_search`` trial)."""
        model = self._prepare_model(super().call_model_init(trial), self.args)
        if getattr(self, "_ready", False):  # from train(); at construction __init__ applies it afterwards
            self._apply_fused_lora(model)
        return model

    def _check_source_weights(self) -> torch.Tensor | None:
        """``(S,)`` float64 weights of ``self._sources`` for ``loss_normalization="source"``."""
        if self.args.loss_normalization != "source":
            return None
        if not self._sources:
            raise ValueError(
                "loss_normalization='source' needs source tags: pass RagTrainer a train_dataset it encodes (records "
                "or tokenized examples with a 'source' field), packed by its PackingCollator"
            )
        weights = self.args.source_weights or {}
        unknown = sorted(set(weights) - set(self._sources))
        if unknown:
            raise ValueError(
                f"source_weights names {unknown}, which are not sources of the data {self._sources}"
            )
        return torch.tensor([float(weights.get(name, 1.0)) for name in self._sources], dtype=torch.float64)

    def _apply_fused_lora(self, model: torch.nn.Module | None = None) -> None:
        """Route the model's peft LoRA Linear layers to the fused kernel when ``args.fused_lora`` asks for it."""
        wanted, model = self.args.fused_lora, model if model is not None else self.model
        if wanted is False or model is None:
            return
        from peft.tuners.lora import LoraLayer

        if not any(isinstance(m, LoraLayer) for m in model.modules()):
            if wanted:
                logger.info(
                    "RagTrainer: fused_lora=True but the model has no peft LoRA layers; nothing to fuse"
                )
            return
        on_cuda = self.args.device.type == "cuda" or any(p.is_cuda for p in model.parameters())
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

    @staticmethod
    def _encode(dataset, tokenizer, args: RagTrainingArguments, purpose: str = "train") -> EncodedDataset:
        """Records or tokenized examples -> an :class:`EncodedDataset` with every length <= max_length.

        ``purpose`` names the dataset in messages; ``"predict"`` refuses to drop an example (predictions must
        map back to the examples given).
        """
        if isinstance(dataset, RaftEpochDataset):
            if dataset.max_length > args.max_length:
                raise ValueError(
                    f"the RaftEpochDataset encodes with max_length={dataset.max_length} > the trainer's "
                    f"max_length={args.max_length}; build it with max_length <= {args.max_length}"
                )
            if args.strict_length and not dataset.strict:
                raise ValueError(
                    "strict_length=True, but the RaftEpochDataset trims and drops long examples of later epochs: "
                    "build it with strict=True"
                )
            return _require_examples(dataset, purpose, args)
        if isinstance(dataset, PackedIterableDataset):
            if dataset.max_length > args.max_length:
                raise ValueError(
                    f"the PackedIterableDataset packs bins of {dataset.max_length} tokens > the trainer's "
                    f"max_length={args.max_length}"
                )
            return dataset
        if isinstance(dataset, EncodedDataset):
            if max(dataset.lengths, default=0) <= args.max_length:
                return _require_examples(dataset, purpose, args)
            examples, stats = dataset.examples, dataclasses.replace(dataset.stats)
        elif isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                "RagTrainer packs a sized dataset (a list, datasets.Dataset or EncodedDataset) or a stream wrapped "
                "in ragkern.packing.PackedIterableDataset (bounded-buffer packing; needs max_steps)"
            )
        elif len(dataset) and "input_ids" not in dataset[0]:
            if tokenizer is None:
                raise ValueError(
                    f"the {purpose} dataset holds raw records: pass the tokenizer as processing_class"
                )
            out = encode_records(dataset, tokenizer, max_length=args.max_length, strict=args.strict_length)
            if purpose == "predict" and out.stats.dropped_too_long:
                raise ValueError(
                    f"predict: {out.stats.dropped_too_long} records do not fit max_length={args.max_length} even "
                    f"after the length policy (first: {out.stats.dropped_ids[:5]}); predictions map to the records "
                    "given, so none may be dropped: raise max_length or shorten them"
                )
            return _require_examples(out, purpose, args)
        else:
            examples = [dict(e) for e in dataset]
            stats = EncodeStats(records=len(examples), examples=len(examples))
        too_long = [i for i, e in enumerate(examples) if len(e["input_ids"]) > args.max_length]
        if too_long and (args.strict_length or purpose == "predict"):
            raise ValueError(
                f"{purpose}: examples {too_long[:5]} are longer than max_length={args.max_length} "
                f"({'strict_length' if args.strict_length else 'predictions map to the examples given'}); "
                "raise max_length or shorten them"
            )
        if too_long:
            logger.warning(
                "%s: dropping %d tokenized examples longer than max_length=%d (first: %s)",
                purpose,
                len(too_long),
                args.max_length,
                too_long[:5],
            )
            drop = set(too_long)
            examples = [e for i, e in enumerate(examples) if i not in drop]
        out = EncodedDataset(examples, stats)
        out.stats.dropped_too_long += len(too_long)
        out.stats.examples -= len(too_long)
        out.stats.dropped_ids += too_long
        return _require_examples(out, purpose, args)

    def _packed_dataloader(
        self,
        dataset: EncodedDataset,
        bins_per_batch: int,
        shuffle: bool,
        collator=None,
        **sampler_kwargs,
    ) -> tuple[DataLoader, PackedBatchSampler]:
        args = self.args
        sampler = PackedBatchSampler(
            dataset.lengths,
            args.max_length,
            bins_per_batch=bins_per_batch,
            shuffle=shuffle,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            num_replicas=args.world_size,
            rank=args.process_index,
            **sampler_kwargs,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator or self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
        )
        # Batches stay on the host until _prepare_inputs, which checks a packed row's boundaries there first.
        loader = self.accelerator.prepare_data_loader(loader, device_placement=False)
        # The sampler already deals bins to ranks; make accelerate's shard wrapper a passthrough.
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return loader, sampler

    def _epoch_sampler_kwargs(self, dataset: RaftEpochDataset) -> dict:
        """Sampler options for data re-drawn every epoch: the same bin count every epoch (``Trainer`` counts
        steps once), the most any epoch of this run needs, and the hook that switches the data per epoch.

        The epochs' lengths are encoded up front (``lengths_for_epoch``): one extra tokenization pass per epoch,
        lengths kept only. Every rank computes the same, from the builder's seed and the epoch.
        """
        args, world = self.args, self.args.world_size

        def bins_needed(lengths) -> int:
            return -(-len(pack_lengths(lengths, args.max_length)) // world) * world

        def updates_per_epoch(num_bins: int) -> int:
            batches = math.ceil(num_bins // world / args.per_device_train_batch_size)
            return max(math.ceil(batches / args.gradient_accumulation_steps), 1)

        first = bins_needed(dataset.lengths_for_epoch(0))
        if args.max_steps > 0:  # more bins per epoch only lowers this count of epochs
            epochs = math.ceil(args.max_steps / updates_per_epoch(first))
        else:
            epochs = math.ceil(args.num_train_epochs)
        start = time.perf_counter()
        needed = [first] + [bins_needed(dataset.lengths_for_epoch(e)) for e in range(1, max(epochs, 1))]
        logger.info(
            "RaftEpochDataset: bins per epoch %s for %d epoch(s) (lengths encoded in %.1fs); every epoch packs %d",
            needed,
            len(needed),
            time.perf_counter() - start,
            max(needed),
        )

        def switch(epoch: int) -> list[int]:
            dataset.build_epoch(epoch)
            return dataset.lengths

        return {"num_bins": max(needed), "epoch_lengths": switch}

    def get_train_dataloader(self) -> DataLoader:
        if not self.args.packing:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("RagTrainer: training requires a train_dataset")
        if isinstance(self.train_dataset, PackedIterableDataset):
            # Not passed through accelerator.prepare: the dataset deals bins to ranks itself, and accelerate's
            # batch dispatching would split packed rows. Trainer requires max_steps for a loader without length.
            loader = stream_dataloader(
                self.train_dataset,
                self.data_collator,
                bins_per_batch=self.args.per_device_train_batch_size,
                rank=self.args.process_index,
                world_size=self.args.world_size,
                num_workers=self.args.dataloader_num_workers,
            )
            self._train_sampler = loader.dataset  # its fill_ratio grows as bins are emitted
            self._window["start"] = time.perf_counter()
            logger.info(
                "packing a stream into bins of %d tokens (buffer %d examples)",
                self.train_dataset.max_length,
                self.train_dataset.buffer_size,
            )
            return loader
        per_epoch = isinstance(self.train_dataset, RaftEpochDataset)
        loader, sampler = self._packed_dataloader(
            self.train_dataset,
            self.args.per_device_train_batch_size,
            shuffle=True,
            **(self._epoch_sampler_kwargs(self.train_dataset) if per_epoch else {}),
        )
        self._train_sampler = sampler
        self._window["start"] = time.perf_counter()
        logger.info(
            "packed %d examples into %d bins of %d tokens (fill ratio %.4f)%s",
            len(self.train_dataset),
            len(sampler.bins),
            self.args.max_length,
            sampler.fill_ratio,
            "; RAFT examples re-drawn and re-packed every epoch" if per_epoch else "",
        )
        return loader

    def _eval_loader(self, dataset, purpose: str) -> DataLoader:
        """Packed rows of consecutive examples (``max_length`` tokens per bin, ``per_device_eval_batch_size``
        bins per row): batches hold the examples in dataset order, so outputs map back to them."""
        if not isinstance(dataset, EncodedDataset):
            dataset = self._encode(dataset, self.processing_class, self.args, purpose=purpose)
        collator = self.data_collator
        if isinstance(collator, PackingCollator) and collator.source_names is not None:
            names = {e.get("source", "default") for e in dataset.examples}
            if not names <= set(collator.source_names):  # sources unseen at construction: no per-source stats
                collator = dataclasses.replace(collator, source_names=None)
        loader, _ = self._packed_dataloader(
            dataset, self.args.per_device_eval_batch_size, shuffle=False, collator=collator, in_order=True
        )
        return loader

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("RagTrainer: evaluation requires an eval_dataset")
        if not self.args.packing:
            if not isinstance(dataset, EncodedDataset):
                dataset = self._encode(dataset, self.processing_class, self.args, purpose="eval")
            return super().get_eval_dataloader(dataset)
        return self._eval_loader(dataset, "eval")

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        """Records (encoded with ``processing_class`` as for training) or tokenized examples, packed in order;
        ``predict`` refuses to drop an example (outputs map back to the examples given)."""
        if not self.args.packing:
            if not isinstance(test_dataset, EncodedDataset):
                test_dataset = self._encode(test_dataset, self.processing_class, self.args, purpose="predict")
            return super().get_test_dataloader(test_dataset)
        return self._eval_loader(test_dataset, "predict")

    def _prepare_inputs(self, inputs):
        """Check a packed row's boundaries on the host, then move it: the attention layers skip the check
        (no device-to-host copy per layer; see :func:`ragkern.attention.check_packed_row`)."""
        cu = inputs.get("cu_seq_lens_q")
        longest = None
        if isinstance(cu, torch.Tensor) and cu.device.type == "cpu":
            total = inputs["input_ids"].shape[-1]
            longest = check_packed_row(cu, inputs.get("cu_seq_lens_k"), total, inputs.get("max_length_q"))
        prepared = super()._prepare_inputs(inputs)
        if longest is not None:
            mark_checked(prepared["cu_seq_lens_q"], prepared.get("cu_seq_lens_k"), longest)
        return prepared

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.loss_normalization != "token":
            self._step_counts = self._normalization_counts(batch_samples, device)
        return batch_samples, num_items_in_batch

    def _normalization_counts(self, batches: list[dict], device) -> torch.Tensor:
        """The divisors of this optimizer step, summed over its micro-batches (and ranks, with
        ``average_tokens_across_devices``): ``(1,)`` examples with a target ("example"), or ``(S,)`` target
        tokens per source ("source")."""
        if self.args.loss_normalization == "example":
            counts = torch.zeros(1, dtype=torch.float64, device=device)
            for batch in batches:
                counts += (_example_targets(batch)[2] > 0).sum().to(device)
        else:
            counts = torch.zeros(len(self._sources), dtype=torch.float64, device=device)
            for batch in batches:
                source_ids = self._require_source_ids(batch)
                ids = source_ids[_target_mask(batch["labels"])]
                counts += torch.bincount(ids, minlength=len(self._sources)).to(device, torch.float64)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts

    @staticmethod
    def _require_source_ids(batch: dict) -> torch.Tensor:
        if batch.get("source_ids") is None:
            raise ValueError(
                "loss_normalization='source' needs the batch's source_ids: use packing=True with RagTrainer's "
                "PackingCollator (or a data_collator that emits source_ids)"
            )
        return batch["source_ids"]

    def _token_weights(self, batch: dict, source_ids, step_counts) -> torch.Tensor:
        """``(B, T)`` float32 weight of each token loss so that their sum is the step's loss.

        "example": ``1 / (n_e * E)`` on the targets of example e, with ``n_e`` its target tokens and ``E`` the
        examples with a target in the step. "source": ``w_s / (n_s * W)`` on the targets of source s, with
        ``n_s`` the step's target tokens of s and ``W`` the sum of the weights of the sources present in the
        step. Without ``step_counts`` the divisors are this batch's own.
        """
        if self.args.loss_normalization == "example":
            index, mask, per_example = _example_targets(batch)
            examples = step_counts if step_counts is not None else (per_example > 0).sum()
            coef = 1.0 / (per_example.clamp_min(1) * examples.to(per_example.device).clamp_min(1))
            return (coef[index] * mask).float()
        mask = _target_mask(batch["labels"])
        if step_counts is None:
            step_counts = torch.bincount(source_ids[mask], minlength=len(self._sources)).double()
        counts = step_counts.to(mask.device)
        weights = self._source_weight.to(mask.device)
        present = (weights * (counts > 0)).sum()
        coef = weights / (counts.clamp_min(1) * present.clamp_min(1e-30))
        return (coef[source_ids] * mask).float()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The packed causal-LM loss, normalised by ``args.loss_normalization`` over the optimizer step.

        "token" (default): sum of the target-token losses / the step's target tokens (``num_items_in_batch``).
        "example": every example's mean target-token loss, averaged over the step's examples that have a
        target. "source": for each source s present in the step, ``L_s`` = its mean target-token loss;
        the loss is ``sum_s w_s L_s / sum_s w_s`` with ``w_s = source_weights[s]`` (default 1: the mean over
        sources of their mean token loss). Counts span gradient accumulation and, with
        ``average_tokens_across_devices``, ranks: an N-rank step equals a 1-rank step accumulating the same
        micro-batches. ``label_smoothing_factor`` smooths every target token's loss as ``Trainer`` does.

        With ``compute_loss_func`` (as in ``Trainer``) the model's outputs (logits of the packed row) and the
        labels (-100 at the first token of every packed example) go to that function instead, with
        ``num_items_in_batch``.
        """
        source_ids = inputs.pop("source_ids", None)
        if self.compute_loss_func is not None:
            return self._custom_loss(model, inputs, source_ids, return_outputs, num_items_in_batch)
        loss, token_loss, hits = causal_lm_loss(
            model,
            inputs,
            num_items_in_batch=num_items_in_batch,
            fused=self.args.fused_loss,
            return_hits=self._wants_hits(),
            label_smoothing=self.args.label_smoothing_factor,
            impl=self.args.fused_loss_impl,
        )
        in_step = num_items_in_batch is not None
        per_token = self.args.loss_normalization == "token"
        if not per_token:
            if self.args.loss_normalization == "source" and source_ids is None:
                self._require_source_ids(inputs)
            # Step counts belong to the training step being accumulated. transformers also passes
            # num_items_in_batch at evaluation, where the last training step's counts would be wrong.
            step_counts = self._step_counts if in_step and model.training else None
            loss = (token_loss * self._token_weights(inputs, source_ids, step_counts)).sum()
        if model.training:
            self._add_train_stats(token_loss, hits, inputs["labels"], source_ids)
        if self.args.average_tokens_across_devices and in_step and (per_token or model.training):
            # The step's divisors count every rank's targets while DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        return (loss, {"token_loss": token_loss, "hits": hits}) if return_outputs else loss

    def _custom_loss(self, model, inputs, source_ids, return_outputs, num_items_in_batch):
        """``Trainer``'s ``compute_loss_func`` path, on the packed row."""
        labels = inputs.pop("labels")
        if "cu_seq_lens_q" in inputs:
            inputs = {**inputs, "use_cache": False}
        outputs = model(**inputs)
        loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        if model.training and self._wants_hits():
            with torch.no_grad():
                token_loss, hits = logits_token_loss(outputs.logits, labels)
            self._add_train_stats(token_loss, hits, labels, source_ids)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _wants_hits(self) -> bool:
        return self.args.token_accuracy or len(self._sources or ()) > 1

    def _add_train_stats(self, token_loss, hits, labels, source_ids) -> None:
        """Accumulate (loss sum, target count, argmax hits) per source between two logs."""
        new = _target_stats(token_loss.detach(), hits, labels, source_ids, len(self._sources or ()) or 1)
        self._stats_window = new if self._stats_window is None else self._stats_window + new

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss (this batch's mean target-token loss) and, unless ``prediction_loss_only``, the logits and
        labels per example: ``(n, L, V)`` and ``(n, L)`` for the ``n`` examples of the batch, in order, each
        padded with -100 to the batch's longest (``Trainer`` pads across batches the same way). The
        evaluation's loss and token accuracy are accumulated over the whole set (see :meth:`evaluation_loop`).
        """
        loop_inputs = inputs
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        source_ids = inputs.pop("source_ids", None)
        if not prediction_loss_only and self.args.world_size > 1:
            raise NotImplementedError(
                "RagTrainer returns predictions per example on one process only (the ranks' packed rows hold "
                "different numbers of examples); evaluate metrics from predictions on one process, or set "
                "prediction_loss_only=True / drop compute_metrics for multi-process evaluation"
            )
        user_loss = logits = token_loss = hits = None
        with torch.no_grad(), self.compute_loss_context_manager():
            if labels is not None and prediction_loss_only and self.compute_loss_func is None:
                _, token_loss, hits = causal_lm_loss(
                    model,
                    inputs,
                    fused=self.args.fused_loss,
                    return_hits=True,
                    label_smoothing=self.args.label_smoothing_factor,
                    impl=self.args.fused_loss_impl,
                )
            else:
                model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
                if "cu_seq_lens_q" in model_inputs:
                    model_inputs["use_cache"] = False
                outputs = model(**model_inputs)
                logits = outputs.logits
                if labels is not None:
                    token_loss, hits = logits_token_loss(
                        logits, labels, label_smoothing=self.args.label_smoothing_factor
                    )
                    if self.compute_loss_func is not None:
                        user_loss = self.compute_loss_func(outputs, labels, num_items_in_batch=None).detach()
        loss = None
        if labels is not None:
            stats = _target_stats(token_loss, hits, labels, source_ids, len(self._sources or ()) or 1)
            stats = torch.cat([stats, _example_stats(token_loss, inputs)], dim=1)
            self._eval_stats = stats if self._eval_stats is None else self._eval_stats + stats
            loss = user_loss if user_loss is not None else token_loss.sum() / stats[1, :-1].sum().clamp_min(1)
        if prediction_loss_only:
            return loss, None, None
        spans = _example_spans(inputs)
        if "inputs" in self.args.include_for_metrics:
            # evaluation_loop reads the inputs after this step from its own dict: give it one row per example
            loop_inputs[getattr(self.model, "main_input_name", "input_ids")] = _per_example(
                inputs["input_ids"], spans, -100
            )
        return (
            loss,
            _per_example(logits, spans, -100),
            None if labels is None else _per_example(labels, spans, -100),
        )

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """``Trainer``'s loop, with the loss of the whole evaluation set instead of a mean of batch means.

        ``{prefix}_loss`` follows ``loss_normalization`` over the set: the mean over every target token
        ("token"), the mean over examples of their mean token loss ("example"), or the weighted mean over
        sources of their mean token loss ("source"), so it does not depend on the batch size or the packing.
        Also ``{prefix}_mean_token_accuracy`` and, when the data mixes sources, ``{prefix}_loss/<source>``
        and ``{prefix}_accuracy/<source>``. With ``compute_loss_func`` the loss is ``Trainer``'s.
        """
        self._eval_stats = None
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        stats, self._eval_stats = self._eval_stats, None
        if stats is not None:
            if self.args.world_size > 1:
                stats = self.accelerator.reduce(stats.to(self.args.device), reduction="sum")
            output.metrics.update(self._eval_metrics(stats.cpu(), metric_key_prefix))
        return output

    def _eval_metrics(self, stats: torch.Tensor, prefix: str) -> dict[str, float]:
        """Metrics from the evaluation's ``(3, S + 1)`` stats: per source loss sum, targets, hits; the last
        column holds (sum of example mean losses, examples with a target, 0)."""
        (sums, counts, right), (example_means, examples, _) = stats[:, :-1], stats[:, -1]
        total = float(counts.sum())
        metrics = {}
        if self.compute_loss_func is None and total:
            norm = self.args.loss_normalization
            if norm == "example":
                value = float(example_means / examples.clamp_min(1))
            elif (
                norm == "source" and self._source_weight is not None and len(sums) == len(self._source_weight)
            ):
                w = self._source_weight * (counts > 0)
                value = float((w * sums / counts.clamp_min(1)).sum() / w.sum().clamp_min(1e-30))
            else:
                value = float(sums.sum()) / total
            metrics[f"{prefix}_loss"] = value
        if self.args.token_accuracy and total:
            metrics[f"{prefix}_mean_token_accuracy"] = float(right.sum()) / total
        if self._sources and len(self._sources) > 1 and len(sums) == len(self._sources):
            for name, s, n, r in zip(self._sources, sums.tolist(), counts.tolist(), right.tolist()):
                if n:
                    metrics[f"{prefix}_loss/{name}"] = round(s / n, 4)
                    metrics[f"{prefix}_accuracy/{name}"] = round(r / n, 4)
        return metrics

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")  # real tokens only: padding is not work done
        self._window["tokens"] += int(inputs["input_ids"].numel() if mask is None else mask.sum())
        self._window["targets"] += int((inputs["labels"][:, 1:] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "train_runtime" in logs:  # training logs, on every rank alike
            now = time.perf_counter()
            window = torch.tensor([self._window["tokens"], self._window["targets"]], dtype=torch.float64)
            if self.args.world_size > 1:
                window = self.accelerator.reduce(window.to(self.args.device), reduction="sum").cpu()
            self._totals["tokens"] += int(window[0])
            self._totals["targets"] += int(window[1])
            elapsed = max(now - self._window["start"], 1e-9)
            if "train_runtime" in logs:
                runtime = max(logs["train_runtime"], 1e-9)
                logs["train_tokens"] = self._totals["tokens"]
                logs["train_tokens_per_second"] = round(self._totals["tokens"] / runtime, 2)
                logs["train_target_tokens_per_second"] = round(self._totals["targets"] / runtime, 2)
            elif window[0] > 0:
                logs["tokens_per_second"] = round(float(window[0]) / elapsed, 2)
                logs["target_tokens_per_second"] = round(float(window[1]) / elapsed, 2)
            if self._train_sampler is not None:
                logs["fill_ratio"] = round(self._train_sampler.fill_ratio, 4)
            if "loss" in logs and self._wants_hits():
                logs.update(self._train_stats_logs())
            self._window = {"tokens": 0, "targets": 0, "start": now}
        super().log(logs, start_time)

    def _train_stats_logs(self) -> dict[str, float]:
        """mean_token_accuracy and per-source loss/accuracy since the last log (summed over ranks)."""
        n = len(self._sources or ()) or 1
        window = self._stats_window
        if window is None:
            window = torch.zeros(3, n, dtype=torch.float64)
        window = window.to(self.args.device)  # (3, S): loss sums, targets, hits
        if self.args.world_size > 1:
            window = self.accelerator.reduce(window, reduction="sum")
        self._stats_window = None
        sums, counts, right = window.cpu().tolist()
        logs = {}
        if self.args.token_accuracy and sum(counts):
            logs["mean_token_accuracy"] = round(sum(right) / sum(counts), 4)
        if self._sources and len(self._sources) > 1:
            for name, s, c, r in zip(self._sources, sums, counts, right):
                if c:
                    logs[f"loss/{name}"] = round(s / c, 4)
                    logs[f"accuracy/{name}"] = round(r / c, 4)
        return logs
