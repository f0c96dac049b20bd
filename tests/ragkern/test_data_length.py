"""Length policy: distractors dropped first, then passages truncated; question and answer never cut; counts."""

import logging

import pytest

from ragkern.data import ExampleTooLongError, encode, encode_records, fit_raft, pack_stats
from tests.ragkern.tiny import word_tokenizer

LONG = "the river of rome is in the city " * 6
RECORD = {
    "id": "r",
    "question": "who lives in paris?",
    "passages": [LONG, "alpha lives in paris", LONG, "beta lives in rome"],
    "oracle": [1],
    "answer": "alpha lives in paris",
}


def decoded(tok, ex):
    return tok.decode(ex["input_ids"])


def answer_targets(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != -100])


def test_fits_untouched():
    tok = word_tokenizer()
    full = encode(RECORD, tok)
    ex, report = fit_raft(RECORD, tok, len(full["input_ids"]))
    assert ex == full and not report.trimmed


def test_distractors_dropped_last_first_before_any_truncation():
    tok = word_tokenizer()
    full = len(encode(RECORD, tok)["input_ids"])
    ex, report = fit_raft(RECORD, tok, full - 5)
    # Dropping the last distractor (passage [4]) is enough; the oracle and markers stay as they were.
    assert report.dropped_distractors == 1 and report.truncated_passages == 0
    text = decoded(tok, ex)
    assert "[ 2 ] alpha lives in paris" in text and "[ 4 ]" not in text and "[ 3 ]" in text
    assert len(ex["input_ids"]) <= full - 5
    ex, report = fit_raft(RECORD, tok, full - 30)
    assert report.dropped_distractors == 2 and "[ 3 ]" not in decoded(tok, ex) and "[ 1 ]" in decoded(tok, ex)
    assert answer_targets(tok, ex) == "alpha lives in paris <|end|>"


@pytest.mark.parametrize("limit", [40, 32])
def test_then_passages_truncated_never_question_or_answer(limit):
    tok = word_tokenizer()
    record = {**RECORD, "passages": [LONG, "alpha lives in paris " + LONG], "oracle": [1]}
    ex, report = fit_raft(record, tok, limit)
    assert report.dropped_distractors == 1 and report.truncated_passages == 1
    assert len(ex["input_ids"]) <= limit
    text = decoded(tok, ex)
    assert "[ 2 ] alpha lives" in text and "who lives in paris ?" in text
    assert answer_targets(tok, ex) == "alpha lives in paris <|end|>"


def test_unfittable_is_dropped_and_counted(caplog):
    tok = word_tokenizer()
    with pytest.raises(ExampleTooLongError, match="cannot fit max_length=20"):
        fit_raft(RECORD, tok, 20)
    records = [RECORD, {**RECORD, "id": "long-answer", "answer": LONG}, {**RECORD, "id": "ok"}]
    with caplog.at_level(logging.WARNING):
        ds = encode_records(records, tok, max_length=48, show_progress=False)
    s = ds.stats
    assert (s.records, s.examples, s.trimmed, s.dropped_too_long, s.dropped_ids) == (
        3,
        2,
        2,
        1,
        ["long-answer"],
    )
    assert s.dropped_distractors == 6 and s.truncated_passages == 0  # all 3 distractors of both
    assert "trimmed 2 RAFT examples" in caplog.text and "dropped 1 of 3" in caplog.text
    assert all(answer_targets(tok, e) == "alpha lives in paris <|end|>" for e in ds.examples)
    # trim=False keeps the old policy: drop whatever is too long.
    assert (
        encode_records(records, tok, max_length=48, trim=False, show_progress=False).stats.dropped_too_long
        == 3
    )


def test_without_oracle_field_nothing_is_dropped_only_truncated():
    tok = word_tokenizer()
    record = {k: v for k, v in RECORD.items() if k != "oracle"}
    ex, report = fit_raft(record, tok, 60)
    assert report.dropped_distractors == 0 and report.truncated_passages >= 1
    assert all(f"[ {k} ]" in decoded(tok, ex) for k in (1, 2, 3, 4))


def test_pack_stats_reports_fill_and_policy(tmp_path):
    import json

    tok = word_tokenizer()
    records = [RECORD, {**RECORD, "id": "long-answer", "answer": LONG}, {"text": "rome " * 100}] + [
        {"text": "the river " * k} for k in range(1, 30)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    out = pack_stats(path, tok, 48, batch_size=4)
    assert out["policy"]["trimmed"] == 1 and out["policy"]["dropped_too_long"] == 1
    dap = [len(encode(r, tok)["input_ids"]) for r in records[2:]]
    chunks = sum(-(-n // 48) for n in dap if n > 48)
    assert out["policy"]["dap_chunks"] == chunks and out["examples"] == 1 + chunks + sum(n <= 48 for n in dap)
    assert sum(out["histogram"]["counts"]) == out["examples"] and out["length"]["max"] <= 48
    assert 0 < out["padding"]["fill_ratio"] < out["packing"]["fill_ratio"] <= 1
    assert out["packing_vs_padding"] > 1
