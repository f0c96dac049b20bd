"""varlen_attention: the Triton kernels (under TRITON_INTERPRET=1, see conftest) against the per-example reference
and against softmax attention written out in float64: output and dq, dk, dv.

Tiles are 16 x 16 in the interpreter, so lengths 1, 5, 17, 37 ... cover partial, single and many tiles.
"""

import os

import pytest
import torch
from ragkern.kernels import attention as attn_mod
from ragkern.kernels import varlen_attention
from ragkern.kernels.attention import block_mask, varlen_attention_reference

pytestmark = pytest.mark.skipif(attn_mod.triton is None, reason="triton is not installed")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def make_blocks(lengths, g):
    """Per example: a global prefix, 1-3 passages of random length, a global suffix (some parts may be empty)."""
    out = []
    for L in lengths:
        ids = torch.zeros(L, dtype=torch.int32)
        cuts = sorted(torch.randint(0, L + 1, (4,), generator=g).tolist())
        for b, (a, e) in enumerate(zip(cuts[:-1], cuts[1:]), start=1):
            ids[a:e] = b
        out.append(ids)
    return torch.cat(out)


def make_inputs(lengths, Hq, Hkv, D, dtype, *, blocks=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, generator=g).to(dtype) for H in (Hq, Hkv, Hkv))
    do = torch.randn(T, Hq, D, generator=g).to(dtype)
    return q, k, v, do, cu_of(lengths), make_blocks(lengths, g) if blocks else None


def naive(q, k, v, lengths, causal, block_ids, scale, *, window=None, softcap=None):
    """Softmax attention per example and head, float64, with the mask (causal, blocks, sliding ``window``) and
    the score ``softcap`` spelled out."""
    out, s = [], 0
    group = q.shape[1] // k.shape[1]
    for L in lengths:
        qi, ki, vi = (x[s : s + L].double() for x in (q, k, v))
        allowed = torch.ones(L, L, dtype=torch.bool)
        if causal:
            allowed = allowed.tril()
        if window is not None:
            i = torch.arange(L)
            allowed &= i[None, :] > i[:, None] - window
        if block_ids is not None:
            b = block_ids[s : s + L]
            allowed &= (b[:, None] == 0) | (b[:, None] == b[None, :])
        heads = []
        for h in range(q.shape[1]):
            scores = (qi[:, h] @ ki[:, h // group].T) * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            heads.append(p @ vi[:, h // group])
        out.append(torch.stack(heads, dim=1))
        s += L
    return torch.cat(out)


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1.0)).item()  # floor: a length-1 dq is exactly 0


def run_triton(q, k, v, do, cu, max_len, causal, block_ids):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = varlen_attention(*leaves, cu, max_len, causal=causal, block_ids=block_ids, backend="triton")
    grads = torch.autograd.grad(o, leaves, do)
    return o, grads


def check(lengths, Hq, Hkv, D, dtype, causal, blocks, seed=0, block_ids=None):
    q, k, v, do, cu, made = make_inputs(lengths, Hq, Hkv, D, dtype, blocks=blocks, seed=seed)
    block_ids = made if block_ids is None else block_ids
    o, grads = run_triton(q, k, v, do, cu, max(lengths), causal, block_ids)
    for t in (o, *grads):
        assert torch.isfinite(t).all(), "NaN/inf: an element was not written or the softmax broke"
    assert o.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3

    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    want = naive(*leaves64, lengths, causal, block_ids, D**-0.5)
    want_grads = torch.autograd.grad(want, leaves64, do.double())
    ref64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref = varlen_attention_reference(*ref64, cu, causal=causal, block_ids=block_ids)
    ref_grads = torch.autograd.grad(ref, ref64, do.double())
    assert rel(ref, want) < 1e-10  # the package reference agrees with the spelled-out one

    tol = TOL[dtype]
    for name, got, w, r in zip(
        ("out", "dq", "dk", "dv"), (o, *grads), (want, *want_grads), (ref, *ref_grads)
    ):
        assert rel(got, w) < tol, f"{name}: rel err {rel(got, w):.2e} vs float64 softmax"
        assert rel(got, r) < tol, f"{name}: rel err {rel(got, r):.2e} vs reference"


SHAPES = {"one": [37], "len1": [1], "many": [1, 17, 32, 5, 9]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("blocks", [False, True], ids=["noblocks", "blocks"])
@pytest.mark.parametrize("shape", ["one", "many"])
def test_matches_reference(shape, blocks, causal, dtype):
    check(SHAPES[shape], 2, 1, 16, dtype, causal, blocks, seed=len(shape) * 4 + 2 * blocks + causal)


def runs(*parts):
    """Block ids from (id, length) runs: runs((0, 3), (1, 5)) -> [0, 0, 0, 1, 1, 1, 1, 1]."""
    return [b for b, n in parts for _ in range(n)]


# Interpreter tiles are 16 x 16: these layouts put passage edges inside, on and across tile boundaries.
BLOCK_LAYOUTS = {
    "short-passages": runs((0, 3), (1, 5), (2, 4), (0, 2), (3, 3), (0, 20)),  # passages shorter than a tile
    "spanning": runs((0, 5), (1, 40), (0, 6)),  # one passage across three tiles
    "adjacent": runs((0, 2), (1, 14), (2, 17), (3, 1), (0, 9)),  # passages back to back, no global between
    "markers": runs(*[(b, n) for i in range(1, 7) for b, n in ((0, 1), (i, 6))], (0, 12)),  # block 0 between
    "no-passages": runs((0, 29)),
    "passage-at-ends": runs((4, 13), (0, 4), (5, 22)),  # starts and ends inside a passage
    "tile-aligned": runs((1, 16), (2, 16), (0, 16)),
    "id-reused": runs((1, 5), (0, 3), (1, 6), (2, 9), (0, 4)),  # the same id in two spans (not contiguous)
}


@pytest.mark.parametrize(
    "causal, dtype",
    [(True, torch.float32), (False, torch.float32), (True, torch.float16)],
    ids=["causal", "full", "fp16"],
)
@pytest.mark.parametrize("layout", list(BLOCK_LAYOUTS))
def test_block_layouts(layout, causal, dtype):
    """Full / partial key-tile lists: every edge case of passage layout against the float64 softmax, with a
    second, different example packed next to it (the lists are per example)."""
    one = BLOCK_LAYOUTS[layout]
    other = BLOCK_LAYOUTS["markers" if layout != "markers" else "spanning"]
    block_ids = torch.tensor(one + other, dtype=torch.int32)
    check([len(one), len(other)], 4, 2, 16, dtype, causal, False, seed=len(one), block_ids=block_ids)


def test_tile_lists_split_full_and_partial():
    """The lists of one example: a passage-only query tile visits only its passage's key tiles, and only the
    tiles on its passage edge or the diagonal are partial."""
    ids = torch.tensor(runs((0, 16), (1, 32), (2, 32), (0, 16)), dtype=torch.int32)  # 96 tokens, 6 tiles
    cu = cu_of([96])
    cnt, idx, tq, tk = attn_mod._tile_lists(cu, ids, 96, True, 16, 16, False)
    assert (tq, tk) == (6, 6)
    lists = [
        (idx[0, i, : cnt[0, i, 0]].tolist(), idx[0, i, cnt[0, i, 0] : cnt[0, i].sum()].tolist())
        for i in range(6)
    ]
    assert lists[0] == ([0], [])  # global prefix: the diagonal only
    assert lists[1] == ([16], [])  # passage 1's first tile: its own diagonal, not the prefix
    assert lists[2] == ([32], [16])  # passage 1's second tile: full first tile, partial diagonal
    assert lists[3] == ([48], [])  # passage 2
    assert lists[5] == (
        [80],
        [0, 16, 32, 48, 64],
    )  # the global suffix sees everything; only its diagonal is partial
    dcnt, didx, _, _ = attn_mod._tile_lists(cu, ids, 96, True, 16, 16, True)  # key-major (dK/dV)
    assert didx[0, 1, : dcnt[0, 1].sum()].tolist() == [
        16,
        32,
        80,
    ]  # passage 1's keys: its queries and the suffix


@pytest.mark.parametrize("ratio", [1, 2, 4, 8], ids=lambda r: f"gqa{r}")
def test_gqa(ratio):
    check([19, 3, 26], 8, 8 // ratio, 16, torch.float32, True, True, seed=ratio)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_length_one(dtype):
    check(SHAPES["len1"], 2, 2, 16, dtype, True, False)
    check([1, 1, 2, 1], 2, 2, 16, dtype, False, True)


@pytest.mark.parametrize("D", [40, 80, 256], ids=lambda d: f"d{d}")
def test_padded_head_dim(D):
    """head_dim not a power of 2: tiles padded to BLOCK_D, extra lanes masked (256: the delta kernel's smaller
    row tile, whose rows end inside an example)."""
    check([21, 6], 2, 1, D, torch.float32, True, True, seed=D)


@pytest.mark.parametrize("D", [32, 40], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("blocks", [False, True], ids=["noblocks", "blocks"])
def test_backward_with_head_dim_split_over_programs(monkeypatch, D, causal, blocks):
    """dK/dV and dQ with d_split=2 (the sm_90 head_dim-256 tiles): two programs per tile and head, each computing
    the scores from both column halves and writing its own half; at 40 the second half is mostly padding."""
    split = attn_mod._Config(16, 16, 4, 1, d_split=2)
    monkeypatch.setattr(
        attn_mod, "_configs", lambda *a: {"fwd": attn_mod._INTERPRET_CONFIG, "dkdv": split, "dq": split}
    )
    check([21, 6, 33], 4, 2, D, torch.float32, causal, blocks, seed=D)
    check([19, 1, 8], 2, 1, D, torch.float16, causal, blocks, seed=D + 1)


@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("blocks", [False, True], ids=["noblocks", "blocks"])
def test_gpu_tiles_at_head_dim_256(monkeypatch, arch, blocks):
    """The GPU's own tile configurations at head_dim 256 (on sm_90: dK/dV split in two column halves, 64 x 64
    tiles), run in the interpreter on examples spanning several of their tiles."""
    monkeypatch.setattr(attn_mod, "_configs", lambda D, dtype, device: attn_mod._gpu_configs(D, dtype, arch))
    check([70, 3, 129], 2, 1, 256, torch.float16, True, blocks, seed=arch)


def test_empty_example_and_noncontiguous():
    """A zero-length example in cu_seqlens; q/k/v as strided views of one fused projection."""
    g = torch.Generator().manual_seed(3)
    lengths = [9, 0, 20]
    T, Hq, Hkv, D = sum(lengths), 4, 2, 16
    qkv = torch.randn(T, Hq + 2 * Hkv, D, generator=g)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=1)
    assert not q.is_contiguous()
    o = varlen_attention(q, k, v, cu_of(lengths), 20, backend="triton")
    want = naive(q, k, v, [9, 20], True, None, D**-0.5)
    assert rel(o, want) < 1e-4


_HUGE_STRIDE_SCRIPT = r"""
import torch
from ragkern.kernels import varlen_attention
from ragkern.kernels.attention import varlen_attention_reference

# k and v rows 2^26 elements apart in one fp16 storage of 2^31 + 2^27 elements (4.3 GB of address space, left
# untouched: only the 34 rows used are written), so token 32 of the example sits past 2^31 elements.
L, H, D, stride = 34, 1, 16, 2**26
storage = torch.empty(2**31 + 2**27, dtype=torch.float16)
k = storage.as_strided((L, H, D), (stride, D, 1))
v = storage.as_strided((L, H, D), (stride, D, 1), storage_offset=2 * H * D)
g = torch.Generator().manual_seed(0)
for x in (k, v):
    x.copy_(torch.randn(L, H, D, generator=g).half())
q = torch.randn(L, H, D, generator=g).half()
do = torch.randn(L, H, D, generator=g).half()
cu = torch.tensor([0, L], dtype=torch.int32)
leaves = [x.requires_grad_() for x in (q, k, v)]
o = varlen_attention(*leaves, cu, L, backend="triton")
grads = torch.autograd.grad(o, leaves, do)
dense = [x.detach().clone().float().requires_grad_() for x in (q, k, v)]
want = varlen_attention_reference(*dense, cu)
want_grads = torch.autograd.grad(want, dense, do.float())
errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip((o, *grads), (want, *want_grads))]
print("ERRS", errs)
"""


def test_offsets_past_2_31_on_a_strided_view():
    """K/V rows 2^26 elements apart: the tile loops' token x stride passes 2^31 (int32 would wrap to a negative
    offset). Runs in a subprocess because a wrapped offset reads unmapped memory and would crash pytest."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _HUGE_STRIDE_SCRIPT], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    errs = eval(proc.stdout.split("ERRS", 1)[1])
    assert max(errs) < 1e-2, errs


@pytest.mark.parametrize("blocks", [False, True], ids=["noblocks", "blocks"])
def test_no_host_sync_without_validation(host_syncs, blocks):
    """validate=False: forward and backward read no tensor value back to the host (graph-safe, no per-layer sync);
    the default validation reads cu_seqlens once. The result is the same."""
    q, k, v, do, cu, block_ids = make_inputs([13, 22, 18], 4, 2, 16, torch.float32, blocks=blocks, seed=5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = varlen_attention(*leaves, cu, 22, block_ids=block_ids, backend="triton", validate=False)
    grads = torch.autograd.grad(o, leaves, do)
    assert host_syncs == []
    o2, grads2 = run_triton(q, k, v, do, cu, 22, True, block_ids)
    assert [s.split(" in ")[0] for s in host_syncs] == ["Tensor.tolist"]
    assert torch.equal(o, o2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_validate_false_still_checks_shapes():
    a = good()
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(a["q"], a["k"], a["v"], a["cu_seqlens"].long(), 6, backend="triton", validate=False)
    with pytest.raises(ValueError, match="max_seqlen must be a Python int"):
        varlen_attention(
            a["q"], a["k"], a["v"], a["cu_seqlens"], torch.tensor(6), backend="triton", validate=False
        )


def test_no_leak():
    """Changing example 1 leaves examples 0 and 2 bit-identical: output and gradients."""
    lengths = [13, 22, 18]
    q, k, v, do, cu, block_ids = make_inputs(lengths, 4, 2, 16, torch.float32, blocks=True, seed=7)
    o1, g1 = run_triton(q, k, v, do, cu, 22, True, block_ids)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[13:35] = torch.randn_like(x[13:35])
    o2, g2 = run_triton(q2, k2, v2, do, cu, 22, True, block_ids)
    keep = torch.ones(sum(lengths), dtype=torch.bool)
    keep[13:35] = False
    assert not torch.equal(o1[~keep], o2[~keep])
    assert torch.equal(o1[keep], o2[keep])
    for a, b in zip(g1, g2):
        assert torch.equal(a[keep], b[keep])


def test_passage_keys_see_only_their_passage():
    """A passage's outputs do not depend on tokens outside it (what makes its KV cache reusable)."""
    lengths = [30]
    q, k, v, _, cu, _ = make_inputs(lengths, 2, 2, 16, torch.float32, seed=11)
    block_ids = torch.tensor([0] * 5 + [1] * 10 + [2] * 10 + [0] * 5, dtype=torch.int32)
    o1 = varlen_attention(q, k, v, cu, 30, block_ids=block_ids, backend="triton")
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:5] = torch.randn_like(x[:5])  # the global prefix before both passages
    o2 = varlen_attention(q2, k2, v2, cu, 30, block_ids=block_ids, backend="triton")
    assert torch.equal(o1[5:25], o2[5:25])
    assert torch.equal(block_mask(block_ids)[5:25, :5], torch.zeros(20, 5, dtype=torch.bool))


def test_auto_on_cpu_is_the_reference():
    q, k, v, _, cu, block_ids = make_inputs([7, 12], 2, 1, 16, torch.float32, blocks=True)
    got = varlen_attention(q, k, v, cu, 12, block_ids=block_ids)
    assert torch.equal(got, varlen_attention_reference(q, k, v, cu, block_ids=block_ids))


# ------------------------------------------------------------------------------------------- bad input


def good():
    q, k, v, _, cu, block_ids = make_inputs([5, 6], 4, 2, 16, torch.float32, blocks=True)
    return dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=6, block_ids=block_ids, backend="triton")


def call(**kw):
    a = good()
    a.update(kw)
    return varlen_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens"), a.pop("max_seqlen"), **a)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {"k": a["k"][:10]}, "same shape|agree on total"),
        (lambda a: {"v": a["v"][:, :1]}, "same shape"),
        (lambda a: {"q": a["q"][:, :, :8]}, "head_dim"),
        (lambda a: {"q": a["q"][:, :3]}, "multiple of key/value heads"),
        (lambda a: {"cu_seqlens": a["cu_seqlens"].long()}, "int32"),
        (lambda a: {"cu_seqlens": torch.tensor([0, 5, 10], dtype=torch.int32)}, "end at total=11"),
        (lambda a: {"cu_seqlens": torch.tensor([0, 7, 11], dtype=torch.int32)}, "max_seqlen=6"),
        (lambda a: {"q": a["q"].double(), "k": a["k"].double(), "v": a["v"].double()}, "fp16/bf16/fp32"),
        (lambda a: {"q": a["q"].half()}, "share one of"),
        (lambda a: {"block_ids": a["block_ids"].long()}, "block_ids must be int32"),
        (lambda a: {"block_ids": a["block_ids"][:5]}, "block_ids must be int32 of shape"),
        (lambda a: {"backend": "cuda"}, "backend="),
    ],
    ids=[
        "total-mismatch", "kv-mismatch", "qk-head-dim", "heads-not-divisible", "cu-int64", "cu-wrong-end",
        "max-seqlen-small", "float64", "mixed-dtype", "block-ids-int64", "block-ids-short", "bad-backend",
    ],
)  # fmt: skip
def test_bad_input(change, match):
    with pytest.raises(ValueError, match=match):
        call(**change(good()))


@pytest.mark.parametrize("D", [12, 20, 264], ids=lambda d: f"d{d}")
def test_unsupported_head_dim_for_triton(D):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(11, 2, D, generator=g) for _ in range(3))
    cu = cu_of([5, 6])
    with pytest.raises(ValueError, match=f"head_dim={D} is not supported by the Triton kernel"):
        varlen_attention(q, k, v, cu, 6, backend="triton")
    varlen_attention(q, k, v, cu, 6, backend="torch")  # the reference takes any head_dim


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        call()


def test_triton_missing(monkeypatch):
    monkeypatch.setattr(attn_mod, "triton", None)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        call()
    a = good()
    varlen_attention(a["q"], a["k"], a["v"], a["cu_seqlens"], 6, backend="auto")  # auto still works
