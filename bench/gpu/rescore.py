"""Add MFU against the datasheet peak to a GPU proof JSON written before bench.gpu recorded it.

    python -m bench.gpu.rescore bench/results/gpu/h200_quick.json [...]

Runs before this change divided model FLOPs by the 8192^3 matmul rate measured in the same run (the field
``mfu_vs_measured_matmul``, kept as recorded). This adds ``mfu`` = ``model_tflops_per_s`` / the card's datasheet
dense bf16 peak (``harness.DATASHEET_BF16_TFLOPS``) to every end-to-end way, the peak to ``ceilings``, and a
``rescored`` note; no measured field changes. The FLOPs each way executed were not recorded by those runs.
"""

from __future__ import annotations

import json
import sys

from .harness import datasheet_bf16_tflops


def rescore(record: dict) -> dict:
    device = record.get("environment", {}).get("device", {}).get("name", "")
    peak = datasheet_bf16_tflops(device)
    if peak is None:
        raise ValueError(f"no datasheet peak known for device {device!r}")
    record.setdefault("ceilings", {})["datasheet_bf16_TFLOPs"] = peak
    for case in record.get("parts", {}).get("e2e", {}).get("cases", {}).values():
        for way in ("ragkern", "hf"):
            r = case.get(way, {})
            if "model_tflops_per_s" in r:
                r["mfu"] = round(r["model_tflops_per_s"] / peak, 4)
    record["rescored"] = (
        f"mfu = model_tflops_per_s / {peak} (datasheet dense bf16 peak of the {device}), added by "
        "bench.gpu.rescore; mfu_vs_measured_matmul is the run's own figure, against its measured matmul rate"
    )
    return record


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        with open(path, "w") as f:
            json.dump(rescore(record), f, indent=1)
            f.write("\n")
        print(path, {n: {w: c[w].get("mfu") for w in ("ragkern", "hf") if w in c}
                     for n, c in record["parts"]["e2e"]["cases"].items()})  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
