"""Turn one record into a tokenized training example.

A RAFT record ``{"question", "passages", "answer"}`` is rendered once (through the tokenizer's chat template
when it has one, else the plain template below), tokenized once with character offsets, and every token is
assigned to its part by character span::

    text     <s><|user|> Passages: [1] t: alpha ... [2] beta ... Question: q? <|end|> <|assistant|> a <|end|>
    labels   -100 ....................................................................... a   <|end|>
    block_ids 0 0 ...    1 1 1 1 1 ...       2 2 2 ...    0 0 0 ...........................  0   0

Only the answer and the end-of-turn (or EOS) token that closes it carry loss. ``block_ids`` is k for the
tokens of passage k (1-based) and 0 elsewhere; it is used only when block attention is asked for.

Plain template (tokenizers without a chat template)::

    Passages:
    [1] Title: text
    [2] text

    Question: <question>
    Answer: <answer></s>

A DAP record ``{"text"}`` is tokenized as is, EOS appended, and every token is a target.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE_INDEX = -100


class RecordError(ValueError):
    """A record that cannot be turned into a training example; the message names the record and field."""

    def __init__(self, message: str, *, field: str | None = None, record: Any = None):
        self.field = field
        self.record_id = record.get("id") if isinstance(record, dict) else None
        where = f"record {self.record_id!r}: " if self.record_id is not None else ""
        super().__init__(where + message)


class ExampleTooLongError(RecordError):
    """The encoded example is longer than ``max_length`` (the caller decides: drop and count, or fail)."""

    def __init__(self, message: str, *, length: int, record: Any = None):
        self.length = length
        super().__init__(message, field=None, record=record)


def record_kind(record: dict) -> str:
    """``"raft"`` for ``{"question", "passages", "answer"}``, ``"dap"`` for ``{"text"}``."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a dict, got {type(record).__name__}")
    if "question" in record:
        return "raft"
    if "text" in record:
        return "dap"
    raise RecordError(
        f"unknown record format with fields {sorted(record)}: expected a RAFT record "
        '{"question", "passages", "answer"} or a DAP record {"text"}',
        record=record,
    )


def _string_field(record: dict, name: str) -> str:
    if name not in record or record[name] is None:
        raise RecordError(f"missing field {name!r}", field=name, record=record)
    value = record[name]
    if not isinstance(value, str):
        raise RecordError(
            f"field {name!r} must be a string, got {type(value).__name__}", field=name, record=record
        )
    if not value.strip():
        raise RecordError(f"field {name!r} is empty", field=name, record=record)
    return value


def _passage_texts(record: dict) -> list[str]:
    passages = record.get("passages")
    if not isinstance(passages, list) or not passages:
        raise RecordError(
            "field 'passages' must be a non-empty list of strings or {'title', 'text'} dicts",
            field="passages",
            record=record,
        )
    out = []
    for i, p in enumerate(passages):
        if isinstance(p, str):
            text = p
        elif isinstance(p, dict) and isinstance(p.get("text"), str):
            title = p.get("title")
            if title is not None and not isinstance(title, str):
                raise RecordError(
                    f"passages[{i}].title must be a string", field=f"passages[{i}].title", record=record
                )
            text = f"{title}: {p['text']}" if title else p["text"]
        else:
            raise RecordError(
                f"passages[{i}] must be a string or a dict with a string 'text', got {type(p).__name__}",
                field=f"passages[{i}]",
                record=record,
            )
        if not text.strip():
            raise RecordError(f"passages[{i}] is empty", field=f"passages[{i}]", record=record)
        out.append(f"[{i + 1}] {text}")
    return out


def _render_raft(record: dict, tokenizer) -> tuple[str, str, str, list[str]]:
    """Return (prompt, text, answer, formatted passages); ``text`` is the full training text."""
    question = _string_field(record, "question")
    answer = _string_field(record, "answer")
    passages = _passage_texts(record)
    user = "Passages:\n" + "\n".join(passages) + "\n\nQuestion: " + question
    if not getattr(tokenizer, "chat_template", None):
        prompt = user + "\nAnswer: "
        return prompt, prompt + answer, answer, passages
    messages = []
    if record.get("system") is not None:
        messages.append({"role": "system", "content": _string_field(record, "system")})
    messages.append({"role": "user", "content": user})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not text.startswith(prompt):
        raise RecordError(
            "the chat template renders the conversation so that it does not start with the prompt it renders "
            "for generation; ragkern cannot locate the answer (use a template whose turns are appended)",
            record=record,
        )
    return prompt, text, answer, passages


def render_prompt(record: dict, tokenizer) -> str:
    """The rendered text of a RAFT record up to the answer slot (what generation continues from)."""
    return _render_raft(record, tokenizer)[0]


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("ragkern needs a fast tokenizer (character offsets); load it with use_fast=True")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos_token: set tokenizer.eos_token (the answer must end with a stop token)"
        )


def _spans_mask(starts: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Tokens whose character span overlaps [lo, hi)."""
    return (ends > lo) & (starts < hi) & (ends > starts)


def _encode_raft(record: dict, tokenizer) -> dict:
    prompt, text, answer, passages = _render_raft(record, tokenizer)
    chat = bool(getattr(tokenizer, "chat_template", None))
    a0 = text.find(answer, len(prompt))
    if a0 < 0:
        raise RecordError(
            "the chat template altered the answer text; cannot locate it", field="answer", record=record
        )
    a1 = a0 + len(answer)

    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]

    labels = np.full_like(ids, IGNORE_INDEX)
    target = _spans_mask(starts, ends, a0, a1)
    if not target.any():
        raise RecordError("the answer produced no tokens", field="answer", record=record)
    labels[target] = ids[target]
    last = int(np.nonzero(target)[0][-1])
    special = set(tokenizer.all_special_ids)
    if not chat:
        ids = np.append(ids, tokenizer.eos_token_id)
        labels = np.append(labels, tokenizer.eos_token_id)
    elif last + 1 < len(ids) and int(ids[last + 1]) in special:
        labels[last + 1] = ids[last + 1]  # the end-of-turn token: the model must learn to stop
    else:
        raise RecordError(
            "the chat template puts no special end-of-turn token right after the answer; "
            "ragkern needs one to teach the model to stop",
            record=record,
        )

    block_ids = np.zeros(len(ids), dtype=np.int64)
    search_from = 0
    for k, p in enumerate(passages, start=1):
        p0 = text.find(p, search_from)
        if p0 < 0 or p0 >= a0:
            raise RecordError(
                f"the chat template altered passage {k}; cannot locate it", field="passages", record=record
            )
        p1 = p0 + len(p)
        search_from = p1
        block_ids[: len(starts)][_spans_mask(starts, ends, p0, p1)] = k
    return {
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "block_ids": block_ids.tolist(),
        "source": record.get("source", "raft"),
    }


def _encode_dap(record: dict, tokenizer) -> dict:
    text = _string_field(record, "text")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return {
        "input_ids": ids,
        "labels": list(ids),
        "block_ids": [0] * len(ids),
        "source": record.get("source", "dap"),
    }


def encode(record: dict, tokenizer, *, max_length: int | None = None) -> dict:
    """Encode one record into ``{"input_ids", "labels", "block_ids", "source"}`` (lists of ints, a str).

    RAFT records: labels are -100 everywhere but the answer and its end-of-turn/EOS token; ``block_ids[t] = k``
    for tokens of passage k. DAP records: every token is a target, ``block_ids`` all 0.

    Raises:
        RecordError: a missing, empty or mistyped field (the message names it and the record's ``id``).
        ExampleTooLongError: the example has more than ``max_length`` tokens.
        ValueError: the tokenizer is not fast or has no EOS token.
    """
    _check_tokenizer(tokenizer)
    kind = record_kind(record)
    example = _encode_raft(record, tokenizer) if kind == "raft" else _encode_dap(record, tokenizer)
    n = len(example["input_ids"])
    if max_length is not None and n > max_length:
        raise ExampleTooLongError(
            f"{kind} example has {n} tokens > max_length={max_length}", length=n, record=record
        )
    return example
