"""Kernel report: every Triton kernel configuration compiled ahead of time for sm_80 and sm_90 (no GPU needed).

Collects ``aot_specs()`` from each ``ragkern.kernels`` module that defines it (specialised as the JIT specialises
its integer arguments), prints registers, spilled stack and the spill instructions inside loops (those run per
iteration), shared memory, HGMMA count and shapes, pipelined async copies and wrapping 32-bit offsets per
(config, arch), and writes ``bench/results/kernel_report.json``::

    {"meta": {...}, "records": [{kernel, config, arch, registers, stack_bytes, spills_in_loops, shared_bytes, hgmma,
                                 hgmma_shapes, async_copies, int32_offsets}, ...]}

    python bench/kernel_report.py [--jobs N] [--name kernel_report]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402


def _cell(r: dict, c: str) -> str:
    if c == "hgmma_shapes":
        return " ".join(f"{s}:{n}" for s, n in r.get(c, {}).items())
    if c == "int32_offsets":
        return str(len(r.get(c, [])))
    return str(r.get(c, "ERROR" if c == "registers" else ""))


def table(records: list[dict]) -> str:
    cols = ("kernel", "config", "arch", "registers", "stack_bytes", "spills_in_loops", "shared_bytes")
    cols += ("hgmma", "hgmma_shapes", "async_copies", "int32_offsets")
    rows = [cols] + [tuple(_cell(r, c) for c in cols) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    p.add_argument(
        "--name",
        default="kernel_report",
        help="results file name (e.g. kernel_report_triton3.6 for another triton)",
    )
    args = p.parse_args()
    from ragkern.kernels._aot import ARCHS, compile_modules, kernel_modules

    modules = kernel_modules()
    records = compile_modules(modules, ARCHS, strict=False, jobs=args.jobs)
    print(table(records))
    errors = [r["error"] for r in records if "error" in r]
    for e in errors:
        print("ERROR", e)
    path = write_results(
        args.name, {"modules": modules, "archs": [f"sm_{a}" for a in ARCHS], "records": records}
    )
    print(f"\n{len(records)} compiles, {len(errors)} errors -> {path}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
