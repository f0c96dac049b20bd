"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T`` without materialising the logits.

For every token i with a target (``labels[i] != ignore_index``)::

    z      = hidden[i] @ weight.T + bias                 (V,)   fp32, one block of tokens/vocab at a time
    s      = softcap * tanh(z / softcap)                        if softcap else z
    lse    = log(sum_j exp(s_j))
    ce     = lse - (1 - eps) * s[y] - eps / V * sum_j s_j        eps = label_smoothing (as F.cross_entropy)
    loss_i = weights[i] * (ce + z_loss * lse ** 2)

Ignored tokens are dropped before any matmul, so they cost nothing forward or backward.
``reduction="mean"`` divides the weighted sum by the number of non-ignored tokens (0 when there are none).

Two paths, each an ``autograd.Function``:
- torch (CPU, and the reference for large cases): tokens in chunks of ``_CHUNK_ELEMS // V`` rows, so the
  largest temporary is a few ``(chunk, V)`` fp32 blocks. The gradients are computed in the forward pass,
  chunk by chunk (the logits are built once); a backward whose per-token ``grad_output`` is not uniform
  (``reduction="none"`` followed by anything but a scaled sum) recomputes them with the right row scales.
- triton (CUDA): the forward kernel multiplies a block of tokens against vocab tiles with an online
  log-sum-exp in fp32, gathering the target logit on the way; the backward kernel recomputes each tile and
  accumulates grad_hidden (owned rows) and grad_weight / grad_bias (fp32 atomics). No N x V buffer.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

_BACKENDS = ("auto", "torch", "triton")
_REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ELEMS = 1 << 22  # torch path: rows per chunk = this // V (16 MiB of fp32 logits)
# Tiles chosen from the sm_80 / sm_90 AOT resource report: no spills with bias and softcap on, and a
# 64-row M dimension so Hopper can use wgmma (HGMMA).
_FWD_CONFIG = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=2)
_BWD_CONFIG = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2)

# --------------------------------------------------------------------------------------------- triton

if triton is not None:

    @triton.jit
    def _tanh(x):
        # 2 * sigmoid(2x) - 1: exact limits at +-inf, no libdevice needed
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _logits_tile(
        H, W, B, hrow, rmask, cols, cmask, D, softcap,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """(BLOCK_N, BLOCK_V) fp32 logits after bias and softcap, and tanh(z / softcap) for the backward."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            h = tl.load(H + hrow[:, None] + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            w = tl.load(W + cols[:, None] * D + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        t = acc
        if HAS_SOFTCAP:
            t = _tanh(acc / softcap)
            acc = softcap * t
        return acc, t

    @triton.jit
    def _flce_fwd_kernel(
        H, W, B, Y, ROWS, WTS, LOSS, LSE, ZTERM,
        n_rows, V, D, softcap, smoothing, z_coef,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = offs < n_rows
        row = tl.load(ROWS + offs, mask=rmask, other=0).to(tl.int64)  # only tokens with a target
        y = tl.load(Y + row, mask=rmask, other=0)
        hrow = row * D
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            s, t = _logits_tile(
                H,
                W,
                B,
                hrow,
                rmask,
                cols,
                cmask,
                D,
                softcap,
                HAS_BIAS,
                HAS_SOFTCAP,
                DOT_PRECISION,
                BLOCK_N,
                BLOCK_V,
                BLOCK_D,
            )
            s_sum += tl.sum(tl.where(cmask[None, :], s, 0.0), axis=1)
            s_y += tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
            s = tl.where(cmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            sumexp = sumexp * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(sumexp)
        wt = tl.load(WTS + row, mask=rmask, other=0.0).to(tl.float32)
        zterm = z_coef * lse * lse
        ce = lse - (1.0 - smoothing) * s_y - smoothing / V * s_sum
        tl.store(LOSS + row, wt * (ce + zterm), mask=rmask)
        tl.store(ZTERM + row, wt * zterm, mask=rmask)
        tl.store(LSE + row, lse, mask=rmask)

    # need_*: runtime flags (one compiled kernel) so a frozen lm_head costs no grad_weight matmul or buffer
    @triton.jit(do_not_specialize=["need_dh", "need_dw", "need_db"])
    def _flce_bwd_kernel(
        H, W, B, Y, ROWS, SCALE, LSE, GH, GW, GB,
        n_rows, V, D, softcap, smoothing, z_coef, need_dh, need_dw, need_db,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = offs < n_rows
        row = tl.load(ROWS + offs, mask=rmask, other=0).to(tl.int64)
        y = tl.load(Y + row, mask=rmask, other=0)
        hrow = row * D
        scale = tl.load(SCALE + row, mask=rmask, other=0.0)  # grad_output * weight, fp32
        lse = tl.load(LSE + row, mask=rmask, other=0.0)
        p_coef = scale * (1.0 + 2.0 * z_coef * lse)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            s, t = _logits_tile(
                H,
                W,
                B,
                hrow,
                rmask,
                cols,
                cmask,
                D,
                softcap,
                HAS_BIAS,
                HAS_SOFTCAP,
                DOT_PRECISION,
                BLOCK_N,
                BLOCK_V,
                BLOCK_D,
            )
            # d loss / d s = scale * ((1 + 2 z lse) p - (1 - eps) [j == y] - eps / V)
            ds = p_coef[:, None] * tl.exp(s - lse[:, None])
            hit = tl.where(cols[None, :] == y[:, None], 1.0 - smoothing, 0.0)
            ds -= scale[:, None] * (hit + smoothing / V)
            if HAS_SOFTCAP:
                ds *= 1.0 - t * t
            ds = tl.where(rmask[:, None] & cmask[None, :], ds, 0.0)
            if HAS_BIAS:
                if need_db:
                    tl.atomic_add(GB + cols, tl.sum(ds, axis=0), mask=cmask)
            ds_in = ds.to(H.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                dmask = dd < D
                hmask = rmask[:, None] & dmask[None, :]
                wmask = cmask[:, None] & dmask[None, :]
                if need_dh:  # rows are owned by this program: plain read-add-write
                    w = tl.load(W + cols[:, None] * D + dd[None, :], mask=wmask, other=0.0)
                    gh = tl.load(GH + hrow[:, None] + dd[None, :], mask=hmask, other=0.0)
                    tl.store(
                        GH + hrow[:, None] + dd[None, :],
                        tl.dot(ds_in, w, gh, input_precision=DOT_PRECISION),
                        mask=hmask,
                    )
                if need_dw:  # vocab rows are shared by every program
                    h = tl.load(H + hrow[:, None] + dd[None, :], mask=hmask, other=0.0)
                    tl.atomic_add(
                        GW + cols[:, None] * D + dd[None, :],
                        tl.dot(tl.trans(ds_in), h, input_precision=DOT_PRECISION),
                        mask=wmask,
                    )


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch.matmul: TF32 only where torch allows it (``set_float32_matmul_precision``
    "high"/"medium", i.e. ``torch.backends.cuda.matmul.allow_tf32``); unused for fp16/bf16."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch_args(hidden, weight, bias, labels, rows, softcap, smoothing, z_loss, config):
    n_rows, (V, D) = rows.numel(), weight.shape
    grid = (triton.cdiv(n_rows, config["BLOCK_N"]),)
    dummy = bias if bias is not None else hidden  # never read when HAS_BIAS is False
    common = (n_rows, V, D, float(softcap or 0.0), float(smoothing), float(z_loss))
    meta = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **config)
    meta["DOT_PRECISION"] = _dot_precision(hidden.dtype)
    return grid, (hidden, weight, dummy, labels, rows), common, meta


def _triton_forward(hidden, weight, bias, labels, rows, weights, softcap, smoothing, z_loss):
    """Per-token loss, z-term and lse, each ``(N,)`` fp32 (0 for ignored tokens)."""
    N = hidden.shape[0]
    loss, lse, zterm = (torch.zeros(N, device=hidden.device, dtype=torch.float32) for _ in range(3))
    if rows.numel():
        grid, ptrs, common, meta = _launch_args(
            hidden, weight, bias, labels, rows, softcap, smoothing, z_loss, _FWD_CONFIG
        )
        _flce_fwd_kernel[grid](*ptrs, weights, loss, lse, zterm, *common, **meta)
    return loss, lse, zterm


def _triton_backward(hidden, weight, bias, labels, rows, scale, lse, softcap, smoothing, z_loss, need):
    """Gradients for per-token losses scaled by ``scale`` ``(N,)``: (grad_hidden, grad_weight, grad_bias),
    None where ``need`` = (hidden, weight, bias) says no."""
    f32 = dict(device=hidden.device, dtype=torch.float32)
    bufs = [torch.zeros(x.shape, **f32) if n else None for x, n in zip((hidden, weight, bias), need)]
    if rows.numel() and any(need):
        grid, ptrs, common, meta = _launch_args(
            hidden, weight, bias, labels, rows, softcap, smoothing, z_loss, _BWD_CONFIG
        )
        dummy = next(b for b in bufs if b is not None)  # never written when its flag is 0
        gh, gw, gb = (dummy if b is None else b for b in bufs)
        _flce_bwd_kernel[grid](*ptrs, scale, lse, gh, gw, gb, *common, *map(int, need), **meta)
    return tuple(None if b is None else b.to(x.dtype) for b, x in zip(bufs, (hidden, weight, bias)))


# ---------------------------------------------------------------------------------------------- torch


def _torch_chunks(hidden, weight, bias, labels, rows, weights, scale, softcap, smoothing, z_loss, need):
    """The chunked path: per-token loss and z-term ``(N,)``, and the gradients of ``sum_i scale[i] * loss_i``
    (``scale`` defaults to 1) for the inputs flagged in ``need`` = (hidden, weight, bias); None for others."""
    N, (V, D) = hidden.shape[0], weight.shape
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = torch.zeros(N, device=hidden.device, dtype=acc_dtype)
    zterm = torch.zeros_like(loss)
    gh = torch.zeros(N, D, device=hidden.device, dtype=acc_dtype) if need[0] else None
    gw = torch.zeros(V, D, device=weight.device, dtype=acc_dtype) if need[1] else None  # frozen lm_head: skip
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
        row_scale = wt if scale is None else wt * scale[idx].to(acc_dtype)
        ds = z.sub_(lse[:, None]).exp_().mul_((row_scale * (1.0 + 2.0 * z_loss * lse))[:, None])
        ds.scatter_add_(1, y[:, None], (-(1.0 - smoothing) * row_scale)[:, None])
        if smoothing:
            ds -= (smoothing / V * row_scale)[:, None]
        if softcap is not None:
            ds.mul_(1.0 - t * t)
        if gh is not None:
            gh[idx] = (ds.to(hidden.dtype) @ weight).to(acc_dtype)
        if gw is not None:
            gw.addmm_(ds.T, h.to(acc_dtype))
        if gb is not None:
            gb += ds.sum(0)
    grads = tuple(None if g is None else g.to(x.dtype) for g, x in zip((gh, gw, gb), (hidden, weight, bias)))
    return loss.float(), zterm.float(), grads


# ------------------------------------------------------------------------------------------- autograd


def _reduce(per_token, reduction, count):
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total / max(count, 1) if reduction == "mean" else total


class _ChunkedFLCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, rows, weights, softcap, smoothing, z_loss, reduction, need
    ):
        # need: which of (hidden, weight, bias) get gradients (none under no_grad: inference costs one matmul)
        opts = (softcap, smoothing, z_loss, need)
        loss, zterm, grads = _torch_chunks(hidden, weight, bias, labels, rows, weights, None, *opts)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, weights, *grads)
        ctx.cfg = (opts, reduction, rows.numel())
        return _reduce(loss, reduction, rows.numel()), _reduce(zterm, reduction, rows.numel())

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        hidden, weight, bias, labels, rows, weights, gh, gw, gb = ctx.saved_tensors
        opts, reduction, count = ctx.cfg
        if reduction == "mean":
            grad_loss = grad_loss / max(count, 1)
        if reduction == "none":
            g = grad_loss[rows]
            if g.numel() and not bool((g == g[0]).all()):  # per-token scales: recompute with them
                grads = _torch_chunks(hidden, weight, bias, labels, rows, weights, grad_loss, *opts)[2]
                return *grads, *([None] * 8)
            grad_loss = g[0] if g.numel() else grad_loss.new_zeros(())
        grads = [None if x is None else x * grad_loss.to(x.dtype) for x in (gh, gw, gb)]
        return *grads, *([None] * 8)


class _TritonFLCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, weights, softcap, smoothing, z_loss, reduction):
        loss, lse, zterm = _triton_forward(
            hidden, weight, bias, labels, rows, weights, softcap, smoothing, z_loss
        )
        ctx.save_for_backward(hidden, weight, bias, labels, rows, weights, lse)
        ctx.cfg = (softcap, smoothing, z_loss, reduction, rows.numel())
        return _reduce(loss, reduction, rows.numel()), _reduce(zterm, reduction, rows.numel())

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        hidden, weight, bias, labels, rows, weights, lse = ctx.saved_tensors
        softcap, smoothing, z_loss, reduction, count = ctx.cfg
        if reduction == "mean":
            grad_loss = grad_loss / max(count, 1)
        scale = (weights.float() * grad_loss.float()).contiguous()  # (N,): grad_loss broadcasts when scalar
        need = tuple(ctx.needs_input_grad[:3])
        grads = _triton_backward(
            hidden, weight, bias, labels, rows, scale, lse, softcap, smoothing, z_loss, need
        )
        return *grads, *([None] * 7)


# --------------------------------------------------------------------------------------------- public


def _check(hidden, weight, labels, bias, weights, reduction, softcap, label_smoothing, z_loss, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}")
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
    if hidden.dtype != weight.dtype or hidden.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    ):
        raise ValueError(
            f"hidden and weight must share one of fp16/bf16/fp32/fp64; got {hidden.dtype}, {weight.dtype}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (V={weight.shape[0]},); got shape {tuple(bias.shape)}")
    if bias is not None and bias.dtype != weight.dtype:
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
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` without the ``(N, V)`` logits.

    Args:
        hidden: ``(N, H)`` final hidden states (flatten batch and time), fp16/bf16/fp32 (fp64: torch only).
        weight: ``(V, H)`` lm_head weight, same dtype as ``hidden``.
        labels: ``(N,)`` int64/int32 targets; ``ignore_index`` marks tokens without a target.
        bias: optional ``(V,)`` lm_head bias.
        reduction: ``"mean"`` (weighted sum over the number of non-ignored tokens; 0 if there are none),
            ``"sum"``, or ``"none"`` (``(N,)`` fp32, 0 at ignored tokens).
        softcap: Gemma-style logit soft-capping ``softcap * tanh(logits / softcap)``.
        label_smoothing: as ``F.cross_entropy``'s (uniform over the V classes).
        z_loss: coefficient of ``lse ** 2`` added to each token's loss (PaLM's z-loss).
        weights: optional ``(N,)`` per-token loss weights (not differentiated).
        backend: ``"torch"`` (chunked), ``"triton"`` or ``"auto"`` (triton on CUDA, torch elsewhere).
        return_z_loss: also return the z-loss part of the loss (same reduction, detached) for logging.

    Returns:
        The loss (including the z-loss term), or ``(loss, z_term)`` when ``return_z_loss``. Differentiable
        with respect to ``hidden``, ``weight`` and ``bias``.
    """
    _check(hidden, weight, labels, bias, weights, reduction, softcap, label_smoothing, z_loss, backend)
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and triton is not None else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs the triton package; use backend='torch'")
        if hidden.dtype == torch.float64:
            raise ValueError("backend='triton' takes fp16/bf16/fp32 hidden and weight; got float64")
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    if weights is None:
        weights = torch.ones(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    valid = labels != ignore_index
    _check_targets(labels, valid, weight.shape[0], ignore_index)
    rows = valid.nonzero().squeeze(1)  # (n_targets,) int64: ignored tokens cost nothing
    labels = labels.long()
    opts = (softcap, float(label_smoothing), float(z_loss), reduction)
    if backend == "triton":
        loss, zterm = _TritonFLCE.apply(
            hidden, weight, bias, labels, rows.to(torch.int32), weights.float().contiguous(), *opts
        )
    else:
        need = tuple(
            torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias)
        )
        loss, zterm = _ChunkedFLCE.apply(hidden, weight, bias, labels, rows, weights, *opts, need)
    return (loss, zterm.detach()) if return_z_loss else loss


# ------------------------------------------------------------------------------------------------ AOT


def aot_specs() -> list:
    """Every Triton configuration this module launches (for ``ragkern.kernels._aot`` and the kernel report)."""
    from ._aot import AotSpec

    scalars = dict(n_rows="i32", V="i32", D="i32", softcap="fp32", smoothing="fp32", z_coef="fp32")
    specs = []
    for name, fn, outs, flags, config in (
        ("flce_fwd", _flce_fwd_kernel, ("WTS", "LOSS", "LSE", "ZTERM"), (), _FWD_CONFIG),
        (
            "flce_bwd",
            _flce_bwd_kernel,
            ("SCALE", "LSE", "GH", "GW", "GB"),
            ("need_dh", "need_dw", "need_db"),
            _BWD_CONFIG,
        ),
    ):
        blocks = {k: v for k, v in config.items() if k.startswith("BLOCK_")}
        for dtype in ("fp16", "bf16", "fp32"):
            for has_bias in (False, True):
                for has_softcap in (False, True):
                    ptr = "*" + dtype
                    signature = dict(H=ptr, W=ptr, B=ptr, Y="*i64", ROWS="*i32", **{o: "*fp32" for o in outs})
                    signature.update(scalars, **{f: "i32" for f in flags})
                    constexprs = dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, **blocks)
                    constexprs["DOT_PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
                    signature.update({k: "constexpr" for k in constexprs})
                    tile = " ".join(f"{k[6:]}={v}" for k, v in blocks.items())
                    specs.append(
                        AotSpec(
                            kernel=name,
                            fn=fn,
                            signature=signature,
                            constexprs=constexprs,
                            num_warps=config["num_warps"],
                            num_stages=config["num_stages"],
                            config=f"{dtype} bias={int(has_bias)} softcap={int(has_softcap)} {tile} "
                            f"w{config['num_warps']} s{config['num_stages']}",
                        )
                    )
    return specs
