import logging

import pytest

from ragkern.data import ExampleTooLongError, RecordError, encode, encode_records, render_prompt
from tests.ragkern.tiny import word_tokenizer

RAFT = {
    "id": "q1",
    "question": "who lives in paris?",
    "passages": ["alpha lives in paris", {"title": "rome", "text": "beta lives in rome"}],
    "answer": "alpha",
}


def decoded_targets(tok, example):
    return tok.convert_ids_to_tokens([t for t in example["labels"] if t != -100])


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain-template"])
def test_raft_labels_cover_answer_and_stop_token_only(chat):
    tok = word_tokenizer(chat_template=chat)
    ex = encode(RAFT, tok)
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["block_ids"])
    stop = "<|end|>" if chat else "</s>"
    assert decoded_targets(tok, ex) == ["alpha", stop]
    # Targets sit at the end: nothing of the prompt is a target.
    n_targets = sum(t != -100 for t in ex["labels"])
    assert all(t == -100 for t in ex["labels"][:-n_targets])
    assert ex["source"] == "raft"
    # The prompt used for generation is exactly the text before the answer.
    prompt_ids = tok(render_prompt(RAFT, tok), add_special_tokens=not chat)["input_ids"]
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain-template"])
def test_block_ids_mark_each_passage(chat):
    tok = word_tokenizer(chat_template=chat)
    ex = encode(RAFT, tok)
    tokens = tok.convert_ids_to_tokens(ex["input_ids"])
    by_block = {b: [t for t, bb in zip(tokens, ex["block_ids"]) if bb == b] for b in (1, 2)}
    assert by_block[1] == ["alpha", "lives", "in", "paris"]
    assert by_block[2] == ["rome", ":", "beta", "lives", "in", "rome"]
    assert set(ex["block_ids"]) == {0, 1, 2}
    # Markers "[k]" are block 0: a passage's block holds the same tokens whatever number the prompt gives it.
    marks = [i for i, t in enumerate(tokens) if t == "["]
    assert len(marks) == 2 and all(ex["block_ids"][i : i + 3] == [0, 0, 0] for i in marks)
    swapped = encode({**RAFT, "passages": RAFT["passages"][::-1]}, tok)
    swapped_tokens = tok.convert_ids_to_tokens(swapped["input_ids"])
    assert [t for t, b in zip(swapped_tokens, swapped["block_ids"]) if b == 2] == by_block[1]
    # The question and the answer are global (block 0).
    answer_pos = [i for i, t in enumerate(ex["labels"]) if t != -100]
    assert all(ex["block_ids"][i] == 0 for i in answer_pos)


def test_dap_labels_every_token():
    tok = word_tokenizer()
    ex = encode({"text": "the river of rome"}, tok)
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert ex["source"] == "dap" and set(ex["block_ids"]) == {0}


@pytest.mark.parametrize(
    "record, match",
    [
        ({**RAFT, "answer": ""}, "field 'answer' is empty"),
        ({k: v for k, v in RAFT.items() if k != "answer"}, "missing field 'answer'"),
        ({**RAFT, "answer": 3}, "field 'answer' must be a string, got int"),
        ({**RAFT, "question": ["x"]}, "field 'question' must be a string, got list"),
        ({**RAFT, "passages": []}, "field 'passages' must be a non-empty list"),
        ({k: v for k, v in RAFT.items() if k != "passages"}, "field 'passages' must be a non-empty list"),
        ({**RAFT, "passages": ["ok", 5]}, r"passages\[1\] must be a string or a dict"),
        ({**RAFT, "passages": ["ok", "  "]}, r"passages\[1\] is empty"),
        ({"id": "q1", "foo": 1}, "unknown record format"),
    ],
    ids=[
        "empty-answer",
        "missing-answer",
        "int-answer",
        "list-question",
        "no-passages",
        "missing-passages",
        "bad-passage",
        "blank-passage",
        "unknown",
    ],
)
def test_bad_records_name_record_and_field(record, match):
    with pytest.raises(RecordError, match=match) as info:
        encode(record, word_tokenizer())
    assert "record 'q1'" in str(info.value)


def test_tokenizer_without_eos_is_refused():
    tok = word_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        encode(RAFT, tok)


def test_too_long_examples_are_dropped_and_counted_or_refused(caplog):
    tok = word_tokenizer()
    n = len(encode(RAFT, tok)["input_ids"])
    with pytest.raises(ExampleTooLongError):
        encode(RAFT, tok, max_length=n - 1)
    # An answer longer than max_length cannot be trimmed (long passages would be: see test_data_length.py).
    records = [RAFT, {**RAFT, "id": "long", "answer": "alpha " * 200}, {"text": "rome " * 50}]
    with caplog.at_level(logging.WARNING):
        ds = encode_records(records, tok, max_length=n, show_progress=False)
    assert ds.stats.dropped_too_long == 1 and ds.stats.dropped_ids == ["long"]
    assert "dropped 1 of 3 records longer than max_length" in caplog.text
    # The long DAP document is split into chunks of at most max_length, every token kept.
    dap_tokens = len(encode({"text": "rome " * 50}, tok)["input_ids"])
    assert ds.stats.dap_chunks == -(-dap_tokens // n)
    assert sum(ds.lengths) == n + dap_tokens and max(ds.lengths) <= n
    with pytest.raises(RecordError, match="record #1: .*strict mode"):
        encode_records(records, tok, max_length=n, strict=True, show_progress=False)


def test_encode_records_names_the_bad_record_position():
    with pytest.raises(RecordError, match="record #1: record 'b': field 'answer' is empty"):
        encode_records(
            [RAFT, {**RAFT, "id": "b", "answer": " "}], word_tokenizer(), max_length=512, show_progress=False
        )
