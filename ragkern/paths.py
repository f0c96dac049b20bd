"""Model and tokenizer paths given to the commands: a local folder or a hub id, checked before from_pretrained.

``from_pretrained`` takes a string it cannot find on disk for a hub id, so a mistyped local path ends in
huggingface_hub's "Repo id must be in the form ..." and a checkpoint folder without tokenizer files ends in
"install sentencepiece or tiktoken". These checks say what is wrong instead: a :class:`PathError` (a
``ValueError``) whose message names the option, the path and what to give. Only the standard library is
imported here (``ragkern --help`` stays instant); transformers is imported when a tokenizer is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

# What a folder must hold for AutoTokenizer to build a tokenizer from it: a tokenizers serialization, a
# tokenizer config, or the vocabulary files of a slow tokenizer (BPE, WordPiece, sentencepiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt")
TOKENIZER_SUFFIXES = (".model", ".tiktoken")

MODEL_EXPECTED = (
    "a local checkpoint folder (one holding config.json, written by save_pretrained or `ragkern convert-gguf`) "
    "or a hub id such as org/name"
)
TOKENIZER_EXPECTED = "a local tokenizer folder (written by save_pretrained) or a hub id such as org/name"


class PathError(ValueError):
    """A model or tokenizer path that is not what its option needs; the message names both and the fix."""


def looks_local(path: str) -> bool:
    """True for a string that cannot be a hub id (``name`` or ``org/name``): absolute, starting with ``.`` or
    ``~``, holding a backslash or more than one ``/``, or ending in ``.json``."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or "\\" in path
        or path.count("/") > 1
        or path.endswith(".json")
    )


def local_folder(path: str, option: str, expected: str) -> str:
    """``path`` (with ``~`` expanded) when it is a folder, or unchanged when it may be a hub id; else a PathError.

    ``option`` names where the path came from (``--model``, ``model_name_or_path``); ``expected`` says what to
    give instead, e.g. "a checkpoint folder (holding config.json) or a hub id such as org/name".
    """
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise PathError(f"{option} {path!r}: a file, not a folder; give {expected}")
    if looks_local(path):
        resolved = Path(expanded).resolve()
        raise PathError(f"{option} {path!r}: no such folder ({resolved}); give {expected}")
    return path


def holds_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds any file a tokenizer is built from (see TOKENIZER_FILES)."""
    return any(
        p.name in TOKENIZER_FILES or p.name.endswith(TOKENIZER_SUFFIXES) for p in Path(folder).iterdir()
    )


def load_tokenizer(path: str, option: str, fix: str):
    """``AutoTokenizer.from_pretrained(path)``; a PathError when ``path`` is a folder holding no tokenizer.

    Any failure is re-raised as is when the folder does hold tokenizer files (or ``path`` is a hub id): then the
    library's message (a missing sentencepiece, a broken file) is the right one. ``fix`` ends the message,
    e.g. "pass one with --tokenizer PATH".
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        if os.path.isdir(path) and not holds_tokenizer(path):
            raise PathError(
                f"{option} {path!r}: the folder {Path(path).resolve()} holds no tokenizer (no tokenizer.json, "
                f"tokenizer_config.json or vocabulary file); {fix}"
            ) from e
        raise
