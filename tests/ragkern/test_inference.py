"""Passage cache reuse (ragkern.inference): one forward over the fresh tokens, batched prefill, decoding with
generate() from the assembled cache, and the safetensors passage store."""

import pytest
import torch
from transformers import DynamicCache

from ragkern.data import encode
from ragkern.inference import (
    PassageStore,
    _query_groups,
    block_masked_greedy,
    cache_bytes_per_token,
    encode_passage,
    generate_from_caches,
    load_caches,
    prefill,
    prefill_batch,
    save_caches,
    segments_from_block_ids,
)
from ragkern.modeling import forward_names
from tests.ragkern.test_block_attention import RECORD, prompt_of
from tests.ragkern.tiny import tiny_model, word_tokenizer

RECORDS = [
    RECORD,  # 3 passages
    {**RECORD, "passages": ["gamma works in madrid city", "alpha lives in rome"]},
    {
        **RECORD,
        "question": "who works in paris city of france in spain where the river is?",
    },  # most fresh tokens
    {**RECORD, "passages": ["delta was born in berlin germany who lives in rome italy mountain river city"]},
]


def prompts(model, tok, records=RECORDS):
    """Per record: (prompt ids, block ids, segments with one shared cache per distinct passage)."""
    store, out = {}, []
    for record in records:
        ids, blocks = prompt_of(encode(record, tok))
        segments = []
        for block, toks in segments_from_block_ids(ids, blocks):
            if block:
                store.setdefault(tuple(toks), encode_passage(model, toks))
                segments.append(store[tuple(toks)])
            else:
                segments.append(toks)
        out.append((ids, blocks, segments))
    return out


def block_masked(model, ids, blocks):
    """One forward of the whole prompt under the passage block mask: last logits (V,) and its KV cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([ids]),
            block_ids=torch.tensor([blocks], dtype=torch.int32),
            use_cache=True,
            **{forward_names(model)[0]: cache},
        )
    return out.logits[0, -1], cache


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_one_forward_builds_the_block_masked_cache(family, one_thread):
    """The fresh tokens run in one model forward; the assembled cache equals the block-masked forward's, layer by
    layer (passages re-rotated, fresh tokens written into their slots), and so do the last logits."""
    tok = word_tokenizer()
    model = tiny_model(family, vocab_size=len(tok))
    ids, blocks, segments = prompts(model, tok)[0]
    calls = []
    hook = model.model.register_forward_hook(lambda m, a, kw: calls.append(1), with_kwargs=False)
    cache, logits, computed = prefill(model, segments)
    hook.remove()
    assert calls == [1] and computed == blocks.count(0)
    want_logits, want = block_masked(model, ids, blocks)
    assert rel(logits, want_logits) < 1e-5
    assert len(cache.layers) == len(want.layers)
    for got, ref in zip(cache.layers, want.layers):
        assert got.keys.shape == ref.keys.shape
        assert rel(got.keys, ref.keys) < 1e-5 and rel(got.values, ref.values) < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_prefill_equals_one_block_masked_forward_per_prompt(family, one_thread):
    """Four prompts of different lengths and fresh-token counts, left-padded into one prefill: each row's
    logits equal its own block-masked forward; padding is masked and the ids are the prompt's."""
    tok = word_tokenizer()
    model = tiny_model(family, vocab_size=len(tok))
    cases = prompts(model, tok)
    pre = prefill_batch(model, [segments for _, _, segments in cases], pad_token_id=0)
    width = pre.input_ids.shape[1]
    assert width >= max(len(ids) for ids, _, _ in cases)
    assert pre.computed == sum(blocks.count(0) for _, blocks, _ in cases)
    assert pre.prompt_tokens == sum(len(ids) for ids, _, _ in cases)
    for b, (ids, blocks, _) in enumerate(cases):
        assert pre.attention_mask[b].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
        assert pre.input_ids[b, width - len(ids) :].tolist() == ids
        want, _ = block_masked(model, ids, blocks)
        assert rel(pre.logits[b], want) < 1e-5, f"prompt {b}"


@pytest.mark.parametrize("attn", ["ragkern", "sdpa"])
def test_generate_from_caches_equals_block_masked_greedy(attn, one_thread):
    """generate() from the batched, assembled cache gives the answers of block_masked_greedy (the full
    block-masked forward at every step), whatever attention the model decodes on."""
    tok = word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), seed=3)
    cases = prompts(model, tok)
    want = [
        block_masked_greedy(model, ids, blocks, max_new_tokens=6, stop_ids=set()) for ids, blocks, _ in cases
    ]
    model.set_attn_implementation(attn)
    got = generate_from_caches(model, [s for _, _, s in cases], max_new_tokens=6, stop_ids=set())
    assert got == want and all(len(a) == 6 for a in got)
    assert model.config._attn_implementation == attn  # the prefill's attention switch was undone
    # stop tokens cut the answers as block_masked_greedy's do
    stop = {want[0][2]}
    cut = generate_from_caches(model, [s for _, _, s in cases], max_new_tokens=6, stop_ids=stop)
    model.set_attn_implementation("ragkern")
    ref = [
        block_masked_greedy(model, ids, blocks, max_new_tokens=6, stop_ids=stop) for ids, blocks, _ in cases
    ]
    assert cut == ref and len(cut[0]) == 2


def test_store_round_trip_lazy_fingerprinted_bf16(tmp_path, one_thread):
    tok = word_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok))
    ids, blocks, segments = prompts(model, tok)[0]
    caches = {f"p{i}": s for i, s in enumerate(segments) if not isinstance(s, list)}
    fp32, bf16 = tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors"
    save_caches(fp32, caches)
    save_caches(bf16, caches, dtype=torch.bfloat16)
    layers, kv_heads, head_dim = 2, 1, 16
    assert cache_bytes_per_token(model) == 2 * layers * kv_heads * head_dim * 4

    store = load_caches(fp32, model=model)
    assert isinstance(store, PassageStore) and sorted(store) == sorted(caches) and len(store) == len(caches)
    assert store.bytes_per_token == cache_bytes_per_token(model) and store.dtype == "torch.float32"
    for name, c in caches.items():
        got = store[name]
        assert got.keys.shape == (layers, kv_heads, len(c), head_dim)
        assert torch.equal(got.input_ids, c.input_ids)
        assert torch.equal(got.keys, c.keys) and torch.equal(got.values, c.values)
    with pytest.raises(KeyError):
        store["nope"]

    half = load_caches(bf16, model=model)
    assert (
        half.bytes_per_token == store.bytes_per_token // 2
        and half[next(iter(caches))].keys.dtype == torch.bfloat16
    )
    loaded = [store[f"p{i}"] if not isinstance(s, list) else s for i, s in enumerate(segments)]
    halved = [half[f"p{i}"] if not isinstance(s, list) else s for i, s in enumerate(segments)]
    want, _ = block_masked(model, ids, blocks)
    assert rel(prefill(model, loaded)[1], want) < 1e-5
    assert rel(prefill(model, halved)[1], want) < 2e-2  # bf16 K/V: rounding, not another computation

    other = tiny_model("qwen2", vocab_size=len(tok), seed=1)
    with pytest.raises(ValueError, match="another model or dtype"):
        load_caches(fp32, model=other)
    with pytest.raises(ValueError, match="another model or dtype"):
        prefill(other, loaded)
    with pytest.raises(ValueError, match="different models"):
        save_caches(tmp_path / "mixed.safetensors", {"a": caches["p1"], "b": encode_passage(other, [5, 6])})
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a ragkern passage store"):
        load_caches(tmp_path / "plain.safetensors")


def test_query_groups_cover_the_queries_and_break_only_at_passages():
    header, marker, question = [31] * 31, [435] * 4, [3216] * 22
    groups = _query_groups(header + marker + [839] * 4 + question)
    assert groups[0][0] == 0 and groups[-1][1] == 61
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    assert set(e for _, e in groups) <= {31, 35, 39, 61}
    assert _query_groups([5, 6, 7, 8]) == [(0, 4)]  # contiguous fresh tokens: one group
    assert _query_groups([3, 4, 5000, 5001], call_cost=1) == [(0, 2), (2, 4)]
