"""Answer quality of a causal LM on RAFT records: batched greedy decoding, exact match, token F1, citations.

Generation continues from :func:`ragkern.data.render_prompt` (the rendered record up to the answer slot) and
stops at the first special token (end-of-turn or EOS) or after ``max_new_tokens``. Prompts are sorted by token
length and decoded in left-padded batches with a KV cache, as ``model.generate`` does (greedy).

Scoring, per record:

* the answer is the text after the last ``Answer:`` of the generation (a model trained on ``reasoning``
  targets writes ``<reasoning>\\n\\nAnswer: <answer>``, see :func:`ragkern.data.encode.raft_target`), else the
  whole generation;
* exact match and token F1 compare SQuAD-normalised answers (lower case, punctuation and articles removed,
  whitespace tokens) with citation markers ``[k]`` removed first: citing is scored apart;
* ``cites_oracle``: the generation (reasoning included) quotes the marker of an oracle passage (``[k]`` with
  ``k - 1`` in ``oracle``; passages are numbered from 1 in the prompt);
* the split: ``oracle_present`` (``oracle`` non-empty, or ``source`` tagged ``.../oracle`` by
  ``RaftBuilder(split_source=True)``), ``distractors_only`` (``"oracle": []`` or ``.../no_oracle``), else
  ``unlabelled``.

::

    evaluate_answers(model, tokenizer, records, batch_size=64, max_new_tokens=8)
    -> {"exact_match": 0.61, "f1": 0.70, "count": 300, "cite_oracle": 0.82,
        "splits": {"oracle_present": {"count": 240, "exact_match": 0.7, "f1": 0.79, "cite_oracle": 0.82},
                   "distractors_only": {"count": 60, "exact_match": 0.25, "f1": 0.33, "cite_oracle": None}},
        "predictions": [{"index": 0, "prediction": "kel", "generated": "kel [2]", "answer": "kel",
                         "exact_match": True, "f1": 1.0, "oracle": [1], "split": "oracle_present",
                         "cites_oracle": True}, ...]}
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .data import render_prompt
from .data.encode import raft_target
from .modeling import forward_names

ORACLE_PRESENT, DISTRACTORS_ONLY, UNLABELLED = "oracle_present", "distractors_only", "unlabelled"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
# Citation markers as the encoder numbers passages ("[2]"); a word-level decode spaces them ("[ 2 ]").
_MARKER = re.compile(r"\[\s*(\d+)\s*\]")


def _answer_pattern() -> re.Pattern:
    """What separates reasoning from answer in a reasoning target ("Answer:", taken from ``raft_target``),
    matched in any case and with any spacing between its word and its colon (a word-level decode gives
    "answer :")."""
    separator = raft_target({"reasoning": "r", "answer": "a"})[1:-1].strip()
    return re.compile(r"\s*".join(map(re.escape, re.findall(r"\w+|[^\w\s]", separator))), re.IGNORECASE)


_ANSWER = _answer_pattern()


def split_reasoning(generated: str) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a generation: the text before and after the last "Answer:" (stripped);
    ``(None, all of it)`` when there is no "Answer:"."""
    marks = list(_ANSWER.finditer(generated))
    if not marks:
        return None, generated.strip()
    return generated[: marks[-1].start()].strip(), generated[marks[-1].end() :].strip()


def parse_answer(generated: str) -> str:
    """The answer in a generation: the text after the last "Answer:", else all of it (stripped)."""
    return split_reasoning(generated)[1]


def cited_markers(text: str) -> set[int]:
    """The passage markers ``[k]`` (1-based) quoted in ``text``."""
    return {int(k) for k in _MARKER.findall(text)}


def normalize_answer(text: str) -> str:
    """SQuAD normalisation with citation markers removed: lower case, no ``[k]`` markers, no punctuation, no
    articles, single spaces."""
    text = _MARKER.sub(" ", text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> bool:
    """True when the normalised strings are equal."""
    return normalize_answer(prediction) == normalize_answer(answer)


def f1_score(prediction: str, answer: str) -> float:
    """SQuAD token F1 between normalised whitespace tokens (1.0 when both are empty, 0.0 when one is)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def oracle_split(record: dict) -> str:
    """``"oracle_present"``, ``"distractors_only"`` or ``"unlabelled"`` (see the module docstring)."""
    oracle, source = record.get("oracle"), record.get("source")
    tag = source.rsplit("/", 1)[-1] if isinstance(source, str) and "/" in source else None
    if oracle == [] or (oracle is None and tag == "no_oracle"):
        return DISTRACTORS_ONLY
    if oracle or tag == "oracle":
        return ORACLE_PRESENT
    return UNLABELLED


def stop_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Token ids that end an answer: every special token of ``tokenizer`` (the chat template's end-of-turn token
    is one, e.g. ChatML's ``<|im_end|>``), its EOS, and the EOS id(s) of the model's generation config."""
    stop = set(tokenizer.all_special_ids)
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop.update([eos] if isinstance(eos, int) else (eos or []))
    return stop


def prompt_text(record: dict, tokenizer) -> str:
    """The text generation continues from: a RAFT record's rendered prompt (:func:`ragkern.data.render_prompt`),
    or a chat record's ``messages`` up to (without) its last assistant turn, with the generation prompt."""
    if "messages" not in record:
        return render_prompt(record, tokenizer)
    messages = list(record["messages"])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"record {record.get('id')!r}: a chat record needs user turns and a tokenizer with a chat template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def _greedy_batch(
    model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int, stop: set[int], pad_id: int
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` in one batch: left padding, a KV cache, one token per step.

    Prefill runs ``input_ids`` (B, T) left-padded with ``attention_mask`` (B, T) and ``position_ids`` counting
    real tokens only, so every prompt sees the positions it would see alone; each decoding step runs (B, 1).
    A row that has stopped keeps decoding ``pad_id`` (its output is cut at the stop token); the batch ends when
    every row has stopped or after ``max_new_tokens``.
    """
    device = next(model.parameters()).device
    cache_name, keep = forward_names(model)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T): 0.. over each prompt's real tokens
    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if keep else {}
    out = torch.empty(len(prompts), 0, dtype=torch.long, device=device)  # (B, generated)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    step_ids = ids
    for _ in range(max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_name: cache},
            **extra,
        ).logits[:, -1]  # (B, V)
        nxt = logits.argmax(-1).masked_fill(done, pad_id)  # (B,)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, stop_ids)
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return out.tolist()


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    records: list[dict],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    show_progress: bool = True,
    block_attention: bool = False,
) -> list[str]:
    """Greedy answers, one decoded string per record (special tokens dropped), in the order of ``records``.

    Decoding is at ``model.generate`` speed: prompts (:func:`prompt_text`: RAFT records, or chat records'
    ``messages`` up to the last assistant turn) are sorted by token
    length, longest first, and decoded ``batch_size`` at a time, left-padded, with a KV cache. Each answer stops
    at the first stop token (:func:`stop_token_ids`: the end-of-turn token, EOS, any special token) or after
    ``max_new_tokens``. Greedy answers are those of ``model.generate(do_sample=False)`` with the same stop
    tokens and the same batches, on any attention implementation that honours a padding mask (eager, sdpa and
    "ragkern" are tested); in half precision a near-tie can flip with the batch a prompt is padded into.
    A progress bar over the records (over the batches with ``block_attention``) goes to stderr unless
    ``show_progress=False``.

    ``block_attention=True`` answers as a model trained with ``block_attention=True`` was trained: under the
    passage block mask (each passage sees only itself; generated tokens are block 0), the prompts of equal
    length packed ``batch_size`` at a time into one row, the whole prefix run at every step (no KV cache; the
    model must be on the "ragkern" attention). :mod:`ragkern.inference` reuses cached passages instead.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1")
    stop = stop_token_ids(model, tokenizer)
    if block_attention:
        return _block_masked_answers(
            model, tokenizer, records, batch_size, max_new_tokens, stop, show_progress
        )
    prompts = [tokenizer(prompt_text(r, tokenizer), add_special_tokens=False)["input_ids"] for r in records]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: peak memory up front
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    was_training = model.training
    model.eval()
    answers: list[str] = [""] * len(records)
    try:
        with tqdm(total=len(records), desc="generating", unit="prompt", disable=not show_progress) as bar:
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                rows = _greedy_batch(
                    model,
                    [prompts[i] for i in chunk],
                    max_new_tokens=max_new_tokens,
                    stop=stop,
                    pad_id=pad_id,
                )
                for i, row in zip(chunk, rows):
                    cut = next((k for k, t in enumerate(row) if t in stop), len(row))
                    answers[i] = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return answers


def _block_masked_answers(
    model,
    tokenizer,
    records: list[dict],
    batch_size: int,
    max_new_tokens: int,
    stop: set[int],
    show_progress: bool,
) -> list[str]:
    """:func:`generate_answers` with ``block_attention=True``: equal-length prompts packed into one row per
    batch, ``input_ids`` (B, T) and ``block_ids`` (B, T), the whole prefix under the block mask at every step."""
    if getattr(model.config, "_attn_implementation", None) != "ragkern":
        raise ValueError(
            "block_attention=True needs the model on the 'ragkern' attention (the block mask is applied there); "
            "call model.set_attn_implementation('ragkern')"
        )
    by_length: dict[int, list[tuple[int, list[int], list[int]]]] = defaultdict(list)
    for i, record in enumerate(records):
        ids, blocks = _prompt_blocks(record, tokenizer, i)
        by_length[len(ids)].append((i, ids, blocks))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = [""] * len(records)
    batches = [g[s : s + batch_size] for g in by_length.values() for s in range(0, len(g), batch_size)]
    try:
        for chunk in tqdm(batches, desc="generating", unit="batch", disable=not show_progress):
            ids = torch.tensor([p for _, p, _ in chunk], device=device)  # (B, T)
            blocks = torch.tensor([b for _, _, b in chunk], dtype=torch.int32, device=device)  # (B, T)
            new = torch.empty(len(chunk), 0, dtype=torch.long, device=device)  # (B, generated)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                logits = _block_masked_logits(model, torch.cat([ids, new], dim=1), blocks)  # (B, V)
                nxt = logits.argmax(-1)
                new = torch.cat([new, nxt[:, None]], dim=1)
                done |= torch.tensor([int(t) in stop for t in nxt], device=device)
                if bool(done.all()):
                    break
            for (i, _, _), row in zip(chunk, new.tolist()):
                cut = next((k for k, t in enumerate(row) if t in stop), len(row))
                answers[i] = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


def _prompt_blocks(record: dict, tokenizer, index: int) -> tuple[list[int], list[int]]:
    """A record's prompt tokens (up to the answer slot) and their passage block ids, as in training."""
    from .data import encode

    ex = encode(record, tokenizer)
    cut = next((j for j, lab in enumerate(ex["labels"]) if lab != -100), None)
    if cut is None:
        raise ValueError(f"record {index} has no answer tokens to evaluate")
    return ex["input_ids"][:cut], ex["block_ids"][:cut]


def _block_masked_logits(model, ids: torch.Tensor, prompt_blocks: torch.Tensor) -> torch.Tensor:
    """Last-position logits ``(B, V)`` of B equal-length sequences ``ids`` (B, T') packed into one row under
    the passage block mask; ``prompt_blocks`` (B, T) covers the prompts, later tokens are block 0."""
    b, t = ids.shape
    blocks = torch.zeros(b, t, dtype=torch.int32, device=ids.device)
    blocks[:, : prompt_blocks.shape[1]] = prompt_blocks
    cu = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=ids.device)  # (B + 1,)
    logits = model(
        input_ids=ids.reshape(1, -1),
        position_ids=torch.arange(t, device=ids.device).repeat(b)[None],
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=t,
        max_length_k=t,
        block_ids=blocks.reshape(1, -1),
        use_cache=False,  # the whole prefix runs at every step: a cache would only hold memory
    ).logits[0]  # (B * T', V)
    return logits[cu[1:].long() - 1]


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(predictions: list[dict]) -> dict:
    cites = [p["cites_oracle"] for p in predictions if p["cites_oracle"] is not None]
    return {
        "count": len(predictions),
        "exact_match": _mean([float(p["exact_match"]) for p in predictions]),
        "f1": _mean([p["f1"] for p in predictions]),
        "cite_oracle": _mean([float(c) for c in cites]),
    }


def score_predictions(records: list[dict], generated: list[str]) -> dict:
    """Score generations against RAFT records (no model needed); the result of :func:`evaluate_answers`.

    Returns ``{"exact_match", "f1", "count", "cite_oracle", "splits": {split: {"count", "exact_match", "f1",
    "cite_oracle"}}, "predictions": [...]}``. Means are None over no records; ``cite_oracle`` is the fraction of
    records with known oracle indices whose generation cites one of them. ``splits`` always holds
    ``oracle_present`` and ``distractors_only``, and ``unlabelled`` when some records carry neither.
    """
    if len(records) != len(generated):
        raise ValueError(f"{len(records)} records but {len(generated)} generations")
    predictions = []
    for i, (record, text) in enumerate(zip(records, generated)):
        answer, oracle = parse_answer(text), record.get("oracle")
        predictions.append(
            {
                "index": i,
                "prediction": answer,
                "generated": text,
                "answer": record["answer"],
                "exact_match": exact_match(answer, record["answer"]),
                "f1": f1_score(answer, record["answer"]),
                "oracle": oracle,
                "split": oracle_split(record),
                "cites_oracle": bool(cited_markers(text) & {k + 1 for k in oracle}) if oracle else None,
            }
        )
    splits = [ORACLE_PRESENT, DISTRACTORS_ONLY]
    if any(p["split"] == UNLABELLED for p in predictions):
        splits.append(UNLABELLED)
    return {
        **_summary(predictions),
        "splits": {s: _summary([p for p in predictions if p["split"] == s]) for s in splits},
        "predictions": predictions,
    }


def evaluate_answers(
    model,
    tokenizer,
    records: list[dict],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    show_progress: bool = True,
    block_attention: bool = False,
) -> dict:
    """Greedy answers on RAFT records, scored by :func:`score_predictions` (exact match, token F1, citation of
    the oracle, each overall and per oracle split); every prediction holds the record's ``index``, the
    parsed ``prediction``, the raw ``generated`` text, the reference ``answer``, its scores, ``oracle`` and
    ``split``. ``block_attention=True`` decodes under the passage block mask (see :func:`generate_answers`).
    A progress bar goes to stderr unless ``show_progress=False``."""
    if not records:
        raise ValueError("evaluate_answers needs at least one record")
    generated = generate_answers(
        model,
        tokenizer,
        records,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        show_progress=show_progress,
        block_attention=block_attention,
    )
    return score_predictions(records, generated)


def format_metrics(metrics: dict) -> str:
    """A text table of :func:`evaluate_answers`' metrics: one row overall and one per split."""

    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    rows = [("all", metrics)] + [(name.replace("_", " "), m) for name, m in metrics["splits"].items()]
    lines = [f"{'split':<18}{'count':>7}{'EM':>8}{'F1':>8}{'cites oracle':>14}"]
    for name, m in rows:
        lines.append(
            f"{name:<18}{m['count']:>7}{cell(m['exact_match']):>8}{cell(m['f1']):>8}{cell(m['cite_oracle']):>14}"
        )
    return "\n".join(lines)
