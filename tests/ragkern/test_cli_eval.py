"""`ragkern eval` end to end on a tiny random Llama and the word tokenizer saved to disk."""

import json

import pytest

from ragkern.cli import main
from ragkern.data import LoadError
from ragkern.evaluate import evaluate_answers
from tests.ragkern.tiny import tiny_model, word_tokenizer

PASSAGES = ["paris is the capital of france", "berlin is in germany", "rome lives on a river"]
RECORDS = [
    {
        "id": 0,
        "question": "what is the capital of france ?",
        "passages": PASSAGES,
        "answer": "paris",
        "oracle": [0],
    },
    {"id": 1, "question": "where is berlin ?", "passages": PASSAGES, "answer": "germany", "oracle": [1]},
    {"id": 2, "question": "who lives on a river ?", "passages": PASSAGES, "answer": "rome", "oracle": [2]},
    {"id": 3, "question": "where is madrid ?", "passages": PASSAGES, "answer": "spain", "oracle": []},
    {
        "id": 4,
        "question": "what is the capital of italy ?",
        "passages": PASSAGES,
        "answer": "rome",
        "oracle": [],
    },
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), seed=3, attn="sdpa")
    model.save_pretrained(path / "model")
    tok.save_pretrained(path / "model")
    data = path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path, model, tok


def test_eval_cli_matches_the_python_api(saved, capsys):
    path, model, tok = saved
    out = path / "metrics.json"
    argv = ["eval", "--model", str(path / "model"), "--data", str(path / "eval.jsonl")]
    assert main([*argv, "--max-new-tokens", "3", "--batch-size", "2", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    expected = evaluate_answers(model, tok, RECORDS, max_new_tokens=3)
    assert [p["generated"] for p in metrics["predictions"]] == [
        p["generated"] for p in expected["predictions"]
    ]
    assert any(p["generated"] for p in metrics["predictions"])  # the random model does say something
    assert metrics["count"] == 5
    assert metrics["max_new_tokens"] == 3 and metrics["model"] == str(path / "model")
    assert metrics["splits"]["oracle_present"]["count"] == 3
    assert metrics["splits"]["distractors_only"]["count"] == 2
    assert metrics["exact_match"] == expected["exact_match"] and metrics["f1"] == expected["f1"]
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["split", "count", "EM", "F1", "cites", "oracle"]
    assert table[1].split()[:2] == ["all", "5"] and table[2].split()[:3] == ["oracle", "present", "3"]
    assert table[3].split()[:3] == ["distractors", "only", "2"]


def test_eval_cli_rejects_records_that_are_not_raft(saved, capsys):
    path, _, _ = saved
    bad = path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"text": "raw text"}) + "\n")
    assert main(["eval", "--model", str(path / "model"), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("ragkern eval: error: ")
        and "bad.jsonl:2: a dap record where raft records are expected" in err
    )
    with pytest.raises(LoadError, match=r"bad.jsonl:2: a dap record"):  # --debug: the exception itself
        main(["eval", "--model", str(path / "model"), "--data", str(bad), "--debug"])


def test_eval_on_a_folder_without_a_tokenizer_names_the_tokenizer_option(saved, capsys):
    """Not "You need to have sentencepiece or tiktoken installed": the folder holds no tokenizer, and
    --tokenizer gives one."""
    path, model, _ = saved
    model.save_pretrained(path / "weights_only")
    capsys.readouterr()  # save_pretrained's progress bar
    argv = ["eval", "--model", str(path / "weights_only"), "--data", str(path / "eval.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"ragkern eval: error: --model '{path / 'weights_only'}': the folder {path / 'weights_only'} holds no "
        "tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary file); pass the model's tokenizer "
        "with --tokenizer PATH (a tokenizer folder or a hub id)\n"
    )
    assert main([*argv, "--tokenizer", str(path / "weights_only")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(path / "model"), "--max-new-tokens", "1"]) == 0


def test_a_folder_with_tokenizer_files_keeps_the_library_error(tmp_path):
    """A tokenizer file that cannot be read (here a sentencepiece model that is not one) is not "no tokenizer"."""
    from ragkern.paths import load_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(Exception) as info:
        load_tokenizer(str(tmp_path), "--model", "pass --tokenizer")
    assert "holds no tokenizer" not in str(info.value)
