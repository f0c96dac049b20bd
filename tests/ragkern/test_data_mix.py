"""Hybrid mixing: rates within statistical bounds, source tags, mixed schemas encoded together."""

import math

import numpy as np
import pytest

from ragkern.data import encode_records, iter_mix, mix_sources
from tests.ragkern.tiny import word_tokenizer

RAFT = {"question": "who lives in paris?", "passages": ["alpha lives in paris"], "answer": "alpha"}
CHAT = {
    "messages": [{"role": "user", "content": "who lives in rome?"}, {"role": "assistant", "content": "beta"}]
}
DAP = {"text": "the river of rome"}


def test_mix_rates_within_bounds_and_tags():
    sources = {"raft": [RAFT] * 5000, "instruct": [CHAT] * 5000, "dap": [DAP] * 5000}
    weights = {"raft": 0.6, "instruct": 0.3, "dap": 0.1}
    out = mix_sources(sources, weights, num_records=3000, seed=0)
    assert len(out) == 3000
    for name, w in weights.items():
        rate = np.mean([r["source"] == name for r in out])
        assert abs(rate - w) < 5 * math.sqrt(w * (1 - w) / len(out)), (name, rate)
    assert all(
        set(r) - {"source"} == set({"raft": RAFT, "instruct": CHAT, "dap": DAP}[r["source"]]) for r in out
    )
    assert mix_sources(sources, weights, num_records=3000, seed=0) == out
    assert mix_sources(sources, weights, num_records=3000, seed=1) != out


def test_stopping_rules_and_no_duplicates():
    sources = {"a": [{"text": f"a {i}"} for i in range(10)], "b": [{"text": f"b {i}"} for i in range(1000)]}
    first = mix_sources(sources, {"a": 1, "b": 1}, seed=0)
    assert sum(r["source"] == "a" for r in first) == 10 and len(first) < 60  # stops when "a" runs out
    every = mix_sources(sources, {"a": 1, "b": 1}, seed=0, stopping="all_exhausted")
    assert len(every) == 1010 and len({r["text"] for r in every}) == 1010
    # Streams: order within a source is kept, nothing is materialised up front.
    stream = iter_mix({"a": iter(sources["a"]), "b": iter(sources["b"])}, {"a": 1, "b": 3}, seed=0)
    got = [r["text"] for r in stream if r["source"] == "a"]
    assert got == [f"a {i}" for i in range(len(got))]


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="unknown sources"):
        mix_sources({"a": [DAP]}, {"b": 1})
    with pytest.raises(ValueError, match="not all 0"):
        mix_sources({"a": [DAP]}, {"a": 0})


def test_mixed_schemas_encode_with_their_source_and_targets():
    tok = word_tokenizer()
    out = mix_sources(
        {"raft": [RAFT] * 20, "chat": [CHAT] * 20, "dap": [DAP] * 20}, {"raft": 1, "chat": 1, "dap": 1}
    )
    ds = encode_records(out, tok, max_length=64, show_progress=False)
    assert ds.stats.per_source == {s: sum(r["source"] == s for r in out) for s in ("raft", "chat", "dap")}
    for ex in ds.examples:
        targets = tok.convert_ids_to_tokens([t for t in ex["labels"] if t != -100])
        expected = {"raft": ["alpha", "<|end|>"], "chat": ["beta", "<|end|>"]}.get(ex["source"])
        assert targets == (expected or tok.convert_ids_to_tokens(ex["input_ids"]))
