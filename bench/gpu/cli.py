"""``python -m bench.gpu --output DIR [--quick] [--dry-run]``: see the package docstring."""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from . import bootstrap

START = time.perf_counter()
PARTS = ("correctness", "attention", "tune", "flce", "lora", "e2e", "real")
# Seconds per part. A part stops starting cases when its budget is spent, and a case still running past it
# (plus a grace of a quarter of the budget, at most 30 s) is interrupted; LIMIT caps the whole run. The e2e case
# also watches its share itself: repeats and longest-row probes that would not fit are recorded as skipped.
BUDGETS = {
    "quick": {"warmup": 40, "correctness": 45, "attention": 45, "tune": 25, "flce": 30, "lora": 15, "e2e": 190,
              "real": 45},
    "full": {"warmup": 60, "correctness": 80, "attention": 90, "tune": 40, "flce": 50, "lora": 25, "e2e": 150,
             "real": 45},
    "dry-run": {"warmup": 60, "correctness": 150, "attention": 60, "tune": 60, "flce": 40, "lora": 40, "e2e": 420,
                "real": 150},
}  # fmt: skip
# Seconds before the first part that the budgets do not cover: the wheels' install, imports, the environment and
# the two ceilings (an H100: about 20 s).
OVERHEAD_S = {"quick": 30, "full": 30, "dry-run": 60}
LIMIT = {"quick": 465, "full": 570, "dry-run": 1100}
CASE_OVERRUN_S = 5  # a case may run this long past the deadline before its alarm stops it (harness.Part.case)
DEVICE_MINUTES_QUICK = 8  # the quick run's promise: at most 8 device minutes, warm-up and ceilings included
FAMILY = {"attention": "attention ", "flce": "flce ", "lora": "lora "}  # micro part -> its correctness cases
JSON_NAME, TABLE_NAME = "gpu_bench.json", "table.txt"


def source_digest(root: Path | None = None) -> str:
    """sha256 over the Python sources that run (ragkern/, kernels/, bench/), path and content, in path order:
    on a machine without git it names the code a run measured; the same call on a checkout here tells whether
    that checkout is the code that ran."""
    root = root or Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for path in sorted(p for d in ("ragkern", "kernels", "bench") for p in (root / d).rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description="ragkern's GPU proof in one command.")
    p.add_argument("--output", required=True, type=Path, help="folder for gpu_bench.json and table.txt")
    p.add_argument("--quick", action="store_true", help="the short run (under 6 minutes on an H100)")
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny shapes (CI)")
    p.add_argument(
        "--wheels", type=Path, default=None, help=f"wheels to install first (default {bootstrap.WHEELS})"
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--no-warmup", action="store_true", help="skip the parallel compile warm-up")
    p.add_argument(
        "--time-limit", type=float, default=None, help="seconds for the whole run (default by mode)"
    )
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    if not set(parts) <= set(PARTS):
        p.error(f"--parts takes names from {PARTS}; got {parts}")
    args.parts = [x for x in PARTS if x in parts]
    return args


def _versions() -> dict:
    names = ("torch", "triton", "transformers", "peft", "accelerate", "numpy", "safetensors", "tokenizers",
             "liger-kernel", "cut-cross-entropy", "flash-attn", "datasets", "pytest-benchmark")  # fmt: skip
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def _environment(ctx) -> dict:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "versions": _versions(), "torch_cuda": torch.version.cuda,
           "triton_interpret": os.environ.get("TRITON_INTERPRET")}  # fmt: skip
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        env["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                         "memory_bytes": p.total_memory, "l2_bytes": getattr(p, "L2_cache_size", None)}  # fmt: skip
        query = (
            "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
        )
        try:
            smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)  # fmt: skip
            env["nvidia_smi"] = dict(zip(query.split(","), (x.strip() for x in smi.stdout.split(","))))
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = {"error": repr(e)}
    else:
        env["device"] = {"name": "cpu (dry run)"}
    try:
        from torch.nn.attention import varlen

        env["torch_varlen_attn"] = hasattr(varlen, "varlen_attn")
    except ImportError:
        env["torch_varlen_attn"] = False
    return env


def part_budgets(mode: str, parts=PARTS, warmup: bool = True) -> dict[str, int]:
    """Each chosen part's budget: BUDGETS, scaled up when the chosen parts leave time under LIMIT (``--parts e2e``
    gets the whole run's time, less the start-up and the warm-up); never scaled down."""
    budgets = {p: BUDGETS[mode][p] for p in parts}
    room = LIMIT[mode] - OVERHEAD_S[mode] - (BUDGETS[mode]["warmup"] if warmup else 0)
    factor = max(1.0, room / max(sum(budgets.values()), 1))
    return {p: int(b * factor) for p, b in budgets.items()}


def planned_seconds(mode: str, parts=PARTS, warmup: bool = True) -> dict:
    """What the plan allows, from BUDGETS / OVERHEAD_S / LIMIT: each part's budget, the total (overhead, warm-up
    and parts), and the most the run can last (LIMIT plus a case's overrun past the deadline)."""
    budgets = part_budgets(mode, parts, warmup)
    total = OVERHEAD_S[mode] + (BUDGETS[mode]["warmup"] if warmup else 0) + sum(budgets.values())
    return {"parts": budgets, "warmup": BUDGETS[mode]["warmup"] if warmup else 0, "overhead": OVERHEAD_S[mode],
            "total": total, "limit": LIMIT[mode], "at_most": LIMIT[mode] + CASE_OVERRUN_S}  # fmt: skip


def _plan_lines(mode: str, parts, warmup: bool, plans: dict | None = None) -> list[str]:
    p = planned_seconds(mode, parts, warmup)
    lines = [f"plan ({mode}): {p['overhead']} s start-up and ceilings + {p['warmup']} s warm-up + parts "
             + ", ".join(f"{k} {v} s" for k, v in p["parts"].items())
             + f" = {p['total']} s; the run is stopped at {p['limit']} s (at most {p['at_most']} s)"]  # fmt: skip
    for part, cases in (plans or {}).items():
        lines.append(f"  {part} ({p['parts'][part]} s): " + ", ".join(name for name, *_ in cases))
    return lines


def _plans(ctx, parts, peak_tflops, budgets):
    """Each chosen part's cases; a part's module is imported only when that part runs."""
    import importlib

    def mod(name):
        return importlib.import_module(f"{__package__}.{name}")

    plans = {
        "correctness": lambda: mod("correctness").plan(ctx),
        "tune": lambda: mod("tune").plan(ctx),
        "e2e": lambda: mod("e2e").plan(ctx, peak_tflops, budget_s=0.9 * budgets.get("e2e", 0)),
        "real": lambda: mod("real").plan(ctx, peak_tflops),
        **{p: (lambda p=p: mod("micro").plan(ctx, p)) for p in ("attention", "flce", "lora")},
    }
    return {p: plans[p]() for p in parts}


def _warm_tasks(plans) -> list:
    return [(f"{part}: {name}", fn.__module__, fn.__name__, kw)
            for part, cases in plans.items() for name, fn, kw, warmable in cases if warmable]  # fmt: skip


def _withhold(record: dict) -> None:
    """No speedup is reported for a kernel whose bf16 checks (the dtype the benchmarks run) failed on this device,
    or did not run; failed checks in other dtypes are noted next to the speedup."""
    checks = record["parts"].get("correctness", {}).get("cases", {})
    for part, prefix in FAMILY.items():
        mine = {n: c["status"] for n, c in checks.items() if n.startswith(prefix)}
        bad = sorted(n for n, s in mine.items() if s in ("failed", "error"))
        bf16 = [n for n, s in mine.items() if " bf16 " in n and s != "skipped"]  # the bf16 checks that ran
        bad_bf16 = [n for n in bad if n in bf16]
        why = "bf16 correctness checks did not run" if not bf16 else None
        why = f"bf16 correctness failed on this device: {bad_bf16[:4]}" if bad_bf16 else why
        for case in record["parts"].get(part, {}).get("cases", {}).values():
            for impl in case.get("impls", {}).values():
                if impl.get("speedup_vs_best_peer") is None:
                    continue
                if why:
                    impl["speedup_withheld"] = {
                        "speedup_vs_best_peer": impl.pop("speedup_vs_best_peer"),
                        "why": why,
                    }
                elif bad:
                    impl["correctness_note"] = f"checks failed in other dtypes: {bad[:4]}"


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _table(record: dict) -> list[str]:
    env, ceil = record.get("environment", {}), record.get("ceilings", {})
    v = env.get("versions", {})
    dev = env.get("device", {}).get("name", "?")
    driver = env.get("nvidia_smi", {}).get("driver_version")
    lines = [f"== ragkern GPU proof ({record['mode']}) on {dev}" + (f", driver {driver}" if driver else "")
             + f" | torch {v.get('torch')} triton {v.get('triton')} transformers {v.get('transformers')}",
             f"ceilings: copy {ceil.get('copy_GBps', '?')} GB/s | bf16 matmul {ceil.get('matmul_n', '?')}^3 "
             f"{ceil.get('matmul_bf16_TFLOPs', '?')} TFLOP/s | datasheet bf16 peak (MFU's denominator) "
             f"{ceil.get('datasheet_bf16_TFLOPs') or '?'} TFLOP/s"]  # fmt: skip
    if record["mode"] == "dry-run":
        lines.append("(dry run: tiny shapes on the CPU; the times only show that the code runs)")
    for part in PARTS:
        rec = record["parts"].get(part)
        if rec is None:
            continue
        c = rec.get("counts", {})
        lines.append(f"-- {part}: {c.get('ok', 0)} ok, {c.get('failed', 0)} failed, {c.get('error', 0)} error, "
                     f"{c.get('skipped', 0)} skipped, {rec.get('elapsed_s', '?')} s of {rec.get('budget_s')} s")  # fmt: skip
        for name, case in rec.get("cases", {}).items():
            lines += _case_lines(part, name, case)
    return lines


def _ratio(x) -> str:
    return "-" if x is None else f"x{x:.2f}"


def _e2e_lines(case: dict) -> list[str]:
    """One line per arm: tokens/s (median over repeats, min-max), step time (median, p20-p80), MFU, peak memory,
    the ratios to the padding floor and to the strongest peer, the longest row. Robust to arms that are missing,
    skipped or failed, and to records of the first version (ragkern / hf only)."""
    arms = case.get("arms")
    if not isinstance(arms, dict):  # the first version's record
        ways = [
            f"{w} {case[w]['tokens_per_s']:.0f} tok/s"
            for w in ("ragkern", "hf")
            if "tokens_per_s" in case.get(w, {})
        ]
        return ["      " + " | ".join(ways or [str(case.get("error", "no arms"))[:150]])]
    refs = case.get("references", {})
    lines = [f"      floor {refs.get('floor')} | strongest peer {refs.get('strongest_peer')} | LoRA peer "
             f"{refs.get('strongest_lora_peer')} | same tokens per step: "
             f"{case.get('equal_tokens_per_step', {}).get('equal')}"]  # fmt: skip
    rows = case.get("max_row", {})
    for name, a in arms.items():
        if not isinstance(a, dict):
            continue
        if a.get("status") != "ok":
            lines.append(
                f"      {name:<19} {str(a.get('status', '?')).upper()} {str(a.get('reason') or a.get('error') or '')[:110]}"
            )
            continue
        mfu = f" MFU {a['mfu']:.3f}" if a.get("mfu") is not None else ""
        longest = rows.get(name, {}).get("max_row")
        lines.append(
            f"      {name:<19} {a['tokens_per_s']:.0f} tok/s ({a['tokens_per_s_min']:.0f}-{a['tokens_per_s_max']:.0f}, "
            f"{a['repeats']} rep) step {a['step_ms_median']:.1f} ms ({a['step_ms_p20']:.1f}-{a['step_ms_p80']:.1f})"
            f"{mfu} {_fmt_bytes(a.get('peak_mem_bytes'))} | floor {_ratio(a.get('vs_floor'))} "
            f"peer {_ratio(a.get('vs_strongest_peer'))}" + (f" | max row {longest}" if longest else "")
        )  # fmt: skip
    return lines


def _check_detail(case: dict) -> str:
    """The worst output of a failed check: NaN (an element never written) or its errors against the tolerance."""
    if "error" in case or "reason" in case:
        return str(case.get("error") or case.get("reason"))
    if "metrics" in case:
        tol, m = case["tolerance"], case["metrics"]
        nan = [k for k, v in m.items() if not v["finite"]]
        worst = max(m, key=lambda k: max(m[k]["rel_err"] / tol, m[k]["max_row_err"] / (10 * tol)))
        w = m[worst]
        return (f"NaN/inf in {nan}; " if nan else "") + (
            f"worst {worst}: rel {w['rel_err']:.2e}, row {w['max_row_err']:.2e} (tol {tol:.0e}, rows {10 * tol:.0e})"
        )
    return json.dumps({k: case[k] for k in ("equivalence", "leakage") if k in case})


def _side(r: dict) -> str:
    return f"{r.get('tokens_per_s', 0):.0f} tok/s {_fmt_bytes(r.get('peak_mem_bytes'))}"


def _real_line(case: dict) -> str:
    """One line per real-weights case: parity's loss gap, RAFT's exact match, a long row's speed or OOM."""
    if "max_abs_loss_diff" in case:
        held = case.get("final_heldout_loss", {})
        return (f"{case['steps']} steps, max |loss diff| {case['max_abs_loss_diff']}, held-out loss "
                f"{held.get('ragkern')} vs {held.get('peer')} | ragkern {_side(case['ragkern'])} | peer "
                f"{_side(case['peer'])} | x{case.get('speedup_tokens_per_s')}")  # fmt: skip
    if "ragkern" in case and "exact_match" in case["ragkern"]:
        return (f"EM {case['ragkern']['exact_match']} vs peer {case['peer'].get('exact_match')} | ragkern "
                f"{_side(case['ragkern'])} | peer {_side(case['peer'])} | x{case.get('speedup_tokens_per_s')}")  # fmt: skip
    if "row_tokens" in case and "block_attention" in case:
        runs = {k: v for k, v in case.items() if isinstance(v, dict) and ("tokens_per_s" in v or "oom" in v)}
        return f"{case['row_tokens']}-token rows, block attention | " + " | ".join(
            f"{k} " + ("OOM" if "oom" in v else _side(v)) for k, v in runs.items()
        )
    return json.dumps({k: v for k, v in case.items() if not isinstance(v, (dict, list))})[:170]


def _tune_line(case: dict) -> str:
    """The attention backward candidates: the table's choice, the fastest, and the backward speedup between."""
    fastest, sp = case.get("fastest", {}), case.get("bwd_speedup_of_fastest_vs_table")
    return (f"table {case.get('table_choice')} | fastest: dK/dV {fastest.get('dkdv')}, dQ {fastest.get('dq')}, "
            f"backward {fastest.get('bwd')}" + (f" (x{sp} vs the table)" if sp is not None else ""))  # fmt: skip


def _case_lines(part: str, name: str, case: dict) -> list[str]:
    status = case["status"]
    if part == "correctness":
        return [] if status == "ok" else [f"   {name}: {status.upper()} {_check_detail(case)[:170]}"]
    if part == "e2e" and ("arms" in case or "ragkern" in case or "hf" in case):
        return [
            f"   {name}: {status.upper()}" + (f" {str(case.get('error'))[:120]}" if status != "ok" else "")
        ] + _e2e_lines(case)
    if part in ("real", "tune") and status == "ok":
        return [f"   {name}: " + (_real_line(case) if part == "real" else _tune_line(case))]
    if status != "ok":
        return [f"   {name}: {status.upper()} {(case.get('error') or case.get('reason') or '')[:150]}"]
    impls = case.get("impls", {})
    ours = [(n, r) for n, r in impls.items() if r["ours"] and r["status"] == "ok"]
    best = case.get("best_peer")
    parts = [] if ours else [f"{n} {r['status'].upper()}" for n, r in impls.items() if r["ours"]]
    for n, r in ours[:1]:
        sp = r.get("speedup_vs_best_peer")
        sp = f"x{sp}" if sp is not None else ("withheld" if "speedup_withheld" in r else "no peer")
        parts.append(
            f"{n} {r['median_ms']:.3f} ms {r.get('tflops') or 0:.0f} TF/s {_fmt_bytes(r.get('peak_mem_bytes'))}"
        )
        if best:
            b = impls[best]
            parts.append(f"best peer {best} {b['median_ms']:.3f} ms {_fmt_bytes(b.get('peak_mem_bytes'))}")
        parts.append(sp)
    if "metadata_build_ms" in case:
        parts.append(f"tile lists {case['metadata_build_ms']:.3f} ms once per batch")
    broken = [n for n, r in impls.items() if r["status"] == "error"] + case.get("peers_disagreeing", [])
    if broken:
        parts.append(f"(not compared: {', '.join(broken)})")
    return [f"   {name}: " + " | ".join(parts)]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    for line in _plan_lines(mode, args.parts, not args.no_warmup):  # before anything starts
        print(line, flush=True)
    bootstrap.install_kernels_finder()
    wheels = bootstrap.install_wheels(args.wheels)

    import torch

    from . import harness

    limit = args.time_limit or LIMIT[mode]
    deadline = START + limit
    out_dir = args.output
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.dry_run
    ctx = harness.Ctx(device=torch.device("cuda" if cuda else "cpu"), mode=mode)
    record: dict = {"mode": mode, "command": sys.argv, "time_limit_s": limit, "budgets_s": {"warmup": BUDGETS[mode]["warmup"], **part_budgets(mode, args.parts, not args.no_warmup)},
                    "wheels": wheels, "parts": {}}  # fmt: skip

    def write():
        record["elapsed_s"] = round(time.perf_counter() - START, 2)
        (out_dir / JSON_NAME).write_text(json.dumps(record, indent=1, default=str) + "\n")

    from bench._common import metadata

    record["meta"] = harness.run_guarded(metadata)
    manifest = wheels.get("manifest", {})
    # source_sha256 names the code that ran. The lent machine gets a copy of the working tree whose git metadata
    # can be stale (a run at 23ede13 reported fe8e8a3 there), and the manifest knows only the commit checked out
    # when the wheels were fetched: both are kept under names that say so, not as the code's commit.
    record["meta"]["source_sha256"] = source_digest()
    if cuda:
        record["meta"]["git_sha_reported_here"] = record["meta"].pop("git_sha", None)
    if manifest.get("git_sha"):
        record["meta"]["git_sha_at_wheels_fetch"] = manifest["git_sha"]
    if not cuda and not args.dry_run:
        record["error"] = "no CUDA device: run with --dry-run on a machine without a GPU"
        write()
        print(record["error"])
        return 2
    record["environment"] = harness.run_guarded(_environment, ctx)
    print(f"ragkern GPU proof ({mode}): {record['environment'].get('device', {})}", flush=True)
    print(f"versions: {record['environment'].get('versions')}", flush=True)
    record["ceilings"] = harness.run_guarded(harness.ceilings, ctx)
    print(f"ceilings: {record['ceilings']}", flush=True)
    write()

    device_name = record["environment"].get("device", {}).get("name", "")
    record["ceilings"]["datasheet_bf16_TFLOPs"] = peak = harness.datasheet_bf16_tflops(device_name)
    plans = harness.run_guarded(lambda: {"plans": _plans(ctx, args.parts, peak, record["budgets_s"])})
    if "plans" not in plans:
        record["error"] = plans
        write()
        print(f"could not plan the parts: {plans.get('error')}")
        return 1
    plans = plans["plans"]
    record["plan"] = {**planned_seconds(mode, args.parts, not args.no_warmup),
                      "cases": {p: [name for name, *_ in cases] for p, cases in plans.items()}}  # fmt: skip
    for line in _plan_lines(mode, args.parts, not args.no_warmup, plans)[1:]:
        print(line, flush=True)
    tasks = _warm_tasks(plans)
    if args.no_warmup or not tasks:
        record["warmup"] = {"skipped": True}
    else:
        budget = min(BUDGETS[mode]["warmup"], max(deadline - time.perf_counter() - 60, 1))
        workers = 1 if args.dry_run else max(1, min(8, (os.cpu_count() or 2) - 4, len(tasks)))
        if args.dry_run:  # the mechanism, on one small task; the others are only resolved
            for _, mod, fn, _ in tasks:
                getattr(__import__(mod, fromlist=[fn]), fn)
            tasks = [t for t in tasks if t[0].startswith("correctness: lora fp32")][:1]
        print(f"warm-up: {len(tasks)} cases on {workers} workers, {budget:.0f} s at most", flush=True)
        record["warmup"] = harness.run_guarded(harness.warm_up, tasks, mode, budget, workers)
        print(f"warm-up done in {record['warmup'].get('elapsed_s')} s", flush=True)
    write()

    for part in args.parts:
        print(f"part {part}:", flush=True)
        rec = record["parts"][part] = {}
        runner = harness.Part(part, ctx, record["budgets_s"][part], deadline, rec, on_case=write)
        for name, fn, kwargs, _ in plans[part]:
            runner.case(name, fn, **kwargs)
        runner.finish()
        write()

    try:
        _withhold(record)
        table = _table(record)
    except Exception as e:  # noqa: BLE001 - the JSON is the result; the table is a courtesy
        table = [f"(no table: {type(e).__name__}: {e})"]
    record["table"] = table
    write()
    (out_dir / TABLE_NAME).write_text("\n".join(table) + "\n")
    print(f"wrote {out_dir / JSON_NAME} ({record['elapsed_s']} s)")
    print("\n".join(table), flush=True)
    return 0
