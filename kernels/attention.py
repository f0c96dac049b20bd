"""Variable-length (packed) causal attention with optional passage block masks.

Layout follows flash-attn's varlen convention::

    q          (total, Hq, D)     tokens of all examples, back to back
    k, v       (total, Hkv, D)    Hq % Hkv == 0 (GQA: query head h reads kv head h // (Hq // Hkv))
    cu_seqlens (n + 1,) int32     example i owns tokens cu_seqlens[i]:cu_seqlens[i+1]
    block_ids  (total,) int32     optional; 0 = global, b > 0 = passage b

Mask, for a query i and a key j of the same example (never across examples)::

    causal:     j <= i
    block_ids:  block[i] == 0  or  block[j] == block[i]

so a passage token sees only earlier tokens of its own passage (its keys and values depend on that passage
alone), while question and answer tokens (block 0) see everything earlier in their example. Optionally a sliding
window (``i - window < j``: the ``window`` most recent keys; the Triton kernels never visit the key tiles wholly
before it) and a logit softcap (scores become ``softcap * tanh(scores / softcap)`` before mask and softmax)::

    causal, window=3: query i (rows) sees key j (x)
        j: 0 1 2 3 4 5
      i=0  x
      i=1  x x
      i=2  x x x
      i=3    x x x
      i=4      x x x
      i=5        x x x

The plain PyTorch reference below is also the CPU path: it runs attention example by example, so its cost
grows with the sum of squared example lengths, never with the squared row length, and an example's output
is computed from its own tokens only (bit-for-bit independent of its neighbours).
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._aot import AotSpec, interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

_BACKENDS = ("auto", "torch", "triton")
_NONCAUSAL_WINDOW = (
    "window with causal=False is not supported by the Triton kernels (only the causal sliding window of "
    "decoder LMs); use causal=True, or backend='torch'"
)
_TRITON_MAX_HEAD_DIM = 256  # head_dim: a multiple of 8 up to this (padded to a power of 2 in the tiles)
_LOG2E = 1.4426950408889634

# --------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _load_rows(ptrs, rows_ok, ROWS_MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """A (rows, BLOCK_D) tile; masked only where rows may leave the example or head_dim is padded."""
        if ROWS_MASKED:
            offs_d = tl.arange(0, BLOCK_D)
            return tl.load(ptrs, mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        elif HEAD_DIM != BLOCK_D:
            offs_d = tl.arange(0, BLOCK_D)
            return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            return tl.load(ptrs)

    @triton.jit
    def _load_half(ptr, rows, stride, rows_ok, c0, HEAD_DIM: tl.constexpr, ACC_D: tl.constexpr):
        """Columns [c0, c0 + ACC_D) of a (rows, head_dim) tile, masked: one half of a split head_dim (a program
        loads its own half at col0, the other at ACC_D - col0). ``rows``: (rows, 1) int64 token offsets."""
        cols = c0 + tl.arange(0, ACC_D)
        mask = rows_ok[:, None] & (cols < HEAD_DIM)[None, :]
        return tl.load(ptr + rows * stride + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _dot_halves(a, b, a2, b2, DOT_PREC: tl.constexpr):
        """a @ b^T + a2 @ b2^T over the two halves of a split head_dim, fp32."""
        acc = tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
        return tl.dot(a2, tl.trans(b2), acc, input_precision=DOT_PREC)

    @triton.jit
    def _visible(
        bq, bk, offs_m, offs_n, L, window,
        CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ):  # fmt: skip
        """(BLOCK_M, BLOCK_N) element mask of a partial tile: both inside the example, causal, inside the window
        (``i - window < j``), same passage.

        With a window (causal only) one unsigned compare, 0 <= i - j < window (a negative i - j wraps high), and no
        test of the example's end: j <= i keeps the keys of a query inside the example inside it, and the rows past
        its end are never stored (forward, dQ) or load zero Q and dO, so add nothing to dK and dV."""
        if HAS_WINDOW:
            ok = (offs_m[:, None] - offs_n[None, :]).to(tl.uint32) < window
        else:
            ok = (offs_m < L)[:, None] & (offs_n < L)[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
        if HAS_BLOCKS:
            ok = ok & ((bq[:, None] == 0) | (bq[:, None] == bk[None, :]))
        return ok

    @triton.jit
    def _tanh(x):
        """tanh from one exp2 (portable: the interpreter and every triton release); saturates to +-1."""
        return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2 * log2(e)

    @triton.jit
    def _key_tiles(
        m0, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
    ):  # fmt: skip
        """Key-tile starts visited by query tile [m0, m0 + BLOCK_M) without blocks (forward and dQ):
        [lo, full_lo) partial (the window's lower edge), [full_lo, full_hi) full, [full_hi, hi) partial (the
        causal diagonal or the example's end). Key tiles below ``lo`` lie wholly outside every query's window and
        are never visited. (BLOCK_M % BLOCK_N == 0, so the diagonal starts on a key-tile boundary.) Without a
        window lo = full_lo = 0 (constants)."""
        last_q = tl.minimum(m0 + BLOCK_M, L) - 1
        if CAUSAL:
            full_hi = m0
            hi = last_q + 1
        else:
            full_hi = L // BLOCK_N * BLOCK_N
            hi = L
        if HAS_WINDOW:  # causal only (the host refuses a non-causal window)
            # rounded down / up to tiles by remainders (no multiply a 32-bit offset check cannot bound)
            lo = tl.maximum(m0 - window + 1, 0)
            lo -= lo % BLOCK_N
            full_lo = tl.maximum(last_q - window + 1, 0)
            full_lo = tl.minimum(full_lo + (BLOCK_N - full_lo % BLOCK_N) % BLOCK_N, full_hi)
        else:
            lo = 0
            full_lo = 0
        return lo, full_lo, full_hi, hi

    @triton.jit
    def _fwd_tile(
        acc, l_i, m_i, q, Kb, Vb, BLKb, n0, offs_m, bq, L, stride_kt, stride_vt, qk_scale, window, softcap,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        """One key tile of the online softmax. A full tile (MASKED=False) is wholly visible: no mask at all.
        ``softcap`` is in log2 units (softcap * log2(e)): capping the log2-scaled score with it equals capping the
        natural score with softcap, then scaling by log2(e)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        rows = offs_n.to(tl.int64)[:, None]  # 64-bit: token index x stride passes 2^31 on long examples
        nmask = offs_n < L
        k = _load_rows(Kb + rows * stride_kt + offs_d[None, :], nmask, MASKED, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if HAS_SOFTCAP:
            s = softcap * _tanh(s * (1.0 / softcap))  # one scalar division, not one per score
        if MASKED:
            bk = tl.load(BLKb + offs_n, mask=nmask, other=-1) if HAS_BLOCKS else offs_n
            vis = _visible(bq, bk, offs_m, offs_n, L, window, CAUSAL, HAS_BLOCKS, HAS_WINDOW)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # m_i starts finite, so never -inf - -inf
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(Vb + rows * stride_vt + offs_d[None, :], nmask, MASKED, HEAD_DIM, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        return acc, l_i, m_new

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, Out, LSE, CU, BLK, CNT, IDX, qk_scale, softcap,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        total, group, tiles_q, tiles_k, window,
        CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        """One (query block, example, query head): O = softmax(Q K^T) V online; LSE in log2 units.

        Without blocks the key tiles before the diagonal are full and the diagonal tiles partial; with a window
        the loop starts at the window's first key tile (``_key_tiles``: the tiles before it are never visited)
        and the tiles crossing the window's edge are partial. With blocks the key tiles come from the precomputed
        lists CNT/IDX (first tokens of the partial tiles, then of the full ones; the window already applied), so
        no tile is skipped by a data-dependent branch and the K/V loads stay software-pipelined."""
        seq = tl.program_id(1)
        h = tl.program_id(2)
        start = tl.load(CU + seq)
        L = tl.load(CU + seq + 1) - start
        m0 = tl.program_id(0) * BLOCK_M
        if m0 >= L:
            return
        start = start.to(tl.int64)
        h64 = h.to(tl.int64)
        kvh = (h // group).to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < L
        rows = start + offs_m
        q = _load_rows(
            Q + rows[:, None] * stride_qt + h64 * stride_qh + offs_d[None, :], mmask, True, HEAD_DIM, BLOCK_D
        )
        Kb = K + start * stride_kt + kvh * stride_kh
        Vb = V + start * stride_vt + kvh * stride_vh
        BLKb = BLK + start
        bq = tl.load(BLKb + offs_m, mask=mmask, other=0) if HAS_BLOCKS else offs_m
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        if HAS_BLOCKS:
            row = seq.to(tl.int64) * tiles_q + tl.program_id(0)
            n_partial = tl.load(CNT + 2 * row)
            n_full = tl.load(CNT + 2 * row + 1)
            tiles = IDX + row * tiles_k
            for j in range(0, n_partial):
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, Kb, Vb, BLKb, tl.load(tiles + j), offs_m, bq, L,
                    stride_kt, stride_vt, qk_scale, window, softcap, True, CAUSAL, True, HAS_WINDOW, HAS_SOFTCAP,
                    HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
                )  # fmt: skip
            for j in range(n_partial, n_partial + n_full):
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, Kb, Vb, BLKb, tl.load(tiles + j), offs_m, bq, L,
                    stride_kt, stride_vt, qk_scale, window, softcap, False, CAUSAL, True, HAS_WINDOW, HAS_SOFTCAP,
                    HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
                )  # fmt: skip
        else:
            lo, full_lo, full_hi, hi = _key_tiles(m0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
            for n0 in range(full_lo, full_hi, BLOCK_N):
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, Kb, Vb, BLKb, n0, offs_m, bq, L, stride_kt, stride_vt, qk_scale,
                    window, softcap, False, CAUSAL, False, HAS_WINDOW, HAS_SOFTCAP,
                    HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
                )  # fmt: skip
            # the partial tiles in one loop (a third loop costs registers): the window's edge, then from full_hi
            part_lo, part_hi = (lo, hi - full_hi + full_lo) if HAS_WINDOW else (full_hi, hi)
            for j in range(part_lo, part_hi, BLOCK_N):
                n0 = tl.where(j < full_lo, j, j - full_lo + full_hi) if HAS_WINDOW else j
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, Kb, Vb, BLKb, n0, offs_m, bq, L, stride_kt, stride_vt, qk_scale,
                    window, softcap, True, CAUSAL, False, HAS_WINDOW, HAS_SOFTCAP,
                    HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
                )  # fmt: skip
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # rows past the example end only
        o = acc / l_safe[:, None]
        # the epilogue addresses from per-program scalars, so no per-row value stays live across the loops
        local = tl.arange(0, BLOCK_M)
        rmask = local < L - m0
        Ob = Out + (start + m0) * stride_ot + h64 * stride_oh
        tl.store(
            Ob + local.to(tl.int64)[:, None] * stride_ot + offs_d[None, :],
            o.to(Out.dtype.element_ty),
            mask=rmask[:, None] & (offs_d < HEAD_DIM)[None, :],
        )
        tl.store(LSE + h64 * total + start + m0 + local, m_i + tl.math.log2(l_safe), mask=rmask)

    @triton.jit
    def _attn_bwd_delta_kernel(
        Out, DO, DELTA, stride_ot, stride_oh, stride_dt, stride_dh, total,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        """DELTA[h, t] = sum_d O[t, h, d] * dO[t, h, d] in fp32."""
        h = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (rows < total)[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows64 = rows.to(tl.int64)
        o = tl.load(Out + rows64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + rows64[:, None] * stride_dt + h * stride_dh + offs_d[None, :], mask=mask, other=0.0)
        tl.store(
            DELTA + h * total + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=rows < total
        )

    @triton.jit
    def _bwd_kv_tile(
        dk, dv, k, v, k2, v2, Qb, DOb, LSEb, DELTAb, BLKb, m0, offs_n, bk, L, stride_qt, stride_dt, qk_scale,
        col0, window, softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
        ACC_D: tl.constexpr,
    ):  # fmt: skip
        """One query tile's contribution to a key tile's dK, dV (transposed: keys along the MMA's M).

        With a split head (ACC_D < BLOCK_D) k, v hold the program's columns [col0, col0 + ACC_D) and k2, v2 the
        other half's; Q and dO are loaded in the same two halves, P^T and dS^T take both, dK and dV only the
        program's own (so nothing is loaded twice)."""
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)[:, None]
        mmask = offs_m < L
        if ACC_D == BLOCK_D:
            offs_d = tl.arange(0, BLOCK_D)
            q = _load_rows(Qb + rows * stride_qt + offs_d[None, :], mmask, MASKED, HEAD_DIM, BLOCK_D)
            do = _load_rows(DOb + rows * stride_dt + offs_d[None, :], mmask, MASKED, HEAD_DIM, BLOCK_D)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        else:
            q = _load_half(Qb, rows, stride_qt, mmask, col0, HEAD_DIM, ACC_D)
            do = _load_half(DOb, rows, stride_dt, mmask, col0, HEAD_DIM, ACC_D)
            q2 = _load_half(Qb, rows, stride_qt, mmask, ACC_D - col0, HEAD_DIM, ACC_D)
            do2 = _load_half(DOb, rows, stride_dt, mmask, ACC_D - col0, HEAD_DIM, ACC_D)
            # both products first: the order with the fewest spills (kernel report)
            dpT = _dot_halves(v, do, v2, do2, DOT_PREC)
            sT = _dot_halves(k, q, k2, q2, DOT_PREC)
        if MASKED:
            lse = tl.load(LSEb + offs_m, mask=mmask, other=0.0)
            delta = tl.load(DELTAb + offs_m, mask=mmask, other=0.0)
        else:
            lse = tl.load(LSEb + offs_m)
            delta = tl.load(DELTAb + offs_m)
        sT = sT * qk_scale
        if HAS_SOFTCAP:  # recomputed as P is: the capped score and its derivative 1 - tanh^2
            tT = _tanh(sT * (1.0 / softcap))
            sT = softcap * tT
        pT = tl.math.exp2(sT - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED and HAS_WINDOW and not HAS_BLOCKS:  # _visible's window mask, built transposed
            pT = tl.where((offs_m[None, :] - offs_n[:, None]).to(tl.uint32) < window, pT, 0.0)
        elif MASKED:
            bq = tl.load(BLKb + offs_m, mask=mmask, other=-1) if HAS_BLOCKS else offs_m
            vis = _visible(bq, bk, offs_m, offs_n, L, window, CAUSAL, HAS_BLOCKS, HAS_WINDOW)
            pT = tl.where(tl.trans(vis), pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        if ACC_D == BLOCK_D:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, CU, BLK, CNT, IDX, qk_scale, sm_scale, softcap,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        total, group, tiles_q, tiles_k, window,
        CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, ACC_D: tl.constexpr,
    ):  # fmt: skip
        """One (key block, example, kv head, column half): dK, dV summed over the kv head's query heads (no
        atomics). With blocks the query tiles come from the key-major lists CNT/IDX (partial first). ACC_D =
        BLOCK_D // 2 splits head_dim over two programs (grid axis 2 = kv head x half): each recomputes P^T and dS^T
        and keeps only its half of the two fp32 accumulators, which at head_dim 256 do not fit one program's
        registers. (The two sum Q K^T's halves in opposite orders: their P^T may differ in the last fp32 bit.)"""
        tl.static_assert(BLOCK_D // ACC_D <= 2, "head_dim splits in at most two halves")
        seq = tl.program_id(1)
        kvh = tl.program_id(2) // (BLOCK_D // ACC_D)
        col0 = tl.program_id(2) % (BLOCK_D // ACC_D) * ACC_D
        start = tl.load(CU + seq)
        L = tl.load(CU + seq + 1) - start
        n0 = tl.program_id(0) * BLOCK_N
        if n0 >= L:
            return
        start = start.to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        nmask = offs_n < L
        rows = start + offs_n
        kvh64 = kvh.to(tl.int64)
        Kh, Vh = K + kvh64 * stride_kh, V + kvh64 * stride_vh
        if ACC_D == BLOCK_D:
            k = _load_rows(Kh + rows[:, None] * stride_kt + offs_d[None, :], nmask, True, HEAD_DIM, BLOCK_D)
            v = _load_rows(Vh + rows[:, None] * stride_vt + offs_d[None, :], nmask, True, HEAD_DIM, BLOCK_D)
            k2, v2 = k, v
        else:
            k = _load_half(Kh, rows[:, None], stride_kt, nmask, col0, HEAD_DIM, ACC_D)
            v = _load_half(Vh, rows[:, None], stride_vt, nmask, col0, HEAD_DIM, ACC_D)
            k2 = _load_half(Kh, rows[:, None], stride_kt, nmask, ACC_D - col0, HEAD_DIM, ACC_D)
            v2 = _load_half(Vh, rows[:, None], stride_vt, nmask, ACC_D - col0, HEAD_DIM, ACC_D)
        BLKb = BLK + start
        bk = tl.load(BLKb + offs_n, mask=nmask, other=-1) if HAS_BLOCKS else offs_n
        dk = tl.zeros((BLOCK_N, ACC_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, ACC_D), dtype=tl.float32)
        row = seq.to(tl.int64) * tiles_k + tl.program_id(0)
        n_partial = tl.load(CNT + 2 * row) if HAS_BLOCKS else 0
        n_full = tl.load(CNT + 2 * row + 1) if HAS_BLOCKS else 0
        tiles = IDX + row * tiles_q
        # without blocks: query tiles from n0 on; the first n_diag ones (causal diagonal) and those from full_hi to
        # q_end (the example's end, or the window's: later queries see none of these keys, and are never visited)
        # are partial, those between are full. One loop per kind, with no data-dependent branch.
        full_lo = n0 + tl.cdiv(BLOCK_N - 1, BLOCK_M) * BLOCK_M if CAUSAL else 0
        if HAS_WINDOW:  # causal only
            q_end = tl.minimum(L, n0 + BLOCK_N - 1 + window)
            # a full query tile ends by the example's end and by the window (i < n0 + window for every key here)
            full_end = tl.maximum(tl.minimum(L, n0 + window), full_lo)
            full_hi = full_end - (full_end - full_lo) % BLOCK_M
            diag_hi = tl.minimum(full_lo, q_end)  # partial tiles start at n0, n0 + BLOCK_M, ...
            # rows of the partial query tiles, whole tiles: by remainders (no multiply the 32-bit offset check
            # cannot bound): the diagonal's, then those from full_hi to q_end
            diag = diag_hi - n0
            diag += (BLOCK_M - diag % BLOCK_M) % BLOCK_M
            tail = tl.maximum(q_end - full_hi, 0)
            tail += (BLOCK_M - tail % BLOCK_M) % BLOCK_M
        else:
            full_hi = tl.maximum(full_lo, L - (L - full_lo) % BLOCK_M)
            diag_hi = (
                tl.minimum(full_lo, L) if CAUSAL else n0
            )  # partial tiles start at n0, n0 + BLOCK_M, ... < diag_hi
            tail = (L > full_hi).to(
                tl.int32
            ) * BLOCK_M  # then one at full_hi if the example ends inside a tile
        # one flat loop per tile kind over (query head of the group, query tile): no nested loop, so the software
        # pipeline runs across the heads and the accumulators are live in one loop only
        Qh = Q + start * stride_qt
        DOh = DO + start * stride_dt
        LSEh = LSE + start
        DELTAh = DELTA + start
        h0 = kvh64 * group
        if HAS_BLOCKS:
            for t in range(0, group * n_partial):
                h = h0 + t // n_partial
                dk, dv = _bwd_kv_tile(
                    dk, dv, k, v, k2, v2, Qh + h * stride_qh, DOh + h * stride_dh, LSEh + h * total, DELTAh + h * total, BLKb,
                    tl.load(tiles + t % n_partial), offs_n, bk, L, stride_qt, stride_dt, qk_scale,
                    col0, window, softcap, True, CAUSAL, True, HAS_WINDOW, HAS_SOFTCAP,
                    HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC, ACC_D,
                )  # fmt: skip
            for t in range(0, group * n_full):
                h = h0 + t // n_full
                dk, dv = _bwd_kv_tile(
                    dk, dv, k, v, k2, v2, Qh + h * stride_qh, DOh + h * stride_dh, LSEh + h * total, DELTAh + h * total, BLKb,
                    tl.load(tiles + n_partial + t % n_full), offs_n, bk, L, stride_qt, stride_dt, qk_scale,
                    col0, window, softcap, False, CAUSAL, True, HAS_WINDOW, HAS_SOFTCAP,
                    HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC, ACC_D,
                )  # fmt: skip
        else:
            # partial tiles of one head: n0, n0 + BLOCK_M, ... (diagonal) then full_hi (, full_hi + BLOCK_M, ...)
            if HAS_WINDOW:
                span = diag + tail
            else:
                span = diag_hi + tail - n0
                span += (BLOCK_M - span % BLOCK_M) % BLOCK_M
            for t in range(0, group * span, BLOCK_M):
                h = h0 + t // span
                if HAS_WINDOW:
                    m = t % span
                    m0 = tl.where(m < diag, n0 + m, full_hi + m - diag)
                else:
                    m = n0 + t % span
                    m0 = tl.where(m < diag_hi, m, full_hi)
                dk, dv = _bwd_kv_tile(
                    dk, dv, k, v, k2, v2, Qh + h * stride_qh, DOh + h * stride_dh, LSEh + h * total, DELTAh + h * total, BLKb,
                    m0, offs_n, bk, L, stride_qt, stride_dt, qk_scale,
                    col0, window, softcap, True, CAUSAL, False, HAS_WINDOW, HAS_SOFTCAP,
                    HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC, ACC_D,
                )  # fmt: skip
            span = full_hi - full_lo
            for t in range(0, group * span, BLOCK_M):
                h = h0 + t // span
                dk, dv = _bwd_kv_tile(
                    dk, dv, k, v, k2, v2, Qh + h * stride_qh, DOh + h * stride_dh, LSEh + h * total, DELTAh + h * total, BLKb,
                    full_lo + t % span, offs_n, bk, L, stride_qt, stride_dt, qk_scale,
                    col0, window, softcap, False, CAUSAL, False, HAS_WINDOW, HAS_SOFTCAP,
                    HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC, ACC_D,
                )  # fmt: skip
        dk = dk * sm_scale
        # the epilogue addresses from per-program scalars, so no per-row value stays live across the loops
        local = tl.arange(0, BLOCK_N)
        offs_a = col0 + tl.arange(0, ACC_D)
        kmask = (local < L - n0)[:, None] & (offs_a < HEAD_DIM)[None, :]
        local = local.to(tl.int64)[:, None]
        DKb = DK + (start + n0) * stride_dkt + kvh64 * stride_dkh
        tl.store(DKb + local * stride_dkt + offs_a[None, :], dk.to(DK.dtype.element_ty), mask=kmask)
        DVb = DV + (start + n0) * stride_dvt + kvh64 * stride_dvh
        tl.store(DVb + local * stride_dvt + offs_a[None, :], dv.to(DV.dtype.element_ty), mask=kmask)

    @triton.jit
    def _bwd_q_tile(
        dq, q, do, q2, do2, lse, delta, Kb, Vb, BLKb, n0, offs_m, bq, L, stride_kt, stride_vt, qk_scale, col0,
        window, softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
        ACC_D: tl.constexpr,
    ):  # fmt: skip
        """One key tile's contribution to a query tile's dQ; with a split head (ACC_D < BLOCK_D) q, do hold the
        program's columns and q2, do2 the other half's, as in :func:`_bwd_kv_tile`."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)[:, None]
        nmask = offs_n < L
        if ACC_D == BLOCK_D:
            offs_d = tl.arange(0, BLOCK_D)
            k = _load_rows(Kb + rows * stride_kt + offs_d[None, :], nmask, MASKED, HEAD_DIM, BLOCK_D)
            v = _load_rows(Vb + rows * stride_vt + offs_d[None, :], nmask, MASKED, HEAD_DIM, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        else:
            k = _load_half(Kb, rows, stride_kt, nmask, col0, HEAD_DIM, ACC_D)
            k2 = _load_half(Kb, rows, stride_kt, nmask, ACC_D - col0, HEAD_DIM, ACC_D)
            v = _load_half(Vb, rows, stride_vt, nmask, col0, HEAD_DIM, ACC_D)
            v2 = _load_half(Vb, rows, stride_vt, nmask, ACC_D - col0, HEAD_DIM, ACC_D)
            dp = _dot_halves(do, v, do2, v2, DOT_PREC)
            s = _dot_halves(q, k, q2, k2, DOT_PREC)
        s = s * qk_scale
        if HAS_SOFTCAP:
            t = _tanh(s * (1.0 / softcap))
            s = softcap * t
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            bk = tl.load(BLKb + offs_n, mask=nmask, other=-1) if HAS_BLOCKS else offs_n
            p = tl.where(_visible(bq, bk, offs_m, offs_n, L, window, CAUSAL, HAS_BLOCKS, HAS_WINDOW), p, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, CU, BLK, CNT, IDX, qk_scale, sm_scale, softcap,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
        stride_dqt, stride_dqh,
        total, group, tiles_q, tiles_k, window,
        CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, ACC_D: tl.constexpr,
    ):  # fmt: skip
        """One (query block, example, query head, column half): dQ over the key tiles the forward visited. ACC_D =
        BLOCK_D // 2 splits head_dim over two programs as in the dK/dV kernel."""
        tl.static_assert(BLOCK_D // ACC_D <= 2, "head_dim splits in at most two halves")
        seq = tl.program_id(1)
        h = tl.program_id(2) // (BLOCK_D // ACC_D)
        col0 = tl.program_id(2) % (BLOCK_D // ACC_D) * ACC_D
        start = tl.load(CU + seq)
        L = tl.load(CU + seq + 1) - start
        m0 = tl.program_id(0) * BLOCK_M
        if m0 >= L:
            return
        start = start.to(tl.int64)
        h64 = h.to(tl.int64)
        kvh = (h // group).to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < L
        rows = start + offs_m
        Qh, DOh = Q + h64 * stride_qh, DO + h64 * stride_dh
        if ACC_D == BLOCK_D:
            q = _load_rows(Qh + rows[:, None] * stride_qt + offs_d[None, :], mmask, True, HEAD_DIM, BLOCK_D)
            do = _load_rows(DOh + rows[:, None] * stride_dt + offs_d[None, :], mmask, True, HEAD_DIM, BLOCK_D)
            q2, do2 = q, do
        else:
            q = _load_half(Qh, rows[:, None], stride_qt, mmask, col0, HEAD_DIM, ACC_D)
            do = _load_half(DOh, rows[:, None], stride_dt, mmask, col0, HEAD_DIM, ACC_D)
            q2 = _load_half(Qh, rows[:, None], stride_qt, mmask, ACC_D - col0, HEAD_DIM, ACC_D)
            do2 = _load_half(DOh, rows[:, None], stride_dt, mmask, ACC_D - col0, HEAD_DIM, ACC_D)
        lse = tl.load(LSE + h64 * total + rows, mask=mmask, other=0.0)
        delta = tl.load(DELTA + h64 * total + rows, mask=mmask, other=0.0)
        Kb = K + start * stride_kt + kvh * stride_kh
        Vb = V + start * stride_vt + kvh * stride_vh
        BLKb = BLK + start
        bq = tl.load(BLKb + offs_m, mask=mmask, other=0) if HAS_BLOCKS else offs_m
        DQb = DQ + (start + m0) * stride_dqt + h64 * stride_dqh
        dq = tl.zeros((BLOCK_M, ACC_D), dtype=tl.float32)
        if HAS_BLOCKS:
            row = seq.to(tl.int64) * tiles_q + tl.program_id(0)
            n_partial = tl.load(CNT + 2 * row)
            n_full = tl.load(CNT + 2 * row + 1)
            tiles = IDX + row * tiles_k
            for j in range(0, n_partial):
                dq = _bwd_q_tile(
                    dq, q, do, q2, do2, lse, delta, Kb, Vb, BLKb, tl.load(tiles + j), offs_m, bq, L,
                    stride_kt, stride_vt, qk_scale, col0, window, softcap, True, CAUSAL, True, HAS_WINDOW,
                    HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, ACC_D,
                )  # fmt: skip
            for j in range(n_partial, n_partial + n_full):
                dq = _bwd_q_tile(
                    dq, q, do, q2, do2, lse, delta, Kb, Vb, BLKb, tl.load(tiles + j), offs_m, bq, L,
                    stride_kt, stride_vt, qk_scale, col0, window, softcap, False, CAUSAL, True, HAS_WINDOW,
                    HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, ACC_D,
                )  # fmt: skip
        else:
            lo, full_lo, full_hi, hi = _key_tiles(m0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
            for n0 in range(full_lo, full_hi, BLOCK_N):
                dq = _bwd_q_tile(
                    dq, q, do, q2, do2, lse, delta, Kb, Vb, BLKb, n0, offs_m, bq, L, stride_kt, stride_vt, qk_scale,
                    col0, window, softcap, False, CAUSAL, False, HAS_WINDOW, HAS_SOFTCAP,
                    HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, ACC_D,
                )  # fmt: skip
            # partial: the window's edge, then from full_hi
            part_lo, part_hi = (lo, hi - full_hi + full_lo) if HAS_WINDOW else (full_hi, hi)
            for j in range(part_lo, part_hi, BLOCK_N):
                n0 = tl.where(j < full_lo, j, j - full_lo + full_hi) if HAS_WINDOW else j
                dq = _bwd_q_tile(
                    dq, q, do, q2, do2, lse, delta, Kb, Vb, BLKb, n0, offs_m, bq, L, stride_kt, stride_vt, qk_scale, col0, window, softcap, True, CAUSAL, False,
                    HAS_WINDOW, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC, ACC_D,
                )  # fmt: skip
        dq = dq * sm_scale
        # the epilogue addresses from per-program scalars, so no per-row value stays live across the loops
        local = tl.arange(0, BLOCK_M)
        offs_a = col0 + tl.arange(0, ACC_D)
        tl.store(
            DQb + local.to(tl.int64)[:, None] * stride_dqt + offs_a[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=(local < L - m0)[:, None] & (offs_a < HEAD_DIM)[None, :],
        )


@dataclass(frozen=True)
class _Config:
    """Tile sizes of one kernel: BLOCK_M query rows by BLOCK_N key rows. BLOCK_M % BLOCK_N == 0 in the forward and
    dQ, so the causal diagonal starts on a key-tile boundary."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # backward only: programs sharing one head's columns, each accumulating BLOCK_D // d_split of them
    d_split: int = 1


# Interpreter (CPU tensors): small tiles so tiny test inputs still span several blocks.
_INTERPRET_CONFIG = _Config(16, 16, 4, 1)


def _bwd_key(head_dim: int, arch: int) -> tuple[int, int]:
    """(arch class, head_dim bucket) of the fp16/bf16 backward tables: (80 | 90, 64 | 128 | 256)."""
    return (90 if arch >= 90 else 80, 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256)


# fp16/bf16 backward candidates per _bwd_key: name -> (dK/dV, dQ). dK/dV's _Config is (query step BLOCK_M, keys per
# program BLOCK_N, warps, stages); dQ's is (queries per program BLOCK_M, key step BLOCK_N, warps, stages).
# "baseline": the tiles before issue 23. "flex": FlexAttention's default backward (torch 2.13,
# _inductor/template_heuristics/triton.py, CUDAConfigHeuristic.get_flex_attn_bwd_configs: sm90 64 <= h <= 128
# FlexBwDConfig(64, 128, 128, 64, stages 3, warps 8), h > 128 (64, 64, 64, 64, 2, 4); sm8x h >= 64 (64, 64, 64, 64,
# 2, 4)), mapped as (M1, N1) -> dK/dV, (M2, N2) -> dQ. The others vary one knob of those two. bench/gpu/tune.py
# times every candidate on a GPU; bench/kernel_report.py compiles each (AOT) and applies the rule of _BWD_CHOICE.
_BWD_CANDIDATES: dict[tuple[int, int], dict[str, tuple[_Config, _Config]]] = {
    (90, 64): {
        "baseline": (_Config(64, 64, 4, 2), _Config(64, 64, 4, 2)),
        "flex": (_Config(64, 128, 8, 3), _Config(128, 64, 8, 3)),
        "baseline_s3": (_Config(64, 64, 4, 3), _Config(64, 64, 4, 3)),  # Flex's h < 64 default
    },
    (90, 128): {
        "baseline": (_Config(64, 128, 8, 2), _Config(128, 64, 8, 2)),
        "flex": (_Config(64, 128, 8, 3), _Config(128, 64, 8, 3)),
        "w4_64x64_s3": (_Config(64, 64, 4, 3), _Config(64, 64, 4, 3)),
    },
    # two programs of 128 columns each (d_split=2): one program spills its (rows, 256) accumulators
    (90, 256): {
        "baseline": (_Config(64, 64, 4, 2, d_split=2), _Config(64, 64, 4, 2, d_split=2)),
        "flex": (_Config(64, 64, 4, 2), _Config(64, 64, 4, 2)),
    },  # 3 stages of the split tiles need 258 KB of shared memory: they cannot launch
    (80, 64): {
        "baseline": (_Config(32, 64, 8, 2), _Config(64, 32, 4, 2)),
        "flex": (_Config(64, 64, 4, 2), _Config(64, 64, 4, 2)),
    },
    (80, 128): {
        "baseline": (_Config(16, 64, 8, 2), _Config(64, 32, 4, 2)),
        "flex": (_Config(64, 64, 4, 2), _Config(64, 64, 4, 2)),
    },
    (80, 256): {
        "baseline": (_Config(16, 32, 4, 1), _Config(64, 16, 8, 1)),
        "flex": (_Config(64, 64, 4, 2), _Config(64, 64, 4, 2)),
    },
}
# The candidate each key runs, by this rule on the AOT report's candidate records (bench/kernel_report.py
# ``choose_backward``; bf16, causal and causal with block masks, at head_dim 64 / 128 / 256): "flex" where its
# kernels all compile with no spill instruction inside their loops, within the shared memory of a block (sm_80's
# 99 KB, so sm_86/89 run it too; sm_90's 227 KB) and, on sm_90, on wgmma no narrower than N=64; else "baseline".
# Timings on a GPU (bench/gpu/tune.py) settle it: a key in _BWD_MEASURED runs the candidate its timings found fastest.
# bench/results/kernel_report.json "attention_backward": Flex's tiles pass at head_dim 64 on both archs and at 128 on
# sm_90 (dK/dV 255 registers, 24 B stack saved outside the loops, 166 KB shared); on sm_80 at 128 its block-mask
# dK/dV spills 10 instructions inside its loops, and at 256 its dK/dV spills there on both (536 on sm_90).
_BWD_RULE_CHOICE: dict[tuple[int, int], str] = {
    (90, 64): "flex",
    (90, 128): "flex",
    (90, 256): "baseline",
    (80, 64): "flex",
    (80, 128): "baseline",
    (80, 256): "baseline",
}
# GPU-timed picks over the rule (key: candidate; say which card and results file in a comment). None measured yet.
_BWD_MEASURED: dict[tuple[int, int], str] = {}
_BWD_CHOICE: dict[tuple[int, int], str] = {**_BWD_RULE_CHOICE, **_BWD_MEASURED}
# Tuning only (bench/gpu/tune.py through _bwd_configs): {"dkdv": _Config, "dq": _Config} in place of the table's.
_BWD_OVERRIDE: dict[str, _Config] = {}


@contextmanager
def _bwd_configs(dkdv: _Config | None = None, dq: _Config | None = None):
    """Run the backward kernels with these tiles (every arch, dtype and head_dim, the interpreter too) inside the
    block; for tuning. Not thread-safe: one override at a time."""
    saved = dict(_BWD_OVERRIDE)
    _BWD_OVERRIDE.update({k: c for k, c in (("dkdv", dkdv), ("dq", dq)) if c is not None})
    try:
        yield
    finally:
        _BWD_OVERRIDE.clear()
        _BWD_OVERRIDE.update(saved)


def _gpu_configs(head_dim: int, dtype: torch.dtype, arch: int = 90) -> dict[str, _Config]:
    """Tiles for (forward, dkdv, dq) on sm_``arch``, chosen from the AOT kernel report.

    Hopper (sm_90+), fp16/bf16: every tl.dot has N >= 64 (HGMMA 64x64x16 or wider): the key tile of QK^T and the
    query step of dK/dV's K Q^T are 64 wide, and with 8 warps (two warpgroups) the M side is 128, so no warpgroup
    gets a narrower half (64 rows on 8 warps would split N). dK/dV keeps two (keys, D) fp32 accumulators per program
    (FlashAttention-2's 128-key x 64-query tile): at D 80-128 the causal kernels save 24-32 B once per program,
    outside their loops, and the non-causal ones also spill inside them. At D=256 a backward program cannot hold
    its (rows, 256) fp32 accumulators with the score tiles (dK/dV: 646 spill instructions inside its loops; dQ: 96 B
    of stack, and its 128-query tile needed 257 KB of shared memory where a block may have 227 KB), so
    ``d_split=2`` gives each of two programs 128 of the columns (Q K^T and dO V^T computed by both: 1.5x the
    FLOPs) on one warpgroup with 64 x 64 tiles: dQ spills nothing in its loop, dK/dV 12 (triton 3.9) to 26 (3.6)
    spill instructions; two warpgroups would spill nothing but split the score products into 64x32 wgmma.
    Ampere (mma.sync, no wgmma width to reach) keeps smaller forward tiles that stay free of forward spills. fp32
    runs IEEE (no tensor-core path): small tiles. The numbers are in bench/results/kernel_report.json.

    fp16/bf16 backward tiles, warps and stages come from ``_BWD_CANDIDATES[_bwd_key(head_dim, arch)]``, the
    candidate named by ``_BWD_CHOICE`` (see there for the rule): FlexAttention's defaults on sm_90 at head_dim <= 128
    (dK/dV 64 queries x 128 keys, dQ 128 x 64, 8 warps, 3 stages) and on sm_80 at <= 64 (64 x 64, 4 warps, 2
    stages); elsewhere the tiles above. ``_bwd_configs`` overrides them for tuning (bench/gpu/tune.py).
    """
    if dtype == torch.float32 and head_dim <= 64:
        fwd, dkdv, dq = _Config(32, 16, 8, 1), _Config(16, 32, 8, 1), _Config(32, 16, 8, 1)
    elif dtype == torch.float32:  # 32 x 16 spills 8-16 B at D=128
        fwd, dkdv, dq = _Config(16, 16, 4, 1), _Config(16, 16, 4, 1), _Config(16, 16, 4, 1)
    else:
        key = _bwd_key(head_dim, arch)
        dkdv, dq = _BWD_CANDIDATES[key][_BWD_CHOICE[key]]
        if arch >= 90:
            fwd = _Config(128, 64, 8, 3 if head_dim <= 64 else 2)
        elif head_dim <= 64:
            fwd = _Config(128, 64, 8, 3)
        else:
            fwd = _Config(64, 32, 4 if head_dim <= 128 else 8, 2)
    if _BWD_OVERRIDE:
        dkdv, dq = _BWD_OVERRIDE.get("dkdv", dkdv), _BWD_OVERRIDE.get("dq", dq)
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq}


def _triton_ready(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError(
            "backend='triton' needs the triton package (pip install triton); use backend='torch'"
        )
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {device}); use backend='torch', or set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels in the interpreter"
        )


def _configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, _Config]:
    if device.type != "cuda":
        dkdv, dq = _BWD_OVERRIDE.get("dkdv", _INTERPRET_CONFIG), _BWD_OVERRIDE.get("dq", _INTERPRET_CONFIG)
        return {"fwd": _INTERPRET_CONFIG, "dkdv": dkdv, "dq": dq}
    major, minor = torch.cuda.get_device_capability(device)  # cached device properties: no sync
    return _gpu_configs(head_dim, dtype, 10 * major + minor)


def _delta_rows(head_dim: int) -> int:
    """Rows per program of the delta kernel: two (rows, D) fp32 tiles in registers; at D=256, 64 rows spill."""
    return 64 if head_dim <= 128 else 16


def _block_d(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim)


def _dot_prec(dtype: torch.dtype) -> str:
    return (
        "ieee" if dtype == torch.float32 else "tf32"
    )  # fp32 inputs stay exact; tf32 is unused for fp16/bf16


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------------------------------ block-mask tile lists

# (cnt (n, rows, 2), idx (n, rows, cols), tiles_q, tiles_k)
_TileList = tuple[torch.Tensor, torch.Tensor, int, int]
_BIG = 2**31  # above every passage id


def _tile_stats(
    cu_seqlens: torch.Tensor, block_ids: torch.Tensor, max_seqlen: int, sizes: set[int]
) -> dict[int, torch.Tensor]:
    """For each tile size: (n, cdiv(max_seqlen, size), 3) int64 per tile of each example: [any global token,
    min passage id, max passage id] (an empty tile or one without passages has min > max).

    One scatter at the sizes' gcd, then a reshape-max per size (sizes are powers of 2). Device ops only.
    """
    fine_size, top = math.gcd(*sizes), max(sizes)
    fine = triton.cdiv(max(max_seqlen, 1), top) * (top // fine_size)  # a whole number of every coarser tile
    n = cu_seqlens.numel() - 1
    tok = torch.arange(block_ids.shape[0], device=block_ids.device, dtype=torch.int32)
    ex = torch.searchsorted(cu_seqlens[1:], tok, right=True)  # example of each token
    flat = ex * fine + ((tok - cu_seqlens[ex]) // fine_size).clamp_(max=fine - 1)
    b = block_ids.long()
    passage = b > 0
    # one "amax" scatter for all three: the min passage id is kept negated
    vals = torch.stack([(b == 0).long(), torch.where(passage, -b, -_BIG), torch.where(passage, b, 0)], 1)
    stats = torch.zeros(n * fine, 3, dtype=torch.long, device=b.device)
    stats[:, 1] = -_BIG
    stats.scatter_reduce_(0, flat.long()[:, None].expand(-1, 3), vals, "amax")
    out = {}
    for size in sizes:
        tiles = triton.cdiv(max(max_seqlen, 1), size)
        s = stats.view(n, fine * fine_size // size, size // fine_size, 3).amax(2)[:, :tiles]
        s[..., 1].neg_()
        out[size] = s
    return out


def _tile_lists(
    cu_seqlens: torch.Tensor,
    block_ids: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    bq: int,
    bk: int,
    key_major: bool,
    stats: dict[int, torch.Tensor] | None = None,
    window: int | None = None,
) -> _TileList:
    """FlexAttention-style lists of the tiles a block-masked kernel visits, built on the device (no host sync).

    Query tiles of ``bq`` tokens against key tiles of ``bk`` tokens, per example. A pair is *empty* (skipped) when
    no query of the tile may see a key of the other (after the causal cut, or no global query and disjoint passage
    ids: a conservative test), *full* when every query sees every key and the looped-over tile lies inside the
    example (no mask at all), *partial* otherwise (element mask). A causal ``window`` empties the pairs whose keys all
    precede every query's window (``j <= i - window``) and makes partial those crossing its edge. For each query tile (key_major=False: forward
    and dQ) or key tile (key_major=True: dK/dV), ``idx`` lists the first tokens of the partial tiles of the other
    side, then those of the full ones, ascending; ``cnt`` holds (#partial, #full). ``stats``: from
    :func:`_tile_stats` for (at least) sizes ``bq`` and ``bk``, to share them between lists.

    Returns (cnt (n, rows, 2) int32, idx (n, rows, cols) int32, tiles_q, tiles_k).
    """
    if stats is None:
        stats = _tile_stats(cu_seqlens, block_ids, max_seqlen, {bq, bk})
    tq, tk = triton.cdiv(max(max_seqlen, 1), bq), triton.cdiv(max(max_seqlen, 1), bk)
    sq = stats[bq][:, :, None, :]  # (n, tq, 1, 3)
    sk = stats[bk][:, None, :, :]  # (n, 1, tk, 3)
    dev = block_ids.device
    L = (cu_seqlens[1:] - cu_seqlens[:-1]).long()[:, None, None]  # (n, 1, 1)
    qs = (torch.arange(tq, device=dev) * bq)[None, :, None]  # first query of the tile
    ks = (torch.arange(tk, device=dev) * bk)[None, None, :]
    exists = (qs < L) & (ks < L)
    if causal:
        some = ks <= torch.minimum(qs + bq, L) - 1
        every = ks + bk - 1 <= qs
    else:
        some = torch.ones_like(exists)
        every = ks + bk <= L
    if window is not None:  # causal only: i - window < j
        some = some & (ks + bk - 1 > qs - window)
        every = every & (ks > torch.minimum(qs + bq, L) - 1 - window)
    inside = (ks + bk <= L) if not key_major else (qs + bq <= L)  # the looped-over tile needs no row mask
    q_global, q_min, q_max = sq.unbind(-1)
    k_global, k_min, k_max = sk.unbind(-1)
    q_passages = q_min <= q_max
    overlap = q_passages & (k_min <= k_max) & (k_min <= q_max) & (k_max >= q_min)
    some_b = (q_global > 0) | overlap
    every_b = ~q_passages | ((k_global == 0) & (k_min == k_max) & (q_min == q_max) & (q_min == k_min))
    visit = exists & some & some_b
    full = visit & every & every_b & inside
    if key_major:
        visit, full = visit.transpose(1, 2), full.transpose(1, 2)
    cols = visit.shape[2]
    j = torch.arange(cols, device=dev)
    key = torch.where(full, cols + j, torch.where(visit, j, 2 * cols + j))  # partial, then full, then unused
    first = (key.sort(dim=-1).values % cols) * (bq if key_major else bk)
    cnt = torch.stack([(visit & ~full).sum(-1), full.sum(-1)], -1).to(torch.int32)
    return cnt.contiguous(), first.to(torch.int32).contiguous(), tq, tk


def _version(t: torch.Tensor) -> int:
    """A tensor's in-place version; -1 for an inference tensor (``torch.inference_mode``), which has none."""
    return -1 if t.is_inference() else t._version


def _source(cu_seqlens: torch.Tensor, block_ids: torch.Tensor) -> tuple[int, ...]:
    """What a BlockTiles was built from: storage and in-place version of both tensors (host metadata only;
    empty while torch.compile traces, where tensors have no storage to name)."""
    if torch.compiler.is_compiling():
        return ()
    return (cu_seqlens.data_ptr(), _version(cu_seqlens), block_ids.data_ptr(), _version(block_ids))


@dataclass(frozen=True, eq=False)
class BlockTiles:
    """The tile lists the Triton kernels visit for one block-masked packed row, at one kernel configuration
    (head_dim, dtype, device, causal, max_seqlen). Build it with :func:`block_tiles` once per batch and pass it to
    every layer's :func:`varlen_attention`: every forward and backward then reads these lists and builds none.

    Each list is (cnt ``(n, rows, 2)`` int32, idx ``(n, rows, cols)`` int32, tiles_q, tiles_k) (see
    ``_tile_lists``): ``fwd`` and ``dq`` query-major, ``dkdv`` key-major; ``dkdv``/``dq`` are None when built
    with ``backward=False``.
    """

    fwd: _TileList
    dkdv: _TileList | None
    dq: _TileList | None
    configs: tuple[_Config, _Config, _Config]  # (fwd, dkdv, dq) tiles the lists were cut for
    causal: bool
    max_seqlen: int
    source: tuple[int, ...]  # _source(cu_seqlens, block_ids) at build time
    window: int | None = None  # the sliding window the lists were cut for (after _effective_window)


def _effective_window(window: int | None, max_seqlen: int) -> int | None:
    """None when the window reaches every key of the longest example (then it masks nothing)."""
    return None if window is None or window >= max_seqlen else int(window)


def _build_tiles(cu_seqlens, block_ids, max_seqlen, causal, cfgs, backward, window=None) -> BlockTiles:
    """All lists of a row from one stats pass; configs with the same tiles share a list (fwd and dQ often do)."""
    kinds = {"fwd": False, "dkdv": True, "dq": False} if backward else {"fwd": False}
    specs = {name: (cfgs[name].block_m, cfgs[name].block_n, key_major) for name, key_major in kinds.items()}
    sizes = {size for bq, bk, _ in specs.values() for size in (bq, bk)}
    stats = _tile_stats(cu_seqlens, block_ids, max_seqlen, sizes)
    built: dict[tuple, _TileList] = {}
    for spec in specs.values():
        if spec not in built:
            built[spec] = _tile_lists(
                cu_seqlens, block_ids, max_seqlen, causal, *spec, stats=stats, window=window
            )
    lists = {name: built[spec] for name, spec in specs.items()}
    return BlockTiles(
        lists["fwd"],
        lists.get("dkdv"),
        lists.get("dq"),
        (cfgs["fwd"], cfgs["dkdv"], cfgs["dq"]),
        bool(causal),
        int(max_seqlen),
        _source(cu_seqlens, block_ids),
        window,
    )


def block_tiles(
    cu_seqlens: torch.Tensor,
    block_ids: torch.Tensor,
    max_seqlen: int,
    *,
    head_dim: int,
    dtype: torch.dtype,
    causal: bool = True,
    backward: bool = True,
    window: int | None = None,
) -> BlockTiles:
    """The block-mask tile lists of one packed row, for :func:`varlen_attention`'s ``block_tiles``.

    Built on the row's device with a fixed number of torch ops (no host sync, no loop over tiles): call it once
    per batch, outside the layers, and hand the result to every layer (forward, backward and any recompute under
    gradient checkpointing); building per call costs a hundred or so small launches each time.

    Args:
        cu_seqlens: ``(n + 1,)`` int32 example offsets (the tensor the layers will pass).
        block_ids: ``(total,)`` int32 passage ids (the tensor the layers will pass; an in-place edit afterwards
            makes the lists stale, and varlen_attention refuses them).
        max_seqlen: the ``max_seqlen`` the layers will pass (it sizes the lists).
        head_dim, dtype: of q, k, v: they choose the kernels' tiles (and so the lists).
        causal: as the layers will call.
        backward: also build the dK/dV and dQ lists (False: forward-only use, e.g. inference).
        window: the sliding window the layers will pass (key tiles outside every query's window are dropped).
    """
    if triton is None:
        raise RuntimeError("block_tiles serves the Triton kernels: install triton (pip install triton)")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor of n+1 offsets; got {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}"
        )
    if block_ids.dtype != torch.int32 or block_ids.dim() != 1:
        raise ValueError(
            f"block_ids must be a 1-D int32 tensor; got {block_ids.dtype} {tuple(block_ids.shape)}."
        )
    if block_ids.device != cu_seqlens.device:
        raise ValueError(f"block_ids is on {block_ids.device}, cu_seqlens on {cu_seqlens.device}")
    if isinstance(max_seqlen, torch.Tensor) or not isinstance(max_seqlen, numbers.Integral):
        raise ValueError(f"max_seqlen must be a Python int, not {type(max_seqlen).__name__}")
    _check_window(window, None)
    if window is not None and not causal:
        raise NotImplementedError(_NONCAUSAL_WINDOW)
    cfgs = _configs(head_dim, dtype, block_ids.device)
    window = _effective_window(window, int(max_seqlen))
    return _build_tiles(cu_seqlens, block_ids, int(max_seqlen), causal, cfgs, backward, window)


def _check_tiles(tiles: BlockTiles, q, cu_seqlens, max_seqlen, causal, block_ids, window) -> None:
    """Refuse lists built for another row or configuration: they would read out of range or mask wrongly."""
    if block_ids is None:
        raise ValueError("block_tiles was given without block_ids; pass the block_ids it was built from")
    if torch.compiler.is_compiling():
        return  # no host metadata to compare in a traced graph
    cfgs = _configs(q.shape[2], q.dtype, q.device)
    built = (tiles.configs, tiles.causal, tiles.max_seqlen, tiles.window, tiles.source)
    configs = (cfgs["fwd"], cfgs["dkdv"], cfgs["dq"])
    want = (configs, bool(causal), int(max_seqlen), window, _source(cu_seqlens, block_ids))
    if built != want:
        raise ValueError(
            "block_tiles was built for another row or configuration (configs, causal, max_seqlen, window, source): "
            f"{built} != {want}; build it with block_tiles(cu_seqlens, block_ids, max_seqlen, head_dim=q.shape[2], "
            "dtype=q.dtype, causal=causal, window=window) from the tensors passed here, after any in-place edit"
        )


def _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale, block_ids, tiles, window=None, softcap=None):
    total, Hq, D = q.shape
    cfg = _configs(D, q.dtype, q.device)["fwd"]
    o = torch.empty_like(q)
    lse = torch.empty((Hq, total), dtype=torch.float32, device=q.device)  # log2 units
    n = cu_seqlens.numel() - 1
    cnt, idx, tq, tk = tiles.fwd if block_ids is not None else (cu_seqlens, cu_seqlens, 0, 0)
    grid = (triton.cdiv(max(max_seqlen, 1), cfg.block_m), n, Hq)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens, block_ids if block_ids is not None else cu_seqlens, cnt, idx, scale * _LOG2E,
        _cap_log2(softcap),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        total, Hq // k.shape[1], tq, tk, window or 0,
        CAUSAL=causal, HAS_BLOCKS=block_ids is not None, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, HEAD_DIM=D, BLOCK_D=_block_d(D),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PREC=_dot_prec(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return o, lse


def _cap_log2(softcap: float | None) -> float:
    """The kernels' softcap argument: in log2 units, as their scores (0.0 when off: the argument is unused)."""
    return 0.0 if softcap is None else float(softcap) * _LOG2E


def _backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale, block_ids, tiles, window, softcap):
    total, Hq, D = q.shape
    Hkv = k.shape[1]
    cfgs = _configs(D, q.dtype, q.device)
    n = cu_seqlens.numel() - 1
    blk = block_ids if block_ids is not None else cu_seqlens
    common = dict(
        CAUSAL=causal, HAS_BLOCKS=block_ids is not None, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, HEAD_DIM=D, BLOCK_D=_block_d(D),
    )  # fmt: skip
    cap = _cap_log2(softcap)
    delta = torch.empty((Hq, total), dtype=torch.float32, device=q.device)
    rows = _delta_rows(D)
    _attn_bwd_delta_kernel[(triton.cdiv(total, rows), Hq)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), total,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_T=rows,
    )  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def lists(kind):
        return (cu_seqlens, cu_seqlens, 0, 0) if block_ids is None else getattr(tiles, kind)

    cfg = cfgs["dkdv"]
    cnt, idx, tq, tk = lists("dkdv")
    _attn_bwd_dkdv_kernel[(triton.cdiv(max(max_seqlen, 1), cfg.block_n), n, Hkv * cfg.d_split)](
        q, k, v, do, dk, dv, lse, delta, cu_seqlens, blk, cnt, idx, scale * _LOG2E, scale, cap,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), total, Hq // Hkv, tq, tk, window or 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PREC=_dot_prec(q.dtype), ACC_D=_block_d(D) // cfg.d_split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )  # fmt: skip
    cfg = cfgs["dq"]
    cnt, idx, tq, tk = lists("dq")
    _attn_bwd_dq_kernel[(triton.cdiv(max(max_seqlen, 1), cfg.block_m), n, Hq * cfg.d_split)](
        q, k, v, do, dq, lse, delta, cu_seqlens, blk, cnt, idx, scale * _LOG2E, scale, cap,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), total, Hq // Hkv, tq, tk, window or 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PREC=_dot_prec(q.dtype), ACC_D=_block_d(D) // cfg.d_split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )  # fmt: skip
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale, block_ids, tiles, window, softcap):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        o, lse = _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale, block_ids, tiles, window, softcap)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, block_ids)
        ctx.max_seqlen, ctx.causal, ctx.scale, ctx.tiles = max_seqlen, causal, scale, tiles
        ctx.window, ctx.softcap = window, softcap
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens, block_ids = ctx.saved_tensors
        tiles = ctx.tiles
        if block_ids is not None and tiles.dq is None:  # built forward-only: the lists of the backward now
            cfgs = _configs(q.shape[2], q.dtype, q.device)
            tiles = _build_tiles(cu_seqlens, block_ids, ctx.max_seqlen, ctx.causal, cfgs, True, ctx.window)
        dq, dk, dv = _backward(
            _last_dim_contiguous(do),
            q,
            k,
            v,
            o,
            lse,
            cu_seqlens,
            ctx.max_seqlen,
            ctx.causal,
            ctx.scale,
            block_ids,
            tiles,
            ctx.window,
            ctx.softcap,
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    block_ids: torch.Tensor | None,
    backend: str,
    validate: bool,
) -> None:
    """Shapes, dtypes and devices always (host metadata only); with ``validate`` also the values of cu_seqlens
    and max_seqlen, which reads cu_seqlens back to the host (a device sync)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (total, heads, head_dim); got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q{tuple(q.shape)} and k{tuple(k.shape)} must agree on total tokens (dim 0) and head_dim (dim 2)"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(
            f"q, k, v and cu_seqlens must be on one device; got {q.device}, {k.device}, {v.device}, {cu_seqlens.device}"
        )
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor of n+1 offsets; got {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}"
        )
    if isinstance(max_seqlen, torch.Tensor) or not isinstance(max_seqlen, numbers.Integral):
        raise ValueError(
            f"max_seqlen must be a Python int (e.g. the collator's max_length_q), not {type(max_seqlen).__name__}:"
            " a tensor would be read back to the host on every call"
        )
    if block_ids is not None:
        if block_ids.shape != (q.shape[0],) or block_ids.dtype != torch.int32:
            raise ValueError(
                f"block_ids must be int32 of shape ({q.shape[0]},); got {block_ids.dtype} {tuple(block_ids.shape)}"
            )
        if block_ids.device != q.device:
            raise ValueError(f"block_ids is on {block_ids.device}, q on {q.device}")
    if not validate:
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must start at 0 and end at total={q.shape[0]}; got {cu[0]}..{cu[-1]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest example ({max(lengths)})")


def block_mask(block_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Boolean (L, L) mask of one example: True where query i may attend to key j.

    ``block_ids`` is the example's ``(L,)`` block ids (0 = global, b > 0 = passage b).
    """
    L = block_ids.shape[0]
    same = block_ids[:, None] == block_ids[None, :]
    allowed = same | (block_ids[:, None] == 0)
    if causal:
        allowed &= torch.ones(L, L, dtype=torch.bool, device=block_ids.device).tril()
    return allowed


def window_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, causal: bool = True
) -> torch.Tensor:
    """Boolean ``(len(q_pos), len(k_pos))`` mask of positions inside one example: True where the query may see
    the key under the causal cut and a sliding ``window`` (transformers' ``sliding_window``: a query sees the
    ``window`` most recent keys, itself included, i.e. ``i - window < j <= i``; non-causal: ``|i - j| < window``).
    """
    d = q_pos[:, None] - k_pos[None, :]
    allowed = d >= 0 if causal else torch.ones_like(d, dtype=torch.bool)
    if window is not None:
        allowed &= (d < window) if causal else (d.abs() < window)
    return allowed


def _check_window(window: int | None, softcap: float | None) -> None:
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1
    ):
        raise ValueError(
            f"window must be a positive int (the number of keys a query sees) or None; got {window!r}"
        )
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap > 0
    ):
        raise ValueError(f"softcap must be a positive number or None; got {softcap!r}")


def masked_attention(
    qi: torch.Tensor,
    ki: torch.Tensor,
    vi: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    causal_square: bool = False,
) -> torch.Tensor:
    """Attention under an explicit mask: q ``(B, Hq, M, D)``, k/v ``(B, Hkv, N, D)``, ``allowed`` bool broadcasting
    to ``(B, 1, M, N)`` or None -> ``(B, Hq, M, D)``; ``causal_square`` with no mask: causal over M = N.

    SDPA when no softcap; otherwise the scores explicitly (``softcap * tanh(s / softcap)`` before the mask, softmax
    in fp32 at least, as eager attention), since SDPA has no soft-capping. The CPU path's building block, shared
    with ``ragkern.attention`` (padded batches, decoding)."""
    Hq, Hkv = qi.shape[1], ki.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            qi,
            ki,
            vi,
            attn_mask=allowed,
            is_causal=causal_square and allowed is None,
            scale=scale,
            enable_gqa=Hq != Hkv,
        )
    if Hq != Hkv:
        ki, vi = ki.repeat_interleave(Hq // Hkv, 1), vi.repeat_interleave(Hq // Hkv, 1)
    s = torch.matmul(qi, ki.transpose(-1, -2))
    s = s.to(torch.promote_types(s.dtype, torch.float32)) * scale  # fp32 at least; float64 stays float64
    s = torch.tanh(s / softcap) * softcap
    if allowed is None and causal_square:
        M = s.shape[-1]
        allowed = torch.ones(M, M, dtype=torch.bool, device=s.device).tril()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1).to(vi.dtype), vi)


_WINDOW_CHUNK = 256  # query rows per chunk of the windowed CPU path (at most; the window if smaller)


def _banded_causal(
    qi: torch.Tensor,
    ki: torch.Tensor,
    vi: torch.Tensor,
    blocks: torch.Tensor | None,
    scale: float,
    window: int,
    softcap: float | None,
) -> torch.Tensor:
    """Causal sliding-window attention of one example in one batched call: q ``(Hq, L, D)``, k/v ``(Hkv, L, D)``
    -> ``(Hq, L, D)``.

    Queries in chunks of ``c = min(window, 256)`` rows; chunk ``j`` sees the ``c + window - 1`` keys ending at its
    last row, taken as one strided view of the (front-padded) keys, so every chunk runs in a single SDPA call and
    its backward writes each gradient once. Scores: ``L * (c + window - 1)``, not ``L^2 / 2``."""
    Hq, L, D = qi.shape
    chunk = min(window, _WINDOW_CHUNK)
    n = -(-L // chunk)
    pad = n * chunk - L
    span = chunk + window - 1
    dev = qi.device
    qc = F.pad(qi, (0, 0, 0, pad)).unflatten(1, (n, chunk)).transpose(0, 1)  # (n, Hq, c, D)

    def bands(x: torch.Tensor) -> torch.Tensor:  # (H, L, D) -> (n, H, span, D): chunk j's keys
        return F.pad(x, (0, 0, window - 1, pad)).unfold(1, span, chunk).permute(1, 0, 3, 2)

    i = torch.arange(chunk, device=dev)[:, None]
    m = torch.arange(span, device=dev)[None, :]
    back = i + window - 1 - m  # how far key m lies behind query i of the same chunk
    allowed = ((back >= 0) & (back < window))[None]  # (1, c, span)
    first_key = torch.arange(n, device=dev)[:, None, None] * chunk - (window - 1)
    allowed = allowed & (first_key + m[None] >= 0)  # (n, c, span): no key before the example
    if blocks is not None:
        bq = F.pad(blocks, (0, pad)).view(n, chunk)
        bk = F.pad(blocks, (window - 1, pad)).unfold(0, span, chunk)  # (n, span)
        allowed = allowed & ((bq[:, :, None] == bk[:, None, :]) | (bq[:, :, None] == 0))
    out = masked_attention(qc, bands(ki), bands(vi), allowed[:, None], scale, softcap, False)  # (n, Hq, c, D)
    return out.transpose(0, 1).flatten(1, 2)[:, :L]


def _example_attention(
    qi: torch.Tensor,
    ki: torch.Tensor,
    vi: torch.Tensor,
    blocks: torch.Tensor | None,
    *,
    causal: bool,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """One example: q ``(Hq, L, D)``, k/v ``(Hkv, L, D)``, blocks ``(L,)`` or None -> ``(Hq, L, D)``.

    With a window shorter than the example, queries run in chunks, each against only the keys its window
    reaches: the cost is ``O(L * window)``, not ``O(L^2)`` (:func:`_banded_causal`)."""
    L = qi.shape[1]
    if window is not None and window >= L:
        window = None  # the window reaches every key: plain (block-)causal attention
    if window is None:
        allowed = None if blocks is None else block_mask(blocks, causal)
        return masked_attention(qi[None], ki[None], vi[None], allowed, scale, softcap, causal)[0]
    if causal:
        return _banded_causal(qi, ki, vi, blocks, scale, window, softcap)
    dev = qi.device
    chunk = max(window, 16)
    outs = []
    for a in range(0, L, chunk):  # non-causal: each chunk against the keys within the window on both sides
        b = min(a + chunk, L)
        lo, hi = max(0, a - window + 1), min(L, b + window - 1)
        allowed = window_mask(torch.arange(a, b, device=dev), torch.arange(lo, hi, device=dev), window, False)
        if blocks is not None:
            bq, bk = blocks[a:b], blocks[lo:hi]
            allowed &= (bq[:, None] == bk[None, :]) | (bq[:, None] == 0)
        sub = (qi[None, :, a:b], ki[None, :, lo:hi], vi[None, :, lo:hi])
        outs.append(masked_attention(*sub, allowed, scale, softcap, False)[0])
    return torch.cat(outs, dim=1)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_ids: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact attention example by example (the CPU path). Returns ``(total, Hq, D)`` in q's dtype.

    ``window``: a query sees only the ``window`` most recent keys of its example (itself included); the work
    then falls with the window. ``softcap``: scores become ``softcap * tanh(scores / softcap)`` before the mask
    and softmax (Gemma 2). No checking here: :func:`varlen_attention` validates. Differentiable through autograd.
    """
    D = q.shape[2]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        oi = _example_attention(
            q[start:end].transpose(0, 1),  # (Hq, L, D)
            k[start:end].transpose(0, 1),  # (Hkv, L, D)
            v[start:end].transpose(0, 1),
            None if block_ids is None else block_ids[start:end],
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
        )
        outs.append(oi.transpose(0, 1).to(q.dtype))  # (L, Hq, D)
    if not outs:
        return torch.empty_like(q)
    return torch.cat(outs, dim=0)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_ids: torch.Tensor | None = None,
    block_tiles: BlockTiles | None = None,
    window: int | None = None,
    softcap: float | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Packed attention over examples delimited by ``cu_seqlens``; differentiable.

    Args:
        q: ``(total, Hq, D)`` queries.
        k, v: ``(total, Hkv, D)`` keys and values, ``Hq % Hkv == 0``.
        cu_seqlens: ``(n + 1,)`` int32 offsets of the examples, starting at 0 and ending at ``total``.
        max_seqlen: length of the longest example, a Python int (it sizes the Triton grid).
        causal: mask keys after the query.
        softmax_scale: defaults to ``D ** -0.5``.
        block_ids: optional ``(total,)`` int32 passage ids (see the module docstring).
        block_tiles: the Triton path's tile lists for these ``cu_seqlens``/``block_ids``, from
            :func:`block_tiles`, built once per batch and shared by every layer and the backward. Without it each
            call builds its own (a hundred or so small device ops per call). Ignored by the torch backend.
        window: sliding-window attention as transformers' ``sliding_window``: a query sees only the ``window``
            most recent keys of its own example, itself included (``i - window < j <= i``). Key tiles wholly
            outside every query's window are skipped, so the cost falls with the window. None: no window.
        softcap: attention logit soft-capping (Gemma 2's ``attn_logit_softcapping``): scores, after
            ``softmax_scale``, become ``softcap * tanh(scores / softcap)`` before the mask and softmax.
        backend: ``"torch"`` (the exact per-example reference), ``"triton"`` or ``"auto"``
            (Triton on CUDA, torch elsewhere).
        validate: check the values of ``cu_seqlens`` (starts at 0, ends at ``total``, non-decreasing, no example
            longer than ``max_seqlen``), which reads it back to the host: one device sync per call. With
            ``validate=False`` only shapes, dtypes and devices are checked and the Triton path runs without any
            host sync (safe inside CUDA graphs): the caller guarantees those values, e.g. by checking them once
            per batch and then calling every layer with ``validate=False``. Wrong values are then undefined
            behaviour (out-of-range reads), not an error.

    Returns:
        ``(total, Hq, D)`` in the dtype of ``q``.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, block_ids, backend, validate)
    _check_window(window, softcap)
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton is not None else "torch"
    if backend == "triton":
        if window is not None and not causal:
            raise NotImplementedError(_NONCAUSAL_WINDOW)
        _triton_ready(q.device)
        D = q.shape[2]
        if D % 8 or not 16 <= D <= _TRITON_MAX_HEAD_DIM:
            raise ValueError(
                f"head_dim={D} is not supported by the Triton kernel (a multiple of 8 in 16..{_TRITON_MAX_HEAD_DIM},"
                " e.g. 64, 80, 96, 128, 256); use backend='torch'"
            )
        scale = softmax_scale if softmax_scale is not None else q.shape[2] ** -0.5
        window = _effective_window(window, int(max_seqlen))
        if block_ids is not None and block_tiles is None:  # built here, once for this call's fwd and bwd
            backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
            cfgs = _configs(D, q.dtype, q.device)
            block_tiles = _build_tiles(cu_seqlens, block_ids, int(max_seqlen), causal, cfgs, backward, window)
        elif block_tiles is not None:
            _check_tiles(block_tiles, q, cu_seqlens, max_seqlen, causal, block_ids, window)
        return _VarlenAttention.apply(
            q, k, v, cu_seqlens, int(max_seqlen), bool(causal), float(scale), block_ids, block_tiles, window,
            None if softcap is None else float(softcap),
        )  # fmt: skip
    return varlen_attention_reference(
        q,
        k,
        v,
        cu_seqlens,
        causal=causal,
        softmax_scale=softmax_scale,
        block_ids=block_ids,
        window=None if window is None else int(window),
        softcap=None if softcap is None else float(softcap),
    )


_AOT_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# What the JIT sees at a typical launch (Llama-3-8B's 32 query / 8 key-value heads, an odd packed length), so the
# AOT report compiles the same specialisation: strides multiples of 16, ``total`` odd, ``group`` 4; the "mha"
# variant has group=1 (a constant to the JIT) and a total divisible by 16.
# A window is Mistral's / Gemma 2's 4096 (a runtime argument: one binary serves every window); off, the host passes 0.
_AOT_HEADS, _AOT_TOTAL, _AOT_MAX_SEQLEN, _AOT_WINDOW = (32, 8), 4099, 4001, 4096


def _aot_values(kernel: str, D: int, cfg: _Config, blocks: bool, mha: bool, window: bool) -> dict[str, int]:
    hq, hkv = (_AOT_HEADS[0], _AOT_HEADS[0]) if mha else _AOT_HEADS
    width = {"q": hq, "o": hq, "d": hq, "dq": hq, "k": hkv, "v": hkv, "dk": hkv, "dv": hkv}
    names = {
        "attn_fwd": "qkvo",
        "attn_bwd_dkdv": ["q", "k", "v", "d", "dk", "dv"],
        "attn_bwd_dq": ["q", "k", "v", "d", "dq"],
    }
    values = {}
    for n in names[kernel]:
        values[f"stride_{n}t"], values[f"stride_{n}h"] = width[n] * D, D
    values["total"] = 4096 if mha else _AOT_TOTAL
    values["group"] = hq // hkv
    tq, tk = triton.cdiv(_AOT_MAX_SEQLEN, cfg.block_m), triton.cdiv(_AOT_MAX_SEQLEN, cfg.block_n)
    values["tiles_q"], values["tiles_k"] = (tq, tk) if blocks else (0, 0)
    values["window"] = _AOT_WINDOW if window else 0
    return values


def _aot_archs(D: int, dtype: torch.dtype) -> list[tuple[int, ...] | None]:
    """One spec for every arch when their tiles agree, else one per arch."""
    return [None] if _gpu_configs(D, dtype, 80) == _gpu_configs(D, dtype, 90) else [(80,), (90,)]


def aot_specs() -> list[AotSpec]:
    """The GPU path's kernels as the JIT specialises them (see ``_aot_values``): every head_dim in bf16, fp16 and
    fp32 at 64 and 128 (causal), non-causal at 128, block masks at 64 and 128 (causal) and 128 (non-causal), one
    MHA variant, and the sliding window (causal; 128, with block masks at 128) and logit softcap (with a window
    at 256: Gemma 2). Tiles depend on BLOCK_D and dtype size only, so this covers every tile configuration but fp32
    at head_dim > 128; the other (dtype, mask) combinations reuse listed tiles (compiling all would take long)."""
    if triton is None:
        return []
    specs = []
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    # (head_dim, dtype, causal, blocks, mha, window, softcap)
    variants = [(D, bf16, True, False, False, False, False) for D in (64, 80, 96, 128, 256)]
    variants += [(D, dt, True, False, False, False, False) for D in (64, 128) for dt in (fp16, fp32)]
    variants += [
        (128, bf16, False, False, False, False, False),
        (64, bf16, True, True, False, False, False),
        (128, bf16, True, True, False, False, False),
    ]
    variants += [(128, bf16, False, True, False, False, False), (128, bf16, True, False, True, False, False)]
    variants += [
        (128, bf16, True, False, False, True, False),
        (256, bf16, True, False, False, True, True),
        (128, bf16, True, True, False, True, False),
    ]
    for variant, archs in [(v, a) for v in variants for a in _aot_archs(v[0], v[1])]:
        D, dtype, causal, blocks, mha, window, softcap = variant
        ty, cfgs = _AOT_DTYPES[dtype], _gpu_configs(D, dtype, archs[0] if archs else 90)
        ptr = "*" + ty
        mode = ("causal" if causal else "full") + (" blocks" if blocks else "") + (" mha" if mha else "")
        mode += (" window" if window else "") + (" softcap" if softcap else "")
        consts = dict(
            CAUSAL=causal, HAS_BLOCKS=blocks, HAS_WINDOW=window, HAS_SOFTCAP=softcap, HEAD_DIM=D,
            BLOCK_D=triton.next_power_of_2(D),
        )  # fmt: skip
        for kernel, fn, ptrs, scalars, cfg in (
            ("attn_fwd", _attn_fwd_kernel, ["Q", "K", "V", "Out"], ["qk_scale", "softcap"], cfgs["fwd"]),
            ("attn_bwd_dkdv", _attn_bwd_dkdv_kernel, ["Q", "K", "V", "DO", "DK", "DV"],
             ["qk_scale", "sm_scale", "softcap"], cfgs["dkdv"]),
            ("attn_bwd_dq", _attn_bwd_dq_kernel, ["Q", "K", "V", "DO", "DQ"], ["qk_scale", "sm_scale", "softcap"],
             cfgs["dq"]),
        ):  # fmt: skip
            sig = {p: ptr for p in ptrs}
            sig.update({"LSE": "*fp32"} if kernel == "attn_fwd" else {"LSE": "*fp32", "DELTA": "*fp32"})
            sig.update({"CU": "*i32", "BLK": "*i32", "CNT": "*i32", "IDX": "*i32"})
            sig.update({s: "fp32" for s in scalars})
            values = _aot_values(kernel, D, cfg, blocks, mha, window)
            sig.update({a: "i32" for a in values})
            sig = {a: sig[a] for a in fn.arg_names if a in sig}  # the kernel's argument order
            cx = dict(consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PREC=_dot_prec(dtype))
            config = f"D={D} {ty} {mode} M={cfg.block_m} N={cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
            if kernel != "attn_fwd":
                cx["ACC_D"] = consts["BLOCK_D"] // cfg.d_split
                config += f" split{cfg.d_split}" if cfg.d_split > 1 else ""
            sig.update({c: "constexpr" for c in cx})
            specs.append(
                AotSpec(
                    kernel, fn, sig, cx, cfg.num_warps, cfg.num_stages, config, values=values, archs=archs
                )
            )
        if not causal or blocks or mha or window or softcap or (archs and archs[0] != 90):
            continue
        sig = {"Out": ptr, "DO": ptr, "DELTA": "*fp32", "stride_ot": "i32", "stride_oh": "i32"}
        sig.update({"stride_dt": "i32", "stride_dh": "i32", "total": "i32"})
        sig.update({"HEAD_DIM": "constexpr", "BLOCK_D": "constexpr", "BLOCK_T": "constexpr"})
        rows = _delta_rows(D)
        cx = dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_T=rows)
        values = dict(stride_ot=_AOT_HEADS[0] * D, stride_oh=D, stride_dt=_AOT_HEADS[0] * D, stride_dh=D)
        values["total"] = _AOT_TOTAL
        specs.append(
            AotSpec(
                "attn_bwd_delta",
                _attn_bwd_delta_kernel,
                sig,
                cx,
                4,
                1,
                f"D={D} {ty} T={rows} w4 s1",
                values=values,
            )
        )
    return specs
