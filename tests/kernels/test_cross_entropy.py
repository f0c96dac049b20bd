"""fused_linear_cross_entropy against F.cross_entropy(hidden @ weight.T) in float64: loss and every gradient."""

import math
import mmap
import sys

import pytest
import torch
import torch.nn.functional as F
from ragkern.kernels import cross_entropy as ce_mod
from ragkern.kernels import fused_linear_cross_entropy
from ragkern.kernels.cross_entropy import fused_linear_cross_entropy_reference

pytestmark = pytest.mark.usefixtures("exact_half_dot")  # fp16 tiles at BLAS speed in the interpreter

IGNORE = -100


def make_inputs(N, H, V, *, dtype=torch.float32, bias=False, ignore_frac=0.25, weights=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    w = torch.rand(N, generator=g) + 0.5 if weights else None
    return hidden, weight, b, labels, w


def reference(hidden, weight, labels, **opts):
    """The package's reference in float64 (it takes the inputs' dtype): ``(loss, z_term, hits)``."""
    double = [None if t is None else t.double() for t in (hidden, weight, opts.pop("bias", None))]
    w = opts.pop("weights", None)
    return fused_linear_cross_entropy_reference(
        double[0], double[1], labels, bias=double[2], weights=None if w is None else w.double(),
        return_z_loss=True, return_hits=True, **opts,
    )  # fmt: skip


# Logit error of each input dtype's path, relative to the largest logit: rows whose two best logits are closer than
# this may rank them either way, so their argmax is not compared (exact ties: test_hits_break_ties_at_the_first_index)
HIT_TIE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_hits_match(hits, ref_hits, hidden, weight, b, labels, softcap=None):
    """``hits`` equal the float64 reference's on every target row without a near-tie, and are False where ignored."""
    z = hidden.detach().double() @ weight.detach().double().T + (0.0 if b is None else b.detach().double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    top = z.topk(2, dim=1).values
    clear = (top[:, 0] - top[:, 1]) > HIT_TIE_TOL[hidden.dtype] * (1 + top[:, 0].abs())
    assert hits.dtype == torch.bool and hits.shape == labels.shape and not hits.requires_grad
    assert not hits[labels == IGNORE].any()
    assert torch.equal(hits[clear], ref_hits[clear]), (hits ^ ref_hits).nonzero().squeeze(1).tolist()


def check(N, H, V, *, backend, dtype=torch.float32, bias=False, ignore_frac=0.25, weights=False, seed=0,
          **kwargs):  # fmt: skip
    inputs = make_inputs(N, H, V, dtype=dtype, bias=bias, ignore_frac=ignore_frac, weights=weights, seed=seed)
    return check_tensors(*inputs, backend=backend, seed=seed, **kwargs)


def check_tensors(hidden, weight, b, labels, w, *, backend, impl=None, seed=0, atol=1e-5, rtol=1e-4,
                  grad_out="random", filter_eps="auto", **opts):  # fmt: skip
    """Loss, z-term, argmax hits and every gradient against :func:`reference` in float64; returns the max abs
    errors. ``impl``: default "triton" on the triton backend (the no-logits kernels), "chunked" on torch."""
    dtype = hidden.dtype
    impl = impl or ("triton" if backend == "triton" else "chunked")
    leaves = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    loss, zterm, hits = fused_linear_cross_entropy(
        hidden, weight, labels, bias=b, weights=w, backend=backend, impl=impl, return_z_loss=True,
        return_hits=True, filter_eps=filter_eps, **opts,
    )  # fmt: skip
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rh, rw, rb = ref_leaves + [None] * (3 - len(ref_leaves))
    ref, ref_z, ref_hits = reference(rh, rw, labels, bias=rb, weights=w, **opts)
    assert_hits_match(hits, ref_hits, hidden, weight, b, labels, opts.get("softcap"))
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(zterm.double(), ref_z.detach(), atol=atol, rtol=rtol)
    errors = {"loss": (loss.double() - ref.detach()).abs().max().item()}
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed + 1))
    if grad_out == "ones" or loss.dim() == 0:
        go = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, leaves, go)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        torch.testing.assert_close(
            got.double(), want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}"
        )
        errors[name] = (got.double() - want).abs().max().item()
    return errors


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several chunks on small vocabularies so chunk boundaries are exercised."""
    monkeypatch.setattr(ce_mod, "_CHUNK_ELEMS", 7 * 1024)


CASES = {
    "plain": dict(),
    "bias": dict(bias=True),
    "softcap": dict(softcap=3.0),
    "smoothing": dict(label_smoothing=0.1),
    "zloss": dict(z_loss=1e-3),
    "weights": dict(weights=True),
    "all": dict(bias=True, softcap=5.0, label_smoothing=0.2, z_loss=1e-2, weights=True),
    "all_ignored": dict(ignore_frac=1.1),
    "none_ignored": dict(ignore_frac=0.0),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_torch_path(case, reduction, small_chunks):
    check(67, 24, 1003, backend="torch", reduction=reduction, seed=list(CASES).index(case), **CASES[case])


def test_torch_none_uniform_grad(small_chunks):
    """reduction='none' then a scaled sum reuses the gradients computed in the forward pass."""
    check(45, 16, 517, backend="torch", reduction="none", softcap=2.0, weights=True, grad_out="ones")


@pytest.mark.parametrize("V", [32003, 151936], ids=["V32003", "V151936"])
def test_torch_large_vocab(V):
    check(19, 16, V, backend="torch", reduction="mean", softcap=30.0, label_smoothing=0.05, seed=V)


def test_torch_float64_and_int32_labels():
    hidden, weight, _, labels, _ = make_inputs(33, 8, 101, dtype=torch.float64)
    got = fused_linear_cross_entropy(hidden, weight, labels.int(), backend="torch")
    torch.testing.assert_close(got.double(), reference(hidden, weight, labels)[0])


@pytest.mark.parametrize(
    "backend, impl, reduction",
    [("torch", "chunked", "mean"), ("torch", "chunked", "none"), ("triton", "triton", "none"),
     ("triton", "chunked", "none")],
    ids=lambda x: x,
)  # fmt: skip
def test_frozen_weight(backend, impl, reduction, small_chunks):
    """A frozen lm_head (LoRA elsewhere): only grad_hidden is computed, and it is right."""
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, _, labels, _ = make_inputs(29, 16, 301, seed=5)
    hidden.requires_grad_()
    loss = fused_linear_cross_entropy(
        hidden, weight, labels, softcap=4.0, reduction=reduction, backend=backend, impl=impl
    )
    ref_hidden = hidden.detach().double().requires_grad_()
    ref = reference(ref_hidden, weight, labels, softcap=4.0, reduction=reduction)[0]
    go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3))
    (got,) = torch.autograd.grad(loss, hidden, go)
    (want,) = torch.autograd.grad(ref, ref_hidden, go.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_triton_frozen_weight_trained_bias(impl, small_chunks):
    """grad_bias without grad_weight (the dweight kernel sums ds but skips its matmul; chunked: no dW GEMM)."""
    pytest.importorskip("triton")
    hidden, weight, b, labels, _ = make_inputs(29, 16, 301, bias=True, seed=6)
    leaves = [hidden.requires_grad_(), b.requires_grad_()]
    loss = fused_linear_cross_entropy(
        hidden, weight, labels, bias=b, label_smoothing=0.1, backend="triton", impl=impl
    )
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(ref_leaves[0], weight.double(), labels, bias=ref_leaves[1], label_smoothing=0.1)[0]
    for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ref, ref_leaves)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_all_ignored_is_zero_not_nan():
    hidden, weight, _, labels, _ = make_inputs(5, 8, 11)
    labels[:] = IGNORE
    hidden.requires_grad_()
    for reduction in ("mean", "sum"):
        loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, hidden)
        assert (grad == 0).all()


def test_no_grad_forward():
    hidden, weight, _, labels, _ = make_inputs(9, 8, 31)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(loss.double(), reference(hidden, weight, labels)[0])


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(hidden=torch.zeros(2, 3, 4)), "hidden must be"),
        (dict(weight=torch.zeros(7, 5)), "weight must be"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), "labels must be"),
        (dict(labels=torch.zeros(4)), "labels must be int64"),
        (dict(weight=torch.zeros(7, 4, dtype=torch.float16)), "share one of"),
        (dict(bias=torch.zeros(6)), "bias must be"),
        (dict(weights=torch.zeros(5)), "weights must be"),
        (dict(reduction="avg"), "reduction="),
        (dict(backend="cuda"), "backend="),
        (dict(impl="cublas"), "impl="),
        (dict(impl="triton", backend="torch"), "impl='triton' runs the Triton kernels"),
        (dict(softcap=0.0), "softcap"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(filter_eps=-1.0), "filter_eps"),
    ],
    ids=["hidden_3d", "weight_H", "labels_N", "labels_float", "dtype_mix", "bias_V", "weights_N",
         "reduction", "backend", "impl", "triton_on_torch", "softcap", "smoothing", "filter_eps"],
)  # fmt: skip
def test_errors(bad, match):
    args = dict(hidden=torch.zeros(4, 4), weight=torch.zeros(7, 4), labels=torch.zeros(4, dtype=torch.long))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


TRITON_CASES = {
    "plain_fp32": dict(),
    "bias_fp32": dict(bias=True, reduction="sum"),
    "all_fp32": dict(
        bias=True, softcap=5.0, label_smoothing=0.2, z_loss=1e-2, weights=True, reduction="none"
    ),
    "all_ignored_fp32": dict(ignore_frac=1.1, reduction="none"),
    "softcap_fp16": dict(dtype=torch.float16, softcap=4.0, atol=2e-3, rtol=2e-2),
    "all_fp16": dict(
        dtype=torch.float16, bias=True, label_smoothing=0.1, z_loss=1e-3, weights=True, atol=2e-3, rtol=2e-2
    ),
}


@pytest.mark.parametrize("case", TRITON_CASES, ids=list(TRITON_CASES))
def test_triton_interpreter(case):
    pytest.importorskip("triton")
    opts = dict(TRITON_CASES[case])
    N, H = (37, 48) if "fp16" not in case else (21, 40)
    check(N, H, 1003 if "fp16" not in case else 333, backend="triton", seed=len(case), **opts)


@pytest.mark.slow  # minutes on a cold Triton cache (two cores); the compile is shared with test_aot.py
def test_aot_compiles(aot_records):
    """Every launched configuration compiles for sm_80 and sm_90 with no register spills; HGMMA on sm_90
    wherever the dot may use tensor cores (everything but fp32 under IEEE precision; the chunked path's row
    kernel and backward's scale kernel have no dot)."""
    records = [r for r in aot_records if r["kernel"].startswith("flce_")]
    assert len(records) == 2 * len(ce_mod.aot_specs()) == 112
    assert {r["kernel"] for r in records} == {
        "flce_fwd",
        "flce_bwd_dh",
        "flce_bwd_dw",
        "flce_rows",
        "flce_scale",
    }
    spilled = [(r["kernel"], r["config"], r["arch"], r["stack_bytes"]) for r in records if r["stack_bytes"]]
    assert not spilled
    tensor_cores = [
        r
        for r in records
        if r["arch"] == "sm_90"
        and " ieee " not in r["config"]
        and r["kernel"] not in ("flce_rows", "flce_scale")
    ]
    assert tensor_cores and all(r["hgmma"] > 0 for r in tensor_cores)


@pytest.fixture
def tf32_emulation(monkeypatch):
    """The interpreter computes every fp32 ``tl.dot`` in full precision; make it round operands to TF32 (keep
    10 mantissa bits: drop the low 13) where the kernel asks for "tf32", as sm_80/sm_90 tensor cores do."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    import numpy as np

    dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision.name == "TF32" and a.data.dtype == np.float32:
            a, b = (interpreter.TensorHandle((x.data.view(np.uint32) & 0xFFFFE000).view(np.float32), x.dtype)
                    for x in (a, b))  # fmt: skip
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("case", ["plain_fp32", "bias_fp32", "all_fp32"])
def test_triton_fp32_follows_matmul_precision(case, tf32_emulation):
    """fp32 dots run in IEEE fp32 under torch's default ("highest") precision and meet the fp32 tolerance;
    with "high" (TF32 allowed, as for torch.matmul) the emulated TF32 rounding misses it."""
    pytest.importorskip("triton")
    opts = dict(TRITON_CASES[case])
    torch.set_float32_matmul_precision("highest")
    check(37, 48, 1003, backend="triton", seed=len(case), **opts)
    torch.set_float32_matmul_precision("high")
    with pytest.raises(AssertionError):
        check(37, 48, 1003, backend="triton", seed=len(case), **opts)


@pytest.mark.parametrize("bad", [-1, 31, 10**6], ids=["pad_minus_1", "V", "huge"])
def test_out_of_range_label_raises_on_both_paths(bad):
    """A target outside [0, V) that is not ignore_index trains toward no class: both paths refuse it with
    the same error, naming the value, its position, V and the fix."""
    pytest.importorskip("triton")
    hidden, weight, _, labels, _ = make_inputs(9, 8, 31, ignore_frac=0.0)
    labels[6] = bad
    messages = []
    for backend, impl in (("torch", "chunked"), ("triton", "triton"), ("triton", "chunked")):
        with pytest.raises(ValueError) as err:
            fused_linear_cross_entropy(hidden, weight, labels, backend=backend, impl=impl)
        messages.append(str(err.value))
    assert messages[0] == messages[1] == messages[2]
    for part in (f"labels[6] = {bad}", "[0, V=31)", "ignore_index=-100"):
        assert part in messages[0]


@pytest.fixture
def shuffled_grid(monkeypatch):
    """Run each launch's programs in a random order, as a GPU may schedule them: ``set_order(seed)`` picks it.
    The interpreter runs programs one after the other in grid order, which hides order-dependent sums."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    import numpy as np

    builder = interpreter.interpreter_builder
    state = {"rng": np.random.default_rng(0)}
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx

    def set_grid_dim(nx, ny, nz):
        set_dim(nx, ny, nz)
        state["order"] = state["rng"].permutation(nx * ny * nz)

    def set_grid_idx(x, y, z):
        _, ny, nz = builder.grid_dim
        k = int(state["order"][(x * ny + y) * nz + z])
        set_idx(k // (ny * nz), (k // nz) % ny, k % nz)

    monkeypatch.setattr(builder, "set_grid_dim", set_grid_dim)
    monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)
    return lambda seed: state.update(rng=np.random.default_rng(seed))


def test_triton_deterministic_gradients(shuffled_grid):
    """Under torch.use_deterministic_algorithms(True) every gradient is bitwise the same whatever order the
    programs run in (no floating-point atomics whose order changes the sum)."""
    pytest.importorskip("triton")
    hidden, weight, b, labels, w = make_inputs(
        333, 16, 203, bias=True, weights=True, ignore_frac=0.1, seed=11
    )
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    runs = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for seed in (1, 2):
            shuffled_grid(seed)
            loss = fused_linear_cross_entropy(
                hidden, weight, labels, bias=b, weights=w, backend="triton", impl="triton"
            )
            runs.append([loss, *torch.autograd.grad(loss, leaves)])
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for name, first, second in zip(("loss", "hidden", "weight", "bias"), *runs):
        assert torch.equal(first, second), name


LARGE_VOCAB = {
    "fp32": dict(dtype=torch.float32, softcap=30.0, label_smoothing=0.05, z_loss=1e-3),  # smoothing in-kernel
    "fp16": dict(dtype=torch.float16, bias=True, label_smoothing=0.1, z_loss=1e-3, atol=2e-3, rtol=2e-2),
}


@pytest.mark.parametrize(
    "V", [32003, pytest.param(151936, marks=pytest.mark.slow)], ids=["V32003", "V151936"]
)  # V151936: about a minute per dtype on two loaded cores
@pytest.mark.parametrize("case", LARGE_VOCAB, ids=list(LARGE_VOCAB))
def test_triton_large_vocab(V, case):
    """Odd vocabularies (last tile partial) against float64: loss and every gradient, per-token weights."""
    pytest.importorskip("triton")
    check(13, 16, V, backend="triton", weights=True, reduction="none", seed=V, **LARGE_VOCAB[case])


@pytest.mark.parametrize(
    "programs_per_sm", [0, 10, 10**6], ids=["one_split", "several_tiles_per_split", "one_tile_per_split"]
)
def test_triton_grid_plans(programs_per_sm, monkeypatch):
    """Every way of cutting the vocabulary (forward, dhidden) and the tokens (dweight) into splits gives the
    same loss and gradients: one program per row block looping over every tile, splits of several tiles
    with a short last one, one tile per split. ~450 targets: 4 token tiles of dweight's 128 rows."""
    pytest.importorskip("triton")
    monkeypatch.setattr(ce_mod, "_DEFAULT_SMS", 4)
    monkeypatch.setattr(ce_mod, "_PROGRAMS_PER_SM", programs_per_sm)
    opts = dict(bias=True, softcap=5.0, label_smoothing=0.2, z_loss=1e-2, weights=True, reduction="none")
    check(501, 24, 2003, backend="triton", ignore_frac=0.1, seed=programs_per_sm % 97, **opts)


def test_plan_splits():
    """Splits fill the GPU at 1k targets (issue 12: the old grid launched 16 programs on 132 SMs) and are
    never empty."""
    pytest.importorskip("triton")
    for n in (1024, 16384):
        fwd, dh, dw = (ce_mod._config(c, torch.bfloat16) for c in (ce_mod._FWD_CONFIG, ce_mod._DH_CONFIG,
                                                                    ce_mod._DW_CONFIG))  # fmt: skip
        n_fwd, n_dh = -(-n // fwd["BLOCK_N"]), -(-n // dh["BLOCK_N"])
        splits, _ = ce_mod._plan_splits(n_fwd, -(-128256 // fwd["BLOCK_V"]), 132)
        assert n_fwd * splits >= 2 * 132  # at least two programs per SM (rounding splits to whole tiles)
        cap = ce_mod._DH_PARTIAL_BYTES // (4 * n * 4096)
        splits, _ = ce_mod._plan_splits(n_dh, -(-128256 // dh["BLOCK_V"]), 132, cap)
        assert n_dh * splits >= 132  # fewer splits: its fp32 partials stop at _DH_PARTIAL_BYTES
        assert -(-128256 // dw["BLOCK_V"]) >= 2 * 132
    for n_other, n_tiles in ((1, 1), (3, 7), (5, 1002), (1000, 3)):
        splits, per = ce_mod._plan_splits(n_other, n_tiles, 132)
        assert (splits - 1) * per < n_tiles <= splits * per


def filtered_reference(hidden, weight, b, labels, w, *, filter_eps, label_smoothing, z_loss):
    """Gradients (reduction="sum") of the filtered backward in float64: a (token tile, vocab tile) of the
    target rows is dropped, in each backward kernel's own tiling, when it holds no target and
    ``(1 + 2 z_loss lse) softmax < filter_eps`` all over it; the uniform smoothing term is never dropped.
    Also returns the fraction of tiles dropped by each kernel."""
    rows = (labels != IGNORE).nonzero().squeeze(1)
    h, W = hidden.double()[rows], weight.double()
    y, scale = labels[rows], w.double()[rows]
    z = h @ W.T + (b.double() if b is not None else 0.0)
    lse = torch.logsumexp(z, 1, keepdim=True)
    g = (1 + 2 * z_loss * lse) * torch.exp(z - lse)  # (n, V)
    onehot = F.one_hot(y, W.shape[0]).double()
    uniform = -label_smoothing / W.shape[0] * scale[:, None].expand_as(g)
    grads, dropped = [], []
    for configs in (ce_mod._DH_CONFIG, ce_mod._DW_CONFIG):
        cfg = ce_mod._config(configs, hidden.dtype)
        bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
        keep = torch.zeros_like(g)
        tiles = 0
        for i in range(0, g.shape[0], bn):
            for j in range(0, g.shape[1], bv):
                tile = (slice(i, i + bn), slice(j, j + bv))
                kept = bool(onehot[tile].any()) or g[tile].abs().max() >= filter_eps
                keep[tile] = float(kept)
                tiles += not kept
        dropped.append(tiles / (-(-g.shape[0] // bn) * -(-g.shape[1] // bv)))
        grads.append(scale[:, None] * (g - (1 - label_smoothing) * onehot) * keep + uniform)
    gh = torch.zeros_like(hidden, dtype=torch.float64).index_copy_(0, rows, grads[0] @ W)
    gb = grads[1].sum(0) if b is not None else None
    return (gh, grads[1].T @ h, gb), dropped


def test_triton_gradient_filtering_matches_its_definition():
    """With a threshold that drops about half of the tiles (a softmax falling over the vocabulary), the
    kernels' gradients
    equal the filtered definition (each kernel's tiling; target tiles kept; smoothing's uniform term kept)
    and differ from the unfiltered ones, so the switch works both ways."""
    pytest.importorskip("triton")
    opts = dict(label_smoothing=0.1, z_loss=1e-2)
    hidden, weight, b, labels, w = make_inputs(
        301, 24, 1003, bias=True, weights=True, ignore_frac=0.1, seed=7
    )
    labels[labels != IGNORE] %= 200  # frequent tokens: most tiles hold no target, as at V=128k
    b = -2.0 * torch.log1p(torch.arange(1003.0))  # Zipf-like: the softmax falls over the vocabulary
    # a threshold between two tile maxima far apart, so fp32 and float64 agree on every tile
    rows = labels != IGNORE
    z = hidden.double()[rows] @ weight.double().T + b.double()
    g = ((1 + 2e-2 * torch.logsumexp(z, 1, keepdim=True)) * torch.softmax(z, 1)).abs()
    tiles = [ce_mod._config(c, torch.float32) for c in (ce_mod._DH_CONFIG, ce_mod._DW_CONFIG)]
    pooled = [F.max_pool2d(g[None], (c["BLOCK_N"], c["BLOCK_V"]), ceil_mode=True).flatten() for c in tiles]
    maxima = torch.cat(pooled).sort().values
    mid = maxima[len(maxima) // 4 : 3 * len(maxima) // 4]
    k = int((mid[1:] / mid[:-1]).argmax())
    eps = float((mid[k] * mid[k + 1]).sqrt())
    want, dropped = filtered_reference(hidden, weight, b, labels, w, filter_eps=eps, **opts)
    assert all(0.2 < d < 0.8 for d in dropped), dropped
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    got = {}
    for name, filt in (("filtered", eps), ("off", None)):
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, weights=w, reduction="sum",
                                          backend="triton", impl="triton", filter_eps=filt, **opts)  # fmt: skip
        got[name] = torch.autograd.grad(loss, leaves)
    for name, a, e, off in zip(("hidden", "weight", "bias"), got["filtered"], want, got["off"]):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        assert (a - off).abs().max() > 1e-3, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_gradient_filtering_auto_on_peaked_softmax(dtype):
    """A trained model's softmax is peaked: with filter_eps="auto" most tiles are skipped and the gradients
    still meet the dtype's tolerance against float64 (label smoothing included)."""
    pytest.importorskip("triton")
    hidden, weight, b, labels, w = make_inputs(300, 64, 1003, weights=True, ignore_frac=0.1, seed=3)
    labels[labels != IGNORE] %= 200  # frequent tokens: most tiles hold no target, as at V=128k
    # target logit ~60, the others ~N(0, 7.5^2): softmax below 1e-10 off the target
    hidden = (60.0 * weight[labels.clamp(min=0)] + 0.1 * hidden).to(dtype)
    weight = weight.to(dtype)
    eps = torch.finfo(dtype).eps / 32
    _, dropped = filtered_reference(
        hidden, weight, None, labels, w, filter_eps=eps, label_smoothing=0.1, z_loss=0.0
    )
    assert min(dropped) > 0.5, dropped
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    check_tensors(hidden, weight, None, labels, w, backend="triton", label_smoothing=0.1, **tol)


def test_triton_filtering_off_with_softcap_and_smoothing():
    """Softcap reshapes smoothing's uniform gradient per logit, so it cannot be added on the host: filtering
    is off and even a threshold that would drop every tile leaves the gradients exact."""
    pytest.importorskip("triton")
    check(61, 24, 1003, backend="triton", softcap=5.0, label_smoothing=0.1, filter_eps=1.0)


@pytest.fixture
def sparse_memory():
    """``alloc(numel, dtype)``: a tensor on a private anonymous mapping reserved without memory: a page
    exists once written, and reading an untouched page gives zeros. Gigabytes of address space, kilobytes
    of memory."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux mmap semantics (MAP_NORESERVE, zero pages)")
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)

    def alloc(numel, dtype):
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return torch.frombuffer(mmap.mmap(-1, numel * itemsize, flags=flags), dtype=dtype, count=numel)

    return alloc


def test_triton_offsets_past_2_31(sparse_memory):
    """Row offsets ``row * stride`` past 2^31 elements (a 131,200 x 16,384 lm_head reaches 2.1e9): views whose
    rows are 2^31 - 16 elements apart, so row 2 sits at 2^32 - 32. Offsets computed in int32 wrap to -32,
    inside the mapping, where zeros are read: a wrong loss and wrong gradients rather than a crash."""
    pytest.importorskip("triton")
    D, stride = 16, 2**31 - 16
    memory = sparse_memory(64 + 2 * stride + 2 * D, torch.float16)
    weight = memory[64:].as_strided((3, D), (stride, 1))  # vocab rows at 64, 64 + stride, 64 + 2 stride
    hidden = memory[64 + D :].as_strided((3, D), (stride, 1))  # token rows right after each vocab row
    g = torch.Generator().manual_seed(0)
    weight.copy_(torch.randn(3, D, generator=g) / D**0.5)
    hidden.copy_(torch.randn(3, D, generator=g))
    labels = torch.tensor([2, 0, 2])
    check_tensors(hidden, weight, None, labels, None, backend="triton", reduction="sum", atol=2e-3, rtol=2e-2)


# ----------------------------------------------------------------------------------- chunked triton path


@pytest.fixture
def small_logits_buffer(monkeypatch):
    """The chunked triton path's logits buffer holds 7 rows of V=1003 fp32 (14 of fp16): 37 target rows
    make chunks that do not divide them (7 x 5 + 2 fp32, 14 x 2 + 9 fp16)."""
    monkeypatch.setattr(ce_mod, "_CHUNK_BYTES", 7 * 1003 * 4)


CHUNKED_CASES = {
    "plain_fp32": dict(ignore_frac=0.0),
    "all_fp32": dict(
        bias=True, softcap=5.0, label_smoothing=0.2, z_loss=1e-2, weights=True, reduction="none"
    ),
    "all_uniform_grad_fp32": dict(
        bias=True,
        softcap=5.0,
        label_smoothing=0.2,
        z_loss=1e-2,
        weights=True,
        reduction="none",
        grad_out="ones",
    ),
    "smoothing_sum_fp32": dict(label_smoothing=0.1, reduction="sum"),
    "all_ignored_fp32": dict(ignore_frac=1.1, reduction="none"),
    "all_fp16": dict(
        dtype=torch.float16, bias=True, label_smoothing=0.1, z_loss=1e-3, weights=True, atol=2e-3, rtol=2e-2
    ),
    "softcap_fp16": dict(dtype=torch.float16, softcap=4.0, reduction="none", atol=2e-3, rtol=2e-2),
    # bf16: the kernel only converts bf16 loads / stores (right in the interpreter); the GEMMs are torch's
    "bias_smoothing_bf16": dict(dtype=torch.bfloat16, bias=True, label_smoothing=0.1, atol=1e-2, rtol=5e-2),
}


@pytest.mark.parametrize("case", CHUNKED_CASES, ids=list(CHUNKED_CASES))
def test_chunked_triton(case, small_logits_buffer):
    """The chunked path (torch GEMMs, the row kernel in the interpreter) against float64: loss, z-term and
    every gradient, over chunks that do not divide the target rows; "ones": backward scales the gradients
    computed in the forward pass, else reduction="none" with a random upstream gradient recomputes them."""
    pytest.importorskip("triton")
    opts = dict(CHUNKED_CASES[case])
    check(37, 48, 1003, backend="triton", impl="chunked", seed=len(case), **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_triton_large_odd_vocab(dtype):
    """V=32003: the row kernel's last vocabulary block is partial; softcap and smoothing on."""
    pytest.importorskip("triton")
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=5e-2)
    check(13, 16, 32003, backend="triton", impl="chunked", dtype=dtype, weights=True, reduction="none",
          softcap=30.0, label_smoothing=0.05, z_loss=1e-3, seed=3, **tol)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_torch_chunked_half_precision(dtype, small_chunks):
    """The torch backend (CPU) in bf16 / fp16: torch's matmul in the input dtype, the row step in fp32."""
    check(67, 24, 1003, backend="torch", dtype=dtype, bias=True, label_smoothing=0.1, weights=True,
          atol=1e-2, rtol=5e-2)  # fmt: skip


def test_chunk_rows_bound():
    """The chunk of logits is at most _CHUNK_BYTES (256 MiB): Llama-3 (V=128,256) takes 1024 rows in bf16,
    512 in fp32 (whole 128-row tiles), so 1k RAFT targets are one chunk; a short input is one chunk of n."""
    assert ce_mod._CHUNK_BYTES == 256 * 2**20
    assert ce_mod._chunk_rows(16384, 128256, 2) == 1024
    assert ce_mod._chunk_rows(16384, 128256, 4) == 512
    assert ce_mod._chunk_rows(1000, 128256, 2) == 1000
    for V, e in ((128256, 2), (32003, 4), (151936, 2), (2**28, 4)):
        rows = ce_mod._chunk_rows(10**6, V, e)
        assert rows >= 1 and (rows * V * e <= ce_mod._CHUNK_BYTES or rows == 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_triton_logits_stay_within_the_buffer_bound(dtype, monkeypatch):
    """Every tensor of logits rows the chunked path creates, forward and backward, is (rows, V) with
    rows * V * itemsize <= _CHUNK_BYTES (checked on every aten op's outputs, not by timing); the rows of all
    chunks together cover every target exactly once. bf16: grad_weight's fp32 accumulation (where torch has
    no fp32-output GEMM, as on CPU) adds products of vocabulary slices, each within the bound too."""
    pytest.importorskip("triton")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Outputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.append((str(func), tuple(t.shape), t.element_size()))
            return out

    bound = 1 << 20
    monkeypatch.setattr(ce_mod, "_CHUNK_BYTES", bound)
    N, D, V = 301, 24, 32003  # all logits: 38 MB fp32; 8 rows per chunk
    hidden, weight, _, labels, _ = make_inputs(N, D, V, dtype=dtype, ignore_frac=0.1, seed=2)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    with Outputs() as mode:
        loss = fused_linear_cross_entropy(hidden, weight, labels, backend="triton", impl="chunked")
        torch.autograd.grad(loss, leaves)
    views_of_weight = ("aten.permute.default", "aten.t.default", "aten.transpose.int")  # (D, V): not logits
    logits = [s[0] * V * e for f, s, e in mode.seen if len(s) == 2 and s[1] == V and f not in views_of_weight]
    assert logits and max(logits) <= bound
    # grad_weight (V, D) itself is no temporary: the first chunk's GEMM writes it (fp32: one GEMM, no slices)
    products = [
        math.prod(s) * e for f, s, e in mode.seen if f.startswith(("aten.mm.", "aten.addmm.")) and s != (V, D)
    ]
    assert products and max(products) <= bound
    gemm_rows = sum(s[0] for f, s, _ in mode.seen if f.startswith("aten.mm") and len(s) == 2 and s[1] == V)
    assert gemm_rows == int((labels != IGNORE).sum())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunked_deterministic(backend, small_logits_buffer):
    """Under torch.use_deterministic_algorithms(True) the chunked path gives bitwise the same loss and
    gradients on a repeat: torch GEMMs in a fixed chunk order, a row kernel without atomics."""
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, b, labels, w = make_inputs(
        61, 16, 1003, bias=True, weights=True, ignore_frac=0.1, seed=11
    )
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    runs = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            loss = fused_linear_cross_entropy(
                hidden, weight, labels, bias=b, weights=w, softcap=5.0, backend=backend, impl="chunked"
            )
            runs.append([loss, *torch.autograd.grad(loss, leaves)])
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for name, first, second in zip(("loss", "hidden", "weight", "bias"), *runs):
        assert torch.equal(first, second), name


def test_impl_auto_is_chunked(monkeypatch):
    """impl="auto" runs the chunked design (on the triton backend: the row kernel, not the no-logits kernels)."""
    pytest.importorskip("triton")
    called = []
    for name in ("_triton_chunks", "_triton_forward"):
        real = getattr(ce_mod, name)
        monkeypatch.setattr(ce_mod, name, lambda *a, _r=real, _n=name: called.append(_n) or _r(*a))
    hidden, weight, _, labels, _ = make_inputs(9, 8, 31)
    fused_linear_cross_entropy(hidden, weight, labels, backend="triton")
    assert called == ["_triton_chunks"]


def integer_inputs(N, H, V, *, bias, seed):
    """Small integers: every logit is an exact integer in any dtype and accumulation order, so the argmax ties
    are exact (many rows have several maxima) and every other gap is >= 1. Targets: the first maximum of one
    row in three, the last maximum (a tie lost to an earlier index, or the only one) of another, else random."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-3, 4, (N, H), generator=g).float()
    weight = torch.randint(-1, 2, (V, H), generator=g).float()
    b = torch.randint(-2, 3, (V,), generator=g).float() if bias else None
    z = hidden @ weight.T + (0.0 if b is None else b)
    is_max = z == z.amax(1, keepdim=True)
    first = is_max.int().argmax(1)
    last = V - 1 - is_max.flip(1).int().argmax(1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[0::3], labels[1::3] = first[0::3], last[1::3]
    labels[torch.rand(N, generator=g) < 0.2] = IGNORE
    ties = (is_max.sum(1) > 1) & (labels != IGNORE)
    assert ties[1::3].any() and ties[0::3].any()  # ties both won (first index) and lost (a later one)
    return hidden, weight, b, labels


HIT_CASES = {  # backend, impl, dtype, options, V
    "torch_chunked": ("torch", "chunked", torch.float32, dict(), 1003),
    "torch_chunked_bf16_all": ("torch", "chunked", torch.bfloat16,
                               dict(bias=True, softcap=300.0, label_smoothing=0.1, z_loss=1e-3), 1003),
    "triton_chunked": ("triton", "chunked", torch.float32, dict(bias=True, label_smoothing=0.1), 1003),
    "triton_chunked_blocks": ("triton", "chunked", torch.float16, dict(softcap=300.0), 5003),
    "triton": ("triton", "triton", torch.float32, dict(bias=True, softcap=300.0, label_smoothing=0.1), 1003),
    "triton_fp16": ("triton", "triton", torch.float16, dict(z_loss=1e-3), 1003),
}  # fmt: skip


@pytest.mark.parametrize("case", HIT_CASES, ids=list(HIT_CASES))
def test_hits_break_ties_at_the_first_index(case, small_chunks, small_logits_buffer, monkeypatch):
    """return_hits equals the reference's ``argmax == label`` exactly, ties included (the first index wins, as
    torch.argmax): across the chunked path's row chunks and row-kernel vocabulary blocks (V=5003 > BLOCK_V=4096),
    and the no-logits kernels' vocabulary tiles and splits (one tile per split); ignored rows are never hits."""
    backend, impl, dtype, opts, V = HIT_CASES[case]
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setattr(ce_mod, "_DEFAULT_SMS", 10**4)  # impl="triton": one vocabulary tile per split
    opts = dict(opts)
    hidden, weight, b, labels = integer_inputs(41, 16, V, bias=opts.pop("bias", False), seed=len(case))
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    b = None if b is None else b.to(dtype)
    loss, hits = fused_linear_cross_entropy(
        hidden, weight, labels, bias=b, backend=backend, impl=impl, reduction="sum", return_hits=True, **opts
    )
    _, _, want = reference(hidden, weight, labels, bias=b, reduction="sum", **opts)
    assert torch.isfinite(loss)
    assert torch.equal(hits, want), (hits ^ want).nonzero().squeeze(1).tolist()
    assert want.any() and not want.all()
    with_z = fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend=backend, impl=impl,
                                        return_z_loss=True, return_hits=True, **opts)  # fmt: skip
    assert len(with_z) == 3 and torch.equal(with_z[2], hits)


def test_impl_fused_is_the_deprecated_name_of_triton():
    """impl="fused" (the old name) still runs the no-logits kernels, with a FutureWarning."""
    pytest.importorskip("triton")
    hidden, weight, _, labels, _ = make_inputs(9, 8, 31)
    with pytest.warns(FutureWarning, match="impl='triton'"):
        old = fused_linear_cross_entropy(hidden, weight, labels, backend="triton", impl="fused")
    assert torch.equal(
        old, fused_linear_cross_entropy(hidden, weight, labels, backend="triton", impl="triton")
    )
    assert "fused" in ce_mod.IMPLS  # RagTrainingArguments(fused_loss_impl="fused") stays valid


class _LastProgramSkipped:
    """A kernel launched with one program fewer than asked: the outputs of its last program stay unwritten."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return self.kernel[(grid[0] - 1, *grid[1:])]


@pytest.mark.parametrize("kernel, impl", [("_flce_rows_kernel", "chunked"), ("_flce_fwd_kernel", "triton")])
def test_an_unwritten_output_shows_as_nan(kernel, impl, monkeypatch):
    """The poisoned_outputs fixture (conftest) at work: a kernel that skips its last row block leaves NaN in the
    loss (and a poisoned argmax, so no hit) instead of whatever the allocator held."""
    pytest.importorskip("triton")
    monkeypatch.setattr(ce_mod, kernel, _LastProgramSkipped(getattr(ce_mod, kernel)))
    hidden, weight, _, labels, _ = make_inputs(9, 8, 31, ignore_frac=0.0)
    loss, hits = fused_linear_cross_entropy(
        hidden, weight, labels, backend="triton", impl=impl, reduction="none", return_hits=True
    )
    assert loss.isnan().any() and not hits[-1]


# ------------------------------------------------------------------------ autocast, single chunk, handover

AUTOCAST_CASES = {  # backend, impl
    "torch_chunked": ("torch", "chunked"),
    "triton_chunked": ("triton", "chunked"),
    "triton_triton": ("triton", "triton"),
    "triton_auto": ("triton", "auto"),
}


@pytest.mark.parametrize("leaves", ["fp32", "bf16_hidden"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=list(AUTOCAST_CASES))
def test_autocast_direct_call(case, reduction, leaves, small_logits_buffer):
    """Called directly under torch.autocast (bf16) with fp32 leaves (or bf16 hidden states and an fp32 master
    weight and bias): the product runs in bf16 as ``F.linear``'s would, and the outputs come in the dtypes that
    ``F.cross_entropy(F.linear(h, W, b))`` under the same autocast gives (loss fp32, each gradient in its leaf's
    dtype), with the values of the float64 reference on the bf16-rounded leaves; several chunks (37 rows, 7 per
    chunk in fp32 logits) and one. The chunked triton path used to raise in ``index_copy_`` (Float vs BFloat16)."""
    backend, impl = AUTOCAST_CASES[case]
    if backend == "triton":
        pytest.importorskip("triton")
    for N in (37, 5):
        hidden, weight, b, labels, w = make_inputs(N, 48, 1003, bias=True, weights=True, seed=N)
        if leaves == "bf16_hidden":
            hidden = hidden.bfloat16()
        leaf = [t.requires_grad_() for t in (hidden, weight, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, weights=w, reduction=reduction,
                                              label_smoothing=0.1, backend=backend, impl=impl)  # fmt: skip
            plain = F.cross_entropy(
                F.linear(hidden, weight, b), labels, reduction=reduction, ignore_index=IGNORE
            )
        go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
        grads = torch.autograd.grad(loss, leaf, go)
        plain_grads = torch.autograd.grad(plain, leaf, torch.ones_like(plain))
        assert loss.dtype == plain.dtype == torch.float32
        assert [g.dtype for g in grads] == [g.dtype for g in plain_grads] == [t.dtype for t in leaf]
        rounded = [t.detach().bfloat16().double().requires_grad_() for t in leaf]
        ref = fused_linear_cross_entropy_reference(*rounded[:2], labels, bias=rounded[2], weights=w.double(),
                                                   reduction=reduction, label_smoothing=0.1)  # fmt: skip
        ref_grads = torch.autograd.grad(ref, rounded, go.double())
        torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-2, rtol=2e-2)
        for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
            torch.testing.assert_close(
                got.double(), want, atol=1e-2, rtol=5e-2, msg=lambda m, n=name: f"{n}: {m}"
            )


class _VocabOps:
    """A TorchDispatchMode recording ``(phase, op, shape, dtype)`` of every op output of the given shapes."""

    def __new__(cls, shapes):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.phase, self.seen = "forward", []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and tuple(t.shape) in shapes:
                        self.seen.append((self.phase, str(func), tuple(t.shape), t.dtype))
                return out

        return Mode()


SINGLE_CHUNK_CASES = {  # backend, leaves' dtype, autocast
    "torch_fp32": ("torch", torch.float32, False),
    "triton_fp32": ("triton", torch.float32, False),
    "triton_bf16": ("triton", torch.bfloat16, False),
    "triton_autocast_fp32_leaves": ("triton", torch.float32, True),
}


@pytest.mark.parametrize("upstream", [1.0, 2.5])
@pytest.mark.parametrize("case", SINGLE_CHUNK_CASES, ids=list(SINGLE_CHUNK_CASES))
def test_single_chunk_writes_its_gradients_straight(case, upstream):
    """One chunk of target rows: grad_weight is that chunk's GEMM written straight into a new tensor (no zero-fill
    of a (V, D) accumulator, no addmm into it, no copy to another dtype; fp32 master weights under autocast get
    the fp32 product itself, no bf16 (V, D) tensor but autocast's compute copy of the weight). Backward hands the
    gradients computed in the forward pass over: untouched when the upstream gradient is 1 (read on the host for
    CPU tensors: no device sync), else scaled in place; no new (V, D) or (N, D) tensor either way."""
    backend, dtype, autocast = SINGLE_CHUNK_CASES[case]
    if backend == "triton":
        pytest.importorskip("triton")
    N, D, V = 24, 40, 72  # distinct, so (V, D) and (N, D) tensors are recognisable
    hidden, weight, _, labels, _ = make_inputs(N, D, V, dtype=dtype, ignore_frac=0.5, seed=5)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    with _VocabOps({(V, D), (N, D)}) as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend, impl="chunked")
        mode.phase = "backward"
        grads = torch.autograd.grad(loss, leaves, torch.tensor(upstream))
    ops = mode.seen
    vd = [(ph, f, dt) for ph, f, s, dt in ops if s == (V, D)]
    assert not [o for o in ops if o[1].split(".")[1] in ("zero_", "fill_", "zeros", "new_zeros", "zeros_like")
                and o[2] == (V, D)], ops  # fmt: skip
    assert not [o for o in vd if "addmm" in o[1]], vd
    forward_vd = [(f, dt) for ph, f, dt in vd if ph == "forward"]
    compute_copy = [("aten._to_copy.default", torch.bfloat16)] if autocast else []
    assert forward_vd == compute_copy + [("aten.mm.default", dtype)], forward_vd
    backward = [(f, s) for ph, f, s, _ in ops if ph == "backward"]
    assert backward == (
        [] if upstream == 1.0 else [("aten.mul_.Tensor", (N, D)), ("aten.mul_.Tensor", (V, D))]
    )
    assert [g.dtype for g in grads] == [dtype, dtype]
    rh, rw = (t.detach().bfloat16().double() if autocast else t.detach().double() for t in leaves)
    rh.requires_grad_(), rw.requires_grad_()
    ref = fused_linear_cross_entropy_reference(rh, rw, labels)
    tol = (
        dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 and not autocast else dict(atol=1e-2, rtol=5e-2)
    )
    for got, want in zip(grads, torch.autograd.grad(ref, [rh, rw], torch.tensor(upstream).double())):
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_master_weight_gradient_is_not_rounded(backend, small_chunks, small_logits_buffer):
    """Autocast training, the common case: fp32 hidden states and master weight, the product in bf16. The weight's
    gradient is the fp32 accumulator handed over, so (torch backend: fp32 row step) it matches the float64
    reference of the bf16-rounded leaves far below bf16's resolution; casting the weight to bf16 outside (the
    old route) rounds it to bf16 and back, ~2^-9 relative. Triton backend (bf16 logits gradient, its own rounding):
    the gradient is fp32 and no bf16 (V, D) tensor exists but autocast's compute copy of the weight."""
    if backend == "triton":
        pytest.importorskip("triton")
    N, D, V = 64, 40, 1003  # several chunks on both backends
    hidden, weight, _, labels, _ = make_inputs(N, D, V, ignore_frac=0.1, seed=9)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    with _VocabOps({(V, D)}) as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", backend=backend)
        gw = torch.autograd.grad(loss, leaves)[1]
    assert gw.dtype == torch.float32
    assert [o for o in mode.seen if o[3] == torch.bfloat16] == [("forward", "aten._to_copy.default", (V, D),
                                                                 torch.bfloat16)]  # fmt: skip
    rh, rw = (t.detach().bfloat16().double().requires_grad_() for t in leaves)
    z = rh @ rw.T
    z = z + (z.bfloat16().double() - z).detach()  # the bf16 logits of F.linear under autocast, float64 after
    want = torch.autograd.grad(F.cross_entropy(z, labels, ignore_index=IGNORE, reduction="sum"), rw)[0]
    scale = want.abs().max().item()
    if backend == "torch":
        assert (gw.double() - want).abs().max().item() < 2**-14 * scale
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the old route: a bf16 weight made outside
            old = fused_linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, reduction="sum")
        round_trip = torch.autograd.grad(old, weight)[0]
        assert (round_trip.double() - want).abs().max().item() > 2**-11 * scale
    torch.testing.assert_close(gw.double(), want, atol=2e-2 * scale, rtol=5e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_retain_graph_second_backward_recomputes(backend, small_logits_buffer):
    """The first backward hands its precomputed gradients over to autograd; a second one through the same graph
    (retain_graph=True) recomputes them, so both are right (and the first result is not scaled again)."""
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, b, labels, w = make_inputs(37, 48, 1003, bias=True, weights=True, seed=4)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    for reduction in ("mean", "none"):
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, weights=w, reduction=reduction,
                                          backend=backend, impl="chunked")  # fmt: skip
        go = torch.full(loss.shape, 3.0)
        first = torch.autograd.grad(loss, leaves, go, retain_graph=True)
        first_copy = [g.clone() for g in first]
        second = torch.autograd.grad(loss, leaves, go * 2)
        for a, a0, c in zip(first, first_copy, second):
            assert torch.equal(a, a0)
            torch.testing.assert_close(c, 2 * a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_scale_kernel(dtype, monkeypatch):
    """On a GPU the upstream gradient of a mean / sum loss is not read on the host (a sync): _flce_scale_kernel
    tests it on the device, leaving the gradient untouched at 1 and otherwise scaling it in place as ``mul_``
    does (fp32 product, one rounding). Through backward: the same gradients as the host path."""
    pytest.importorskip("triton")
    x = torch.randn(3 * 4096 + 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    for f in (1.0, 2.5, -0.3):
        got, want = x.clone(), x.clone().mul_(torch.tensor(f))
        ce_mod._scale_unless_one(got, torch.tensor(f), None)
        if (
            dtype == torch.bfloat16 and f != 1.0
        ):  # the interpreter truncates to bf16 (a GPU rounds to nearest)
            torch.testing.assert_close(got, want, atol=0, rtol=2**-7)
        else:
            assert torch.equal(got, want), f
    hidden, weight, b, labels, w = make_inputs(37, 48, 1003, bias=True, weights=True, seed=6)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    launches = []
    for device_test in (False, True):
        if device_test:  # as on a GPU: the factor is unknown on the host
            monkeypatch.setattr(ce_mod, "_known_one", lambda g: None)
            real = ce_mod._flce_scale_kernel
            monkeypatch.setattr(ce_mod, "_flce_scale_kernel", _Recorded(real, launches))
        runs = []
        for reduction, upstream in (("mean", 1.0), ("sum", 2.5)):
            loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, weights=w, reduction=reduction,
                                              backend="triton", impl="chunked")  # fmt: skip
            runs.append(torch.autograd.grad(loss, leaves, torch.tensor(upstream)))
        if not device_test:
            host = runs
    assert len(launches) == 6  # hidden, weight, bias, in each of the two backward passes
    for a, c in zip(host, runs):
        for x, y in zip(a, c):
            assert torch.equal(x, y)


class _Recorded:
    """A kernel whose launches are counted."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]
