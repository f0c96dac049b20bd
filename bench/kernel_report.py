"""Kernel report: every Triton kernel configuration compiled ahead of time for sm_80 and sm_90 (no GPU needed).

Collects ``aot_specs()`` from each ``ragkern.kernels`` module that defines it (specialised as the JIT specialises
its integer arguments), prints registers, spilled stack and the spill instructions inside loops (those run per
iteration), shared memory, HGMMA count and shapes, pipelined async copies and wrapping 32-bit offsets per
(config, arch), and writes ``bench/results/kernel_report.json``::

    {"meta": {...}, "records": [{kernel, config, arch, registers, stack_bytes, spills_in_loops, shared_bytes, hgmma,
                                 hgmma_shapes, async_copies, int32_offsets}, ...],
     "attention_backward": {"rule": ..., "candidates": [{key, candidate, **record}, ...], "rule_choice": {key: name},
                            "chosen": [{arch, head_dim, candidate, dkdv, dq}, ...]}}

``attention_backward`` covers the fp16/bf16 attention backward: every candidate of ``_BWD_CANDIDATES`` (dK/dV and
dQ, bf16 causal at head_dim 64 / 128 / 256 on its arch), the candidate :func:`choose_backward`'s rule picks from
those records, and the (dK/dV, dQ) configuration each head_dim and arch runs (``_gpu_configs``).
``--backward-only`` recompiles that section alone and keeps the file's other records. ``--reuse`` keeps the file's
record of every configuration it already holds (same kernel, config text and arch) and compiles only the others:
for a change of launch configurations, not of kernel source (an edited kernel needs the full run).

    python bench/kernel_report.py [--jobs N] [--name kernel_report] [--backward-only | --reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, write_results  # noqa: E402

# Dynamic shared memory one block may use (as tests/kernels/test_aot.py): sm_80's configurations also run on
# sm_86/sm_89 (99 KB there); an H100/H200 allows 227 KB.
SHARED_LIMIT = {"sm_80": 99 * 1024, "sm_90": 227 * 1024}
BACKWARD_RULE = (
    "per (arch, head_dim bucket): 'flex' (FlexAttention's default backward tiles, warps and stages) when its dK/dV "
    "and dQ kernels (bf16, causal and causal with block masks, at the bucket's head_dim) all compile with no spill "
    "instruction inside their loops, within the shared memory of a block (sm_80 99 KB, sm_90 227 KB) and, on "
    "sm_90, only on wgmma at least 64 wide; else 'baseline' (the tiles before issue 23). bench/gpu/tune.py times "
    "every candidate on a GPU."
)


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


def _key_name(key: tuple[int, int]) -> str:
    return f"sm_{key[0]} D={key[1]}"


# The training path's masks a candidate must serve (where the report compiles them at the bucket's head_dim):
# plain causal and causal with passage block masks (RAG rows).
CANDIDATE_MODES = ("causal", "causal blocks")


def _candidate_specs(key: tuple[int, int], name: str, kernel: str) -> dict:
    """The AOT specs of one candidate's ``kernel`` ("attn_bwd_dkdv" | "attn_bwd_dq") per mode of
    ``CANDIDATE_MODES`` that ``aot_specs`` compiles in bf16 at the bucket's head_dim, built under the candidate's
    override: ``{mode: spec}``."""
    from ragkern.kernels import attention as attn

    arch, dim = key
    dkdv, dq = attn._BWD_CANDIDATES[key][name]
    with attn._bwd_configs(dkdv=dkdv, dq=dq):
        specs = attn.aot_specs()
    found = {}
    for mode in CANDIDATE_MODES:
        prefix = f"D={dim} bf16 {mode} M="
        hits = [
            sp
            for sp in specs
            if sp.kernel == kernel and sp.config.startswith(prefix) and (sp.archs is None or arch in sp.archs)
        ]
        if len(hits) > 1:
            raise RuntimeError(f"{len(hits)} specs for {kernel} {prefix} sm_{arch}, expected at most one")
        found.update({mode: hits[0]} if hits else {})
    if "causal" not in found:
        raise RuntimeError(f"no spec for {kernel} D={dim} bf16 causal sm_{arch}")
    return found


def _candidate_task(task: tuple[tuple[int, int], str, str, str]) -> dict:
    from ragkern.kernels._aot import compile_spec

    key, name, kernel, mode = task
    head = {"key": _key_name(key), "candidate": name}
    try:
        spec = _candidate_specs(key, name, kernel)[mode]
        return {**head, **compile_spec(spec, key[0])}
    except Exception as e:  # noqa: BLE001 - reported per candidate
        return {**head, "kernel": kernel, "arch": f"sm_{key[0]}", "error": f"{type(e).__name__}: {e}"[:2000]}


def _map(fn, tasks: list, jobs: int | None) -> list:
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(min(jobs, len(tasks))) as pool:
            return list(pool.map(fn, tasks))
    return [fn(t) for t in tasks]


def candidate_records(jobs: int | None = None, reuse: list[dict] | None = None) -> list[dict]:
    """Compile both backward kernels of every ``_BWD_CANDIDATES`` entry for its arch, in each mode of
    ``CANDIDATE_MODES`` (no GPU needed); ``reuse``: earlier records kept where their (key, candidate, kernel,
    config) is unchanged."""
    from ragkern.kernels import attention as attn

    tasks, configs = [], []
    for key, cands in attn._BWD_CANDIDATES.items():
        for name in cands:
            for kernel in ("attn_bwd_dkdv", "attn_bwd_dq"):
                for mode, spec in _candidate_specs(key, name, kernel).items():
                    tasks.append((key, name, kernel, mode))
                    configs.append((_key_name(key), name, kernel, spec.config))
    old = {(r["key"], r["candidate"], r["kernel"], r["config"]): r for r in reuse or [] if "error" not in r}
    fresh = iter(_map(_candidate_task, [t for t, c in zip(tasks, configs) if c not in old], jobs))
    return [old[c] if c in old else next(fresh) for c in configs]


def reused_records(old_records: list[dict], jobs: int | None = None) -> list[dict]:
    """Every ``aot_specs()`` record, taken from ``old_records`` where one has the same kernel, config and arch,
    compiled otherwise (``_aot``'s tasks: module, spec index, arch)."""
    import importlib

    from ragkern.kernels._aot import ARCHS, _compile_task, kernel_modules

    old = {(r["kernel"], r["config"], r["arch"]): r for r in old_records if "error" not in r}
    tasks, keys = [], []
    for name in kernel_modules():
        for i, spec in enumerate(importlib.import_module(name).aot_specs()):
            for arch in ARCHS:
                if spec.archs is None or arch in spec.archs:
                    tasks.append((name, i, arch))
                    keys.append((spec.kernel, spec.config, f"sm_{arch}"))
    todo = [t for t, k in zip(tasks, keys) if k not in old]
    print(f"reusing {len(tasks) - len(todo)} records, compiling {len(todo)}", flush=True)
    fresh = iter(_map(_compile_task, todo, jobs))
    return [old[k] if k in old else next(fresh) for k in keys]


def candidate_passes(records: list[dict]) -> bool:
    """The rule's test of one candidate from its records (dK/dV and dQ, each mode of ``CANDIDATE_MODES``)."""
    kernels = {r.get("kernel") for r in records}
    if kernels != {"attn_bwd_dkdv", "attn_bwd_dq"} or any("error" in r for r in records):
        return False
    for r in records:
        if r["spills_in_loops"] > 0 or r["shared_bytes"] > SHARED_LIMIT[r["arch"]]:
            return False
        if r["arch"] == "sm_90" and (
            not r["hgmma_shapes"] or any(int(s.split("x")[1]) < 64 for s in r["hgmma_shapes"])
        ):
            return False
    return True


def choose_backward(records: list[dict]) -> dict[str, str]:
    """``BACKWARD_RULE`` applied to the candidate records: ``{"sm_90 D=128": "flex", ...}``."""
    keys = sorted({r["key"] for r in records})
    choice = {}
    for key in keys:
        flex = [r for r in records if r["key"] == key and r["candidate"] == "flex"]
        choice[key] = "flex" if candidate_passes(flex) else "baseline"
    return choice


def _cfg_text(cfg) -> str:
    split = f" split{cfg.d_split}" if cfg.d_split > 1 else ""
    return f"M={cfg.block_m} N={cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{split}"


def chosen_backward() -> list[dict]:
    """What the fp16/bf16 backward runs per head_dim and arch (``_gpu_configs``) and which candidate that is."""
    import torch
    from ragkern.kernels import attention as attn

    rows = []
    for arch in (80, 90):
        for dim in (64, 80, 96, 128, 256):
            key = attn._bwd_key(dim, arch)
            cfgs = attn._gpu_configs(dim, torch.bfloat16, arch)
            rows.append({
                "arch": f"sm_{arch}", "head_dim": dim, "candidate": attn._BWD_CHOICE[key],
                "dkdv": _cfg_text(cfgs["dkdv"]), "dq": _cfg_text(cfgs["dq"]),
            })  # fmt: skip
    return rows


def backward_section(jobs: int | None = None, reuse: list[dict] | None = None) -> dict:
    records = candidate_records(jobs, reuse)
    return {
        "rule": BACKWARD_RULE,
        "candidates": records,
        "rule_choice": choose_backward(records),
        "chosen": chosen_backward(),
    }


def backward_table(section: dict) -> str:
    cols = (
        "key",
        "candidate",
        "kernel",
        "config",
        "registers",
        "stack_bytes",
        "spills_in_loops",
        "shared_bytes",
    )
    cols += ("hgmma_shapes",)
    rows = [cols] + [tuple(_cell(r, c) for c in cols) for r in section["candidates"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", "rule: " + section["rule"], "rule's choice: " + json.dumps(section["rule_choice"]), ""]
    lines += [
        f"{r['arch']} D={r['head_dim']:<3} {r['candidate']:<12} dK/dV {r['dkdv']:<26} dQ {r['dq']}"
        for r in section["chosen"]
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    p.add_argument(
        "--name",
        default="kernel_report",
        help="results file name (e.g. kernel_report_triton3.6 for another triton)",
    )
    p.add_argument(
        "--backward-only",
        action="store_true",
        help="recompile the attention backward candidates only; keep the file's other records",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the file's records of configurations it already holds; compile only new ones",
    )
    args = p.parse_args()
    from ragkern.kernels._aot import ARCHS, compile_modules, kernel_modules

    old = json.loads((RESULTS / f"{args.name}.json").read_text()) if args.backward_only or args.reuse else {}
    modules = kernel_modules()
    if args.backward_only:
        modules, records = old["modules"], old["records"]
    elif args.reuse:
        records = reused_records(old["records"], args.jobs)
        print(table(records))
    else:
        records = compile_modules(modules, ARCHS, strict=False, jobs=args.jobs)
        print(table(records))
    backward = backward_section(
        args.jobs, old.get("attention_backward", {}).get("candidates") if args.reuse else None
    )
    print("\n" + backward_table(backward))
    errors = [r["error"] for r in records if "error" in r]
    errors += [r["error"] for r in backward["candidates"] if "error" in r and r["candidate"] == "baseline"]
    for e in errors:
        print("ERROR", e)
    path = write_results(
        args.name,
        {
            "modules": modules,
            "archs": [f"sm_{a}" for a in ARCHS],
            "records": records,
            "attention_backward": backward,
        },
    )
    print(f"\n{len(records) + len(backward['candidates'])} compiles, {len(errors)} errors -> {path}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
