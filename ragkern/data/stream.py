"""Streams: RAFT building and tokenization over records that are never materialised.

::

    records: a path (iter_records), a datasets.IterableDataset, any re-iterable of dicts
      -> RaftStream(qa_records, builder)                QA -> RAFT records, fresh draws every epoch
      -> iter_mix({"raft": ..., "chat": ...}, weights)  optional hybrid mix (ragkern.data.iter_mix)
      -> EncodedStream(records, tokenizer, max_length)  examples one at a time, length policy applied
      -> ragkern.packing.PackedIterableDataset          bins packed from a bounded buffer

Both classes are re-iterable when their source is (each pass reads it again) and pass ``set_epoch`` on to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .prepare import EncodeStats, check_encode_args, iter_encode_records
from .raft import RaftBuilder
from .records import iter_records


def _set_epoch(source, epoch: int) -> None:
    if hasattr(source, "set_epoch"):
        source.set_epoch(epoch)


class RaftStream:
    """QA records ``{"question", "answer", "oracle_passages"}`` turned into RAFT records lazily.

    Record ``i`` of the stream in epoch ``e`` becomes ``builder.build(record, index=i, epoch=e)``: the same
    example as :meth:`RaftBuilder.build_all` gives for the same records, and new distractors, order and
    oracle draw after ``set_epoch``. Records are validated as they are read (``on_error`` as in
    :func:`ragkern.data.iter_records`).

    Args:
        records: a ``.jsonl``/``.json``/``.parquet`` path, a ``datasets.IterableDataset`` or any iterable of QA
            records (re-iterable for more than one pass).
        builder: the :class:`RaftBuilder` holding the corpus and the RAFT knobs.
    """

    # DataLoader workers: this stream yields each worker's share when its records do (packing.shards_by_worker)
    worker_shards_from = "records"

    def __init__(self, records, builder: RaftBuilder, *, epoch: int = 0, on_error: str = "raise"):
        self.records, self.builder, self.epoch, self.on_error = records, builder, epoch, on_error

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        _set_epoch(self.records, epoch)

    def __iter__(self) -> Iterator[dict]:
        qa = iter_records(self.records, kinds=("qa",), on_error=self.on_error, name="qa records")
        for i, record in enumerate(qa):
            yield self.builder.build(record, index=i, epoch=self.epoch)


class EncodedStream:
    """Records encoded on the fly into ``{input_ids, labels, block_ids, source}`` examples.

    Each pass runs :func:`ragkern.data.iter_encode_records` over ``records`` (same encoding and length policy
    as :func:`ragkern.data.encode_records`, one example at a time) and starts a fresh ``stats``
    (:class:`EncodeStats`, updated as examples are yielded).

    Args:
        records: any iterable of records (a ``datasets.IterableDataset``, :class:`RaftStream`,
            :func:`ragkern.data.iter_records` of a path, ...); re-iterable for more than one pass.
        tokenizer, max_length, strict, trim, on_error: as in :func:`ragkern.data.encode_records`.
    """

    # DataLoader workers: this stream yields each worker's share when its records do (packing.shards_by_worker)
    worker_shards_from = "records"

    def __init__(
        self,
        records: Iterable[dict],
        tokenizer,
        *,
        max_length: int,
        strict: bool = False,
        trim: bool = True,
        on_error: str = "raise",
    ):
        check_encode_args(max_length, on_error)
        self.records, self.tokenizer, self.max_length = records, tokenizer, max_length
        self.strict, self.trim, self.on_error = strict, trim, on_error
        self.stats = EncodeStats()

    def set_epoch(self, epoch: int) -> None:
        _set_epoch(self.records, epoch)

    def __iter__(self) -> Iterator[dict]:
        self.stats = EncodeStats()
        return iter_encode_records(
            self.records,
            self.tokenizer,
            max_length=self.max_length,
            strict=self.strict,
            trim=self.trim,
            on_error=self.on_error,
            stats=self.stats,
        )
