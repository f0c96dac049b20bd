"""Loss forward + backward: fused linear + cross-entropy vs F.cross_entropy on materialised logits.

    python bench/loss.py [--repeat 2]

Each (method, shape) runs in a fresh subprocess so its peak resident memory is its own: the extra memory
is the process's peak RSS during forward + backward minus its RSS just before (inputs already allocated).
Both methods produce the same gradients (hidden, weight), so those count in both. Every token has a target
(the fused path's worst case: ignored tokens would cost it nothing). fp32 on CPU.

Target (issue 5): fused peak extra memory <= 1/8 of the baseline's, time <= 1.3x.
On CUDA the Triton path (and Liger-Kernel when installed) would be compared; here: not measured on GPU.
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(method: str, N: int, H: int, V: int, repeat: int) -> dict:
    import torch
    import torch.nn.functional as F
    from ragkern.kernels import fused_linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(N, H).requires_grad_()
    weight = (torch.randn(V, H) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,))

    def step():
        if method == "materialised":
            loss = F.cross_entropy(hidden @ weight.T, labels)
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
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "N", "H", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, *dims = args.child
        print(json.dumps(_child(method, *map(int, dims), args.repeat)))
        return

    results = []
    for shape in SHAPES:
        row = dict(shape, dtype="float32", targets="all tokens")
        for method in METHODS:
            cmd = [sys.executable, __file__, "--repeat", str(args.repeat), "--child", method]
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
    path = write_results("loss", {"results": results, "target": "memory <= 1/8, time <= 1.3x"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
