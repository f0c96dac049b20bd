"""Block-mask tile lists: built once per batch (``block_tiles``), shared by every layer's forward and backward.

The lists against a plain-Python transcription of their rule and against the exact element mask, on fresh random
packings; the prebuilt path against the per-call one (bit-identical) and the reference; and what a layer call
costs on the host with prebuilt lists: the ops of the no-block path, no host sync.
"""

import collections
import random

import pytest
import torch
from ragkern.kernels import attention as attn_mod
from ragkern.kernels import block_tiles, varlen_attention
from ragkern.kernels.attention import block_mask, varlen_attention_reference
from torch.utils._python_dispatch import TorchDispatchMode

from tests.kernels.test_attention import cu_of, make_inputs, rel

pytestmark = pytest.mark.skipif(attn_mod.triton is None, reason="triton is not installed")


def random_packing(rng: random.Random) -> tuple[list[int], torch.Tensor, int]:
    """Lengths (some empty, some 1, some a tile +- 1), contiguous passage spans with increasing, gapped ids, and a
    max_seqlen at or above the longest example."""
    sizes = [0, 1, 15, 16, 17, 63, 64, 65, 127, 129]
    lengths = [rng.choice([*sizes, rng.randint(2, 300)]) for _ in range(rng.randint(1, 6))]
    if not any(lengths):
        lengths[0] = 7
    ids = []
    for L in lengths:
        ex, pos, b = [0] * L, 0, 1
        while pos < L:
            span = rng.randint(1, 90)
            if rng.random() < 0.6:
                ex[pos : pos + span] = [b] * len(ex[pos : pos + span])
                b += rng.randint(1, 3)
            pos += span
        ids += ex
    return lengths, torch.tensor(ids, dtype=torch.int32), max(lengths) + rng.choice([0, 0, 1, 40])


def reference_lists(lengths, ids, max_seqlen, causal, bq, bk, key_major):
    """The lists spelled out tile by tile (the rule in ``_tile_lists``' docstring), as nested Python lists."""
    tq, tk = -(-max(max_seqlen, 1) // bq), -(-max(max_seqlen, 1) // bk)
    cnt, idx, start = [], [], 0
    for L in lengths:
        ex = ids[start : start + L].tolist()
        start += L

        def stats(t, size, ex=ex, L=L):
            tok = ex[t * size : min((t + 1) * size, L)]
            passages = [b for b in tok if b > 0]
            return 0 in tok, min(passages, default=None), max(passages, default=None)

        visit = [[False] * tk for _ in range(tq)]
        full = [[False] * tk for _ in range(tq)]
        for i in range(tq):
            for j in range(tk):
                q0, k0 = i * bq, j * bk
                if not (q0 < L and k0 < L):
                    continue
                some = k0 <= min(q0 + bq, L) - 1 if causal else True
                every = k0 + bk - 1 <= q0 if causal else k0 + bk <= L
                inside = q0 + bq <= L if key_major else k0 + bk <= L
                q_glob, q_min, q_max = stats(i, bq)
                k_glob, k_min, k_max = stats(j, bk)
                overlap = q_min is not None and k_min is not None and k_min <= q_max and k_max >= q_min
                every_b = q_min is None or (not k_glob and k_min == k_max == q_min == q_max)
                visit[i][j] = some and (q_glob or overlap)
                full[i][j] = visit[i][j] and every and every_b and inside
        if key_major:
            visit, full = [list(r) for r in zip(*visit)], [list(r) for r in zip(*full)]
        size = bq if key_major else bk
        for vr, fr in zip(visit, full):
            partial = [j for j in range(len(vr)) if vr[j] and not fr[j]]
            whole = [j for j in range(len(vr)) if fr[j]]
            unused = [j for j in range(len(vr)) if not vr[j]]
            cnt.append([len(partial), len(whole)])
            idx.append([j * size for j in partial + whole + unused])
    rows = tk if key_major else tq
    return [cnt[e * rows : (e + 1) * rows] for e in range(len(lengths))], [
        idx[e * rows : (e + 1) * rows] for e in range(len(lengths))
    ]


def assert_sound(lengths, ids, causal, bq, bk, key_major, cnt, idx):
    """Against the exact mask: every visible (query, key) pair lies in a listed tile; a full tile is all visible
    and inside its example."""
    start = 0
    for e, L in enumerate(lengths):
        allowed = block_mask(ids[start : start + L], causal)  # (L, L)
        start += L
        for row in range(cnt.shape[1]):
            n_part, n_full = cnt[e, row].tolist()
            listed = idx[e, row, : n_part + n_full].tolist()
            size_row, size_col = (bk, bq) if key_major else (bq, bk)
            r0 = row * size_row
            covered = torch.zeros(L, dtype=torch.bool)
            for c0 in listed:
                covered[c0 : c0 + size_col] = True
            seen = allowed[:, r0 : r0 + size_row].any(1) if key_major else allowed[r0 : r0 + size_row].any(0)
            assert not (seen & ~covered).any(), f"example {e} tile {row}: a visible pair skipped"
            for c0 in listed[n_part:]:
                q0, k0 = (c0, r0) if key_major else (r0, c0)
                assert (q0 + bq if key_major else k0 + bk) <= L, "a full tile's looped-over side is cut"
                assert allowed[q0 : q0 + bq, k0 : k0 + bk].all(), f"example {e}: a full tile is masked"


TILES = [(16, 16), (128, 64), (64, 128), (64, 64), (32, 16), (16, 32)]


@pytest.mark.parametrize("seed", range(12))
def test_lists_match_the_plain_python_rule_and_the_exact_mask(seed):
    rng = random.Random(seed)
    lengths, ids, max_seqlen = random_packing(rng)
    cu = cu_of(lengths)
    causal = seed % 3 != 0
    for bq, bk in TILES:
        for key_major in (False, True):
            cnt, idx, tq, tk = attn_mod._tile_lists(cu, ids, max_seqlen, causal, bq, bk, key_major)
            want_cnt, want_idx = reference_lists(lengths, ids, max_seqlen, causal, bq, bk, key_major)
            assert (tq, tk) == (-(-max_seqlen // bq), -(-max_seqlen // bk))
            assert cnt.tolist() == want_cnt and idx.tolist() == want_idx, (bq, bk, key_major)
            assert_sound(lengths, ids, causal, bq, bk, key_major, cnt, idx)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_one_build_holds_every_kernels_lists(seed, head_dim):
    """block_tiles' three lists (shared stats, fwd and dQ shared when their tiles agree) equal the lists built
    one by one, for the GPU tile configurations."""
    rng = random.Random(100 + seed)
    lengths, ids, max_seqlen = random_packing(rng)
    cu = cu_of(lengths)
    for arch in (80, 90):
        cfgs = attn_mod._gpu_configs(head_dim, torch.bfloat16, arch)
        tiles = attn_mod._build_tiles(cu, ids, max_seqlen, True, cfgs, True)
        for name, key_major in (("fwd", False), ("dkdv", True), ("dq", False)):
            c = cfgs[name]
            want = attn_mod._tile_lists(cu, ids, max_seqlen, True, c.block_m, c.block_n, key_major)
            got = getattr(tiles, name)
            assert got[2:] == want[2:] and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def grads_of(q, k, v, do, cu, max_len, block_ids, **kw):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = varlen_attention(*leaves, cu, max_len, block_ids=block_ids, backend="triton", validate=False, **kw)
    return (o, *torch.autograd.grad(o, leaves, do))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_prebuilt_tiles_give_the_per_call_results_bit_for_bit(causal):
    lengths = [1, 37, 16, 29]
    q, k, v, do, cu, ids = make_inputs(lengths, 4, 2, 16, torch.float32, blocks=True, seed=11)
    tiles = block_tiles(cu, ids, 37, head_dim=16, dtype=torch.float32, causal=causal)
    got = grads_of(q, k, v, do, cu, 37, ids, causal=causal, block_tiles=tiles)
    per_call = grads_of(q, k, v, do, cu, 37, ids, causal=causal)
    assert all(torch.equal(a, b) for a, b in zip(got, per_call))
    ref64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref = varlen_attention_reference(*ref64, cu, causal=causal, block_ids=ids)
    for a, b in zip(got, (ref, *torch.autograd.grad(ref, ref64, do.double()))):
        assert rel(a, b) < 1e-4


def test_forward_only_tiles_still_differentiate():
    """Lists built with backward=False: the backward builds its own and gives the same gradients."""
    q, k, v, do, cu, ids = make_inputs([21, 34], 2, 1, 16, torch.float32, blocks=True, seed=12)
    tiles = block_tiles(cu, ids, 34, head_dim=16, dtype=torch.float32, backward=False)
    assert tiles.dkdv is None and tiles.dq is None
    got = grads_of(q, k, v, do, cu, 34, ids, block_tiles=tiles)
    assert all(torch.equal(a, b) for a, b in zip(got, grads_of(q, k, v, do, cu, 34, ids)))


def test_tiles_of_another_row_or_configuration_are_refused():
    q, k, v, _, cu, ids = make_inputs([21, 34], 2, 1, 16, torch.float32, blocks=True, seed=13)
    tiles = block_tiles(cu, ids, 34, head_dim=16, dtype=torch.float32)

    def call(**kw):
        args = dict(cu_seqlens=cu, max_seqlen=34, block_ids=ids, block_tiles=tiles, causal=True, q=q)
        args.update(kw)
        return varlen_attention(args.pop("q"), k, v, backend="triton", validate=False, **args)

    call()
    others = dict(max_seqlen=40), dict(causal=False), dict(block_ids=ids.clone()), dict(cu_seqlens=cu.clone())
    for kw in others:
        with pytest.raises(ValueError, match="block_tiles was built for another row"):
            call(**kw)
    with pytest.raises(ValueError, match="without block_ids"):
        call(block_ids=None)
    with pytest.raises(ValueError, match="must be a 1-D int32"):
        block_tiles(cu, ids.long(), 34, head_dim=16, dtype=torch.float32)
    ids[3] = 5  # edited in place after the build: stale
    with pytest.raises(ValueError, match="block_tiles was built for another row"):
        call()


VIEWS = {"aten.view.default", "aten.unsqueeze.default", "aten.select.int", "aten.slice.Tensor", "aten.unbind.int",
         "aten.transpose.int", "aten.expand.default", "aten.alias.default", "aten.detach.default",
         "aten.lift_fresh.default", "aten._reshape_alias.default", "aten.as_strided.default"}  # fmt: skip
HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}


class DeviceOps(TorchDispatchMode):
    """Counts the aten ops dispatched (on a GPU each non-view op is a launch; a host read is a sync)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in VIEWS)

    @property
    def host_reads(self) -> int:
        return sum(self.ops[op] for op in HOST_READS)


def test_a_layer_with_prebuilt_tiles_costs_what_one_without_blocks_costs(monkeypatch):
    """Host side of one layer, forward + backward, at the GPU benchmark's shape (16k-token row, 11 examples,
    tiles of sm_90 at head_dim 128), kernels stubbed: with prebuilt lists the block path dispatches exactly the ops
    of the no-block path (the lists' hundred-odd ops are paid once per batch), and nothing reads back to the host.
    """
    from bench.gpu import rag

    class Stub:  # the launch itself: no tensor op on the host
        def __getitem__(self, grid):
            return lambda *a, **k: None

    for name in ("fwd", "bwd_dkdv", "bwd_dq", "bwd_delta"):
        monkeypatch.setattr(attn_mod, f"_attn_{name}_kernel", Stub())
    monkeypatch.setattr(attn_mod, "_configs", lambda D, dtype, device: attn_mod._gpu_configs(D, dtype, 90))
    lengths, ids = rag.packed_row(16384, seed=0)
    cu, max_len = cu_of(lengths), max(lengths)
    q, k, v = (torch.zeros(16384, h, 128, dtype=torch.bfloat16, requires_grad=True) for h in (4, 1, 1))

    def layer(**kw):
        for x in (q, k, v):
            x.grad = None
        with DeviceOps() as ops:
            o = varlen_attention(q, k, v, cu, max_len, backend="triton", validate=False, **kw)
            o.backward(torch.ones_like(o))
        return ops

    plain = layer()
    with DeviceOps() as build:
        tiles = block_tiles(cu, ids, max_len, head_dim=128, dtype=torch.bfloat16)
    prebuilt = layer(block_ids=ids, block_tiles=tiles)
    per_call = layer(block_ids=ids)
    assert prebuilt.launches == plain.launches and prebuilt.host_reads == 0
    assert build.host_reads == 0 and per_call.host_reads == 0
    assert per_call.launches >= plain.launches + build.launches - 5  # what every layer paid before


def test_block_masks_run_under_inference_mode():
    """Inference tensors have no version counter: the lists are named without one, per call or prebuilt, and
    the output equals the one outside inference mode."""
    q, k, v, _, cu, ids = make_inputs([21, 34], 2, 1, 16, torch.float32, blocks=True, seed=13)
    want = varlen_attention(q, k, v, cu, 34, block_ids=ids, backend="triton")
    with torch.inference_mode():
        q_, k_, v_, cu_, ids_ = (x.clone() for x in (q, k, v, cu, ids))
        assert ids_.is_inference()
        per_call = varlen_attention(q_, k_, v_, cu_, 34, block_ids=ids_, backend="triton")
        tiles = block_tiles(cu_, ids_, 34, head_dim=16, dtype=torch.float32, backward=False)
        prebuilt = varlen_attention(q_, k_, v_, cu_, 34, block_ids=ids_, backend="triton", block_tiles=tiles)
    assert torch.equal(per_call, want) and torch.equal(prebuilt, want)
