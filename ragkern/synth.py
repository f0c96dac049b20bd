"""From documents to RAFT data: chunk a corpus, generate questions and answers with a local instruct model,
keep the usable pairs, and build RAFT records with distractors (``ragkern synth``).

::

    corpus (JSONL {text, title?, id?} | folder of .txt/.md | iterable)   streamed, one document at a time
      -> chunks of chunk_tokens tokens, overlap tokens shared with the previous chunk; a chunk of fewer than
         min_tokens tokens (a short tail or document) is dropped and counted
      -> per batch of chunks: a question prompt per chunk (N questions, one per line), then an answer prompt per
         question (optionally quoting the chunk: ##begin_quote##...##end_quote##, then "Answer: ...")
         generated greedily by ragkern.evaluate.generate_answers (sorted lengths, KV cache, end-of-turn stop)
      -> filters: every candidate question is kept or dropped for one counted reason (FILTER_REASONS)
      -> <out>.state.jsonl: one line per finished chunk, appended and flushed per batch (resume reads it)
      -> held-out documents chosen by a seeded hash; RaftBuilder (BM25 hard negatives from the chunks, P% of
         training examples without the oracle) -> <out> (train), <out stem>.heldout.jsonl (oracle always
         present), <out stem>.report.json (every count), <out stem>.yaml (a `ragkern train --config` file)

The oracle of a pair is its chunk: ``{"id": "<doc id>#<chunk index>", "title"?, "text"}``. Everything but the
BM25 distractor pool (a seeded reservoir sample of at most ``distractor_pool`` chunks) and a hash per kept
question is streamed, so memory stays bounded on a large corpus. Generation is greedy, so the same corpus,
model, settings and seed give the same files; an interrupted run loses at most the batch in flight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# generate(chat records {"messages": [...]}, max_new_tokens) -> one greedy completion per record
Generate = Callable[[list[dict], int], list[str]]
Template = str | list[dict]

_FEW_SHOT_TEXT = (
    "The Orin bridge was built by Mara Vell in the year 1820. Walkers cross it every morning. It is painted "
    "green and oiled with linseed every spring."
)
QUESTION_TEMPLATE: list[dict] = [
    {
        "role": "user",
        "content": f"Write 3 questions that the text answers, one per line.\n\nText: {_FEW_SHOT_TEXT}",
    },
    {
        "role": "assistant",
        "content": "Who built the Orin bridge?\nIn which year was the Orin bridge built?\n"
        "What colour is the Orin bridge painted?",
    },
    {"role": "user", "content": "Write {n} questions that the text answers, one per line.\n\nText: {chunk}"},
]
_ANSWER_ASK = (
    "Answer the question with a few words copied from the text.\n\nText: {chunk}\n\nQuestion: {question}"
)
ANSWER_TEMPLATE: list[dict] = [
    {
        "role": "user",
        "content": _ANSWER_ASK.format(chunk=_FEW_SHOT_TEXT, question="Who built the Orin bridge?"),
    },
    {"role": "assistant", "content": "Mara Vell"},
    {
        "role": "user",
        "content": _ANSWER_ASK.format(chunk=_FEW_SHOT_TEXT, question="What is the bridge oiled with?"),
    },
    {"role": "assistant", "content": "linseed"},
    {"role": "user", "content": _ANSWER_ASK},
]
_REASON_ASK = (
    "Quote the sentence of the text that answers the question between ##begin_quote## and ##end_quote##, then "
    "give the answer after 'Answer:'.\n\nText: {chunk}\n\nQuestion: {question}"
)
REASONING_TEMPLATE: list[dict] = [
    {
        "role": "user",
        "content": _REASON_ASK.format(chunk=_FEW_SHOT_TEXT, question="Who built the Orin bridge?"),
    },
    {
        "role": "assistant",
        "content": "The text says ##begin_quote## The Orin bridge was built by Mara Vell in the year 1820. "
        "##end_quote##\n\nAnswer: Mara Vell",
    },
    {"role": "user", "content": _REASON_ASK},
]

# Why a candidate question was dropped (the report counts each; every candidate gets one reason or is kept).
FILTER_REASONS = (
    "empty_question",  # a list marker and nothing else
    "no_question_mark",  # prose, a preamble ("Here are 3 questions:"), a statement
    "echoes_prompt",  # a line of the prompt repeated (the instruction, the few-shot example)
    "question_too_short",
    "question_too_long",
    "beyond_n",  # a valid question after the N asked for
    "empty_answer",
    "no_answer_marker",  # reasoning: no "Answer:" after the reasoning
    "answer_too_long",
    "answer_echoes_question",
    "answer_in_question",  # the question gives its answer away
    "answer_not_grounded",  # answer words missing from the chunk
    "no_quote",  # reasoning: no ##begin_quote##...##end_quote## span
    "quote_not_grounded",  # reasoning: a quote that is not in the chunk
    "duplicate",  # the same question (normalised) kept before, anywhere in the corpus
    "near_duplicate",  # token-set Jaccard >= near_duplicate with a kept question of the same document
)
_QUOTE = re.compile(r"##begin_quote##(.*?)##end_quote##", re.DOTALL)
_MARKER = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022]|q\s*\d*\s*[:.]|question\s*\d*\s*[:.])\s*", re.IGNORECASE)
_SUFFIXES = (".txt", ".md")


@dataclass
class SynthConfig:
    """What ``synthesize`` does; every field is also a ``ragkern synth`` option (``--chunk-tokens`` ...)."""

    # chunking (tokens of the generator's tokenizer)
    chunk_tokens: int = 256  # tokens per chunk
    overlap: int = 32  # tokens a chunk shares with the one before it
    min_tokens: int = 32  # shorter chunks (a document's tail, a short document) are dropped and counted
    # generation
    questions: int = 3  # N questions asked per chunk
    reasoning: bool = False  # answers quote the chunk (RAFT's chain of thought), then "Answer: ..."
    batch_size: int = 16  # chunks per batch (one state write), and prompts decoded together
    question_tokens: int = 64  # max new tokens of a chunk's question list
    answer_tokens: int = 48  # max new tokens of an answer (reasoning: 4x)
    question_template: Template = field(default_factory=lambda: QUESTION_TEMPLATE)  # {chunk} {title} {n}
    answer_template: Template | None = None  # {chunk} {title} {question}; None: ANSWER/REASONING_TEMPLATE
    # filters
    min_question_words: int = 3
    max_question_words: int = 40
    max_answer_words: int = 24
    grounding: str = "span"  # "span": the answer is a run of the chunk's words; "words": see min_grounding
    min_grounding: float = 1.0  # grounding="words": share of the answer's words that must occur in the chunk
    near_duplicate: float = (
        0.8  # question token-set Jaccard at or above which a same-document question is dropped
    )
    # RAFT records
    num_distractors: int = 3  # BM25 hard negatives per example (fewer when the pool is too small; reported)
    p_oracle: float = 0.8  # share of training examples with the oracle (held-out: always)
    heldout_fraction: float = 0.1  # share of documents (with kept pairs) held out for evaluation
    distractor_pool: int = 20000  # at most this many chunks (a seeded reservoir sample) for BM25
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.chunk_tokens >= 1, "chunk_tokens must be >= 1"),
            (0 <= self.overlap < self.chunk_tokens, "overlap must be in [0, chunk_tokens)"),
            (1 <= self.min_tokens <= self.chunk_tokens, "min_tokens must be in [1, chunk_tokens]"),
            (self.questions >= 1, "questions must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (
                self.question_tokens >= 1 and self.answer_tokens >= 1,
                "question_tokens, answer_tokens must be >= 1",
            ),
            (0 <= self.min_question_words <= self.max_question_words, "need 0 <= min_question_words <= max"),
            (self.max_answer_words >= 1, "max_answer_words must be >= 1"),
            (self.grounding in ("span", "words"), "grounding must be 'span' or 'words'"),
            (0.0 <= self.min_grounding <= 1.0, "min_grounding must be in [0, 1]"),
            (0.0 < self.near_duplicate <= 1.0, "near_duplicate must be in (0, 1]"),
            (self.num_distractors >= 0, "num_distractors must be >= 0"),
            (0.0 <= self.p_oracle <= 1.0, "p_oracle must be in [0, 1]"),
            (0.0 <= self.heldout_fraction < 1.0, "heldout_fraction must be in [0, 1)"),
            (self.distractor_pool >= 2, "distractor_pool must be >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                values = ", ".join(
                    f"{k}={v!r}" for k, v in dataclasses.asdict(self).items() if "template" not in k
                )
                raise ValueError(f"SynthConfig: {message} (got {values})")
        self.question_template = _messages(self.question_template, "question_template", ("{chunk}",))
        default = REASONING_TEMPLATE if self.reasoning else ANSWER_TEMPLATE
        self.answer_template = _messages(
            self.answer_template if self.answer_template is not None else default,
            "answer_template",
            ("{chunk}", "{question}"),
        )


def _messages(template: Template, name: str, needs: tuple[str, ...]) -> list[dict]:
    """A template as chat messages (a string is one user turn), checked for its placeholders."""
    messages = [{"role": "user", "content": template}] if isinstance(template, str) else template
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ValueError(f"{name}: a string or a list of {{role, content}} messages, got {template!r}")
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"{name}: the last message must be the user turn the model answers")
    text = "".join(m["content"] for m in messages)
    missing = [p for p in needs if p not in text]
    if missing:
        raise ValueError(
            f"{name}: no {' or '.join(missing)} placeholder; the prompt must show {', '.join(needs)}"
        )
    return [dict(m) for m in messages]


def load_template(path: str | os.PathLike) -> Template:
    """A prompt template from a file: ``.json`` holds a list of ``{role, content}`` messages (few-shot turns
    allowed, the last a user turn), any other file is the text of one user turn."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"template {str(path)!r}: no such file (a .txt user turn or a .json list of messages)"
        )
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"template {str(path)!r}: not valid JSON ({e})") from e
    return text


def _fill(template: list[dict], **values: str) -> dict:
    """A chat record of ``template`` with ``{name}`` placeholders replaced (no str.format: braces stay)."""
    messages = []
    for m in template:
        content = m["content"]
        for k, v in values.items():
            content = content.replace("{" + k + "}", v)
        messages.append({"role": m["role"], "content": content})
    return {"messages": messages}


def _template_text(template: list[dict]) -> str:
    return " ".join(_words(" ".join(re.sub(r"\{\w+\}", " ", m["content"]) for m in template)))


# -- documents and chunks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """A window of a document: ``id`` is ``"<doc>#<index>"`` (stable across runs: resume skips by it)."""

    id: str
    doc: str
    index: int
    text: str
    tokens: int
    title: str | None = None

    def passage(self) -> dict:
        """The chunk as a RAFT passage (the oracle of its questions)."""
        return {"id": self.id, **({"title": self.title} if self.title else {}), "text": self.text}


def _document(record, where: str, index: int) -> dict:
    if isinstance(record, str):
        record = {"text": record}
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: a document must be a {{text}} record or a string, got {type(record).__name__}"
        )
    text = record.get("text")
    if not isinstance(text, str):
        raise ValueError(f"{where}: no 'text' field (a document record is {{text, title?, id?}})")
    title = record.get("title")
    if title is not None and not isinstance(title, str):
        raise ValueError(f"{where}: 'title' must be a string, got {type(title).__name__}")
    doc_id = record.get("id", index)
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
        raise ValueError(f"{where}: 'id' must be a string or an integer, got {doc_id!r}")
    return {"id": str(doc_id), "title": title or None, "text": text}


def iter_documents(corpus) -> Iterator[dict]:
    """Stream ``{"id", "title", "text"}`` documents from a corpus, one at a time.

    ``corpus`` is a ``.jsonl`` file of ``{"text", "title"?, "id"?}`` records (id defaults to the line number),
    a folder (every ``.txt``/``.md`` file under it, sorted; id = the relative path, no title), or an iterable
    of such records or strings (id defaults to the position). A record without a string ``text`` raises a
    ValueError naming it; an empty document is yielded (chunking counts it as too short).
    """
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)
            for p in files:
                rel = p.relative_to(path).as_posix()
                try:
                    text = p.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
                yield {"id": rel, "title": None, "text": text}
            return
        if not path.is_file():
            raise ValueError(
                f"corpus {str(corpus)!r}: no such file or folder (a .jsonl of {{text}} or a folder)"
            )
        if path.suffix.lower() != ".jsonl":
            raise ValueError(
                f"corpus {str(corpus)!r}: a .jsonl file of {{text}} records or a folder of .txt/.md"
            )
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: malformed JSON: {e.msg} (column {e.colno})") from e
                yield _document(record, f"{path}:{n}", n)
        return
    for i, record in enumerate(corpus):
        yield _document(record, f"corpus[{i}]", i)


def chunk_document(
    document: dict, tokenizer, *, chunk_tokens: int, overlap: int, min_tokens: int
) -> tuple[list[Chunk], int]:
    """A document's chunks and how many windows were dropped for having fewer than ``min_tokens`` tokens.

    Windows of ``chunk_tokens`` tokens start every ``chunk_tokens - overlap`` tokens until one reaches the end
    of the document; that last one (the tail) can be short, and is dropped when under ``min_tokens`` (as is a
    whole document under ``min_tokens``). A chunk's text is the slice of the document between its first and
    last token (offsets of the fast tokenizer), so quotes of it are quotes of the document::

        tokens   0 ........................................ 599
        chunk 0  [0, 256)
        chunk 1             [224, 480)
        chunk 2                          [448, 600)   (152 tokens: kept when >= min_tokens)
    """
    text = document["text"]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    n = len(offsets)
    if n == 0:
        return [], 1
    step = chunk_tokens - overlap
    chunks, dropped, start = [], 0, 0
    while True:
        end = min(start + chunk_tokens, n)
        if end - start < min_tokens:
            dropped += 1
        else:
            piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
            chunk_id = f"{document['id']}#{len(chunks)}"
            chunks.append(
                Chunk(chunk_id, document["id"], len(chunks), piece, end - start, document.get("title"))
            )
        if end >= n:
            break
        start += step
    return chunks, dropped


def iter_chunks(
    corpus, tokenizer, *, chunk_tokens: int, overlap: int, min_tokens: int, counts: Counter | None = None
) -> Iterator[Chunk]:
    """Stream the chunks of every document of ``corpus`` (:func:`iter_documents`, :func:`chunk_document`);
    ``counts`` (a Counter) gets ``documents``, ``chunks`` and ``chunks_too_short``."""
    counts = Counter() if counts is None else counts
    for doc in iter_documents(corpus):
        chunks, dropped = chunk_document(
            doc, tokenizer, chunk_tokens=chunk_tokens, overlap=overlap, min_tokens=min_tokens
        )
        counts["documents"] += 1
        counts["chunks"] += len(chunks)
        counts["chunks_too_short"] += dropped
        yield from chunks


# -- parsing and filters ---------------------------------------------------------------------------------------


def parse_questions(generated: str) -> list[str]:
    """The candidate questions of a generation: one per non-blank line, list markers ("1.", "-", "Q1:")
    stripped. A line that is only a marker gives an empty candidate (dropped as ``empty_question``)."""
    return [_MARKER.sub("", line, count=1).strip() for line in generated.splitlines() if line.strip()]


def _words(text: str) -> list[str]:
    """SQuAD-normalised words (:func:`ragkern.evaluate.normalize_answer`), what every filter compares."""
    # imported here: ragkern.evaluate imports torch, and `ragkern --help` stays fast
    from .evaluate import normalize_answer

    return normalize_answer(text).split()


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _contains(haystack: list[str], needle: list[str]) -> bool:
    """Whether the word sequence ``needle`` occurs contiguously in ``haystack``."""
    k = len(needle)
    return k > 0 and any(haystack[i : i + k] == needle for i in range(len(haystack) - k + 1))


def check_question(question: str, *, prompt_text: str, config: SynthConfig) -> str | None:
    """The reason a generated question is malformed (see FILTER_REASONS), or None. ``prompt_text`` is the
    normalised text of the question template (placeholders removed): a question found in it is an echo."""
    words = _words(question)
    if not question.strip() or not words:
        return "empty_question"
    if "?" not in question:
        return "no_question_mark"
    if f" {' '.join(words)} " in f" {prompt_text} ":
        return "echoes_prompt"
    if len(words) < config.min_question_words:
        return "question_too_short"
    if len(words) > config.max_question_words:
        return "question_too_long"
    return None


def parse_reasoned(generated: str) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a reasoning generation: the text before and after the last "Answer:";
    ``(None, generated)`` when there is no "Answer:" (:func:`ragkern.evaluate.split_reasoning`, the split
    evaluation reads answers with)."""
    from .evaluate import split_reasoning  # imported here, as in _words

    return split_reasoning(generated)


def check_answer(
    question: str, answer: str, chunk_text: str, *, reasoning: str | None = None, config: SynthConfig
) -> str | None:
    """The reason an answer is unusable (see FILTER_REASONS), or None.

    Grounded means (``grounding="span"``) the answer's normalised words occur as a contiguous run of the chunk's
    (an extractive answer), or (``"words"``) at least ``min_grounding`` of them occur in the chunk; with
    ``config.reasoning``, the reasoning must also quote the chunk (``##begin_quote##...##end_quote##``, each
    quote's normalised words a contiguous run of the chunk's)."""
    if config.reasoning and reasoning is None:
        return "no_answer_marker"
    words = _words(answer)
    if not words:
        return "empty_answer"
    if len(words) > config.max_answer_words:
        return "answer_too_long"
    q_words = _words(question)
    if _jaccard(set(words), set(q_words)) >= 0.8:
        return "answer_echoes_question"
    if _contains(q_words, words):
        return "answer_in_question"
    chunk_words = _words(chunk_text)
    if config.grounding == "span":
        if not _contains(chunk_words, words):
            return "answer_not_grounded"
    elif sum(w in set(chunk_words) for w in words) < config.min_grounding * len(words):
        return "answer_not_grounded"
    if config.reasoning:
        quotes = [_words(q) for q in _QUOTE.findall(reasoning or "")]
        if not quotes or not any(quotes):
            return "no_quote"
        if not all(_contains(chunk_words, q) for q in quotes if q):
            return "quote_not_grounded"
    return None


class Deduplicator:
    """Exact duplicates anywhere (a hash of the normalised question) and near-duplicates within a document
    (token-set Jaccard >= ``threshold`` with a kept question of the same document; documents come one after
    the other, so only the current one's questions are held)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.seen: set[bytes] = set()
        self.doc: str | None = None
        self.doc_questions: list[set[str]] = []

    def check(self, doc: str, question: str) -> str | None:
        words = _words(question)
        if hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest() in self.seen:
            return "duplicate"
        if doc == self.doc and any(_jaccard(set(words), s) >= self.threshold for s in self.doc_questions):
            return "near_duplicate"
        return None

    def add(self, doc: str, question: str) -> None:
        words = _words(question)
        self.seen.add(hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest())
        if doc != self.doc:
            self.doc, self.doc_questions = doc, []
        self.doc_questions.append(set(words))


# -- generation ------------------------------------------------------------------------------------------------


def model_generator(model, tokenizer, *, batch_size: int = 16) -> Generate:
    """A :data:`Generate` function on a causal LM: :func:`ragkern.evaluate.generate_answers` (greedy, prompts
    sorted by length and decoded ``batch_size`` at a time with a KV cache, stopped at the end-of-turn token)."""
    from .evaluate import generate_answers

    def generate(records: list[dict], max_new_tokens: int) -> list[str]:
        if not records:
            return []
        return generate_answers(
            model,
            tokenizer,
            records,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            show_progress=False,
        )

    return generate


def _generate_batch(
    chunks: list[Chunk], generate: Generate, config: SynthConfig, prompt_text: str, dedup: Deduplicator
) -> list[dict]:
    """The state lines of a batch of chunks: questions, answers, and every candidate's verdict."""
    n = str(config.questions)
    q_records = [_fill(config.question_template, chunk=c.text, title=c.title or "", n=n) for c in chunks]
    raw_questions = generate(q_records, config.question_tokens)
    lines, asks = [], []
    for c, raw in zip(chunks, raw_questions):
        candidates, seen, asked = [], set(), 0
        for q in parse_questions(raw):
            reason = check_question(q, prompt_text=prompt_text, config=config)
            key = " ".join(_words(q))
            if reason is None and key in seen:
                reason = "duplicate"  # a line repeated in the list: not worth an answer, nor one of the N
            seen.add(key)
            if reason is None:
                reason = dedup.check(c.doc, q)  # kept before: no answer needed
            if reason is None:
                asked += 1
                reason = "beyond_n" if asked > config.questions else None
            candidates.append({"question": q, "drop": reason})
            if reason is None:
                asks.append((len(lines), len(candidates) - 1))
        lines.append(
            {
                "chunk": c.id,
                "doc": c.doc,
                "title": c.title,
                "text": c.text,
                "generated": raw,
                "pairs": candidates,
            }
        )
    a_records = []
    for li, ci in asks:
        c = chunks[li]
        q = lines[li]["pairs"][ci]["question"]
        a_records.append(_fill(config.answer_template, chunk=c.text, title=c.title or "", question=q))
    max_tokens = config.answer_tokens * (4 if config.reasoning else 1)
    raw_answers = generate(a_records, max_tokens)
    for (li, ci), raw in zip(asks, raw_answers):
        pair = lines[li]["pairs"][ci]
        reasoning, answer = parse_reasoned(raw) if config.reasoning else (None, raw.strip())
        pair.update(answer=answer, generated=raw)
        if config.reasoning:
            pair["reasoning"] = reasoning
        reason = check_answer(pair["question"], answer, chunks[li].text, reasoning=reasoning, config=config)
        if reason is None:
            reason = dedup.check(lines[li]["doc"], pair["question"])
        pair["drop"] = reason
        if reason is None:
            dedup.add(lines[li]["doc"], pair["question"])
    return lines


# -- files -----------------------------------------------------------------------------------------------------


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The files of a run writing training records to ``out`` (``x.jsonl`` -> ``x.heldout.jsonl``,
    ``x.report.json``, ``x.yaml``, ``x.state.jsonl``)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    return {
        "train": out,
        "heldout": stem.with_name(stem.name + ".heldout.jsonl"),
        "report": stem.with_name(stem.name + ".report.json"),
        "config": stem.with_name(stem.name + ".yaml"),
        "state": stem.with_name(stem.name + ".state.jsonl"),
    }


def _settings(config: SynthConfig, model_name: str | None) -> dict:
    """What the state's generations depend on: a resumed run must use the same."""
    keep = (
        "chunk_tokens", "overlap", "min_tokens", "questions", "reasoning", "question_tokens", "answer_tokens",
        "question_template", "answer_template", "min_question_words", "max_question_words", "max_answer_words",
        "grounding", "min_grounding", "near_duplicate",
    )  # fmt: skip
    return {"model": model_name, **{k: getattr(config, k) for k in keep}}


def _read_state(path: Path, settings: dict) -> Iterator[dict]:
    """The chunk lines of a state file, after checking its header against ``settings``. A last line cut off
    by an interruption is removed from the file (its batch is generated again)."""
    with path.open("rb+") as f:
        good = 0
        for n, raw in enumerate(f, start=1):
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                if raw.endswith(b"\n"):
                    raise ValueError(f"{path}:{n}: not a state line; delete the file to start over") from None
                logger.warning("%s: dropping a line cut off by an interruption", path)
                f.truncate(good)
                return
            good += len(raw)
            if n == 1:
                if line.get("settings") != settings:
                    raise ValueError(
                        f"{path} was written with other settings (model, chunking, prompts or filters); pass the "
                        "same ones to resume it, or restart (--restart, or delete the file)"
                    )
                continue
            yield line


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
    os.replace(tmp, path)


def _heldout_docs(docs: list[str], fraction: float, seed: int) -> set[str]:
    """``round(fraction * len(docs))`` documents (at least one when ``fraction > 0`` and two or more docs, never
    all), chosen by a seeded hash of their ids: the same documents whatever their order."""
    if fraction <= 0 or len(docs) < 2:
        return set()
    k = min(max(1, round(fraction * len(docs))), len(docs) - 1)
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    return set(ranked[:k])


def _train_config(paths: dict[str, Path], model_name: str | None, reasoning: bool, seed: int) -> str:
    model = model_name or "PATH/TO/MODEL"
    return (
        "# Written by `ragkern synth`: LoRA RAFT training on the synthesized records.\n"
        f"#   ragkern train --config {paths['config']}\n"
        f"#   ragkern eval --model <output_dir> --data {paths['heldout'].resolve()}\n"
        f"model_name_or_path: {json.dumps(model)}\n"
        "lora_r: 16\nlora_alpha: 32\nlora_target_modules: [all-linear]\n"
        "sources:\n"
        f"  - kind: raft\n    path: {json.dumps(str(paths['train'].resolve()))}\n"
        f"reasoning: {'true' if reasoning else 'false'}\n"
        f"output_dir: {json.dumps(str(paths['train'].resolve().parent / (paths['train'].stem + '-model')))}\n"
        "max_length: 1024\nper_device_train_batch_size: 1\nlearning_rate: 1.0e-3\nnum_train_epochs: 1\n"
        'logging_steps: 10\nsave_strategy: "no"\nreport_to: none\n'
        f"seed: {seed}\n"
    )


# -- the pipeline ----------------------------------------------------------------------------------------------


def synthesize(
    corpus,
    out: str | os.PathLike,
    *,
    tokenizer,
    generate: Generate | None = None,
    model=None,
    config: SynthConfig | None = None,
    model_name: str | None = None,
    restart: bool = False,
    show_progress: bool = True,
) -> dict:
    """Generate RAFT training data from a corpus (see the module docstring); returns the report.

    Args:
        corpus: a ``.jsonl`` of ``{"text", "title"?, "id"?}``, a folder of ``.txt``/``.md`` files, or an
            iterable of such records (re-iterable: it is read twice, to count chunks and to generate).
        out: the training JSONL to write; the other files go beside it (:func:`output_paths`).
        tokenizer: the generator's tokenizer (chunks are counted in its tokens).
        generate: ``generate(chat_records, max_new_tokens) -> list[str]``; default
            :func:`model_generator` on ``model``.
        model: the instruct model, when ``generate`` is not given.
        config: a :class:`SynthConfig` (chunking, prompts, filters, RAFT knobs, seed).
        model_name: recorded in the state (a resume must use the same) and written into the train config.
        restart: discard an existing state file instead of resuming it.

    Returns the report (also written to ``<stem>.report.json``): ``documents``, ``chunks``,
    ``chunks_too_short``, ``chunks_generated`` (this run), ``chunks_resumed``, ``chunks_without_questions``,
    ``candidates``, ``kept``, ``dropped`` (reason -> count; ``kept + sum(dropped) == candidates``),
    ``kept_per_chunk``, ``train``/``heldout`` (records), ``heldout_documents``, ``num_distractors``,
    ``seconds``, ``chunks_per_minute`` (this run's generation), ``files``, ``settings``.

    Raises:
        ValueError: an empty corpus (no chunk of ``min_tokens``), a bad record, a state file written with other
            settings.
    """
    from tqdm.auto import tqdm

    config = config or SynthConfig()
    if not isinstance(corpus, (str, os.PathLike)) and iter(corpus) is corpus:
        raise ValueError(
            "the corpus is read twice (to count chunks, then to generate): pass a path or a list, not an iterator"
        )
    if generate is None:
        if model is None:
            raise ValueError("synthesize needs a model or a generate function")
        generate = model_generator(model, tokenizer, batch_size=config.batch_size)
    paths = output_paths(out)
    paths["train"].parent.mkdir(parents=True, exist_ok=True)
    chunking = dict(chunk_tokens=config.chunk_tokens, overlap=config.overlap, min_tokens=config.min_tokens)

    # pass 1: count and validate the chunks, and draw the BM25 pool (a reservoir, seeded)
    counts: Counter = Counter()
    pool: list[dict] = []
    rng = random.Random(f"synth-pool-{config.seed}")
    for i, c in enumerate(iter_chunks(corpus, tokenizer, counts=counts, **chunking)):
        item = {**c.passage(), "doc": c.doc}
        if len(pool) < config.distractor_pool:
            pool.append(item)
        else:
            j = rng.randrange(i + 1)
            if j < config.distractor_pool:
                pool[j] = item
    if counts["chunks"] == 0:
        raise ValueError(
            f"the corpus yields no chunk of at least min_tokens={config.min_tokens} tokens "
            f"({counts['documents']} documents); add text or lower --min-tokens"
        )

    # pass 2: generate what the state file does not hold yet, a batch at a time
    settings = _settings(config, model_name)
    prompt_text = _template_text(config.question_template)
    dedup = Deduplicator(config.near_duplicate)
    done: set[str] = set()
    kept = 0
    if paths["state"].exists() and (restart or paths["state"].stat().st_size == 0):
        paths["state"].unlink()
    if paths["state"].exists():
        for line in _read_state(paths["state"], settings):
            done.add(line["chunk"])
            for p in line["pairs"]:
                if p["drop"] is None:
                    dedup.add(line["doc"], p["question"])
                    kept += 1
    if not paths["state"].exists() or paths["state"].stat().st_size == 0:  # new, or its header was cut off
        paths["state"].write_text(json.dumps({"settings": settings}) + "\n")
    generated_chunks, t0 = 0, time.perf_counter()
    bar = tqdm(
        total=counts["chunks"], initial=len(done), unit="chunk", desc="synth", disable=not show_progress
    )
    with bar, paths["state"].open("a", encoding="utf-8") as state:

        def run(batch: list[Chunk]) -> None:
            nonlocal kept, generated_chunks
            lines = _generate_batch(batch, generate, config, prompt_text, dedup)
            state.write("".join(json.dumps(line) + "\n" for line in lines))
            state.flush()
            os.fsync(state.fileno())
            kept += sum(p["drop"] is None for line in lines for p in line["pairs"])
            generated_chunks += len(batch)
            bar.update(len(batch))
            bar.set_postfix(kept=kept, per_chunk=f"{kept / (len(done) + generated_chunks):.2f}")

        batch: list[Chunk] = []
        for c in iter_chunks(corpus, tokenizer, **chunking):
            if c.id in done:
                continue
            batch.append(c)
            if len(batch) == config.batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
    seconds = time.perf_counter() - t0

    # pass 3: count, split by document, build the RAFT records
    report = _build_outputs(paths, pool, config, settings, model_name)
    report.update(
        documents=counts["documents"],
        chunks=counts["chunks"],
        chunks_too_short=counts["chunks_too_short"],
        chunks_generated=generated_chunks,
        chunks_resumed=len(done),
        seconds=round(seconds, 2),
        chunks_per_minute=round(60 * generated_chunks / seconds, 2) if generated_chunks and seconds else None,
        files={k: str(v) for k, v in paths.items()},
        settings={
            **settings,
            **{
                k: getattr(config, k)
                for k in (
                    "num_distractors",
                    "p_oracle",
                    "heldout_fraction",
                    "distractor_pool",
                    "seed",
                    "batch_size",
                )
            },
        },
    )
    paths["report"].write_text(json.dumps(report, indent=2) + "\n")
    return report


def _kept_records(state: Path, settings: dict) -> Iterator[dict]:
    """The kept pairs of a state file as QA records (oracle: the chunk)."""
    for line in _read_state(state, settings):
        passage = {
            "id": line["chunk"],
            **({"title": line["title"]} if line.get("title") else {}),
            "text": line["text"],
        }
        for k, p in enumerate(line["pairs"]):
            if p["drop"] is None:
                record = {
                    "id": f"{line['chunk']}/q{k}",
                    "question": p["question"],
                    "answer": p["answer"],
                    "oracle_passages": [passage],
                    "doc": line["doc"],
                    "chunk": line["chunk"],
                }
                if p.get("reasoning"):
                    record["reasoning"] = p["reasoning"]
                yield record


def _builder(pool: list[dict], wanted: int, *, p_oracle: float, seed: int):
    """A BM25 RaftBuilder over ``pool`` with as many distractors as it allows (one oracle excluded, one more
    passage when the oracle is dropped): ``min(wanted, len(pool) - 2)``."""
    from .data import RaftBuilder

    k = max(0, min(wanted, len(pool) - 2))
    corpus = [{key: p[key] for key in ("id", "title", "text") if p.get(key)} for p in pool]
    if not corpus:
        corpus = [{"id": "-", "text": "-"}]  # never drawn from (k == 0): RaftBuilder wants a corpus
    return RaftBuilder(
        corpus, num_distractors=k, p_oracle=p_oracle if k else 1.0, negatives="bm25", seed=seed
    ), k


def _build_outputs(
    paths: dict[str, Path], pool: list[dict], config: SynthConfig, settings: dict, model_name
) -> dict:
    state = paths["state"]
    dropped: Counter = Counter({r: 0 for r in FILTER_REASONS})
    candidates = kept = no_questions = chunks_done = 0
    docs: dict[str, None] = {}
    for line in _read_state(state, settings):
        chunks_done += 1
        no_questions += not line["pairs"]
        for p in line["pairs"]:
            candidates += 1
            if p["drop"] is None:
                kept += 1
                docs.setdefault(line["doc"])
            else:
                dropped[p["drop"]] += 1
    heldout = _heldout_docs(list(docs), config.heldout_fraction, config.seed)
    train_builder, k_train = _builder(
        [p for p in pool if p["doc"] not in heldout],
        config.num_distractors,
        p_oracle=config.p_oracle,
        seed=config.seed,
    )
    heldout_builder, k_heldout = _builder(pool, config.num_distractors, p_oracle=1.0, seed=config.seed + 1)
    if min(k_train, k_heldout) < config.num_distractors:
        logger.warning(
            "the corpus has too few chunks for %d distractors: %d per training example, %d per held-out one",
            config.num_distractors, k_train, k_heldout,
        )  # fmt: skip
    n = {"train": 0, "heldout": 0}

    def records(split: str, builder) -> Iterator[str]:
        for qa in _kept_records(state, settings):
            if (qa["doc"] in heldout) != (split == "heldout"):
                continue
            record = builder.build(qa, index=n[split])
            n[split] += 1
            yield json.dumps(record) + "\n"

    _write_atomic(paths["train"], records("train", train_builder))
    _write_atomic(paths["heldout"], records("heldout", heldout_builder))
    paths["config"].write_text(_train_config(paths, model_name, config.reasoning, config.seed))
    return {
        "chunks_done": chunks_done,
        "chunks_without_questions": no_questions,
        "candidates": candidates,
        "kept": kept,
        "dropped": dict(dropped),
        "kept_per_chunk": round(kept / chunks_done, 4) if chunks_done else 0.0,
        "train": n["train"],
        "heldout": n["heldout"],
        "heldout_documents": sorted(heldout),
        "num_distractors": {"train": k_train, "heldout": k_heldout},
    }
