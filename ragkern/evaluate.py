"""Answer accuracy of a causal LM on RAFT records: batched greedy decoding and exact match.

Generation continues from :func:`ragkern.data.render_prompt` (the rendered record up to the answer slot) and
stops at the first special token (end-of-turn or EOS) or after ``max_new_tokens``. Prompts are batched by
token length, so a batch needs no padding and the result is exact for every attention implementation.

Exact match compares SQuAD-normalised strings (lower case, punctuation and articles removed, whitespace
collapsed)::

    evaluate_answers(model, tokenizer, records, batch_size=64, max_new_tokens=8)
    -> {"exact_match": 0.91, "count": 300, "predictions": [{"index": 0, "prediction": "kel",
        "answer": "kel", "exact_match": True, "oracle": [2]}, ...]}
"""

from __future__ import annotations

import re
import string
from collections import defaultdict

import torch

from .data import render_prompt

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """True when the normalised strings are equal."""
    return normalize_answer(prediction) == normalize_answer(answer)


@torch.no_grad()
def generate_answers(
    model, tokenizer, records: list[dict], *, batch_size: int = 64, max_new_tokens: int = 16
) -> list[str]:
    """Greedy answers, one decoded string per record (special tokens dropped), in the order of ``records``.

    Each step runs the whole prefix (no KV cache): answers are short, and this keeps the path the same as
    training. Input per batch: ``input_ids`` (B, T) of B prompts with T tokens each.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1")
    stop = set(tokenizer.all_special_ids)
    by_length: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
    for i, record in enumerate(records):
        ids = tokenizer(render_prompt(record, tokenizer), add_special_tokens=False)["input_ids"]
        by_length[len(ids)].append((i, ids))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = [""] * len(records)
    try:
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                ids = torch.tensor([p for _, p in chunk], device=device)  # (B, T)
                new = torch.empty(len(chunk), 0, dtype=torch.long, device=device)  # (B, generated)
                done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
                for _ in range(max_new_tokens):
                    logits = model(input_ids=torch.cat([ids, new], dim=1)).logits[:, -1]  # (B, V)
                    nxt = logits.argmax(-1)
                    new = torch.cat([new, nxt[:, None]], dim=1)
                    done |= torch.tensor([int(t) in stop for t in nxt], device=device)
                    if bool(done.all()):
                        break
                for (i, _), row in zip(chunk, new.tolist()):
                    cut = next((k for k, t in enumerate(row) if t in stop), len(row))
                    answers[i] = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


def evaluate_answers(
    model, tokenizer, records: list[dict], *, batch_size: int = 64, max_new_tokens: int = 16
) -> dict:
    """Exact-match accuracy of greedy answers on RAFT records.

    Returns ``{"exact_match": float in [0, 1], "count": int, "predictions": list[dict]}``; each prediction
    holds the record's ``index``, the ``prediction``, the reference ``answer``, ``exact_match`` and the
    record's ``oracle`` indices (or None), so callers can split results by record properties.
    """
    if not records:
        raise ValueError("evaluate_answers needs at least one record")
    answers = generate_answers(
        model, tokenizer, records, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    predictions = [
        {
            "index": i,
            "prediction": pred,
            "answer": r["answer"],
            "exact_match": exact_match(pred, r["answer"]),
            "oracle": r.get("oracle"),
        }
        for i, (r, pred) in enumerate(zip(records, answers))
    ]
    correct = sum(p["exact_match"] for p in predictions)
    return {"exact_match": correct / len(records), "count": len(records), "predictions": predictions}
