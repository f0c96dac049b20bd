"""Instruction records: the loss covers the assistant turns (and their end-of-turn token) only."""

import pytest

from ragkern.data import build_bpe_tokenizer, encode
from tests.ragkern.tiny import word_tokenizer

CHAT = {
    "messages": [
        {"role": "system", "content": "answer in a word"},
        {"role": "user", "content": "who lives in paris?"},
        {"role": "assistant", "content": "alpha lives in paris"},
        {"role": "user", "content": "and in rome?"},
        {"role": "assistant", "content": "beta"},
    ]
}
TEXT = (
    "alpha lives in paris. beta lives in rome. who lives in berlin? gamma works in the city of madrid. " * 20
)


def bpe_tokenizer():
    """A byte-level BPE trained on the test text: tokens merge across words' spaces, like real tokenizers."""
    return build_bpe_tokenizer([TEXT], vocab_size=300)


def target_runs(ex):
    """Maximal runs of consecutive target positions, as lists of token ids."""
    runs, cur = [], []
    for t in ex["labels"]:
        if t != -100:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("make", [word_tokenizer, bpe_tokenizer], ids=["word", "bpe"])
def test_chat_targets_are_each_assistant_turn_plus_end_of_turn(make):
    tok = make()
    ex = encode(CHAT, tok)
    assert ex["source"] == "instruct" and len(ex["labels"]) == len(ex["input_ids"]) == len(ex["block_ids"])
    runs = [tok.decode(r).strip() for r in target_runs(ex)]
    assert [r.replace(" ", "") for r in runs] == ["alphalivesinparis<|end|>", "beta<|end|>"]
    if make is bpe_tokenizer:
        # As rendered: content, the template's space, the end-of-turn token (the space must be generated too).
        assert runs == ["alpha lives in paris <|end|>", "beta <|end|>"]
        assert len(ex["input_ids"]) < len(tok.apply_chat_template(CHAT["messages"], tokenize=False))  # merged
    # Every target equals its input token (labels are not shifted here).
    assert all(t in (-100, i) for t, i in zip(ex["labels"], ex["input_ids"]))


@pytest.mark.parametrize("make", [word_tokenizer, bpe_tokenizer], ids=["word", "bpe"])
def test_prompt_completion_strings_train_the_completion_and_eos(make):
    tok = make()
    ex = encode({"prompt": "who lives in rome? ", "completion": "beta lives in rome."}, tok)
    assert ex["input_ids"][-1] == tok.eos_token_id
    (run,) = target_runs(ex)
    assert tok.decode(run).replace(" ", "") == "betalivesinrome.</s>"


def test_conversational_prompt_completion_trains_the_completion_only():
    tok = word_tokenizer()
    record = {"prompt": CHAT["messages"][:3] + CHAT["messages"][3:4], "completion": CHAT["messages"][4:]}
    runs = [tok.decode(r) for r in target_runs(encode(record, tok))]
    assert runs == ["beta <|end|>"]


def test_messages_need_a_chat_template():
    from ragkern.data import RecordError

    with pytest.raises(RecordError, match="need a tokenizer with a chat template"):
        encode(CHAT, word_tokenizer(chat_template=False))
