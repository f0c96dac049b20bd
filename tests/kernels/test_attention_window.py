"""Sliding-window attention and attention-logit softcap in the Triton varlen kernels (TRITON_INTERPRET=1, see
conftest): output and dq, dk, dv against the package reference run in float64 (itself checked against softmax
attention spelled out below); the block-mask tile lists against the exact element mask; and the work: the key tiles
each query tile visits (and the query tiles each key tile visits), counted inside the running kernels, fall with
the window.

Interpreter tiles are 16 x 16, so windows of 1, 5, 16, 17 ... put the window's edge inside, on and across tiles.
"""

import pytest
import torch
from ragkern.kernels import attention as attn_mod
from ragkern.kernels import block_tiles, varlen_attention
from ragkern.kernels.attention import block_mask, varlen_attention_reference, window_mask

from tests.kernels.test_attention import cu_of, make_inputs, naive, rel

pytestmark = [
    pytest.mark.skipif(attn_mod.triton is None, reason="triton is not installed"),
    pytest.mark.usefixtures("exact_half_dot"),
]

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check(lengths, Hq, Hkv, D, dtype, *, window, softcap=None, blocks=False, seed=0, spelled_out=False, **kw):
    """Triton output and gradients against the reference in float64 (and, if ``spelled_out``, against ``naive``)."""
    q, k, v, do, cu, block_ids = make_inputs(lengths, Hq, Hkv, D, dtype, blocks=blocks, seed=seed)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = varlen_attention(
        *leaves, cu, max(lengths), window=window, softcap=softcap, block_ids=block_ids, backend="triton", **kw
    )
    grads = torch.autograd.grad(o, leaves, do)
    for t in (o, *grads):
        assert torch.isfinite(t).all(), "NaN/inf: an element was not written or the softmax broke"
    assert o.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3

    ref64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref = varlen_attention_reference(*ref64, cu, block_ids=block_ids, window=window, softcap=softcap)
    ref_grads = torch.autograd.grad(ref, ref64, do.double())
    if spelled_out:
        want = naive(
            *ref64, [L for L in lengths if L], True, block_ids, D**-0.5, window=window, softcap=softcap
        )
        assert rel(ref, want) < 1e-10
    for name, got, r in zip(("out", "dq", "dk", "dv"), (o, *grads), (ref, *ref_grads)):
        assert rel(got, r) < TOL[dtype], f"{name}: rel err {rel(got, r):.2e} vs float64 reference"
    return o, grads


# (lengths, Hq, Hkv, window, softcap, blocks): interpreter tiles are 16 x 16
CASES = {
    "edge-inside-tile": ([45], 2, 1, 5, None, False),
    "window-1": ([40, 7], 2, 1, 1, None, True),
    "window-eq-tile": ([64, 33], 2, 1, 16, None, False),
    "window-tile-plus-1": ([50], 2, 1, 17, None, True),
    "window-gt-one-example": ([20, 70], 2, 1, 50, None, False),  # all of the first example, not the second
    "window-ge-max-seqlen": ([30, 41], 2, 1, 100, None, True),  # masks nothing at all
    "packed-with-empty": ([37, 0, 64, 5, 0], 2, 2, 10, None, False),
    "packed-with-empty-blocks": ([37, 0, 64, 5, 0], 2, 2, 10, None, True),
    "gqa-4-1": ([53, 20], 4, 1, 12, None, True),
    "gqa-4-2": ([29, 40], 4, 2, 24, None, False),
    "softcap": ([45, 19], 2, 1, None, 2.0, False),
    "softcap-blocks": ([45, 19], 2, 1, None, 2.0, True),
    "window-softcap": ([61, 8], 4, 2, 20, 1.5, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_window_softcap_fp32(case):
    lengths, Hq, Hkv, window, softcap, blocks = CASES[case]
    check(lengths, Hq, Hkv, 16, torch.float32, window=window, softcap=softcap, blocks=blocks, seed=len(case))


@pytest.mark.parametrize(
    "case, dtype",
    [
        ("edge-inside-tile", "fp16"),
        ("gqa-4-1", "fp16"),
        ("packed-with-empty-blocks", "bf16"),
        ("window-softcap", "bf16"),
    ],
)
def test_window_softcap_half(case, dtype):
    lengths, Hq, Hkv, window, softcap, blocks = CASES[case]
    check(lengths, Hq, Hkv, 16, DTYPES[dtype], window=window, softcap=softcap, blocks=blocks, seed=3)


@pytest.mark.parametrize(
    "D, dtype, window, softcap, blocks",
    [
        (64, "fp32", 12, None, True),
        (128, "bf16", 21, None, False),
        (256, "bf16", 9, 3.0, False),  # Gemma 2: head_dim 256, window and softcap
        (256, "fp16", 33, 2.0, True),
    ],
    ids=["d64-fp32-blocks", "d128-bf16", "d256-bf16-softcap", "d256-fp16-softcap-blocks"],
)
def test_head_dims(D, dtype, window, softcap, blocks):
    check(
        [38, 5],
        2,
        1,
        D,
        DTYPES[dtype],
        window=window,
        softcap=softcap,
        blocks=blocks,
        seed=D,
        spelled_out=True,
    )


@pytest.mark.parametrize(
    "D, window, softcap, lengths, block_lengths",
    [
        (128, 70, None, [160, 45], [130]),
        (128, 64, 2.0, [150], []),
        pytest.param(
            256, 100, 3.0, [140], [], marks=pytest.mark.slow
        ),  # ~10 s; test_split_head covers it fast
    ],
    ids=["d128-w70", "d128-w64-softcap", "d256-w100-softcap"],
)
def test_gpu_tiles(monkeypatch, D, window, softcap, lengths, block_lengths):
    """The sm_90 tiles, run in the interpreter: forward 128 x 64 (several key tiles per query tile at the window's
    edge), dK/dV 128 keys x 64 queries at head_dim 128 (two diagonal query tiles, several past it), and at 256 the
    dK/dV and dQ split over two programs of 128 columns each."""
    monkeypatch.setattr(attn_mod, "_configs", lambda D, dtype, device: attn_mod._gpu_configs(D, dtype, 90))
    check(lengths, 2, 1, D, torch.float16, window=window, softcap=softcap, blocks=False, seed=D)
    if block_lengths:
        check(block_lengths, 2, 1, D, torch.float16, window=window, softcap=softcap, blocks=True, seed=D + 1)


def test_split_head(monkeypatch):
    """dK/dV and dQ with head_dim split over two programs (d_split=2, the sm_90 tiles at head_dim 256), at 16 x 16
    tiles: the window and softcap in both column halves."""
    split = attn_mod._Config(16, 16, 4, 1, d_split=2)
    monkeypatch.setattr(
        attn_mod, "_configs", lambda *a: {"fwd": attn_mod._INTERPRET_CONFIG, "dkdv": split, "dq": split}
    )
    check([45, 12], 4, 2, 40, torch.float32, window=19, softcap=2.0, blocks=True, seed=5)


def test_spelled_out_reference_small():
    """The package reference agrees with the spelled-out softmax for window + softcap, GQA and blocks."""
    check([45, 0, 23], 4, 2, 16, torch.float32, window=7, softcap=2.5, blocks=True, spelled_out=True)


def test_non_causal():
    """Softcap runs non-causal; a non-causal window is refused (decoder LMs only use the causal one)."""
    q, k, v, do, cu, _ = make_inputs([33, 20], 2, 1, 16, torch.float32, seed=1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = varlen_attention(*leaves, cu, 33, causal=False, softcap=2.0, backend="triton")
    grads = torch.autograd.grad(o, leaves, do)
    ref64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref = varlen_attention_reference(*ref64, cu, causal=False, softcap=2.0)
    for got, r in zip((o, *grads), (ref, *torch.autograd.grad(ref, ref64, do.double()))):
        assert rel(got, r) < 1e-4
    with pytest.raises(NotImplementedError, match="causal=False"):
        varlen_attention(q, k, v, cu, 33, causal=False, window=8, backend="triton")
    block_ids = torch.zeros(53, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="causal=False"):
        block_tiles(cu, block_ids, 33, head_dim=16, dtype=torch.float32, causal=False, window=8)
    varlen_attention(q, k, v, cu, 33, causal=False, window=8, backend="torch")  # the reference has it


def test_prebuilt_tiles_record_the_window():
    """block_tiles(window=) lists give the per-call result bit for bit; lists cut for another window are refused;
    a window reaching the longest example is no window (the same lists)."""
    q, k, v, do, cu, block_ids = make_inputs([50, 31], 2, 1, 16, torch.float32, blocks=True, seed=4)
    tiles = block_tiles(cu, block_ids, 50, head_dim=16, dtype=torch.float32, window=12)
    assert tiles.window == 12
    a = varlen_attention(q, k, v, cu, 50, block_ids=block_ids, window=12, backend="triton")
    b = varlen_attention(q, k, v, cu, 50, block_ids=block_ids, block_tiles=tiles, window=12, backend="triton")
    assert torch.equal(a, b)
    for other in (None, 13):
        with pytest.raises(ValueError, match="window"):
            varlen_attention(
                q, k, v, cu, 50, block_ids=block_ids, block_tiles=tiles, window=other, backend="triton"
            )
    wide = block_tiles(cu, block_ids, 50, head_dim=16, dtype=torch.float32, window=50)
    assert wide.window is None
    varlen_attention(q, k, v, cu, 50, block_ids=block_ids, block_tiles=wide, backend="triton")


# ------------------------------------------------------------------------------------------------ tile lists


def element_masks(lengths, block_ids, window):
    start, out = 0, []
    for L in lengths:
        pos = torch.arange(L)
        m = window_mask(pos, pos, window) & block_mask(block_ids[start : start + L])
        out.append(m)
        start += L
    return out


@pytest.mark.parametrize("key_major", [False, True], ids=["query-major", "key-major"])
@pytest.mark.parametrize("passages", [False, True], ids=["global", "passages"])
@pytest.mark.parametrize("window", [1, 5, 16, 23, 64])
def test_tile_lists_follow_the_window(window, passages, key_major):
    """Every visible (query, key) pair lies in a listed tile; every full tile is wholly visible and inside the
    example; without passages the lists are exact: a tile is listed iff it holds a visible pair."""
    g = torch.Generator().manual_seed(window)
    lengths = [100, 0, 47, 16, 1]
    block_ids = torch.zeros(sum(lengths), dtype=torch.int32)
    if passages:
        block_ids = torch.randint(0, 3, (sum(lengths),), generator=g, dtype=torch.int32)
    cu = cu_of(lengths)
    bq, bk = (16, 32) if key_major else (32, 16)  # rectangular tiles, as the GPU's
    cnt, idx, tq, tk = attn_mod._tile_lists(cu, block_ids, 100, True, bq, bk, key_major, window=window)
    for e, (L, mask) in enumerate(zip(lengths, element_masks(lengths, block_ids, window))):
        rows, size, other = (tk, bk, bq) if key_major else (tq, bq, bk)
        for r in range(rows):
            n_part, n_full = cnt[e, r].tolist()
            listed = idx[e, r, : n_part + n_full].tolist()
            full = set(idx[e, r, n_part : n_part + n_full].tolist())
            for c0 in range(0, L, other):
                tile = (
                    mask[c0 : c0 + other, r * size : (r + 1) * size]
                    if key_major
                    else mask[r * size : (r + 1) * size, c0 : c0 + other]
                )
                if tile.any():
                    assert c0 in listed, (e, r, c0)
                elif not passages:
                    assert c0 not in listed, (e, r, c0)
                if c0 in full:
                    assert tile.all() and c0 + other <= L, (e, r, c0)


# ------------------------------------------------------------------------------------------- counted cost


@pytest.fixture
def visits(monkeypatch):
    """Counts, inside the running kernels, every tile pair visited: {kernel: [(query tile start, key tile start,
    masked)]}. The interpreter looks the tile functions up in the module at each call, so wrapping them records
    what the loops really do."""
    seen = {"fwd": [], "dkdv": [], "dq": []}

    def first(x):
        return int(x.handle.data.flat[0]) if hasattr(x, "handle") else int(x)

    def spy(kind, fn, m_at, n_at, masked_at):
        def wrapped(*args):
            seen[kind].append((first(args[m_at]), first(args[n_at]), bool(args[masked_at])))
            return fn(*args)

        return wrapped

    # argument positions: _fwd_tile(.., n0=7, offs_m=8, .., MASKED=16); _bwd_kv_tile(.., m0=11, offs_n=12, ..,
    # MASKED=21); _bwd_q_tile(.., n0=10, offs_m=11, .., MASKED=20)
    monkeypatch.setattr(attn_mod, "_fwd_tile", spy("fwd", attn_mod._fwd_tile, 8, 7, 16))
    monkeypatch.setattr(attn_mod, "_bwd_kv_tile", spy("dkdv", attn_mod._bwd_kv_tile, 11, 12, 21))
    monkeypatch.setattr(attn_mod, "_bwd_q_tile", spy("dq", attn_mod._bwd_q_tile, 11, 10, 20))
    return seen


def key_tiles_mirror(m0, L, window, bm, bn):
    """The forward's / dQ's causal key-tile range (``_key_tiles``) in plain Python: tiles lo, lo + bn, ... < hi."""
    last_q = min(m0 + bm, L) - 1
    lo = 0 if window is None else max(m0 - window + 1, 0) // bn * bn
    return list(range(lo, last_q + 1, bn))


LENGTH = 256


@pytest.mark.parametrize("blocks", [False, True], ids=["dense", "blocks"])
def test_visited_tiles_fall_with_the_window(visits, blocks):
    """At a fixed length (256 tokens, 16 x 16 tiles), the key tiles each query tile visits (forward, dQ) and the query
    tiles each key tile visits (dK/dV), counted in the kernels: every visited tile holds a visible pair (none lies
    wholly outside the window), a tile without a mask is wholly visible, and the counts fall with the window
    (16: 31 of 136 in the forward; 64: 70). The dense forward visits exactly the mirror's tiles."""
    q, k, v, do, cu, _ = make_inputs([LENGTH], 1, 1, 16, torch.float32, seed=2)
    block_ids = torch.zeros(LENGTH, dtype=torch.int32) if blocks else None  # one global block: no passage cut
    counts = {}
    for window in (16, 64, None):
        for kind in visits:
            visits[kind].clear()
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = varlen_attention(*leaves, cu, LENGTH, window=window, block_ids=block_ids, backend="triton")
        torch.autograd.grad(o, leaves, do)
        mask = window_mask(torch.arange(LENGTH), torch.arange(LENGTH), window)
        for kind, pairs in visits.items():
            assert len(set(pairs)) == len(pairs), f"{kind}: a tile visited twice"
            for m0, n0, masked in pairs:
                tile = mask[m0 : m0 + 16, n0 : n0 + 16]
                assert tile.any(), f"{kind}: tile (q {m0}, k {n0}) lies wholly outside the window"
                assert masked or tile.all(), f"{kind}: tile (q {m0}, k {n0}) unmasked but partly hidden"
        fwd = sorted((m0, n0) for m0, n0, _ in visits["fwd"])
        want = sorted(
            (m0, n0) for m0 in range(0, LENGTH, 16) for n0 in key_tiles_mirror(m0, LENGTH, window, 16, 16)
        )
        assert fwd == want
        counts[window] = {kind: len(pairs) for kind, pairs in visits.items()}
    assert [counts[w]["fwd"] for w in (16, 64, None)] == [31, 70, 136]
    for kind in ("fwd", "dkdv", "dq"):
        assert counts[16][kind] < counts[64][kind] < counts[None][kind], counts


def test_block_lists_fall_with_the_window():
    """The device-built lists' sizes (forward, key-major dK/dV) at 256 tokens with passages: smaller with the
    window, and a window of 256 (the whole example) lists what no window lists."""
    g = torch.Generator().manual_seed(0)
    block_ids = torch.randint(0, 4, (LENGTH,), generator=g, dtype=torch.int32)
    block_ids[200:] = 0  # a global suffix (question, answer) that sees every passage
    cu = cu_of([LENGTH])
    sizes = {}
    for window in (16, 64, LENGTH, None):
        tiles = block_tiles(cu, block_ids, LENGTH, head_dim=16, dtype=torch.float32, window=window)
        sizes[window] = [int(t[0].sum()) for t in (tiles.fwd, tiles.dkdv)]
    assert sizes[LENGTH] == sizes[None]
    for i in range(2):
        assert sizes[16][i] < sizes[64][i] < sizes[None][i], sizes
