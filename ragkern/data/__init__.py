"""Records -> tokenized examples: ``{input_ids, labels, block_ids, source}``."""

from .encode import (
    IGNORE_INDEX,
    ExampleTooLongError,
    FitReport,
    RecordError,
    encode,
    fit_raft,
    record_kind,
    render_prompt,
    validate_record,
)
from .mix import iter_mix, mix_sources
from .prepare import EncodedDataset, EncodeStats, encode_records, iter_encode_records
from .raft import RaftBuilder, RaftEpochDataset
from .records import LoadError, Records, iter_records, load_records
from .stats import pack_stats
from .stream import EncodedStream, RaftStream
from .tokenizer import build_bpe_tokenizer, build_word_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "EncodeStats",
    "EncodedDataset",
    "EncodedStream",
    "ExampleTooLongError",
    "FitReport",
    "LoadError",
    "RaftBuilder",
    "RaftEpochDataset",
    "RaftStream",
    "RecordError",
    "Records",
    "build_bpe_tokenizer",
    "build_word_tokenizer",
    "encode",
    "encode_records",
    "fit_raft",
    "iter_encode_records",
    "iter_mix",
    "iter_records",
    "load_records",
    "mix_sources",
    "pack_stats",
    "record_kind",
    "render_prompt",
    "validate_record",
]
