"""Smoke test of bench/tokenization.py: Dataset.map with num_proc 1 and 2 gives the same examples as encode_records."""

import importlib.util
import sys
from pathlib import Path

import pytest

from ragkern.data import encode_records

BENCH = Path(__file__).resolve().parents[2] / "bench" / "tokenization.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_tokenization", BENCH)
    module = importlib.util.module_from_spec(spec)
    # registered so the map workers (forked) unpickle the map function by reference, not by value
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_num_proc_runs_agree_with_encode_records(bench, tmp_path):
    result = bench.benchmark(
        16,
        tokens=300,
        num_procs=(1, 2),
        batch_size=4,
        vocab_size=600,
        text_words=20_000,
        cache_dir=str(tmp_path),
    )
    one, two = result["runs"]
    assert (one["num_proc"], two["num_proc"]) == (1, 2)
    assert one["records"] == one["examples"] == two["examples"] == 16
    assert one["output"]["input_ids"] == two["output"]["input_ids"]
    assert one["output"]["labels"] == two["output"]["labels"]
    assert 200 < one["mean_tokens_per_record"] < 400  # calibrated to about 300 tokens
    assert 0 < one["target_tokens"] < one["tokens"] and one["records_per_s"] > 0
    assert one["cpu_seconds"] > 0 and two["cpu_seconds"] > 0
    # the map function is the project's encode path, record for record
    words = bench.pseudo_words(5000)
    tok = bench.build_tokenizer(words, vocab_size=600, text_words=20_000)
    cols = bench.make_records(16, words, passage_words=result["setup"]["passage_words"])
    records = [dict(zip(cols, v)) for v in zip(*cols.values())]
    expected = encode_records(records, tok, max_length=2048, show_progress=False)
    assert [e["input_ids"] for e in expected.examples] == one["output"]["input_ids"]
    assert all(e["source"] == "raft" for e in one["output"])
