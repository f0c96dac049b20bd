"""Counterfactual RAFT records in real English: fictional people, facts drawn fresh per record.

Every record asks one fact about one fictional person. Its passages are short biographies in plain English,
one of the person asked about (the oracle) and the others of other fictional people (distractors); each
biography states the same kinds of facts (birth city and year, profession, the city the person moved to, an
instrument, a favourite colour), every value drawn fresh for the record::

    [1] Orvela Tamsick was born in Lisbon in 1947. Tamsick worked as a beekeeper and later moved to Oslo,
        where Orvela Tamsick learned to play the cello. Tamsick's favourite colour was teal.
    [2] Brannic Vosswell ... was born in Cairo ...                          (a distractor: same kinds of facts)
    Question: In which city was Orvela Tamsick born?  -> "Lisbon"            (oracle = [0])

So the fact asked is stated in the oracle passage and nowhere else: a model can neither know it beforehand
nor memorise it, only read it. The distractors state values of the same kinds for other people (one of them
may equal the answer by chance), and the oracle may hold a second city, so reading means matching the name and
the fact asked. With the oracle removed (the control),
the best a model can do is guess a value of the right kind: :func:`chance` is the expected exact match of a
uniform guess.

``extra_sentences`` pads biographies with further drawn facts (trips, letters, gardens...) to reach the
passage lengths of real retrieval (40-200 words), e.g. for throughput benchmarks.
"""

from __future__ import annotations

import random

CITIES = (
    "Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Nairobi", "Havana", "Prague", "Manila", "Quito",
    "Helsinki", "Seoul", "Madrid", "Athens", "Warsaw", "Dakar", "Tunis", "Hanoi", "Bogota", "Riga", "Montreal",
    "Kyoto", "Sydney", "Glasgow", "Boston", "Naples", "Zurich", "Budapest", "Santiago", "Perth", "Bergen",
)  # fmt: skip
JOBS = (
    "beekeeper", "architect", "baker", "pilot", "nurse", "carpenter", "botanist", "lawyer", "tailor",
    "surveyor", "printer", "chemist", "sailor", "jeweller", "librarian", "potter", "engineer", "painter",
    "journalist", "veterinarian", "geologist", "translator", "photographer", "cartographer",
)  # fmt: skip
INSTRUMENTS = (
    "cello", "violin", "flute", "trumpet", "harp", "piano", "clarinet", "oboe", "banjo", "accordion",
    "saxophone", "guitar", "trombone", "mandolin", "bassoon", "harmonica",
)  # fmt: skip
COLOURS = (
    "teal", "crimson", "amber", "violet", "olive", "indigo", "scarlet", "ochre", "turquoise", "maroon",
    "lavender", "silver", "coral", "navy",
)  # fmt: skip
YEARS = tuple(str(y) for y in range(1900, 2000))

# Pieces of fictional names: first names and surnames built from a syllable and an ending.
_FIRST_A = (
    "Or",
    "Bran",
    "Tal",
    "Mir",
    "Ves",
    "Quen",
    "Dor",
    "Ilm",
    "Sar",
    "Kel",
    "Yor",
    "Fen",
    "Ald",
    "Rhon",
)
_FIRST_B = ("vela", "nic", "ira", "ado", "essa", "win", "oric", "una", "avel", "ette", "ian", "ora")
_LAST_A = ("Tam", "Voss", "Hal", "Brin", "Cor", "Wend", "Pell", "Dras", "Morr", "Ash", "Quill", "Tren", "Ebb")
_LAST_B = ("sick", "well", "mont", "dale", "worth", "by", "ford", "ley", "wick", "holt", "ton", "mere")

# Relation -> (value pool, sentence templates, question templates). {n} full name, {s} surname, {v} value,
# {a} its article.
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "birth_city": (
        CITIES,
        (
            "{n} was born in {v}.",
            "{n} was born in the city of {v}.",
            "{s} grew up in {v}, where {s} was born.",
        ),
        ("In which city was {n} born?", "Where was {n} born?", "What is the birthplace of {n}?"),
    ),
    "birth_year": (
        YEARS,
        (
            "{n} was born in {v}.",
            "{s} was born in the year {v}.",
            "Records give {v} as the birth year of {n}.",
        ),
        ("In what year was {n} born?", "When was {n} born?", "What is the birth year of {n}?"),
    ),
    "job": (
        JOBS,
        ("{s} worked as {a} {v}.", "{n} made a living as {a} {v}.", "By trade, {s} was {a} {v}."),
        ("What was the profession of {n}?", "What did {n} work as?", "What was {n}'s job?"),
    ),
    "moved_to": (
        CITIES,
        (
            "Later in life {s} moved to {v}.",
            "{s} settled in {v} after leaving home.",
            "{n} later moved to {v}.",
        ),
        ("To which city did {n} move?", "Where did {n} settle later in life?", "Which city did {n} move to?"),
    ),
    "instrument": (
        INSTRUMENTS,
        ("{s} played the {v}.", "{n} learned to play the {v}.", "In the evenings {s} practised the {v}."),
        ("Which instrument did {n} play?", "What instrument did {n} learn to play?"),
    ),
    "colour": (
        COLOURS,
        (
            "{s}'s favourite colour was {v}.",
            "{n} liked the colour {v} best.",
            "{s} always chose {v} clothes.",
        ),
        ("What was the favourite colour of {n}?", "Which colour did {n} like best?"),
    ),
}
RELATION_NAMES = tuple(RELATIONS)

# Filler facts for longer biographies ({s} surname, {c} a city, {y} a year, {k} a number).
_EXTRA = (
    "In {y} {s} travelled to {c} for the first time and stayed for {k} weeks.",
    "{s} wrote {k} letters to an old friend in {c}, most of them about the weather.",
    "A neighbour remembered that {s} kept a small garden with {k} rows of beans.",
    "{s} once walked from the harbour to the old market of {c} in a single afternoon.",
    "The local paper mentioned {s} in {y}, in a short note about a lost umbrella.",
    "Friends said {s} read {k} books every winter and rarely finished the last one.",
    "{s} spent the summer of {y} repairing a boat that never left the shore.",
    "On a visit to {c}, {s} bought a map that hung in the kitchen for {k} years.",
)


def _name(rng: random.Random, taken: set[str]) -> tuple[str, str]:
    while True:
        first = rng.choice(_FIRST_A) + rng.choice(_FIRST_B)
        last = rng.choice(_LAST_A) + rng.choice(_LAST_B)
        if last not in taken:  # a surname names one person per record: "{s}" is unambiguous
            taken.add(last)
            return f"{first} {last}", last


def _biography(
    rng: random.Random, full: str, last: str, facts: dict[str, str], extra: int, relation_order: list[str]
) -> str:
    sentences = [
        rng.choice(RELATIONS[r][1]).format(
            n=full, s=full if i == 0 else last, v=facts[r], a="an" if facts[r][0] in "aeiou" else "a"
        )
        for i, r in enumerate(relation_order)
    ]  # the first sentence names the person in full
    for _ in range(extra):
        template = rng.choice(_EXTRA)
        at = rng.randrange(1, len(sentences) + 1)  # the first sentence always names the person in full
        c, y, k = rng.choice(CITIES), rng.choice(YEARS), rng.randint(2, 40)
        sentences.insert(at, template.format(s=last, c=c, y=y, k=k))
    return " ".join(sentences)


def counterfactual_records(
    n: int,
    *,
    seed: int = 0,
    num_passages: int | tuple[int, int] = 4,
    relations: tuple[str, ...] = RELATION_NAMES,
    facts_per_passage: int = 5,
    extra_sentences: int | tuple[int, int] = 0,
) -> list[dict]:
    """``n`` RAFT records ``{"id", "question", "passages", "answer", "oracle", "relation"}``, seeded.

    Args:
        n: records to draw.
        seed: the generator's seed; different seeds give different people and facts (train / held-out sets).
        num_passages: passages per record (oracle + distractors), or a range ``(lo, hi)`` drawn per record.
        relations: the kinds of facts asked about (a subset of :data:`RELATION_NAMES`).
        facts_per_passage: facts stated by each biography (``1..len(RELATION_NAMES)``); the fact asked is
            always one of the oracle's.
        extra_sentences: filler sentences per biography (an int or a range), for longer passages.

    The oracle's position is drawn uniformly; ``"oracle"`` holds it (0-based).
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    lo, hi = (num_passages, num_passages) if isinstance(num_passages, int) else num_passages
    if not 1 <= lo <= hi:
        raise ValueError(f"num_passages={num_passages!r}: need 1 <= lo <= hi")
    unknown = sorted(set(relations) - set(RELATION_NAMES))
    if unknown or not relations:
        raise ValueError(f"relations {unknown or relations!r} are not a non-empty subset of {RELATION_NAMES}")
    if not 1 <= facts_per_passage <= len(RELATION_NAMES):
        raise ValueError(f"facts_per_passage={facts_per_passage} must be in [1, {len(RELATION_NAMES)}]")
    e_lo, e_hi = (extra_sentences, extra_sentences) if isinstance(extra_sentences, int) else extra_sentences
    if not 0 <= e_lo <= e_hi:
        raise ValueError(f"extra_sentences={extra_sentences!r}: need 0 <= lo <= hi")
    rng = random.Random(seed)
    records = []
    for i in range(n):
        asked = rng.choice(relations)
        k = rng.randint(lo, hi)
        oracle = rng.randrange(k)
        taken: set[str] = set()
        passages, answer, question = [], None, None
        for j in range(k):
            full, last = _name(rng, taken)
            others = [r for r in RELATION_NAMES if r != asked]
            chosen = [asked, *rng.sample(others, facts_per_passage - 1)]
            facts = {r: rng.choice(RELATIONS[r][0]) for r in chosen}
            if "birth_city" in facts and "moved_to" in facts:  # two different cities in one biography
                while facts["moved_to"] == facts["birth_city"]:
                    facts["moved_to"] = rng.choice(CITIES)
            order = list(chosen)
            rng.shuffle(order)
            passages.append(_biography(rng, full, last, facts, rng.randint(e_lo, e_hi), order))
            if j == oracle:
                answer = facts[asked]
                question = rng.choice(RELATIONS[asked][2]).format(n=full)
        records.append(
            {
                "id": f"cf-{seed}-{i}",
                "question": question,
                "passages": passages,
                "answer": answer,
                "oracle": [oracle],
                "relation": asked,
            }
        )
    return records


def without_oracle(record: dict) -> dict:
    """The control: the same question with the oracle passage removed (``"oracle": []``)."""
    drop = set(record.get("oracle") or [])
    passages = [p for i, p in enumerate(record["passages"]) if i not in drop]
    if not passages:
        raise ValueError(f"record {record.get('id')!r} has no passage but its oracle; nothing left to show")
    return {**record, "passages": passages, "oracle": []}


def chance(records: list[dict]) -> float:
    """Expected exact match of guessing each answer uniformly among the values of its relation."""
    if not records:
        raise ValueError("chance of no records is undefined")
    return sum(1 / len(RELATIONS[r["relation"]][0]) for r in records) / len(records)
