"""lora_linear (torch path and Triton under the interpreter) against peft's own LoRA layer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from ragkern.kernels import lora_linear
from ragkern.kernels.lora import aot_specs, dropout_keep_mask, lora_linear_reference

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}


def _peft_layer(K: int, N: int, r: int, bias: bool, dropout: float = 0.0, alpha: int = 16):
    """A peft LoRA layer over nn.Linear(K, N) with random (non-zero) A and B."""
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(K, N, bias=bias))
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=dropout)
    layer = get_peft_model(base, cfg).base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        if bias:
            layer.base_layer.bias.normal_()
    return layer


def _params(layer, dtype=torch.float32):
    w = layer.base_layer.weight.detach().to(dtype)
    b = layer.base_layer.bias.detach().to(dtype) if layer.base_layer.bias is not None else None
    a = layer.lora_A["default"].weight.detach().to(dtype).clone().requires_grad_()
    bb = layer.lora_B["default"].weight.detach().to(dtype).clone().requires_grad_()
    return w, b, a, bb, layer.scaling["default"]


def _peft_run(layer, x, g):
    x = x.detach().float().clone().requires_grad_()
    y = layer(x)
    y.backward(g.float())
    return y, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def _compare(layer, x, backend, dtype=torch.float32):
    torch.manual_seed(1)
    g = torch.randn(*x.shape[:-1], layer.out_features, dtype=dtype)
    y_ref, gx_ref, ga_ref, gb_ref = _peft_run(layer, x, g)
    w, b, a, bb, s = _params(layer, dtype)
    xx = x.detach().to(dtype).clone().requires_grad_()
    y = lora_linear(xx, w, a, bb, s, bias=b, backend=backend)
    y.backward(g)
    assert y.shape == y_ref.shape and y.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(xx.grad.float(), gx_ref, **tol)
    torch.testing.assert_close(a.grad.float(), ga_ref, **tol)
    torch.testing.assert_close(bb.grad.float(), gb_ref, **tol)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("lead", [(37,), (3, 13)], ids=["2d", "3d"])
@pytest.mark.parametrize("r", [1, 8, 16, 64])
def test_torch_matches_peft(r, lead, bias):
    torch.manual_seed(0)
    layer = _peft_layer(67, 45, r, bias)
    _compare(layer, torch.randn(*lead, 67), "torch")


@pytest.mark.parametrize(
    "r,lead,bias,dtype",
    [
        (1, (37,), True, torch.float32),
        (8, (3, 13), False, torch.float32),
        (16, (37,), False, torch.float16),
        (64, (3, 13), True, torch.float16),
        (64, (37,), True, torch.float32),
    ],
    ids=["r1-2d-bias-fp32", "r8-3d-fp32", "r16-2d-fp16", "r64-3d-bias-fp16", "r64-2d-bias-fp32"],
)
def test_triton_matches_peft(r, lead, bias, dtype):
    torch.manual_seed(0)
    layer = _peft_layer(67, 45, r, bias)  # 67 in, 45 out: not multiples of any block
    if dtype == torch.float16:  # peft runs in fp32 on fp16-representable values
        with torch.no_grad():
            for prm in layer.parameters():
                prm.copy_(prm.half().float())
    _compare(layer, torch.randn(*lead, 67).to(dtype).float(), "triton", dtype)


@pytest.mark.parametrize(
    "backend,dtype",
    [("torch", torch.float32), ("triton", torch.float32), ("triton", torch.float16)],
)
def test_dropout_matches_masked_reference(backend, dtype):
    torch.manual_seed(0)
    T, K, N, r, p, seed = 41, 67, 45, 8, 0.3, 1234
    layer = _peft_layer(K, N, r, bias=True)
    w, b, a, bb, s = _params(layer, dtype)
    x = torch.randn(T, K, dtype=dtype, requires_grad=True)
    g = torch.randn(T, N, dtype=dtype)
    y = lora_linear(x, w, a, bb, s, bias=b, dropout_p=p, seed=seed, backend=backend)
    y.backward(g)

    keep = dropout_keep_mask((T, K), p, seed, backend=backend)
    xr = x.detach().float().clone().requires_grad_()
    ar = a.detach().float().clone().requires_grad_()
    br = bb.detach().float().clone().requires_grad_()
    yr = lora_linear_reference(xr, w.float(), ar, br, s, bias=b.float(), dropout_p=p, keep=keep)
    yr.backward(g.float())
    tol = TOL[dtype]
    torch.testing.assert_close(y.float(), yr, **tol)
    torch.testing.assert_close(x.grad.float(), xr.grad, **tol)
    torch.testing.assert_close(a.grad.float(), ar.grad, **tol)
    torch.testing.assert_close(bb.grad.float(), br.grad, **tol)

    # same seed, same result; another seed, another mask
    y2 = lora_linear(
        x.detach(), w, a.detach(), bb.detach(), s, bias=b, dropout_p=p, seed=seed, backend=backend
    )
    torch.testing.assert_close(y2, y.detach(), atol=0, rtol=0)
    assert not torch.equal(keep, dropout_keep_mask((T, K), p, seed + 1, backend=backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate(backend, p):
    n = 200 * 300
    keep = dropout_keep_mask((200, 300), p, 7, backend=backend)
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5  # 5 standard deviations
    # no structure along rows or columns: every row's rate is plausible
    rows = 1 - keep.float().mean(1)
    assert (rows - p).abs().max() < 6 * (p * (1 - p) / 300) ** 0.5


def _philox4x32_10(seed: int, c0: np.ndarray, c1: np.ndarray) -> list[np.ndarray]:
    """Philox4x32-10 (Salmon et al., SC'11) of counters (c0, c1, 0, 0) under the 64-bit key ``seed``, in numpy."""
    mask = np.uint64(0xFFFFFFFF)
    zero = np.zeros_like(c0, np.uint64)
    c = [c0.astype(np.uint64), c1.astype(np.uint64), zero, zero]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0, p2 = c[0] * np.uint64(0xD2511F53), c[2] * np.uint64(0xCD9E8D57)
        c = [(p2 >> np.uint64(32)) ^ c[1] ^ k0, p2 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c


@pytest.mark.parametrize("T,K,p,seed", [(5, 67, 0.3, 1234), (3, 40, 0.9, 2**40 + 17)])
def test_triton_mask_is_four_words_per_philox_call(T, K, p, seed):
    """The documented mask of the triton path, from an independent Philox: element (t, k) keeps iff word k % 4 of
    Philox4x32-10 at counter t * ceil(K / 4) + k // 4 is >= floor(p * 2^32); one call serves 4 elements (the
    old mask, word 0 of one call per element compared as a float, fails this)."""
    keep = dropout_keep_mask((T, K), p, seed, backend="triton").numpy()
    t, k = np.meshgrid(np.arange(T), np.arange(K), indexing="ij")
    words = _philox4x32_10(seed, (t * ((K + 3) // 4) + k // 4).astype(np.uint32), np.zeros((T, K), np.uint32))
    word = np.choose(k % 4, words)
    thr = int(min(np.float32(p) * np.float32(2.0**32), 4294967040.0))
    np.testing.assert_array_equal(keep, word >= thr)


def test_triton_mask_words_are_independent():
    """The four words of one Philox call land on neighbouring columns: each column class k % 4 keeps at 1 - p,
    and two words of one call agree no more often than independent draws would ((1 - p)^2 + p^2)."""
    p, T, K = 0.3, 256, 256
    keep = dropout_keep_mask((T, K), p, 11, backend="triton").view(T, K // 4, 4).float()
    n = T * K // 4
    for lane in range(4):
        assert abs(1 - keep[..., lane].mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    agree = (1 - p) ** 2 + p**2
    for i in range(4):
        for j in range(i + 1, 4):
            same = (keep[..., i] == keep[..., j]).float().mean().item()
            assert abs(same - agree) < 5 * (agree * (1 - agree) / n) ** 0.5, (i, j, same)
    other = dropout_keep_mask((T, K), p, 12, backend="triton")
    assert not torch.equal(keep, other.view(T, K // 4, 4).float())


# Compiles the dropout kernels for sm_90 (no GPU needed) and counts the Philox multiplies (umulhi) per element of
# the tile that draws the mask: in TTIR (lanes of every tt.mulhiui, over BLOCK_M x BLOCK_K) and in PTX (mul.hi.u32
# per thread, times the threads, over the tile). Run outside the interpreter, which cannot compile.
_PHILOX_COUNT = r"""
import json, math, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ragkern.kernels import _aot
from ragkern.kernels.lora import aot_specs
out = {}
for spec in aot_specs():
    if "dropout=1" not in spec.config or " R=16 " not in spec.config or "K%16" not in spec.config:
        continue
    sig, cx, attrs = _aot._specialised(spec)
    k = triton.compile(ASTSource(spec.fn, sig, cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    tile = spec.constexprs["BLOCK_M"] * spec.constexprs["BLOCK_K"]
    lanes = sum(math.prod(int(d) for d in m.group(1).split("x"))
                for m in re.finditer(r"tt\.mulhiui .*: tensor<([0-9x]+)xi32>", k.asm["ttir"]))
    ptx = len(re.findall(r"\bmul\.hi\.u32\b", k.asm["ptx"])) * 32 * spec.num_warps
    out[spec.kernel + " " + spec.config.split()[0]] = (lanes / tile, ptx / tile)
print("PHILOX " + json.dumps(out))
"""


def test_dropout_kernels_draw_one_philox_call_per_four_elements():
    """Structural: one Philox4x32-10 call has at most 20 32-bit multiply-highs and now serves 4 mask elements, so
    the compiled dropout kernels (xa, dx, dA; fp16 and fp32 tiles) run <= 5 per element. The old
    ``tl.rand(seed, t * K + k)`` ran one call per element: 17 per element in TTIR and ~14 in PTX for sm_90."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PHILOX_COUNT], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("PHILOX "))[7:])
    assert {name.split()[0] for name in counts} == {"lora_xa", "lora_dx", "lora_da"}
    assert {name.split()[1] for name in counts} == {"fp16", "bf16", "fp32"}
    for name, (ttir, ptx) in counts.items():
        assert 0 < ttir <= 5 and 0 < ptx <= 5, (name, ttir, ptx)


def test_no_dropout_in_auto_on_cpu_is_torch_path():
    torch.manual_seed(0)
    x, w, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    torch.testing.assert_close(lora_linear(x, w, a, b, 0.5), lora_linear(x, w, a, b, 0.5, backend="torch"))


def test_weight_and_bias_grads_when_trainable():
    torch.manual_seed(0)
    x = torch.randn(9, 8)
    w, bias = torch.randn(6, 8, requires_grad=True), torch.randn(6, requires_grad=True)
    a, b = torch.randn(3, 8, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    for backend in ("torch", "triton"):
        y = lora_linear(x, w, a, b, 2.0, bias=bias, backend=backend)
        gw, gbias = torch.autograd.grad(y.square().sum(), (w, bias))
        wr, br = w.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
        yr = lora_linear_reference(x, wr, a.detach(), b.detach(), 2.0, bias=br)
        gwr, gbr = torch.autograd.grad(yr.square().sum(), (wr, br))
        torch.testing.assert_close(gw, gwr, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gbias, gbr, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(w=torch.randn(6, 7)), "weight must be"),
        (dict(a=torch.randn(2, 7)), "lora_a must be"),
        (dict(b=torch.randn(5, 2)), "lora_b must be"),
        (dict(bias=torch.randn(5)), "bias must be"),
        (dict(a=torch.randn(2, 8, dtype=torch.float64)), "dtype"),
        (dict(x=torch.randn(4, 8, dtype=torch.float64)), "x must be"),
        (dict(p=1.0), "dropout_p"),
        (dict(backend="cuda"), "backend="),
    ],
    ids=["weight", "lora_a", "lora_b", "bias", "dtype", "x-dtype", "p", "backend"],
)
def test_errors(change, match):
    args = dict(x=torch.randn(4, 8), w=torch.randn(6, 8), a=torch.randn(2, 8), b=torch.randn(6, 2), bias=None)
    args.update(p=0.0, backend="torch")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        lora_linear(
            args["x"], args["w"], args["a"], args["b"], 1.0,
            bias=args["bias"], dropout_p=args["p"], backend=args["backend"],
        )  # fmt: skip


def test_aot_specs_listed():
    specs = aot_specs()
    assert {s.kernel for s in specs} == {"lora_xa", "lora_dx", "lora_da"}


def test_split_da_reduction_matches_reference():
    """dA with dropout is reduced over token splits (several programs per column tile): same as the reference."""
    import ragkern.kernels.lora as mod

    T, K, N, r, p = 200, 67, 45, 8, 0.25
    splits, rows = mod._da_splits(T, K, mod._config("da", torch.float32, True), torch.device("cpu"))
    assert splits > 1 and splits * rows >= T
    torch.manual_seed(0)
    layer = _peft_layer(K, N, r, bias=False)
    w, _, a, bb, s = _params(layer)
    x = torch.randn(T, K, requires_grad=True)
    g = torch.randn(T, N)
    lora_linear(x, w, a, bb, s, dropout_p=p, seed=99, backend="triton").backward(g)
    keep = dropout_keep_mask((T, K), p, 99, backend="triton")
    ar = a.detach().clone().requires_grad_()
    br = bb.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    lora_linear_reference(xr, w, ar, br, s, dropout_p=p, keep=keep).backward(g)
    torch.testing.assert_close(a.grad, ar.grad, **TOL[torch.float32])
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float32])


def test_dropout_seed_from_the_device_generator_without_host_sync(host_syncs):
    """seed=None on the triton path: the seed is a device tensor drawn from x's device generator (no .item()):
    zero host syncs in forward and backward; reproducible under torch.manual_seed; fresh per call."""
    torch.manual_seed(0)
    x, w = torch.randn(21, 40), torch.randn(30, 40)
    a, b = torch.randn(4, 40, requires_grad=True), torch.randn(30, 4, requires_grad=True)

    def run():
        y = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, backend="triton")
        y.square().sum().backward()
        return y.detach()

    torch.manual_seed(123)
    y1 = run()
    assert host_syncs == []
    y2 = run()
    torch.manual_seed(123)
    y3 = run()
    assert not torch.equal(y1, y2)  # a fresh mask per call
    assert torch.equal(y1, y3)  # seedable
    seed = torch.tensor([7])
    y4 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=seed, backend="triton")
    y5 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=7, backend="triton")
    assert torch.equal(y4, y5)


@pytest.mark.slow
def test_aot_compiles():
    """Every launched configuration compiles for sm_80 and sm_90 with no spills; fp16/bf16 use HGMMA on sm_90."""
    pytest.importorskip("triton")
    from ragkern.kernels._aot import compile_modules

    records = compile_modules(["ragkern.kernels.lora"], archs=(80, 90))
    assert len(records) == 2 * len(aot_specs())
    spilled = [(r["kernel"], r["config"], r["arch"]) for r in records if r["stack_bytes"]]
    assert not spilled
    assert not [r["int32_offsets"] for r in records if r["int32_offsets"]]
    # IEEE fp32 has no wgmma form: only the fp16/bf16 configs can (and must) use HGMMA
    no_hgmma = [(r["kernel"], r["config"]) for r in records if r["arch"] == "sm_90" and not r["hgmma"]]
    assert no_hgmma and all(c.startswith("fp32") for _, c in no_hgmma)


def test_an_unwritten_output_shows_as_nan(monkeypatch):
    """The poisoned_outputs fixture (conftest) at work: an xa kernel that skips its last row block leaves NaN rows in
    y instead of whatever the allocator held."""
    import ragkern.kernels.lora as mod

    class LastProgramSkipped:
        def __getitem__(self, grid, kernel=mod._xa_kernel):
            return kernel[(grid[0] - 1,)]

    monkeypatch.setattr(mod, "_xa_kernel", LastProgramSkipped())
    x, w, a, b = torch.randn(37, 16), torch.randn(8, 16), torch.randn(4, 16), torch.randn(8, 4)
    y = lora_linear(x, w, a, b, 1.0, backend="triton")
    assert y[-1].isnan().all() and not y[0].isnan().any()
