"""The counterfactual RAFT set: only the oracle passage states the fact asked; seeded; the control drops it."""

import re

import pytest

from ragkern.data import validate_record
from ragkern.data.counterfactual import RELATIONS, chance, counterfactual_records, without_oracle


def test_records_are_valid_seeded_and_answerable_only_from_the_oracle():
    records = counterfactual_records(200, seed=3, num_passages=(2, 5))
    assert records == counterfactual_records(200, seed=3, num_passages=(2, 5))
    assert records != counterfactual_records(200, seed=4, num_passages=(2, 5))
    assert {r["relation"] for r in records} == set(RELATIONS)
    for r in records:
        assert validate_record(r) == "raft"
        (k,) = r["oracle"]
        assert 2 <= len(r["passages"]) <= 5
        oracle = r["passages"][k]
        (person,) = re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", r["question"])  # the person asked about
        assert person in oracle
        surname = person.split()[1]
        assert r["answer"] in oracle and r["answer"] in RELATIONS[r["relation"]][0]
        assert [surname in p for p in r["passages"]] == [i == k for i in range(len(r["passages"]))]
    assert {r["oracle"][0] for r in records} == set(range(5))


def test_extra_sentences_lengthen_passages():
    short = counterfactual_records(20, seed=0, num_passages=3)
    long = counterfactual_records(20, seed=0, num_passages=3, extra_sentences=(8, 12))
    words = lambda recs: [len(p.split()) for r in recs for p in r["passages"]]  # noqa: E731
    assert max(words(short)) < 60 and min(words(long)) > 100


def test_control_and_chance():
    (r,) = counterfactual_records(1, seed=1, num_passages=4)
    c = without_oracle(r)
    assert (
        c["oracle"] == [] and len(c["passages"]) == 3 and r["passages"][r["oracle"][0]] not in c["passages"]
    )
    assert c["question"] == r["question"] and c["answer"] == r["answer"]
    assert chance([r]) == 1 / len(RELATIONS[r["relation"]][0])
    with pytest.raises(ValueError, match="nothing left"):
        without_oracle(counterfactual_records(1, seed=1, num_passages=1)[0])
    with pytest.raises(ValueError, match="relations"):
        counterfactual_records(1, relations=("hair",))
