"""Fused LoRA linear: ``y = x W^T + b + scaling * (drop(x) A^T) B^T`` with the frozen W kept frozen.

Shapes: x ``(..., K)`` flattened to ``(T, K)``, W ``(N, K)``, A ``(R, K)``, B ``(N, R)``, b ``(N,)``, y ``(..., N)``.
``drop(x) = x * keep / (1 - p)`` with ``keep`` drawn from ``seed``; the mask is never stored: the backward
draws it again from the same seed.

Backward, with g = dL/dy ``(T, N)`` and the saved ``xa = drop(x) A^T`` ``(T, R)`` fp32::

    gxa = scaling * g B                        (T, R)
    dB  = scaling * g^T xa                     (N, R)
    dA  = gxa^T drop(x)                        (R, K)
    dx  = g W + keep / (1 - p) * (gxa A)       (T, K)
    dW  = g^T x, db = sum_t g                  only when W / b require grad

No (T, N) buffer is made besides g itself.

Two paths, each an ``autograd.Function``:
- torch (CPU, and the reference): one ``addmm`` for the base, one ``mm`` for xa and one in-place ``addmm_``
  for the update; the keep mask comes from a ``torch.Generator`` seeded with ``seed``.
- triton (CUDA; CPU tensors under ``TRITON_INTERPRET=1``): ``_xa_kernel`` computes xa once per row block,
  ``_fwd_kernel`` adds ``scaling * xa B^T`` in the epilogue of the x W^T tile; ``_dx_kernel`` adds
  ``keep * gxa A`` in the epilogue of the g W tile; ``_da_kernel`` accumulates dA^T over row blocks. The keep
  mask is ``tl.rand(seed, t * K + k) >= p``; the kernels use int32 offsets, so inputs with T * max(K, N) >= 2^31
  run in row chunks (chunk c drawing from seed + c). The two thin products gxa and dB are left to torch
  (``(T, R)`` and ``(N, R)`` outputs).

:func:`dropout_keep_mask` materialises the mask a path would use, for tests only.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

_BACKENDS = ("auto", "torch", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tiles chosen from the sm_80 / sm_90 AOT resource report: 128/64-row M tiles so Hopper uses wgmma (HGMMA)
# for fp16/bf16; narrower K tiles when the in-kernel dropout mask (philox per element) is live; fp32 runs IEEE
# (as torch's default matmul), which has no tensor-core path, so it gets small tiles that stay in registers.
_CONFIGS = {
    # (kernel, fp32, dropout) -> tiles and launch options
    ("fwd", False, False): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    ("xa", False, False): dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    ("xa", False, True): dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=3),
    ("dx", False, False): dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=128, num_warps=8, num_stages=3),
    ("dx", False, True): dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    ("da", False, False): dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    ("da", False, True): dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    ("fwd", True, False): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
    ("xa", True, False): dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=2),
    ("xa", True, True): dict(BLOCK_M=32, BLOCK_K=16, num_warps=4, num_stages=2),
    ("dx", True, False): dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=2),
    ("dx", True, True): dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=2),
    ("da", True, False): dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=2),
    ("da", True, True): dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=2),
}


def _config(kernel: str, dtype: torch.dtype, dropout: bool) -> dict:
    return _CONFIGS[(kernel, dtype == torch.float32, dropout and kernel != "fwd")]


if triton is not None:

    @triton.jit
    def _keep(seed, rows, cols, K, p):
        """(BLOCK_M, BLOCK_K) bool: the dropout keep mask of x[rows, cols]."""
        offs = rows[:, None] * K + cols[None, :]
        return tl.rand(seed, offs) >= p

    @triton.jit
    def _xa_kernel(
        X, A, XA, T, K, seed, p,
        R: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # XA[rows] = drop(x[rows]) @ A^T, fp32 (BLOCK_M, R); R is the rank padded to a power of two >= 16
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < T
        rr = tl.arange(0, R)
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < K
            x = tl.load(
                X + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
            )
            if HAS_DROPOUT:
                x = tl.where(_keep(seed, rows, cols, K, p), x, 0.0)
            a = tl.load(A + rr[:, None] * K + cols[None, :], mask=cmask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(a), acc, input_precision=PREC)
        if HAS_DROPOUT:
            acc = acc / (1.0 - p)
        tl.store(XA + rows[:, None] * R + rr[None, :], acc, mask=rmask[:, None])

    @triton.jit
    def _fwd_kernel(
        X, W, XA, Bm, BIAS, Y, T, N, K, scaling,
        R: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < T
        nmask = outs < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < K
            x = tl.load(
                X + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
            )
            w = tl.load(
                W + outs[:, None] * K + cols[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0
            )
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        # epilogue: + scaling * xa B^T (B padded with zeros past the true rank)
        rr = tl.arange(0, R)
        xa = tl.load(XA + rows[:, None] * R + rr[None, :], mask=rmask[:, None], other=0.0)
        b = tl.load(Bm + outs[:, None] * R + rr[None, :], mask=nmask[:, None], other=0.0)
        acc += scaling * tl.dot(xa.to(b.dtype), tl.trans(b), input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(BIAS + outs, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            Y + rows[:, None] * N + outs[None, :],
            acc.to(Y.dtype.element_ty),
            mask=rmask[:, None] & nmask[None, :],
        )

    @triton.jit
    def _dx_kernel(
        G, W, GXA, A, DX, T, N, K, seed, p,
        R: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rmask = rows < T
        cmask = cols < K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            outs = n0 + tl.arange(0, BLOCK_N)
            nmask = outs < N
            g = tl.load(
                G + rows[:, None] * N + outs[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0
            )
            w = tl.load(
                W + outs[:, None] * K + cols[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0
            )
            acc = tl.dot(g, w, acc, input_precision=PREC)
        # epilogue: + keep / (1 - p) * gxa A (gxa already carries the scaling)
        rr = tl.arange(0, R)
        gxa = tl.load(GXA + rows[:, None] * R + rr[None, :], mask=rmask[:, None], other=0.0)
        a = tl.load(A + rr[:, None] * K + cols[None, :], mask=cmask[None, :], other=0.0)
        low = tl.dot(gxa.to(a.dtype), a, input_precision=PREC)
        if HAS_DROPOUT:
            low = tl.where(_keep(seed, rows, cols, K, p), low / (1.0 - p), 0.0)
        acc += low
        tl.store(
            DX + rows[:, None] * K + cols[None, :],
            acc.to(DX.dtype.element_ty),
            mask=rmask[:, None] & cmask[None, :],
        )

    @triton.jit
    def _da_kernel(
        X, GXA, DAT, T, K, seed, p,
        R: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # DAT[cols] = drop(x)[:, cols]^T @ gxa, fp32 (BLOCK_K, R): dA transposed, so K is the wgmma M dimension
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        cmask = cols < K
        rr = tl.arange(0, R)
        acc = tl.zeros((BLOCK_K, R), dtype=tl.float32)
        for m0 in range(0, T, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < T
            x = tl.load(
                X + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
            )
            if HAS_DROPOUT:
                x = tl.where(_keep(seed, rows, cols, K, p), x, 0.0)
            gxa = tl.load(GXA + rows[:, None] * R + rr[None, :], mask=rmask[:, None], other=0.0)
            acc = tl.dot(tl.trans(x), gxa.to(x.dtype), acc, input_precision=PREC)
        if HAS_DROPOUT:
            acc = acc / (1.0 - p)
        tl.store(DAT + cols[:, None] * R + rr[None, :], acc, mask=cmask[:, None])

    @triton.jit
    def _mask_kernel(OUT, T, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        m = (rows < T)[:, None] & (cols < K)[None, :]
        tl.store(OUT + rows[:, None] * K + cols[None, :], _keep(seed, rows, cols, K, p).to(tl.int8), mask=m)


def _prec(dtype: torch.dtype) -> str:
    # fp32 stays fp32 (as torch's default matmul); fp16/bf16 run on tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _pad_rank(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _padded(t: torch.Tensor, rank_dim: int, R: int) -> torch.Tensor:
    """A or B with the rank dimension zero-padded to R (tl.dot needs >= 16 and a power of two)."""
    r = t.shape[rank_dim]
    if r == R:
        return t.contiguous()
    shape = list(t.shape)
    shape[rank_dim] = R
    out = t.new_zeros(shape)
    out.narrow(rank_dim, 0, r).copy_(t)
    return out


def _row_chunks(T: int, width: int):
    """(chunk index, first row, end row) so that rows * width stays below 2^31 (the kernels' int32 offsets)."""
    step = max(128, (2**31 - 1) // max(width, 1) // 128 * 128)
    for c, i in enumerate(range(0, T, step)):
        yield c, i, min(i + step, T)


def _triton_forward(x2, weight, lora_a, lora_b, bias, scaling, p, seed):
    T, K = x2.shape
    N, r = lora_b.shape
    R = _pad_rank(r)
    a, b = _padded(lora_a, 0, R), _padded(lora_b, 1, R)
    xa = torch.empty(T, R, device=x2.device, dtype=torch.float32)
    y = torch.empty(T, N, device=x2.device, dtype=x2.dtype)
    prec = _prec(x2.dtype)
    cx, cf = _config("xa", x2.dtype, p > 0), _config("fwd", x2.dtype, False)
    for c, i, j in _row_chunks(T, max(K, N)):  # one chunk unless T * max(K, N) >= 2^31
        t, xs, xas, ys = j - i, x2[i:j], xa[i:j], y[i:j]
        _xa_kernel[(triton.cdiv(t, cx["BLOCK_M"]),)](
            xs, a, xas, t, K, seed + c, p, R=R, HAS_DROPOUT=p > 0, PREC=prec, **cx
        )
        grid = (triton.cdiv(t, cf["BLOCK_M"]), triton.cdiv(N, cf["BLOCK_N"]))
        _fwd_kernel[grid](
            xs, weight, xas, b, bias if bias is not None else y, ys, t, N, K, float(scaling),
            R=R, HAS_BIAS=bias is not None, PREC=prec, **cf,
        )  # fmt: skip
    return y, xa


def _triton_backward(g, x2, weight, lora_a, lora_b, xa, scaling, p, seed, need_x, need_a):
    T, K = x2.shape
    N, r = lora_b.shape
    R = xa.shape[1]
    prec = _prec(x2.dtype)
    gxa = torch.zeros(T, R, device=g.device, dtype=torch.float32)
    gxa[:, :r] = torch.mm(g, lora_b).float().mul_(scaling)  # (T, r)
    a = _padded(lora_a, 0, R)
    dx = torch.empty_like(x2) if need_x else None
    dat = torch.zeros(K, R, device=g.device, dtype=torch.float32) if need_a else None
    cx, ca = _config("dx", x2.dtype, p > 0), _config("da", x2.dtype, p > 0)
    for c, i, j in _row_chunks(T, max(K, N)):
        t = j - i
        if need_x:
            grid = (triton.cdiv(t, cx["BLOCK_M"]), triton.cdiv(K, cx["BLOCK_K"]))
            _dx_kernel[grid](
                g[i:j], weight, gxa[i:j], a, dx[i:j], t, N, K, seed + c, p,
                R=R, HAS_DROPOUT=p > 0, PREC=prec, **cx,
            )  # fmt: skip
        if need_a:
            part = torch.empty(K, R, device=g.device, dtype=torch.float32)
            _da_kernel[(triton.cdiv(K, ca["BLOCK_K"]),)](
                x2[i:j], gxa[i:j], part, t, K, seed + c, p, R=R, HAS_DROPOUT=p > 0, PREC=prec, **ca
            )
            dat += part
    da = dat[:, :r].t().to(lora_a.dtype) if need_a else None
    return dx, da


def _torch_keep(shape, p: float, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def _torch_drop(x2, p, seed):
    if p == 0:
        return x2
    return x2 * _torch_keep(x2.shape, p, seed, x2.device).to(x2.dtype).div_(1 - p)


class _TorchLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, lora_a, lora_b, bias, scaling, p, seed):
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())  # (T, N)
        xa = torch.mm(_torch_drop(x2, p, seed), lora_a.t())  # (T, r)
        y.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.p, ctx.seed, ctx.has_bias = scaling, p, seed, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s, p, seed = ctx.scaling, ctx.p, ctx.seed
        need = ctx.needs_input_grad
        g = g.contiguous()
        gxa = torch.mm(g, lora_b).mul_(s)  # (T, r)
        dx = dw = da = db = dbias = None
        if need[1]:
            dw = torch.mm(g.t(), x2)
        if need[3]:
            db = torch.mm(g.t(), xa).mul_(s)
        if need[4] and ctx.has_bias:
            dbias = g.sum(0)
        if p == 0:
            if need[0]:
                dx = torch.mm(g, weight).addmm_(gxa, lora_a)
            if need[2]:
                da = torch.mm(gxa.t(), x2)
        else:
            keep = _torch_keep(x2.shape, p, seed, x2.device).to(x2.dtype).div_(1 - p)  # regenerated
            if need[0]:
                dx = torch.mm(g, weight).addcmul_(torch.mm(gxa, lora_a), keep)
            if need[2]:
                da = torch.mm(gxa.t(), x2 * keep)
        return dx, dw, da, db, dbias, None, None, None


class _TritonLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, lora_a, lora_b, bias, scaling, p, seed):
        y, xa = _triton_forward(x2, weight, lora_a, lora_b, bias, scaling, p, seed)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.p, ctx.seed, ctx.has_bias = scaling, p, seed, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = g.contiguous()
        dx, da = _triton_backward(
            g, x2, weight, lora_a, lora_b, xa, ctx.scaling, ctx.p, ctx.seed, need[0], need[2]
        )
        r = lora_b.shape[1]
        db = torch.mm(g.t(), xa[:, :r].to(g.dtype)).mul_(ctx.scaling) if need[3] else None
        dw = torch.mm(g.t(), x2) if need[1] else None
        dbias = g.sum(0) if need[4] and ctx.has_bias else None
        return dx, dw, da, db, dbias, None, None, None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs triton installed; use backend='torch'")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); use backend='torch' or set TRITON_INTERPRET=1"
            )
    return backend


def _check(x, weight, lora_a, lora_b, bias, dropout_p):
    if x.dim() < 1:
        raise ValueError("x must be (..., in_features); got a scalar")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (out, in={x.shape[-1]}); got shape {tuple(weight.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != x.shape[-1]:
        raise ValueError(f"lora_a must be (r, in={x.shape[-1]}); got shape {tuple(lora_a.shape)}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (weight.shape[0], lora_a.shape[0]):
        raise ValueError(
            f"lora_b must be (out={weight.shape[0]}, r={lora_a.shape[0]}); got shape {tuple(lora_b.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (out={weight.shape[0]},); got shape {tuple(bias.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32; got {x.dtype}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(
                f"{name} must have x's dtype {x.dtype}; got {t.dtype} (cast it, or run under autocast)"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x W^T + bias + scaling * (drop(x) A^T) B^T``; differentiable in x, A, B (and W, bias if they require grad).

    x ``(..., in)``, weight ``(out, in)``, lora_a ``(r, in)``, lora_b ``(out, r)``, bias ``(out,)``, all of one
    dtype (fp16, bf16, fp32) and device; returns ``(..., out)`` in x's dtype.
    ``dropout_p > 0`` drops elements of x on the low-rank branch only (as peft's ``lora_dropout``); the mask
    comes from ``seed`` (default: drawn from torch's global generator) and is regenerated in the backward.
    ``backend``: "torch", "triton" or "auto" (Triton on CUDA).
    """
    _check(x, weight, lora_a, lora_b, bias, dropout_p)
    backend = _resolve_backend(backend, x.device)
    p = float(dropout_p)
    if p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    seed = int(seed or 0)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (T, in)
    fn = _TritonLoRA if backend == "triton" else _TorchLoRA
    if backend == "triton":
        weight, lora_a, lora_b = weight.contiguous(), lora_a.contiguous(), lora_b.contiguous()
    y = fn.apply(x2, weight, lora_a, lora_b, bias, float(scaling), p, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def dropout_keep_mask(
    shape: tuple[int, int], p: float, seed: int, *, device: torch.device | str = "cpu", backend: str = "torch"
) -> torch.Tensor:
    """The bool keep mask ``(T, in)`` that ``backend`` ("torch" or "triton") applies to x for this seed.

    For tests and references only: the kernels themselves never store it.
    """
    T, K = shape
    device = torch.device(device)
    backend = _resolve_backend(backend, device)
    if backend == "torch":
        return _torch_keep((T, K), p, seed, device)
    out = torch.empty(T, K, dtype=torch.int8, device=device)
    grid = (triton.cdiv(T, 32), triton.cdiv(K, 32))
    _mask_kernel[grid](out, T, K, seed, float(p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()


def aot_specs() -> list:
    """Every Triton configuration this module launches (for ``ragkern.kernels._aot`` and the kernel report)."""
    from ._aot import AotSpec

    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        ptr = "*" + dtype
        fp32 = dtype == "fp32"
        prec = "ieee" if fp32 else "tf32"
        scalars = dict(seed="i32", p="fp32")
        kernels = [
            ("xa", _xa_kernel, dict(X=ptr, A=ptr, XA="*fp32", T="i32", K="i32", **scalars)),
            (
                "dx",
                _dx_kernel,
                dict(G=ptr, W=ptr, GXA="*fp32", A=ptr, DX=ptr, T="i32", N="i32", K="i32", **scalars),
            ),
            ("da", _da_kernel, dict(X=ptr, GXA="*fp32", DAT="*fp32", T="i32", K="i32", **scalars)),
        ]
        fwd_sig = dict(
            X=ptr, W=ptr, XA="*fp32", Bm=ptr, BIAS=ptr, Y=ptr, T="i32", N="i32", K="i32", scaling="fp32"
        )
        for R in (16, 64):
            cases = [(k, fn, sig, dict(HAS_DROPOUT=d)) for k, fn, sig in kernels for d in (False, True)]
            cases += [("fwd", _fwd_kernel, fwd_sig, dict(HAS_BIAS=b)) for b in (False, True)]
            for kind, fn, signature, flags in cases:
                config = _CONFIGS[(kind, fp32, flags.get("HAS_DROPOUT", False))]
                blocks = {k: v for k, v in config.items() if k.startswith("BLOCK_")}
                constexprs = dict(R=R, **flags, PREC=prec, **blocks)
                signature = dict(signature, **{k: "constexpr" for k in constexprs})
                tile = " ".join(f"{k[6:]}={v}" for k, v in blocks.items())
                flag = " ".join(f"{k.lower()}={int(v)}" for k, v in flags.items())
                specs.append(
                    AotSpec(
                        kernel=f"lora_{kind}",
                        fn=fn,
                        signature=signature,
                        constexprs=constexprs,
                        num_warps=config["num_warps"],
                        num_stages=config["num_stages"],
                        config=f"{dtype} R={R} {flag} {tile} w{config['num_warps']} s{config['num_stages']}",
                    )
                )
    return specs
