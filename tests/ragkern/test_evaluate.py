"""Greedy decoding, exact match, token F1, answer parsing, oracle splits and citations on known cases."""

import pytest
import torch

from ragkern.data import RaftBuilder, build_word_tokenizer, render_prompt
from ragkern.data.encode import raft_target
from ragkern.evaluate import (
    DISTRACTORS_ONLY,
    ORACLE_PRESENT,
    UNLABELLED,
    evaluate_answers,
    exact_match,
    f1_score,
    format_metrics,
    generate_answers,
    normalize_answer,
    oracle_split,
    parse_answer,
    prompt_text,
    score_predictions,
)

WORDS = "kel mipel dovak zurin talop vasur what is the code of passages question".split()


class ScriptedLM(torch.nn.Module):
    """Returns one-hot logits: the next token for a known prefix, else token 0.

    Speaks the decoding protocol of ``generate_answers``: a call gets the new tokens only; the tokens seen so far
    are kept on the cache object, and the prefix of row b is its tokens where ``attention_mask`` is 1 (left
    padding dropped).
    """

    config = None

    def __init__(self, table: dict[tuple, int], vocab_size: int):
        super().__init__()
        self.table, self.vocab_size = table, vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[tuple] = []

    def forward(self, input_ids, attention_mask, past_key_values, **kwargs):
        self.calls.append(tuple(input_ids.shape))
        seen = torch.cat([getattr(past_key_values, "scripted", input_ids[:, :0]), input_ids], dim=1)
        past_key_values.scripted = seen
        assert attention_mask.shape == seen.shape
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for b, (row, keep) in enumerate(zip(seen.tolist(), attention_mask.tolist())):
            prefix = tuple(t for t, k in zip(row, keep) if k)
            logits[b, -1, self.table.get(prefix, 0)] = 1.0
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


def test_evaluate_answers_shows_a_progress_bar_unless_told_not_to(capsys):
    """A long evaluation is never silent: the bar is on by default (the recipe's evaluation before training
    showed nothing for minutes), and ``show_progress=False`` turns it off."""
    tok = build_word_tokenizer(WORDS)
    records = [
        {"question": "dovak ?", "passages": ["dovak kel"], "answer": "kel"},
        {"question": "zurin ?", "passages": ["zurin mipel"], "answer": "mipel"},
    ]
    model = scripted(tok, records, ["kel", "mipel"])
    assert evaluate_answers(model, tok, records, batch_size=1, max_new_tokens=2)["exact_match"] == 1.0
    err = capsys.readouterr().err
    assert "generating" in err and "2/2" in err
    evaluate_answers(model, tok, records, batch_size=1, max_new_tokens=2, show_progress=False)
    generate_answers(model, tok, records, batch_size=1, max_new_tokens=2, show_progress=False)
    assert "generating" not in capsys.readouterr().err


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


@pytest.mark.parametrize(
    "pred, answer, f1",
    [
        ("kel", "kel", 1.0),
        ("the kel mipel", "kel", 2 * (1 / 2) * 1 / (1 / 2 + 1)),  # precision 1/2, recall 1
        ("dovak kel", "kel mipel talop", 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)),
        ("kel kel", "kel", 2 * (1 / 2) * 1 / (1 / 2 + 1)),  # a repeated token counts once per occurrence
        ("zurin", "kel", 0.0),
        ("", "kel", 0.0),
        ("the", "a", 1.0),  # both empty after normalisation
        ("Kel [2].", "kel", 1.0),  # citation markers are not part of the answer
    ],
)
def test_f1_score(pred, answer, f1):
    assert f1_score(pred, answer) == pytest.approx(f1)


@pytest.mark.parametrize(
    "generated, answer",
    [
        ("kel", "kel"),
        ("dovak holds it [2].\n\nAnswer: kel [2]", "kel [2]"),
        ("because [ 2 ] . answer : kel", "kel"),  # a word-level decode spaces words and punctuation
        ("Answer: mipel\n\nANSWER:  kel ", "kel"),  # the last one wins
        ("answer kel", "answer kel"),  # no colon: not a separator
    ],
)
def test_parse_answer(generated, answer):
    assert parse_answer(generated) == answer


def test_parse_answer_reads_what_the_encoder_renders():
    target = raft_target({"reasoning": "dovak holds kel [1]", "answer": "kel"})
    assert parse_answer(target) == "kel"
    tok = build_word_tokenizer(WORDS + ["answer", "holds"])
    decoded = tok.decode(tok(target, add_special_tokens=False)["input_ids"])
    assert parse_answer(decoded) == "kel"


def test_oracle_split_of_built_records():
    corpus = [f"passage {i}" for i in range(20)]
    qa = [
        {"question": f"q{i}", "answer": "kel {cite}", "oracle_passages": [f"oracle {i}"]} for i in range(40)
    ]
    built = RaftBuilder(corpus, num_distractors=2, p_oracle=0.5, seed=1, split_source=True).build_all(qa)
    kinds = [oracle_split(r) for r in built]
    assert kinds == [ORACLE_PRESENT if r["oracle"] else DISTRACTORS_ONLY for r in built]
    assert 0 < kinds.count(DISTRACTORS_ONLY) < len(built)
    # the source tag alone decides when the oracle indices are gone
    assert [oracle_split({**r, "oracle": None}) for r in built] == kinds
    assert oracle_split({"question": "q", "passages": ["p"], "answer": "a"}) == UNLABELLED


def test_score_predictions_splits_and_citations():
    p = ["dovak kel", "zurin mipel", "talop vasur"]
    records = [
        {"question": "q", "passages": p, "answer": "kel", "oracle": [0]},
        {"question": "q", "passages": p, "answer": "mipel", "oracle": [1]},
        {"question": "q", "passages": p, "answer": "vasur talop", "oracle": [1, 2]},
        {"question": "q", "passages": p, "answer": "kel", "oracle": []},
        {"question": "q", "passages": p, "answer": "kel mipel", "source": "raft/no_oracle"},
        {"question": "q", "passages": p, "answer": "kel"},
    ]
    generated = [
        "dovak kel [1]\n\nAnswer: kel [1]",  # right, cites the oracle
        "mipel [1]",  # right, cites a distractor
        "vasur [3]",  # half right (F1 2/3), cites the second oracle
        "kel [2]",  # right
        "kel",  # F1 2/3
        "mipel",  # wrong
    ]
    out = score_predictions(records, generated)
    assert out["count"] == 6
    assert out["exact_match"] == pytest.approx(3 / 6)
    assert out["f1"] == pytest.approx((1 + 1 + 2 / 3 + 1 + 2 / 3 + 0) / 6)
    assert out["cite_oracle"] == pytest.approx(2 / 3)  # over the three records with oracle indices
    present, absent = out["splits"][ORACLE_PRESENT], out["splits"][DISTRACTORS_ONLY]
    assert present == pytest.approx(
        {"count": 3, "exact_match": 2 / 3, "f1": (2 + 2 / 3) / 3, "cite_oracle": 2 / 3}
    )
    assert absent["count"] == 2 and absent["exact_match"] == 0.5 and absent["cite_oracle"] is None
    assert absent["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["splits"][UNLABELLED] == {"count": 1, "exact_match": 0.0, "f1": 0.0, "cite_oracle": None}
    first = out["predictions"][0]
    assert first["prediction"] == "kel [1]" and first["generated"] == generated[0] and first["cites_oracle"]
    assert [q["cites_oracle"] for q in out["predictions"]] == [True, False, True, None, None, None]
    table = format_metrics(out)
    assert table.splitlines()[1].split() == ["all", "6", "0.500", "0.722", "0.667"]
    assert table.splitlines()[3].split() == ["distractors", "only", "2", "0.500", "0.833", "-"]
    with pytest.raises(ValueError, match="6 records but 5"):
        score_predictions(records, generated[:5])


def test_score_predictions_without_unlabelled_records_has_two_splits():
    out = score_predictions([{"question": "q", "passages": ["p"], "answer": "a", "oracle": [0]}], ["a"])
    assert list(out["splits"]) == [ORACLE_PRESENT, DISTRACTORS_ONLY]
    assert out["splits"][DISTRACTORS_ONLY] == {
        "count": 0,
        "exact_match": None,
        "f1": None,
        "cite_oracle": None,
    }


def test_evaluate_answers_reasoning_and_citation_scripted():
    tok = build_word_tokenizer(WORDS + ["answer", "holds"])
    passages = ["dovak kel", "zurin mipel"]
    records = [
        {"question": "dovak ?", "passages": passages, "answer": "kel", "oracle": [0], "reasoning": "x"},
        {"question": "zurin ?", "passages": passages, "answer": "mipel", "oracle": [], "reasoning": "x"},
    ]
    replies = ["dovak holds kel [1] answer: kel", "zurin holds kel [2] answer: kel"]
    out = evaluate_answers(scripted(tok, records, replies), tok, records, max_new_tokens=12)
    assert [p["prediction"] for p in out["predictions"]] == ["kel", "kel"]
    assert [p["exact_match"] for p in out["predictions"]] == [True, False]
    assert out["cite_oracle"] == 1.0
    assert out["splits"][ORACLE_PRESENT]["exact_match"] == 1.0
    assert out["splits"][DISTRACTORS_ONLY]["exact_match"] == 0.0


# Prompts of different lengths, so a batch needs left padding.
VARIED = [
    {"question": "who lives in rome ?", "passages": ["alpha lives in rome"], "answer": "alpha"},
    {
        "question": "where was beta born ?",
        "passages": ["beta was born in paris", "gamma works in madrid city", "delta is in berlin"],
        "answer": "paris",
    },
    {"question": "what is the capital of spain ?", "passages": ["madrid", "rome river"], "answer": "madrid"},
    {"question": "who ?", "passages": ["the mountain city of alpha is in italy , a river"], "answer": "x"},
    {"question": "which river ?", "passages": ["a river", "the river", "rome"], "answer": "river"},
]


def greedy_one_by_one(model, tokenizer, record, max_new_tokens):
    """The plain reference: the whole prefix re-run for every token, one prompt, no padding, no cache."""
    from ragkern.evaluate import stop_token_ids

    stop = stop_token_ids(model, tokenizer)
    ids = tokenizer(render_prompt(record, tokenizer), add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if t in stop:
                break
            out.append(t)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


@pytest.mark.parametrize("attn", ["eager", "sdpa", "ragkern"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_answers_equals_one_by_one_greedy(family, attn, one_thread):
    from tests.ragkern.tiny import tiny_model, word_tokenizer

    tok = word_tokenizer()
    reference = tiny_model(family, vocab_size=len(tok), seed=5, attn="eager")
    expected = [greedy_one_by_one(reference, tok, r, 6) for r in VARIED]
    assert "" in expected and any(len(e.split()) > 1 for e in expected)  # stops early and runs long
    model = tiny_model(family, vocab_size=len(tok), seed=5, attn=attn)
    for batch_size in (1, 2, 5):  # 2: padded batches of prompts that differ in length
        assert generate_answers(model, tok, VARIED, batch_size=batch_size, max_new_tokens=6) == expected


def test_generate_answers_equals_model_generate(one_thread):
    """Left-padded batches through transformers' own generate (greedy, the same stop tokens) agree."""
    from ragkern.evaluate import stop_token_ids
    from tests.ragkern.tiny import tiny_model, word_tokenizer

    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), seed=2, attn="ragkern")
    stop = sorted(stop_token_ids(model, tok))
    prompts = [render_prompt(r, tok) for r in VARIED]
    tok.padding_side = "left"
    batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    out = model.generate(
        **batch, max_new_tokens=5, do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id
    )
    expected = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        cut = next((k for k, t in enumerate(row) if t in stop), len(row))
        expected.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    assert generate_answers(model, tok, VARIED, batch_size=3, max_new_tokens=5) == expected


def test_generate_answers_batches_longest_first_and_keeps_the_order(capsys):
    tok = build_word_tokenizer(WORDS)
    records = [
        {"question": "dovak ?", "passages": ["dovak kel"], "answer": "kel"},
        {
            "question": "zurin ?",
            "passages": ["dovak kel mipel talop vasur", "zurin mipel"],
            "answer": "mipel",
        },
        {"question": "talop ?", "passages": ["talop vasur zurin"], "answer": "vasur"},
    ]
    model = scripted(tok, records, ["kel", "mipel dovak", "vasur"])
    assert generate_answers(model, tok, records, batch_size=2, show_progress=True) == [
        "kel",
        "mipel dovak",
        "vasur",
    ]
    lengths = [len(tok(render_prompt(r, tok), add_special_tokens=False)["input_ids"]) for r in records]
    prefill = [shape for shape in model.calls if shape[1] > 1]
    assert prefill == [(2, max(lengths)), (1, min(lengths))]  # records 1 and 2 together, left-padded
    assert "generating" in capsys.readouterr().err  # the progress bar


def test_generate_answers_on_a_peft_model(one_thread):
    """A LoRA-wrapped model (as after RagTrainer with peft) decodes through its adapters."""
    from peft import LoraConfig

    from ragkern.trainer import get_peft_model_quietly
    from tests.ragkern.tiny import tiny_model, word_tokenizer

    tok = word_tokenizer()
    model = get_peft_model_quietly(
        tiny_model("llama", vocab_size=len(tok), seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    expected = [greedy_one_by_one(model, tok, r, 5) for r in VARIED]
    with model.disable_adapter():
        assert expected != [greedy_one_by_one(model, tok, r, 5) for r in VARIED]  # the adapters matter
    assert generate_answers(model, tok, VARIED, batch_size=3, max_new_tokens=5) == expected


def test_generate_answers_on_chat_records():
    """Instruction (chat) records are answered from their messages up to the last assistant turn."""
    tokenizer = build_word_tokenizer(WORDS)
    record = {
        "id": "c1",
        "messages": [
            {"role": "user", "content": "what is the code"},
            {"role": "assistant", "content": "kel"},
        ],
    }
    prompt = prompt_text(record, tokenizer)
    assert prompt == tokenizer.apply_chat_template(
        record["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    assert prompt_text({"messages": record["messages"][:1]}, tokenizer) == prompt  # no answer turn: the same
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply = tokenizer("mipel dovak", add_special_tokens=False)["input_ids"] + [end]
    model = ScriptedLM({tuple(ids + reply[:k]): t for k, t in enumerate(reply)}, len(tokenizer))
    assert generate_answers(model, tokenizer, [record], show_progress=False) == ["mipel dovak"]
    tokenizer.chat_template = None
    with pytest.raises(
        ValueError, match="'c1': a chat record needs user turns and a tokenizer with a chat template"
    ):
        prompt_text(record, tokenizer)
