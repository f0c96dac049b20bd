"""ragkern.synth with a scripted generator (no model): chunking, every filter fed a bad generation, the report's
counts, determinism, resume after an interruption, the held-out split by document; and the real generation
path once on a tiny random model."""

import json
import re

import pytest

from ragkern.data import build_word_tokenizer, load_records
from ragkern.synth import (
    FILTER_REASONS,
    SynthConfig,
    check_answer,
    check_question,
    chunk_document,
    iter_documents,
    output_paths,
    parse_questions,
    parse_reasoned,
    synthesize,
)
from tests.ragkern.tiny import tiny_model, word_tokenizer

FACTS = {  # document -> (thing, {attribute: value}); each sentence "The <attribute> of <thing> is <value>."
    "d0": ("kelton", {"colour": "red", "founder": "mara", "river": "lumen"}),
    "d1": ("tarn", {"colour": "blue", "founder": "ivo", "river": "orin"}),
    "d2": ("orla", {"colour": "green", "founder": "lena", "river": "fen"}),
    "d3": ("brisk", {"colour": "grey", "founder": "hart", "river": "vell"}),
    "d4": ("quill", {"colour": "gold", "founder": "brandt", "river": "moor"}),
    "d5": ("sorrel", {"colour": "white", "founder": "alder", "river": "rush"}),
}
SENTENCE = re.compile(r"The (\w+) of (\w+) is (\w+)\.")


def corpus() -> list[dict]:
    return [
        {
            "id": doc,
            "title": thing.title(),
            "text": " ".join(f"The {a} of {thing} is {v}." for a, v in facts.items()),
        }
        for doc, (thing, facts) in FACTS.items()
    ]


@pytest.fixture(scope="module")
def tok():
    words = {w.lower() for d in corpus() for w in re.findall(r"\w+", d["text"])}
    return build_word_tokenizer(sorted(words | {"what", "who", "which"}))


def _chunk_of(record: dict) -> str:
    return re.search(r"Text: (.*?)(?:\n\nQuestion: |$)", record["messages"][-1]["content"], re.DOTALL).group(
        1
    )


class Scripted:
    """A generator: question prompts get "What is the <a> of <thing>?" per sentence of the chunk, answer prompts
    the value the chunk states; ``questions``/``answers`` override either by chunk / question. Records every
    chunk it is asked questions about; ``fail_after`` batches of question prompts raises (an interruption)."""

    def __init__(self, questions=None, answers=None, fail_after=None):
        self.questions, self.answers = questions or {}, answers or {}
        self.fail_after, self.asked = fail_after, []

    def __call__(self, records, max_new_tokens):
        out = []
        if records and "\n\nQuestion: " not in records[0]["messages"][-1]["content"]:
            if self.fail_after is not None and len(self.asked) >= self.fail_after:
                raise KeyboardInterrupt("interrupted")
            self.asked.append([_chunk_of(r) for r in records])
        for r in records:
            content = r["messages"][-1]["content"]
            chunk = _chunk_of(r)
            if "\n\nQuestion: " not in content:
                lines = self.questions.get(chunk) or [
                    f"What is the {a} of {t}?" for a, t, _ in SENTENCE.findall(chunk)
                ]
                out.append("\n".join(f"{i + 1}. {q}" for i, q in enumerate(lines)))
            else:
                question = content.rsplit("\n\nQuestion: ", 1)[1]
                m = re.match(r"What is the (\w+) of (\w+)\?", question)
                facts = {(a, t): v for a, t, v in SENTENCE.findall(chunk)}
                default = facts.get(m.groups(), "unknown") if m else "unknown"
                out.append(self.answers.get(question, default))
        return out


def _run(tmp_path, tok, generate, name="out", **options):
    options.setdefault("batch_size", 2)
    options.setdefault("min_tokens", 4)
    options.setdefault("heldout_fraction", 0.34)
    config = SynthConfig(**options)
    return synthesize(
        corpus(),
        tmp_path / name / "train.jsonl",
        tokenizer=tok,
        generate=generate,
        config=config,
        show_progress=False,
    )


# -- chunking --------------------------------------------------------------------------------------------------


def test_chunks_overlap_and_drop_short_tails(tok):
    words = [f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(75)]  # no digits: one token each
    tok75 = build_word_tokenizer(words)
    doc = {"id": "doc", "title": None, "text": " ".join(words)}
    chunks, dropped = chunk_document(doc, tok75, chunk_tokens=40, overlap=10, min_tokens=16)
    # windows start every 30 tokens: [0, 40), [30, 70), then the tail [60, 75) (15 < 16 tokens: dropped)
    assert [c.text.split() for c in chunks] == [words[0:40], words[30:70]]
    assert [c.id for c in chunks] == ["doc#0", "doc#1"] and dropped == 1
    assert [c.tokens for c in chunks] == [40, 40]
    assert all(len(tok75(c.text, add_special_tokens=False)["input_ids"]) == c.tokens for c in chunks)
    chunks, dropped = chunk_document(doc, tok75, chunk_tokens=40, overlap=10, min_tokens=15)
    assert (
        len(chunks) == 3
        and chunks[-1].text.split() == words[60:]
        and chunks[-1].tokens == 15
        and dropped == 0
    )
    chunks, dropped = chunk_document(doc, tok75, chunk_tokens=80, overlap=10, min_tokens=76)
    assert chunks == [] and dropped == 1  # a document shorter than min_tokens


def test_short_and_empty_documents_are_counted(tmp_path, tok):
    docs = [*corpus(), {"id": "tiny", "text": "The colour."}, {"id": "empty", "text": ""}]
    config = SynthConfig(min_tokens=4, batch_size=2)
    report = synthesize(
        docs, tmp_path / "t.jsonl", tokenizer=tok, generate=Scripted(), config=config, show_progress=False
    )
    assert report["documents"] == 8 and report["chunks"] == 6 and report["chunks_too_short"] == 2


def test_chunk_text_is_a_slice_of_the_document(tok):
    doc = corpus()[0]
    chunks, _ = chunk_document(doc, tok, chunk_tokens=8, overlap=2, min_tokens=1)
    assert len(chunks) > 2 and all(c.text in doc["text"] for c in chunks)
    assert chunks[0].text.startswith("The colour of kelton") and chunks[-1].text.endswith("lumen.")


def test_documents_from_a_folder_and_errors(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.md").write_text("# B\nsecond")
    (tmp_path / "docs" / "sub" / "a.txt").write_text("first")
    (tmp_path / "docs" / "skip.json").write_text("{}")
    assert [(d["id"], d["text"]) for d in iter_documents(tmp_path / "docs")] == [
        ("b.md", "# B\nsecond"),
        ("sub/a.txt", "first"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'text' field"):
        list(iter_documents(bad))
    with pytest.raises(ValueError, match="no such file or folder"):
        list(iter_documents(tmp_path / "missing.jsonl"))


def test_empty_corpus_and_bad_options_are_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="no chunk of at least min_tokens=4"):
        synthesize(
            [{"text": "a"}],
            tmp_path / "t.jsonl",
            tokenizer=tok,
            generate=Scripted(),
            config=SynthConfig(min_tokens=4),
        )
    with pytest.raises(ValueError, match=r"overlap must be in \[0, chunk_tokens\)"):
        SynthConfig(chunk_tokens=8, overlap=8)
    with pytest.raises(ValueError, match="no {question} placeholder"):
        SynthConfig(answer_template="Text: {chunk}")
    with pytest.raises(ValueError, match="not an iterator"):
        synthesize(iter(corpus()), tmp_path / "t.jsonl", tokenizer=tok, generate=Scripted())


# -- filters ---------------------------------------------------------------------------------------------------

CHUNK = "The colour of kelton is red. The founder of kelton is mara. The river of kelton is lumen."


FILTER_CASES = [
        (["-"], {}, {}, "empty_question"),
        (["Kelton has a founder"], {}, {}, "no_question_mark"),
        (["Who built the Orin bridge?"], {}, {}, "echoes_prompt"),  # the template's few-shot question
        (["Kelton?"], {}, {}, "question_too_short"),
        (["What " * 41 + "is it?"], {}, {}, "question_too_long"),
        (["What is the colour of kelton?", "What is the founder of kelton?"], {}, {"questions": 1}, "beyond_n"),
        (["What is the colour of kelton?"], {"What is the colour of kelton?": ""}, {}, "empty_answer"),
        (["What is the colour of kelton?"], {"What is the colour of kelton?": " ".join(["red"] * 25)}, {}, "answer_too_long"),
        (["What is the colour of kelton?"], {"What is the colour of kelton?": "What is the colour of kelton?"}, {}, "answer_echoes_question"),
        (["What is the colour of kelton?"], {"What is the colour of kelton?": "kelton"}, {}, "answer_in_question"),
        (["What is the colour of kelton?"], {"What is the colour of kelton?": "blue"}, {}, "answer_not_grounded"),
        (["What is the colour of kelton?"], {"What is the colour of kelton?": "red kelton"}, {}, "answer_not_grounded"),  # not a span
        (["What is the colour of kelton?"], {"What is the colour of kelton?": "##begin_quote## is red ##end_quote## red"}, {"reasoning": True}, "no_answer_marker"),
        (["What is the colour of kelton?"], {"What is the colour of kelton?": "It is red.\n\nAnswer: red"}, {"reasoning": True}, "no_quote"),
        (["What is the colour of kelton?"], {"What is the colour of kelton?": "##begin_quote## the sky is red ##end_quote##\n\nAnswer: red"}, {"reasoning": True}, "quote_not_grounded"),
        (["What is the colour of kelton?", "What is the colour of kelton?"], {}, {}, "duplicate"),
        (["What is the colour of kelton?", "What colour is the kelton?"], {"What colour is the kelton?": "red"}, {}, "near_duplicate"),
]  # fmt: skip


def test_every_filter_has_a_case():
    assert {case[-1] for case in FILTER_CASES} == set(FILTER_REASONS)


@pytest.mark.parametrize("lines, answers, options, reason", FILTER_CASES, ids=[c[-1] for c in FILTER_CASES])
def test_every_filter_drops_its_bad_generation_and_counts_it(tmp_path, tok, lines, answers, options, reason):
    docs = [{"id": "k", "text": CHUNK}]
    config = SynthConfig(min_tokens=4, heldout_fraction=0.0, num_distractors=0, **options)
    generate = Scripted({CHUNK: lines}, answers)
    report = synthesize(
        docs, tmp_path / "t.jsonl", tokenizer=tok, generate=generate, config=config, show_progress=False
    )
    assert report["dropped"][reason] == 1, report["dropped"]
    assert sum(report["dropped"].values()) == 1
    assert report["candidates"] == len(lines) and report["kept"] == len(lines) - 1
    state = [json.loads(x) for x in output_paths(tmp_path / "t.jsonl")["state"].read_text().splitlines()[1:]]
    assert [p["drop"] for p in state[0]["pairs"]].count(
        reason
    ) == 1  # the verdict is kept with the generation


def test_a_good_reasoned_answer_is_kept_with_its_quote(tmp_path, tok):
    q = "What is the colour of kelton?"
    gen = "The text says ##begin_quote## The colour of kelton is red. ##end_quote##\n\nAnswer: red"
    assert parse_reasoned(gen) == (
        "The text says ##begin_quote## The colour of kelton is red. ##end_quote##",
        "red",
    )
    config = SynthConfig(min_tokens=4, heldout_fraction=0.0, num_distractors=0, reasoning=True)
    report = synthesize(
        [{"id": "k", "text": CHUNK}],
        tmp_path / "t.jsonl",
        tokenizer=tok,
        generate=Scripted({CHUNK: [q]}, {q: gen}),
        config=config,
        show_progress=False,
    )
    assert report["kept"] == 1
    (record,) = load_records(tmp_path / "t.jsonl", kinds=("raft",))
    assert (
        record["answer"] == "red"
        and "##begin_quote##" in record["reasoning"]
        and record["passages"][0]["text"] == CHUNK
    )


def test_filter_functions_directly():
    config = SynthConfig()
    assert parse_questions("Here are 3 questions:\n1. A?\n- B?\n\nQ3: C?\nQuestion 4: D?") == [
        "Here are 3 questions:",
        "A?",
        "B?",
        "C?",
        "D?",
    ]
    ok = dict(prompt_text="write questions that text answers", config=config)  # normalised: no articles
    assert check_question("What is the colour of kelton?", **ok) is None
    assert check_question("Write questions that the text answers?", **ok) == "echoes_prompt"
    assert check_answer("What is the colour of kelton?", "red", CHUNK, config=config) is None
    assert (
        check_answer("What is the colour of kelton?", "The colour of kelton is red.", CHUNK, config=config)
        is None
    )
    words = SynthConfig(grounding="words", min_grounding=0.5)
    assert check_answer("What is the colour of kelton?", "red paint", CHUNK, config=words) is None
    assert (
        check_answer("What is the colour of kelton?", "blue paint", CHUNK, config=words)
        == "answer_not_grounded"
    )


# -- the pipeline ----------------------------------------------------------------------------------------------


def test_report_counts_every_candidate_and_outputs_train_as_is(tmp_path, tok):
    report = _run(tmp_path, tok, Scripted())
    assert report["chunks"] == 6 and report["candidates"] == 18 and report["kept"] == 18
    assert report["kept"] + sum(report["dropped"].values()) == report["candidates"]
    assert set(report["dropped"]) == set(FILTER_REASONS)
    assert report["train"] + report["heldout"] == report["kept"] and report["kept_per_chunk"] == 3.0
    paths = output_paths(tmp_path / "out" / "train.jsonl")
    train = load_records(paths["train"], kinds=("raft",))  # what `ragkern train` reads from a raft source
    heldout = load_records(paths["heldout"], kinds=("raft",))
    assert len(train) == report["train"] and len(heldout) == report["heldout"]
    k = report["num_distractors"]["train"]  # 2: 4 training chunks, one the oracle, k + 1 without it
    assert k == 2 and all(len(r["passages"]) == k + 1 for r in train)
    assert all(r["oracle"] for r in heldout)  # held-out: the oracle always present
    assert any(not r["oracle"] for r in train)  # RAFT's P%: some without
    for r in train:
        if r["oracle"]:
            assert r["passages"][r["oracle"][0]]["id"] == r["chunk"]
    assert json.loads(paths["report"].read_text())["kept"] == 18
    yaml_text = paths["config"].read_text()
    assert "kind: raft" in yaml_text and str(paths["train"].resolve()) in yaml_text


def test_heldout_split_is_by_document(tmp_path, tok):
    report = _run(tmp_path, tok, Scripted(), heldout_fraction=0.34)
    heldout_docs = set(report["heldout_documents"])
    assert len(heldout_docs) == 2
    paths = output_paths(tmp_path / "out" / "train.jsonl")
    train = load_records(paths["train"])
    heldout = load_records(paths["heldout"])
    assert {r["doc"] for r in heldout} == heldout_docs
    assert not heldout_docs & {r["doc"] for r in train}
    # a held-out document is not in training at all: neither as an oracle nor as a distractor
    assert not heldout_docs & {p["id"].split("#")[0] for r in train for p in r["passages"]}


def test_same_seed_same_files_other_seed_other_split(tmp_path, tok):
    a = _run(tmp_path, tok, Scripted(), name="a", seed=1)
    b = _run(tmp_path, tok, Scripted(), name="b", seed=1)
    c = _run(tmp_path, tok, Scripted(), name="c", seed=2)
    read = lambda name, key: output_paths(tmp_path / name / "train.jsonl")[key].read_text()
    assert read("a", "train") == read("b", "train") and read("a", "heldout") == read("b", "heldout")
    assert a["heldout_documents"] == b["heldout_documents"]
    assert (c["heldout_documents"], read("c", "train")) != (a["heldout_documents"], read("a", "train"))


def test_resume_after_an_interruption_generates_each_chunk_once(tmp_path, tok):
    full = _run(tmp_path, tok, Scripted(), name="full")
    broken = Scripted(fail_after=1)  # the second batch of chunks raises
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tok, broken, name="resumed")
    assert len(broken.asked) == 1 and len(broken.asked[0]) == 2
    again = Scripted()
    report = _run(tmp_path, tok, again, name="resumed")
    first = broken.asked[0]
    rest = [c for batch in again.asked for c in batch]
    assert not set(first) & set(rest) and len(first) + len(rest) == 6  # no chunk generated twice, none missed
    assert report["chunks_resumed"] == 2 and report["chunks_generated"] == 4
    for key in ("train", "heldout", "state"):
        assert output_paths(tmp_path / "resumed" / "train.jsonl")[key].read_text() == (
            output_paths(tmp_path / "full" / "train.jsonl")[key].read_text()
        ), key
    assert {k: report[k] for k in ("kept", "candidates", "dropped")} == {
        k: full[k] for k in ("kept", "candidates", "dropped")
    }
    # a finished run re-run generates nothing
    idle = Scripted()
    assert _run(tmp_path, tok, idle, name="resumed")["chunks_generated"] == 0 and idle.asked == []


def test_a_line_cut_off_mid_write_is_generated_again(tmp_path, tok):
    _run(tmp_path, tok, Scripted(), name="full")
    state = output_paths(tmp_path / "full" / "train.jsonl")["state"]
    whole = state.read_text()
    state.write_text(whole[: len(whole) - 40])  # the last chunk's line half written
    again = Scripted()
    _run(tmp_path, tok, again, name="full")
    assert len([c for b in again.asked for c in b]) == 1 and state.read_text() == whole


def test_resume_refuses_other_settings_and_restart_starts_over(tmp_path, tok):
    _run(tmp_path, tok, Scripted(), name="x")
    with pytest.raises(ValueError, match="other settings"):
        _run(tmp_path, tok, Scripted(), name="x", questions=2)
    config = SynthConfig(questions=2, batch_size=2, min_tokens=4)
    again = Scripted()
    report = synthesize(
        corpus(),
        tmp_path / "x" / "train.jsonl",
        tokenizer=tok,
        generate=again,
        config=config,
        restart=True,
        show_progress=False,
    )
    assert report["chunks_generated"] == 6 and report["dropped"]["beyond_n"] == 6


def test_small_pool_lowers_the_distractors_and_says_so(tmp_path, tok):
    report = _run(tmp_path, tok, Scripted(), num_distractors=10)
    assert report["num_distractors"] == {"train": 2, "heldout": 4}  # 4 training chunks, 6 in all: k <= n - 2


def test_real_generation_path_on_a_tiny_model(tmp_path):
    """generate_answers under the pipeline: a random model says nonsense, which must be counted, not lost."""
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), seed=0, attn="sdpa")
    docs = [
        {"id": f"d{i}", "text": "paris is the capital of france . berlin is in germany . " * 2}
        for i in range(3)
    ]
    config = SynthConfig(min_tokens=4, batch_size=2, question_tokens=8, answer_tokens=4)
    report = synthesize(
        docs, tmp_path / "t.jsonl", tokenizer=tok, model=model, config=config, show_progress=False
    )
    assert report["chunks_generated"] == 3
    assert report["kept"] + sum(report["dropped"].values()) == report["candidates"]
    state = [json.loads(x) for x in output_paths(tmp_path / "t.jsonl")["state"].read_text().splitlines()[1:]]
    assert len(state) == 3 and all(isinstance(s["generated"], str) for s in state)


def test_the_docs_python_example_runs(tmp_path, monkeypatch):
    """docs/synth.md's Python block, with its ``tokenizer`` and ``model`` a tiny random model's."""
    from tests.test_readme import DOCS, python_blocks

    (block,) = python_blocks(DOCS / "synth.md")
    monkeypatch.chdir(tmp_path)
    tok = word_tokenizer()
    text = "paris is the capital of france . berlin is in germany . " * 8
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": text}) + "\n" for i in range(3))
    )
    namespace = {"tokenizer": tok, "model": tiny_model("llama", vocab_size=len(tok), seed=0, attn="sdpa")}
    exec(compile(block, "docs/synth.md", "exec"), namespace)
    report = namespace["report"]
    assert report["chunks_generated"] == report["chunks"] >= 3
    assert (tmp_path / "synth" / "train.jsonl").is_file() and (
        tmp_path / "synth" / "train.report.json"
    ).is_file()
