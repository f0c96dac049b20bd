"""Loading and validation: every bad input names its file, line and field, or is skipped and counted."""

import json

import pytest
from datasets import Dataset

from ragkern.data import LoadError, encode_records, iter_records, load_records
from tests.ragkern.tiny import word_tokenizer

RAFT = {
    "id": "q1",
    "question": "who lives in paris?",
    "passages": ["alpha lives in paris", "beta"],
    "answer": "alpha",
}


def write_jsonl(path, lines):
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return path


BAD = [
    (b'{"question": "q", "passages": ["p"], "answer": "a"', "malformed JSON", None),
    (b'{"question": "caf\xe9", "passages": ["p"], "answer": "a"}', "not valid UTF-8", None),
    ({**RAFT, "answer": 3}, "field 'answer' must be a string, got int", "answer"),
    ({**RAFT, "question": "   "}, "field 'question' is empty", "question"),
    ({**RAFT, "passages": ["ok", ""]}, r"passages\[1\] is empty", "passages[1]"),
    ({**RAFT, "oracle": [2]}, r"oracle\[0\] = 2 is not a passage index in \[0, 2\)", "oracle[0]"),
    ({**RAFT, "oracle": "0"}, "field 'oracle' must be a list", "oracle"),
    (
        {"messages": [{"role": "bot", "content": "hi"}]},
        r"messages\[0\].role = 'bot' is not one of",
        "messages[0].role",
    ),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn", "messages"),
    ({"prompt": "p", "completion": ""}, "field 'completion' is empty", "completion"),
    (
        {"question": "q", "answer": "a", "oracle_passages": []},
        "'oracle_passages' must be a non-empty list",
        "oracle_passages",
    ),
    ({"text": 5}, "field 'text' must be a string", "text"),
    ({"foo": 1}, "unknown record format", None),
]
IDS = [
    "malformed-json",
    "non-utf8",
    "int-answer",
    "blank-question",
    "empty-passage",
    "oracle-out-of-range",
    "oracle-not-list",
    "unknown-role",
    "no-assistant",
    "empty-completion",
    "no-oracle-passages",
    "int-text",
    "unknown-format",
]


@pytest.mark.parametrize("bad, match, field", BAD, ids=IDS)
def test_bad_line_names_file_line_and_field(tmp_path, bad, match, field):
    path = write_jsonl(tmp_path / "train.jsonl", [RAFT, {"text": "rome"}, bad, RAFT])
    with pytest.raises(LoadError, match=match) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert info.value.where == f"{path}:3" and info.value.field == field
    if field:
        assert f"field {field!r}" in str(info.value)


def test_lenient_loading_skips_and_counts(tmp_path, caplog):
    lines = [RAFT] + [b for b, _, _ in BAD] + [{"text": "rome"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    records = load_records(path, on_error="skip")
    assert len(records) == 2 and records.skipped == len(BAD)
    assert records.errors[0].startswith(f"{path}:2: malformed JSON")
    assert "skipped 13 invalid records" in caplog.text
    # Streaming the same file gives the same records without materialising it.
    assert list(iter_records(path, on_error="skip")) == list(records)


def test_kinds_restrict_the_accepted_formats(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [RAFT, {"text": "rome"}])
    with pytest.raises(LoadError, match=r"a\.jsonl:2: a dap record where raft records are expected"):
        load_records(path, kinds=("raft",))


def test_json_parquet_and_datasets_sources(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([RAFT, {**RAFT, "oracle": [0]}]))
    assert len(load_records(tmp_path / "a.json")) == 2
    (tmp_path / "b.json").write_text(json.dumps([RAFT, {**RAFT, "answer": ""}]))
    with pytest.raises(LoadError, match=r"b\.json record #1: field 'answer'"):
        load_records(tmp_path / "b.json")
    Dataset.from_list([{"text": "rome"}, {"text": ""}]).to_parquet(str(tmp_path / "c.parquet"))
    with pytest.raises(LoadError, match=r"c\.parquet row 1: field 'text': .*empty"):
        load_records(tmp_path / "c.parquet")
    ds = Dataset.from_list([{"text": "a"}, {"text": "b"}])
    assert load_records(ds) == [{"text": "a"}, {"text": "b"}]
    assert len(load_records([str(tmp_path / "a.json"), str(tmp_path / "a.json")])) == 4
    it = Dataset.from_list([{"text": "a"}, {"text": " "}]).to_iterable_dataset()
    with pytest.raises(LoadError, match="corpus row 1"):
        list(iter_records(it, name="corpus"))


def test_record_with_ten_thousand_passages_is_trimmed_not_crashed():
    tok = word_tokenizer()
    passages = ["beta lives in rome"] * 10_000
    passages[1234] = "alpha lives in paris"
    records = [{**RAFT, "passages": passages, "oracle": [1234]}]
    ds = encode_records(records, tok, max_length=64, show_progress=False)
    assert ds.stats.trimmed == 1 and ds.stats.dropped_distractors >= 9_990
    assert max(ds.lengths) <= 64
    assert "alpha lives in paris" in tok.decode(ds[0]["input_ids"])


def test_encode_records_lenient_mode_counts_bad_records():
    tok = word_tokenizer()
    ds = encode_records(
        [RAFT, {**RAFT, "answer": ""}, {"bad": 1}], tok, max_length=128, on_error="skip", show_progress=False
    )
    assert len(ds) == 1 and ds.stats.skipped_invalid == 2
    assert ds.stats.errors[0].startswith("record #1: record 'q1': field 'answer' is empty")
