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
alone), while question and answer tokens (block 0) see everything earlier in their example.

The plain PyTorch reference below is also the CPU path: it runs attention example by example, so its cost
grows with the sum of squared example lengths, never with the squared row length, and an example's output
is computed from its own tokens only (bit-for-bit independent of its neighbours).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._aot import AotSpec

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

_BACKENDS = ("auto", "torch", "triton")
_TRITON_MAX_HEAD_DIM = 256  # head_dim: a multiple of 8 up to this (padded to a power of 2 in the tiles)
_LOG2E = 1.4426950408889634

# --------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _block_summary(BLK, rows, rmask):
        """Block ids of some rows: (ids, any id 0, min id, max id) over the rows inside the example."""
        b = tl.load(BLK + rows, mask=rmask, other=0)
        has_global = tl.max(tl.where(rmask & (b == 0), 1, 0), axis=0) > 0
        bmin = tl.min(tl.where(rmask, b, 2147483647), axis=0)
        bmax = tl.max(tl.where(rmask, b, -2147483647), axis=0)
        return b, has_global, bmin, bmax

    @triton.jit
    def _visible(bq, bk, offs_m, offs_n, L, CAUSAL_MASK: tl.constexpr, HAS_BLOCKS: tl.constexpr):
        """(BLOCK_M, BLOCK_N) mask: key offs_n inside the example, not after the query, same passage."""
        ok = (offs_n < L)[None, :]
        if CAUSAL_MASK:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        if HAS_BLOCKS:
            ok = ok & ((bq[:, None] == 0) | (bq[:, None] == bk[None, :]))
        return ok

    @triton.jit
    def _fwd_tile(
        acc, l_i, m_i, q, Kb, Vb, offs_m, offs_n, bq, bk, L, stride_kt, stride_vt, qk_scale,
        CAUSAL_MASK: tl.constexpr, HAS_BLOCKS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        offs_d = tl.arange(0, BLOCK_D)
        kvmask = (offs_n < L)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(Kb + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(_visible(bq, bk, offs_m, offs_n, L, CAUSAL_MASK, HAS_BLOCKS), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # m_i starts finite, so never -inf - -inf
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(Vb + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        return acc, l_i, m_new

    @triton.jit
    def _fwd_loop(
        acc, l_i, m_i, q, Kb, Vb, BLKb, offs_m, bq, q_global, qmin, qmax, lo, hi, L, stride_kt, stride_vt, qk_scale,
        CAUSAL_MASK: tl.constexpr, HAS_BLOCKS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            if HAS_BLOCKS:
                bk, _, kmin, kmax = _block_summary(BLKb, offs_n, offs_n < L)
                if q_global | ((kmin <= qmax) & (kmax >= qmin)):  # else the block mask empties this tile
                    acc, l_i, m_i = _fwd_tile(
                        acc, l_i, m_i, q, Kb, Vb, offs_m, offs_n, bq, bk, L, stride_kt, stride_vt, qk_scale,
                        CAUSAL_MASK, HAS_BLOCKS, HEAD_DIM, BLOCK_D, DOT_PREC,
                    )  # fmt: skip
            else:
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, Kb, Vb, offs_m, offs_n, bq, offs_n, L, stride_kt, stride_vt, qk_scale,
                    CAUSAL_MASK, HAS_BLOCKS, HEAD_DIM, BLOCK_D, DOT_PREC,
                )  # fmt: skip
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, Out, LSE, CU, BLK, qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        total, group,
        CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        """One (query block, example, query head): O = softmax(Q K^T) V online; LSE in log2 units."""
        seq = tl.program_id(1)
        h = tl.program_id(2)
        start = tl.load(CU + seq)
        L = tl.load(CU + seq + 1) - start
        m0 = tl.program_id(0) * BLOCK_M
        if m0 >= L:
            return
        start = start.to(tl.int64)
        kvh = h // group
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < L
        qmask = mmask[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows = start + offs_m
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
        Kb = K + start * stride_kt + kvh * stride_kh
        Vb = V + start * stride_vt + kvh * stride_vh
        BLKb = BLK + start
        if HAS_BLOCKS:
            bq, q_global, qmin, qmax = _block_summary(BLKb, offs_m, mmask)
        else:
            bq, q_global, qmin, qmax = offs_m, True, 0, 0
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        if CAUSAL:
            # key blocks wholly below the diagonal need no causal mask; blocks after the query block are skipped
            acc, l_i, m_i = _fwd_loop(
                acc, l_i, m_i, q, Kb, Vb, BLKb, offs_m, bq, q_global, qmin, qmax, 0, m0, L,
                stride_kt, stride_vt, qk_scale, False, HAS_BLOCKS, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
            )  # fmt: skip
            acc, l_i, m_i = _fwd_loop(
                acc, l_i, m_i, q, Kb, Vb, BLKb, offs_m, bq, q_global, qmin, qmax, m0, tl.minimum(m0 + BLOCK_M, L), L,
                stride_kt, stride_vt, qk_scale, True, HAS_BLOCKS, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
            )  # fmt: skip
        else:
            acc, l_i, m_i = _fwd_loop(
                acc, l_i, m_i, q, Kb, Vb, BLKb, offs_m, bq, q_global, qmin, qmax, 0, L, L,
                stride_kt, stride_vt, qk_scale, False, HAS_BLOCKS, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
            )  # fmt: skip
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # rows past the example end only
        o = acc / l_safe[:, None]
        tl.store(
            Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            o.to(Out.dtype.element_ty),
            mask=qmask,
        )
        tl.store(LSE + h * total + rows, m_i + tl.math.log2(l_safe), mask=mmask)

    @triton.jit
    def _attn_bwd_delta_kernel(
        Out, DO, DELTA, stride_ot, stride_oh, stride_dt, stride_dh, total,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        """DELTA[h, t] = sum_d O[t, h, d] * dO[t, h, d] in fp32."""
        h = tl.program_id(1)
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
        dk, dv, k, v, Qb, DOb, LSEb, DELTAb, offs_m, offs_n, bq, bk, L, stride_qt, stride_dt, qk_scale,
        CAUSAL_MASK: tl.constexpr, HAS_BLOCKS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < L
        qmask = mmask[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(Qb + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DOb + offs_m[:, None] * stride_dt + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSEb + offs_m, mask=mmask, other=0.0)
        delta = tl.load(DELTAb + offs_m, mask=mmask, other=0.0)
        # transposed tiles (BLOCK_N, BLOCK_M): keys along the MMA's M dimension
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        okT = tl.trans(_visible(bq, bk, offs_m, offs_n, L, CAUSAL_MASK, HAS_BLOCKS)) & mmask[None, :]
        pT = tl.where(okT, tl.math.exp2(sT - lse[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
        return dk, dv

    @triton.jit
    def _bwd_kv_loop(
        dk, dv, k, v, Qb, DOb, LSEb, DELTAb, BLKb, offs_n, bk, k_global, kmin, kmax, lo, hi, L,
        stride_qt, stride_dt, qk_scale,
        CAUSAL_MASK: tl.constexpr, HAS_BLOCKS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            if HAS_BLOCKS:
                bq, q_global, qmin, qmax = _block_summary(BLKb, offs_m, offs_m < L)
                if q_global | ((kmin <= qmax) & (kmax >= qmin)):
                    dk, dv = _bwd_kv_tile(
                        dk, dv, k, v, Qb, DOb, LSEb, DELTAb, offs_m, offs_n, bq, bk, L, stride_qt, stride_dt,
                        qk_scale, CAUSAL_MASK, HAS_BLOCKS, HEAD_DIM, BLOCK_D, DOT_PREC,
                    )  # fmt: skip
            else:
                dk, dv = _bwd_kv_tile(
                    dk, dv, k, v, Qb, DOb, LSEb, DELTAb, offs_m, offs_n, offs_m, bk, L, stride_qt, stride_dt,
                    qk_scale, CAUSAL_MASK, HAS_BLOCKS, HEAD_DIM, BLOCK_D, DOT_PREC,
                )  # fmt: skip
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, CU, BLK, qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        total, group,
        CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        """One (key block, example, kv head): dK, dV summed over the kv head's query heads (no atomics)."""
        seq = tl.program_id(1)
        kvh = tl.program_id(2)
        start = tl.load(CU + seq)
        L = tl.load(CU + seq + 1) - start
        n0 = tl.program_id(0) * BLOCK_N
        if n0 >= L:
            return
        start = start.to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        nmask = offs_n < L
        kmask = nmask[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows = start + offs_n
        k = tl.load(K + rows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=kmask, other=0.0)
        BLKb = BLK + start
        if HAS_BLOCKS:
            bk, k_global, kmin, kmax = _block_summary(BLKb, offs_n, nmask)
        else:
            bk, k_global, kmin, kmax = offs_n, True, 0, 0
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for g in range(group):
            h = kvh * group + g
            Qb = Q + start * stride_qt + h * stride_qh
            DOb = DO + start * stride_dt + h * stride_dh
            LSEb = LSE + h * total + start
            DELTAb = DELTA + h * total + start
            if CAUSAL:
                # queries in the key block's rows need the causal mask; later queries see the whole block
                dk, dv = _bwd_kv_loop(
                    dk, dv, k, v, Qb, DOb, LSEb, DELTAb, BLKb, offs_n, bk, k_global, kmin, kmax,
                    n0, tl.minimum(n0 + BLOCK_N, L), L, stride_qt, stride_dt, qk_scale,
                    True, HAS_BLOCKS, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC,
                )  # fmt: skip
                dk, dv = _bwd_kv_loop(
                    dk, dv, k, v, Qb, DOb, LSEb, DELTAb, BLKb, offs_n, bk, k_global, kmin, kmax,
                    n0 + BLOCK_N, L, L, stride_qt, stride_dt, qk_scale,
                    False, HAS_BLOCKS, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC,
                )  # fmt: skip
            else:
                dk, dv = _bwd_kv_loop(
                    dk, dv, k, v, Qb, DOb, LSEb, DELTAb, BLKb, offs_n, bk, k_global, kmin, kmax,
                    0, L, L, stride_qt, stride_dt, qk_scale,
                    False, HAS_BLOCKS, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC,
                )  # fmt: skip
        dk = dk * sm_scale
        tl.store(
            DK + rows[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :],
            dk.to(DK.dtype.element_ty),
            mask=kmask,
        )
        tl.store(
            DV + rows[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :],
            dv.to(DV.dtype.element_ty),
            mask=kmask,
        )

    @triton.jit
    def _bwd_q_tile(
        dq, q, do, lse, delta, Kb, Vb, offs_m, offs_n, bq, bk, L, stride_kt, stride_vt, qk_scale,
        CAUSAL_MASK: tl.constexpr, HAS_BLOCKS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        offs_d = tl.arange(0, BLOCK_D)
        kvmask = (offs_n < L)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(Kb + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kvmask, other=0.0)
        v = tl.load(Vb + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        ok = _visible(bq, bk, offs_m, offs_n, L, CAUSAL_MASK, HAS_BLOCKS)
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        return dq

    @triton.jit
    def _bwd_q_loop(
        dq, q, do, lse, delta, Kb, Vb, BLKb, offs_m, bq, q_global, qmin, qmax, lo, hi, L,
        stride_kt, stride_vt, qk_scale,
        CAUSAL_MASK: tl.constexpr, HAS_BLOCKS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            if HAS_BLOCKS:
                bk, _, kmin, kmax = _block_summary(BLKb, offs_n, offs_n < L)
                if q_global | ((kmin <= qmax) & (kmax >= qmin)):
                    dq = _bwd_q_tile(
                        dq, q, do, lse, delta, Kb, Vb, offs_m, offs_n, bq, bk, L, stride_kt, stride_vt, qk_scale,
                        CAUSAL_MASK, HAS_BLOCKS, HEAD_DIM, BLOCK_D, DOT_PREC,
                    )  # fmt: skip
            else:
                dq = _bwd_q_tile(
                    dq, q, do, lse, delta, Kb, Vb, offs_m, offs_n, bq, offs_n, L, stride_kt, stride_vt, qk_scale,
                    CAUSAL_MASK, HAS_BLOCKS, HEAD_DIM, BLOCK_D, DOT_PREC,
                )  # fmt: skip
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, CU, BLK, qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh,
        stride_dqt, stride_dqh,
        total, group,
        CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        """One (query block, example, query head): dQ over the key blocks the forward visited."""
        seq = tl.program_id(1)
        h = tl.program_id(2)
        start = tl.load(CU + seq)
        L = tl.load(CU + seq + 1) - start
        m0 = tl.program_id(0) * BLOCK_M
        if m0 >= L:
            return
        start = start.to(tl.int64)
        kvh = h // group
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < L
        qmask = mmask[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows = start + offs_m
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dt + h * stride_dh + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + h * total + rows, mask=mmask, other=0.0)
        delta = tl.load(DELTA + h * total + rows, mask=mmask, other=0.0)
        Kb = K + start * stride_kt + kvh * stride_kh
        Vb = V + start * stride_vt + kvh * stride_vh
        BLKb = BLK + start
        if HAS_BLOCKS:
            bq, q_global, qmin, qmax = _block_summary(BLKb, offs_m, mmask)
        else:
            bq, q_global, qmin, qmax = offs_m, True, 0, 0
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if CAUSAL:
            dq = _bwd_q_loop(
                dq, q, do, lse, delta, Kb, Vb, BLKb, offs_m, bq, q_global, qmin, qmax, 0, m0, L,
                stride_kt, stride_vt, qk_scale, False, HAS_BLOCKS, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
            )  # fmt: skip
            dq = _bwd_q_loop(
                dq, q, do, lse, delta, Kb, Vb, BLKb, offs_m, bq, q_global, qmin, qmax, m0, tl.minimum(m0 + BLOCK_M, L), L,
                stride_kt, stride_vt, qk_scale, True, HAS_BLOCKS, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
            )  # fmt: skip
        else:
            dq = _bwd_q_loop(
                dq, q, do, lse, delta, Kb, Vb, BLKb, offs_m, bq, q_global, qmin, qmax, 0, L, L,
                stride_kt, stride_vt, qk_scale, False, HAS_BLOCKS, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC,
            )  # fmt: skip
        dq = dq * sm_scale
        tl.store(
            DQ + rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=qmask,
        )


@dataclass(frozen=True)
class _Config:
    """Tile sizes of one kernel. BLOCK_M % BLOCK_N == 0 (forward, dQ) and BLOCK_N % BLOCK_M == 0 (dK/dV) so
    the causal diagonal starts on a tile boundary."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Interpreter (CPU tensors): small tiles so tiny test inputs still span several blocks.
_INTERPRET_CONFIG = _Config(16, 16, 4, 1)


def _gpu_configs(head_dim: int, dtype: torch.dtype) -> dict[str, _Config]:
    """Tiles for (forward, dkdv, dq) on sm_80/sm_90, chosen from the AOT kernel report (no spills, HGMMA)."""
    if head_dim <= 64:
        fwd, dkdv, dq = _Config(128, 64, 8, 3), _Config(32, 64, 8, 2), _Config(64, 32, 4, 2)
    elif head_dim <= 128:  # dK/dV with 16 queries per step: 32 spilled 16 B on sm_90 (176 B with block masks)
        fwd, dkdv, dq = _Config(64, 32, 4, 2), _Config(16, 64, 8, 2), _Config(64, 32, 4, 2)
    else:  # dK/dV at 256 has no HGMMA: 64 keys per tile (wgmma's minimum M) spill heavily
        fwd, dkdv, dq = _Config(64, 32, 8, 2), _Config(16, 32, 4, 1), _Config(64, 16, 8, 1)
    if dtype == torch.float32:  # fp32: twice the bytes per tile, no HGMMA; 8 warps keep D=128 free of spills
        half = lambda c: _Config(max(16, c.block_m // 2), max(16, c.block_n // 2), 8, 1)  # tl.dot needs >= 16
        fwd, dkdv, dq = half(fwd), half(dkdv), half(dq)
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq}


def _triton_ready(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError(
            "backend='triton' needs the triton package (pip install triton); use backend='torch'"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {device}); use backend='torch', or set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels in the interpreter"
        )


def _configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, _Config]:
    if device.type != "cuda":
        return {"fwd": _INTERPRET_CONFIG, "dkdv": _INTERPRET_CONFIG, "dq": _INTERPRET_CONFIG}
    return _gpu_configs(head_dim, dtype)


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


def _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale, block_ids):
    total, Hq, D = q.shape
    cfg = _configs(D, q.dtype, q.device)["fwd"]
    o = torch.empty_like(q)
    lse = torch.empty((Hq, total), dtype=torch.float32, device=q.device)  # log2 units
    n = cu_seqlens.numel() - 1
    grid = (triton.cdiv(max(max_seqlen, 1), cfg.block_m), n, Hq)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens, block_ids if block_ids is not None else cu_seqlens, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        total, Hq // k.shape[1],
        CAUSAL=causal, HAS_BLOCKS=block_ids is not None, HEAD_DIM=D, BLOCK_D=_block_d(D),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PREC=_dot_prec(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return o, lse


def _backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, causal, scale, block_ids):
    total, Hq, D = q.shape
    Hkv = k.shape[1]
    cfgs = _configs(D, q.dtype, q.device)
    n = cu_seqlens.numel() - 1
    blk = block_ids if block_ids is not None else cu_seqlens
    common = dict(CAUSAL=causal, HAS_BLOCKS=block_ids is not None, HEAD_DIM=D, BLOCK_D=_block_d(D))
    delta = torch.empty((Hq, total), dtype=torch.float32, device=q.device)
    rows = _delta_rows(D)
    _attn_bwd_delta_kernel[(triton.cdiv(total, rows), Hq)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), total,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_T=rows,
    )  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = cfgs["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(max(max_seqlen, 1), cfg.block_n), n, Hkv)](
        q, k, v, do, dk, dv, lse, delta, cu_seqlens, blk, scale * _LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), total, Hq // Hkv,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PREC=_dot_prec(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )  # fmt: skip
    cfg = cfgs["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(max(max_seqlen, 1), cfg.block_m), n, Hq)](
        q, k, v, do, dq, lse, delta, cu_seqlens, blk, scale * _LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), total, Hq // Hkv,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PREC=_dot_prec(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )  # fmt: skip
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale, block_ids):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        o, lse = _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale, block_ids)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, block_ids)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens, block_ids = ctx.saved_tensors
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
        )
        return dq, dk, dv, None, None, None, None, None


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    block_ids: torch.Tensor | None,
    backend: str,
) -> None:
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
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must start at 0 and end at total={q.shape[0]}; got {cu[0]}..{cu[-1]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest example ({max(lengths)})")
    if block_ids is not None:
        if block_ids.shape != (q.shape[0],) or block_ids.dtype != torch.int32:
            raise ValueError(
                f"block_ids must be int32 of shape ({q.shape[0]},); got {block_ids.dtype} {tuple(block_ids.shape)}"
            )
        if block_ids.device != q.device:
            raise ValueError(f"block_ids is on {block_ids.device}, q on {q.device}")


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


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention example by example (the CPU path). Returns ``(total, Hq, D)`` in q's dtype.

    No checking here: :func:`varlen_attention` validates. Differentiable through autograd.
    """
    total, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qi = q[start:end].transpose(0, 1).unsqueeze(0)  # (1, Hq, L, D)
        ki = k[start:end].transpose(0, 1).unsqueeze(0)  # (1, Hkv, L, D)
        vi = v[start:end].transpose(0, 1).unsqueeze(0)
        mask = None
        if block_ids is not None:
            mask = block_mask(block_ids[start:end], causal)
        oi = F.scaled_dot_product_attention(
            qi,
            ki,
            vi,
            attn_mask=mask,
            is_causal=causal and mask is None,
            scale=scale,
            enable_gqa=Hq != Hkv,
        )
        outs.append(oi.squeeze(0).transpose(0, 1))  # (L, Hq, D)
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
    backend: str = "auto",
) -> torch.Tensor:
    """Packed attention over examples delimited by ``cu_seqlens``; differentiable.

    Args:
        q: ``(total, Hq, D)`` queries.
        k, v: ``(total, Hkv, D)`` keys and values, ``Hq % Hkv == 0``.
        cu_seqlens: ``(n + 1,)`` int32 offsets of the examples, starting at 0 and ending at ``total``.
        max_seqlen: length of the longest example.
        causal: mask keys after the query.
        softmax_scale: defaults to ``D ** -0.5``.
        block_ids: optional ``(total,)`` int32 passage ids (see the module docstring).
        backend: ``"torch"`` (the exact per-example reference), ``"triton"`` or ``"auto"``
            (Triton on CUDA, torch elsewhere).

    Returns:
        ``(total, Hq, D)`` in the dtype of ``q``.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, block_ids, backend)
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton is not None else "torch"
    if backend == "triton":
        _triton_ready(q.device)
        D = q.shape[2]
        if D % 8 or not 16 <= D <= _TRITON_MAX_HEAD_DIM:
            raise ValueError(
                f"head_dim={D} is not supported by the Triton kernel (a multiple of 8 in 16..{_TRITON_MAX_HEAD_DIM},"
                " e.g. 64, 80, 96, 128, 256); use backend='torch'"
            )
        scale = softmax_scale if softmax_scale is not None else q.shape[2] ** -0.5
        return _VarlenAttention.apply(
            q, k, v, cu_seqlens, int(max_seqlen), bool(causal), float(scale), block_ids
        )
    return varlen_attention_reference(
        q, k, v, cu_seqlens, causal=causal, softmax_scale=softmax_scale, block_ids=block_ids
    )


_AOT_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_specs() -> list[AotSpec]:
    """The GPU path's kernels: every head_dim in bf16, fp16 and fp32 at 64 and 128 (causal), and the non-causal and
    block-mask variants at 128 bf16. Tiles depend on BLOCK_D and dtype size only, so this covers every tile
    configuration but fp32 at head_dim > 128; the other (dtype, mask) combinations reuse listed tiles (compiling
    all of them would take many minutes)."""
    if triton is None:
        return []
    specs = []
    variants = [(D, torch.bfloat16, True, False) for D in (64, 80, 96, 128, 256)]
    variants += [(D, dt, True, False) for D in (64, 128) for dt in (torch.float16, torch.float32)]
    variants += [(128, torch.bfloat16, False, False), (128, torch.bfloat16, True, True)]
    for D, dtype, causal, blocks in variants:
        ty, cfgs = _AOT_DTYPES[dtype], _gpu_configs(D, dtype)
        ptr = "*" + ty
        mode = ("causal" if causal else "full") + (" blocks" if blocks else "")
        consts = dict(CAUSAL=causal, HAS_BLOCKS=blocks, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D))
        strides = lambda *names: {f"stride_{n}{s}": "i32" for n in names for s in "th"}
        for kernel, fn, ptrs, scalars, names, cfg in (
            ("attn_fwd", _attn_fwd_kernel, ["Q", "K", "V", "Out"], ["qk_scale"], "qkvo", cfgs["fwd"]),
            ("attn_bwd_dkdv", _attn_bwd_dkdv_kernel, ["Q", "K", "V", "DO", "DK", "DV"], ["qk_scale", "sm_scale"],
             ["q", "k", "v", "d", "dk", "dv"], cfgs["dkdv"]),
            ("attn_bwd_dq", _attn_bwd_dq_kernel, ["Q", "K", "V", "DO", "DQ"], ["qk_scale", "sm_scale"],
             ["q", "k", "v", "d", "dq"], cfgs["dq"]),
        ):  # fmt: skip
            sig = {p: ptr for p in ptrs}
            sig.update({"LSE": "*fp32"} if kernel == "attn_fwd" else {"LSE": "*fp32", "DELTA": "*fp32"})
            sig.update({"CU": "*i32", "BLK": "*i32"})
            sig.update({s: "fp32" for s in scalars})
            sig.update(strides(*names))
            sig.update({"total": "i32", "group": "i32"})
            sig = {a: sig[a] for a in fn.arg_names if a in sig}  # the kernel's argument order
            sig.update({c: "constexpr" for c in (*consts, "BLOCK_M", "BLOCK_N", "DOT_PREC")})
            cx = dict(consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PREC=_dot_prec(dtype))
            config = f"D={D} {ty} {mode} M={cfg.block_m} N={cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
            aligned = tuple(a for a, t in sig.items() if t.startswith("*") or a.startswith("stride_"))
            specs.append(AotSpec(kernel, fn, sig, cx, cfg.num_warps, cfg.num_stages, config, aligned))
        if not causal or blocks:
            continue
        sig = {"Out": ptr, "DO": ptr, "DELTA": "*fp32", "stride_ot": "i32", "stride_oh": "i32"}
        sig.update({"stride_dt": "i32", "stride_dh": "i32", "total": "i32"})
        sig.update({"HEAD_DIM": "constexpr", "BLOCK_D": "constexpr", "BLOCK_T": "constexpr"})
        rows = _delta_rows(D)
        cx = dict(HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_T=rows)
        specs.append(
            AotSpec("attn_bwd_delta", _attn_bwd_delta_kernel, sig, cx, 4, 1, f"D={D} {ty} T={rows} w4 s1")
        )
    return specs
