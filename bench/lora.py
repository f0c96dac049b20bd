"""LoRA linear forward + backward: ragkern's fused path vs peft's LoRA layer.

    python bench/lora.py [--tokens 2048] [--repeat 5]

A 4096 x 4096 nn.Linear (frozen, no bias) with a rank-16 adapter (alpha 32, no dropout), fp32 on CPU; x
requires grad, so each step computes y and the gradients of x, A and B. Both methods run interleaved in one
process and the minimum step time of each is reported, with the ratio fused / peft (target: <= 1).
On CUDA the Triton path would be compared too; here: not measured on GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from ragkern.kernels import lora_linear

sys.path.insert(0, os.path.dirname(__file__))
from _common import write_results  # noqa: E402


def _layer(K: int, N: int, r: int):
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(K, N, bias=False))
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0)
    layer = get_peft_model(base, cfg).base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    T, K, r = args.tokens, args.features, args.rank

    torch.manual_seed(0)
    layer = _layer(K, K, r)
    w = layer.base_layer.weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    x = torch.randn(T, K, requires_grad=True)
    g = torch.randn(T, K)

    def peft_step():
        layer(x).backward(g)

    def fused_step():
        lora_linear(x, w, a, b, s, backend="torch").backward(g)

    # same results first: a benchmark of a wrong op means nothing
    grads = {}
    for name, step in (("peft", peft_step), ("fused", fused_step)):
        step()
        grads[name] = [t.grad.clone() for t in (x, a, b)]
        x.grad = a.grad = b.grad = None
    for gp, gf in zip(grads["peft"], grads["fused"]):
        torch.testing.assert_close(gf, gp, atol=1e-3, rtol=1e-3)

    times = {"peft": [], "fused": []}
    for _ in range(args.repeat):
        for name, step in (("peft", peft_step), ("fused", fused_step)):
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            x.grad = a.grad = b.grad = None
    best = {k: min(v) for k, v in times.items()}
    ratio = best["fused"] / best["peft"]
    print(
        f"T={T} in=out={K} r={r} fp32 CPU ({torch.get_num_threads()} threads), forward+backward: "
        f"peft {best['peft'] * 1e3:.0f} ms | fused (torch) {best['fused'] * 1e3:.0f} ms | "
        f"ratio fused/peft {ratio:.3f} | triton vs peft: not measured on GPU",
        flush=True,
    )
    path = write_results(
        "lora",
        {
            "shape": dict(tokens=T, in_features=K, out_features=K, rank=r, dtype="float32", bias=False),
            "threads": torch.get_num_threads(),
            "repeat": args.repeat,
            "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "best_seconds": {k: round(v, 4) for k, v in best.items()},
            "time_ratio_fused_over_peft": round(ratio, 4),
            "triton": "not measured on GPU",
            "target": "fused / peft <= 1",
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
