"""The ``ragkern`` command."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    metrics = run_demo(output_dir=args.output_dir, seed=args.seed, quick=args.quick)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=2))
    return 0


def _selftest(args: argparse.Namespace) -> int:
    from .selftest import run_selftest

    results = run_selftest(args.config)
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.name}: {r.detail}")
    return 0 if all(r.passed for r in results) else 1


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
    demo.set_defaults(func=_demo)

    selftest = sub.add_parser(
        "selftest",
        help="check packing equivalence and no leakage on a small random model of your architecture",
        description=(
            "Builds a small randomly initialised model from a config.json (or an architecture name such as "
            "llama, qwen3, mistral, gemma) with the 'ragkern' attention and checks, in fp32 on CPU, that a packed "
            "row gives the same losses and gradients as its examples one by one, and that no example sees "
            "another. Exit status 1 if a check fails."
        ),
    )
    selftest.add_argument(
        "--config", required=True, help="path to config.json (or its folder), or a model type"
    )
    selftest.set_defaults(func=_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
