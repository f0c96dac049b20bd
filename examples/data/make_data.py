"""Write the small example data sets of examples/configs (fictional towns; deterministic).

    python examples/data/make_data.py      # rewrites the .jsonl files next to this script

corpus.jsonl    two passages per town {"id", "title", "text"}: its founding, its river and trade
qa.jsonl        QA records {"question", "answer", "oracle_passages", "reasoning"?} built into RAFT records
                against corpus.jsonl ({cite} becomes the oracle's marker)
raft.jsonl      ready RAFT records {"question", "passages", "answer", "oracle", "reasoning"?}
instruct.jsonl  instruction records: chats {"messages"} and {"prompt", "completion"}
dap.jsonl       raw text {"text"}: one short article per town
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

TOWNS = (
    "Velmora Ostrik Barrowden Quillan Tessaly Marnoch Elvaro Druskin Falloway Corvath Hestmere Pyrrin "
    "Saldane Thornby Ulmsted Varrow Wenlock Yarrowby Zelden Ambrose Brindle Caskel Dunmarrow Eskerby "
    "Fennick Galloway Harwick Islay Jorvik Kestrel"
).split()
FIRST = "Anna Bram Cora Dafydd Elsa Fenn Greta Hollis Ida Jory Kit Lena Milo Nell Oskar Pia".split()
LAST = "Brisk Calder Dunmore Everly Farrow Gable Hale Ingram Jessop Kell Lowry Marsh Nyland Orme".split()
TRADES = (
    "glassblowing salt wool clockmaking cheese rope paper lanterns boats honey slate bells candles "
    "barrels maps"
).split()
RIVERS = "Ost Lune Caddow Merle Sable Tarn Vey Wend Ayle Brisk Colm Dara".split()
JOBS = "weaver miller ferryman smith potter fisher mason brewer".split()


def towns(rng: random.Random) -> list[dict]:
    return [
        {
            "town": t,
            "founder": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "job": rng.choice(JOBS),
            "year": rng.randint(1100, 1890),
            "river": rng.choice(RIVERS),
            "trade": rng.choice(TRADES),
        }
        for t in TOWNS
    ]


def corpus(facts: list[dict]) -> list[dict]:
    out = []
    for f in facts:
        out.append(
            {
                "id": f"{f['town'].lower()}-founding",
                "title": f["town"],
                "text": f"{f['town']} was founded in {f['year']} by {f['founder']}, a {f['job']} from the hills.",
            }
        )
        out.append(
            {
                "id": f"{f['town'].lower()}-trade",
                "title": f["town"],
                "text": f"{f['town']} lies on the river {f['river']} and is known for its {f['trade']}.",
            }
        )
    return out


def qa(facts: list[dict], passages: list[dict]) -> list[dict]:
    by_id = {p["id"]: p for p in passages}
    out = []
    for i, f in enumerate(facts):
        r = {
            "id": f"qa-{i}",
            "question": f"Who founded {f['town']}?",
            "answer": f"{f['founder']} {{cite}}",
            "oracle_passages": [by_id[f"{f['town'].lower()}-founding"]],
        }
        if i % 2:
            r["reasoning"] = f"The passage {{cite}} says that {f['town']} was founded by {f['founder']}."
        out.append(r)
    return out


def raft(facts: list[dict], passages: list[dict], rng: random.Random) -> list[dict]:
    trade = {p["title"]: p for p in passages if p["id"].endswith("-trade")}
    out = []
    for i, f in enumerate(facts):
        others = rng.sample([t for t in TOWNS if t != f["town"]], 3)
        shown = [trade[f["town"]]] + [trade[t] for t in others]
        rng.shuffle(shown)
        k = shown.index(trade[f["town"]])
        r = {
            "id": f"raft-{i}",
            "question": f"What is {f['town']} known for?",
            "passages": [{"title": p["title"], "text": p["text"]} for p in shown],
            "answer": f"Its {f['trade']} [{k + 1}]",
            "oracle": [k],
        }
        if i % 3 == 0:
            r["reasoning"] = f"Passage [{k + 1}] is about {f['town']}: it is known for its {f['trade']}."
        out.append(r)
    return out


def instruct(facts: list[dict]) -> list[dict]:
    out = []
    for i, f in enumerate(facts):
        if i % 2:
            out.append(
                {"prompt": f"Name the river of {f['town']}.", "completion": f"The river {f['river']}."}
            )
        else:
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Write one sentence about {f['town']}."},
                        {
                            "role": "assistant",
                            "content": f"{f['town']} is a town on the river {f['river']}, founded in {f['year']}.",
                        },
                    ]
                }
            )
    return out


def dap(facts: list[dict]) -> list[dict]:
    return [
        {
            "text": f"{f['town']} is a small town on the river {f['river']}. It was founded in {f['year']} by "
            f"{f['founder']}, a {f['job']}. Today the town is known for its {f['trade']}, which is sold in "
            f"the markets of the valley. Every spring the people of {f['town']} hold a fair by the river."
        }
        for f in facts
    ]


def main() -> None:
    rng = random.Random(0)
    facts = towns(rng)
    passages = corpus(facts)
    files = {
        "corpus.jsonl": passages,
        "qa.jsonl": qa(facts, passages),
        "raft.jsonl": raft(facts, passages, rng),
        "instruct.jsonl": instruct(facts),
        "dap.jsonl": dap(facts),
    }
    for name, records in files.items():
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} records to {HERE / name}")


if __name__ == "__main__":
    main()
