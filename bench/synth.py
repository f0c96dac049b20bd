"""Synthesized RAFT data vs gold QA on the fictional domain: what `ragkern synth` yields with SmolLM2 on CPU, and
what training on it buys.

    python bench/synth.py                 # 19 min on 2 cores: 40 reagents (80 documents), 30 steps per arm
    python bench/synth.py --quick         # a smoke run: 3 reagents, 2 steps, 4 questions

The corpus is :mod:`ragkern.data.domain`'s reagent trade (``domain_world(--world-seed)``): the first-edition
documents of ``--reagents`` training reagents. Measured:

* synthesis (:func:`ragkern.synth.synthesize`, SmolLM2-135M-Instruct as the generator, default prompts and
  filters): chunks per minute (generation only, and wall time with chunking and RAFT building), questions kept
  per chunk, every filter's count;
* correctness of the kept pairs against the world's facts: the answer equals one of its document's gold values
  (``gold_exact``) or contains one as a run of words (``gold_contains``, an upper bound: the value found need not
  be the one the question asks for);
* RAFT trained on the synthesized records vs on the gold QA of the same documents (``world.qa["train"]`` of those
  reagents, RaftBuilder with the same BM25 distractors and P), LoRA on all linear layers, the same optimizer
  steps of packed ``--max-length`` rows; exact match / F1 on gold questions about held-out reagents
  (``heldout_doc``) with the oracle among ``--distractors`` BM25 distractors; ``base`` is the untrained model.

Writes ``bench/results/synth_smollm2.json`` (``--quick``: ``synth_quick.json``) with a few kept pairs as examples.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import add_training_flags, train_lora_steps, write_results  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-seed", type=int, default=0, help="the domain's seed")
    p.add_argument(
        "--reagents", type=int, default=40, help="training reagents whose documents are the corpus"
    )
    p.add_argument("--questions", type=int, default=3, help="questions asked per chunk")
    p.add_argument("--batch-size", type=int, default=16, help="synth: chunks per batch")
    p.add_argument("--distractors", type=int, default=3, help="BM25 distractors, training and evaluation")
    p.add_argument("--eval-questions", type=int, default=60, help="gold held-out questions evaluated")
    add_training_flags(p)
    p.add_argument("--seed", type=int, default=0, help="training and synthesis seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--output-dir", default="runs/synth", help="synthesized files (a rerun resumes them)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 reagents, 2 steps, 4 questions")
    p.add_argument("--no-write", action="store_true", help="do not write under bench/results (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.reagents, args.steps, args.max_length, args.eval_questions = 3, 2, 512, 4
        args.output_dir = args.output_dir if args.output_dir != "runs/synth" else "runs/synth-quick"
    args.threads = args.threads or os.cpu_count() or 1
    return args


def gold_values(world, doc_id: str) -> list[str]:
    """The facts a document states: the values of its reagent's relations stated in that kind of document."""
    from ragkern.data.domain import RELATIONS

    document = world.documents[doc_id]
    facts = world.reagents[document["reagent"]].facts
    return [facts[r] for r, (_, _, kind) in RELATIONS.items() if kind == document["kind"]]


def gold_correct(world, records: list[dict]) -> dict:
    """Shares of synthesized pairs whose answer equals (``gold_exact``) or contains (``gold_contains``) a gold
    value of its document."""
    from ragkern.evaluate import exact_match, normalize_answer

    def contains(answer: str, value: str) -> bool:
        return f" {normalize_answer(value)} " in f" {normalize_answer(answer)} "

    n = len(records)
    if not n:
        return {"pairs": 0, "gold_exact": None, "gold_contains": None}
    exact = sum(any(exact_match(r["answer"], v) for v in gold_values(world, r["doc"])) for r in records)
    inside = sum(any(contains(r["answer"], v) for v in gold_values(world, r["doc"])) for r in records)
    return {"pairs": n, "gold_exact": exact / n, "gold_contains": inside / n}


def main(argv: list[str] | None = None) -> dict:
    import logging

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragkern.data import RaftBuilder, load_records
    from ragkern.data.domain import domain_world
    from ragkern.evaluate import evaluate_answers
    from ragkern.gguf import smollm2_checkpoint
    from ragkern.synth import SynthConfig, model_generator, output_paths, synthesize
    from ragkern.trainer import get_peft_model_quietly

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    t_start, load_before = time.perf_counter(), os.getloadavg()
    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def fresh_model():
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)

    world = domain_world(args.world_seed)
    reagents = sorted(
        random.Random(f"synth-bench-{args.world_seed}").sample(world.train_reagents, args.reagents)
    )
    docs = [d for d in world.documents.values() if d["reagent"] in set(reagents) and d["edition"] == 1]
    corpus = [{"id": d["id"], "title": d["title"], "text": d["text"]} for d in docs]

    # 1. synthesize (a rerun resumes from the state file)
    model = fresh_model()
    config = SynthConfig(
        questions=args.questions,
        batch_size=args.batch_size,
        num_distractors=args.distractors,
        p_oracle=args.p_oracle,
        heldout_fraction=0.0,  # evaluation is on the gold questions of held-out reagents
        seed=args.seed,
        min_tokens=16,
    )
    out = Path(args.output_dir) / "train.jsonl"
    t0 = time.perf_counter()
    report = synthesize(
        corpus,
        out,
        tokenizer=tokenizer,
        generate=model_generator(model, tokenizer, batch_size=args.batch_size),
        config=config,
        model_name="SmolLM2-135M-Instruct",
        show_progress=True,
    )
    synth_wall = time.perf_counter() - t0
    synth_records = list(load_records(out, kinds=("raft",)))
    correct = gold_correct(world, synth_records)
    print(
        f"synth: {report['chunks']} chunks, {report['chunks_per_minute']} chunks/min, {report['kept']} kept "
        f"({report['kept_per_chunk']:.2f}/chunk), gold exact {correct['gold_exact']}, contains "
        f"{correct['gold_contains']}",
        flush=True,
    )

    # 2. the gold arm's records: world.qa["train"] of the same reagents, the same RAFT recipe over the same corpus
    gold_qa = [r for r in world.qa["train"] if r["reagent"] in set(reagents)]
    gold_builder = RaftBuilder(
        corpus, num_distractors=args.distractors, p_oracle=args.p_oracle, negatives="bm25", seed=args.seed
    )
    gold_records = gold_builder.build_all(gold_qa)

    # 3. evaluation set: gold questions about held-out reagents, oracle among BM25 distractors
    rng = random.Random(f"synth-bench-eval-{args.world_seed}")
    eval_qa = rng.sample(world.qa["heldout_doc"], min(args.eval_questions, len(world.qa["heldout_doc"])))
    eval_builder = RaftBuilder(
        world.retrieval_corpus(), num_distractors=args.distractors, p_oracle=1.0, negatives="bm25", seed=101
    )
    eval_records = eval_builder.build_all(eval_qa)

    def evaluate(m) -> dict:
        metrics = evaluate_answers(
            m, tokenizer, eval_records, batch_size=16, max_new_tokens=16, show_progress=False
        )
        return {"exact_match": metrics["exact_match"], "f1": metrics["f1"], "count": metrics["count"]}

    arms = {"base": {**evaluate(model), "train_records": 0}}
    print(f"base: EM {arms['base']['exact_match']:.3f}", flush=True)
    for name, records in (("synth", synth_records), ("gold", gold_records)):
        if not records:
            arms[name] = {"exact_match": None, "f1": None, "train_records": 0, "note": "no training records"}
            continue
        torch.manual_seed(args.seed)
        lora = LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear"
        )
        arm_model = get_peft_model_quietly(fresh_model(), lora)
        trained = train_lora_steps(
            arm_model,
            tokenizer,
            records,
            steps=args.steps,
            seed=args.seed,
            args=args,
            output_dir=Path(args.output_dir) / f"run-{name}",
        )
        arms[name] = {**evaluate(arm_model), "train_records": len(records), "train": trained}
        print(
            f"{name}: EM {arms[name]['exact_match']:.3f} ({len(records)} records, {trained['seconds']} s)",
            flush=True,
        )

    examples = [
        {k: r[k] for k in ("id", "question", "answer", "doc")} | {"gold_values": gold_values(world, r["doc"])}
        for r in synth_records[:8]
    ]
    state_lines = output_paths(out)["state"].read_text().splitlines()[1:4]
    summary = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), greedy; LoRA all-linear for the arms",
        "world_seed": args.world_seed,
        "settings": {k: v for k, v in vars(args).items()},
        "corpus": {"reagents": len(reagents), "documents": len(corpus)},
        "synth": {
            "chunks": report["chunks"],
            "chunks_generated": report["chunks_generated"],
            "chunks_per_minute": report["chunks_per_minute"],
            "chunks_per_minute_wall": round(60 * report["chunks_generated"] / synth_wall, 2)
            if report["chunks_generated"]
            else None,
            "candidates": report["candidates"],
            "kept": report["kept"],
            "kept_per_chunk": report["kept_per_chunk"],
            "dropped": report["dropped"],
            "train_records": report["train"],
            **correct,
        },
        "arms": arms,
        "gold_train_records": len(gold_records),
        "examples": examples,
        "example_state": [json.loads(line) for line in state_lines],
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    if not args.no_write:
        path = write_results("synth_quick" if args.quick else "synth_smollm2", summary)
        print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
