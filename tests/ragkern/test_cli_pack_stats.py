"""`ragkern pack-stats` on a tmp JSONL with a tokenizer saved to disk."""

import importlib.util
import json

import pytest

from ragkern.cli import main
from ragkern.data import pack_stats
from tests.ragkern.tiny import word_tokenizer

LONG = " ".join(["alpha beta gamma delta"] * 10)  # 40 tokens
RECORDS = [
    {"question": "who lives in paris ?", "passages": ["alpha lives in paris", "beta"], "answer": "alpha"},
    {
        "question": "who works in rome ?",
        "passages": ["gamma works in rome"],
        "answer": "gamma",
        "oracle": [0],
    },
    # over 48 tokens: the distractor goes (trimmed), the oracle stays
    {"question": "what river ?", "passages": ["delta river", LONG], "answer": "delta", "oracle": [0]},
    {"text": LONG + " " + LONG},  # 81 tokens with EOS: two DAP chunks
    {"prompt": LONG, "completion": LONG},  # instruction over max_length: dropped
    {"messages": [{"role": "user", "content": "who ?"}, {"role": "assistant", "content": "alpha"}]},
]


@pytest.fixture()
def data(tmp_path):
    word_tokenizer().save_pretrained(tmp_path / "tok")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return tmp_path, path


def test_pack_stats_cli_prints_histogram_fill_and_policy(data, capsys):
    tmp_path, path = data
    argv = ["pack-stats", str(path), "--tokenizer", str(tmp_path / "tok"), "--max-length", "48"]
    assert main([*argv, "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    expected = pack_stats(str(path), word_tokenizer(), 48, batch_size=2)
    assert expected["policy"]["trimmed"] == 1 and expected["policy"]["dropped_too_long"] == 1
    assert expected["policy"]["dap_chunks"] == 2
    lines = out.splitlines()
    assert lines[0].startswith(f"{expected['examples']} examples, {expected['tokens']} tokens")
    bars = [line for line in lines if "|" in line]
    assert [int(line.split()[-1]) for line in bars] == expected["histogram"]["counts"]
    assert max(len(line.split("|")[1].split()[0]) for line in bars if "#" in line) == 40  # the longest bar
    assert f"ragkern packing           {expected['packing']['fill_ratio']:.4f} (" in out
    assert f"padding to the longest    {expected['padding']['fill_ratio']:.4f} (batches of 2)" in out
    assert f"packing / padding         {expected['packing_vs_padding']}x" in out
    ranges = [[int(x) for x in line.split("|")[0].split(" - ")] for line in bars]
    assert ranges[0][0] == 1 and ranges[-1][1] == 48  # whole-token ranges that tile 1..max_length
    assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:]))
    assert "RAFT trimmed to fit       1 (1 distractor passages dropped, 0 with truncated passages)" in out
    assert "dropped, too long         1" in out and "DAP chunks (split docs)   2" in out


def test_pack_stats_cli_png(data, capsys, monkeypatch):
    tmp_path, path = data
    argv = ["pack-stats", str(path), "--tokenizer", str(tmp_path / "tok"), "--max-length", "48"]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else find_spec(n, *a)
    )
    assert main([*argv, "--png", str(tmp_path / "h.png")]) == 2
    assert "--png needs matplotlib" in capsys.readouterr().err and not (tmp_path / "h.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert main([*argv, "--png", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pack_stats_explains_when_packing_fills_less_than_padding():
    from ragkern.cli import _packing_note

    small = {
        "tokens": 2930,
        "packing": {"bins": 7, "fill_ratio": 0.8175},
        "padding": {"batch_size": 8, "fill_ratio": 0.896},
    }
    note = " ".join(_packing_note(small, 512))
    assert "the data is small: 2,930 tokens fill 6 row(s) of 512" in note and "7 used" in note
    assert _packing_note({**small, "packing": {"bins": 6, "fill_ratio": 0.954}}, 512) == []
