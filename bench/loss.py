"""Loss forward + backward: fused linear + cross-entropy vs F.cross_entropy on materialised logits.

    python bench/loss.py [--repeat 2]

Each (method, shape) runs in a fresh subprocess so its peak resident memory is its own: the extra memory
is the process's peak RSS during forward + backward minus its RSS just before (inputs already allocated).
Both methods produce the same gradients (hidden, weight), so those count in both. Every token has a target
(the fused path's worst case: ignored tokens would cost it nothing). fp32 on CPU.

Target (issue 5): fused peak extra memory <= 1/8 of the baseline's, time <= 1.3x.
On CUDA the Triton path (and Liger-Kernel when installed) would be compared; here: not measured on GPU.

Issue 12 adds a model of the Triton kernels' global-memory traffic, atomics and grid size, forward +
backward, for the design before issue 12 (one program per 64 targets, fp32 atomics into grad_weight)
and the current one (token x vocab grids, no atomics), at Llama-3's V=128,256, D=4,096, bf16, for 1k and
16k targets. Bytes count every tile load and store the kernels issue (L2 hits included, so an upper
bound on DRAM traffic); each atomic also moves 8 bytes. "skip" is the fraction of backward tiles that
gradient filtering drops (data-dependent: 0 for a flat softmax, most tiles once the model is trained).

    python bench/loss.py --model-only     # the model alone, printed, nothing written

``--impls`` times the three ways the loss can run on a CPU, bf16, at a small shape (IMPL_SHAPE, a tenth of the
targets of a packed RAFT row): impl="chunked" on the torch backend (what impl="auto" runs on CPU), and under
``TRITON_INTERPRET=1`` impl="chunked" with its Triton row kernel and impl="triton"; printed, nothing written. It
decides impl="auto" on CPU (the Triton kernels exist there only as the interpreter).

    python bench/loss.py --impls --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import write_results  # noqa: E402

SHAPES = [dict(N=8192, H=512, V=32000), dict(N=4096, H=512, V=128256)]
METHODS = ("materialised", "fused_torch")
IMPL_SHAPE = dict(N=2048, H=256, V=32000, targets=205)
IMPLS = {  # method -> fused_linear_cross_entropy options
    "chunked_torch": dict(backend="torch", impl="chunked"),
    "chunked_triton_interpreted": dict(backend="triton", impl="chunked"),
    "triton_interpreted": dict(backend="triton", impl="triton"),
}


MODEL_SHAPES = [dict(N=1024, V=128256, D=4096), dict(N=16384, V=128256, D=4096)]
H100_SMS = 132


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _model_old(N: int, V: int, D: int, e: int) -> dict:
    """Before issue 12: forward grid N/64, each program loops over 128-wide vocab tiles; backward grid N/64
    with 64-wide vocab tiles, rewriting its fp32 grad_hidden rows per tile, atomically adding grad_weight."""
    tn, fwd_tv, bwd_tv = _cdiv(N, 64), _cdiv(V, 128), _cdiv(V, 64)
    fwd = tn * fwd_tv * (64 + 128) * D * e
    # per (64 tokens, 64 vocab) tile: logits (h + w), w again for dh, dh rows read + written (fp32), h again
    bwd = tn * bwd_tv * ((64 + 64 + 64 + 64) * D * e + 2 * 64 * D * 4)
    atomics = tn * bwd_tv * 64 * D + tn * bwd_tv * 64  # grad_weight + grad_bias
    grad_w = V * D * (4 + 4 + e)  # zero the fp32 buffer, read it, write the cast
    return dict(bytes=fwd + bwd + grad_w + 8 * atomics, atomics=atomics, programs=[tn, tn], gemms=4)


def _model_new(N: int, V: int, D: int, e: int, skip: float) -> dict:
    """This design: forward (tokens x vocab splits), dhidden (tokens x vocab splits), dweight (vocab tiles x
    token splits); a kept backward tile recomputes its logits, reloads the other operand and rewrites its
    fp32 partial; a skipped one only recomputes the logits."""
    from ragkern.kernels import cross_entropy as ce

    fwd_cfg, dh_cfg, dw_cfg = (
        ce._config(c, torch_dtype(e)) for c in (ce._FWD_CONFIG, ce._DH_CONFIG, ce._DW_CONFIG)
    )
    total, programs = 0.0, []
    bn, bv = fwd_cfg["BLOCK_N"], fwd_cfg["BLOCK_V"]
    splits, _ = ce._plan_splits(_cdiv(N, bn), _cdiv(V, bv), H100_SMS)
    total += _cdiv(N, bn) * _cdiv(V, bv) * (bn + bv) * D * e + 3 * splits * N * 4 * 2
    programs.append(_cdiv(N, bn) * splits)
    bn, bv = dh_cfg["BLOCK_N"], dh_cfg["BLOCK_V"]
    cap = max(1, ce._DH_PARTIAL_BYTES // (4 * N * D))
    splits, _ = ce._plan_splits(_cdiv(N, bn), _cdiv(V, bv), H100_SMS, cap)
    pairs = _cdiv(N, bn) * _cdiv(V, bv)
    total += pairs * ((bn + bv) * D * e + (1 - skip) * (bv * D * e + 2 * bn * D * 4))
    total += splits * N * D * 4 * 2 + N * D * (4 + e)  # zero the partials, sum them, write grad_hidden
    programs.append(_cdiv(N, bn) * splits)
    bn, bv = dw_cfg["BLOCK_N"], dw_cfg["BLOCK_V"]
    splits, _ = ce._plan_splits(_cdiv(V, bv), _cdiv(N, bn), H100_SMS)
    pairs = _cdiv(N, bn) * _cdiv(V, bv)
    total += pairs * ((bn + bv) * D * e + (1 - skip) * (bn * D * e + 2 * bv * D * 4))
    total += splits * V * D * (4 + 4) + V * D * e  # zero and read the partial(s), write the cast
    programs.append(_cdiv(V, bv) * splits)
    return dict(bytes=total, atomics=0, programs=programs, gemms=5)


def _model_chunked(N: int, V: int, D: int, e: int) -> dict:
    """Reference point, not ragkern code: Liger-Kernel's chunked design (logits of a chunk materialised by
    cuBLAS, a softmax-gradient kernel in place, then cuBLAS for grad_hidden and an addmm into an fp32
    grad_weight); chunk = next_pow2(N / cdiv(V, D)) rows; cuBLAS tiles assumed 128 x 256."""
    chunk = 1 << max(0, (_cdiv(N, _cdiv(V, D)) - 1).bit_length())
    gemm = N * V * D * e * (1 / 128 + 1 / 256)  # one GEMM's operand tile loads over all chunks
    total = 3 * gemm + N * V * e * 5 + N * D * e + _cdiv(N, chunk) * V * D * 4 * 2 + V * D * (4 + e)
    return dict(bytes=total, atomics=0, programs=None, gemms=3)


def torch_dtype(itemsize: int):
    import torch

    return {2: torch.bfloat16, 4: torch.float32}[itemsize]


def traffic_model() -> list[dict]:
    """Modelled bytes, atomics and programs per launch (forward, backward kernels) of each design, bf16."""
    rows = []
    for shape in MODEL_SHAPES:
        N, V, D = shape["N"], shape["V"], shape["D"]
        old = _model_old(N, V, D, 2)
        chunked = _model_chunked(N, V, D, 2)
        for skip in (0.0, 0.9):
            new = _model_new(N, V, D, 2, skip)
            rows.append(
                dict(
                    shape,
                    dtype="bfloat16",
                    skip=skip,
                    old=dict(
                        GB=round(old["bytes"] / 1e9, 1),
                        atomics_G=round(old["atomics"] / 1e9, 2),
                        programs=old["programs"],
                        gemm_passes=old["gemms"],
                    ),
                    new=dict(
                        GB=round(new["bytes"] / 1e9, 1),
                        atomics_G=0.0,
                        programs=new["programs"],
                        gemm_passes=new["gemms"],
                    ),
                    chunked_cublas_reference=dict(GB=round(chunked["bytes"] / 1e9, 1), gemm_passes=3),
                    bytes_ratio_new_over_old=round(new["bytes"] / old["bytes"], 3),
                    gemm_flops_T=round(2 * N * V * D / 1e12, 2),
                )
            )
    return rows


def print_model(rows: list[dict]) -> None:
    print(f"Triton kernels, modelled (not measured on GPU), bf16, {H100_SMS} SMs:")
    for r in rows:
        o, n = r["old"], r["new"]
        print(
            f"  N={r['N']} V={r['V']} D={r['D']} skip={r['skip']:.1f}: "
            f"old {o['GB']:.0f} GB, {o['atomics_G']:.1f} G atomics, programs {o['programs']}, "
            f"{o['gemm_passes']} x {r['gemm_flops_T']} TFLOP | "
            f"new {n['GB']:.0f} GB, 0 atomics, programs {n['programs']}, "
            f"{n['gemm_passes'] if r['skip'] == 0 else '3 + 2 x kept'} x {r['gemm_flops_T']} TFLOP | "
            f"bytes x{r['bytes_ratio_new_over_old']:.2f} | chunked cuBLAS (Liger-style) "
            f"{r['chunked_cublas_reference']['GB']:.0f} GB",
            flush=True,
        )


def chunked_dw_model(V: int = 128256, D: int = 4096, N: int = 16384, n: int = 1024, e: int = 2) -> dict:
    """Issue 23 item 5, modelled (not measured on GPU): bytes the chunked path moves for grad_weight (V, D) and
    grad_hidden (N, D) beyond the GEMMs' operand reads, forward + backward, for n target rows in one chunk and a
    weight of e bytes. Before: zero-fill an fp32 dW, the addmm's read-modify-write of it, an fp32 -> bf16 copy,
    backward's out-of-place scale of dW and dh. After: the GEMM writes dW once in the weight's dtype; backward
    scales nothing at an upstream gradient of 1, in place otherwise. Peak: (V, D) bytes alive at once."""
    vd, nd, rows = V * D, N * D, n * D
    dh = nd * e + rows * e  # zero-fill, index_copy of the target rows (unchanged)
    before = 4 * vd + 2 * 4 * vd + (4 + e) * vd + 2 * e * vd + dh + 2 * e * nd
    after = e * vd + dh
    return dict(V=V, D=D, N=N, targets=n, before_GB=before / 1e9, after_grad_1_GB=after / 1e9,
                after_scaled_GB=(after + 2 * e * (vd + nd)) / 1e9, peak_before_GiB=(4 + e) * vd / 2**30,
                peak_after_GiB=e * vd / 2**30)  # fmt: skip


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(method: str, N: int, H: int, V: int, repeat: int, threads: int | None = None) -> dict:
    if method in IMPLS:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    import torch.nn.functional as F
    from ragkern.kernels import fused_linear_cross_entropy

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if method in IMPLS else torch.float32
    hidden = torch.randn(N, H).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) / H**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,))
    if method in IMPLS:
        labels[torch.randperm(N)[: N - IMPL_SHAPE["targets"]]] = -100

    def step():
        if method == "materialised":
            loss = F.cross_entropy(hidden @ weight.T, labels)
        elif method in IMPLS:
            loss = fused_linear_cross_entropy(hidden, weight, labels, **IMPLS[method])
        else:
            loss = fused_linear_cross_entropy(hidden, weight, labels, backend="torch")
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    before = _rss_bytes()
    t0 = time.perf_counter()
    loss = step()  # first run: the memory measurement (ru_maxrss is this process's high-water mark)
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = [first]
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(peak_extra_mib=round((peak - before) / 2**20, 1), seconds=round(min(times), 3), loss=loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model-only", action="store_true", help="print the traffic model; measure nothing")
    ap.add_argument("--impls", action="store_true", help="time impl chunked / fused on CPU (see above)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "N", "H", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, *dims = args.child
        print(json.dumps(_child(method, *map(int, dims), args.repeat, args.threads)))
        return
    model = traffic_model()
    if args.model_only:
        print_model(model)
        c = chunked_dw_model()
        print(f"chunked dW / dh handling, one chunk of {c['targets']} targets, V={c['V']} D={c['D']} bf16, modelled: "
              f"{c['before_GB']:.2f} GB before, {c['after_grad_1_GB']:.2f} GB after (upstream 1; "
              f"{c['after_scaled_GB']:.2f} GB scaled); dW peak {c['peak_before_GiB']:.2f} -> "
              f"{c['peak_after_GiB']:.2f} GiB")  # fmt: skip
        return
    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.impls:
        print(f"bf16, {IMPL_SHAPE}, threads={args.threads or 'default'}, load {os.getloadavg()[0]:.1f}:")
        for method in IMPLS:
            cmd = [sys.executable, __file__, "--repeat", str(args.repeat), *threads, "--child", method]
            out = subprocess.run(
                cmd + [str(IMPL_SHAPE[k]) for k in "NHV"], capture_output=True, text=True, check=True
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {method}: {r['seconds']:.3f} s, peak extra {r['peak_extra_mib']:.0f} MiB", flush=True)
        return

    results = []
    for shape in SHAPES:
        row = dict(shape, dtype="float32", targets="all tokens")
        for method in METHODS:
            cmd = [sys.executable, __file__, "--repeat", str(args.repeat), *threads, "--child", method]
            out = subprocess.run(
                cmd + [str(shape[k]) for k in "NHV"], capture_output=True, text=True, check=True
            )
            row[method] = json.loads(out.stdout.strip().splitlines()[-1])
        base, fused = row["materialised"], row["fused_torch"]
        row["memory_ratio_fused_over_materialised"] = round(
            fused["peak_extra_mib"] / base["peak_extra_mib"], 4
        )
        row["time_ratio_fused_over_materialised"] = round(fused["seconds"] / base["seconds"], 3)
        row["triton"] = "not measured on GPU"
        results.append(row)
        print(
            f"N={shape['N']} H={shape['H']} V={shape['V']}: "
            f"materialised {base['peak_extra_mib']:.0f} MiB {base['seconds']:.2f} s | "
            f"fused (torch, chunked) {fused['peak_extra_mib']:.0f} MiB {fused['seconds']:.2f} s | "
            f"memory x{row['memory_ratio_fused_over_materialised']:.3f}, "
            f"time x{row['time_ratio_fused_over_materialised']:.2f} | triton: not measured on GPU",
            flush=True,
        )
    print_model(model)
    path = write_results(
        "loss", {"results": results, "target": "memory <= 1/8, time <= 1.3x", "triton_traffic_model": model}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
