"""RagTrainer: a drop-in ``transformers.Trainer`` for packed retrieval-augmented fine-tuning."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
import warnings

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from .attention import check_packed_row, mark_checked
from .callbacks import RunHooks, print_numbers
from .collator import PackingCollator, PaddingCollator, example_spans, per_example
from .data.prepare import EncodedDataset
from .data.raft import RaftEpochDataset
from .data.training import encode_for_training, source_names
from .gguf import name_by_hub_id
from .loss import causal_lm_loss, logits_token_loss
from .metrics import PackedMetrics
from .modeling import (
    BOUNDARY_AWARE_ATTENTION,  # noqa: F401  (kept importable from here, where it lived)
    apply_fused_lora,
    get_peft_model_quietly,
    load_model,
    use_boundary_aware_attention,
    wrap_peft,
)
from .neftune import PackedNEFTune
from .normalization import (
    LOSS_NORMALIZATIONS,  # noqa: F401  (kept importable from here, where it lived)
    require_source_ids,
    source_weight_vector,
    step_divisors,
    token_weights,
)
from .packing import PackedBatchSampler, PackedIterableDataset, stream_dataloader
from .training_args import RagTrainingArguments, as_rag_args, sampling_strategy

__all__ = ["RagTrainer", "RagTrainingArguments", "get_peft_model_quietly"]

logger = logging.getLogger(__name__)


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

    The class holds the ``Trainer`` hooks; each concern lives in its own module: options
    (:mod:`ragkern.training_args`), model preparation (:mod:`ragkern.modeling`), encoding
    (:mod:`ragkern.data.training`), bins and samplers (:mod:`ragkern.packing`), loss weights
    (:mod:`ragkern.normalization`), logged metrics (:mod:`ragkern.metrics`), per-example NEFTune
    (:mod:`ragkern.neftune`), run and epoch hooks (:mod:`ragkern.callbacks`).
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
        args = as_rag_args(args)
        self._peft_config = peft_config
        if isinstance(model, str | os.PathLike):
            model, processing_class = load_model(str(model), args, processing_class)
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
            train_dataset = _encode(train_dataset, processing_class, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: _encode(v, processing_class, args, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = _encode(eval_dataset, processing_class, args, "eval")
        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        sources = source_names([train_dataset, *evals])
        if getattr(data_collator, "source_names", None) is not None:
            # Batches' source_ids index the collator's list: weights and logs follow it, by name.
            sources = tuple(data_collator.source_names)
        elif isinstance(data_collator, PackingCollator) and sources:
            data_collator = dataclasses.replace(data_collator, source_names=sources)
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
        self._sources = sources
        self._source_weight = _source_weights(args, sources)  # (S,) for loss_normalization="source"
        self._metrics = PackedMetrics(
            sources, token_accuracy=args.token_accuracy, reduce=self._sum_over_ranks
        )
        self._train_sampler: PackedBatchSampler | PackedIterableDataset | None = None
        self._step_divisors: torch.Tensor | None = None  # loss_normalization != "token": this step's divisors
        # NEFTune scaled per packed example (Trainer's hook scales by the row): Trainer's is switched off.
        alpha, self.neftune_noise_alpha = self.neftune_noise_alpha, None
        self._neftune = PackedNEFTune(alpha) if alpha is not None else None
        self.add_callback(RunHooks(self))
        print_numbers(self.callback_handler)
        apply_fused_lora(self.model, args.fused_lora, args.device)
        self._ready = True

    def _prepare_model(self, model: torch.nn.Module, args: RagTrainingArguments) -> torch.nn.Module:
        """Every model this trainer trains: named by its hub id when converted from a GGUF (so its adapters
        name a base any machine can load, :func:`ragkern.gguf.name_by_hub_id`), wrapped by ``peft_config``
        and on boundary-aware attention."""
        hub_id = name_by_hub_id(model)
        if hub_id is not None:
            self._hub_named = hub_id
        if self._peft_config is not None:
            model = wrap_peft(model, self._peft_config, args)
        if args.packing:
            use_boundary_aware_attention(model, args.attn_implementation)
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
            apply_fused_lora(model, self.args.fused_lora, self.args.device)
        return model

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

    def _epoch_sampler_kwargs(self, dataset: RaftEpochDataset, in_order: bool) -> dict:
        """Sampler options for data re-drawn every epoch: the same bin count every epoch (``Trainer`` counts
        steps once), the most any epoch of this run needs, and the hook that switches the data per epoch.

        The epochs' lengths are encoded up front (``lengths_for_epoch``): one extra tokenization pass per epoch,
        lengths kept only. Every rank computes the same, from the builder's seed and the epoch.
        """
        args, world = self.args, self.args.world_size

        def bins_needed(lengths) -> int:
            return PackedBatchSampler.bins_needed(
                lengths, args.max_length, num_replicas=world, in_order=in_order
            )

        def updates_per_epoch(num_bins: int) -> int:
            batches = PackedBatchSampler.batches(
                num_bins, num_replicas=world, bins_per_batch=self._bins_per_batch()
            )
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
                bins_per_batch=self._bins_per_batch(),
                rank=self.args.process_index,
                world_size=self.args.world_size,
                num_workers=self.args.dataloader_num_workers,
            )
            self._train_sampler = loader.dataset  # its fill_ratio grows as bins are emitted
            logger.info(
                "packing a stream into bins of %d tokens (buffer %d examples)",
                self.train_dataset.max_length,
                self.train_dataset.buffer_size,
            )
            return loader
        per_epoch = isinstance(self.train_dataset, RaftEpochDataset)
        in_order = sampling_strategy(self.args) == "sequential"  # examples in dataset order, bins in order
        loader, sampler = self._packed_dataloader(
            self.train_dataset,
            self._bins_per_batch(),
            shuffle=not in_order,
            in_order=in_order,
            **(self._epoch_sampler_kwargs(self.train_dataset, in_order) if per_epoch else {}),
        )
        self._train_sampler = sampler
        logger.info(
            "packed %d examples into %d bins of %d tokens (fill ratio %.4f)%s",
            len(self.train_dataset),
            len(sampler.bins),
            self.args.max_length,
            sampler.fill_ratio,
            "; RAFT examples re-drawn and re-packed every epoch" if per_epoch else "",
        )
        return loader

    def _bins_per_batch(self) -> int:
        """Bins per training micro-batch: ``Trainer``'s batch size, which ``auto_find_batch_size`` lowers
        after an out-of-memory error (``per_device_train_batch_size`` stays as given)."""
        return max(self._train_batch_size // max(1, self.args.n_gpu), 1)

    def _eval_loader(self, dataset, purpose: str) -> DataLoader:
        """Packed rows of consecutive examples (``max_length`` tokens per bin, ``per_device_eval_batch_size``
        bins per row): batches hold the examples in dataset order, so outputs map back to them."""
        if not isinstance(dataset, EncodedDataset):
            dataset = _encode(dataset, self.processing_class, self.args, purpose)
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
                dataset = _encode(dataset, self.processing_class, self.args, "eval")
            return super().get_eval_dataloader(dataset)
        return self._eval_loader(dataset, "eval")

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        """Records (encoded with ``processing_class`` as for training) or tokenized examples, packed in order;
        ``predict`` refuses to drop an example (outputs map back to the examples given)."""
        if not self.args.packing:
            if not isinstance(test_dataset, EncodedDataset):
                test_dataset = _encode(test_dataset, self.processing_class, self.args, "predict")
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
        """``Trainer``'s micro-batches of one optimizer step; with ``loss_normalization`` "example" or "source"
        also the step's divisors (over its micro-batches and, with ``average_tokens_across_devices``, ranks)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        mode = self.args.loss_normalization
        if mode != "token":
            counts = step_divisors(batch_samples, mode, len(self._sources or ()), device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            self._step_divisors = counts
        return batch_samples, num_items_in_batch

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
            return_hits=self._metrics.wants_hits,
            label_smoothing=self.args.label_smoothing_factor,
            impl=self.args.fused_loss_impl,
        )
        in_step = num_items_in_batch is not None
        mode = self.args.loss_normalization
        if mode != "token":
            if mode == "source" and source_ids is None:
                require_source_ids(inputs)
            # The divisors belong to the training step being accumulated. transformers also passes
            # num_items_in_batch at evaluation, where the last training step's divisors would be wrong.
            weights = token_weights(
                inputs,
                mode,
                source_ids=source_ids,
                source_weight=self._source_weight,
                divisors=self._step_divisors if in_step and model.training else None,
            )
            loss = (token_loss * weights).sum()
        if model.training:
            self._metrics.add("train", token_loss, hits, inputs["labels"], source_ids)
        if self.args.average_tokens_across_devices and in_step and (mode == "token" or model.training):
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
        if model.training and self._metrics.wants_hits:
            with torch.no_grad():
                token_loss, hits = logits_token_loss(outputs.logits, labels)
            self._metrics.add("train", token_loss, hits, labels, source_ids)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

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
            stats = self._metrics.add("eval", token_loss, hits, labels, source_ids, inputs)
            loss = user_loss if user_loss is not None else token_loss.sum() / stats[1, :-1].sum().clamp_min(1)
        if prediction_loss_only:
            return loss, None, None
        spans = example_spans(inputs)
        if "inputs" in self.args.include_for_metrics:
            # evaluation_loop reads the inputs after this step from its own dict: give it one row per example
            loop_inputs[getattr(self.model, "main_input_name", "input_ids")] = per_example(
                inputs["input_ids"], spans, -100
            )
        return (
            loss,
            per_example(logits, spans, -100),
            None if labels is None else per_example(labels, spans, -100),
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
        self._metrics.start_eval()
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        loss_mode = self.args.loss_normalization if self.compute_loss_func is None else None
        output.metrics.update(
            self._metrics.eval_metrics(
                metric_key_prefix, loss_mode=loss_mode, source_weight=self._source_weight
            )
        )
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._neftune is not None:
            self._neftune.cu_seqlens = inputs.get("cu_seq_lens_q")
        self._metrics.count_tokens(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "train_runtime" in logs:  # training logs, on every rank alike
            logs.update(self._metrics.train_logs(logs))
            if self._train_sampler is not None:
                logs["fill_ratio"] = round(self._train_sampler.fill_ratio, 4)
        super().log(logs, start_time)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        if self.args.world_size == 1:
            return t
        return self.accelerator.reduce(t.to(self.args.device), reduction="sum").cpu()


def _encode(dataset, tokenizer, args: RagTrainingArguments, purpose: str):
    return encode_for_training(
        dataset, tokenizer, max_length=args.max_length, strict=args.strict_length, purpose=purpose
    )


def _source_weights(args: RagTrainingArguments, sources: tuple[str, ...] | None) -> torch.Tensor | None:
    """``(S,)`` float64 weights of ``sources`` for ``loss_normalization="source"`` (None otherwise)."""
    if args.loss_normalization != "source":
        return None
    if not sources:
        raise ValueError(
            "loss_normalization='source' needs source tags: pass RagTrainer a train_dataset it encodes (records "
            "or tokenized examples with a 'source' field), packed by its PackingCollator"
        )
    return source_weight_vector(sources, args.source_weights)
