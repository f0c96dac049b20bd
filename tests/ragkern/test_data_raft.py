"""RAFT builder: seeded determinism, the oracle rate, distractors never the oracle, BM25 hard negatives."""

import math

import numpy as np
import pytest

from ragkern.data import RaftBuilder, RaftEpochDataset, encode
from ragkern.data.raft import bm25_tokens
from tests.ragkern.tiny import word_tokenizer

TOPICS = ["paris", "rome", "berlin", "madrid", "france", "italy", "germany", "spain"]
FILLER = ["river", "mountain", "city", "capital", "alpha", "beta", "gamma", "delta"]


def corpus_and_questions(n_corpus=160, n_questions=60, seed=0):
    rng = np.random.default_rng(seed)
    corpus = [
        {
            "id": f"p{i}",
            "title": TOPICS[i % 8],
            "text": " ".join(rng.choice(FILLER, 5)) + f" {TOPICS[i % 8]} {i}",
        }
        for i in range(n_corpus)
    ]
    qa = [
        {
            "id": f"q{j}",
            "question": f"what is in {TOPICS[j % 8]} ?",
            "answer": f"answer {j} {{cite}}",
            "oracle_passages": [corpus[j]],
        }
        for j in range(n_questions)
    ]
    return corpus, qa


def text(p):
    return p if isinstance(p, str) else f"{p.get('title')}: {p['text']}"


def test_same_seed_same_examples_other_seed_or_epoch_differs():
    corpus, qa = corpus_and_questions()
    a = RaftBuilder(corpus, num_distractors=3, seed=7).build_all(qa)
    b = RaftBuilder(corpus, num_distractors=3, seed=7).build_all(qa)
    assert a == b
    # Order-independent: one record built alone equals the same record built in the batch.
    assert RaftBuilder(corpus, num_distractors=3, seed=7).build(qa[17], index=17) == a[17]
    assert RaftBuilder(corpus, num_distractors=3, seed=8).build_all(qa) != a
    assert RaftBuilder(corpus, num_distractors=3, seed=7).build_all(qa, epoch=1) != a


def test_oracle_kept_at_rate_p_oracle_and_positions_right():
    corpus, qa = corpus_and_questions(n_questions=100)
    qa = qa * 25  # 2,500 draws (each index is its own draw)
    for p in (0.7, 0.3):
        out = RaftBuilder(corpus, num_distractors=2, p_oracle=p, seed=1).build_all(qa)
        rate = np.mean([bool(r["oracle"]) for r in out])
        # 5 standard deviations: a wrong rate (e.g. 0.5, or 1 - p) fails, a right one passes but for 1 in 1.7M.
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / len(out)), (p, rate)
        for r, q in zip(out, qa):
            assert len(r["passages"]) == 3  # the same count with and without the oracle
            if r["oracle"]:
                assert [r["passages"][k] for k in r["oracle"]] == q["oracle_passages"]
                assert r["answer"] == f"{q['answer'][:-7]} [{r['oracle'][0] + 1}]"
            else:
                assert r["answer"] == q["answer"][:-7]
    split = RaftBuilder(corpus, num_distractors=2, p_oracle=0.5, split_source=True).build_all(qa[:200])
    assert all(r["source"] == ("raft/oracle" if r["oracle"] else "raft/no_oracle") for r in split)
    assert all(r["oracle"] for r in RaftBuilder(corpus, p_oracle=1.0).build_all(qa[:200]))
    assert not any(r["oracle"] for r in RaftBuilder(corpus, p_oracle=0.0).build_all(qa[:200]))


def test_oracle_position_is_shuffled():
    corpus, qa = corpus_and_questions(n_questions=60)
    out = RaftBuilder(corpus, num_distractors=3, p_oracle=1.0).build_all(qa * 5)
    positions = np.bincount([r["oracle"][0] for r in out], minlength=4)
    assert positions.min() > 30  # 300 draws over 4 slots: about 75 each
    unshuffled = RaftBuilder(corpus, num_distractors=3, p_oracle=1.0, shuffle=False).build_all(qa)
    assert {tuple(r["oracle"]) for r in unshuffled} == {(0,)}


@pytest.mark.parametrize("negatives", ["random", "bm25"])
def test_distractors_never_equal_the_oracle(negatives):
    corpus, qa = corpus_and_questions()
    # Duplicates of an oracle in the corpus: by text (no id) and by id (other text).
    corpus = corpus + [text(corpus[j]) for j in range(10)] + [{"id": "p3", "text": "other"}]
    out = RaftBuilder(corpus, num_distractors=5, p_oracle=0.5, negatives=negatives, hard_pool=8).build_all(
        qa * 3
    )
    for r, q in zip(out, qa * 3):
        oracle = q["oracle_passages"][0]
        distractors = [p for k, p in enumerate(r["passages"]) if k not in r["oracle"]]
        assert all(text(d) != text(oracle) for d in distractors)
        assert all(not (isinstance(d, dict) and d.get("id") == oracle["id"]) for d in distractors)


def test_bm25_negatives_rank_lexically_closer_than_random():
    corpus, qa = corpus_and_questions()

    def overlap(records):
        return np.mean(
            [
                len(set(bm25_tokens(r["question"])) & set(bm25_tokens(text(p))))
                for r in records
                for k, p in enumerate(r["passages"])
                if k not in r["oracle"]
            ]
        )

    hard = overlap(RaftBuilder(corpus, num_distractors=3, negatives="bm25", hard_pool=6).build_all(qa))
    rand = overlap(RaftBuilder(corpus, num_distractors=3, negatives="random").build_all(qa))
    # The question's topic word is in 1 of 8 passages: random shares it ~1/8 of the time, BM25 nearly always.
    assert hard > 0.9 and rand < 0.4, (hard, rand)


def test_too_small_corpus_and_bad_options_are_refused():
    corpus, qa = corpus_and_questions(n_corpus=4, n_questions=1)
    with pytest.raises(ValueError, match="fewer than the 5 distractors"):
        RaftBuilder(corpus, num_distractors=5).build(qa[0], index=0)
    with pytest.raises(ValueError, match="p_oracle must be in"):
        RaftBuilder(corpus, p_oracle=1.5)
    with pytest.raises(ValueError, match="negatives must be"):
        RaftBuilder(corpus, negatives="dense")


def test_reasoning_is_a_target_before_the_answer():
    tok = word_tokenizer()
    record = {
        "question": "who lives in paris?",
        "passages": ["alpha lives in paris", "beta lives in rome"],
        "oracle": [0],
        "reasoning": "passages [1] : alpha lives in paris",
        "answer": "alpha",
    }
    ex = encode(record, tok)
    targets = tok.decode([t for t in ex["labels"] if t != -100])
    assert targets == "passages [ 1 ] : alpha lives in paris answer : alpha <|end|>"


def test_epoch_dataset_resamples_every_epoch():
    corpus, qa = corpus_and_questions(n_questions=20)
    tok = word_tokenizer()
    ds = RaftEpochDataset(qa, RaftBuilder(corpus, num_distractors=2, seed=3), tok, max_length=256)
    first = [list(e["input_ids"]) for e in ds.examples]
    assert len(ds) == 20 and ds.lengths == [len(x) for x in first]
    ds.build_epoch(1)
    second = [list(e["input_ids"]) for e in ds.examples]
    assert sum(a != b for a, b in zip(first, second)) >= 15
    ds.build_epoch(0)
    assert [list(e["input_ids"]) for e in ds.examples] == first
    assert ds.lengths_for_epoch(1) == [len(x) for x in second]


def test_bm25_keeps_a_bounded_ranking_per_question_and_draws_as_a_full_ranking_would(monkeypatch):
    """The per-question cache holds the top hard_pool + margin passages, not a corpus-sized ranking, and the
    draws equal those from a full stable ranking: with BM25 ties (many passages share a word or score zero) and
    with more oracle passages excluded than the margin leaves room for (the whole corpus is ranked then)."""
    import ragkern.data.raft as raft_mod

    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(30)]
    corpus = [" ".join(rng.choice(words, size=6)) for _ in range(400)] + ["same words here"] * 50
    qa = [
        {"question": " ".join(rng.choice(words, size=3)), "answer": "a", "oracle_passages": [corpus[i]]}
        for i in range(0, 400, 7)
    ]
    qa.append({"question": "same words", "answer": "a", "oracle_passages": ["same words here"]})  # 50 excluded
    for margin in (raft_mod._RANK_MARGIN, 2):
        monkeypatch.setattr(raft_mod, "_RANK_MARGIN", margin)
        bounded = RaftBuilder(corpus, num_distractors=4, negatives="bm25", hard_pool=8, seed=1)
        full = RaftBuilder(corpus, num_distractors=4, negatives="bm25", hard_pool=8, seed=1)
        monkeypatch.setattr(full, "_ranked", lambda q, top, b=full: RaftBuilder._ranked(b, q, None))
        for epoch in (0, 1):  # the second epoch reads the cache
            assert [bounded.build(r, index=i, epoch=epoch) for i, r in enumerate(qa)] == [
                full.build(r, index=i, epoch=epoch) for i, r in enumerate(qa)
            ]
        assert max(len(v) for v in bounded._pools.values()) == 8 + margin < len(corpus)
