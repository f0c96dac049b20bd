"""Encode a whole collection of records into a dataset of examples, with the length policy applied.

Length policy (invariant 4 of DESIGN.md): a DAP document longer than ``max_length`` is split into chunks of
``max_length`` tokens, every chunk trained; a RAFT example longer than ``max_length`` drops distractor passages,
then truncates passages (:func:`ragkern.data.fit_raft`), never the question, reasoning or answer, and is dropped
and counted only if even that cannot fit; any other example longer than ``max_length`` is dropped and counted
(or, with ``strict=True``, every example over the limit raises). Nothing is dropped silently: the counts are logged and kept in
``EncodedDataset.stats``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .encode import ExampleTooLongError, RecordError, encode, fit_raft, present_fields, record_kind

logger = logging.getLogger(__name__)


@dataclass
class EncodeStats:
    """What encoding did to the records: counts per outcome."""

    records: int = 0
    examples: int = 0
    dropped_too_long: int = 0
    dap_chunks: int = 0
    dropped_ids: list = field(default_factory=list)  # ids (or indices) of dropped records
    trimmed: int = 0  # RAFT examples made to fit by dropping distractors and/or truncating passages
    dropped_distractors: int = 0  # passages removed by the length policy, over all trimmed examples
    truncated_passages: int = 0  # examples whose passages had to be truncated
    skipped_invalid: int = 0  # bad records skipped with on_error="skip"
    errors: list = field(default_factory=list)  # the first messages of skipped records
    per_source: dict = field(default_factory=dict)  # source -> examples kept

    def summary(self) -> str:
        return (
            f"{self.records} records -> {self.examples} examples; dropped {self.dropped_too_long} longer than "
            f"max_length; trimmed {self.trimmed} RAFT examples ({self.dropped_distractors} distractors dropped, "
            f"{self.truncated_passages} with truncated passages); {self.dap_chunks} DAP chunks from split "
            f"documents; {self.skipped_invalid} invalid records skipped"
        )


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenized examples in memory, with their lengths (what packing needs) and the encoding stats."""

    def __init__(self, examples: list[dict], stats: EncodeStats | None = None):
        self.examples = examples
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.stats = stats or EncodeStats(records=len(examples), examples=len(examples))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def _chunks(example: dict, max_length: int) -> list[dict]:
    n = len(example["input_ids"])
    return [
        {k: (v[i : i + max_length] if isinstance(v, list) else v) for k, v in example.items()}
        for i in range(0, n, max_length)
    ]


def encode_records(
    records: Iterable[dict],
    tokenizer,
    *,
    max_length: int,
    strict: bool = False,
    trim: bool = True,
    on_error: str = "raise",
    show_progress: bool = True,
) -> EncodedDataset:
    """Encode every record (see :func:`ragkern.data.encode`) and apply the length policy.

    Args:
        records: dicts (a list, a ``datasets.Dataset`` or any iterable).
        tokenizer: a fast tokenizer with an EOS token.
        max_length: the longest example kept (the packed row length).
        strict: raise on an example longer than ``max_length`` instead of trimming, dropping and counting it.
        trim: apply the RAFT trimming policy (drop distractors, then truncate passages) before dropping.
        on_error: "raise" on a bad record, or "skip" it and count it in ``stats.skipped_invalid`` (lenient).
        show_progress: show a progress bar.

    Raises:
        RecordError: a bad record; the message names its position in ``records`` and the field.
    """
    stats = EncodeStats()
    examples = list(
        iter_encode_records(
            records,
            tokenizer,
            max_length=max_length,
            strict=strict,
            trim=trim,
            on_error=on_error,
            stats=stats,
            show_progress=show_progress,
        )
    )
    return EncodedDataset(examples, stats)


def check_encode_args(max_length: int, on_error: str) -> None:
    """Raise on encoding arguments :func:`iter_encode_records` cannot honour (checked before any record is read)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def iter_encode_records(
    records: Iterable[dict],
    tokenizer,
    *,
    max_length: int,
    strict: bool = False,
    trim: bool = True,
    on_error: str = "raise",
    stats: EncodeStats | None = None,
    show_progress: bool = False,
) -> Iterator[dict]:
    """Encode records lazily, one example at a time: :func:`encode_records` for streams.

    Nothing is materialised: ``records`` may be a ``datasets.IterableDataset``, a generator or a file read
    with :func:`ragkern.data.iter_records`. The same length policy applies (a long DAP document yields its
    chunks one after another). ``stats`` (optional) is updated as examples are yielded; the warnings of the
    length policy are logged when the stream ends. Arguments as in :func:`encode_records`.
    """
    check_encode_args(max_length, on_error)
    stats = EncodeStats() if stats is None else stats
    return _encode_stream(records, tokenizer, max_length, strict, trim, on_error, stats, show_progress)


def _encode_stream(records, tokenizer, max_length, strict, trim, on_error, stats, show_progress):
    total = len(records) if hasattr(records, "__len__") else None
    for i, record in enumerate(tqdm(records, total=total, desc="encoding", disable=not show_progress)):
        stats.records += 1
        record = present_fields(record)
        try:
            kind = record_kind(record)
            is_dap = kind == "dap"
            if kind == "raft" and trim and not strict:
                example, fit = fit_raft(record, tokenizer, max_length)
                if fit.trimmed:
                    stats.trimmed += 1
                    stats.dropped_distractors += fit.dropped_distractors
                    stats.truncated_passages += fit.truncated_passages > 0
            else:
                example = encode(record, tokenizer, max_length=None if is_dap else max_length)
        except ExampleTooLongError as e:
            if strict:
                raise RecordError(
                    f"record #{i}: {e} (strict mode; set strict=False to drop and count)"
                ) from e
            stats.dropped_too_long += 1
            stats.dropped_ids.append(record.get("id", i))
            continue
        except RecordError as e:
            if on_error == "raise":
                raise RecordError(f"record #{i}: {e}", field=e.field) from e
            stats.skipped_invalid += 1
            if len(stats.errors) < 20:
                stats.errors.append(f"record #{i}: {e}")
            continue
        if is_dap and len(example["input_ids"]) > max_length:
            pieces = _chunks(example, max_length)
            stats.dap_chunks += len(pieces)
        else:
            pieces = [example]
        for piece in pieces:
            source = piece.get("source", "default")
            stats.examples += 1
            stats.per_source[source] = stats.per_source.get(source, 0) + 1
            yield piece
    _log_stats(stats, max_length)


def _log_stats(stats: EncodeStats, max_length: int) -> None:
    if stats.dropped_too_long:
        logger.warning(
            "dropped %d of %d records longer than max_length=%d (first ids: %s); raise max_length or shorten them",
            stats.dropped_too_long,
            stats.records,
            max_length,
            stats.dropped_ids[:5],
        )
    if stats.trimmed:
        logger.warning(
            "trimmed %d RAFT examples to fit max_length=%d: %d distractor passages dropped, %d examples with "
            "truncated passages (questions and answers are never cut)",
            stats.trimmed,
            max_length,
            stats.dropped_distractors,
            stats.truncated_passages,
        )
    if stats.skipped_invalid:
        logger.warning("skipped %d invalid records (first: %s)", stats.skipped_invalid, stats.errors[:3])
    logger.info("encoded %s", stats.summary())
