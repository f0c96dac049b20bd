"""A fictional domain whose facts are fixed for a seed: a corpus to pretrain on, questions to retrieve for.

The domain is the reagent trade of the Veldmark, a world that exists nowhere else, so a model can know none of
it beforehand. Every reagent has seven facts (the guild that first isolated it, the year, its solvent, the
colour it turns there, its storage vessel, its stabiliser, its hazard rating), stated in two documents written in
the trade's own style and terminology::

    Compendium entry: Velkrine. Velkrine is a reagent of the Veldmark trade, first isolated by the Harrow Guild
    in the year 1712 of the Reckoning. Dissolved in tarspirit it turns saffron ...
    Handling notice for Velkrine. Keep Velkrine in a lead urn. Stabilise it with thornsalt ...

Each fact is stated in exactly one document (the compendium entry holds the guild, year, solvent and colour;
the handling notice the vessel, stabiliser and hazard), so a question has one oracle document. For a seed the
world is fixed: :func:`domain_world` returns the same reagents, documents and questions every time, and a
corpus therefore teaches something (unlike :mod:`ragkern.data.counterfactual`, which draws fresh facts for
every record).

Splits (:attr:`DomainWorld.qa`):

* ``train``: questions on the training reagents, all facts but one reserved per reagent;
* ``heldout_q``: the reserved fact of each training reagent (its document was trained on, this question not);
* ``heldout_doc``: questions on held-out reagents whose documents are in no training split (only reading the
  retrieved passage can answer them);
* ``update``: a fact of some training reagents changed after training: the question's oracle is a revised
  document (``"edition": 2``) stating the new value, so the passage contradicts what pretraining on the first
  edition taught. ``"previous_answer"`` holds the old value.

The DAP corpus (:meth:`DomainWorld.dap_records`) is the training reagents' documents (first editions); the
perplexity set (:meth:`DomainWorld.heldout_documents`) the held-out reagents' documents; the retrieval corpus
(:meth:`DomainWorld.retrieval_corpus`) every document a deployed system would index after the update (revised
editions replace first ones).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

GUILDS = (
    "Harrow Guild", "Ember Guild", "Saltmere Guild", "Lantern Guild", "Copperhand Guild", "Reedmoor Guild",
    "Ashwick Guild", "Greyfen Guild", "Tallow Guild", "Brinehall Guild", "Quillmarch Guild", "Oakvane Guild",
)  # fmt: skip
SOLVENTS = (
    "tarspirit", "brine", "marrow oil", "fen water", "lye milk", "ash vinegar", "pale ether", "resin wine",
    "salt dew", "kiln water",
)  # fmt: skip
COLOURS = (
    "saffron", "teal", "crimson", "violet", "ochre", "indigo", "scarlet", "olive", "silver", "coral", "maroon",
    "jade",
)  # fmt: skip
VESSELS = (
    "lead urn", "amber flask", "glass ampoule", "clay jar", "copper bottle", "wax-sealed gourd", "iron kettle",
    "horn vial", "stone crock", "tin canister",
)  # fmt: skip
STABILISERS = (
    "thornsalt", "greywax", "moss ash", "bluecap resin", "bone chalk", "cinderweed", "pitch lime", "frostgrain",
    "oak gall", "rust powder", "soot honey", "marsh borax",
)  # fmt: skip
HAZARDS = ("gale", "bramble", "murk", "tide", "glare", "hollow", "rime", "dusk")
YEARS = tuple(str(y) for y in range(1640, 1790))

# relation -> (values, question templates, document the fact is stated in)
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "guild": (
        GUILDS,
        ("Which guild first isolated {n}?", "{n} was first isolated by which guild?"),
        "compendium",
    ),
    "year": (
        YEARS,
        ("In which year of the Reckoning was {n} first isolated?", "When was {n} first isolated?"),
        "compendium",
    ),
    "solvent": (
        SOLVENTS,
        ("In which solvent is {n} dissolved for assay?", "What solvent does the assay of {n} use?"),
        "compendium",
    ),
    "colour": (
        COLOURS,
        ("What colour does {n} turn when dissolved?", "Which colour does a solution of {n} take?"),
        "compendium",
    ),
    "vessel": (
        VESSELS,
        ("In what vessel must {n} be kept?", "What vessel is {n} stored in?"),
        "handling",
    ),
    "stabiliser": (
        STABILISERS,
        ("What is {n} stabilised with?", "Which stabiliser does {n} need?"),
        "handling",
    ),
    "hazard": (
        HAZARDS,
        ("What is the hazard rating of {n}?", "Which hazard rating does {n} carry?"),
        "handling",
    ),
}
RELATION_NAMES = tuple(RELATIONS)
DOCUMENT_KINDS = ("compendium", "handling")

_ONSETS = ("V", "K", "Th", "Br", "Qu", "S", "M", "Dr", "L", "Gr", "Z", "P", "T", "N", "Sk", "H")
_NUCLEI = ("el", "or", "ar", "is", "un", "ae", "ol", "ir", "en", "ath", "yn", "ov")
_CODAS = ("krine", "dane", "mite", "thol", "varine", "quil", "sate", "phine", "zene", "rox", "dric", "lum")

# Sentences of each document kind: (relations a sentence states, its templates). {n} is the reagent's name.
_COMPENDIUM = (
    (
        ("guild", "year"),
        (
            "{n} is a reagent of the Veldmark trade, first isolated by the {guild} in the year {year} of the "
            "Reckoning.",
            "The {guild} first isolated {n} in the year {year} of the Reckoning, and entered it in the Register.",
        ),
    ),
    (
        ("solvent", "colour"),
        (
            "Dissolved in {solvent} for assay, {n} turns {colour}.",
            "Its assay uses {solvent}, in which a sound sample of {n} turns {colour}.",
        ),
    ),
)
_HANDLING = (
    (("vessel",), ("Keep {n} in a {vessel} at all times.", "Store {n} only in a {vessel}.")),
    (
        ("stabiliser",),
        (
            "Stabilise {n} with {stabiliser} before it leaves the workshop.",
            "{n} is stabilised with {stabiliser}.",
        ),
    ),
    (
        ("hazard",),
        ("The Register gives {n} a hazard rating of {hazard}.", "{n} carries the {hazard} hazard rating."),
    ),
)
# Trade prose with no fact in it: the domain's style and terminology, for pretraining to absorb.
_FILLER = {
    "compendium": (
        "Assayers of the trade test every batch against the Register before sale.",
        "Like most reagents of its kind it is sold by the measure, never by the jar.",
        "Apprentices learn its preparation in their second winter at the bench.",
        "The Compendium records no mishap with it since the great flood of the Reckoning.",
    ),
    "handling": (
        "Workshops that ignore this notice forfeit their seal for a season.",
        "Label every vessel with the reagent's name and the day of its making.",
        "A wardens' inspection may ask to see the stabiliser's receipt.",
        "Spent reagent goes to the guild pits, never to the river.",
    ),
}
_TITLES = {"compendium": "Compendium entry: {n}", "handling": "Handling notice for {n}"}
_REVISED_TITLES = {
    "compendium": "Compendium entry: {n} (second edition)",
    "handling": "Handling notice for {n} (revised)",
}


@dataclass
class Reagent:
    """One reagent: its name and its seven facts (relation -> value)."""

    name: str
    facts: dict[str, str]


@dataclass
class DomainWorld:
    """The reagents, documents and questions of one seed (see the module docstring); build it with
    :func:`domain_world`.

    ``documents`` maps a document id (``"<reagent index>/<kind>"``, ``"/2"`` appended for a revised edition) to
    ``{"id", "title", "text", "reagent", "kind", "edition"}``; ``qa`` maps a split name to QA records
    ``{"id", "question", "answer", "oracle_passages": [document], "relation", "reagent", "split"}`` (``update``
    records also hold ``"previous_answer"``), in the format :class:`ragkern.data.RaftBuilder` takes.
    """

    seed: int
    reagents: list[Reagent]
    train_reagents: list[int]
    heldout_reagents: list[int]
    documents: dict[str, dict] = field(default_factory=dict)
    qa: dict[str, list[dict]] = field(default_factory=dict)

    def dap_records(self) -> list[dict]:
        """The DAP corpus: the training reagents' documents (first editions) as ``{"text", "source": "dap"}``."""
        return [
            {"text": _as_text(d), "source": "dap", "id": d["id"]}
            for d in self.documents.values()
            if d["reagent"] in self._train and d["edition"] == 1
        ]

    def heldout_documents(self) -> list[str]:
        """Texts of the held-out reagents' documents, for perplexity: the domain's style without its facts."""
        return [_as_text(d) for d in self.documents.values() if d["reagent"] in self._heldout]

    def retrieval_corpus(self) -> list[dict]:
        """Every document a deployed system indexes: all reagents, revised editions replacing first ones."""
        revised = {d["id"].rsplit("/", 1)[0] for d in self.documents.values() if d["edition"] == 2}
        return [
            {"id": d["id"], "title": d["title"], "text": d["text"]}
            for d in self.documents.values()
            if not (d["edition"] == 1 and d["id"] in revised)
        ]

    @property
    def _train(self) -> set[int]:
        return set(self.train_reagents)

    @property
    def _heldout(self) -> set[int]:
        return set(self.heldout_reagents)


def _as_text(document: dict) -> str:
    return f"{document['title']}. {document['text']}"


def _names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _document(rng: random.Random, index: int, reagent: Reagent, kind: str, edition: int = 1) -> dict:
    sentences = []
    for relations, templates in _COMPENDIUM if kind == "compendium" else _HANDLING:
        values = {r: reagent.facts[r] for r in relations}
        sentences.append(rng.choice(templates).format(n=reagent.name, **values))
    for filler in rng.sample(_FILLER[kind], 2):
        sentences.insert(rng.randrange(1, len(sentences) + 1), filler)  # the first sentence names the reagent
    titles = _TITLES if edition == 1 else _REVISED_TITLES
    return {
        "id": f"{index}/{kind}" + ("/2" if edition == 2 else ""),
        "title": titles[kind].format(n=reagent.name),
        "text": " ".join(sentences),
        "reagent": index,
        "kind": kind,
        "edition": edition,
    }


def _qa(rng: random.Random, index: int, reagent: Reagent, relation: str, document: dict, split: str) -> dict:
    passage = {"id": document["id"], "title": document["title"], "text": document["text"]}
    return {
        "id": f"{split}-{index}-{relation}",
        "question": rng.choice(RELATIONS[relation][1]).format(n=reagent.name),
        "answer": reagent.facts[relation],
        "oracle_passages": [passage],
        "relation": relation,
        "reagent": index,
        "split": split,
    }


def domain_world(
    seed: int = 0, *, num_reagents: int = 200, heldout_fraction: float = 0.2, num_updates: int = 20
) -> DomainWorld:
    """The fixed world of ``seed``: ``num_reagents`` reagents, ``heldout_fraction`` of them held out, and
    ``num_updates`` training reagents with one fact revised after training (see the module docstring)."""
    if num_reagents < 2:
        raise ValueError(f"num_reagents={num_reagents}: need at least 2 (one to train on, one held out)")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
    n_heldout = max(1, round(num_reagents * heldout_fraction))
    n_train = num_reagents - n_heldout
    if not 0 <= num_updates <= n_train:
        raise ValueError(f"num_updates={num_updates} must be in [0, {n_train}] (the training reagents)")
    rng = random.Random(f"ragkern-domain-{seed}")
    reagents = [
        Reagent(name, {r: rng.choice(RELATIONS[r][0]) for r in RELATION_NAMES})
        for name in _names(rng, num_reagents)
    ]
    order = list(range(num_reagents))
    rng.shuffle(order)
    heldout, train = sorted(order[:n_heldout]), sorted(order[n_heldout:])
    world = DomainWorld(seed, reagents, train, heldout)
    for i, reagent in enumerate(reagents):
        for kind in DOCUMENT_KINDS:
            doc = _document(rng, i, reagent, kind)
            world.documents[doc["id"]] = doc
    splits: dict[str, list[dict]] = {"train": [], "heldout_q": [], "heldout_doc": [], "update": []}
    for i in train:
        reserved = rng.choice(RELATION_NAMES)
        for relation in RELATION_NAMES:
            doc = world.documents[f"{i}/{RELATIONS[relation][2]}"]
            split = "heldout_q" if relation == reserved else "train"
            splits[split].append(_qa(rng, i, reagents[i], relation, doc, split))
    for i in heldout:
        for relation in RELATION_NAMES:
            doc = world.documents[f"{i}/{RELATIONS[relation][2]}"]
            splits["heldout_doc"].append(_qa(rng, i, reagents[i], relation, doc, "heldout_doc"))
    for i in sorted(rng.sample(train, num_updates)):
        relation = rng.choice(RELATION_NAMES)
        old = reagents[i].facts[relation]
        new = rng.choice([v for v in RELATIONS[relation][0] if v != old])
        revised = Reagent(reagents[i].name, {**reagents[i].facts, relation: new})
        doc = _document(rng, i, revised, RELATIONS[relation][2], edition=2)
        world.documents[doc["id"]] = doc
        record = _qa(rng, i, revised, relation, doc, "update")
        record["previous_answer"] = old
        splits["update"].append(record)
    world.qa = splits
    return world
