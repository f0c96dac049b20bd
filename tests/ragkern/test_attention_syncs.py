"""The packed attention path does no device-to-host copy per layer (graph-safe hot path).

No GPU here: a spy counts the host copies (``Tensor.tolist`` / ``item`` / ``__bool__`` / ``__int__``,
``torch.equal``) made
while the "ragkern" attention runs, with the kernel itself replaced by a stub that computes nothing on the
host, as the Triton kernel does on a GPU.
"""

import gc

import pytest
import torch

import ragkern.attention
from ragkern import PackingCollator, RagTrainer
from tests.ragkern.tiny import random_examples, tiny_model
from tests.ragkern.tiny import trainer_args as args

HOST_COPIES = ("tolist", "item", "__bool__", "__int__", "__index__")


@pytest.fixture
def spy(monkeypatch):
    """Counts host copies per layer call of the attention; the kernel is a stub returning zeros."""
    calls = []  # one list of copies per attention call
    counting = [False]

    for name in HOST_COPIES:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            if counting[0]:
                calls[-1].append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)

    real_equal = torch.equal

    def equal(a, b):  # a Python bool from two device tensors: a host copy
        if counting[0]:
            calls[-1].append("torch.equal")
        return real_equal(a, b)

    monkeypatch.setattr(torch, "equal", equal)
    forward = ragkern.attention.ragkern_attention_forward

    def layer(*a, **kw):
        calls.append([])
        counting[0] = True
        try:
            return forward(*a, **kw)
        finally:
            counting[0] = False

    def stub_kernel(q, k, v, cu_seqlens, max_seqlen, **kw):
        assert isinstance(max_seqlen, int)
        return torch.zeros_like(q)

    monkeypatch.setattr(ragkern.attention, "varlen_attention", stub_kernel)
    monkeypatch.setitem(ragkern.attention.AttentionInterface._global_mapping, ragkern.attention.NAME, layer)
    return calls


def packed_inputs(seed=0):
    batch = PackingCollator()(random_examples([7, 3, 12, 5], seed=seed))
    batch.pop("labels")
    return batch


def test_unchecked_row_costs_one_host_copy_in_the_first_layer_only(spy):
    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        model(**packed_inputs())
    assert len(spy) == 3
    assert spy[0] and spy[1] == [] and spy[2] == []


def test_checked_row_costs_no_host_copy(spy):
    model = tiny_model("llama", num_hidden_layers=3)
    batch = packed_inputs(seed=1)
    cu = batch["cu_seq_lens_q"]
    ragkern.attention.check_packed_row(cu, batch["cu_seq_lens_k"], cu[-1].item(), batch["max_length_q"])
    spy.clear()
    with torch.no_grad():
        model(**batch)
    assert spy == [[], [], []]


def test_rag_trainer_checks_rows_before_moving_them(spy, tmp_path):
    """Every layer of every training forward is free of host copies: RagTrainer checks on the host."""
    trainer = RagTrainer(
        model=tiny_model("llama"),
        args=args(tmp_path, max_steps=2, learning_rate=0.0),
        train_dataset=random_examples([9, 4, 11, 6, 13, 5, 8], seed=2),
    )
    trainer.train()
    assert len(spy) >= 4 and all(copies == [] for copies in spy)


def test_a_changed_offsets_tensor_is_checked_again(spy):
    model = tiny_model("llama", num_hidden_layers=2)
    batch = packed_inputs(seed=3)
    ragkern.attention.check_packed_row(
        batch["cu_seq_lens_q"], batch["cu_seq_lens_k"], batch["input_ids"].shape[1]
    )
    batch["cu_seq_lens_q"][1] += 1  # edited in place after the check: its version moved on
    spy.clear()
    with torch.no_grad():
        model(**batch)
    assert spy[0] and spy[1] == []


def test_bad_offsets_are_refused():
    batch = packed_inputs()
    cu = batch["cu_seq_lens_q"]
    with pytest.raises(ValueError, match="must run from 0 to the row's"):
        ragkern.attention.check_packed_row(cu, None, int(cu[-1]) + 1)
    with pytest.raises(ValueError, match="max_length_q=3 is smaller than the longest example"):
        ragkern.attention.check_packed_row(cu, None, int(cu[-1]), 3)
    other = cu.clone()
    other[1] += 1
    with pytest.raises(NotImplementedError, match="cu_seq_lens_k == cu_seq_lens_q"):
        ragkern.attention.check_packed_row(cu, other, int(cu[-1]))


@pytest.mark.parametrize("blocks", [False, True], ids=["plain", "block_mask"])
def test_packed_forward_compiles_as_one_graph(blocks):
    """torch.compile(fullgraph=True) of a packed forward (the CPU torch backend: no host read in the graph)
    gives the eager logits."""
    examples = random_examples([7, 3, 12, 5], seed=4)
    if blocks:
        for ex in examples:  # a passage block in the middle of each example
            n = len(ex["input_ids"])
            ex["block_ids"] = [0] * (n // 3) + [1] * (n // 3) + [0] * (n - 2 * (n // 3))
    batch = PackingCollator(block_attention=blocks)(examples)
    batch.pop("labels")
    model = tiny_model("llama")
    with torch.no_grad():
        eager = model(**batch, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**batch, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def block_batch(seed=5, lengths=(7, 3, 12, 5)):
    """A packed row whose examples each hold a passage block in the middle, labels kept."""
    examples = random_examples(list(lengths), seed=seed)
    for ex in examples:
        n = len(ex["input_ids"])
        ex["block_ids"] = [0] * (n // 3) + [1] * (n // 3) + [0] * (n - 2 * (n // 3))
    return PackingCollator(block_attention=True)(examples)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_checkpointing"])
def test_block_rows_build_tile_lists_once_per_batch(spy, monkeypatch, checkpointing):
    """On the Triton path the first layer builds the row's block-mask tile lists and every other layer, and a
    recompute under gradient checkpointing, gets the very same lists (and offsets, block ids); no layer reads a
    value back to the host. A new batch builds its own."""
    builds, seen = [], []
    real = ragkern.attention.block_tiles

    def counted(*a, **kw):
        builds.append(kw["head_dim"])
        return real(*a, **kw)

    def kernel(q, k, v, cu_seqlens, max_seqlen, **kw):
        seen.append((kw["block_tiles"], kw["block_ids"], cu_seqlens))
        return q * 1.0  # differentiable, computes nothing on the host

    monkeypatch.setattr(ragkern.attention, "block_tiles", counted)
    monkeypatch.setattr(ragkern.attention, "_triton_path", lambda q: True)
    monkeypatch.setattr(ragkern.attention, "varlen_attention", kernel)
    model = tiny_model("llama", num_hidden_layers=4)
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = block_batch()
    cu = batch["cu_seq_lens_q"]
    ragkern.attention.check_packed_row(
        cu, batch["cu_seq_lens_k"], batch["input_ids"].shape[1], batch["max_length_q"]
    )
    spy.clear()
    model(**batch).loss.backward()
    assert len(spy) == (8 if checkpointing else 4) and all(copies == [] for copies in spy)
    assert builds == [16] and len(seen) == len(spy)
    assert all(all(a is b for a, b in zip(s, seen[0])) for s in seen)
    model(**batch).loss.backward()  # the same batch again: still built
    assert builds == [16]
    model(**block_batch(seed=6)).loss.backward()
    assert builds == [16, 16] and seen[-1][0] is not seen[0][0]


def test_block_rows_edited_in_place_get_new_tile_lists(spy, monkeypatch):
    builds = []
    real = ragkern.attention.block_tiles
    monkeypatch.setattr(ragkern.attention, "block_tiles", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    monkeypatch.setattr(ragkern.attention, "_triton_path", lambda q: True)
    monkeypatch.setattr(ragkern.attention, "varlen_attention", lambda q, *a, **kw: q * 1.0)
    model = tiny_model("llama", num_hidden_layers=2)
    batch = block_batch()
    batch.pop("labels")
    with torch.no_grad():
        model(**batch)
        batch["block_ids"][0, :3] = 2  # a new passage: the lists built for the old ids are stale
        model(**batch)
    assert builds == [1, 1]


def test_tile_lists_die_with_their_batch(spy, monkeypatch):
    """The memo holds no reference to the batch: once the batch is gone, so are its lists."""
    monkeypatch.setattr(ragkern.attention, "_triton_path", lambda q: True)
    monkeypatch.setattr(ragkern.attention, "varlen_attention", lambda q, *a, **kw: q * 1.0)
    model = tiny_model("llama", num_hidden_layers=2)
    batch = block_batch()
    batch.pop("labels")
    batch["block_ids"] = batch["block_ids"].clone()  # not a view, as after the move to the GPU
    with torch.no_grad():
        model(**batch)
    assert len(ragkern.attention._row_tiles) == 1
    del batch
    gc.collect()
    assert len(ragkern.attention._row_tiles) == 0


def test_block_rows_run_under_inference_mode(monkeypatch):
    """A block-masked packed forward under torch.inference_mode (no version counters to key the row's checks
    and tile lists on) on the Triton path gives the logits of the same forward under no_grad."""
    monkeypatch.setattr(ragkern.attention, "_triton_path", lambda q: True)
    batch = block_batch(lengths=(9, 4, 13))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = tiny_model("llama", num_hidden_layers=2).eval()
    with torch.no_grad():
        want = model(**inputs).logits
    with torch.inference_mode():
        got = model(**{k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
