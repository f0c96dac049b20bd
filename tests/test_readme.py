"""The Python snippets of the README and docs/ run as written (no download; the real-model ones in tests/real)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def run_blocks(path: Path, blocks: list[str] | None = None) -> dict:
    """Execute a page's Python blocks in order in one namespace; returns it."""
    namespace: dict = {}
    for i, block in enumerate(blocks if blocks is not None else python_blocks(path)):
        exec(compile(block, f"{path.relative_to(ROOT)} block {i}", "exec"), namespace)
    return namespace


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert pages and all(f"(docs/{name})" in readme for name in pages)


def test_record_format_examples_run(tmp_path, monkeypatch, capsys):
    page = DOCS / "formats.md"
    assert len(python_blocks(page)) >= 8
    monkeypatch.chdir(tmp_path)  # the examples write train.jsonl
    namespace = run_blocks(page)
    out = capsys.readouterr().out
    # the values the page's comments state
    assert "train.jsonl:3: field 'oracle[0]': record 'q3': oracle[0] = 5 is not a passage index" in out
    assert "Mara Vell [3] [2] raft/oracle" in out
    assert namespace["records"].skipped == 2 and len(namespace["records"]) == 2
    stats = namespace["dataset"].stats
    assert (stats.examples, stats.dropped_too_long, stats.trimmed, stats.dap_chunks) == (5, 1, 1, 3)
    assert stats.summary() in page.read_text().replace("\n# ", " ")


def test_streaming_example_runs(capsys):
    namespace = run_blocks(DOCS / "streaming.md")
    rows, train = namespace["rows"], namespace["train"]
    assert rows and all(r["input_ids"].shape[1] <= 256 for r in rows)
    assert 0 < train.fill_ratio <= 1 and capsys.readouterr().out.strip()


@pytest.mark.slow
def test_evaluation_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes runs/eval-demo
    namespace = run_blocks(DOCS / "training.md")
    metrics, predictions = namespace["metrics"], namespace["predictions"]
    assert 0 <= metrics["eval_answer_token_accuracy"] <= 1 and metrics["eval_loss"] > 0
    assert predictions.predictions.shape[0] == predictions.label_ids.shape[0] == 3
