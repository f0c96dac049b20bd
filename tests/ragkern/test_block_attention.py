"""Passage block attention (DESIGN.md kernel contract) and passage KV-cache reuse (ragkern.inference)."""

import pytest
import torch

from ragkern import PackingCollator
from ragkern.data import encode
from ragkern.evaluate import generate_answers
from ragkern.inference import (
    block_masked_greedy,
    encode_passage,
    greedy_continue,
    load_caches,
    prefill,
    save_caches,
    segments_from_block_ids,
)
from tests.ragkern.tiny import tiny_model, word_tokenizer

RECORD = {
    "question": "who lives in rome?",
    "passages": ["alpha lives in rome", "beta was born in paris", "gamma works in madrid city"],
    "answer": "alpha",
}


def forward(model, examples):
    batch = PackingCollator(block_attention=True)(examples)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits[0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_passage_tokens_see_only_their_passage(family):
    tok = word_tokenizer()
    model = tiny_model(family, vocab_size=len(tok))
    a = encode(RECORD, tok)
    # Passage 2 rewritten with the same number of tokens: later positions do not move.
    b = encode(
        {**RECORD, "passages": [RECORD["passages"][0], "delta is born of spain", RECORD["passages"][2]]}, tok
    )
    assert len(a["input_ids"]) == len(b["input_ids"])
    la, lb = forward(model, [a]), forward(model, [b])
    blocks = torch.tensor(a["block_ids"])
    for k in (1, 3):
        assert torch.equal(la[blocks == k], lb[blocks == k]), f"passage {k} saw passage 2"
    assert not torch.equal(la[blocks == 2], lb[blocks == 2])
    # Block-0 tokens after the passages (question, answer) see every earlier token, passage 2 included.
    after = torch.arange(len(blocks)) > torch.nonzero(blocks == 3).max()
    assert not torch.equal(la[after], lb[after])


def test_block_mask_off_lets_passages_see_the_prefix():
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    a = encode(RECORD, tok)
    b = encode(
        {**RECORD, "passages": [RECORD["passages"][0], "delta is born of spain", RECORD["passages"][2]]}, tok
    )
    with torch.no_grad():
        la = model(input_ids=torch.tensor([a["input_ids"]])).logits[0]
        lb = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    blocks = torch.tensor(a["block_ids"])
    assert not torch.equal(la[blocks == 3], lb[blocks == 3])  # without the mask passage 3 reads passage 2


def prompt_of(example):
    first_target = next(i for i, t in enumerate(example["labels"]) if t != -100)
    return example["input_ids"][:first_target], example["block_ids"][:first_target]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cached_passages_give_the_logits_of_a_full_block_masked_forward(family, tmp_path):
    tok = word_tokenizer()
    model = tiny_model(family, vocab_size=len(tok))
    ids, blocks = prompt_of(encode(RECORD, tok))
    with torch.no_grad():
        full = model(
            input_ids=torch.tensor([ids]), block_ids=torch.tensor([blocks], dtype=torch.int32)
        ).logits[0, -1]

    segments = segments_from_block_ids(ids, blocks)
    assert [b for b, _ in segments if b > 0] == [1, 2, 3] and segments[-1][0] == 0
    store = {f"p{b}": encode_passage(model, seg) for b, seg in segments if b > 0}
    save_caches(str(tmp_path / "passages.safetensors"), store)
    loaded = load_caches(str(tmp_path / "passages.safetensors"))
    for name, c in store.items():
        assert torch.equal(loaded[name].input_ids, c.input_ids)
        assert torch.equal(loaded[name].keys, c.keys) and torch.equal(loaded[name].values, c.values)

    assembled = [loaded[f"p{b}"] if b > 0 else seg for b, seg in segments]
    cache, logits, computed = prefill(model, assembled)
    assert computed == sum(len(seg) for b, seg in segments if b == 0) < len(ids)
    assert cache.get_seq_length() == len(ids)
    assert ((logits - full).abs().max() / full.abs().max()).item() < 1e-5

    # Decoding from the assembled cache follows the full block-masked forward token by token.
    generated = greedy_continue(model, cache, logits, max_new_tokens=3, stop_ids=set())
    seq = list(ids)
    for tok_id in generated:
        with torch.no_grad():
            step = model(
                input_ids=torch.tensor([seq]),
                block_ids=torch.tensor([blocks + [0] * (len(seq) - len(ids))], dtype=torch.int32),
            ).logits[0, -1]
        assert int(step.argmax()) == tok_id
        seq.append(tok_id)


def test_reuse_errors():
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    ids, blocks = prompt_of(encode(RECORD, tok))
    segments = segments_from_block_ids(ids, blocks)
    other = tiny_model("llama", vocab_size=len(tok), seed=1)
    foreign = [encode_passage(other, seg) if b > 0 else seg for b, seg in segments]
    with pytest.raises(ValueError, match="built with another model or dtype"):
        prefill(model, foreign)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        prefill(model, [[5] * 300, [6] * 300])
    with pytest.raises(ValueError, match="must end with computed tokens"):
        prefill(model, [encode_passage(model, [5, 6])])
    with pytest.raises(ValueError, match="passage block 1 is split"):
        segments_from_block_ids([1, 2, 3, 4], [1, 0, 1, 0])
    with pytest.raises(ValueError, match="passage block 2 appears in two separate spans"):
        PackingCollator(block_attention=True)([{"input_ids": [1, 2, 3, 4], "block_ids": [0, 2, 0, 2]}])


def test_triton_block_path_matches_the_torch_path(monkeypatch, one_thread):
    """A 3-layer tiny Llama on a block-masked packed row, its attention on the Triton kernels (interpreter) with
    the tile lists built once for the batch: loss and every parameter gradient equal the exact torch path's."""
    import ragkern.attention
    from tests.ragkern.test_attention_syncs import block_batch

    batch = block_batch(lengths=(19, 3, 26, 11))

    def run():
        model = tiny_model("llama", num_hidden_layers=3).train()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    want_loss, want = run()
    builds = []
    real = ragkern.attention.block_tiles
    monkeypatch.setattr(ragkern.attention, "block_tiles", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    monkeypatch.setattr(ragkern.attention, "_triton_path", lambda q: True)
    got_loss, got = run()
    assert builds == [1]
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_batched_block_masked_answers_equal_one_by_one():
    """evaluate's block_attention=True packs a batch of prompts into one row under the passage block mask: the
    answers equal block_masked_greedy's, record by record."""
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    records = [
        RECORD,
        {**RECORD, "passages": [RECORD["passages"][0], "delta is born of spain", RECORD["passages"][2]]},
        {**RECORD, "passages": ["gamma works in madrid city", "alpha lives in rome"]},
        {**RECORD, "question": "who works in paris?"},
    ]
    stop = set(tok.all_special_ids)
    answers = generate_answers(model, tok, records, batch_size=2, max_new_tokens=4, block_attention=True)
    expected = []
    for record in records:
        ids, blocks = prompt_of(encode(record, tok))
        out = block_masked_greedy(model, ids, blocks, max_new_tokens=4, stop_ids=stop)
        expected.append(tok.decode(out, skip_special_tokens=True).strip())
    assert answers == expected and any(expected)
    with pytest.raises(ValueError, match="ragkern"):
        generate_answers(
            tiny_model("llama", vocab_size=len(tok), attn="sdpa"), tok, records, block_attention=True
        )
