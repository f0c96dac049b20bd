"""Datasets as RagTrainer takes them: encoded, within ``max_length``, and the source tags they carry."""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..packing import PackedIterableDataset
from .prepare import EncodedDataset, EncodeStats, encode_records
from .raft import RaftEpochDataset

logger = logging.getLogger(__name__)


def encode_for_training(
    dataset, tokenizer, *, max_length: int, strict: bool = False, purpose: str = "train"
) -> EncodedDataset | PackedIterableDataset:
    """A dataset as RagTrainer is given it -> an :class:`EncodedDataset` with every length <= ``max_length``.

    Raw records are encoded with ``tokenizer`` and the length policy (:func:`encode_records`); tokenized
    examples longer than ``max_length`` are dropped (counted in ``stats``); a :class:`RaftEpochDataset` or a
    :class:`~ragkern.packing.PackedIterableDataset` is checked against ``max_length`` and kept. ``strict``
    raises instead of dropping. ``purpose`` names the dataset in messages; ``"predict"`` refuses to drop an
    example (predictions must map back to the examples given).
    """
    if isinstance(dataset, RaftEpochDataset):
        if dataset.max_length > max_length:
            raise ValueError(
                f"the RaftEpochDataset encodes with max_length={dataset.max_length} > the trainer's "
                f"max_length={max_length}; build it with max_length <= {max_length}"
            )
        if strict and not dataset.strict:
            raise ValueError(
                "strict_length=True, but the RaftEpochDataset trims and drops long examples of later epochs: "
                "build it with strict=True"
            )
        return require_examples(dataset, purpose, max_length)
    if isinstance(dataset, PackedIterableDataset):
        if dataset.max_length > max_length:
            raise ValueError(
                f"the PackedIterableDataset packs bins of {dataset.max_length} tokens > the trainer's "
                f"max_length={max_length}"
            )
        return dataset
    if isinstance(dataset, EncodedDataset):
        if max(dataset.lengths, default=0) <= max_length:
            return require_examples(dataset, purpose, max_length)
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
        out = encode_records(dataset, tokenizer, max_length=max_length, strict=strict)
        if purpose == "predict" and out.stats.dropped_too_long:
            raise ValueError(
                f"predict: {out.stats.dropped_too_long} records do not fit max_length={max_length} even "
                f"after the length policy (first: {out.stats.dropped_ids[:5]}); predictions map to the records "
                "given, so none may be dropped: raise max_length or shorten them"
            )
        return require_examples(out, purpose, max_length)
    else:
        examples = [dict(e) for e in dataset]
        stats = EncodeStats(records=len(examples), examples=len(examples))
    too_long = [i for i, e in enumerate(examples) if len(e["input_ids"]) > max_length]
    if too_long and (strict or purpose == "predict"):
        raise ValueError(
            f"{purpose}: examples {too_long[:5]} are longer than max_length={max_length} "
            f"({'strict_length' if strict else 'predictions map to the examples given'}); "
            "raise max_length or shorten them"
        )
    if too_long:
        logger.warning(
            "%s: dropping %d tokenized examples longer than max_length=%d (first: %s)",
            purpose,
            len(too_long),
            max_length,
            too_long[:5],
        )
        drop = set(too_long)
        examples = [e for i, e in enumerate(examples) if i not in drop]
    out = EncodedDataset(examples, stats)
    out.stats.dropped_too_long += len(too_long)
    out.stats.examples -= len(too_long)
    out.stats.dropped_ids += too_long
    return require_examples(out, purpose, max_length)


def require_examples(dataset, purpose: str, max_length: int):
    """``dataset`` if it holds an example; else a ValueError that says what was dropped and what to change."""
    if len(dataset):
        return dataset
    stats = getattr(dataset, "stats", None)
    if stats is None or not stats.records:
        raise ValueError(f"the {purpose} dataset is empty: give it at least one record or example")
    raise ValueError(
        f"no {purpose} example is left: {stats.records} records, {stats.dropped_too_long} dropped as longer than "
        f"max_length={max_length} even after the length policy (first: {stats.dropped_ids[:5]}), "
        f"{stats.skipped_invalid} invalid records skipped ({stats.errors[:2]}); raise max_length, shorten the "
        "records or fix the invalid ones"
    )


def source_names(datasets: list) -> tuple[str, ...] | None:
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
