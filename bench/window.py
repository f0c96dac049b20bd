"""Sliding-window cost on the PyTorch path: varlen_attention (CPU, the exact reference) forward + backward on one
example of a fixed length, for a range of windows.

    python bench/window.py [--length 4096] [--heads 8] [--kv-heads 8] [--head-dim 64] [--repeat 5] [--threads 1]

Each window is checked first against SDPA with the dense ``(L, L)`` sliding-window causal mask (output and the
three gradients; nothing is reported for a window that disagrees), warmed up, then timed ``--repeat`` rounds, the
windows in a rotated order each round (round r starts at the r-th window) so that drift on a shared machine
spreads over all of them. Reported per window: median, min and max seconds of forward + backward, the forward's
and the backward's medians, and the median against no window.

Model of the cost: without a window, SDPA's causal attention over the example touches L^2 / 2 scores; with a
window w < L the reference runs query chunks of c = min(w, 256) rows against the c + w - 1 keys they reach, all
chunks in one masked SDPA call, about (c + w) L scores (``scores_vs_causal``).

One thread by default: the windowed path runs many small ops, and on a shared, oversubscribed machine each of
them waits at an OpenMP barrier for a descheduled second thread, which times the machine's load, not the path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from ragkern.kernels.attention import varlen_attention, window_mask  # noqa: E402

WINDOWS = (None, 2048, 1024, 512, 256, 128)


def inputs(L: int, Hq: int, Hkv: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(L, H, D, generator=g) for H in (Hq, Hkv, Hkv))  # (L, H, D)
    do = torch.randn(L, Hq, D, generator=g)
    return q, k, v, do, torch.tensor([0, L], dtype=torch.int32)


def fwd_bwd(q, k, v, do, cu, window):
    """One forward + backward of varlen_attention; returns ((forward s, backward s), output, (dq, dk, dv))."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    t0 = time.perf_counter()
    out = varlen_attention(*leaves, cu, q.shape[0], causal=True, window=window, backend="torch")
    t1 = time.perf_counter()
    grads = torch.autograd.grad(out, leaves, do)
    return (t1 - t0, time.perf_counter() - t1), out.detach(), grads


def dense_reference(q, k, v, do, window):
    """SDPA over the whole example with the dense sliding-window causal mask: output and gradients."""
    L = q.shape[0]
    pos = torch.arange(L)
    mask = window_mask(pos, pos, window, causal=True)  # (L, L)
    leaves = [x.detach().clone().transpose(0, 1)[None].requires_grad_() for x in (q, k, v)]  # (1, H, L, D)
    out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    grads = torch.autograd.grad(out, leaves, do.transpose(0, 1)[None])
    return out[0].transpose(0, 1).detach(), [g[0].transpose(0, 1) for g in grads]


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    L = args.length
    q, k, v, do, cu = inputs(L, args.heads, args.kv_heads, args.head_dim)
    windows = [w for w in WINDOWS if w is None or w < L]

    errors = {}
    for w in windows:
        _, out, grads = fwd_bwd(q, k, v, do, cu, w)  # also the warm-up of this window
        ref_out, ref_grads = dense_reference(q, k, v, do, w)
        errors[w] = max(rel(a, b) for a, b in zip((out, *grads), (ref_out, *ref_grads)))
        if errors[w] > 1e-4:
            raise SystemExit(
                f"window {w}: varlen_attention disagrees with dense SDPA (rel err {errors[w]:.2e})"
            )

    times = {w: [] for w in windows}
    for r in range(args.repeat):
        for w in windows[r % len(windows) :] + windows[: r % len(windows)]:
            times[w].append(fwd_bwd(q, k, v, do, cu, w)[0])

    base = statistics.median(sum(t) for t in times[None])
    rows = {}
    for w in windows:
        t = [sum(pair) for pair in times[w]]
        med = statistics.median(t)
        scores = L * L / 2 if w is None else (min(w, 256) + w) * L
        rows["none" if w is None else str(w)] = {
            "median_s": round(med, 4),
            "min_s": round(min(t), 4),
            "max_s": round(max(t), 4),
            "forward_median_s": round(statistics.median(f for f, _ in times[w]), 4),
            "backward_median_s": round(statistics.median(b for _, b in times[w]), 4),
            "speedup_vs_no_window": round(base / med, 2),
            "scores_vs_causal": round(scores / (L * L / 2), 3),
            "max_rel_err_vs_dense_sdpa": errors[w],
        }
        print(
            f"window {str(w):>5}: median {med * 1e3:8.1f} ms  (min {min(t) * 1e3:7.1f}, max {max(t) * 1e3:7.1f})"
            f"  fwd {rows[str(w).lower()]['forward_median_s'] * 1e3:7.1f}  vs none {base / med:5.2f}x  scores {scores / (L * L / 2):5.2f} of causal  err {errors[w]:.1e}"
        )
    shape = dict(
        length=L, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype="float32",
        causal=True, timed="forward+backward", repeat=args.repeat, order="rotated per round",
        threads=torch.get_num_threads(), backend="torch (varlen_attention_reference)",
    )  # fmt: skip
    path = write_results("window_cpu", {"shape": shape, "windows": rows})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
