"""Turn one record into a tokenized training example.

A RAFT record ``{"question", "passages", "answer"}`` is rendered once (through the tokenizer's chat template
when it has one, else the plain template below), tokenized once with character offsets, and every token is
assigned to its part by character span::

    text     <s><|user|> Passages: [1] t: alpha ... [2] beta ... Question: q? <|end|> <|assistant|> a <|end|>
    labels   -100 ....................................................................... a   <|end|>
    block_ids 0 0 ...    1 1 1 1 1 ...       2 2 2 ...    0 0 0 ...........................  0   0

Only the answer and the end-of-turn (or EOS) token that closes it carry loss. With a ``reasoning`` field the
assistant turn is ``<reasoning>\n\nAnswer: <answer>`` and all of it (reasoning and answer) carries loss.
``oracle`` (optional) lists the 0-based indices of the passages that hold the answer; markers are 1-based. ``block_ids`` is k for the
tokens of passage k (1-based) and 0 elsewhere; it is used only when block attention is asked for.

Plain template (tokenizers without a chat template)::

    Passages:
    [1] Title: text
    [2] text

    Question: <question>
    Answer: <answer></s>

A DAP record ``{"text"}`` is tokenized as is, EOS appended, and every token is a target.

An instruction record ``{"messages": [{"role", "content"}, ...]}`` is rendered with the chat template; the content
of every assistant turn and the end-of-turn token after it carry loss. ``{"prompt", "completion"}`` (TRL's
convention) with strings is ``prompt + completion + EOS`` and only the completion and EOS carry loss; with lists
of messages it is the conversation ``prompt + completion`` and only the completion's assistant turns carry loss.
"""

from __future__ import annotations

from dataclasses import dataclass
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


ROLES = ("system", "user", "assistant", "tool")


def present_fields(record):
    """The record without its None-valued fields, which count as absent.

    A ``datasets.Dataset`` holding several record kinds has the union of their columns, and fills the fields
    a row lacks with None: a chat row reads ``{"messages": [...], "question": None, "passages": None, ...}``.
    """
    if isinstance(record, dict) and any(v is None for v in record.values()):
        return {k: v for k, v in record.items() if v is not None}
    return record


def record_kind(record: dict) -> str:
    """The format of a record, from its fields (a None field counts as absent).

    ``"raft"``: ``{"question", "passages", "answer"}``; ``"qa"``: ``{"question", "answer", "oracle_passages"}``
    (RAFT examples are built from it and a corpus); ``"instruct"``: ``{"messages"}`` or
    ``{"prompt", "completion"}``; ``"dap"``: ``{"text"}``.
    """
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a dict, got {type(record).__name__}")
    record = present_fields(record)
    if "messages" in record or ("prompt" in record and "completion" in record):
        return "instruct"
    if "question" in record:
        return "qa" if "oracle_passages" in record and "passages" not in record else "raft"
    if "text" in record:
        return "dap"
    raise RecordError(
        f"unknown record format with fields {sorted(record)}: expected a RAFT record "
        '{"question", "passages", "answer"}, a QA record {"question", "answer", "oracle_passages"}, an instruction '
        'record {"messages"} or {"prompt", "completion"}, or a DAP record {"text"}',
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


def passage_text(p, *, field: str, record: dict | None = None) -> str:
    """The text of one passage (a string, or ``{"title", "text"}`` rendered as ``"title: text"``)."""
    if isinstance(p, str):
        text = p
    elif isinstance(p, dict) and isinstance(p.get("text"), str):
        title = p.get("title")
        if title is not None and not isinstance(title, str):
            raise RecordError(f"{field}.title must be a string", field=f"{field}.title", record=record)
        text = f"{title}: {p['text']}" if title else p["text"]
    else:
        raise RecordError(
            f"{field} must be a string or a dict with a string 'text', got {type(p).__name__}",
            field=field,
            record=record,
        )
    if not text.strip():
        raise RecordError(f"{field} is empty", field=field, record=record)
    return text


def _passage_list(record: dict, name: str = "passages") -> list:
    passages = record.get(name)
    if not isinstance(passages, list) or not passages:
        raise RecordError(
            f"field {name!r} must be a non-empty list of strings or {{'title', 'text'}} dicts",
            field=name,
            record=record,
        )
    return passages


def oracle_indices(record: dict, num_passages: int) -> list[int] | None:
    """The record's ``oracle`` field checked: 0-based passage indices, or None when the field is absent."""
    oracle = record.get("oracle")
    if oracle is None:
        return None
    if not isinstance(oracle, list):
        raise RecordError(
            f"field 'oracle' must be a list of passage indices, got {type(oracle).__name__}",
            field="oracle",
            record=record,
        )
    for i, k in enumerate(oracle):
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_passages:
            raise RecordError(
                f"oracle[{i}] = {k!r} is not a passage index in [0, {num_passages}) (0-based)",
                field=f"oracle[{i}]",
                record=record,
            )
    return list(oracle)


def _passage_texts(record: dict, markers: list[int] | None = None) -> list[str]:
    passages = _passage_list(record)
    markers = markers or list(range(1, len(passages) + 1))
    out = []
    for i, p in enumerate(passages):
        out.append(f"[{markers[i]}] {passage_text(p, field=f'passages[{i}]', record=record)}")
    return out


def raft_target(record: dict) -> str:
    """The assistant text of a RAFT record: the answer, or ``reasoning + "\n\nAnswer: " + answer``."""
    answer = _string_field(record, "answer")
    if record.get("reasoning") is None:
        return answer
    return _string_field(record, "reasoning") + "\n\nAnswer: " + answer


def _render_raft(
    record: dict, tokenizer, markers: list[int] | None = None
) -> tuple[str, str, str, list[str]]:
    """Return (prompt, text, target, formatted passages); ``text`` is the full training text."""
    question = _string_field(record, "question")
    answer = raft_target(record)
    passages = _passage_texts(record, markers)
    oracle_indices(record, len(passages))
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


def _stop_token_label(ids, labels, last: int, special: set, record: dict, text: str, starts, ends) -> None:
    """Make the end-of-turn token after position ``last`` a target, with any whitespace-only tokens between
    (byte-level BPE renders ``"content <|end|>"`` as content, ``" "``, ``<|end|>``: all must be generated)."""
    j = last + 1
    while (
        j < len(ids)
        and int(ids[j]) not in special
        and ends[j] > starts[j]
        and not text[starts[j] : ends[j]].strip()
    ):
        j += 1
    if j < len(ids) and int(ids[j]) in special:
        labels[last + 1 : j + 1] = ids[
            last + 1 : j + 1
        ]  # the end-of-turn token: the model must learn to stop
        return
    raise RecordError(
        "the chat template puts no special end-of-turn token right after the assistant text; "
        "ragkern needs one to teach the model to stop",
        record=record,
    )


def _tokenize_raft(record: dict, tokenizer, markers: list[int] | None = None):
    """Encode a RAFT record; also return (text, token starts, token ends, passage char spans)."""
    prompt, text, answer, passages = _render_raft(record, tokenizer, markers)
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
    if not chat:
        ids = np.append(ids, tokenizer.eos_token_id)
        labels = np.append(labels, tokenizer.eos_token_id)
    else:
        _stop_token_label(ids, labels, last, set(tokenizer.all_special_ids), record, text, starts, ends)

    block_ids = np.zeros(len(ids), dtype=np.int64)
    real = np.nonzero(ends > starts)[0]  # tokens with text, in text order (special tokens have empty spans)
    spans, search_from = [], 0
    for k, p in enumerate(passages, start=1):
        p0 = text.find(p, search_from)
        if p0 < 0 or p0 >= a0:
            raise RecordError(
                f"the chat template altered passage {k}; cannot locate it", field="passages", record=record
            )
        p1 = p0 + len(p)
        search_from = p1
        spans.append((p0, p1))
        # The marker "[k] " stays in block 0, so a passage's keys and values (block attention) do not depend on
        # the number the prompt gives it: one cache serves the passage at any position.
        body = p0 + p.index("] ") + 2
        # Tokens overlapping [body, p1): a binary search, not a scan (records may hold thousands of passages).
        first = np.searchsorted(ends[real], body, side="right")
        last = np.searchsorted(starts[real], p1, side="left")
        block_ids[real[first:last]] = k
    example = {
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "block_ids": block_ids.tolist(),
        "source": record.get("source", "raft"),
    }
    return example, text, starts, ends, spans


def _encode_raft(record: dict, tokenizer, markers: list[int] | None = None) -> dict:
    return _tokenize_raft(record, tokenizer, markers)[0]


def _encode_dap(record: dict, tokenizer) -> dict:
    text = _string_field(record, "text")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return {
        "input_ids": ids,
        "labels": list(ids),
        "block_ids": [0] * len(ids),
        "source": record.get("source", "dap"),
    }


def _messages(record: dict, name: str) -> list[dict]:
    messages = record.get(name)
    if not isinstance(messages, list) or not messages:
        raise RecordError(
            f"field {name!r} must be a non-empty list of {{'role', 'content'}} dicts",
            field=name,
            record=record,
        )
    for i, m in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{where} must be a dict, got {type(m).__name__}", field=where, record=record)
        if m.get("role") not in ROLES:
            raise RecordError(
                f"{where}.role = {m.get('role')!r} is not one of {ROLES}",
                field=f"{where}.role",
                record=record,
            )
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise RecordError(
                f"{where}.content must be a non-empty string", field=f"{where}.content", record=record
            )
    return messages


def _instruct_parts(record: dict) -> tuple[list[dict] | None, int, str | None, str | None]:
    """(messages, index of the first turn that may carry loss, prompt, completion): messages for chats,
    prompt/completion strings for TRL's plain-text form."""
    if "messages" in record:
        messages = _messages(record, "messages")
        start = 0
    elif isinstance(record.get("prompt"), list) or isinstance(record.get("completion"), list):
        prompt, completion = _messages(record, "prompt"), _messages(record, "completion")
        messages, start = [*prompt, *completion], len(prompt)
    else:
        return None, 0, _string_field(record, "prompt"), _string_field(record, "completion")
    if not any(m["role"] == "assistant" for m in messages[start:]):
        field = "messages" if "messages" in record else "completion"
        raise RecordError("no assistant turn to train on", field=field, record=record)
    return messages, start, None, None


def _encode_instruct(record: dict, tokenizer) -> dict:
    messages, start, prompt, completion = _instruct_parts(record)
    chat = bool(getattr(tokenizer, "chat_template", None))
    if messages is None:  # plain prompt + completion + EOS; only the completion and EOS are targets
        text, spans = prompt + completion, [(len(prompt), len(prompt) + len(completion))]
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    else:
        if not chat:
            raise RecordError(
                "conversational records need a tokenizer with a chat template (set tokenizer.chat_template)",
                field="messages",
                record=record,
            )
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i in range(start, len(messages)):
            if messages[i]["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            c0 = upto.find(messages[i]["content"], len(before))
            if not upto.startswith(before) or not text.startswith(upto) or c0 < 0:
                raise RecordError(
                    f"the chat template does not render turn {i} as an appended turn holding its content "
                    "unchanged; ragkern cannot locate the assistant text",
                    field=f"messages[{i}]",
                    record=record,
                )
            spans.append((c0, c0 + len(messages[i]["content"])))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    labels = np.full_like(ids, IGNORE_INDEX)
    special = set(tokenizer.all_special_ids)
    for c0, c1 in spans:
        target = _spans_mask(offsets[:, 0], offsets[:, 1], c0, c1)
        if not target.any():
            raise RecordError("an assistant turn produced no tokens", record=record)
        labels[target] = ids[target]
        if messages is not None:
            _stop_token_label(
                ids,
                labels,
                int(np.nonzero(target)[0][-1]),
                special,
                record,
                text,
                offsets[:, 0],
                offsets[:, 1],
            )
    if messages is None:
        ids = np.append(ids, tokenizer.eos_token_id)
        labels = np.append(labels, tokenizer.eos_token_id)
    return {
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "block_ids": [0] * len(ids),
        "source": record.get("source", "instruct"),
    }


def validate_record(record: dict) -> str:
    """Check a record's fields without tokenizing it; return its kind (see :func:`record_kind`).

    Raises:
        RecordError: a missing, empty or mistyped field, an unknown role, an oracle index out of range.
    """
    record = present_fields(record)
    kind = record_kind(record)
    if kind == "raft":
        raft_target(record)
        _string_field(record, "question")
        oracle_indices(record, len(_passage_texts(record)))
    elif kind == "qa":
        _string_field(record, "question")
        raft_target(record)
        for i, p in enumerate(_passage_list(record, "oracle_passages")):
            passage_text(p, field=f"oracle_passages[{i}]", record=record)
    elif kind == "instruct":
        _instruct_parts(record)
    else:
        _string_field(record, "text")
    return kind


@dataclass
class FitReport:
    """What :func:`fit_raft` did to make a RAFT example fit ``max_length``."""

    dropped_distractors: int = 0
    truncated_passages: int = 0

    @property
    def trimmed(self) -> bool:
        return bool(self.dropped_distractors or self.truncated_passages)


def fit_raft(record: dict, tokenizer, max_length: int) -> tuple[dict, FitReport]:
    """Encode a RAFT record within ``max_length`` tokens by the length policy of DESIGN.md (invariant 4).

    1. Drop distractor passages (not in ``oracle``), last first; with ``oracle`` absent no passage is known to
       be a distractor, and one passage is always kept.
    2. Truncate the remaining passages, longest first, to a common token budget.
    The question, the reasoning and the answer are never cut. Surviving passages keep their citation marker
    numbers, so markers quoted in the reasoning or answer stay right.

    Raises:
        ExampleTooLongError: even the question, the answer and one token per passage do not fit.
    """
    _check_tokenizer(tokenizer)
    record = present_fields(record)
    passages = list(_passage_list(record))
    oracle = oracle_indices(record, len(passages))
    keep = list(range(len(passages)))
    report = FitReport()

    def attempt(current: dict):
        markers = [k + 1 for k in keep]
        return _tokenize_raft(current, tokenizer, markers)

    current = record
    example, text, starts, ends, spans = attempt(current)
    n = len(example["input_ids"])
    if n <= max_length:
        return example, report
    oracle_set = set(oracle or [])
    droppable = [k for k in keep if k not in oracle_set] if oracle is not None else []
    while n > max_length and droppable and len(keep) > 1:
        sizes = np.bincount(example["block_ids"], minlength=len(keep) + 1)
        position = {k: j for j, k in enumerate(keep, start=1)}
        excess, dropped = n - max_length, set()
        while droppable and len(keep) - len(dropped) > 1 and excess > 0:
            k = droppable.pop()
            excess -= int(sizes[position[k]]) + 1
            dropped.add(k)
        keep = [k for k in keep if k not in dropped]
        report.dropped_distractors += len(dropped)
        current = {**record, "passages": [passages[k] for k in keep], "oracle": None}
        example, text, starts, ends, spans = attempt(current)
        n = len(example["input_ids"])
    cut = 0
    while n > max_length:
        sizes = np.bincount(example["block_ids"], minlength=len(keep) + 1)[1:]
        excess = n - max_length + cut  # cut grows when re-tokenizing the cut text yields more tokens
        level = int(sizes.max())
        while level > 0 and int(np.maximum(sizes - level, 0).sum()) < excess:
            level -= 1
        new, truncated = [], 0
        for p0, p1 in spans:
            inside = np.nonzero(_spans_mask(starts, ends, p0, p1))[0]
            body = p0 + text[p0:p1].index("] ") + 2  # after the "[k] " marker
            kept = inside[ends[inside] > body][: max(level - int((ends[inside] <= body).sum()), 0)]
            if len(inside) <= level:
                new.append(text[body:p1])
                continue
            if len(kept) == 0:
                raise ExampleTooLongError(
                    f"raft example cannot fit max_length={max_length} even with its passages truncated "
                    f"(the question and answer alone take about {n - int(sizes.sum())} tokens)",
                    length=n,
                    record=record,
                )
            new.append(text[body : int(ends[kept[-1]])])
            truncated += 1
        report.truncated_passages = max(report.truncated_passages, truncated)
        current = {**record, "passages": new, "oracle": None}
        example, text, starts, ends, spans = attempt(current)
        n = len(example["input_ids"])
        cut += 1
    return example, report


def encode(record: dict, tokenizer, *, max_length: int | None = None) -> dict:
    """Encode one record into ``{"input_ids", "labels", "block_ids", "source"}`` (lists of ints, a str).

    Which tokens carry loss (labels != -100):
      * RAFT: the assistant text (the answer, or ``reasoning`` then the answer when the record has
        ``reasoning``) and its end-of-turn/EOS token; ``block_ids[t] = k`` for tokens of passage k.
      * instruction: the content of every assistant turn (of the completion only, for prompt/completion) and
        the end-of-turn token after it (or the EOS appended after a plain-text completion).
      * DAP: every token; ``block_ids`` all 0.
    ``source`` is the record's ``source`` field, else its kind ("raft", "instruct", "dap").

    Raises:
        RecordError: a missing, empty or mistyped field (the message names it and the record's ``id``), or a
            QA record (build RAFT records from it with :class:`ragkern.data.RaftBuilder` first).
        ExampleTooLongError: the example has more than ``max_length`` tokens (see :func:`fit_raft` for the
            trimming policy, which ``encode_records`` applies).
        ValueError: the tokenizer is not fast or has no EOS token.
    """
    _check_tokenizer(tokenizer)
    record = present_fields(record)
    kind = record_kind(record)
    if kind == "qa":
        raise RecordError(
            "a QA record {question, answer, oracle_passages} has no passages yet: build RAFT records from it "
            "and a corpus with ragkern.data.RaftBuilder",
            field="passages",
            record=record,
        )
    encoders = {"raft": _encode_raft, "dap": _encode_dap, "instruct": _encode_instruct}
    example = encoders[kind](record, tokenizer)
    n = len(example["input_ids"])
    if max_length is not None and n > max_length:
        raise ExampleTooLongError(
            f"{kind} example has {n} tokens > max_length={max_length}", length=n, record=record
        )
    return example
