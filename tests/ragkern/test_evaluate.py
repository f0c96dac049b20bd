"""Greedy decoding and exact match on known cases, with a scripted model."""

import pytest
import torch

from ragkern.data import build_word_tokenizer, render_prompt
from ragkern.evaluate import evaluate_answers, exact_match, generate_answers, normalize_answer

WORDS = "kel mipel dovak zurin talop vasur what is the code of passages question".split()


class ScriptedLM(torch.nn.Module):
    """Returns one-hot logits: the next token for a known prefix, else token 0."""

    def __init__(self, table: dict[tuple, int], vocab_size: int):
        super().__init__()
        self.table, self.vocab_size = table, vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[tuple] = []

    def forward(self, input_ids):
        self.calls.append(tuple(input_ids.shape))
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for b, row in enumerate(input_ids.tolist()):
            logits[b, -1, self.table.get(tuple(row), 0)] = 1.0
        return type("Out", (), {"logits": logits})()


def scripted(tokenizer, records, replies):
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    table = {}
    for record, reply in zip(records, replies):
        prompt = tokenizer(render_prompt(record, tokenizer), add_special_tokens=False)["input_ids"]
        out = tokenizer(reply, add_special_tokens=False)["input_ids"] + [end] if reply is not None else []
        for k, t in enumerate(out):
            table[tuple(prompt + out[:k])] = t
    return ScriptedLM(table, len(tokenizer))


@pytest.mark.parametrize(
    "pred, answer, same",
    [
        ("kel", "kel", True),
        ("The Kel.", "kel", True),
        ("  dovak   mipel ", "dovak mipel", True),
        ("kel", "mipel", False),
        ("", "kel", False),
        ("dovak", "dovak mipel", False),
    ],
)
def test_exact_match(pred, answer, same):
    assert exact_match(pred, answer) is same
    assert normalize_answer("A  Code, of DOVAK!") == "code of dovak"


def test_evaluate_answers_scripted():
    tok = build_word_tokenizer(WORDS)
    records = [
        {"question": "dovak ?", "passages": ["dovak kel", "zurin mipel"], "answer": "kel", "oracle": [0]},
        {"question": "zurin ?", "passages": ["dovak kel", "zurin mipel"], "answer": "mipel", "oracle": [1]},
        {"question": "talop ?", "passages": ["talop vasur"], "answer": "vasur"},
        {
            "question": "what is the code of zurin ?",
            "passages": ["zurin kel"],
            "answer": "kel",
            "oracle": [0],
        },
        {"question": "dovak ?", "passages": ["zurin dovak", "dovak talop"], "answer": "talop", "oracle": [1]},
    ]
    replies = ["kel", "kel", "the vasur", "kel mipel", None]  # right, wrong, right, too long, <pad> (stop)
    model = scripted(tok, records, replies)
    out = evaluate_answers(model, tok, records, batch_size=2, max_new_tokens=4)
    assert out["count"] == 5
    assert [p["prediction"] for p in out["predictions"]] == ["kel", "kel", "the vasur", "kel mipel", ""]
    assert [p["exact_match"] for p in out["predictions"]] == [True, False, True, False, False]
    assert out["exact_match"] == pytest.approx(2 / 5)
    assert [p["index"] for p in out["predictions"]] == list(range(5))
    assert out["predictions"][2]["oracle"] is None and out["predictions"][4]["oracle"] == [1]
    assert max(shape[0] for shape in model.calls) <= 2  # batches of at most batch_size prompts


def test_generate_answers_stops_at_max_new_tokens():
    tok = build_word_tokenizer(WORDS)
    record = {"question": "dovak ?", "passages": ["dovak kel"], "answer": "kel"}
    prompt = tok(render_prompt(record, tok), add_special_tokens=False)["input_ids"]
    kel = tok.convert_tokens_to_ids("kel")
    table = {tuple(prompt + [kel] * k): kel for k in range(10)}  # never stops by itself
    model = ScriptedLM(table, len(tok))
    assert generate_answers(model, tok, [record], max_new_tokens=3) == ["kel kel kel"]
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(model, tok, [record], batch_size=0)
    with pytest.raises(ValueError, match="at least one record"):
        evaluate_answers(model, tok, [])
