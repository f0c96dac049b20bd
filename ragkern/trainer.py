"""RagTrainer: a drop-in ``transformers.Trainer`` for packed retrieval-augmented fine-tuning."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments

from .attention import NAME as RAGKERN_ATTENTION
from .collator import PackingCollator, PaddingCollator
from .data.encode import IGNORE_INDEX
from .data.prepare import EncodedDataset, encode_records
from .data.raft import RaftEpochDataset
from .loss import causal_lm_loss
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
        metadata={"help": "Use the fused linear + cross-entropy loss (never materialises logits)."},
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
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs labels and block_ids."}
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation returns the loss only (packed logits are large)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"loss_normalization={self.loss_normalization!r} is not one of {LOSS_NORMALIZATIONS}: 'token' "
                "averages target tokens, 'example' averages examples, 'source' weights sources by source_weights"
            )
        if isinstance(self.source_weights, str):
            try:
                self.source_weights = json.loads(self.source_weights)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"source_weights must be a JSON object of source tag -> weight, e.g. '{{\"raft\": 2}}'; "
                    f"could not parse {self.source_weights!r}: {e}"
                ) from None
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


class RagTrainer(Trainer):
    """A ``transformers.Trainer`` for retrieval-augmented fine-tuning, with the same constructor.

    On top of ``Trainer`` it:
      * encodes raw records (RAFT ``{"question", "passages", "answer"}``, DAP ``{"text"}``) with
        ``processing_class`` when the datasets are not tokenized yet (length policy: see
        :func:`ragkern.data.encode_records`);
      * packs examples into bins of ``args.max_length`` tokens (:class:`~ragkern.packing.PackedBatchSampler`)
        and collates each micro-batch into one padding-free row (:class:`~ragkern.PackingCollator`);
      * switches the model to the "ragkern" attention, which keeps packed examples apart;
      * normalises the loss over the whole optimizer step (all micro-batches and ranks), by its target tokens
        (``loss_normalization="token"``), its examples (``"example"``: each example's mean token loss, averaged)
        or its sources (``"source"``: see :meth:`compute_loss`);
      * re-draws a :class:`~ragkern.data.RaftEpochDataset` every epoch (new distractors, order, oracle draw) and
        packs that epoch's bins, deterministically from the seed and epoch, so a resumed run and every rank see
        the same data;
      * runs peft LoRA layers on the fused kernel (``fused_lora``, :func:`ragkern.lora.apply`; undone by
        :func:`ragkern.lora.remove`);
      * logs ``fill_ratio``, ``tokens_per_second`` and ``target_tokens_per_second`` next to the loss, and, when
        the data mixes sources, ``loss/<source>`` (mean target-token loss) and ``accuracy/<source>`` (fraction
        of target tokens whose argmax prediction is the label) per example ``source``; RAFT examples built with
        ``RaftBuilder(split_source=True)`` report ``raft/oracle`` and ``raft/no_oracle`` apart.
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
        self._train_sampler: PackedBatchSampler | None = None
        self._source_window: tuple[torch.Tensor, ...] | None = None  # (loss sums, target counts, argmax hits)
        self._step_counts: torch.Tensor | None = None  # loss_normalization != "token": this step's divisors
        self._source_weight = self._check_source_weights()
        self.add_callback(_SamplerEpoch(self))
        self._apply_fused_lora()

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
            return dataset
        if isinstance(dataset, PackedIterableDataset):
            if dataset.max_length > args.max_length:
                raise ValueError(
                    f"the PackedIterableDataset packs bins of {dataset.max_length} tokens > the trainer's "
                    f"max_length={args.max_length}"
                )
            return dataset
        if isinstance(dataset, EncodedDataset):
            if max(dataset.lengths, default=0) <= args.max_length:
                return dataset
            examples, stats = dataset.examples, dataset.stats
        elif isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                "RagTrainer packs a sized dataset (a list, datasets.Dataset or EncodedDataset) or a stream wrapped "
                "in ragkern.packing.PackedIterableDataset (bounded-buffer packing; needs max_steps)"
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
        self, dataset: EncodedDataset, bins_per_batch: int, shuffle: bool, **sampler_kwargs
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
        step. Without ``step_counts`` (evaluation) the divisors are this batch's own.
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
        micro-batches. During evaluation (no step counts) each batch is normalised on its own.
        """
        source_ids = inputs.pop("source_ids", None)
        track = source_ids is not None and model.training and len(self._sources or ()) > 1
        loss, token_loss, *hits = causal_lm_loss(
            model,
            inputs,
            num_items_in_batch=num_items_in_batch,
            fused=self.args.fused_loss,
            return_hits=track,
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
        if track:
            self._add_source_stats(token_loss.detach(), hits[0], inputs["labels"], source_ids)
        if self.args.average_tokens_across_devices and in_step and (per_token or model.training):
            # The step's divisors count every rank's targets while DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        return (loss, {"token_loss": token_loss}) if return_outputs else loss

    def _add_source_stats(self, token_loss, hits, labels, source_ids) -> None:
        """Accumulate (loss sum, target count, argmax hits) per source between two logs."""
        targets = _target_mask(labels)
        ids, n = source_ids[targets], len(self._sources)
        sums = torch.bincount(ids, weights=token_loss[targets].double(), minlength=n)
        counts = torch.bincount(ids, minlength=n).double()
        right = torch.bincount(ids, weights=hits[targets].double(), minlength=n)
        acc = self._source_window
        new = (sums, counts, right)
        self._source_window = new if acc is None else tuple(a + b for a, b in zip(acc, new))

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
            if self._sources and len(self._sources) > 1:
                window = self._source_window or (torch.zeros(len(self._sources), dtype=torch.float64),) * 3
                window = torch.stack(window).to(self.args.device)  # (3, S): loss sums, targets, hits
                if self.args.world_size > 1:
                    window = self.accelerator.reduce(window, reduction="sum")
                for name, (total, count, right) in zip(self._sources, window.t().tolist()):
                    if count:
                        logs[f"loss/{name}"] = round(total / count, 4)
                        logs[f"accuracy/{name}"] = round(right / count, 4)
                self._source_window = None
            self._window = {"tokens": 0, "targets": 0, "start": now}
        super().log(logs, start_time)
