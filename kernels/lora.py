"""Fused LoRA linear: ``y = x W^T + b + scaling * (drop(x) A^T) B^T`` with the frozen W kept frozen.

Shapes: x ``(..., K)`` flattened to ``(T, K)``, W ``(N, K)``, A ``(R, K)``, B ``(N, R)``, b ``(N,)``, y ``(..., N)``.
``drop(x) = x * keep / (1 - p)`` with ``keep`` drawn from a seed; the mask is never stored: the backward
draws it again from the same seed.

Backward, with g = dL/dy ``(T, N)`` and the saved ``xa = drop(x) A^T`` ``(T, R)`` fp32::

    gxa = scaling * g B                        (T, R)
    dB  = scaling * g^T xa                     (N, R)
    dA  = gxa^T drop(x)                        (R, K)
    dx  = g W + keep / (1 - p) * (gxa A)       (T, K)
    dW  = g^T x, db = sum_t g                  only when W / b require grad

No (T, N) buffer is made besides g itself, and no (T, K) mask.

Two paths, each an ``autograd.Function``:
- torch (CPU, and the reference): one ``addmm`` for the base, one ``mm`` for xa and one in-place ``addmm_``
  for the update; the keep mask comes from a ``torch.Generator`` seeded with the integer seed.
- triton (CUDA; CPU tensors under ``TRITON_INTERPRET=1``): the two big GEMMs (``x W^T`` forward, ``g W``
  backward) stay on cuBLAS, and Triton runs only what touches the dropout mask, drawing it in place from the
  seed: ``_xa_kernel`` (xa = drop(x) A^T, once per row block), ``_dx_lowrank_kernel`` (dx += keep / (1 - p) *
  gxa A, in place on the cuBLAS ``g W``, the mask drawn in the epilogue of a full 128-row tile) and
  ``_da_kernel`` (dA^T, the token reduction split over programs so that a short batch still fills the GPU;
  partial sums added in a fixed order). Without dropout the low-rank products are cuBLAS calls too.
  Why not one hand GEMM with a fused epilogue: fusing saves one read and one write of y (T x N) per GEMM, about
  10% of the traffic-equivalent of a (T, 4096) x (4096, 4096) bf16 GEMM on an H100, so a Triton GEMM would have
  to reach ~90% of cuBLAS to win; a non-persistent cp.async Triton GEMM does not (Unsloth keeps cuBLAS for the
  same reason). Not measured on GPU. All offsets are 64-bit (no row chunking).

Mask: element (t, k) is kept iff word ``k % 4`` of ``tl.randint4x(seed, t * ceil(K / 4) + k // 4)`` (Philox4x32-10,
64-bit counter) is >= ``floor(p * 2^32)``: one Philox call per 4 elements, where ``tl.rand`` per element ran a
call each and used one of its four words (compiled for sm_90: 4.75 instead of 17 multiply-highs per element in
TTIR, 4 instead of ~14 ``mul.hi.u32`` in PTX; not timed on GPU). The tile draws a (BLOCK_M, BLOCK_K / 4) block
and interleaves the four words along the columns, so the mask depends on (seed, t, k) only, never on the tile.

Seeds: the triton path takes the seed from a one-element int64 device tensor that the kernels load, so no host
sync: by default it is drawn with ``torch.randint`` on x's device, i.e. from that device's generator (on CUDA its
Philox state, whose offset advances on every draw and under CUDA-graph capture is read from device memory at
replay, as torch's own dropout and Inductor's ``inductor_seeds`` do), so graph replays and ``torch.compile`` draw
fresh masks; ``torch.manual_seed`` makes it reproducible. An ``int`` seed gives the same mask on every call.

:func:`dropout_keep_mask` materialises the mask a path would use, for tests only, and
:func:`lora_linear_reference` is the formula in plain torch ops: the reference of the tests and of ``bench/gpu``.
"""

from __future__ import annotations

import torch

from ._aot import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

_BACKENDS = ("auto", "torch", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SEED_HIGH = 2**62  # seeds are drawn from [0, 2^62): int64, and the Philox key takes 64 bits
# Tiles from the sm_80 / sm_90 AOT report: 64-row tiles for the two row-streaming kernels (xa and dA, whose
# wgmma N is the padded rank), a full 128 x 64 tile for the dx update (its mask is drawn in the epilogue);
# fp32 runs IEEE (as torch's default matmul), which has no tensor-core path, so it gets smaller tiles.
_CONFIGS = {
    # (kernel, fp32, dropout) -> tiles and launch options
    ("xa", False, False): dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    ("xa", False, True): dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=3),
    ("dx", False, True): dict(BLOCK_M=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2),
    ("da", False, True): dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    ("xa", True, False): dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=2),
    ("xa", True, True): dict(BLOCK_M=32, BLOCK_K=16, num_warps=4, num_stages=2),
    ("dx", True, True): dict(BLOCK_M=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
    ("da", True, True): dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=2),
}
_INTERPRET_SMS = 4  # "SM count" under the interpreter: small, so tests exercise the split dA reduction


def _config(kernel: str, dtype: torch.dtype, dropout: bool) -> dict:
    return _CONFIGS[(kernel, dtype == torch.float32, dropout)]


if triton is not None:

    @triton.jit
    def _keep(seed, rows, k0, K, p, BLOCK_K: tl.constexpr):
        """(BLOCK_M, BLOCK_K) bool: the dropout keep mask of x[rows, k0:k0 + BLOCK_K] (rows int64, k0 % 4 == 0).

        One Philox call per 4 elements: element (t, k) is kept iff word ``k % 4`` of ``randint4x`` at the 64-bit
        counter ``t * ceil(K / 4) + k // 4`` is >= ``floor(p * 2^32)`` (unsigned), so the tile draws a
        (BLOCK_M, BLOCK_K / 4) block and interleaves its four words along the columns. A function of (seed, t, k)
        only: every kernel regenerates the same mask whatever its tile."""
        tl.static_assert(BLOCK_K % 4 == 0, "the dropout mask takes column tiles of a multiple of 4")
        quads = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * ((K + 3) // 4) + quads[None, :])
        thr = tl.minimum(p * 4294967296.0, 4294967040.0).to(tl.uint32)  # 4294967040: the top fp32 below 2^32
        # columns 4q + 0, 1, 2, 3 take words r0, r1, r2, r3 of call q
        return tl.interleave(tl.interleave(r0 >= thr, r2 >= thr), tl.interleave(r1 >= thr, r3 >= thr))

    @triton.jit
    def _xa_kernel(
        X, A, XA, SEED, T, K, p,
        R: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # XA[rows] = drop(x[rows]) @ A^T, fp32 (BLOCK_M, R); R is the rank padded to a power of two >= 16
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < T
        rows = rows.to(tl.int64)
        rr = tl.arange(0, R)
        seed = tl.load(SEED) if HAS_DROPOUT else 0
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < K
            x = tl.load(
                X + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
            )
            if HAS_DROPOUT:
                x = tl.where(_keep(seed, rows, k0, K, p, BLOCK_K), x, 0.0)
            a = tl.load(A + rr.to(tl.int64)[:, None] * K + cols[None, :], mask=cmask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(a), acc, input_precision=PREC)
        if HAS_DROPOUT:
            acc = acc / (1.0 - p)
        tl.store(XA + rows[:, None] * R + rr[None, :], acc, mask=rmask[:, None])

    @triton.jit
    def _dx_lowrank_kernel(
        DX, GXA, A, SEED, T, K, p,
        R: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        # DX += keep / (1 - p) * (GXA A) in place: one full (BLOCK_M, BLOCK_K) tile, the mask drawn in the epilogue.
        # Grouped order: GROUP_M row tiles sweep the column tiles together, so their GXA rows stay in L2.
        pid = tl.program_id(0).to(tl.int64)  # the tile arithmetic in 64 bits: rows * K passes 2^31
        tiles_m, tiles_k = tl.cdiv(T, BLOCK_M), tl.cdiv(K, BLOCK_K).to(tl.int64)
        group = pid // (GROUP_M * tiles_k)
        first_m = group * GROUP_M
        size_m = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (pid % (GROUP_M * tiles_k)) % size_m
        tile_k = (pid % (GROUP_M * tiles_k)) // size_m
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rmask = rows < T
        cmask = cols < K
        rr = tl.arange(0, R)
        gxa = tl.load(GXA + rows[:, None] * R + rr[None, :], mask=rmask[:, None], other=0.0)
        a = tl.load(A + rr.to(tl.int64)[:, None] * K + cols[None, :], mask=cmask[None, :], other=0.0)
        low = tl.dot(gxa.to(a.dtype), a, input_precision=PREC)
        keep = _keep(tl.load(SEED), rows, tile_k * BLOCK_K, K, p, BLOCK_K)
        ptrs = DX + rows[:, None] * K + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        dx = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        dx += tl.where(keep, low / (1.0 - p), 0.0)
        tl.store(ptrs, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _da_kernel(
        X, GXA, DAT, SEED, T, K, p, rows_per_split,
        R: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # DAT[split, cols] = drop(x)[split rows, cols]^T @ gxa, fp32 (BLOCK_K, R): dA transposed (K is the wgmma M
        # dimension); program (column tile, split) reduces rows [split * rows_per_split, ...) only.
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        split = tl.program_id(1)
        cmask = cols < K
        rr = tl.arange(0, R)
        seed = tl.load(SEED)
        lo = split * rows_per_split
        hi = tl.minimum(lo + rows_per_split, T)
        acc = tl.zeros((BLOCK_K, R), dtype=tl.float32)
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < hi
            rows = rows.to(tl.int64)
            x = tl.load(
                X + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
            )
            x = tl.where(_keep(seed, rows, tl.program_id(0) * BLOCK_K, K, p, BLOCK_K), x, 0.0)
            gxa = tl.load(GXA + rows[:, None] * R + rr[None, :], mask=rmask[:, None], other=0.0)
            acc = tl.dot(tl.trans(x), gxa.to(x.dtype), acc, input_precision=PREC)
        acc = acc / (1.0 - p)
        out = DAT + (split.to(tl.int64) * K + cols)[:, None] * R + rr[None, :]
        tl.store(out, acc, mask=cmask[:, None])

    @triton.jit
    def _mask_kernel(OUT, SEED, T, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        m = (rows < T)[:, None] & (cols < K)[None, :]
        rows = rows.to(tl.int64)
        keep = _keep(tl.load(SEED), rows, tl.program_id(1) * BLOCK_K, K, p, BLOCK_K)
        tl.store(OUT + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=m)


def _prec(dtype: torch.dtype) -> str:
    # fp32 stays fp32 (as torch's default matmul); fp16/bf16 run on tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _pad_rank(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _padded(t: torch.Tensor, rank_dim: int, R: int) -> torch.Tensor:
    """A with the rank dimension zero-padded to R (tl.dot needs >= 16 and a power of two)."""
    r = t.shape[rank_dim]
    if r == R:
        return t.contiguous()
    shape = list(t.shape)
    shape[rank_dim] = R
    out = t.new_zeros(shape)
    out.narrow(rank_dim, 0, r).copy_(t)
    return out


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count  # cached host metadata: no sync


def _da_splits(T: int, K: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of the dA reduction: about 4 programs per SM, each >= one row tile."""
    col_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    row_tiles = max(1, triton.cdiv(T, cfg["BLOCK_M"]))
    splits = max(1, min(row_tiles, triton.cdiv(4 * _sm_count(device), col_tiles)))
    rows = triton.cdiv(row_tiles, splits) * cfg["BLOCK_M"]
    return triton.cdiv(T, rows) if T else 1, rows


def _base(x2, weight, bias):
    return torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())  # (T, N)


def _triton_forward(x2, weight, lora_a, lora_b, bias, scaling, p, seed_t):
    T, K = x2.shape
    r = lora_b.shape[1]
    R = _pad_rank(r)
    a = _padded(lora_a, 0, R)
    xa = torch.empty(T, R, device=x2.device, dtype=torch.float32)
    cx = _config("xa", x2.dtype, p > 0)
    _xa_kernel[(triton.cdiv(T, cx["BLOCK_M"]),)](
        x2, a, xa, seed_t, T, K, p, R=R, HAS_DROPOUT=p > 0, PREC=_prec(x2.dtype), **cx
    )
    y = _base(x2, weight, bias)  # cuBLAS
    y.addmm_(xa[:, :r].to(x2.dtype), lora_b.t(), alpha=scaling)
    return y, xa


def _triton_backward(g, x2, weight, lora_a, lora_b, xa, scaling, p, seed_t, need_x, need_a):
    T, K = x2.shape
    r = lora_b.shape[1]
    R = xa.shape[1]
    prec = _prec(x2.dtype)
    gxa = torch.mm(g, lora_b).float().mul_(scaling)  # (T, r) fp32
    dx = da = None
    if need_x:
        dx = torch.mm(g, weight)  # cuBLAS
        if p == 0:
            dx.addmm_(gxa.to(x2.dtype), lora_a)
        else:
            cfg = _config("dx", x2.dtype, True)
            gxa_r = torch.zeros(T, R, device=g.device, dtype=torch.float32)
            gxa_r[:, :r] = gxa
            grid = (triton.cdiv(T, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
            _dx_lowrank_kernel[grid](dx, gxa_r, _padded(lora_a, 0, R), seed_t, T, K, p, R=R, PREC=prec, **cfg)
    if need_a:
        if p == 0:
            da = torch.mm(gxa.t().to(x2.dtype), x2)
        else:
            cfg = _config("da", x2.dtype, True)
            splits, rows = _da_splits(T, K, cfg, g.device)
            gxa_r = torch.zeros(T, R, device=g.device, dtype=torch.float32)
            gxa_r[:, :r] = gxa
            part = torch.empty(splits, K, R, device=g.device, dtype=torch.float32)
            _da_kernel[(triton.cdiv(K, cfg["BLOCK_K"]), splits)](
                x2, gxa_r, part, seed_t, T, K, p, rows, R=R, PREC=prec, **cfg
            )
            da = part.sum(0)[:, :r].t()  # a fixed-order reduction: deterministic
        da = da.to(lora_a.dtype)
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
        y = _base(x2, weight, bias)
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
    def forward(ctx, x2, weight, lora_a, lora_b, bias, scaling, p, seed_t):
        y, xa = _triton_forward(x2, weight, lora_a, lora_b, bias, scaling, p, seed_t)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa, seed_t)
        ctx.scaling, ctx.p, ctx.has_bias = scaling, p, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x2, weight, lora_a, lora_b, xa, seed_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = g.contiguous()
        dx, da = _triton_backward(
            g, x2, weight, lora_a, lora_b, xa, ctx.scaling, ctx.p, seed_t, need[0], need[2]
        )
        r = lora_b.shape[1]
        db = torch.mm(g.t(), xa[:, :r].to(g.dtype)).mul_(ctx.scaling) if need[3] else None
        dw = torch.mm(g.t(), x2) if need[1] else None
        dbias = g.sum(0) if need[4] and ctx.has_bias else None
        return dx, dw, da, db, dbias, None, None, None


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs triton installed; use backend='torch'")
        if device.type != "cuda" and not interpreting():
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


def _seed_tensor(seed: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The triton path's seed: a one-element int64 tensor on ``device`` (read by the kernels, never by the host)."""
    if seed is None:
        return torch.randint(0, _SEED_HIGH, (1,), device=device, dtype=torch.int64)  # the device's generator
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(seed)], device=device, dtype=torch.int64)


def _seed_int(seed: int | torch.Tensor | None) -> int:
    """The torch path's seed (it seeds a torch.Generator, so a tensor seed is read back to the host)."""
    if seed is None:
        return int(torch.randint(0, _SEED_HIGH, (1,)).item())  # the CPU generator: torch.manual_seed applies
    return int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x W^T + bias + scaling * (drop(x) A^T) B^T``; differentiable in x, A, B (and W, bias if they require grad).

    x ``(..., in)``, weight ``(out, in)``, lora_a ``(r, in)``, lora_b ``(out, r)``, bias ``(out,)``, all of one
    dtype (fp16, bf16, fp32) and device; returns ``(..., out)`` in x's dtype.
    ``dropout_p > 0`` drops elements of x on the low-rank branch only (as peft's ``lora_dropout``); the mask is
    regenerated in the backward from the seed, never stored. ``seed``: ``None`` (default) draws a fresh one per
    call from the generator of x's device without a host sync on the triton path (CUDA-graph and torch.compile
    safe; reproducible under ``torch.manual_seed``); an ``int`` fixes the mask; a one-element int64 tensor on
    x's device is used as is (the torch path reads it back to the host).
    ``backend``: "torch", "triton" or "auto" (Triton on CUDA).
    """
    _check(x, weight, lora_a, lora_b, bias, dropout_p)
    backend = _resolve_backend(backend, x.device)
    p = float(dropout_p)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (T, in)
    if backend == "triton":
        weight, lora_a, lora_b = weight.contiguous(), lora_a.contiguous(), lora_b.contiguous()
        seed_t = _seed_tensor(seed, x.device) if p > 0 else x2  # x2: an unread placeholder without dropout
        y = _TritonLoRA.apply(x2, weight, lora_a, lora_b, bias, float(scaling), p, seed_t)
    else:
        y = _TorchLoRA.apply(
            x2, weight, lora_a, lora_b, bias, float(scaling), p, _seed_int(seed) if p > 0 else 0
        )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T + bias + scaling * ((x * keep / (1 - p)) A^T) B^T`` in plain torch ops (autograd gives its gradients).

    Shapes as :func:`lora_linear`'s; ``keep``: the ``(T, in)`` bool mask of :func:`dropout_keep_mask` for the seed
    the kernel ran with (required when ``dropout_p > 0``). Computes in the inputs' dtype: pass float64 for an exact
    reference.
    """
    if dropout_p > 0 and keep is None:
        raise ValueError(
            f"dropout_p={dropout_p} needs keep: the mask of dropout_keep_mask((T, in), p, seed) for the kernel's seed"
        )
    dropped = x if keep is None else x * keep.reshape(x.shape).to(x.dtype) / (1 - dropout_p)
    return torch.nn.functional.linear(x, weight, bias) + scaling * (dropped @ lora_a.T) @ lora_b.T


def dropout_keep_mask(
    shape: tuple[int, int],
    p: float,
    seed: int | torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    backend: str = "torch",
) -> torch.Tensor:
    """The bool keep mask ``(T, in)`` that ``backend`` ("torch" or "triton") applies to x for this seed.

    For tests and references only: the kernels themselves never store it.
    """
    T, K = shape
    device = torch.device(device)
    backend = _resolve_backend(backend, device)
    if backend == "torch":
        return _torch_keep((T, K), p, _seed_int(seed), device)
    out = torch.empty(T, K, dtype=torch.int8, device=device)
    grid = (triton.cdiv(T, 32), triton.cdiv(K, 32))
    _mask_kernel[grid](out, _seed_tensor(seed, device), T, K, float(p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()


# What the JIT sees at a typical launch: model widths multiples of 16, an odd token count; and an "odd" variant
# (widths not multiples of 16).
_AOT_VALUES = {"jit": dict(T=4099, K=4096), "odd": dict(T=4099, K=4100)}


def aot_specs() -> list:
    """Every Triton configuration this module launches (for ``ragkern.kernels._aot`` and the kernel report), with
    the integer arguments specialised as the JIT does (``_AOT_VALUES``)."""
    from ._aot import AotSpec, describe_values

    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        ptr = "*" + dtype
        fp32 = dtype == "fp32"
        prec = "ieee" if fp32 else "tf32"
        cases = [("xa", _xa_kernel, dict(X=ptr, A=ptr, XA="*fp32", SEED="*i64", T="i32", K="i32", p="fp32"), d)
                 for d in (False, True)]  # fmt: skip
        cases.append(
            (
                "dx",
                _dx_lowrank_kernel,
                dict(DX=ptr, GXA="*fp32", A=ptr, SEED="*i64", T="i32", K="i32", p="fp32"),
                True,
            )
        )
        cases.append(
            ("da", _da_kernel, dict(X=ptr, GXA="*fp32", DAT="*fp32", SEED="*i64", T="i32", K="i32", p="fp32",
                                    rows_per_split="i32"), True)
        )  # fmt: skip
        for R in (16, 64):
            for kind, fn, signature, dropout in cases:
                for variant, values in _AOT_VALUES.items():
                    if variant == "odd" and (dtype != "fp16" or R != 16):
                        continue
                    values = dict(values)
                    config = _CONFIGS[(kind, fp32, dropout)]
                    if kind == "da":
                        values["rows_per_split"] = 8 * config["BLOCK_M"]
                    blocks = {k: v for k, v in config.items() if k.startswith(("BLOCK_", "GROUP_"))}
                    constexprs = dict(R=R, PREC=prec, **blocks)
                    if kind == "xa":
                        constexprs["HAS_DROPOUT"] = dropout
                    sig = dict(signature, **{k: "constexpr" for k in constexprs})
                    tile = " ".join(
                        f"{k[6:] if k.startswith('BLOCK') else 'G'}={v}" for k, v in blocks.items()
                    )
                    w, st = config["num_warps"], config["num_stages"]
                    text = f"{dtype} R={R} dropout={int(dropout)} {tile} w{w} s{st} {describe_values(values)}"
                    specs.append(AotSpec(f"lora_{kind}", fn, sig, constexprs, w, st, text, values=values))
    return specs
