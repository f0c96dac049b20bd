"""Tuning of the attention backward: every candidate configuration of ``_BWD_CANDIDATES`` (dK/dV and dQ tiles,
warps, stages) timed on the device's arch, one case per head_dim.

For each candidate, on one 16k-token packed row of RAG lengths (``rag.packed_row``), bf16, 32 query / 8 kv heads,
causal, ragkern's Triton ``varlen_attention`` with the candidate's backward configuration (``_bwd_configs``):

- ``dkdv`` and ``dq``: each backward kernel alone, relaunched with the exact arguments the host code passed it
  (captured from one backward), so the two kernels are timed apart without a second copy of the launch code;
- ``bwd``: the whole backward (``torch.autograd.grad``: delta, dK/dV and dQ kernels);
- ``fwd_bwd``: forward + backward, as a training step runs them;
- ``check``: dq, dk, dv against the float32 PyTorch reference on the same inputs (a wrong candidate is never the
  fastest).

CUDA: ``triton.testing.do_bench`` (L2 flushed between runs) with ``rep`` sized for at least ``MIN_SAMPLES`` timed
runs; median, p20 and p80 of the samples. Each case reports the fastest passing candidate per timing, the
table's current choice (``_BWD_CHOICE``) and the fastest backward's speedup over it: a session with a GPU records
the winner in ``_BWD_MEASURED`` (or first adds the pair of the fastest dK/dV and fastest dQ as a candidate).
Dry run (CPU, ``TRITON_INTERPRET=1``): each sm_90 candidate of the case's head_dim runs its tiles once on a tiny
float32 row at head_dim 32 in the interpreter, checked against the reference; the first candidate is also timed
(wall clock: it only shows that the code runs), the others record why not.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable

import torch

from . import rag
from .harness import Ctx, compare, interpreting

MIN_SAMPLES = 10
_KERNELS = {"dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}


class _Recorder:
    """Stands in for a Triton kernel: ``rec[grid](*args, **kwargs)`` launches it and keeps the launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@contextlib.contextmanager
def _recording():
    """The backward kernels of ``ragkern.kernels.attention`` replaced by recorders inside the block."""
    from ragkern.kernels import attention as attn

    saved = {name: getattr(attn, attr) for name, attr in _KERNELS.items()}
    recorders = {name: _Recorder(kernel) for name, kernel in saved.items()}
    for name, attr in _KERNELS.items():
        setattr(attn, attr, recorders[name])
    try:
        yield recorders
    finally:
        for name, attr in _KERNELS.items():
            setattr(attn, attr, saved[name])


def _relaunch(recorder: _Recorder) -> Callable[[], object]:
    """The recorder's one launch, as a function that launches it again (outputs are stored, not accumulated)."""
    if len(recorder.launches) != 1:
        raise RuntimeError(f"expected one launch of the kernel, saw {len(recorder.launches)}")
    grid, args, kwargs = recorder.launches[0]
    kernel = recorder.kernel
    return lambda: kernel[grid](*args, **kwargs)


def _time(ctx: Ctx, fn: Callable[[], object]) -> dict | None:
    """Median / p20 / p80 ms of ``fn`` and the number of timed samples. CUDA: ``do_bench`` with ``rep`` sized from a
    first estimate so that at least ``MIN_SAMPLES`` runs are timed. Elsewhere (dry run): ``ctx.time_ms``."""
    if not ctx.cuda or ctx.warm:
        out = ctx.time_ms(fn)
        return None if out is None else {**out, "samples": out.get("rounds", 1 if ctx.dry else 3)}
    from triton.testing import do_bench

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(3):
        fn()
    end.record()
    ctx.sync()
    estimate = start.elapsed_time(end) / 3
    rep = max(100 if ctx.quick else 300, 1.5 * MIN_SAMPLES * estimate)
    times = do_bench(fn, warmup=25, rep=rep, return_mode="all")
    if len(times) < MIN_SAMPLES:
        raise RuntimeError(f"do_bench timed {len(times)} runs, fewer than {MIN_SAMPLES}")
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return {
        "median_ms": round(statistics.median(times), 4),
        "p20_ms": round(q[1], 4),
        "p80_ms": round(q[7], 4),
        "samples": len(times),
    }


def _cfg_text(cfg) -> str:
    split = f" split{cfg.d_split}" if cfg.d_split > 1 else ""
    return f"M={cfg.block_m} N={cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{split}"


def _arch(ctx: Ctx) -> int:
    if not ctx.cuda:
        return 90  # the dry run proves the sm_90 candidates (the lent GPUs are H100 / H200)
    major, minor = torch.cuda.get_device_capability(ctx.device)
    return 10 * major + minor


def _candidate(ctx: Ctx, run, leaves, do, refs, tol: float, timed: bool) -> dict:
    """One candidate (its override active): a checked backward, then the four timings (``timed``)."""
    out = run()
    with _recording() as rec:
        grads = torch.autograd.grad(out, leaves, do, retain_graph=True)
    entry: dict = {"status": "ok"}
    if not ctx.warm:
        ok, metrics = compare(dict(zip(("dq", "dk", "dv"), grads)), refs, tol)
        entry.update(check_ok=ok, check=metrics)
    del grads
    if not timed:
        return {
            **entry,
            "times": {},
            "times_skipped": "dry run: the interpreter times the first candidate only",
        }
    times = {
        "dkdv": _time(ctx, _relaunch(rec["dkdv"])),
        "dq": _time(ctx, _relaunch(rec["dq"])),
        "bwd": _time(ctx, lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)),
    }
    times["fwd_bwd"] = _time(ctx, lambda: torch.autograd.grad(run(), leaves, do))
    return {**entry, "times": times}


def tune_bench(ctx: Ctx, head_dim: int) -> dict:
    """Every backward candidate of ``head_dim`` on this device's arch: timings, checks, the fastest (see above)."""
    from ragkern.kernels import attention as attn
    from ragkern.kernels import varlen_attention

    if not ctx.cuda and not interpreting():
        return {"status": "skipped", "reason": "no CUDA and no TRITON_INTERPRET: the kernels cannot run"}
    arch = _arch(ctx)
    key = attn._bwd_key(head_dim, arch)
    candidates = attn._BWD_CANDIDATES[key]
    dtype = torch.bfloat16 if ctx.cuda else torch.float32  # the interpreter's bf16 dot is wrong (DESIGN.md)
    # dry run: the bucket's candidates (tiles, d_split) on head_dim 32, the interpreter's cost falling with it
    total, Hq, Hkv, D = (16384, 32, 8, head_dim) if ctx.cuda else (80, 2, 1, 32)
    dev = ctx.device
    lengths, _ = rag.packed_row(total, seed=0, scale=1.0 if ctx.cuda else 1 / 32)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    max_len = max(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(total, H, D, generator=g).to(dev, dtype) for H in (Hq, Hkv, Hkv, Hq))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4

    def run():
        return varlen_attention(*leaves, cu, max_len, backend="triton", validate=False)

    refs = None
    if not ctx.warm:
        rq, rk, rv = (x.detach().float().requires_grad_() for x in (q, k, v))
        ro = attn.varlen_attention_reference(rq, rk, rv, cu)
        refs = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(ro, (rq, rk, rv), do.float())))
        del ro, rq, rk, rv

    results: dict = {}
    for i, (name, (dkdv, dq)) in enumerate(candidates.items()):
        entry: dict = {"dkdv_config": _cfg_text(dkdv), "dq_config": _cfg_text(dq)}
        try:
            with attn._bwd_configs(dkdv=dkdv, dq=dq):
                entry.update(_candidate(ctx, run, leaves, do, refs, tol, timed=ctx.cuda or i == 0))
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run must not cost the others their numbers
            entry.update(status="error", error=f"{type(e).__name__}: {e}"[:1500])
        results[name] = entry
    if ctx.warm:
        return {}
    summary = summarize(results, attn._BWD_CHOICE[key])
    failed = [n for n, r in results.items() if r["status"] != "ok" or not r.get("check_ok")]
    return {
        "status": "failed" if failed else "ok",
        "shape": dict(
            total=total, Hq=Hq, Hkv=Hkv, head_dim=D, dtype=str(dtype)[6:], causal=True, examples=len(lengths)
        ),
        "arch": f"sm_{arch}",
        "key": list(key),
        "candidates": results,
        **({"failed_candidates": failed} if failed else {}),
        **summary,
    }


def summarize(results: dict, table_choice: str) -> dict:
    """The fastest passing candidate per timing, the backward's speedup of the fastest over the table's choice
    (``> 1``: the table should change) and of the table's choice over "baseline" (the tiles before issue 23)."""
    ok = {n: r for n, r in results.items() if r["status"] == "ok" and r.get("check_ok") and r.get("times")}
    fastest = {}
    for what in ("dkdv", "dq", "bwd", "fwd_bwd"):
        timed = {n: r["times"][what]["median_ms"] for n, r in ok.items() if r["times"].get(what)}
        if timed:
            fastest[what] = min(timed, key=timed.get)
    out = {"table_choice": table_choice, "fastest": fastest}
    if "bwd" in fastest and table_choice in ok:
        best, ours = ok[fastest["bwd"]]["times"]["bwd"], ok[table_choice]["times"]["bwd"]
        out["bwd_speedup_of_fastest_vs_table"] = round(ours["median_ms"] / best["median_ms"], 3)
        if "baseline" in ok:  # what the table's change from the tiles before issue 23 bought
            before = ok["baseline"]["times"]["bwd"]["median_ms"]
            out["bwd_speedup_of_table_vs_baseline"] = round(before / ours["median_ms"], 3)
    return out


def plan(ctx: Ctx) -> list[tuple[str, object, dict, bool]]:
    """One case per head_dim, D=128 first (the 0.96x-FlexAttention shortfall; the budget skips the last first)."""
    return [(f"tune attention bwd D={D}", tune_bench, dict(head_dim=D), True) for D in (128, 64, 256)]
