"""The demo's robustness grid: `ragkern demo` over seeds x CPU kernel capabilities (x block attention).

    python bench/demo_grid.py                                   # the whole grid, one run at a time
    python bench/demo_grid.py --seeds 0 1 --capabilities avx2   # a piece; merged into the same JSON
    python bench/demo_grid.py --modes block --parallel 2        # two runs at once (wall times not comparable)

Each run is the demo as a user runs it: the `ragkern` command of this interpreter's environment
(`ragkern demo --seed S [--block-attention]`, start-up included) in a subprocess, with ATEN_CPU_CAPABILITY set
in its environment ("default" leaves it unset: torch picks the best kernels the CPU has). The run's
metrics.json gives the accuracies and the capability torch really used; the grid adds the wall time of the
subprocess, its CPU time (user + system: on a busy machine, close to what the wall time would be on an idle
one, since the demo computes on one thread) and the load average at its start and end.

Writes bench/results/demo_grid.json: every run (keyed by mode, capability, seed; a piece replaces the runs it
repeats and keeps the others, so the grid can be run in pieces), each with its own git sha and time, and per
mode the min / median / max of accuracy_after, the control (oracle removed) and the wall time; prints them.
The demo's promise (issue 15): accuracy_after >= 0.9 on every run and wall < 3 minutes, one run at a time on
an idle 2-core machine. Each run also keeps the summary lines the demo printed at its end (``summary_lines``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import RESULTS, _git_sha, metadata  # noqa: E402

MODES = {"full": [], "block": ["--block-attention"]}


def _ragkern_command() -> str:
    """The `ragkern` script next to this interpreter (the environment the grid measures), else on PATH."""
    here = Path(sys.executable).parent / "ragkern"
    found = str(here) if here.exists() else shutil.which("ragkern")
    if found is None:
        sys.exit("no `ragkern` command: pip install -e . in this environment first")
    return found


def run_one(mode: str, capability: str, seed: int, parallel: int, quick: bool = False) -> dict:
    """One `ragkern demo` in a subprocess; its metrics plus wall time, load average and the conditions."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "default":
        env["ATEN_CPU_CAPABILITY"] = capability
    with tempfile.TemporaryDirectory(prefix="demo_grid_") as out:
        cmd = [_ragkern_command(), "demo", "--seed", str(seed), "--output-dir", out, *MODES[mode]]
        cmd += ["--quick"] if quick else []
        log = Path(out) / "demo.log"
        load_start = os.getloadavg()
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, even with --parallel 2
        wall = time.perf_counter() - t0
        load_end = os.getloadavg()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{log.read_text()[-3000:]}")
        m = json.loads((Path(out) / "metrics.json").read_text())
        printed = log.read_text()
    reuse = m.get("cache_reuse") or {}
    return {
        "mode": mode,
        "capability_requested": capability,
        "cpu_capability": m.get("cpu_capability"),
        "seed": seed,
        "accuracy_before": m["accuracy_before"],
        "accuracy_after": m["accuracy_after"],
        "accuracy_without_oracle": m["accuracy_without_oracle"],
        "chance": m["chance"],
        "accuracy_cached": reuse.get("exact_match_cached"),
        "cache_agreement": reuse.get("agreement"),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "train_seconds": m["train_seconds"],
        "demo_total_seconds": m["total_seconds"],
        "tokens_per_second": m["tokens_per_second"],
        "train_steps": m["train_steps"],
        "learning_curve": [(p["step"], round(p["accuracy"], 3)) for p in m["learning_curve"]],
        "summary_lines": _summary_lines(printed),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in load_end],
        "runs_in_parallel": parallel,
        "git_sha": _git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _summary_lines(printed: str) -> list[str]:
    """What the demo prints outside its progress bars: its header, the accuracy before training, and the summary
    at its end (from "accuracy after training" on), as a user sees it."""
    lines = [line.split("\r")[-1] for line in printed.splitlines()]
    head = [line for line in lines if line.startswith(("ragkern demo:", "accuracy before training:"))]
    start = printed.rfind("accuracy after training")
    if start < 0:
        return head
    return head + [line.split("\r")[-1] for line in printed[start:].splitlines() if line.strip()]


def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        rs = [r for r in runs if r["mode"] == mode]
        if rs:
            out[mode] = {
                key: _stats([r[key] for r in rs])
                for key in (
                    "accuracy_after",
                    "accuracy_without_oracle",
                    "accuracy_cached",
                    "wall_seconds",
                    "cpu_seconds",
                )
            }
            out[mode]["all_accuracy_after_at_least_0.9"] = all(r["accuracy_after"] >= 0.9 for r in rs)
            out[mode]["all_wall_under_180_s"] = all(r["wall_seconds"] < 180 for r in rs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--capabilities",
        nargs="+",
        default=["default", "avx2"],
        help="ATEN_CPU_CAPABILITY values; 'default' leaves it unset (e.g. default avx2 avx512)",
    )
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument(
        "--parallel", type=int, choices=[1, 2], default=1, help="demo runs at once (1 for the wall times)"
    )
    p.add_argument("--quick", action="store_true", help="`ragkern demo --quick` (checks this script only)")
    p.add_argument("--output", type=Path, default=RESULTS / "demo_grid.json", help="the JSON to merge into")
    p.add_argument(
        "--fresh", action="store_true", help="drop the runs already in the JSON instead of merging"
    )
    args = p.parse_args()

    path = args.output
    kept: list[dict] = []
    if path.exists() and not args.fresh:
        kept = json.loads(path.read_text()).get("runs", [])
    _ragkern_command()  # fail before the first run, not after it
    jobs = [(m, c, s) for m in args.modes for c in args.capabilities for s in args.seeds]
    print(f"{len(jobs)} demo runs, {args.parallel} at a time; load average {os.getloadavg()}")

    def job(spec):
        r = run_one(*spec, parallel=args.parallel, quick=args.quick)
        print(
            f"{r['mode']:>5} {r['capability_requested']:>8} ({r['cpu_capability']}) seed {r['seed']}: "
            f"accuracy {r['accuracy_after']:.3f} (control {r['accuracy_without_oracle']:.3f}"
            + (f", cached {r['accuracy_cached']:.3f}" if r["accuracy_cached"] is not None else "")
            + f") wall {r['wall_seconds']:.0f} s (CPU {r['cpu_seconds']:.0f} s), "
            f"load {r['load_average_start'][0]:.1f} -> {r['load_average_end'][0]:.1f}",
            flush=True,
        )
        return r

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        new = list(pool.map(job, jobs))
    keys = {(r["mode"], r["capability_requested"], r["seed"]) for r in new}
    runs = [r for r in kept if (r["mode"], r["capability_requested"], r["seed"]) not in keys] + new
    runs.sort(key=lambda r: (list(MODES).index(r["mode"]), r["capability_requested"], r["seed"]))
    summary = summarize(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": metadata(), "summary": summary, "runs": runs}, indent=2) + "\n")
    for mode, s in summary.items():
        line = ", ".join(
            f"{k} min {v['min']:.3f} median {v['median']:.3f} max {v['max']:.3f} (n={v['n']})"
            for k, v in s.items()
            if isinstance(v, dict)
        )
        print(f"{mode}: {line}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
