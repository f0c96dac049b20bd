"""fused_linear_cross_entropy against F.cross_entropy(hidden @ weight.T) in float64: loss and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from ragkern.kernels import cross_entropy as ce_mod
from ragkern.kernels import fused_linear_cross_entropy

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


def reference(hidden, weight, labels, *, bias=None, reduction="mean", softcap=None, label_smoothing=0.0,
              z_loss=0.0, weights=None):  # fmt: skip
    """Materialised logits in float64; same definition of every option as the fused loss."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != IGNORE
    per = F.cross_entropy(
        logits, labels, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing
    )
    zterm = z_loss * torch.logsumexp(logits, dim=1) ** 2 * valid
    per = per + zterm
    if weights is not None:
        per, zterm = per * weights.double(), zterm * weights.double()
    if reduction == "none":
        return per, zterm
    if reduction == "sum":
        return per.sum(), zterm.sum()
    n = max(int(valid.sum()), 1)
    return per.sum() / n, zterm.sum() / n


def check(N, H, V, *, backend, dtype=torch.float32, bias=False, ignore_frac=0.25, weights=False, seed=0,
          atol=1e-5, rtol=1e-4, grad_out="random", **opts):  # fmt: skip
    hidden, weight, b, labels, w = make_inputs(
        N, H, V, dtype=dtype, bias=bias, ignore_frac=ignore_frac, weights=weights, seed=seed
    )
    leaves = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    loss, zterm = fused_linear_cross_entropy(
        hidden, weight, labels, bias=b, weights=w, backend=backend, return_z_loss=True, **opts
    )
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rh, rw, rb = ref_leaves + [None] * (3 - len(ref_leaves))
    ref, ref_z = reference(rh, rw, labels, bias=rb, weights=w, **opts)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(zterm.double(), ref_z.detach(), atol=atol, rtol=rtol)
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
    "backend, reduction", [("torch", "mean"), ("torch", "none"), ("triton", "none")], ids=lambda x: x
)
def test_frozen_weight(backend, reduction, small_chunks):
    """A frozen lm_head (LoRA elsewhere): only grad_hidden is computed, and it is right."""
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, _, labels, _ = make_inputs(29, 16, 301, seed=5)
    hidden.requires_grad_()
    loss = fused_linear_cross_entropy(
        hidden, weight, labels, softcap=4.0, reduction=reduction, backend=backend
    )
    ref_hidden = hidden.detach().double().requires_grad_()
    ref = reference(ref_hidden, weight, labels, softcap=4.0, reduction=reduction)[0]
    go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3))
    (got,) = torch.autograd.grad(loss, hidden, go)
    (want,) = torch.autograd.grad(ref, ref_hidden, go.double())
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
        (dict(softcap=0.0), "softcap"),
        (dict(label_smoothing=1.5), "label_smoothing"),
    ],
    ids=["hidden_3d", "weight_H", "labels_N", "labels_float", "dtype_mix", "bias_V", "weights_N",
         "reduction", "backend", "softcap", "smoothing"],
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


@pytest.mark.slow  # about a minute on a cold Triton cache (two cores), seconds once cached
def test_aot_compiles():
    """Every launched configuration compiles for sm_80 and sm_90 with no register spills; HGMMA on sm_90."""
    pytest.importorskip("triton")
    from ragkern.kernels._aot import compile_modules

    records = compile_modules(["ragkern.kernels.cross_entropy"], archs=(80, 90))
    assert len(records) == 2 * len(ce_mod.aot_specs()) == 48
    spilled = [(r["kernel"], r["config"], r["arch"]) for r in records if r["stack_bytes"]]
    assert not spilled
    assert all(r["hgmma"] > 0 for r in records if r["arch"] == "sm_90")


@pytest.fixture
def tf32_emulation(monkeypatch):
    """The interpreter computes every fp32 ``tl.dot`` in full precision; make it round operands to TF32 (keep
    10 mantissa bits: drop the low 13) where the kernel asks for "tf32", as an sm_80/sm_90 tensor core does."""
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
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError) as err:
            fused_linear_cross_entropy(hidden, weight, labels, backend=backend)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    for part in (f"labels[6] = {bad}", "[0, V=31)", "ignore_index=-100"):
        assert part in messages[0]
