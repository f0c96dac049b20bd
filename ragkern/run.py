"""``ragkern train``: a training run from a YAML/JSON config, command-line flags, or both.

::

    ragkern train --config examples/configs/raft.yaml --learning_rate 1e-3 --output_dir runs/try

Every option is a field of :class:`ModelArguments`, :class:`DataArguments` or
:class:`~ragkern.RagTrainingArguments` (so every ``TrainingArguments`` field), parsed by transformers'
``HfArgumentParser``. The config file gives the parser its defaults; flags given after it override them
(``--help`` lists every option). The same run from Python::

    from ragkern.run import parse_train_args, run_train
    run = run_train(*parse_train_args(["--config", "run.yaml", "--max_steps", "2"]))

What a run does: load and validate each source's records; build RAFT records for ``qa`` sources from their
corpus (:class:`~ragkern.data.RaftBuilder`); mix the sources at their weights
(:func:`~ragkern.data.mix_sources`); encode with the length policy; build the model (a checkpoint, or a small
random model from a config for smoke runs) and its peft LoRA adapter; train with
:class:`~ragkern.RagTrainer`; save the model, the tokenizer and ``ragkern_run.json`` (the model, data and training
options and the encoding counts) to ``output_dir``. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    set_seed,
)

from .data import EncodeStats, RaftBuilder, RaftEpochDataset, encode_records, load_records, mix_sources
from .data.tokenizer import build_word_tokenizer
from .paths import MODEL_EXPECTED, TOKENIZER_EXPECTED, load_tokenizer, local_folder
from .selftest import small_config
from .trainer import RagTrainer, RagTrainingArguments, get_peft_model_quietly

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("raft", "qa", "instruct", "dap")
WORD_TOKENIZER = "word"


class ConfigError(ValueError):
    """A bad run option; the message names the option (and the source) and what it accepts."""


@dataclass
class SourceSpec:
    """One data source: a ``sources`` entry ``{"kind", "path", "weight"?, "name"?, "corpus"?}``.

    ``kind`` is the record format of the files: ``raft`` ({question, passages, answer}), ``qa``
    ({question, answer, oracle_passages}, built into RAFT records against ``corpus``), ``instruct``
    ({messages} or {prompt, completion}) or ``dap`` ({text}). ``name`` tags the examples (losses are logged
    per name); it defaults to the kind (``raft`` for ``qa``), numbered when repeated.
    """

    kind: str
    path: list[str]  # .jsonl / .json / .parquet files
    weight: float = 1.0  # sampling weight in the mix (need not sum to 1)
    name: str = ""
    corpus: str | None = None  # qa only: passages the distractors are drawn from

    @classmethod
    def from_dict(cls, value, index: int) -> SourceSpec:
        """Validate one ``sources`` entry; errors name ``sources[index]`` and the field."""
        where = f"sources[{index}]"
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where} must be a mapping like {{kind: raft, path: train.jsonl}}, got {value!r}"
            )
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r}{_did_you_mean(unknown[0], fields)}")
        kind = value.get("kind")
        if kind is None:
            raise ConfigError(f"{where}: missing field 'kind' (one of {', '.join(SOURCE_KINDS)})")
        if kind not in SOURCE_KINDS:
            raise ConfigError(
                f"{where}: kind {kind!r} is not one of {', '.join(SOURCE_KINDS)} (qa = QA records + a corpus)"
            )
        where = f"{where} ({value.get('name') or kind})"
        paths = value.get("path")
        if paths is None:
            raise ConfigError(f"{where}: missing field 'path' (a records file, or a list of them)")
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise ConfigError(
                f"{where}: field 'path' must be a file path or a list of them, got {value['path']!r}"
            )
        for p in paths:
            if not Path(p).is_file():
                raise ConfigError(f"{where}: field 'path': {p!r} is not a file (relative to {Path.cwd()})")
        weight = value.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ConfigError(f"{where}: field 'weight' must be a number >= 0, got {weight!r}")
        corpus = value.get("corpus")
        if kind == "qa" and corpus is None:
            raise ConfigError(f"{where}: kind 'qa' needs field 'corpus' (the passages distractors come from)")
        if kind != "qa" and corpus is not None:
            raise ConfigError(f"{where}: field 'corpus' is for kind 'qa' only (this source is {kind!r})")
        if corpus is not None and not (isinstance(corpus, str) and Path(corpus).is_file()):
            raise ConfigError(f"{where}: field 'corpus': {corpus!r} is not a file")
        name = value.get("name") or ""
        if not isinstance(name, str):
            raise ConfigError(f"{where}: field 'name' must be a string, got {name!r}")
        return cls(kind=kind, path=paths, weight=float(weight), name=name, corpus=corpus)


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass
class ModelArguments:
    """The model, its tokenizer and the peft LoRA adapter (``lora_r: 0`` = full fine-tuning)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint to fine-tune: a local folder (or a hub name)."}
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "Instead of a checkpoint: a config.json (or its folder) or a model type (llama, qwen3, ...) "
            "built small and randomly initialised, as ragkern selftest does; for offline smoke runs."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder (default: model_name_or_path), or 'word' for an offline word-level "
            "tokenizer built from the run's data (with model_config)."
        },
    )
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = field(
        default="float32",
        metadata={
            "help": "dtype the weights are loaded in: float32 (default; add --bf16 for mixed precision with "
            "fp32 master weights), bfloat16/float16 (every weight trained in half precision unless LoRA), or "
            "auto (the checkpoint's dtype)."
        },
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every weight (no adapter)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules given adapters: names (q_proj v_proj ...) or all-linear."},
    )

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise ConfigError(
                "give exactly one of model_name_or_path (a checkpoint) and model_config (a small random model "
                f"from a config.json or a model type); got model_name_or_path={self.model_name_or_path!r}, "
                f"model_config={self.model_config!r}"
            )
        if self.model_config is not None and self.tokenizer_name_or_path is None:
            raise ConfigError(
                "model_config needs tokenizer_name_or_path: a tokenizer folder, or 'word' (offline word-level "
                "tokenizer built from the data)"
            )
        # a missing local folder is reported here, before any data is loaded (not as a bad hub repo id)
        if self.model_name_or_path is not None:
            self.model_name_or_path = local_folder(
                self.model_name_or_path, "model_name_or_path", MODEL_EXPECTED
            )
        if self.tokenizer_name_or_path not in (None, WORD_TOKENIZER):
            self.tokenizer_name_or_path = local_folder(
                self.tokenizer_name_or_path, "tokenizer_name_or_path", f"{TOKENIZER_EXPECTED}, or 'word'"
            )
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty; give module names or all-linear")


@dataclass
class DataArguments:
    """The data sources, how they are mixed, and the RAFT knobs of ``qa`` sources."""

    sources: list[dict] | str | None = field(
        default=None,
        metadata={
            "help": "Data sources, each {kind: raft|qa|instruct|dap, path, weight (1), name, corpus (qa)}; "
            "a list in the config file, a JSON list on the command line."
        },
    )
    num_distractors: int = field(default=3, metadata={"help": "qa sources: distractor passages per example."})
    p_oracle: float = field(
        default=0.8, metadata={"help": "qa sources: probability an example keeps its oracle passage(s)."}
    )
    negatives: Literal["random", "bm25"] = field(
        default="random", metadata={"help": "qa sources: distractors at random, or BM25 hard negatives."}
    )
    hard_pool: int | None = field(
        default=None,
        metadata={"help": "bm25: draw among this many top-ranked passages (4 x num_distractors)."},
    )
    shuffle_passages: bool = field(
        default=True, metadata={"help": "qa sources: shuffle passages (else the oracle comes first)."}
    )
    resample_every_epoch: bool = field(
        default=False,
        metadata={
            "help": "A single qa source: draw new distractors, order and oracle every epoch "
            "(RaftEpochDataset) instead of once."
        },
    )
    reasoning: bool = field(
        default=True,
        metadata={"help": "Train on a record's 'reasoning' before its answer; false drops the field."},
    )
    split_oracle_source: bool = field(
        default=False,
        metadata={
            "help": "Tag RAFT examples <name>/oracle or <name>/no_oracle: their losses are logged apart."
        },
    )
    mix_stopping: Literal["first_exhausted", "all_exhausted"] = field(
        default="first_exhausted",
        metadata={
            "help": "Several sources: stop when the first runs out (the weights hold) or use every record."
        },
    )
    num_records: int | None = field(default=None, metadata={"help": "Use at most this many (mixed) records."})
    on_error: Literal["raise", "skip"] = field(
        default="raise",
        metadata={"help": "A bad record: raise naming file, line and field, or skip and count."},
    )

    def __post_init__(self):
        sources = self.sources
        if isinstance(sources, str):
            try:
                sources = json.loads(sources)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"sources: not valid JSON ({e}); give a list like '[{{\"kind\": ...}}]'"
                ) from e
            sources = [sources] if isinstance(sources, dict) else sources
        if not sources:
            raise ConfigError("no data: give sources, e.g. [{kind: raft, path: train.jsonl}]")
        if not isinstance(sources, list):
            raise ConfigError(
                f"sources must be a list of {{kind, path, ...}} mappings, got {type(sources).__name__}"
            )
        specs = [
            s if isinstance(s, SourceSpec) else SourceSpec.from_dict(s, i) for i, s in enumerate(sources)
        ]
        seen: dict[str, int] = {}
        for spec in specs:
            base = spec.name or ("raft" if spec.kind == "qa" else spec.kind)
            seen[base] = seen.get(base, 0) + 1
            spec.name = spec.name or (base if seen[base] == 1 else f"{base}_{seen[base]}")
        names = [s.name for s in specs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ConfigError(f"sources: two sources are named {dup!r}; names must differ")
        if sum(s.weight for s in specs) <= 0:
            raise ConfigError("sources: every weight is 0; give at least one source a weight > 0")
        self.sources = specs
        if self.resample_every_epoch and (len(specs) > 1 or specs[0].kind != "qa"):
            this_run = (
                f"mixes {len(specs)} sources"
                if len(specs) > 1
                else f"has one {specs[0].kind} source ({specs[0].name}), whose examples are fixed (a qa "
                "source draws its passages from a corpus)"
            )
            raise ConfigError(
                "resample_every_epoch re-draws the RAFT examples of a single qa source every epoch "
                f"(RaftEpochDataset); this run {this_run}: set resample_every_epoch false"
            )
        if self.num_distractors < 0:
            raise ConfigError(f"num_distractors must be >= 0, got {self.num_distractors}")
        if not 0.0 <= self.p_oracle <= 1.0:
            raise ConfigError(f"p_oracle must be in [0, 1], got {self.p_oracle}")
        for name, value, allowed in (
            ("negatives", self.negatives, ("random", "bm25")),
            ("mix_stopping", self.mix_stopping, ("first_exhausted", "all_exhausted")),
            ("on_error", self.on_error, ("raise", "skip")),
        ):
            if value not in allowed:
                raise ConfigError(f"{name} = {value!r} is not one of {', '.join(allowed)}")
        if self.num_records is not None and self.num_records < 1:
            raise ConfigError(f"num_records must be >= 1, got {self.num_records}")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, RagTrainingArguments)


def _read_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        values = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must hold a mapping of option: value, got {type(values).__name__}")
    known = [f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in known:
            raise ConfigError(f"{path}: unknown option {key!r}{_did_you_mean(str(key), known)}")
    return values


def parse_train_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, RagTrainingArguments]:
    """Parse ``[--config FILE] [--option value ...]`` into the three argument dataclasses.

    The options of ``FILE`` (``.yaml``/``.yml``, or ``.json``) become the parser's defaults, so flags override
    them; values go through the same conversion as flags (``learning_rate: 1e-3`` is a float).
    (``HfArgumentParser``'s own file readers, ``parse_yaml_file``/``parse_json_file``, take no flags, and its
    ``args_file_flag`` reads flag-per-line files only, hence the file as defaults.)

    Raises:
        ConfigError: an unknown option in the file, a bad source or option value of this module (the message
            names it). A value that cannot be converted (``--learning_rate abc``) exits with argparse's usage
            error, as any flag does.
        PathError: a local model_name_or_path or tokenizer_name_or_path folder that does not exist.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(
        ARGUMENT_CLASSES,
        prog="ragkern train",
        description="Fine-tune with RagTrainer from a YAML/JSON config (--config) and/or these flags; flags "
        "override the file.",
    )
    if known.config:
        parser.set_defaults(**_read_config(known.config))
    return parser.parse_args_into_dataclasses(rest, look_for_args_file=False)


_WORD = re.compile(r"[^\W\d_]+")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def word_tokenizer_for(texts) -> PreTrainedTokenizerFast:
    """The offline word-level tokenizer (:func:`~ragkern.data.build_word_tokenizer`) over the words of
    ``texts`` (any nesting of strings, lists and dicts: records), sorted so that it is deterministic."""
    return build_word_tokenizer(sorted({w for s in _strings(texts) for w in _WORD.findall(s.lower())}))


@dataclass
class _Source:
    spec: SourceSpec
    records: list
    builder: RaftBuilder | None


def _load_sources(data_args: DataArguments, seed: int) -> list[_Source]:
    loaded = []
    for spec in data_args.sources:
        records = load_records(spec.path, kinds=(spec.kind,), on_error=data_args.on_error, name=spec.name)
        builder = None
        if spec.kind == "qa":
            builder = RaftBuilder(
                spec.corpus,
                num_distractors=data_args.num_distractors,
                p_oracle=data_args.p_oracle,
                negatives=data_args.negatives,
                hard_pool=data_args.hard_pool,
                shuffle=data_args.shuffle_passages,
                seed=seed,
                split_source=data_args.split_oracle_source and data_args.resample_every_epoch,
            )
        logger.info("source %s (%s): %d records from %s", spec.name, spec.kind, len(records), spec.path)
        loaded.append(_Source(spec, records, builder))
    return loaded


def _records(source: _Source, data_args: DataArguments) -> list[dict]:
    if data_args.reasoning:
        return source.records
    return [{k: v for k, v in r.items() if k != "reasoning"} for r in source.records]


def _records_for_epoch(sources: list[_Source], data_args: DataArguments, seed: int, epoch: int) -> list[dict]:
    """Every source's records (RAFT built for ``qa`` sources for ``epoch``), mixed and tagged by source name."""
    parts = {}
    for s in sources:
        records = _records(s, data_args)
        parts[s.spec.name] = s.builder.build_all(records, epoch=epoch) if s.builder is not None else records
    mixed = mix_sources(
        parts,
        {s.spec.name: s.spec.weight for s in sources},
        num_records=data_args.num_records,
        seed=seed + epoch,
        stopping=data_args.mix_stopping,
    )
    if data_args.split_oracle_source:
        for r in mixed:
            if isinstance(r.get("oracle"), list):
                r["source"] = f"{r['source']}/{'oracle' if r['oracle'] else 'no_oracle'}"
    return mixed


def _build_model(model_args: ModelArguments, tokenizer, training_args: RagTrainingArguments):
    attn = training_args.attn_implementation if training_args.packing else None
    # float32 unless asked: from_pretrained's "auto" would train a bf16 checkpoint in bf16, with no fp32
    # master weights
    name = model_args.model_dtype or "float32"
    dtype = "auto" if name == "auto" else getattr(torch, name)
    if model_args.model_config is not None:
        config = small_config(model_args.model_config)
        config.vocab_size = len(tokenizer)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(training_args.seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn, dtype=torch.float32 if dtype == "auto" else dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, attn_implementation=attn, dtype=dtype
        )
        if Path(model_args.model_name_or_path).is_dir():  # saved adapters name their base: make it absolute
            model.name_or_path = model.config._name_or_path = str(
                Path(model_args.model_name_or_path).resolve()
            )
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            logger.warning(
                "resizing the embeddings from %d to the tokenizer's %d tokens",
                model.get_input_embeddings().num_embeddings,
                len(tokenizer),
            )
            model.resize_token_embeddings(len(tokenizer))
    logger.info("model weights in %s (model_dtype: %s)", model.dtype, name)
    if model.dtype != torch.float32 and not model_args.lora_r:
        logger.warning(
            "training every weight in %s, with no fp32 master weights: small updates may round away; for "
            "mixed precision set model_dtype float32 and bf16 true",
            model.dtype,
        )
    return model


def _add_lora(model, model_args: ModelArguments, base_dir: Path | None):
    from peft import LoraConfig

    if base_dir is not None:  # a random base: save it, so the adapter can be loaded onto it
        model.save_pretrained(base_dir)
        model.name_or_path = model.config._name_or_path = str(base_dir)
    targets = model_args.lora_target_modules
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model_quietly(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d: %d of %d parameters trainable", model_args.lora_r, trainable, total)
    return model


@dataclass
class TrainRun:
    """What :func:`run_train` returns: the trainer (model, state, logs), the final metrics, the encoding counts."""

    trainer: RagTrainer
    metrics: dict
    stats: EncodeStats


def run_train(
    model_args: ModelArguments, data_args: DataArguments, training_args: RagTrainingArguments
) -> TrainRun:
    """Build the data, tokenizer and model of a run, train with :class:`~ragkern.RagTrainer`, save.

    Writes to ``training_args.output_dir``: the model (or the LoRA adapter, plus ``base_model/`` when the base
    was built from ``model_config``), the tokenizer, and ``ragkern_run.json`` (model, data and training options, encoding
    counts, final metrics). Resumes from ``training_args.resume_from_checkpoint`` when set.
    """
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    set_seed(training_args.seed)
    sources = _load_sources(data_args, seed)
    if model_args.tokenizer_name_or_path == WORD_TOKENIZER:
        tokenizer = word_tokenizer_for(
            [s.records for s in sources] + [s.builder.texts for s in sources if s.builder is not None]
        )
    else:
        if model_args.tokenizer_name_or_path:
            path, option = model_args.tokenizer_name_or_path, "tokenizer_name_or_path"
            fix = f"give tokenizer_name_or_path {TOKENIZER_EXPECTED}"
        else:
            path, option = model_args.model_name_or_path, "model_name_or_path"
            fix = "set tokenizer_name_or_path to the model's tokenizer (a tokenizer folder or a hub id)"
        tokenizer = load_tokenizer(path, option, fix)

    if data_args.resample_every_epoch and sources[0].builder is not None:
        # RagTrainer re-draws a RaftEpochDataset every epoch (DataArguments allows one qa source for this).
        s = sources[0]
        records = _records(s, data_args)
        records = mix_sources(
            {s.spec.name: records}, {s.spec.name: 1.0}, num_records=data_args.num_records, seed=seed
        )
        dataset = RaftEpochDataset(records, s.builder, tokenizer, max_length=training_args.max_length)
    else:
        dataset = encode_records(
            _records_for_epoch(sources, data_args, seed, epoch=0),
            tokenizer,
            max_length=training_args.max_length,
            strict=training_args.strict_length,
            on_error=data_args.on_error,
            show_progress=False,
        )
    if not len(dataset):
        raise ConfigError(f"no training examples left after encoding: {dataset.stats.summary()}")

    model = _build_model(model_args, tokenizer, training_args)
    if model_args.lora_r:
        # absolute: the adapter records where its base is, and is evaluated from other folders too
        base_dir = (
            Path(training_args.output_dir).resolve() / "base_model" if model_args.model_config else None
        )
        model = _add_lora(model, model_args, base_dir if training_args.should_save else None)
    trainer = RagTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = {**result.metrics, "examples": len(dataset)}
    if trainer.is_world_process_zero():
        summary = {
            "model": dataclasses.asdict(model_args),
            "data": dataclasses.asdict(data_args),
            "training": training_args.to_dict(),
            "encoding": dataclasses.asdict(dataset.stats),
            "metrics": metrics,
        }
        out = Path(training_args.output_dir) / "ragkern_run.json"
        out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return TrainRun(trainer=trainer, metrics=metrics, stats=dataset.stats)
