"""The README's record-format examples run as they are, in order, in one session (no download)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_record_format_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", section(README.read_text(), "Record formats"), re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)  # the examples write train.jsonl
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md Record formats block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    # the values the README's comments state
    assert "train.jsonl:3: field 'oracle[0]': record 'q3': oracle[0] = 5 is not a passage index" in out
    assert "Mara Vell [3] [2] raft/oracle" in out
    assert namespace["records"].skipped == 2 and len(namespace["records"]) == 2
    stats = namespace["dataset"].stats
    assert (stats.examples, stats.dropped_too_long, stats.trimmed, stats.dap_chunks) == (5, 1, 1, 3)
    assert stats.summary() in section(README.read_text(), "Record formats").replace("\n# ", " ")
