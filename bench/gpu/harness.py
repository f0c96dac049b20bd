"""What every part of ``python -m bench.gpu`` shares: the run context (device, timing, memory), guarded cases
with time budgets, error norms, the measured ceilings and the parallel Triton warm-up.

A part is a list of cases ``(name, fn, kwargs, warmable)``; ``fn(ctx, **kwargs)`` returns a dict that lands in
the JSON (its ``"status"`` key, if any, says "failed" for a check that ran and did not pass). :class:`Part` runs
them one by one: an exception becomes ``{"status": "error", "traceback": ...}``, a case that outlives the part's
budget (plus a grace) is interrupted by SIGALRM, and the cases left when the budget is spent are recorded as
skipped. Nothing a case does can stop the next one.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (warm-up calls, timed calls) of every timing, by mode: fixed counts, so no case rests on one sample
# (triton's do_bench with rep=100 ms timed a single call of anything over ~80 ms).
# bench.gpu's dry run times one call (DRY_RUN_ROUNDS): its numbers only show that the code runs; "dry-run" in ROUNDS
# is the CPU default of the pytest-benchmark suites (pytest bench/).
ROUNDS = {"dry-run": (1, 10), "quick": (3, 10), "full": (5, 25)}
DRY_RUN_ROUNDS = (0, 1)


def short_traceback() -> str:
    """The current exception's traceback, its head and tail kept when long."""
    tb = traceback.format_exc()
    return tb if len(tb) <= 6000 else tb[:1500] + "\n[...]\n" + tb[-4500:]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fresh_seed() -> int:
    """A new seed per check (recorded in the JSON): the kernels must be right on any input, not on one."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


# Datasheet dense bf16 peaks (TFLOP/s, without sparsity): the denominator of MFU, as PaLM and Megatron define it.
# A measured matmul rate is a ceiling to compare with, not a peak: dividing by it inflates MFU.
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0,
                         "H100 PCIe": 756.0, "A100": 312.0}  # fmt: skip


def datasheet_bf16_tflops(device_name: str) -> float | None:
    """The datasheet dense bf16 peak of a card named as ``torch.cuda.get_device_name`` names it, or None."""
    for key, peak in DATASHEET_BF16_TFLOPS.items():
        if key in device_name:
            return peak
    return None


@dataclass
class Ctx:
    """How a case runs. ``warm``: a warm-up worker, which only needs every kernel launched once."""

    device: torch.device
    mode: str  # "dry-run" | "quick" | "full"
    warm: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dry(self) -> bool:
        return self.mode == "dry-run"

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object], grad_to_none: list | None = None) -> dict | None:
        """Median (and 20th / 80th percentile) milliseconds of ``fn`` over a fixed number of calls
        (:data:`ROUNDS`: warm-up calls, then >= 10 timed ones; one call in a dry run); ``grad_to_none`` are reset
        before every call.

        CUDA: CUDA events around each call, the L2 flushed before it. CPU: wall clock. The kernel
        micro-benchmarks do not come through here: they are pytest-benchmark suites (bench/gpu/micro.py).
        A warm-up worker runs ``fn`` once and returns None.
        """
        if self.warm:
            fn()
            self.sync()
            return None
        warmup, rounds = DRY_RUN_ROUNDS if self.dry else ROUNDS[self.mode]
        flush = torch.empty(256 << 20, dtype=torch.int8, device=self.device) if self.cuda else None
        times = []
        for i in range(warmup + rounds):
            for t in grad_to_none or ():
                t.grad = None
            if flush is not None:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                if i >= warmup:
                    times.append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
        self.sync()
        ms = sorted(s.elapsed_time(e) for s, e in times) if flush is not None else sorted(times)
        q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        return {"median_ms": round(statistics.median(ms), 4), "p20_ms": round(q[1], 4),
                "p80_ms": round(q[7], 4), "rounds": len(ms)}  # fmt: skip

    def peak_bytes(self, fn: Callable[[], object], grad_to_none: list | None = None) -> int | None:
        """Peak CUDA memory ``fn`` allocates beyond what was allocated before it (None on CPU / warm-up)."""
        if not self.cuda or self.warm:
            return None
        for t in grad_to_none or ():
            t.grad = None
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return int(torch.cuda.max_memory_allocated(self.device) - base)


def tflops(flops: float, timing: dict | None) -> float | None:
    return None if not timing else round(flops / (timing["median_ms"] * 1e-3) / 1e12, 2)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (a zero reference: the absolute norm)."""
    a, ref = a.detach().double(), ref.detach().double()
    return (
        float((a - ref).norm() / ref.norm().clamp_min(1e-30)) if ref.norm() > 0 else float((a - ref).norm())
    )


def row_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error of one row (last dim) over the mean row norm: one wrong row of thousands shows here."""
    width = a.shape[-1] if a.dim() else 1
    a, ref = a.detach().double().reshape(-1, width), ref.detach().double().reshape(-1, width)
    scale = ref.norm(dim=1).mean().clamp_min(1e-30)
    return float((a - ref).norm(dim=1).max() / scale)


@contextmanager
def nan_poisoned_empty():
    """``torch.empty`` / ``empty_like`` hand out NaN-filled floating tensors, so an element a kernel never
    writes shows up as NaN in its output."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: nan(empty(*a, **k))
    torch.empty_like = lambda *a, **k: nan(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def compare(outs: dict, refs: dict, tol: float, baseline: dict | None = None) -> tuple[bool, dict]:
    """Error norms of each output against its float64 reference; passes when all are finite and within ``tol``
    (norm) and ``10 * tol`` (worst row). ``baseline``: the same outputs from torch in the same dtype, for scale."""
    metrics, ok = {}, True
    for name, out in outs.items():
        ref = refs[name]
        finite = bool(torch.isfinite(out).all())
        m = {"finite": finite, "rel_err": rel_err(out, ref), "max_row_err": row_err(out, ref)}
        if baseline is not None and name in baseline:
            m["torch_same_dtype_rel_err"] = rel_err(baseline[name], ref)
        m = {k: (float(f"{v:.3e}") if isinstance(v, float) else v) for k, v in m.items()}
        ok &= finite and m["rel_err"] <= tol and m["max_row_err"] <= 10 * tol
        metrics[name] = m
    return ok, metrics


class CaseTimeout(BaseException):
    """A case ran past its part's budget. A BaseException, so the broad ``except Exception`` that keep one failing
    peer or side from costing the others their numbers do not swallow it: only :meth:`Part.case` (and code that
    names it, to keep what it measured) catches it, and the case stops."""


@contextmanager
def alarm(seconds: float | None):
    """Raise :class:`CaseTimeout` in the main thread after ``seconds`` (a case stuck past its part's budget)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise CaseTimeout(f"stopped after {seconds:.0f} s: the part's time budget and its grace were spent")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.05))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def free_memory(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


class Part:
    """Runs one part's cases within ``budget_s`` seconds (and the whole run's ``deadline``, a perf_counter)."""

    def __init__(self, name: str, ctx: Ctx, budget_s: float, deadline: float, record: dict, on_case=None):
        self.name, self.ctx, self.budget_s, self.deadline = name, ctx, budget_s, deadline
        self.start = time.perf_counter()
        self.record, self.on_case = record, on_case  # on_case(): e.g. rewrite the JSON after every case
        record.update(budget_s=budget_s, cases={})

    def remaining(self) -> float:
        now = time.perf_counter()
        return min(self.start + self.budget_s - now, self.deadline - now)

    def case(self, name: str, fn: Callable, **kwargs) -> dict:
        cases = self.record["cases"]
        left = self.remaining()
        if left <= 0:
            why = (
                "the whole run's time limit was reached"
                if self.deadline <= time.perf_counter()
                else "part budget spent"
            )
            cases[name] = {"status": "skipped", "reason": why}
            return cases[name]
        grace = min(30.0, 0.25 * self.budget_s)
        limit = min(left + grace, self.deadline - time.perf_counter() + 5.0)
        t0 = time.perf_counter()
        try:
            with alarm(limit):
                out = fn(self.ctx, **kwargs) or {}
            entry = {"status": out.pop("status", "ok"), **out}
        except (Exception, CaseTimeout) as e:  # noqa: BLE001 - every failure is recorded, the next case runs
            entry = {
                "status": "error",
                "error": f"{type(e).__name__}: {e}"[:2000],
                "traceback": short_traceback(),
            }
        entry["elapsed_s"] = round(time.perf_counter() - t0, 2)
        cases[name] = entry
        free_memory(self.ctx)
        print(f"  [{self.name}] {name}: {entry['status']} ({entry['elapsed_s']} s)"
              + (f" {entry['error'][:200]}" if entry["status"] == "error" else ""), flush=True)  # fmt: skip
        if self.on_case is not None:
            self.on_case()
        return entry

    def finish(self) -> None:
        statuses = [c["status"] for c in self.record["cases"].values()]
        self.record["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        self.record["counts"] = {s: statuses.count(s) for s in ("ok", "failed", "error", "skipped")}


@contextmanager
def undoing_patches(*model_types: str):
    """Undo, on exit, what was monkey-patched into transformers' modeling modules inside the block: Liger's
    ``apply_liger_kernel_to_*`` (which ``use_liger_kernel=True`` and TRL call) rebinds module-level names (the
    RMSNorm and MLP classes, ``apply_rotary_pos_emb``) and ``*ForCausalLM.forward`` for the whole process, so every
    model built after a Liger arm would run Liger's kernels. ``model_types`` (e.g. ``"qwen2"``) are imported first,
    so their modules are covered even when the block is the first to load them."""
    import importlib
    import sys

    for mt in model_types:
        with contextlib.suppress(ImportError):
            importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    mods = [
        m for n, m in list(sys.modules.items()) if n.startswith("transformers.models.") and ".modeling_" in n
    ]
    names = {m: dict(vars(m)) for m in mods}
    forwards = {c: c.__dict__["forward"] for m in mods for c in vars(m).values()
                if isinstance(c, type) and c.__module__ == m.__name__ and "forward" in c.__dict__}  # fmt: skip
    try:
        yield
    finally:
        for m, saved in names.items():
            for k, v in saved.items():
                if vars(m).get(k) is not v:
                    setattr(m, k, v)
        for c, fwd in forwards.items():
            if c.__dict__.get("forward") is not fwd:
                c.forward = fwd


def run_guarded(fn: Callable, *args, **kwargs) -> dict:
    """``fn(*args)`` as a dict result, or ``{"error", "traceback"}``: for the steps outside any part."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": short_traceback()}


def _time_copy(ctx: Ctx, nbytes: int) -> dict | None:
    src = torch.randn(nbytes // 2, device=ctx.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return ctx.time_ms(lambda: dst.copy_(src))


def _time_matmul(ctx: Ctx, n: int) -> dict | None:
    a, b = (torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device=ctx.device, dtype=torch.bfloat16)
    return ctx.time_ms(lambda: torch.matmul(a, b, out=c))


def ceilings(ctx: Ctx) -> dict:
    """The two measured ceilings: a device-to-device copy (GB/s, bytes read + written) and an 8192^3 bf16
    matmul (TFLOP/s), on random data. Dry run: 8 MiB and 256^3 on the CPU, only to exercise the code."""
    nbytes, n = (1 << 30, 8192) if ctx.cuda else (8 << 20, 256)
    copy, mm = _time_copy(ctx, nbytes), _time_matmul(ctx, n)
    free_memory(ctx)
    return {
        "copy_bytes": nbytes,
        "copy_ms": copy,
        "copy_GBps": round(2 * nbytes / (copy["median_ms"] * 1e-3) / 1e9, 1),
        "matmul_n": n,
        "matmul_ms": mm,
        "matmul_bf16_TFLOPs": tflops(2 * n**3, mm),
    }


# ------------------------------------------------------------------------------------------- warm-up


def _warm_task(module: str, fn_name: str, kwargs: dict, mode: str) -> dict:
    """In a worker: run one case with ``Ctx(warm=True)`` so its Triton (and Inductor) compiles hit the disk cache."""
    from bench.gpu.bootstrap import install_kernels_finder

    install_kernels_finder()
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and mode != "dry-run" else "cpu")
    ctx = Ctx(device=device, mode=mode, warm=True)
    try:
        getattr(importlib.import_module(module), fn_name)(ctx, **kwargs)
        return {"status": "ok", "elapsed_s": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # noqa: BLE001 - the main run will meet (and record) it again
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}


def warm_up(tasks: list[tuple[str, str, str, dict]], mode: str, budget_s: float, workers: int) -> dict:
    """Launch every warmable case once in ``workers`` spawned processes, so the many Triton and FlexAttention
    compiles run in parallel and land in the on-disk caches the timed run then reads. ``tasks`` are
    ``(case name, module, function name, kwargs)``. Workers still busy when ``budget_s`` is spent are killed:
    their compiles then happen in the main run, inside its parts' budgets."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    out: dict = {"workers": workers, "tasks": {}}
    if not tasks:
        return out
    saved = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # each worker compiles alone: no pool of pools
    try:
        pool = mp.get_context("spawn").Pool(workers)
    finally:
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_COMPILE_THREADS", None)
        else:
            os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = saved
    try:
        pending = {name: pool.apply_async(_warm_task, (mod, fn, kw, mode)) for name, mod, fn, kw in tasks}
        for name, res in pending.items():
            left = t0 + budget_s - time.perf_counter()
            try:
                out["tasks"][name] = res.get(timeout=max(left, 0.01))
            except mp.TimeoutError:
                out["tasks"][name] = {"status": "timeout"}
    finally:
        pool.terminate()
        pool.join()
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return out
