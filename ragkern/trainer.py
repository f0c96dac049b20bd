"""RagTrainer: a drop-in ``transformers.Trainer`` for packed retrieval-augmented fine-tuning."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from .attention import NAME as RAGKERN_ATTENTION
from .collator import PackingCollator, PaddingCollator
from .data.prepare import EncodedDataset, encode_records
from .loss import causal_lm_loss
from .packing import PackedBatchSampler

logger = logging.getLogger(__name__)

# Attention implementations that read the collator's cu_seq_lens_* and so keep packed examples apart.
BOUNDARY_AWARE_ATTENTION = (RAGKERN_ATTENTION, "flash_attention_2", "flash_attention_3")


@dataclass
class RagTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus packing and data options. ``per_device_train_batch_size`` counts packed bins
    (rows of up to ``max_length`` tokens) per micro-batch."""

    max_length: int = field(
        default=2048, metadata={"help": "Tokens per packed bin; longer examples are dropped."}
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
        metadata={"help": "Use the fused linear + cross-entropy loss (never materialises logits)."},
    )
    fused_lora: bool | None = field(
        default=None,
        metadata={
            "help": "Run peft LoRA Linear layers on ragkern.kernels.lora_linear. None: when the model is on CUDA "
            "(Triton); True: also on CPU (fused torch path); False: never."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs labels and block_ids."}
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation returns the loss only (packed logits are large)."}
    )


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
    """Sorted source tags of the encoded datasets (None when none of them is one of ours)."""
    ours = [d for d in datasets if isinstance(d, EncodedDataset)]
    if not ours:
        return None
    return tuple(sorted({e.get("source", "default") for d in ours for e in d.examples}))


class RagTrainer(Trainer):
    """A ``transformers.Trainer`` for retrieval-augmented fine-tuning, with the same constructor.

    On top of ``Trainer`` it:
      * encodes raw records (RAFT ``{"question", "passages", "answer"}``, DAP ``{"text"}``) with
        ``processing_class`` when the datasets are not tokenized yet (length policy: see
        :func:`ragkern.data.encode_records`);
      * packs examples into bins of ``args.max_length`` tokens (:class:`~ragkern.packing.PackedBatchSampler`)
        and collates each micro-batch into one padding-free row (:class:`~ragkern.PackingCollator`);
      * switches the model to the "ragkern" attention, which keeps packed examples apart;
      * runs peft LoRA layers on the fused kernel (``fused_lora``, :func:`ragkern.lora.apply`);
      * normalises the loss by the target tokens of the whole optimizer step (all micro-batches and ranks);
      * logs ``fill_ratio``, ``tokens_per_second`` and ``target_tokens_per_second`` next to the loss, and
        ``loss/<source>`` (mean target-token loss per example ``source``) when the data mixes sources.
    """

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        args = _as_rag_args(args)
        if args.packing:
            if model is not None:
                _use_boundary_aware_attention(model, args.attn_implementation)
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
            train_dataset = self._encode(train_dataset, processing_class, args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._encode(v, processing_class, args) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._encode(eval_dataset, processing_class, args)
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
        self._fill_ratio: float | None = None
        self._source_window: tuple[torch.Tensor, torch.Tensor] | None = None
        self._apply_fused_lora()

    def _apply_fused_lora(self) -> None:
        """Route the model's peft LoRA Linear layers to the fused kernel when ``args.fused_lora`` asks for it."""
        wanted, model = self.args.fused_lora, self.model
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
    def _encode(dataset, tokenizer, args: RagTrainingArguments) -> EncodedDataset:
        """Records or tokenized examples -> an :class:`EncodedDataset` with every length <= max_length."""
        if isinstance(dataset, EncodedDataset):
            if max(dataset.lengths, default=0) <= args.max_length:
                return dataset
            examples, stats = dataset.examples, dataset.stats
        elif isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                "RagTrainer packs a sized dataset (a list, datasets.Dataset or EncodedDataset); "
                "materialise the iterable first (e.g. datasets.Dataset.from_generator)"
            )
        elif len(dataset) and "input_ids" not in dataset[0]:
            if tokenizer is None:
                raise ValueError("the dataset holds raw records: pass the tokenizer as processing_class")
            return encode_records(dataset, tokenizer, max_length=args.max_length, strict=args.strict_length)
        else:
            examples, stats = [dict(e) for e in dataset], None
        too_long = [i for i, e in enumerate(examples) if len(e["input_ids"]) > args.max_length]
        if too_long and args.strict_length:
            raise ValueError(
                f"examples {too_long[:5]} are longer than max_length={args.max_length} (strict_length)"
            )
        if too_long:
            logger.warning(
                "dropping %d tokenized examples longer than max_length=%d (first: %s)",
                len(too_long),
                args.max_length,
                too_long[:5],
            )
            drop = set(too_long)
            examples = [e for i, e in enumerate(examples) if i not in drop]
        out = EncodedDataset(examples, stats)
        out.stats.dropped_too_long += len(too_long)
        return out

    def _packed_dataloader(
        self, dataset: EncodedDataset, bins_per_batch: int, shuffle: bool
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
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
        )
        loader = self.accelerator.prepare(loader)
        # The sampler already deals bins to ranks; make accelerate's shard wrapper a passthrough.
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return loader, sampler

    def get_train_dataloader(self) -> DataLoader:
        if not self.args.packing:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("RagTrainer: training requires a train_dataset")
        loader, sampler = self._packed_dataloader(
            self.train_dataset, self.args.per_device_train_batch_size, shuffle=True
        )
        self._fill_ratio = sampler.fill_ratio
        self._window["start"] = time.perf_counter()
        logger.info(
            "packed %d examples into %d bins of %d tokens (fill ratio %.4f)",
            len(self.train_dataset),
            len(sampler.bins),
            self.args.max_length,
            sampler.fill_ratio,
        )
        return loader

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if not self.args.packing:
            return super().get_eval_dataloader(eval_dataset)
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("RagTrainer: evaluation requires an eval_dataset")
        if not isinstance(dataset, EncodedDataset):
            dataset = self._encode(dataset, self.processing_class, self.args)
        return self._packed_dataloader(dataset, self.args.per_device_eval_batch_size, shuffle=False)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        source_ids = inputs.pop("source_ids", None)
        loss, token_loss = causal_lm_loss(
            model, inputs, num_items_in_batch=num_items_in_batch, fused=self.args.fused_loss
        )
        if source_ids is not None and model.training:
            self._add_source_losses(token_loss.detach(), inputs["labels"], source_ids)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's targets while DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        return (loss, {"token_loss": token_loss}) if return_outputs else loss

    def _add_source_losses(self, token_loss, labels, source_ids) -> None:
        """Accumulate (loss sum, target count) per source between two logs."""
        targets = labels != -100
        ids, n = source_ids[targets], len(self._sources)
        sums = torch.bincount(ids, weights=token_loss[targets].double(), minlength=n)
        counts = torch.bincount(ids, minlength=n).double()
        acc = self._source_window
        self._source_window = (sums, counts) if acc is None else (acc[0] + sums, acc[1] + counts)

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
            if self._fill_ratio is not None:
                logs["fill_ratio"] = round(self._fill_ratio, 4)
            if self._sources and len(self._sources) > 1:
                sums, counts = self._source_window or (torch.zeros(len(self._sources)),) * 2
                sums, counts = sums.to(self.args.device), counts.to(self.args.device)
                if self.args.world_size > 1:
                    sums = self.accelerator.reduce(sums, reduction="sum")
                    counts = self.accelerator.reduce(counts, reduction="sum")
                for name, total, count in zip(self._sources, sums.tolist(), counts.tolist()):
                    if count:
                        logs[f"loss/{name}"] = round(total / count, 4)
                self._source_window = None
            self._window = {"tokens": 0, "targets": 0, "start": now}
        super().log(logs, start_time)
