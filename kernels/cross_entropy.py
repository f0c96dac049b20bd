"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T`` without the logits of all tokens at once.

For every token i with a target (``labels[i] != ignore_index``)::

    z      = hidden[i] @ weight.T + bias                 (V,)   accumulated in fp32
    s      = softcap * tanh(z / softcap)                        if softcap else z
    lse    = log(sum_j exp(s_j))
    ce     = lse - (1 - eps) * s[y] - eps / V * sum_j s_j        eps = label_smoothing (as F.cross_entropy)
    loss_i = weights[i] * (ce + z_loss * lse ** 2)

Ignored tokens are dropped before any matmul, so they cost nothing forward or backward.
Under ``torch.autocast`` (for the tensors' device) the product runs in the autocast dtype, as ``F.linear``'s
would: the inputs may be fp32 (or differ: bf16 hidden states, an fp32 master weight) and are cast inside; the
loss is fp32 and each gradient comes in its leaf's dtype, as from ``F.cross_entropy(F.linear(h, W, b))`` under
the same autocast. An fp32 weight receives the fp32 ``dW`` itself, never rounded to the compute dtype.
``reduction="mean"`` divides the weighted sum by the number of non-ignored tokens (0 when there are none).
``return_hits`` also gives each token's ``argmax_j s_j == labels[i]`` (token accuracy), taken where the log-sum-exp
already visits every logit: the first index wins a tie, as ``torch.argmax``. No gradient.
:func:`fused_linear_cross_entropy_reference` is the same definition on materialised logits (tests, bench/gpu).

Two designs (``impl``), three paths:
- chunked (``impl="chunked"``, the default): the target rows in chunks; per chunk the logits
  ``(C, V) = h_c @ W.T (+ bias)`` come from torch's matmul (cuBLAS on CUDA), then the row step computes each
  row's log-sum-exp, loss and ``d loss / d z``, and ``dh_c = G @ W``, ``dW += G.T @ h_c``, ``db += sum G`` are
  matmuls again: 3 GEMMs of the target rows in all. The gradients are computed in the forward pass (the
  logits are built once; ``reduction="mean"``'s ``1 / count`` folded in) and handed over in backward without a
  copy: untouched when the upstream gradient is 1 (read on the host for CPU tensors; on CUDA a mean / sum loss's
  is tested on the device by ``_flce_scale_kernel``, no sync), else scaled in place. Backward recomputes them
  only when the per-token ``grad_output`` is not uniform (``reduction="none"`` followed by anything but a scaled
  sum) or on a second backward through the graph (``retain_graph``). ``dW``: with one chunk of target rows (1k
  targets at V=128k) that chunk's GEMM written straight into a new gradient in the weight's dtype (nothing
  zero-filled, no read-modify-write, no conversion); with several, an fp32 accumulator (the first chunk's GEMM
  writes it, later ones add in place) rounded once to a half-precision weight's dtype, or, for an fp32 (master)
  weight, handed over as the gradient itself. Row steps:
  - torch (CPU, fp64): chunks of ``_CHUNK_ELEMS // V`` rows, the logits upcast to fp32 (a few ``(C, V)`` fp32
    temporaries, 16 MiB each), ``dW`` accumulated by an fp32 matmul.
  - triton (CUDA): chunks of at most ``_CHUNK_BYTES`` (256 MiB) of logits in the compute dtype, one buffer
    reused by every chunk; one kernel per chunk (``_flce_rows_kernel``, a program per row) reads the row twice
    (online log-sum-exp and argmax in fp32, then the gradient) and writes ``d loss / d z`` in place over the logits, in
    the compute dtype; ``dW`` accumulates in fp32 (cuBLAS with an fp32 output where torch has it, else each
    chunk's product rounded once to the compute dtype and added in fp32; on CPU the operands upcast). Memory
    beyond the inputs: the buffer, ``dW`` (V, D) (one chunk: in the weight's dtype; several: fp32, plus the
    rounded copy for a half-precision weight), ``dh`` (N, D), and on the fallback a product of at most 256 MiB.
    The logits
    and their gradient are rounded to the compute dtype (as ``F.linear`` logits are; in fp16 a logit past
    65504 overflows). Every step is a cuBLAS GEMM or a kernel without atomics, in a fixed chunk order:
    deterministic (cuBLAS under ``torch.use_deterministic_algorithms`` needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8``,
    as every nn.Linear does). fp32 GEMMs follow torch's matmul precision (TF32 where torch allows it).
- triton (``impl="triton"``; ``"fused"`` is its deprecated name), the Triton kernels that never hold logits: n
  target rows, three kernels, no N x V buffer and no atomics (so deterministic); it recomputes the logits in each
  kernel (5 GEMM-equivalents, Triton tiles)::

    forward   grid (n tiles, vocab splits)  each program: online log-sum-exp and argmax over its vocab tiles
              -> (max, sum exp, sum s, argmax) partials per split, merged in torch; s[y] written by its one owner
    dhidden   grid (n tiles, vocab splits)  per vocab tile: recompute s, ds = dloss/ds, then
              partial[split, rows] += ds @ W[tile]   (a split's rows are its own; partials summed in torch)
    dweight   grid (vocab tiles, n splits)  per token tile: recompute s, ds, then
              partial[split, cols] += ds.T @ H[rows]; dbias summed in registers

  Vocab / token splits make the grid fill the GPU whatever n is (1k RAFT answer tokens: 16 token tiles).
  Gradient filtering (Cut Cross-Entropy's): a backward tile whose ``(1 + 2 z_loss lse) * softmax`` is
  below ``filter_eps`` everywhere and that holds no target adds nothing (each skipped term is below the
  dtype's resolution). Label smoothing's uniform ``-eps / V`` term is a rank-1 update added exactly on the
  host (without softcap), so filtering never drops it; with softcap and smoothing filtering is off.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ._aot import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

_BACKENDS = ("auto", "torch", "triton")
# fused_linear_cross_entropy's impl (and fused_loss_impl's choices); "fused": the old name of "triton"
IMPLS = ("auto", "chunked", "triton", "fused")
_REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ELEMS = 1 << 22  # torch path: rows per chunk = this // V (16 MiB of fp32 logits)
_CHUNK_BYTES = 1 << 28  # chunked triton path: its (rows, V) logits buffer, compute dtype, <= 256 MiB
_ROWS_CONFIG = dict(BLOCK_V=4096, num_warps=8)  # the row step: 16 fp32 values per thread and tensor
# Tiles (tokens x vocab x hidden chunk) from the sm_80 / sm_90 AOT report: the largest without spills
# (bias and softcap on), as (fp16/bf16, fp32); fp32 takes a shorter hidden chunk (its IEEE dot runs on FMA).
# dhidden rewrites its fp32 partial rows once per vocab tile, dweight its vocab rows once per token tile.
_FWD_CONFIG = (
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=16, num_warps=8, num_stages=3),
)
_DH_CONFIG = (
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, BLOCK_DG=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, BLOCK_DG=32, num_warps=8, num_stages=3),
)
_DW_CONFIG = (
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, BLOCK_DG=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=16, BLOCK_DG=16, num_warps=8, num_stages=3),
)
_PROGRAMS_PER_SM = 4  # splits are chosen so that a launch has at least this many programs per SM
_DEFAULT_SMS = 132  # H100 SXM: the grid plan when no CUDA device is present (interpreter, bench model)
_DH_PARTIAL_BYTES = 1 << 28  # dhidden splits stop at 256 MiB of fp32 partials (1k tokens x 4096: 16 splits)


if triton is not None:

    @triton.jit
    def _tanh(x):
        # 2 * sigmoid(2x) - 1: exact limits at +-inf, no libdevice needed
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _logits_tile(
        H, W, B, hrow, rmask, cols, cmask, D, stride_w, softcap,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """(BLOCK_N, BLOCK_V) fp32 logits after bias and softcap, and tanh(z / softcap) for the backward.
        ``hrow`` (BLOCK_N,) and ``cols`` (BLOCK_V,) are int64 element offsets / vocab ids."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        wrow = cols * stride_w
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            h = tl.load(H + hrow[:, None] + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            wt = tl.load(W + wrow[None, :] + dd[:, None], mask=cmask[None, :] & dmask[:, None], other=0.0)
            acc = tl.dot(h, wt, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        t = acc
        if HAS_SOFTCAP:
            t = _tanh(acc / softcap)
            acc = softcap * t
        return acc, t

    @triton.jit
    def _token_rows(ROWS, Y, LSE, SCALE, offs, n_rows, stride_h, z_coef):
        """Per token of a tile: in range, hidden-row offset (int64), target, LSE, upstream scale, 1 + 2 z LSE."""
        rmask = offs < n_rows
        hrow = tl.load(ROWS + offs, mask=rmask, other=0).to(tl.int64) * stride_h
        y = tl.load(Y + offs, mask=rmask, other=-1)
        lse = tl.load(LSE + offs, mask=rmask, other=0.0)
        scale = tl.load(SCALE + offs, mask=rmask, other=0.0)
        return rmask, hrow, y, lse, scale, 1.0 + 2.0 * z_coef * lse

    @triton.jit
    def _grad_tile(
        H, W, B, hrow, rmask, y, lse, scale, coef, v0, cols, cmask, D, stride_w, softcap, smoothing, uniform,
        filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """d loss / d z of a (token tile, vocab tile) from its recomputed logits, (BLOCK_N, BLOCK_V) fp32 (0 outside
        the tile's tokens and vocabulary), and whether it is kept (a target inside, or a gradient >= filter_eps):
        scale * ((1 + 2 z lse) softmax - (1 - eps) [j == y] - uniform) * (1 - tanh^2 if softcap)."""
        s, t = _logits_tile(
            H, W, B, hrow, rmask, cols, cmask, D, stride_w, softcap,
            HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        has_target = tl.max(((y >= v0) & (y < v0 + BLOCK_V)).to(tl.int32), axis=0) > 0
        valid = rmask[:, None] & cmask[None, :]
        g = tl.where(valid, coef[:, None] * tl.exp(s - lse[:, None]), 0.0)
        keep = has_target | (tl.max(tl.max(tl.abs(g), axis=1), axis=0) >= filter_eps)
        ds = scale[:, None] * (g - tl.where(cols[None, :] == y[:, None], 1.0 - smoothing, 0.0) - uniform)
        if HAS_SOFTCAP:
            ds *= 1.0 - t * t
        return tl.where(valid, ds, 0.0), keep

    @triton.jit(do_not_specialize=["n_rows", "tiles_per_split"])
    def _flce_fwd_kernel(
        H, W, B, ROWS, Y, PART, ARG, SY,
        n_rows, V, D, stride_h, stride_w, tiles_per_split, softcap,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """PART (3, splits, n) fp32 <- per split: max, sum exp(s - max), sum s; ARG (splits, n) int32 <- the
        split's first index of its max; SY (n,) fp32 <- s[y]."""
        split = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = offs < n_rows
        hrow = tl.load(ROWS + offs, mask=rmask, other=0).to(tl.int64) * stride_h
        y = tl.load(Y + offs, mask=rmask, other=-1)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        arg = tl.zeros((BLOCK_N,), dtype=tl.int32)
        sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        span = tiles_per_split.to(tl.int64) * BLOCK_V
        v_lo = split * span
        v_hi = tl.minimum(v_lo + span, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # the interpreter's loop index is a Python int
            cmask = cols < V
            s, _ = _logits_tile(
                H, W, B, hrow, rmask, cols, cmask, D, stride_w, softcap,
                HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
            )  # fmt: skip
            s_sum += tl.sum(tl.where(cmask[None, :], s, 0.0), axis=1)
            s_y = tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
            tl.store(SY + offs, s_y, mask=rmask & (y >= v0) & (y < v0 + BLOCK_V))  # one owner per row
            s = tl.where(cmask[None, :], s, float("-inf"))
            tile_max, tile_arg = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
            arg = tl.where(tile_max > m, (v0 + tile_arg).to(tl.int32), arg)  # a tie keeps the earlier tile's
            m_new = tl.maximum(m, tile_max)
            sumexp = sumexp * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
        out = PART + split * n_rows + offs
        plane = tl.num_programs(1).to(tl.int64) * n_rows
        tl.store(ARG + split * n_rows + offs, arg, mask=rmask)
        tl.store(out, m, mask=rmask)
        tl.store(out + plane, sumexp, mask=rmask)
        tl.store(out + 2 * plane, s_sum, mask=rmask)

    @triton.jit(do_not_specialize=["n_rows", "tiles_per_split"])
    def _flce_bwd_dh_kernel(
        H, W, B, ROWS, Y, LSE, SCALE, GH,
        n_rows, V, D, stride_h, stride_w, tiles_per_split, softcap, smoothing, uniform, z_coef, filter_eps,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DG: tl.constexpr,
    ):  # fmt: skip
        """GH (splits, n, D) fp32 += this split's vocab tiles' ds @ W; a (split, row block) has one owner."""
        split = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, hrow, y, lse, scale, coef = _token_rows(ROWS, Y, LSE, SCALE, offs, n_rows, stride_h, z_coef)
        grow = (split * n_rows + offs) * D
        span = tiles_per_split.to(tl.int64) * BLOCK_V
        v_lo = split * span
        v_hi = tl.minimum(v_lo + span, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            cmask = cols < V
            ds, keep = _grad_tile(
                H, W, B, hrow, rmask, y, lse, scale, coef, v0, cols, cmask, D, stride_w, softcap, smoothing, uniform,
                filter_eps, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
            )  # fmt: skip
            if keep:
                ds_in = ds.to(H.dtype.element_ty)
                wrow = cols * stride_w
                for d0 in range(0, D, BLOCK_DG):
                    dd = d0 + tl.arange(0, BLOCK_DG)
                    dmask = dd < D
                    w = tl.load(
                        W + wrow[:, None] + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0
                    )
                    gmask = rmask[:, None] & dmask[None, :]
                    acc = tl.load(GH + grow[:, None] + dd[None, :], mask=gmask, other=0.0)
                    acc = tl.dot(ds_in, w, acc, input_precision=DOT_PRECISION)
                    tl.store(GH + grow[:, None] + dd[None, :], acc, mask=gmask)
            tl.debug_barrier()  # the next tile re-reads these partial rows, maybe from other threads

    # need_*: runtime flags (one compiled kernel) so a frozen lm_head with a bias costs no grad_weight matmul
    @triton.jit(do_not_specialize=["n_rows", "tiles_per_split", "need_dw", "need_db"])
    def _flce_bwd_dw_kernel(
        H, W, B, ROWS, Y, LSE, SCALE, GW, GB,
        n_rows, V, D, stride_h, stride_w, tiles_per_split, softcap, smoothing, uniform, z_coef, filter_eps,
        need_dw, need_db,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DG: tl.constexpr,
    ):  # fmt: skip
        """GW (splits, V, D) fp32 += this split's token tiles' ds.T @ H; GB (splits, V) fp32 <- sum of ds."""
        split = tl.program_id(1).to(tl.int64)
        v0 = tl.program_id(0).to(tl.int64) * BLOCK_V
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        grow = (split * V + cols) * D
        db = tl.zeros((BLOCK_V,), dtype=tl.float32)
        span = tiles_per_split.to(tl.int64) * BLOCK_N
        t_lo = split * span
        t_hi = tl.minimum(t_lo + span, n_rows)
        for n0 in range(t_lo, t_hi, BLOCK_N):
            offs = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            rmask, hrow, y, lse, scale, coef = _token_rows(
                ROWS, Y, LSE, SCALE, offs, n_rows, stride_h, z_coef
            )
            ds, keep = _grad_tile(
                H, W, B, hrow, rmask, y, lse, scale, coef, v0, cols, cmask, D, stride_w, softcap, smoothing, uniform,
                filter_eps, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
            )  # fmt: skip
            if keep:
                db += tl.sum(ds, axis=0)
                if need_dw:
                    dst = tl.trans(ds.to(H.dtype.element_ty))  # (BLOCK_V, BLOCK_N)
                    for d0 in range(0, D, BLOCK_DG):
                        dd = d0 + tl.arange(0, BLOCK_DG)
                        dmask = dd < D
                        h = tl.load(
                            H + hrow[:, None] + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0
                        )
                        gmask = cmask[:, None] & dmask[None, :]
                        acc = tl.load(GW + grow[:, None] + dd[None, :], mask=gmask, other=0.0)
                        acc = tl.dot(dst, h, acc, input_precision=DOT_PRECISION)
                        tl.store(GW + grow[:, None] + dd[None, :], acc, mask=gmask)
            tl.debug_barrier()  # the next tile re-reads these partial rows, maybe from other threads
        if HAS_BIAS:
            if need_db:
                tl.store(GB + split * V + cols, db, mask=cmask)

    @triton.jit(do_not_specialize=["n_rows"])
    def _flce_rows_kernel(
        Z, Y, WTS, GSCALE, LOSS, ZT, ARG,
        n_rows, V, stride_z, softcap, smoothing, z_coef,
        HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        """One program per row of the logits chunk Z (n_rows, V) (compute dtype, bias included): LOSS, ZT
        (n_rows,) fp32 <- WTS[row] * (ce + z-term), WTS[row] * z-term; ARG (n_rows,) int32 <- the first index
        of the row's max; with WRITE_GRAD, Z's row <- in place
        GSCALE[row] * ((1 + 2 z lse) softmax - (1 - eps) [j == y] - eps / V) * (1 - tanh^2 if softcap)."""
        row = tl.program_id(0)
        zrow = Z + row.to(tl.int64) * stride_z
        y = tl.load(Y + row)
        m = float("-inf")
        arg = 0
        d = 0.0
        s_sum = 0.0
        for v0 in range(0, V, BLOCK_V):  # online log-sum-exp and argmax over the vocabulary, fp32
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            s = tl.load(zrow + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                s = softcap * _tanh(s / softcap)
            s_sum += tl.sum(tl.where(cmask, s, 0.0), axis=0)
            s = tl.where(cmask, s, float("-inf"))
            block_max, block_arg = tl.max(s, axis=0, return_indices=True, return_indices_tie_break_left=True)
            arg = tl.where(block_max > m, v0 + block_arg, arg)  # a tie keeps the earlier block's
            m_new = tl.maximum(m, block_max)
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            m = m_new
        tl.store(ARG + row, arg)
        lse = m + tl.log(d)
        s_y = tl.load(zrow + y).to(tl.float32)
        if HAS_SOFTCAP:
            s_y = softcap * _tanh(s_y / softcap)
        zt = z_coef * lse * lse
        w = tl.load(WTS + row)
        tl.store(LOSS + row, w * (lse - (1.0 - smoothing) * s_y - smoothing / V * s_sum + zt))
        tl.store(ZT + row, w * zt)
        if WRITE_GRAD:
            scale = tl.load(GSCALE + row)
            coef = 1.0 + 2.0 * z_coef * lse
            uniform = smoothing / V
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                cmask = cols < V
                z = tl.load(zrow + cols, mask=cmask, other=0.0).to(tl.float32)
                t = z
                if HAS_SOFTCAP:
                    t = _tanh(z / softcap)
                    z = softcap * t
                g = coef * tl.exp(z - lse) - tl.where(cols == y, 1.0 - smoothing, 0.0) - uniform
                if HAS_SOFTCAP:
                    g *= 1.0 - t * t
                tl.store(zrow + cols, (scale * g).to(Z.dtype.element_ty), mask=cmask)


if triton is not None:

    @triton.jit
    def _flce_scale_kernel(X, S, n, BLOCK: tl.constexpr):
        """X (n,) *= S[0] in place, unless S[0] is exactly 1: then nothing past that scalar is read or written.
        The test runs on the device, so backward learns nothing on the host (no sync) and skips the pass."""
        s = tl.load(S)
        if s != 1.0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(X + offs, mask=mask)
            tl.store(X + offs, (x.to(tl.float32) * s).to(X.dtype.element_ty), mask=mask)


_SCALE_CONFIG = dict(BLOCK=4096, num_warps=8)  # 16 bytes per thread and access in bf16


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch.matmul: TF32 only where torch allows it (``set_float32_matmul_precision``
    "high"/"medium", i.e. ``torch.backends.cuda.matmul.allow_tf32``); unused for fp16/bf16."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _config(configs: tuple[dict, dict], dtype: torch.dtype) -> dict:
    return dict(configs[dtype == torch.float32])


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def _plan_splits(n_other: int, n_tiles: int, sms: int, max_splits: int | None = None) -> tuple[int, int]:
    """Cut a loop over ``n_tiles`` tiles into ``(splits, tiles_per_split)``, no split empty, so that
    ``n_other * splits`` programs reach ``_PROGRAMS_PER_SM * sms`` where the tiles allow it."""
    want = max(1, min(n_tiles, triton.cdiv(_PROGRAMS_PER_SM * sms, max(n_other, 1)), max_splits or n_tiles))
    per = triton.cdiv(n_tiles, want)
    return triton.cdiv(n_tiles, per), per


def _meta(hidden, bias, softcap, config):
    """Constexpr and launch keyword arguments: flags, dot precision, tiles, warps and stages."""
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None)
    return dict(flags, DOT_PRECISION=_dot_precision(hidden.dtype), **config)


def _triton_forward(hidden, weight, bias, rows, y, softcap):
    """``(lse, s_y, s_sum)``, each ``(n,)`` fp32, and ``argmax`` ``(n,)`` int32 (the first index of the max) for
    the ``n`` target ``rows`` (int32) with targets ``y``."""
    n, (V, D) = rows.numel(), weight.shape
    cfg = _config(_FWD_CONFIG, hidden.dtype)
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    splits, per = _plan_splits(n_tiles, triton.cdiv(V, cfg["BLOCK_V"]), _sm_count(hidden.device))
    f32 = dict(device=hidden.device, dtype=torch.float32)
    part = torch.empty((3, splits, n), **f32)
    arg = torch.empty((splits, n), device=hidden.device, dtype=torch.int32)
    s_y = torch.empty((n,), **f32)
    dummy = bias if bias is not None else hidden  # never read when HAS_BIAS is False
    _flce_fwd_kernel[(n_tiles, splits)](
        hidden, weight, dummy, rows, y, part, arg, s_y,
        n, V, D, hidden.stride(0), weight.stride(0), per, float(softcap or 0.0),
        **_meta(hidden, bias, softcap, cfg),
    )  # fmt: skip
    m = part[0].amax(0)
    lse = m + torch.log((part[1] * torch.exp(part[0] - m)).sum(0))
    first = (part[0] == m).to(torch.int32).argmax(0)  # the first split holding the max: the lowest index
    return lse, s_y, part[2].sum(0), arg.gather(0, first[None]).squeeze(0)


def _triton_backward(hidden, weight, bias, rows, y, scale, lse, softcap, smoothing, z_loss, filter_eps, need):
    """Gradients of ``sum_i scale[i] * loss_i`` over the target ``rows`` (``scale``, ``lse``: ``(n,)`` fp32):
    ``(grad_hidden (n, D), grad_weight (V, D), grad_bias (V,))`` in fp32, None where ``need`` says no."""
    n, (V, D) = rows.numel(), weight.shape
    sms, f32 = _sm_count(hidden.device), dict(device=hidden.device, dtype=torch.float32)
    # The uniform -eps/V term of every logit's gradient: rank-1 updates here, unless softcap reshapes it.
    uniform = smoothing / V if softcap is not None else 0.0
    if filter_eps is None or (softcap is not None and smoothing):
        filter_eps = -1.0  # keeps every tile
    scalars = (float(softcap or 0.0), float(smoothing), float(uniform), float(z_loss), float(filter_eps))
    args = (hidden, weight, bias if bias is not None else hidden, rows, y, lse, scale)
    smooth_rank1 = smoothing and softcap is None
    gh = gw = gb = None
    if need[0]:
        cfg = _config(_DH_CONFIG, hidden.dtype)
        n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
        cap = max(1, _DH_PARTIAL_BYTES // (4 * n * D))
        splits, per = _plan_splits(n_tiles, triton.cdiv(V, cfg["BLOCK_V"]), sms, cap)
        part = torch.zeros((splits, n, D), **f32)  # accumulated: a tile-free split leaves zeros
        if smooth_rank1:  # -eps/V * scale_i * sum_j W[j]
            part[0] = torch.outer(scale, weight.sum(0, dtype=torch.float32)).mul_(-smoothing / V)
        _flce_bwd_dh_kernel[(n_tiles, splits)](
            *args, part, n, V, D, hidden.stride(0), weight.stride(0), per, *scalars,
            **_meta(hidden, bias, softcap, cfg),
        )  # fmt: skip
        gh = part.sum(0) if splits > 1 else part[0]
    if need[1] or need[2]:
        cfg = _config(_DW_CONFIG, hidden.dtype)
        v_tiles = triton.cdiv(V, cfg["BLOCK_V"])
        splits, per = _plan_splits(v_tiles, triton.cdiv(n, cfg["BLOCK_N"]), sms)
        part_w = torch.zeros((splits, V, D) if need[1] else (1, 1, 1), **f32)
        part_b = torch.full((splits, V) if need[2] else (1, 1), float("nan"), **f32)
        if smooth_rank1 and need[1]:  # -eps/V * sum_i scale_i h_i on every vocab row
            part_w[0] = (scale @ hidden[rows.long()].float()).mul_(-smoothing / V)
        _flce_bwd_dw_kernel[(v_tiles, splits)](
            *args, part_w, part_b, n, V, D, hidden.stride(0), weight.stride(0), per, *scalars,
            int(need[1]), int(need[2]), **_meta(hidden, bias, softcap, cfg),
        )  # fmt: skip
        if need[1]:
            gw = part_w.sum(0) if splits > 1 else part_w[0]
        if need[2]:
            gb = part_b.sum(0)
            if smooth_rank1:
                gb -= smoothing / V * scale.sum()
    return gh, gw, gb


def _chunk_rows(n: int, V: int, itemsize: int) -> int:
    """Rows per chunk of the chunked triton path: the ``(rows, V)`` logits buffer stays within ``_CHUNK_BYTES``
    (whole 128-row GEMM tiles where it holds more than one); at least 1 row, at most ``n``."""
    rows = max(1, _CHUNK_BYTES // (V * itemsize))
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(n, rows))


# (device type, input dtype) -> whether torch.mm / torch.addmm take out_dtype=fp32 (an fp32 self added in place)
_FP32_OUT_GEMM: dict[tuple[str, torch.dtype], bool] = {}


def _fp32_out_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    kind = (device.type, dtype)
    if kind not in _FP32_OUT_GEMM:
        probe = torch.ones(2, 2, device=device)
        one = torch.ones(2, 2, device=device, dtype=dtype)
        try:  # once per process, device type and dtype: 1 + (1 1).(1 1) = 3 proves the fp32 self is added in place
            torch.addmm(probe, one, one, out_dtype=torch.float32, out=probe)
            product = torch.mm(one, one, out_dtype=torch.float32)
            _FP32_OUT_GEMM[kind] = bool((probe == 3).all()) and product.dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_GEMM[kind] = False
    return _FP32_OUT_GEMM[kind]


def _grad_weight_chunk(gw, ds: torch.Tensor, h: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """One chunk's ``ds.T @ h`` (``ds (C, V)``, ``h (C, D)`` in the compute dtype) into ``grad_weight``.

    ``gw`` None (the first chunk): the product itself, a new ``(V, D)`` tensor in ``out_dtype`` (no zero-filled
    accumulator, no read-modify-write); ``out_dtype`` is the compute dtype only for a single chunk (one GEMM
    straight into the gradient: fp32 accumulation inside the GEMM, one rounding), else fp32 (fp64 on the torch
    backend). Later chunks: ``gw += product`` in place. fp16 / bf16 operands into fp32: the GEMM's fp32 output
    where torch has one (cuBLAS, recent torch); else in vocabulary slices whose temporaries stay within
    ``_CHUNK_BYTES``: on CPU the operands upcast (exact products, fp32 sums: what the fp32-output GEMM gives), on
    CUDA each slice's product rounded once to the compute dtype (a half-precision GEMM) and added in fp32."""
    if gw is None and out_dtype == ds.dtype:
        return ds.T @ h
    if gw is not None and ds.dtype == gw.dtype:
        return gw.addmm_(ds.T, h)
    if _fp32_out_gemm(ds.device, ds.dtype):
        if gw is None:
            return torch.mm(ds.T, h, out_dtype=torch.float32)
        return torch.addmm(gw, ds.T, h, out_dtype=torch.float32, out=gw)
    V, (C, D) = ds.shape[1], h.shape
    upcast = ds.device.type == "cpu"
    if upcast:
        h = h.to(out_dtype)
    # Llama-3 bf16 on CUDA: 32768 vocabulary rows per slice
    step = max(1, _CHUNK_BYTES // (max(C, D) * (4 if upcast else h.element_size())))
    first = gw is None
    if first and step >= V and upcast:  # one slice: the product is the gradient
        return ds.T.to(out_dtype) @ h
    if first:
        gw = torch.empty(V, D, device=ds.device, dtype=out_dtype)  # every slice is assigned below
    for v0 in range(0, V, step):
        part = ds[:, v0 : v0 + step].T
        product = (part.to(out_dtype) if upcast else part) @ h
        if first:
            gw[v0 : v0 + step] = product
        else:
            gw[v0 : v0 + step] += product
    return gw


def _row_scale(scale, rows: torch.Tensor):
    """The upstream scale of the target ``rows``: a float, a 0-d tensor (one for all) or ``(N,)`` per token."""
    if isinstance(scale, torch.Tensor) and scale.dim() == 1:
        return scale[rows].float()
    return scale


def _triton_chunks(
    hidden, weight, bias, labels, rows, weights, scale, softcap, smoothing, z_loss, need, out_dtypes
):
    """The chunked path on the GPU, same contract as :func:`_torch_chunks`: GEMMs on torch (cuBLAS) in the
    compute dtype, the row step in :func:`_flce_rows_kernel` (fp32 inside, gradient in place)."""
    N, (V, D) = hidden.shape[0], weight.shape
    n, dev, dtype = rows.numel(), hidden.device, hidden.dtype
    f32 = dict(device=dev, dtype=torch.float32)
    loss, zterm = torch.zeros(N, **f32), torch.zeros(N, **f32)
    hits = torch.zeros(N, device=dev, dtype=torch.bool)
    gh = torch.zeros(N, D, device=dev, dtype=out_dtypes[0]) if need[0] else None
    gw = None  # frozen lm_head: no grad_weight at all; else the first chunk's product
    gb = torch.zeros(V, **f32) if need[2] else None
    step = _chunk_rows(max(n, 1), V, hidden.element_size())
    # one chunk: grad_weight is that chunk's GEMM, in the weight's own dtype (fp32 master weights: fp32 output)
    w_acc = out_dtypes[1] if n <= step and out_dtypes[1] in (dtype, torch.float32) else torch.float32
    if n:
        y, wts = labels[rows].to(torch.int32), weights[rows].float()
        gscale = wts if scale is None else wts * _row_scale(scale, rows)
        loss_n, zt_n = torch.empty(n, **f32), torch.empty(n, **f32)
        arg_n = torch.empty(n, device=dev, dtype=torch.int32)
        buf = torch.empty(step, V, device=dev, dtype=dtype)  # the only (rows, V) tensor: <= _CHUNK_BYTES
        opts = (float(softcap or 0.0), float(smoothing), float(z_loss))
        for start in range(0, n, step):
            idx, end = rows[start : start + step], min(start + step, n)
            h = hidden[idx]  # (C, D)
            z = buf[: end - start]  # (C, V)
            torch.mm(h, weight.T, out=z) if bias is None else torch.addmm(bias, h, weight.T, out=z)
            _flce_rows_kernel[(end - start,)](
                z, y[start:end], wts[start:end], gscale[start:end], loss_n[start:end], zt_n[start:end],
                arg_n[start:end], end - start, V, z.stride(0), *opts,
                HAS_SOFTCAP=softcap is not None, WRITE_GRAD=any(need), **_ROWS_CONFIG,
            )  # fmt: skip
            if gh is not None:  # z now holds d loss / d z
                gh.index_copy_(0, idx, (z @ weight).to(gh.dtype))
            if need[1]:
                gw = _grad_weight_chunk(gw, z, h, w_acc)
            if gb is not None:
                gb += z.sum(0, dtype=torch.float32)
        loss.index_copy_(0, rows, loss_n)
        zterm.index_copy_(0, rows, zt_n)
        hits.index_copy_(0, rows, arg_n == y)
    if need[1] and gw is None:  # no target rows
        gw = torch.zeros(V, D, device=dev, dtype=out_dtypes[1])
    grads = tuple(None if g is None else g.to(dt) for g, dt in zip((gh, gw, gb), out_dtypes))
    return loss, zterm, hits, grads


def _torch_chunks(
    hidden, weight, bias, labels, rows, weights, scale, softcap, smoothing, z_loss, need, out_dtypes
):
    """The chunked path: per-token loss and z-term ``(N,)`` fp32, argmax hits ``(N,)`` bool (False where
    ignored), and the gradients of ``sum_i scale[i] * loss_i`` (``scale``: None for 1, a float or 0-d tensor for
    every token, or ``(N,)``) for the inputs flagged in ``need`` = (hidden, weight, bias), in ``out_dtypes`` (the
    leaves' dtypes); None for others. ``hidden``, ``weight``, ``bias`` are in the compute dtype."""
    N, (V, D) = hidden.shape[0], weight.shape
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = torch.zeros(N, device=hidden.device, dtype=acc_dtype)
    zterm = torch.zeros_like(loss)
    hits = torch.zeros(N, device=hidden.device, dtype=torch.bool)
    gh = torch.zeros(N, D, device=hidden.device, dtype=acc_dtype) if need[0] else None
    gw = None  # frozen lm_head: skip; else the first chunk's product, then accumulated in place
    gb = torch.zeros(V, device=weight.device, dtype=acc_dtype) if need[2] else None
    step = max(1, _CHUNK_ELEMS // V)
    for start in range(0, rows.numel(), step):
        idx = rows[start : start + step]
        h = hidden[idx]  # (C, D)
        z = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).to(acc_dtype)  # (C, V)
        if softcap is not None:
            t = torch.tanh_(z.div_(softcap))  # in place: z is not needed again
            z = t * softcap
        y = labels[idx]
        hits[idx] = z.argmax(1) == y
        lse = torch.logsumexp(z, dim=1)
        ce = lse - (1.0 - smoothing) * z.gather(1, y[:, None]).squeeze(1)
        if smoothing:
            ce -= smoothing / V * z.sum(1)
        wt = weights[idx].to(acc_dtype)
        zt = z_loss * lse * lse
        loss[idx] = wt * (ce + zt)
        zterm[idx] = wt * zt
        if not any(need):
            continue
        # d loss_i / d s = w_i * ((1 + 2 z lse) softmax - (1 - eps) onehot(y) - eps / V), in place over z
        row_scale = wt if scale is None else wt * _row_scale(scale, idx)
        ds = z.sub_(lse[:, None]).exp_().mul_((row_scale * (1.0 + 2.0 * z_loss * lse))[:, None])
        ds.scatter_add_(1, y[:, None], (-(1.0 - smoothing) * row_scale)[:, None])
        if smoothing:
            ds -= (smoothing / V * row_scale)[:, None]
        if softcap is not None:
            ds.mul_(1.0 - t * t)
        if gh is not None:
            gh[idx] = (ds.to(hidden.dtype) @ weight).to(acc_dtype)
        if need[1]:
            gw = _grad_weight_chunk(gw, ds, h.to(acc_dtype), acc_dtype)
        if gb is not None:
            gb += ds.sum(0)
    if need[1] and gw is None:  # no target rows
        gw = torch.zeros(V, D, device=weight.device, dtype=acc_dtype)
    grads = tuple(None if g is None else g.to(dt) for g, dt in zip((gh, gw, gb), out_dtypes))
    return loss.float(), zterm.float(), hits, grads


def _reduce(per_token, reduction, count):
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total / max(count, 1) if reduction == "mean" else total


def _cast(tensors, dtype):
    """The leaves in the compute dtype (the same tensors where they already are)."""
    return [None if x is None else x.to(dtype) for x in tensors]


def _known_one(grad: torch.Tensor) -> bool | None:
    """Whether the 0-d upstream gradient is exactly 1, where that costs no device sync: read on the host for a
    CPU tensor; None (unknown) on an accelerator, where reading it would wait for the device."""
    return grad.item() == 1 if grad.device.type == "cpu" else None


def _scale_unless_one(x: torch.Tensor, factor: torch.Tensor, one: bool | None) -> None:
    """``x *= factor`` (0-d) in place, skipped where ``factor`` is 1: known on the host (``one``), else (None: on
    a GPU) tested on the device by :func:`_flce_scale_kernel`, which then reads and writes nothing of ``x``."""
    if one:
        return
    on_device = x.is_cuda or (x.device.type == "cpu" and interpreting())  # CPU: the interpreter (tests)
    if one is None and triton is not None and on_device and x.is_contiguous() and x.dtype in _SCALE_DTYPES:
        f = factor.to(device=x.device, dtype=torch.float32).reshape(1)
        _flce_scale_kernel[(triton.cdiv(x.numel(), _SCALE_CONFIG["BLOCK"]),)](
            x, f, x.numel(), **_SCALE_CONFIG
        )
    else:
        x.mul_(factor)


_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _ChunkedFLCE(torch.autograd.Function):
    """impl="chunked": logits of a chunk of target rows at a time, gradients computed in the forward pass.

    The gradients are those of the loss as returned (``reduction="mean"``'s ``1 / count`` included), kept on
    ``ctx`` and handed over in backward: returned as they are when the upstream gradient is known to be 1, else
    scaled in place (no copy either way), so autograd takes them as ``.grad`` without another ``(V, D)`` tensor.
    A second backward through the same graph (``retain_graph=True``) recomputes them."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, rows, weights, softcap, smoothing, z_loss, reduction, need, chunks, dtype,
    ):  # fmt: skip
        # need: which of (hidden, weight, bias) get gradients (none under no_grad: inference costs one matmul)
        # chunks: the row step, _torch_chunks or _triton_chunks; dtype: the compute dtype (autocast's, if on)
        out_dtypes = tuple(None if x is None else x.dtype for x in (hidden, weight, bias))
        opts = (softcap, smoothing, z_loss, need, out_dtypes)
        unit = 1.0 / max(rows.numel(), 1) if reduction == "mean" else None  # the mean's scale, known here
        with torch.autocast(hidden.device.type, enabled=False):
            h, w, b = _cast((hidden, weight, bias), dtype)
            loss, zterm, hits, grads = chunks(h, w, b, labels, rows, weights, unit, *opts)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, weights)
        ctx.grads = list(grads)
        ctx.cfg = (opts, reduction, rows.numel(), chunks, dtype, unit)
        ctx.mark_non_differentiable(hits)
        return _reduce(loss, reduction, rows.numel()), _reduce(zterm, reduction, rows.numel()), hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_z, _grad_hits):
        hidden, weight, bias, labels, rows, weights = ctx.saved_tensors
        opts, reduction, count, chunks, dtype, unit = ctx.cfg
        grads, ctx.grads = ctx.grads, None  # handed over: no reference left here, autograd may keep them

        def recompute(scale):
            with torch.autocast(hidden.device.type, enabled=False):
                h, w, b = _cast((hidden, weight, bias), dtype)
                return chunks(h, w, b, labels, rows, weights, scale, *opts)[3]

        if reduction == "none":
            g = grad_loss[rows]
            uniform, one = True, False
            if g.numel():  # one host read (as the uniformity check always was): uniform, and exactly 1
                uniform, one = torch.stack(((g == g[0]).all(), g[0] == 1)).tolist()
            if not uniform:  # per-token scales: recompute with them
                return *recompute(grad_loss), *([None] * 10)
            factor = g[0] if g.numel() else grad_loss.new_zeros(())
        else:
            factor, one = grad_loss, _known_one(grad_loss)
        if grads is None:  # a second backward (retain_graph): the first one handed the gradients over
            return *recompute(factor if unit is None else factor * unit), *([None] * 10)
        for x in grads:
            if x is not None:
                _scale_unless_one(x, factor, one)
        return *grads, *([None] * 10)


class _NoLogitsFLCE(torch.autograd.Function):
    """impl="triton": the Triton kernels that recompute the logits tile by tile and never hold them."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, rows, y, wts, softcap, smoothing, z_loss, reduction, filter_eps, dtype
    ):
        # rows, y: (n,) int32 target rows of hidden and their targets; wts: (n,) fp32 their loss weights
        # dtype: the compute dtype (autocast's, if on): the kernels read the leaves cast to it
        ctx.out_dtypes = tuple(None if x is None else x.dtype for x in (hidden, weight, bias))
        hidden, weight, bias = _cast((hidden, weight, bias), dtype)
        N, V, n = hidden.shape[0], weight.shape[0], rows.numel()
        loss = torch.zeros(N, device=hidden.device, dtype=torch.float32)
        zterm = torch.zeros_like(loss)
        hits = torch.zeros(N, device=hidden.device, dtype=torch.bool)
        lse = loss.new_zeros(0)
        if n:
            with torch.autocast(hidden.device.type, enabled=False):
                lse, s_y, s_sum, argmax = _triton_forward(hidden, weight, bias, rows, y, softcap)
                zt = z_loss * lse * lse
                ce = lse - (1.0 - smoothing) * s_y - smoothing / V * s_sum
                loss.index_copy_(0, rows.long(), wts * (ce + zt))
                zterm.index_copy_(0, rows.long(), wts * zt)
                hits.index_copy_(0, rows.long(), argmax == y)
        ctx.save_for_backward(hidden, weight, bias, rows, y, wts, lse)
        ctx.cfg = (softcap, smoothing, z_loss, reduction, filter_eps)
        ctx.mark_non_differentiable(hits)
        return _reduce(loss, reduction, n), _reduce(zterm, reduction, n), hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_z, _grad_hits):
        hidden, weight, bias, rows, y, wts, lse = ctx.saved_tensors
        softcap, smoothing, z_loss, reduction, filter_eps = ctx.cfg
        n, need = rows.numel(), tuple(ctx.needs_input_grad[:3])
        if reduction == "mean":
            grad_loss = grad_loss / max(n, 1)
        if reduction == "none":
            grad_loss = grad_loss[rows.long()]
        scale = (wts * grad_loss.float()).contiguous()  # (n,): a scalar grad_loss broadcasts
        grads = (None, None, None)
        if n and any(need):
            with torch.autocast(hidden.device.type, enabled=False):
                grads = _triton_backward(
                    hidden, weight, bias, rows, y, scale, lse, softcap, smoothing, z_loss, filter_eps, need
                )
        out = []
        for i, (x, g, needed, dt) in enumerate(zip((hidden, weight, bias), grads, need, ctx.out_dtypes)):
            if not needed:
                out.append(None)
            elif i == 0:  # (n, D) rows of grad_hidden; ignored tokens get 0
                gx = torch.zeros(x.shape, device=x.device, dtype=dt)
                out.append(gx if g is None else gx.index_copy_(0, rows.long(), g.to(dt)))
            else:
                out.append(torch.zeros(x.shape, device=x.device, dtype=dt) if g is None else g.to(dt))
        return *out, *([None] * 9)


def _check(hidden, weight, labels, bias, weights, reduction, softcap, label_smoothing, z_loss, backend, impl):
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {_REDUCTIONS}")
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden must be (N, H); got shape {tuple(hidden.shape)} (flatten batch and time first)"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, H={hidden.shape[1]}); got shape {tuple(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be (N={hidden.shape[0]},); got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32; got {labels.dtype}")
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    autocast = torch.is_autocast_enabled(hidden.device.type)
    if (
        hidden.dtype not in floats
        or weight.dtype not in floats
        or (hidden.dtype != weight.dtype and not autocast)
    ):
        raise ValueError(
            f"hidden and weight must share one of fp16/bf16/fp32/fp64 (under torch.autocast they may differ); "
            f"got {hidden.dtype}, {weight.dtype}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (V={weight.shape[0]},); got shape {tuple(bias.shape)}")
    if bias is not None and bias.dtype != weight.dtype and not (autocast and bias.dtype in floats):
        raise ValueError(f"bias must have weight's dtype {weight.dtype}; got {bias.dtype}")
    if weights is not None and weights.shape != (hidden.shape[0],):
        raise ValueError(f"weights must be (N={hidden.shape[0]},); got shape {tuple(weights.shape)}")
    tensors = {"hidden": hidden, "weight": weight, "labels": labels, "bias": bias, "weights": weights}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device; got {devices}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0; got {softcap}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0; got {z_loss}")


def _compute_dtype(hidden, weight, bias) -> torch.dtype:
    """The dtype of the lm_head product: ``F.linear``'s. Under ``torch.autocast`` for the tensors' device, the
    autocast dtype (fp16 / bf16 / fp32 inputs may differ; float64 is never cast, so it must be all float64);
    else the inputs' own dtype."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden.dtype
    dtypes = {x.dtype for x in (hidden, weight, bias) if x is not None}
    if torch.float64 in dtypes:
        if dtypes != {torch.float64}:
            raise ValueError(f"under torch.autocast float64 is not cast: hidden, weight, bias must all be float64 "
                             f"or none of them; got {sorted(map(str, dtypes))}")  # fmt: skip
        return torch.float64
    return torch.get_autocast_dtype(device)


def _check_targets(labels: torch.Tensor, valid: torch.Tensor, V: int, ignore_index: int) -> None:
    """Raise when a label is neither ignore_index nor a class in [0, V): one reduction (and sync) per call."""
    bad = valid & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        value = int(labels[pos])
        hint = (
            f"pass ignore_index={value} if that is your padding label"
            if value < 0
            else f"a label >= V means the tokenizer's vocabulary is larger than the lm_head's ({V} rows)"
        )
        raise ValueError(
            f"labels[{pos}] = {value} is not a class in [0, V={V}) nor ignore_index={ignore_index}: "
            f"set positions without a target to {ignore_index}; {hint}"
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    weights: torch.Tensor | None = None,
    backend: str = "auto",
    impl: str = "auto",
    return_z_loss: bool = False,
    return_hits: bool = False,
    filter_eps: float | str | None = "auto",
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` without the ``(N, V)`` logits.

    Args:
        hidden: ``(N, H)`` final hidden states (flatten batch and time), fp16/bf16/fp32 (fp64: torch only).
        weight: ``(V, H)`` lm_head weight, same dtype as ``hidden`` (under ``torch.autocast`` any of
            fp16/bf16/fp32: the product runs in the autocast dtype, each gradient comes in its leaf's dtype, an
            fp32 master weight gets the fp32 gradient without a round trip through the compute dtype).
        labels: ``(N,)`` int64/int32 targets; ``ignore_index`` marks tokens without a target.
        bias: optional ``(V,)`` lm_head bias, in the weight's dtype (under autocast: any of fp16/bf16/fp32).
        reduction: ``"mean"`` (weighted sum over the number of non-ignored tokens; 0 if there are none),
            ``"sum"``, or ``"none"`` (``(N,)`` fp32, 0 at ignored tokens).
        softcap: Gemma-style logit soft-capping ``softcap * tanh(logits / softcap)``.
        label_smoothing: as ``F.cross_entropy``'s (uniform over the V classes).
        z_loss: coefficient of ``lse ** 2`` added to each token's loss (PaLM's z-loss).
        weights: optional ``(N,)`` per-token loss weights (not differentiated).
        backend: ``"torch"``, ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or
            ``"auto"`` (triton on CUDA, torch elsewhere).
        impl: ``"chunked"``: the target rows in chunks whose logits are materialised by torch's matmul (cuBLAS)
            in the compute dtype, at most 256 MiB at once (``_CHUNK_BYTES``; 16 MiB of fp32 on the torch
            backend), gradients by matmuls too (3 GEMMs over the target rows); the row step (log-sum-exp, loss,
            gradient written over the logits) is one Triton kernel per chunk on the triton backend, torch ops
            on the torch backend. ``"triton"``: the triton backend's kernels that never hold logits (nothing of
            size ``(rows, V)``, 5 GEMM-equivalents in Triton tiles; 3.3x / 4.7x slower than chunked on an H200
            at V=128k, 1k / 16k targets); ``"fused"`` is its deprecated name.
            ``"auto"``: chunked (on CUDA, and on CPU where the torch backend is chunked anyway).
        return_z_loss: also return the z-loss part of the loss (same reduction, detached) for logging.
        return_hits: also return ``hits`` ``(N,)`` bool, whatever the reduction: ``argmax_j s_j == labels[i]``
            (the first index wins a tie; False at ignored tokens), from the logits as this path computes them
            (chunked: rounded to the compute dtype; triton: fp32). No gradient, no extra pass over the logits.
        filter_eps: impl="triton" backward only (the chunked paths are exact): skip a tile of the logits'
            gradient whose ``(1 + 2 z_loss lse) * softmax`` is below this everywhere and that holds no target
            (Cut Cross-Entropy's gradient filtering). ``"auto"``: ``finfo(hidden.dtype).eps / 32``, each skipped
            term below the gradient's resolution; ``None`` or ``0``: keep every tile. Off when both softcap
            and label_smoothing are set.

    Returns:
        The loss (including the z-loss term), then ``z_term`` when ``return_z_loss``, then ``hits`` when
        ``return_hits``: ``loss``, ``(loss, z_term)``, ``(loss, hits)`` or ``(loss, z_term, hits)``.
        The loss is fp32 (under autocast too). Differentiable with respect to ``hidden``, ``weight`` and
        ``bias``; their gradients come in their own dtypes.
    """
    _check(hidden, weight, labels, bias, weights, reduction, softcap, label_smoothing, z_loss, backend, impl)
    if not (
        filter_eps is None
        or filter_eps == "auto"
        or (isinstance(filter_eps, (int, float)) and filter_eps >= 0)
    ):
        raise ValueError(f"filter_eps must be 'auto', None or a float >= 0; got {filter_eps!r}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and triton is not None else "torch"
    if impl == "fused":
        warnings.warn(
            "fused_linear_cross_entropy(impl='fused') is now impl='triton' (the Triton kernels that never hold "
            "logits); 'fused' will be removed",
            FutureWarning,  # shown to users by default, once per calling line
            stacklevel=2,
        )
        impl = "triton"
    if impl == "auto":
        impl = "chunked"  # cuBLAS GEMMs: faster than the Triton kernels (see impl above)
    if impl == "triton" and backend != "triton":
        raise ValueError(
            f"impl='triton' runs the Triton kernels, but the backend is torch ({hidden.device.type} tensors): "
            "use impl='chunked' (or 'auto'), or CUDA tensors / backend='triton'"
        )
    dtype = _compute_dtype(hidden, weight, bias)
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs the triton package; use backend='torch'")
        if dtype == torch.float64:
            raise ValueError("backend='triton' takes fp16/bf16/fp32 hidden and weight; got float64")
    # Row strides are kernel arguments (no copy of a sliced lm_head); only the hidden dimension must be dense.
    hidden, weight = (x if x.stride(1) == 1 else x.contiguous() for x in (hidden, weight))
    labels, bias = labels.contiguous(), None if bias is None else bias.contiguous()
    if weights is None:
        weights = torch.ones(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    valid = labels != ignore_index
    _check_targets(labels, valid, weight.shape[0], ignore_index)
    rows = valid.nonzero().squeeze(1)  # (n_targets,) int64: ignored tokens cost nothing
    labels = labels.long()
    opts = (softcap, float(label_smoothing), float(z_loss), reduction)
    if impl == "triton":
        if filter_eps == "auto":
            filter_eps = torch.finfo(dtype).eps / 32
        y, wts = labels[rows].to(torch.int32), weights[rows].float()
        loss, zterm, hits = _NoLogitsFLCE.apply(
            hidden, weight, bias, rows.to(torch.int32), y, wts, *opts, filter_eps, dtype
        )
    else:
        need = tuple(
            torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias)
        )
        chunks = _triton_chunks if backend == "triton" else _torch_chunks
        loss, zterm, hits = _ChunkedFLCE.apply(
            hidden, weight, bias, labels, rows, weights, *opts, need, chunks, dtype
        )
    out = (loss,) + ((zterm.detach(),) if return_z_loss else ()) + ((hits,) if return_hits else ())
    return out if len(out) > 1 else loss


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    weights: torch.Tensor | None = None,
    return_z_loss: bool = False,
    return_hits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """:func:`fused_linear_cross_entropy` on materialised ``(N, V)`` logits, in plain torch ops (autograd
    gives its gradients): the reference of the tests and of ``bench/gpu``. Same arguments, outputs and
    definitions (see the module docstring); the logits are ``F.linear`` in the inputs' dtype (upcast to fp32
    from fp16 / bf16), so pass float64 inputs for an exact reference. Memory: the full logits, a few times.
    """
    _check(
        hidden, weight, labels, bias, weights, reduction, softcap, label_smoothing, z_loss, "torch", "chunked"
    )
    logits = F.linear(hidden, weight, bias)  # (N, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index
    ce = F.cross_entropy(
        logits, labels.long(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    zterm = z_loss * torch.logsumexp(logits, dim=1) ** 2 * valid
    per = ce + zterm
    if weights is not None:
        per, zterm = per * weights.to(per.dtype), zterm * weights.to(per.dtype)
    if reduction != "none":
        count = max(int(valid.sum()), 1) if reduction == "mean" else 1
        per, zterm = per.sum() / count, zterm.sum() / count
    hits = (logits.detach().argmax(1) == labels) & valid  # the first index wins a tie
    out = (per,) + ((zterm.detach(),) if return_z_loss else ()) + ((hits,) if return_hits else ())
    return out if len(out) > 1 else per


def aot_specs() -> list:
    """Every Triton configuration this module launches (for ``ragkern.kernels._aot`` and the kernel report):
    the JIT's specialisations of the shapes that run (V, D and row strides divisible by 16, as for Llama-3's
    V=128256, D=4096) for each dtype and flag, fp32 with TF32 allowed, and an odd vocabulary (V=32003)."""
    from ._aot import AotSpec

    ints = ("n_rows", "V", "D", "stride_h", "stride_w", "tiles_per_split", "need_dw", "need_db")
    variants = [
        (dt, bias, cap, "tf32" if dt != "fp32" else "ieee", True)
        for dt in ("bf16", "fp16", "fp32")
        for bias in (False, True)
        for cap in (False, True)
    ]
    variants += [("fp32", False, False, "tf32", True), ("bf16", False, False, "tf32", False),
                 ("fp32", False, False, "ieee", False)]  # fmt: skip
    specs = []
    for name, fn, config in (
        ("flce_fwd", _flce_fwd_kernel, _FWD_CONFIG),
        ("flce_bwd_dh", _flce_bwd_dh_kernel, _DH_CONFIG),
        ("flce_bwd_dw", _flce_bwd_dw_kernel, _DW_CONFIG),
    ):
        for dtype, has_bias, has_softcap, precision, v16 in variants:
            cfg = _config(config, torch.float32 if dtype == "fp32" else torch.float16)
            blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
            constexprs = dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, DOT_PRECISION=precision, **blocks)
            signature = {}
            for arg in fn.arg_names:
                if arg in constexprs:
                    signature[arg] = "constexpr"
                elif arg in ("H", "W", "B"):
                    signature[arg] = "*" + dtype
                elif arg in ("ROWS", "Y", "ARG"):
                    signature[arg] = "*i32"
                elif arg in ints:
                    signature[arg] = "i32"
                else:
                    signature[arg] = "*fp32" if arg.isupper() else "fp32"
            # the JIT marks pointers and ints divisible by 16 (never the do_not_specialize ones)
            aligned = [a for a, t in signature.items() if t.startswith("*")] + ["D", "stride_h", "stride_w"]
            aligned += ["V"] if v16 else []
            tile = " ".join(f"{k[6:]}={v}" for k, v in blocks.items())
            specs.append(
                AotSpec(
                    kernel=name,
                    fn=fn,
                    signature=signature,
                    constexprs=constexprs,
                    num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                    config=f"{dtype} {precision} bias={int(has_bias)} softcap={int(has_softcap)} "
                    f"V%16={'0' if v16 else 'odd'} {tile} w{cfg['num_warps']} s{cfg['num_stages']}",
                    aligned=tuple(aligned),
                )
            )
    # the chunked path's row kernel: fp16/bf16/fp32 logits, softcap or not; the forward under no_grad; odd V
    rows_variants = [(dt, cap, True, True) for dt in ("bf16", "fp16", "fp32") for cap in (False, True)]
    rows_variants += [("bf16", False, False, True), ("bf16", False, True, False)]
    for dtype, has_softcap, write_grad, v16 in rows_variants:
        constexprs = dict(HAS_SOFTCAP=has_softcap, WRITE_GRAD=write_grad, BLOCK_V=_ROWS_CONFIG["BLOCK_V"])
        signature = {}
        for arg in _flce_rows_kernel.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg == "Z":
                signature[arg] = "*" + dtype
            elif arg in ("Y", "ARG"):
                signature[arg] = "*i32"
            elif arg in ("n_rows", "V", "stride_z"):
                signature[arg] = "i32"
            else:
                signature[arg] = "*fp32" if arg.isupper() else "fp32"
        aligned = [a for a, t in signature.items() if t.startswith("*")] + (["V", "stride_z"] if v16 else [])
        specs.append(
            AotSpec(
                kernel="flce_rows",
                fn=_flce_rows_kernel,
                signature=signature,
                constexprs=constexprs,
                num_warps=_ROWS_CONFIG["num_warps"],
                num_stages=3,
                config=f"{dtype} softcap={int(has_softcap)} grad={int(write_grad)} "
                f"V%16={'0' if v16 else 'odd'} BLOCK_V={_ROWS_CONFIG['BLOCK_V']} w{_ROWS_CONFIG['num_warps']}",
                aligned=tuple(aligned),
            )
        )
    # backward's in-place scale of the gradients precomputed by the chunked path (skipped on the device at 1)
    for dtype in ("bf16", "fp16", "fp32"):
        specs.append(
            AotSpec(
                kernel="flce_scale",
                fn=_flce_scale_kernel,
                signature={"X": "*" + dtype, "S": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                constexprs=dict(BLOCK=_SCALE_CONFIG["BLOCK"]),
                num_warps=_SCALE_CONFIG["num_warps"],
                num_stages=3,
                config=f"{dtype} BLOCK={_SCALE_CONFIG['BLOCK']} w{_SCALE_CONFIG['num_warps']}",
                aligned=("X", "S", "n"),
            )
        )
    return specs
