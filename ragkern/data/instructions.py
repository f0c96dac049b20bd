"""Verifiable instructions: instruction examples whose following a program can check.

Each instruction type has phrasings a user might write, a way to make a response that follows it from a plain
answer, and a checker (IFEval's idea, with the types a small model can learn)::

    >>> spec = {"type": "uppercase"}
    >>> instruction_text(spec)                          # one of its phrasings
    'Write your answer in capital letters.'
    >>> apply_instruction("the harrow guild", spec)
    'THE HARROW GUILD'
    >>> follows("THE HARROW GUILD", spec)
    True

:func:`instruction_records` draws chat records (a small task + an instruction -> a response that follows it)
for the hybrid recipe's instruction half; :func:`with_instruction` adds an instruction to a RAFT or QA record
(its answer transformed to follow it), so the same checks score the answers of RAG questions.
:data:`TRAIN_TYPES` and :data:`HELDOUT_TYPES` split the types so evaluation can use types never trained on.

An instruction is a spec ``{"type": name, **parameters}`` stored in the record's ``"instruction"`` field.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class InstructionType:
    """Phrasings (``str.format`` templates over the spec's parameters), the parameters' draw, the response
    transform and the checker of one instruction type."""

    phrasings: tuple[str, ...]
    draw: Callable[[random.Random], dict]
    apply: Callable[[str, dict], str]
    check: Callable[[str, dict], bool]


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+(?:['-][^\W_]+)*", text)


def _json_answer(response: str, spec: dict) -> bool:
    try:
        value = json.loads(response.strip())
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == {spec["key"]} and isinstance(value[spec["key"]], str)


def _quoted(response: str) -> bool:
    text = response.strip()
    return len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1]


def _bullets(response: str, spec: dict) -> bool:
    lines = [line for line in response.strip().splitlines() if line.strip()]
    return len(lines) == spec["n"] and all(line.startswith("- ") and line[2:].strip() for line in lines)


def _bullet_items(answer: str, n: int) -> str:
    """``answer`` as ``n`` bullets of consecutive words (a short answer's last word repeated to fill them)."""
    words = _words(answer) or [answer.strip() or "-"]
    if len(words) < n:
        words = words + [words[-1]] * (n - len(words))
    size = -(-len(words) // n)
    parts = [" ".join(words[i * size : (i + 1) * size]) or words[-1] for i in range(n)]
    return "\n".join(f"- {p}" for p in parts)


TYPES: dict[str, InstructionType] = {
    "uppercase": InstructionType(
        ("Write your answer in capital letters.", "Answer in upper case only."),
        lambda rng: {},
        lambda answer, spec: answer.upper(),
        lambda r, spec: any(c.isalpha() for c in r) and r == r.upper(),
    ),
    "lowercase": InstructionType(
        ("Write your answer in lower case only.", "Use no capital letters in your answer."),
        lambda rng: {},
        lambda answer, spec: answer.lower(),
        lambda r, spec: any(c.isalpha() for c in r) and r == r.lower(),
    ),
    "json": InstructionType(
        ('Reply with a JSON object whose only key is "{key}".', 'Give the answer as JSON: {{"{key}": ...}}.'),
        lambda rng: {"key": rng.choice(("answer", "result", "value"))},
        lambda answer, spec: json.dumps({spec["key"]: answer}),
        _json_answer,
    ),
    "prefix": InstructionType(
        ('Begin your reply with "{prefix}".', 'Start your answer with the words "{prefix}".'),
        lambda rng: {"prefix": rng.choice(("Reply:", "In short:", "Noted:"))},
        lambda answer, spec: f"{spec['prefix']} {answer}",
        lambda r, spec: (
            r.strip().startswith(spec["prefix"]) and bool(r.strip()[len(spec["prefix"]) :].strip())
        ),
    ),
    "max_words": InstructionType(
        ("Answer in at most {n} words.", "Use no more than {n} words."),
        lambda rng: {"n": rng.randint(2, 5)},
        lambda answer, spec: " ".join(_words(answer)[: spec["n"]]),
        lambda r, spec: 1 <= len(_words(r)) <= spec["n"],
    ),
    "quotes": InstructionType(
        ("Wrap your whole answer in double quotes.", "Put your answer between double quotation marks."),
        lambda rng: {},
        lambda answer, spec: '"' + answer.replace('"', "'") + '"',
        lambda r, spec: _quoted(r),
    ),
    "suffix": InstructionType(
        ('End your reply with the word "{word}".', 'Finish your answer with "{word}".'),
        lambda rng: {"word": rng.choice(("Done.", "End.", "Over."))},
        lambda answer, spec: f"{answer} {spec['word']}",
        lambda r, spec: r.strip().endswith(spec["word"]) and bool(r.strip()[: -len(spec["word"])].strip()),
    ),
    "bullets": InstructionType(
        (
            "Answer as exactly {n} bullet points starting with '- '.",
            "Give {n} lines, each starting with '- '.",
        ),
        lambda rng: {"n": rng.randint(2, 3)},
        lambda answer, spec: _bullet_items(answer, spec["n"]),
        _bullets,
    ),
}
TRAIN_TYPES = ("uppercase", "json", "prefix", "max_words", "bullets")
HELDOUT_TYPES = ("lowercase", "quotes", "suffix")
# Types that keep a short answer's content (:func:`strip_format` gives it back): the ones to put on RAG questions.
ANSWER_TYPES = ("uppercase", "lowercase", "json", "prefix", "quotes", "suffix")

# Small tasks with a plain answer, for the instruction examples: (prompt, answer) draws.
_ANIMALS = ("otter", "heron", "badger", "lynx", "falcon", "beaver", "marten", "stoat", "crane", "hare")
_TOOLS = ("hammer", "chisel", "ladle", "sieve", "anvil", "awl", "trowel", "bellows", "tongs", "plane")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(1, 5), rng.randint(1, 4)
        return f"What is {_NUMBERS[a - 1]} plus {_NUMBERS[b - 1]}, in words?", _NUMBERS[a + b - 1]
    if kind == 1:
        items = rng.sample(_ANIMALS, 3)
        return f"Name the animal listed second: {', '.join(items)}.", items[1]
    if kind == 2:
        word = rng.choice(_TOOLS)
        return f"Repeat this word: {word}.", word
    if kind == 3:
        items = rng.sample(_TOOLS, 2)
        return f"Which of these two words comes first in the alphabet: {items[0]} or {items[1]}?", min(items)
    items = rng.sample(_ANIMALS, 2)
    return f"Join these two words with 'and': {items[0]}, {items[1]}.", f"{items[0]} and {items[1]}"


def draw_instruction(rng: random.Random, types: tuple[str, ...] = TRAIN_TYPES) -> dict:
    """A spec ``{"type", **parameters}`` of one of ``types``, its parameters drawn from ``rng``."""
    name = rng.choice(types)
    return {"type": name, **_type(name).draw(rng)}


def _type(name: str) -> InstructionType:
    if name not in TYPES:
        raise ValueError(f"unknown instruction type {name!r}; known: {sorted(TYPES)}")
    return TYPES[name]


def instruction_text(spec: dict, rng: random.Random | None = None) -> str:
    """A phrasing of ``spec`` (the first one, or one drawn from ``rng``)."""
    phrasings = _type(spec["type"]).phrasings
    template = phrasings[0] if rng is None else rng.choice(phrasings)
    return template.format(**{k: v for k, v in spec.items() if k != "type"})


def apply_instruction(answer: str, spec: dict) -> str:
    """``answer`` rewritten to follow ``spec`` (what a model should write)."""
    return _type(spec["type"]).apply(answer, spec)


def follows(response: str, spec: dict) -> bool:
    """Whether ``response`` follows the instruction ``spec`` (a program decides; no model)."""
    return bool(_type(spec["type"]).check(response, spec))


def instruction_records(
    n: int, *, seed: int = 0, types: tuple[str, ...] = TRAIN_TYPES, source: str = "instruct"
) -> list[dict]:
    """``n`` chat records ``{"messages", "instruction", "answer", "id", "source"}``: a small task with an
    instruction of one of ``types``, and a response that follows it (checked with :func:`follows`)."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    for name in types:
        _type(name)
    rng = random.Random(f"ragkern-instructions-{seed}")
    records = []
    for i in range(n):
        prompt, answer = _task(rng)
        spec = draw_instruction(rng, types)
        if (
            spec["type"] == "max_words"
        ):  # a limit the whole answer fits in: the target is the answer, not a cut
            spec["n"] = max(spec["n"], len(_words(answer)))
        response = apply_instruction(answer, spec)
        if not follows(response, spec):  # the generator's own responses must follow what they ask
            raise RuntimeError(f"instruction {spec} made a response that does not follow it: {response!r}")
        records.append(
            {
                "id": f"inst-{seed}-{i}",
                "messages": [
                    {"role": "user", "content": f"{prompt} {instruction_text(spec, rng)}"},
                    {"role": "assistant", "content": response},
                ],
                "instruction": spec,
                "answer": answer,
                "source": source,
            }
        )
    return records


def with_instruction(record: dict, spec: dict, rng: random.Random | None = None) -> dict:
    """A RAFT or QA ``record`` whose question carries the instruction ``spec`` and whose answer follows it;
    the plain answer is kept as ``"plain_answer"`` (what exact match compares, after undoing the format)."""
    if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
        raise ValueError(f"record {record.get('id')!r}: with_instruction needs a 'question' and an 'answer'")
    return {
        **record,
        "question": f"{record['question']} {instruction_text(spec, rng)}",
        "answer": apply_instruction(record["answer"], spec),
        "plain_answer": record["answer"],
        "instruction": spec,
    }


def strip_format(response: str, spec: dict) -> str:
    """The content of a response with the instruction's format taken off (for exact match on the plain answer):
    the JSON value, the text inside quotes, without prefix/suffix or bullets; case is left to the normaliser."""
    text = response.strip()
    kind = spec["type"]
    if kind == "json":
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return str(value.get(spec["key"], "")) if isinstance(value, dict) else text
    if kind == "quotes" and len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    if kind == "prefix" and text.startswith(spec["prefix"]):
        return text[len(spec["prefix"]) :].strip()
    if kind == "suffix" and text.endswith(spec["word"]):
        return text[: -len(spec["word"])].strip()
    if kind == "bullets":
        return " ".join(line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- "))
    return text
