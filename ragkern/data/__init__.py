"""Records -> tokenized examples: ``{input_ids, labels, block_ids, source}``."""

from .encode import IGNORE_INDEX, ExampleTooLongError, RecordError, encode, record_kind, render_prompt
from .prepare import EncodedDataset, EncodeStats, encode_records
from .tokenizer import build_word_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "EncodeStats",
    "EncodedDataset",
    "ExampleTooLongError",
    "RecordError",
    "build_word_tokenizer",
    "encode",
    "encode_records",
    "record_kind",
    "render_prompt",
]
