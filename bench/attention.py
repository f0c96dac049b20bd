"""Packed attention forward + backward: the exact per-example path vs SDPA with a dense block-diagonal mask.

    python bench/attention.py [--repeat 3] [--heads 4] [--kv-heads 2] [--head-dim 64]

CPU (measured here): one packed row of 8 examples x 512 tokens (4096), fp32, causal. The per-example path
(``varlen_attention(backend="torch")``, the CPU path of the "ragkern" attention) costs sum(L_i^2); SDPA on
the whole row with a (4096, 4096) block-diagonal causal mask costs 4096^2 and materialises the mask. Both
give the same output (checked); the ratio is measured in the same run. The block-mask case (each example:
question, 3 passages, answer) is timed the same way.

CUDA: ragkern Triton vs flash-attn varlen vs SDPA (dense mask) in bf16; here: not measured on GPU.
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
from ragkern.kernels import varlen_attention  # noqa: E402
from ragkern.kernels.attention import block_mask  # noqa: E402

N_EXAMPLES, EXAMPLE_LEN = 8, 512


def packed_inputs(Hq, Hkv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = N_EXAMPLES * EXAMPLE_LEN
    q, k, v = (torch.randn(T, H, D, generator=g).to(device, dtype) for H in (Hq, Hkv, Hkv))
    do = torch.randn(T, Hq, D, generator=g).to(device, dtype)
    cu = torch.arange(0, T + 1, EXAMPLE_LEN, dtype=torch.int32, device=device)
    # per example: question (32), three passages (128 each), answer (96)
    one = torch.tensor([0] * 32 + [1] * 128 + [2] * 128 + [3] * 128 + [0] * 96, dtype=torch.int32)
    return q, k, v, do, cu, one.repeat(N_EXAMPLES).to(device)


def dense_mask(cu, block_ids, device):
    """(T, T) bool: same example, causal, and the passage rule when block_ids is given."""
    T = int(cu[-1])
    mask = torch.zeros(T, T, dtype=torch.bool, device=device)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        ids = (
            block_ids[a:b] if block_ids is not None else torch.zeros(b - a, dtype=torch.int32, device=device)
        )
        mask[a:b, a:b] = block_mask(ids, causal=True)
    return mask


def sdpa_dense(q, k, v, mask):
    """SDPA on the whole packed row; (T, H, D) -> (1, H, T, D) and back."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip
    return out[0].transpose(0, 1)


def time_fwd_bwd(fn, q, k, v, do, repeat, sync=lambda: None):
    """Median seconds of forward + backward; returns (seconds, output, grads) of the last run."""
    times = []
    for _ in range(repeat + 1):  # first run warms up
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        sync()
        t0 = time.perf_counter()
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, do)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), out.detach(), grads


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cpu_compare(args) -> dict:
    q, k, v, do, cu, blocks = packed_inputs(args.heads, args.kv_heads, args.head_dim, torch.float32, "cpu")
    results = {}
    for case, block_ids in (("causal", None), ("causal+blocks", blocks)):
        mask = dense_mask(cu, block_ids, "cpu")
        t_var, o_var, g_var = time_fwd_bwd(
            lambda q, k, v, b=block_ids: varlen_attention(q, k, v, cu, EXAMPLE_LEN, block_ids=b, backend="torch"),
            q, k, v, do, args.repeat,
        )  # fmt: skip
        t_sdpa, o_sdpa, g_sdpa = time_fwd_bwd(
            lambda q, k, v, m=mask: sdpa_dense(q, k, v, m), q, k, v, do, args.repeat
        )
        err = max(rel(a, b) for a, b in zip((o_var, *g_var), (o_sdpa, *g_sdpa)))
        if err > 1e-4:
            raise SystemExit(
                f"{case}: per-example and dense SDPA disagree (rel err {err:.2e}); no ratio reported"
            )
        results[case] = {
            "per_example_s": round(t_var, 4),
            "sdpa_dense_mask_s": round(t_sdpa, 4),
            "speedup_per_example_vs_sdpa": round(t_sdpa / t_var, 2),
            "max_rel_err": err,
        }
        print(
            f"CPU {case:14s} fwd+bwd  per-example {t_var * 1e3:8.1f} ms   SDPA dense mask {t_sdpa * 1e3:8.1f} ms"
            f"   ratio {t_sdpa / t_var:5.2f}x   (max rel err {err:.1e})"
        )
    return results


def gpu_compare(args) -> dict:
    """ragkern Triton vs flash-attn varlen vs SDPA (dense mask), bf16, causal, no block mask."""
    if not torch.cuda.is_available():
        print("GPU: ragkern triton vs flash-attn varlen vs SDPA: not measured on GPU (no CUDA device)")
        return {"status": "not measured on GPU"}
    q, k, v, do, cu, _ = packed_inputs(args.heads, args.kv_heads, args.head_dim, torch.bfloat16, "cuda")
    mask = dense_mask(cu, None, "cuda")
    fns = {
        "ragkern_triton": lambda q, k, v: varlen_attention(q, k, v, cu, EXAMPLE_LEN, backend="triton"),
        "sdpa_dense_mask": lambda q, k, v: sdpa_dense(q, k, v, mask),
    }
    try:
        from flash_attn import flash_attn_varlen_func

        fns["flash_attn_varlen"] = lambda q, k, v: flash_attn_varlen_func(
            q, k, v, cu, cu, EXAMPLE_LEN, EXAMPLE_LEN, causal=True
        )
    except ImportError:
        print("GPU: flash-attn not installed; skipped")
    out = {}
    for name, fn in fns.items():
        t, _, _ = time_fwd_bwd(fn, q, k, v, do, args.repeat, sync=torch.cuda.synchronize)
        out[f"{name}_s"] = t
        print(f"GPU {name:18s} fwd+bwd {t * 1e3:8.2f} ms")
    out["device"] = torch.cuda.get_device_name(0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    shape = dict(
        examples=N_EXAMPLES, example_len=EXAMPLE_LEN, row=N_EXAMPLES * EXAMPLE_LEN,
        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, repeat=args.repeat,
        threads=torch.get_num_threads(),
    )  # fmt: skip
    cpu = cpu_compare(args)
    gpu = gpu_compare(args)
    path = write_results("attention", {"shape": shape, "cpu_fp32": cpu, "gpu": gpu})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
