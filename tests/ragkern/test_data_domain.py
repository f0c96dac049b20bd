"""The fictional domain (ragkern.data.domain) and the verifiable instructions (ragkern.data.instructions)."""

import random
import re

import pytest

from ragkern.data import RaftBuilder
from ragkern.data.domain import DOCUMENT_KINDS, RELATION_NAMES, RELATIONS, domain_world
from ragkern.data.instructions import (
    ANSWER_TYPES,
    HELDOUT_TYPES,
    TRAIN_TYPES,
    TYPES,
    apply_instruction,
    draw_instruction,
    follows,
    instruction_records,
    strip_format,
    with_instruction,
)
from ragkern.evaluate import exact_match


@pytest.fixture(scope="module")
def world():
    return domain_world(3, num_reagents=60, num_updates=6)


def test_world_is_fixed_for_a_seed_and_differs_across_seeds(world):
    again = domain_world(3, num_reagents=60, num_updates=6)
    assert again.documents == world.documents and again.qa == world.qa
    other = domain_world(4, num_reagents=60, num_updates=6)
    assert [r.facts for r in other.reagents] != [r.facts for r in world.reagents]


def test_each_fact_is_stated_in_exactly_its_oracle_document(world):
    for split, records in world.qa.items():
        for qa in records:
            reagent = world.reagents[qa["reagent"]]
            (oracle,) = qa["oracle_passages"]
            assert qa["answer"] in oracle["text"] and reagent.name in oracle["text"], qa["id"]
            assert reagent.name in qa["question"]
            # the reagent's other document never states this relation's value as its own fact
            kind = RELATIONS[qa["relation"]][2]
            other = world.documents[f"{qa['reagent']}/{next(k for k in DOCUMENT_KINDS if k != kind)}"]
            stated = re.search(rf"\b{re.escape(qa['answer'])}\b", other["text"])
            assert not stated or split == "update", qa["id"]


def test_no_value_is_a_word_of_another_relation_or_of_the_templates():
    """So a value found in a document is that document's fact, whatever the seed (e.g. no colour "amber" beside
    a vessel "amber flask")."""
    from ragkern.data import domain

    templates = [t for ts in domain._FILLER.values() for t in ts] + list(domain._TITLES.values())
    templates += [t for _, ts in domain._COMPENDIUM + domain._HANDLING for t in ts]
    for relation, (values, _, _) in RELATIONS.items():
        others = [v for r, (vs, _, _) in RELATIONS.items() if r != relation for v in vs] + templates
        for value in values:
            word = re.compile(rf"\b{re.escape(value)}\b", re.IGNORECASE)
            assert not any(word.search(o) for o in others), (relation, value)


def test_splits_are_disjoint_and_cover_the_reagents(world):
    train_q = {q["question"] for q in world.qa["train"]}
    assert not train_q & {q["question"] for q in world.qa["heldout_q"]}
    assert len(world.qa["heldout_q"]) == len(world.train_reagents)  # one reserved fact per training reagent
    assert len(world.qa["train"]) == len(world.train_reagents) * (len(RELATION_NAMES) - 1)
    assert len(world.qa["heldout_doc"]) == len(world.heldout_reagents) * len(RELATION_NAMES)
    assert {q["reagent"] for q in world.qa["heldout_doc"]} == set(world.heldout_reagents)
    dap_ids = {d["id"] for d in world.dap_records()}
    for qa in world.qa["heldout_doc"]:
        assert qa["oracle_passages"][0]["id"] not in dap_ids  # held-out documents are never pretrained on
    names = {world.reagents[i].name for i in world.heldout_reagents}
    assert all(any(n in text for n in names) for text in world.heldout_documents())
    assert not any(n in d["text"] for d in world.dap_records() for n in names)


def test_update_split_contradicts_the_pretraining_corpus(world):
    assert len(world.qa["update"]) == 6
    corpus_ids = {d["id"] for d in world.retrieval_corpus()}
    dap = {d["id"]: d["text"] for d in world.dap_records()}
    for qa in world.qa["update"]:
        assert qa["answer"] != qa["previous_answer"]
        revised = qa["oracle_passages"][0]
        assert revised["id"].endswith("/2") and revised["id"] in corpus_ids
        first = revised["id"][: -len("/2")]
        assert first not in corpus_ids  # the deployed index holds the revised edition only
        assert qa["previous_answer"] in dap[first]


def test_raft_builder_retrieves_hard_negatives_from_the_world(world):
    qa = world.qa["heldout_doc"][:5]
    builder = RaftBuilder(world.retrieval_corpus(), num_distractors=4, p_oracle=1.0, negatives="bm25", seed=0)
    for record, source in zip(builder.build_all(qa), qa):
        assert len(record["passages"]) == 5 and len(record["oracle"]) == 1
        assert record["passages"][record["oracle"][0]]["id"] == source["oracle_passages"][0]["id"]
        ids = [p["id"] for p in record["passages"]]
        assert len(set(ids)) == 5


@pytest.mark.parametrize("name", sorted(TYPES))
def test_each_instruction_type_checks_what_it_asks(name):
    rng = random.Random(name)
    for _ in range(20):
        spec = {"type": name, **TYPES[name].draw(rng)}
        response = apply_instruction("Harrow Guild keeps salt", spec)
        assert follows(response, spec), (spec, response)
    bad = {
        "uppercase": "Harrow Guild",
        "lowercase": "Harrow Guild",
        "json": '{"other": "x"}',
        "prefix": "Harrow Guild",
        "max_words": "one two three four five six",
        "quotes": 'say "Harrow" Guild',
        "suffix": "Harrow Guild",
        "bullets": "* not a bullet",
    }[name]
    assert not follows(bad, spec)
    assert not follows("", spec)


@pytest.mark.parametrize("name", ANSWER_TYPES)
def test_answer_types_keep_the_answer(name):
    rng = random.Random(0)
    spec = {"type": name, **TYPES[name].draw(rng)}
    for answer in ("wax-sealed gourd", "Harrow Guild", "1712"):
        assert exact_match(strip_format(apply_instruction(answer, spec), spec), answer), (spec, answer)


def test_instruction_records_follow_and_split_types():
    assert not set(TRAIN_TYPES) & set(HELDOUT_TYPES)
    records = instruction_records(50, seed=1)
    assert {r["instruction"]["type"] for r in records} <= set(TRAIN_TYPES)
    assert len({r["instruction"]["type"] for r in records}) > 2
    for r in records:
        assert follows(r["messages"][1]["content"], r["instruction"])
    held = instruction_records(10, seed=1, types=HELDOUT_TYPES)
    assert {r["instruction"]["type"] for r in held} <= set(HELDOUT_TYPES)
    assert instruction_records(50, seed=1) == records
    with pytest.raises(ValueError, match="unknown instruction type 'shout'"):
        instruction_records(1, types=("shout",))


def test_with_instruction_on_a_rag_question(world):
    qa = world.qa["heldout_doc"][0]
    spec = draw_instruction(random.Random(0), ANSWER_TYPES)
    record = with_instruction(qa, spec)
    assert record["question"].startswith(qa["question"]) and len(record["question"]) > len(qa["question"])
    assert follows(record["answer"], spec) and record["plain_answer"] == qa["answer"]
    with pytest.raises(ValueError, match="needs a 'question' and an 'answer'"):
        with_instruction({"id": "x", "text": "y"}, spec)
