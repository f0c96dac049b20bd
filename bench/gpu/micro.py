"""Kernel micro-benchmarks, each beside its peers: attention, fused linear cross-entropy (the loss) and LoRA.

One definition of each case, one timing path
--------------------------------------------
Every case is defined once, here (:func:`cases`): its shape, useful FLOPs, the implementations (ragkern's and
each peer's, :class:`Impl`) and how their inputs are built. Two front ends run those definitions, and both time
them the same way, through pytest-benchmark:

- the suites ``bench/test_{attention,loss,lora}_bench.py``: ``pytest bench/ --benchmark-only
  [--benchmark-json=FILE]``. One benchmark per (case, implementation, phase), timed by :func:`time_phase` with
  ``benchmark.pedantic``: fixed numbers of warm-up and timed rounds (harness.ROUNDS: quick 3 + 10, full 5 + 25,
  CPU 1 + 10; bench.gpu's dry run times one, its times only show that the code runs), one call per round, the forward and the backward as separate benchmarks (the backward's forward runs
  in the untimed setup), on CUDA synchronised after every call and the L2 cache flushed in the setup. The
  benchmark group is ``"<case> [<phase>]"``, so ``pytest-benchmark compare FILE`` shows ragkern beside each
  peer. Without a GPU the suites run the PyTorch paths at the dry run's tiny shapes in a few seconds.
- ``python -m bench.gpu`` (its parts attention, flce and lora): each case runs the same suites in process
  (:func:`run_case`: ``pytest.main([suite, '--benchmark-only', '--micro-case', KEY, '--benchmark-json', TMP])``)
  and folds their JSON into gpu_bench.json (:func:`fold`), in the shape the table and the speedup withholding
  read: ``impls`` with ``status``, ``median_ms`` (forward median + backward median), ``tflops``,
  ``peak_mem_bytes``, ``agrees``; ``best_peer`` and ``speedup_vs_best_peer``; plus each phase's statistics and a
  per-phase speedup. A warm-up worker (``Ctx.warm``) only makes the first calls (:func:`prepare`: compiles).

Before any timing, :func:`prepare` calls every implementation once, compares its outputs with ragkern's
(``agrees`` within the case's tolerance; with LoRA dropout each draws its own mask, so nothing is compared) and
measures its peak CUDA memory over one forward + backward. A peer that disagrees with ragkern is timed and shown
but gets no ratio; a forward-only peer is never the best peer of a forward + backward. That record travels in the
JSON under ``"ragkern"`` (pytest-benchmark's ``pytest_benchmark_update_json`` hook, bench/conftest.py), with the
skip reasons and errors of implementations that have no benchmark; the card is in ``machine_info["ragkern_device"]``.

The cases (real shapes; the dry run / CPU suites shrink them):

- attention on one 16k-token packed row of RAG lengths (``rag.packed_row``), bf16, 32 query / 8 kv heads, head_dim
  128 and 64, causal and with passage block masks (and 256 causal): ragkern as every layer calls it in training
  (``validate=False``; with blocks the tile lists are built once per batch, outside the timed calls; their build is
  its own benchmark, ``tile_build``, folded as ``metadata_build_ms``) vs SDPA example by example (flash backend,
  ``enable_gqa``; with blocks a dense mask per example), FlexAttention compiled with the document (and passage)
  mask, its block sizes tuned by benchmarking each of :data:`FLEX_CONFIGS` as its own peer (the fastest that agrees
  is the best peer: the winner is named in the record, ``flex_best_config``), torch's ``varlen_attn`` with
  ``enable_gqa`` (K/V not expanded; a torch without that keyword gets them expanded, and the note says so) and
  flash-attn's ``flash_attn_varlen_func`` when a wheel for the device's torch is installed (else skipped, saying so).
- the loss, D=4096, V=128,256, 16k rows of which 1k or 16k are targets, bf16: ragkern (all rows and the labels, as
  the trainer calls it) vs Liger-Kernel's FLCE, Cut Cross-Entropy and ``F.cross_entropy(h @ W.T)``, each given
  the target rows only (``h[rows]``, ``y[rows]``; all rows when every row is a target), as a user would. The hidden
  states are peaked like a trained LM's: :func:`peaked_hidden`.
- LoRA linear 4096 x 4096, r=16, 16k tokens, bf16, dropout 0 and 0.05: ragkern's kernel (and a peft layer routed
  to it by ``ragkern.lora.apply``) vs peft's own layer.

FLOPs are the useful work: attention ``4 * pairs * Hq * D`` forward and 2.5 x that backward (pairs the mask lets
through), cross-entropy ``2 * targets * D * V`` forward and twice that backward, LoRA ``2 T K N + 2 T r (K + N)``
forward and ``2 T K N + 4 T r (K + N)`` backward (W frozen).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import json
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import rag
from .harness import DRY_RUN_ROUNDS, ROUNDS, Ctx, free_memory, rel_err, short_traceback

ROOT = Path(__file__).resolve().parents[2]
SUITES = {part: ROOT / "bench" / f"test_{name}_bench.py" for part, name in
          (("attention", "attention"), ("flce", "loss"), ("lora", "lora"))}  # fmt: skip
# (warm-up rounds, timed rounds) per mode; every round is one call (pytest-benchmark pedantic, iterations=1).
# harness.ROUNDS by mode; --micro-rounds W,N overrides them (bench.gpu's dry run: DRY_RUN_ROUNDS, its times only
# show that the code runs).
rounds_override: tuple[int, int] | None = None


def rounds(ctx: Ctx) -> tuple[int, int]:
    return rounds_override or ROUNDS[ctx.mode]


# FlexAttention block sizes tried on CUDA, each benchmarked as its own peer ("" = torch's defaults). The sparse
# block mask stays at 128 x 128, which each of these tiles divides; backward keys satisfy N1 % M1 == M2 % N2 == 0.
FLEX_CONFIGS: dict[str, dict | None] = {
    "": None,
    "_m64n64": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
    "_m128n64": {
        "BLOCK_M": 128,
        "BLOCK_N": 64,
        "BLOCK_M1": 64,
        "BLOCK_N1": 128,
        "BLOCK_M2": 128,
        "BLOCK_N2": 64,
    },
}


@dataclass
class Impl:
    """One implementation of a case, as declared (what it needs at run time comes from :attr:`Case.build`)."""

    ours: bool = False
    note: str | None = None
    skip: str | None = None  # a reason: not run, shown as skipped
    compiles: bool = True  # worth a launch in bench.gpu's warm-up workers
    backward: bool = True  # False: timed forward only, never the best peer of a forward + backward
    compare: bool = True  # False: timed on its own, not an implementation of the case (the tile-list build)

    def phases(self) -> tuple[str, ...]:
        return ("build",) if not self.compare else ("fwd", "bwd") if self.backward else ("fwd",)


@dataclass
class Case:
    """A case: ``build()`` allocates the inputs and returns ``({impl name: runtime}, extra)``, a runtime being
    ``{"fwd": () -> output, "grad": output gradient (None: a scalar loss), "leaves": [tensors whose .grad is
    reset], "check": output -> {name: tensor}}`` (optionally ``"note"`` or ``"skip"``, known only then)."""

    part: str
    name: str  # bench.gpu's case name, e.g. "attention D=128 causal"
    key: str  # the test-id form, e.g. "attention-D128-causal" (--micro-case)
    shape: dict
    flops_fwd: float
    flops_bwd: float
    agree_tol: float
    impls: dict[str, Impl]
    build: Callable[[], tuple[dict, dict]] = field(repr=False)

    @property
    def flops(self) -> float:
        return self.flops_fwd + self.flops_bwd


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


# ----------------------------------------------------------------------------------------------- attention

_flex_compiled: dict = {}


def _flex():
    """FlexAttention, compiled on CUDA (eager elsewhere: the CPU has no flex backward, so it runs forward only).
    Every (shape, mask, block sizes) is a recompile of the one function: the limit is raised to hold them all."""
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _flex_compiled:
        if torch.cuda.is_available():
            import torch._dynamo as dynamo

            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, max(getattr(dynamo.config, name), 256))
            _flex_compiled["fn"] = torch.compile(flex_attention, dynamic=False)
        else:

            def eager(*args, **kwargs):  # its warning (an unfused path that materialises scores) is known
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "flex_attention called without", UserWarning)
                    return flex_attention(*args, **kwargs)

            _flex_compiled["fn"] = eager
    return _flex_compiled["fn"]


def _varlen_fn():
    with contextlib.suppress(ImportError):
        from torch.nn.attention import varlen as varlen_mod

        return getattr(varlen_mod, "varlen_attn", None)
    return None


def _varlen_kwargs(fn: Callable, Hq: int, Hkv: int) -> tuple[dict, bool]:
    """Causal and GQA keywords of torch's ``varlen_attn`` across versions (2.10: ``is_causal``; later:
    ``window_size=(-1, 0)``); False when it cannot do GQA itself (k, v then expanded beforehand)."""
    params = inspect.signature(fn).parameters
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = Hq == Hkv or "enable_gqa" in params
    if Hq != Hkv and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw, gqa


def attention_case(ctx: Ctx, head_dim: int, blocks: bool) -> Case:
    total = 256 if ctx.dry else 16384
    (Hq, Hkv), D, dev = ((4, 2) if ctx.dry else (32, 8)), head_dim, ctx.device
    lengths, blk_cpu = rag.packed_row(total, seed=0, scale=1 / 32 if ctx.dry else 1.0)
    pairs = rag.visible_pairs(lengths, blk_cpu if blocks else None)
    bw = ctx.cuda  # the CPU has no FlexAttention backward: there it runs forward only
    ours = "ragkern_triton" if ctx.cuda else "ragkern_torch"
    impls = {ours: Impl(ours=True, note="as a layer in training: validate=False (rows checked once per batch)"
                        + ("; block tile lists prebuilt once per batch (tile_build)" if blocks and ctx.cuda else ""))}  # fmt: skip
    if blocks and ctx.cuda:
        impls["ragkern_triton_tiles_per_call"] = Impl(
            ours=True, compiles=False,
            note="tile lists rebuilt in every call (the forward's and the backward's): the cost before they were shared",
        )  # fmt: skip
        impls["tile_build"] = Impl(ours=True, compare=False, note="block_tiles(): fwd, dK/dV and dQ tile lists, "
                                   "built once per batch")  # fmt: skip
    if blocks:
        impls["sdpa_masked_per_example"] = Impl(compiles=False, note="dense (L, L) mask per example, default "
                                                "backend; k/v expanded to the query heads beforehand")  # fmt: skip
    else:
        impls["sdpa_flash_per_example"] = Impl(
            compiles=False, note="flash backend, enable_gqa, one example at a time"
        )
    flex = "flex_blocks" if blocks else "flex_doc"
    for suffix, opts in FLEX_CONFIGS.items() if ctx.cuda else [("", None)]:
        impls[flex + suffix] = Impl(
            backward=bw,
            note=(f"compiled, kernel_options={opts or 'defaults'}; block mask built once, outside the timing"
                  if bw else "CPU: eager, forward only (FlexAttention has no CPU backward)"),
        )  # fmt: skip
    if not blocks:  # varlen_attn takes no mask beyond causal / window: not a peer for passage blocks
        varlen = _varlen_fn()
        skip = ("torch.nn.attention.varlen.varlen_attn not in this torch" if varlen is None
                else None if ctx.cuda else "varlen_attn needs CUDA")  # fmt: skip
        note = None
        if varlen is not None:
            kw, gqa = _varlen_kwargs(varlen, Hq, Hkv)
            note = f"keywords {sorted(kw)}" + ("; GQA in the kernel, K/V not expanded" if gqa and Hq != Hkv
                                               else "" if gqa else "; no enable_gqa in this torch: K/V expanded")  # fmt: skip
        impls["torch_varlen"] = Impl(skip=skip, compiles=False, note=note)
        try:
            import flash_attn  # noqa: F401

            skip = None if ctx.cuda else "flash-attn needs CUDA"
        except Exception as e:  # noqa: BLE001 - a wheel built for another torch fails with more than ImportError
            skip = f"flash_attn not importable: {type(e).__name__}: {e}"[:300]
        impls["flash_attn_varlen"] = Impl(skip=skip, compiles=False, note="flash_attn_varlen_func, causal, GQA in "
                                          "the kernel (K/V not expanded)")  # fmt: skip

    def build() -> tuple[dict, dict]:
        from ragkern.kernels import block_tiles, varlen_attention
        from ragkern.kernels.attention import block_mask
        from ragkern.kernels.attention import triton as have_triton
        from torch.nn.attention import SDPBackend, sdpa_kernel

        blk = blk_cpu.to(dev) if blocks else None
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (
            torch.randn(total, H, D, generator=g).to(dev, torch.bfloat16) for H in (Hq, Hkv, Hkv, Hq)
        )
        backend = "triton" if ctx.cuda else "torch"
        out: dict = {}

        def bhtd(x):  # (T, H, D) -> (1, H, T, D), contiguous: the layout SDPA and flex take
            return _leaf(x.transpose(0, 1).unsqueeze(0).contiguous())

        def canon(o):  # (1, H, T, D) -> (T, H, D)
            return o[0].transpose(0, 1)

        def tiles_build():  # once per batch in training (the first layer), shared by every layer
            return block_tiles(cu, blk, max(lengths), head_dim=D, dtype=torch.bfloat16)

        tiles = tiles_build() if blocks and have_triton is not None else None
        lq, lk, lv = (_leaf(x) for x in (q, k, v))
        out[ours] = dict(
            leaves=[lq, lk, lv], grad=do, check=lambda o: {"out": o},
            fwd=lambda: varlen_attention(lq, lk, lv, cu, max(lengths), block_ids=blk, block_tiles=tiles,
                                         backend=backend, validate=False),
        )  # fmt: skip
        if "ragkern_triton_tiles_per_call" in impls:
            pq, pk, pv = (_leaf(x) for x in (q, k, v))
            out["ragkern_triton_tiles_per_call"] = dict(
                leaves=[pq, pk, pv], grad=do, check=lambda o: {"out": o},
                fwd=lambda: varlen_attention(pq, pk, pv, cu, max(lengths), block_ids=blk, backend="triton",
                                             validate=False),
            )  # fmt: skip
        if "tile_build" in impls:
            out["tile_build"] = dict(leaves=[], grad=None, check=lambda o: {}, fwd=tiles_build)
        bq, bk, bv = bhtd(q), bhtd(k), bhtd(v)
        ek, ev = (_leaf(x.repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1).unsqueeze(0).contiguous())
                  for x in (k, v))  # fmt: skip
        do_b = do.transpose(0, 1).unsqueeze(0).contiguous()
        if not blocks:

            def flash(kk, vv, gqa):
                ctxm = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if ctx.cuda else contextlib.nullcontext()
                with ctxm:
                    outs = [F.scaled_dot_product_attention(bq[:, :, s:e], kk[:, :, s:e], vv[:, :, s:e],
                                                           is_causal=True, enable_gqa=gqa) for s, e in bounds]  # fmt: skip
                return torch.cat(outs, dim=2)

            gqa_ok = True
            if ctx.cuda:  # the flash backend with enable_gqa, else k/v expanded to the query heads beforehand
                try:
                    flash(bk, bv, True)
                except Exception:  # noqa: BLE001 - "No available kernel" and the like
                    gqa_ok = False
            out["sdpa_flash_per_example"] = dict(
                leaves=[bq, bk, bv] if gqa_ok else [bq, ek, ev], grad=do_b, check=lambda o: {"out": canon(o)},
                fwd=(lambda: flash(bk, bv, True)) if gqa_ok else (lambda: flash(ek, ev, False)),
                note=None if gqa_ok else "flash backend refused enable_gqa: k/v expanded to the query heads beforehand",
            )  # fmt: skip
        else:
            masks = [block_mask(blk[s:e], causal=True) for s, e in bounds]

            def masked():
                outs = [F.scaled_dot_product_attention(bq[:, :, s:e], ek[:, :, s:e], ev[:, :, s:e], attn_mask=m)
                        for (s, e), m in zip(bounds, masks)]  # fmt: skip
                return torch.cat(outs, dim=2)

            out["sdpa_masked_per_example"] = dict(leaves=[bq, ek, ev], grad=do_b, fwd=masked,
                                                  check=lambda o: {"out": canon(o)})  # fmt: skip
        try:  # FlexAttention: document mask (+ the passage rule), block mask built once outside the timing
            from torch.nn.attention.flex_attention import and_masks, create_block_mask

            ids = torch.arange(len(lengths), dtype=torch.int32, device=dev)
            doc = torch.repeat_interleave(ids, torch.tensor(lengths, device=dev))

            def causal(b, h, qi, ki):
                return qi >= ki

            def same_doc(b, h, qi, ki):
                return doc[qi] == doc[ki]

            def passage(b, h, qi, ki):
                return (blk[qi] == 0) | (blk[qi] == blk[ki])

            mods = [causal, same_doc] + ([passage] if blocks else [])
            bm = create_block_mask(and_masks(*mods), None, None, total, total, device=dev)
            for name in (n for n in impls if n.startswith(flex)):
                opts = FLEX_CONFIGS[name[len(flex) :]] if ctx.cuda else None
                fq, fk, fv = (bhtd(x).requires_grad_(bw) for x in (q, k, v))
                out[name] = dict(
                    leaves=[fq, fk, fv] if bw else [], grad=do_b if bw else None, check=lambda o: {"out": canon(o)},
                    fwd=lambda fq=fq, fk=fk, fv=fv, opts=opts: _flex()(fq, fk, fv, block_mask=bm, enable_gqa=True,
                                                                       **({"kernel_options": opts} if opts else {})),
                )  # fmt: skip
        except ImportError as e:
            for name in (n for n in impls if n.startswith(flex)):
                out[name] = dict(skip=f"FlexAttention not importable: {e}")
        if "torch_varlen" in impls and impls["torch_varlen"].skip is None:
            varlen = _varlen_fn()
            kw, gqa = _varlen_kwargs(varlen, Hq, Hkv)
            vk, vv = ((_leaf(x) for x in (k, v)) if gqa
                      else (_leaf(x.repeat_interleave(Hq // Hkv, dim=1)) for x in (k, v)))  # fmt: skip
            vq = _leaf(q)
            out["torch_varlen"] = dict(leaves=[vq, vk, vv], grad=do, check=lambda o: {"out": o},
                                       fwd=lambda: varlen(vq, vk, vv, cu, cu, max(lengths), max(lengths), **kw))  # fmt: skip
        if "flash_attn_varlen" in impls and impls["flash_attn_varlen"].skip is None:
            from flash_attn import flash_attn_varlen_func

            aq, ak, av = (_leaf(x) for x in (q, k, v))
            out["flash_attn_varlen"] = dict(
                leaves=[aq, ak, av], grad=do, check=lambda o: {"out": o},
                fwd=lambda: flash_attn_varlen_func(aq, ak, av, cu, cu, max(lengths), max(lengths), causal=True),
            )  # fmt: skip
        return out, {}

    kind = "blocks" if blocks else "causal"
    return Case(
        part="attention", name=f"attention D={D} {kind}", key=f"attention-D{D}-{kind}",
        shape={"tokens": total, "examples": len(lengths), "max_len": max(lengths), "Hq": Hq, "Hkv": Hkv,
               "head_dim": D, "blocks": blocks, "visible_pairs": pairs, "dtype": "bf16"},
        flops_fwd=4.0 * pairs * Hq * D, flops_bwd=2.5 * 4.0 * pairs * Hq * D, agree_tol=5e-2, impls=impls, build=build,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- the loss


def peaked_hidden(
    weight: torch.Tensor, tokens: torch.Tensor, noise: float, g: torch.Generator
) -> torch.Tensor:
    """Final hidden states whose softmax is peaked like a trained LM's: ``h = alpha * W[t] + noise * z``, ``z`` ~
    N(0, I), ``t`` the row's next token, ``alpha = ln V``.

    With W's rows of norm about 1 (``W ~ N(0, 1/D)``), the next token's logit is about ``ln V`` and every other
    logit about N(0, noise^2): the next token takes ``1 / (1 + e^(noise^2 / 2))`` of the mass (0.38 at noise 1, a
    loss near 1 nat, what an instruction-tuned model scores on answer tokens), and the tail is far below Cut
    Cross-Entropy's gradient filter (2^-12) almost everywhere, as in real use. Random hidden states (``h ~ N(0,
    I)``) instead give a near-uniform softmax that the filter cannot skip; the hidden states of a small
    random-init model are near-uniform too, so a real forward would need a trained model, which a micro-benchmark
    does not carry. The mean loss is recorded with the case."""
    V, D = weight.shape
    z = torch.randn(tokens.numel(), D, generator=g)
    return math.log(V) * weight.float().cpu()[tokens] + noise * z


def flce_case(ctx: Ctx, targets: int) -> Case:
    N, D, V = (256, 64, 1000) if ctx.dry else (16384, 4096, 128256)
    n_t = max(1, targets * N // 16384)
    cuda = None if ctx.cuda else "needs CUDA"
    rows_note = (
        "all rows (every row a target)"
        if n_t == N
        else "the target rows only (h[rows], y[rows]), as a user hands them"
    )
    impls = {
        "ragkern": Impl(ours=True, note="impl='chunked' (the default), all rows and the labels (as the trainer calls "
                        "it): cuBLAS GEMMs over the target rows in chunks of <= 256 MiB of logits, one Triton row "
                        "kernel per chunk"),
        "ragkern_triton": Impl(ours=True, note="impl='triton': the Triton kernels that never hold logits",
                               skip=None if ctx.cuda else "needs CUDA (the interpreter computes bf16 dots wrongly; "
                               "correctness checks impl='triton' in fp32 / fp16)"),
    }  # fmt: skip
    try:
        import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401

        impls["liger_flce"] = Impl(
            skip=cuda,
            note=f"LigerFusedLinearCrossEntropyLoss on {rows_note}; it "
            "computes the gradients in its forward: compare forward + backward",
        )
    except ImportError as e:
        impls["liger_flce"] = Impl(skip=f"liger_kernel not importable: {e}")
    try:
        import cut_cross_entropy  # noqa: F401

        impls["cut_cross_entropy"] = Impl(skip=cuda, note=f"linear_cross_entropy, default options (impl 'cce', "
                                          f"filter_eps 'high'), on {rows_note}")  # fmt: skip
    except ImportError as e:
        impls["cut_cross_entropy"] = Impl(skip=f"cut_cross_entropy not importable: {e}")
    impls["torch_matmul_ce"] = Impl(
        compiles=False, note=f"F.cross_entropy(h @ W.T, y) on {rows_note}: bf16 logits"
    )

    def build() -> tuple[dict, dict]:
        from ragkern.kernels import fused_linear_cross_entropy

        dev, bf16 = ctx.device, torch.bfloat16
        g = torch.Generator().manual_seed(0)
        w0 = torch.randn(V, D, generator=g) * D**-0.5
        nxt = torch.randint(0, V, (N,), generator=g)  # every row's next token; the targets are some of them
        h0 = peaked_hidden(w0, nxt, 1.0, g).to(dev, bf16)
        w0 = w0.to(dev, bf16)
        y = torch.full((N,), -100, dtype=torch.long)
        pos = torch.randperm(N, generator=g)[:n_t]
        y[pos] = nxt[pos]
        y = y.to(dev)
        rows = (y != -100).nonzero().squeeze(1)
        every = n_t == N
        yt = y if every else y[rows]

        def impl(fn):
            h, w = _leaf(h0), _leaf(w0)
            return dict(leaves=[h, w], grad=None, fwd=lambda: fn(h if every else h[rows], w),
                        check=lambda out: {"loss": out.float(), "dh": h.grad, "dW": w.grad})  # fmt: skip

        def ours(**kw):
            h, w = _leaf(h0), _leaf(w0)
            return dict(leaves=[h, w], grad=None, fwd=lambda: fused_linear_cross_entropy(h, w, y, **kw),
                        check=lambda out: {"loss": out.float(), "dh": h.grad, "dW": w.grad})  # fmt: skip

        out = {"ragkern": ours(backend="triton" if ctx.cuda else "torch", impl="chunked")}
        if not impls["ragkern_triton"].skip:
            out["ragkern_triton"] = ours(backend="triton", impl="triton")
        if not impls["liger_flce"].skip:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            out["liger_flce"] = impl(lambda h, w: liger(w, h, yt))
        if not impls["cut_cross_entropy"].skip:
            from cut_cross_entropy import linear_cross_entropy

            out["cut_cross_entropy"] = impl(lambda h, w: linear_cross_entropy(h, w, yt))
        out["torch_matmul_ce"] = impl(lambda h, w: F.cross_entropy(h @ w.T, yt))
        with torch.no_grad():  # in chunks of rows: the fp32 logits of 16k rows would take 8 GB
            wf = w0.float()
            loss = sum(
                float(F.cross_entropy(h0[c].float() @ wf.T, y[c], reduction="sum")) for c in rows.split(1024)
            )
        return out, {"mean_target_loss_nats": round(loss / n_t, 3)}

    return Case(
        part="flce", name=f"flce {targets // 1024}k targets", key=f"flce-{targets // 1024}k",
        shape={"N": N, "D": D, "V": V, "targets": n_t, "dtype": "bf16",
               "hidden": "peaked: ln(V) * W[next token] + N(0, I) (bench.gpu.micro.peaked_hidden)"},
        flops_fwd=2.0 * n_t * D * V, flops_bwd=4.0 * n_t * D * V, agree_tol=3e-2, impls=impls, build=build,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- LoRA


def lora_case(ctx: Ctx, dropout: float) -> Case:
    T, K, N, r = (128, 64, 64, 4) if ctx.dry else (16384, 4096, 4096, 16)
    impls = {
        "ragkern_kernel": Impl(ours=True, note="ragkern.kernels.lora_linear"),
        "ragkern_peft_layer": Impl(ours=True, note="peft layer after ragkern.lora.apply"),
        "peft": Impl(note="peft's own LoRA layer"),
    }

    def build() -> tuple[dict, dict]:
        from peft import LoraConfig, get_peft_model
        from ragkern.kernels import lora_linear

        import ragkern.lora

        dev, bf16 = ctx.device, torch.bfloat16
        torch.manual_seed(0)
        base = torch.nn.Sequential()
        base.add_module("proj", torch.nn.Linear(K, N, bias=False))
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                target_modules=["proj"]))  # fmt: skip
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(
                std=r**-0.5
            )  # peft starts B at zero: that hides wrong math
        model.to(dev, bf16).train()
        fused_model = copy.deepcopy(model)
        summary = ragkern.lora.apply(fused_model)
        fused_layer = fused_model.base_model.model.proj
        g = torch.Generator().manual_seed(1)
        x0, gy = (torch.randn(T, d, generator=g).to(dev, bf16) for d in (K, N))
        scaling = layer.scaling["default"]
        w = layer.base_layer.weight  # frozen

        def outputs(out, x):  # with dropout each implementation draws its own mask: nothing to compare
            return {"y": out, "dx": x.grad} if dropout == 0 else {}

        def peft_like(lay, note=None):
            x = _leaf(x0)
            a, b = lay.lora_A["default"].weight, lay.lora_B["default"].weight
            return dict(leaves=[x, a, b], grad=gy, fwd=lambda: lay(x), check=lambda out: outputs(out, x),
                        **({"note": note} if note else {}))  # fmt: skip

        x = _leaf(x0)
        a, b = (_leaf(layer.lora_A["default"].weight), _leaf(layer.lora_B["default"].weight))
        out = {
            "ragkern_kernel": dict(leaves=[x, a, b], grad=gy, check=lambda o: outputs(o, x),
                                   fwd=lambda: lora_linear(x, w, a, b, scaling, dropout_p=dropout,
                                                           backend="triton" if ctx.cuda else "torch")),
            "ragkern_peft_layer": peft_like(fused_layer, note=f"peft layer after ragkern.lora.apply: {summary}"),
            "peft": peft_like(layer),
        }  # fmt: skip
        return out, ({"agree_note": "dropout masks differ between implementations: outputs not compared"}
                     if dropout > 0 else {})  # fmt: skip

    return Case(
        part="lora", name=f"lora dropout={dropout}", key=f"lora-p{dropout}",
        shape={"T": T, "K": K, "N": N, "r": r, "dropout": dropout, "dtype": "bf16"},
        flops_fwd=2.0 * T * K * N + 2.0 * T * r * (K + N), flops_bwd=2.0 * T * K * N + 4.0 * T * r * (K + N),
        agree_tol=5e-2, impls=impls, build=build,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- the cases

_CASE_ARGS = {
    "attention": (attention_case, lambda ctx: [dict(head_dim=D, blocks=b) for D in ([16] if ctx.dry else [128, 64])
                                               for b in (False, True)]
                  + ([] if ctx.dry else [dict(head_dim=256, blocks=False)])),  # D=256 last: as the budget allows
    "flce": (flce_case, lambda ctx: [dict(targets=t) for t in (1024, 16384)]),
    "lora": (lora_case, lambda ctx: [dict(dropout=p) for p in (0.0, 0.05)]),
}  # fmt: skip


def cases(ctx: Ctx, part: str) -> list[Case]:
    """The cases of one part (attention, flce, lora), in run order: the single definition both front ends use."""
    if part not in _CASE_ARGS:
        raise ValueError(part)
    fn, args = _CASE_ARGS[part]
    return [fn(ctx, **kw) for kw in args(ctx)]


@dataclass
class Item:
    """One benchmark of the suites: a case, one implementation, one phase."""

    case: Case
    impl: str
    phase: str

    @property
    def id(self) -> str:
        return f"{self.case.key}-{self.impl}-{self.phase}"


def items(ctx: Ctx, part: str, only: list[str] | None = None) -> list[Item]:
    """The suites' parameters: every (case, implementation, phase) of ``part``, case by case (``only``: keys)."""
    return [Item(c, n, p) for c in cases(ctx, part) if not only or c.key in only
            for n, impl in c.impls.items() for p in impl.phases()]  # fmt: skip


# ----------------------------------------------------------------------------------------------- running


def _step(rt: dict, backward: bool):
    out = rt["fwd"]()
    if backward:
        out.backward(rt["grad"]) if rt["grad"] is not None else out.backward()
    return out


def _reset(rt: dict) -> None:
    for t in rt.get("leaves", ()):
        t.grad = None


@dataclass
class Prepared:
    case: Case
    runtimes: dict
    record: dict  # the case's record: shape, flops, impls (status, agreement, memory, phases), extras


def prepare(ctx: Ctx, case: Case) -> Prepared:
    """Build the case, call every implementation once (compiles), check its outputs against ragkern's and
    measure its peak CUDA memory over one forward + backward. In a warm-up worker, only the first calls."""
    runtimes, extra = case.build()
    impls: dict = {}
    seen: dict = {}
    for name, impl in case.impls.items():
        rt = runtimes.get(name) or {}
        entry = impls[name] = {"ours": impl.ours}
        if rt.get("note") or impl.note:
            entry["note"] = rt.get("note") or impl.note
        if not impl.backward:
            entry["forward_only"] = True
        skip = impl.skip or rt.get("skip") or (None if rt else "not built")
        if skip:
            entry.update(status="skipped", reason=skip)
            continue
        if ctx.warm and not impl.compiles:
            continue
        backward = impl.backward and impl.compare
        try:
            _reset(rt)
            out = _step(rt, backward)  # compiles; in a warm-up worker, all there is to do
            ctx.sync()
            if not ctx.warm and impl.compare:
                seen[name] = {k: v.detach().clone() for k, v in rt["check"](out).items()}
            del out
            if not ctx.warm:
                entry["peak_mem_bytes"] = ctx.peak_bytes(
                    lambda rt=rt, bw=backward: _step(rt, bw), grad_to_none=rt["leaves"]
                )
            entry["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - a failing peer must not cost the others their numbers
            entry.update(status="error", error=f"{type(e).__name__}: {e}"[:1500], traceback=short_traceback())
        _reset(rt)
        free_memory(ctx)
    ours = next(n for n, i in case.impls.items() if i.ours)
    ref = seen.get(ours)
    for name, got in seen.items():
        if name != ours and ref is not None and not case.impls[name].ours:
            diffs = {k: float(f"{rel_err(got[k], ref[k]):.3e}") for k in got if k in ref}
            impls[name]["rel_diff_vs_ragkern"] = diffs
            impls[name]["agrees"] = all(d <= case.agree_tol for d in diffs.values())
    record = {"part": case.part, "name": case.name, "shape": case.shape, "flops": case.flops,
              "flops_fwd": case.flops_fwd, "flops_bwd": case.flops_bwd, "agree_tol": case.agree_tol,
              "backward": any(i.backward for i in case.impls.values() if not i.ours), "impls": impls, **extra}  # fmt: skip
    return Prepared(case, runtimes, record)


def _l2_flusher(ctx: Ctx) -> Callable[[], None]:
    """On CUDA: zero a 256 MiB buffer (more than any L2), so no call starts with its inputs cached by the last."""
    if not ctx.cuda:
        return lambda: None
    buf = torch.empty(256 << 20, dtype=torch.int8, device=ctx.device)
    return buf.zero_


def time_phase(ctx: Ctx, pedantic: Callable, rt: dict, phase: str, backward: bool = True):
    """THE timing path of every micro-benchmark: ``pedantic`` is pytest-benchmark's ``benchmark.pedantic``.
    ``fwd``: the forward as in training (autograd records), ``bwd``: the backward of a forward made in the
    untimed setup, ``build``: a call with nothing to differentiate. Fixed rounds (:data:`ROUNDS`), one call each;
    CUDA: synchronised after the call, the L2 flushed and the gradients reset in the setup."""
    warmup, timed = rounds(ctx)
    flush = _l2_flusher(ctx)

    if phase == "bwd":

        def setup():
            _reset(rt)
            out = rt["fwd"]()
            flush()
            ctx.sync()
            return (out,), {}

        def target(out):
            out.backward(rt["grad"]) if rt["grad"] is not None else out.backward()
            ctx.sync()

    else:

        def setup():
            _reset(rt)
            flush()
            ctx.sync()
            return (), {}

        def target():
            out = rt["fwd"]()
            ctx.sync()
            return out  # freed after the clock stops

    try:
        return pedantic(target, setup=setup, rounds=timed, warmup_rounds=warmup, iterations=1)
    finally:
        _reset(rt)


_PREPARED: dict = {}  # the one case whose tensors are alive: {"key": ..., "prep": Prepared}
REPORT: dict = {"cases": {}}  # what the suites add to the pytest-benchmark JSON under "ragkern"


def prepared(ctx: Ctx, case: Case) -> Prepared:
    """The prepared case, built on first use; the previous case's tensors are freed first (one case at a time)."""
    if _PREPARED.get("key") != case.key:
        release()
        prep = prepare(ctx, case)
        _PREPARED.update(key=case.key, prep=prep)
        REPORT["cases"][case.key] = prep.record
    return _PREPARED["prep"]


def release() -> None:
    _PREPARED.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(ctx: Ctx) -> str:
    return torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu"


def bench_item(ctx: Ctx, benchmark, item: Item) -> None:
    """Run one suite benchmark (the body of every test in bench/test_*_bench.py)."""
    import pytest

    prep = prepared(ctx, item.case)
    impl, entry = item.case.impls[item.impl], prep.record["impls"][item.impl]
    if entry.get("status") == "skipped":
        pytest.skip(f"{item.impl}: {entry['reason']}")
    if entry.get("status") != "ok":
        msg = f"{item.impl} failed its first call: {entry.get('error')}"
        pytest.fail(msg) if impl.ours else pytest.skip(msg)
    benchmark.group = f"{item.case.name} [{item.phase}]"
    flops = {"fwd": item.case.flops_fwd, "bwd": item.case.flops_bwd}.get(item.phase)
    benchmark.extra_info.update(
        case=item.case.key, case_name=item.case.name, part=item.case.part, impl=item.impl, phase=item.phase,
        ours=impl.ours, device=device_name(ctx), mode=ctx.mode, flops=flops,
        **{k: entry[k] for k in ("agrees", "rel_diff_vs_ragkern", "peak_mem_bytes", "note") if k in entry},
    )  # fmt: skip
    try:
        time_phase(ctx, benchmark.pedantic, prep.runtimes[item.impl], item.phase, impl.backward)
    except BaseException as e:
        entry.setdefault("phase_errors", {})[item.phase] = f"{type(e).__name__}: {e}"[:1500]
        raise


# ----------------------------------------------------------------------------------------------- bench.gpu


def _ms(stats: dict) -> dict:
    return {"median_ms": round(stats["median"] * 1e3, 4), "q1_ms": round(stats["q1"] * 1e3, 4),
            "q3_ms": round(stats["q3"] * 1e3, 4), "min_ms": round(stats["min"] * 1e3, 4),
            "max_ms": round(stats["max"] * 1e3, 4), "rounds": stats["rounds"]}  # fmt: skip


def fold(data: dict, key: str) -> dict:
    """One case of a pytest-benchmark JSON written by the suites, as bench.gpu records a case: each
    implementation's phases, ``median_ms`` = forward median + backward median (the forward alone for a
    forward-only peer), ``tflops``, and the ratios (:func:`_ratios`) over the whole step and per phase."""
    rec = json.loads(json.dumps(data["ragkern"]["cases"][key]))
    impls = rec["impls"]
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if x.get("case") == key and x.get("impl") in impls:
            impls[x["impl"]].setdefault("phases", {})[x["phase"]] = _ms(b["stats"])
    build = impls.pop("tile_build", None)
    if build is not None:
        ph = build.get("phases", {}).get("build")
        if ph:
            rec["metadata_build_ms"] = ph["median_ms"]
            rec["metadata_build"] = {**ph, "note": build.get("note")}
        else:
            rec["metadata_build_error"] = (
                build.get("error") or build.get("phase_errors") or build.get("reason")
            )
    for r in impls.values():
        if r.get("status") != "ok":
            continue
        need = ("fwd",) if r.get("forward_only") else ("fwd", "bwd")
        ph = r.get("phases", {})
        missing = [p for p in need if p not in ph]
        if missing:
            r["status"] = "error"
            r["error"] = f"no benchmark of {missing}: " + json.dumps(r.get("phase_errors", "not run"))[:1500]
            continue
        r["median_ms"] = round(sum(ph[p]["median_ms"] for p in need), 4)
        flops = sum(rec[f"flops_{p}"] for p in need)
        r["tflops"] = round(flops / (r["median_ms"] * 1e-3) / 1e12, 2)
    rec.update(_ratios(impls))
    for phase in ("fwd", "bwd"):
        timed = {n: {**r, "median_ms": r["phases"][phase]["median_ms"], "forward_only": False}
                 for n, r in impls.items() if r.get("status") == "ok" and phase in r.get("phases", {})}  # fmt: skip
        per = _ratios(timed)
        if "best_peer" in per:
            rec[f"best_peer_{phase}"] = per["best_peer"]
            for n, r in timed.items():
                if "speedup_vs_best_peer" in r:
                    impls[n][f"speedup_{phase}_vs_best_peer"] = r["speedup_vs_best_peer"]
    flex = [
        n
        for n in impls
        if n.startswith("flex_") and impls[n].get("status") == "ok" and impls[n].get("agrees")
    ]
    if flex:
        rec["flex_best_config"] = min(flex, key=lambda n: impls[n]["median_ms"])
    rec.pop("part", None)
    rec.pop("name", None)
    return rec


def _ratios(results: dict) -> dict:
    timed = {n: r for n, r in results.items() if not r["ours"] and r["status"] == "ok"}
    peers = {n: r for n, r in timed.items() if r.get("agrees", False) and not r.get("forward_only")}
    out = {
        "peers_timed": sorted(timed),
        "peers_disagreeing": sorted(n for n, r in timed.items() if not r.get("agrees")),
    }
    if not peers:
        return out
    best = min(peers, key=lambda n: peers[n]["median_ms"])
    out["best_peer"] = best
    for r in results.values():
        if r["ours"] and r["status"] == "ok":
            r["speedup_vs_best_peer"] = round(peers[best]["median_ms"] / r["median_ms"], 3)
    return out


def run_case(ctx: Ctx, case: Case) -> dict:
    """bench.gpu's side: run the case's benchmarks through pytest-benchmark in this process and fold the JSON.
    A warm-up worker only prepares the case (its compiles land in the on-disk caches)."""
    if ctx.warm:
        try:
            prepare(ctx, case)
        finally:
            release()
        return {}
    import pytest

    try:
        import pytest_benchmark  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "the micro-benchmarks are pytest-benchmark suites: pip install pytest-benchmark"
        ) from e
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "micro.json"
        args = [str(SUITES[case.part]), "--benchmark-only", f"--benchmark-json={path}", "--micro-case", case.key,
                "--micro-mode", ctx.mode, "--micro-device", str(ctx.device), "-q", "-s", "-o", "addopts=",
                "-p", "no:cacheprovider", "-p", "no:anyio", "--rootdir", str(ROOT),
                "--benchmark-columns=min,median,iqr,rounds"]  # fmt: skip
        if ctx.dry:
            args += ["--micro-rounds", ",".join(map(str, DRY_RUN_ROUNDS))]
        try:
            code = pytest.main(args)
        finally:
            release()
        if not path.exists():
            raise RuntimeError(f"pytest {' '.join(args)} exited {code} without writing {path.name}")
        data = json.loads(path.read_text())
    if case.key not in data.get("ragkern", {}).get("cases", {}):
        raise RuntimeError(f"pytest exited {code}; the case {case.key} was not prepared")
    out = fold(data, case.key)
    used = DRY_RUN_ROUNDS if ctx.dry else ROUNDS[ctx.mode]
    out["pytest_benchmark"] = {"exit_code": int(code), "version": data.get("version"),
                               "rounds": dict(zip(("warmup", "timed"), used)),
                               "device": data.get("machine_info", {}).get("ragkern_device")}  # fmt: skip
    return out


def attention_bench(ctx: Ctx, head_dim: int, blocks: bool) -> dict:
    return run_case(ctx, attention_case(ctx, head_dim, blocks))


def flce_bench(ctx: Ctx, targets: int) -> dict:
    return run_case(ctx, flce_case(ctx, targets))


def lora_bench(ctx: Ctx, dropout: float) -> dict:
    return run_case(ctx, lora_case(ctx, dropout))


_BENCH = {"attention": attention_bench, "flce": flce_bench, "lora": lora_bench}


def plan(ctx: Ctx, part: str) -> list[tuple[str, object, dict, bool]]:
    """bench.gpu's cases of one part: ``(name, fn, kwargs, warmable)``, from :func:`cases`."""
    if part not in _BENCH:
        raise ValueError(part)
    fn, args = _CASE_ARGS[part]
    return [(c.name, _BENCH[part], kw, True) for c, kw in zip(cases(ctx, part), args(ctx))]
