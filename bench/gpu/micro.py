"""Microbenchmarks, forward + backward, each against the peers installed in the same run:

- attention on one 16k-token packed row of RAG lengths (``rag.packed_row``), bf16, 32 query / 8 kv heads,
  head_dim 64 and 128, with and without passage block masks (and 256 causal): ragkern's Triton kernel called as every layer calls it
  in training (``validate=False``; with blocks, the tile lists built once per batch, outside the timed call, and
  their build timed on its own as ``metadata_build_ms``; ``ragkern_triton_tiles_per_call`` rebuilds them in every
  call, as before they were shared) vs SDPA (flash backend)
  example by example, FlexAttention (compiled) with a document mask (and the passage rule), torch's
  ``varlen_attn`` when the installed torch has it; with blocks, SDPA example by example with a dense mask;
- fused linear cross-entropy, D=4096, V=128,256, 16k rows of which 1k or 16k are targets, bf16: ragkern vs
  Liger-Kernel's FLCE vs Cut Cross-Entropy vs ``F.cross_entropy(h @ W.T)`` (and the same on target rows only);
  time and peak memory;
- LoRA linear 4096 x 4096, r=16, 16k tokens, bf16, dropout 0 and 0.05: ragkern's kernel (and a peft layer
  routed to it by ``ragkern.lora.apply``) vs peft's own layer.

Each implementation: one untimed call (compiles), its output checked against ragkern's, then the median of
``do_bench``; ``speedup_vs_best_peer`` = the fastest peer that agrees with ragkern / ragkern, same run.
FLOPs are the useful work: attention ``3.5 * 4 * pairs * Hq * D`` (pairs the mask lets through, backward
2.5 x forward), cross-entropy ``6 * targets * D * V``, LoRA ``4 T K N + 6 T r (K + N)`` (W frozen).
Dry run: the same code on tiny shapes on the CPU (torch paths; peers that need CUDA are skipped).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import rag
from .harness import Ctx, free_memory, rel_err, short_traceback, tflops


def _measure(ctx: Ctx, impls: dict, flops: float, agree_tol: float) -> dict:
    """Run, check and time each implementation; ``impls[name]`` holds ``fwd`` (-> output), ``grad`` (for the
    output's backward, None: a scalar loss), ``leaves``, ``check(out) -> {name: tensor}``, ``ours``,
    ``compiles`` (worth a warm-up launch), and optionally ``backward=False`` (time the forward alone), ``skip``
    (a reason) and ``note``."""
    results, seen, ours_name = {}, {}, next(n for n, i in impls.items() if i.get("ours"))
    for name, impl in impls.items():
        entry = {"ours": bool(impl.get("ours"))}
        if impl.get("note"):
            entry["note"] = impl["note"]
        if impl.get("skip"):
            results[name] = {**entry, "status": "skipped", "reason": impl["skip"]}
            continue
        if ctx.warm and not impl.get("compiles", True):
            continue

        def step(impl=impl):
            out = impl["fwd"]()
            if impl.get("backward", True):
                out.backward(impl["grad"]) if impl["grad"] is not None else out.backward()
            return out

        try:
            for t in impl["leaves"]:
                t.grad = None
            out = step()  # compiles; in a warm-up worker, all there is to do
            if not ctx.warm:
                seen[name] = {k: v.detach().clone() for k, v in impl["check"](out).items()}
                del out
                timing = ctx.time_ms(step, grad_to_none=impl["leaves"])
                entry.update(status="ok", **timing, tflops=tflops(flops, timing))
                if not impl.get("backward", True):
                    entry["forward_only"] = True  # never the best peer of a forward + backward
                entry["peak_mem_bytes"] = ctx.peak_bytes(step, grad_to_none=impl["leaves"])
        except Exception as e:  # noqa: BLE001 - a failing peer must not cost the others their numbers
            entry.update(
                status="error",
                error=f"{type(e).__name__}: {e}"[:1500],
                traceback=short_traceback(),
            )
        for t in impl["leaves"]:
            t.grad = None
        results[name] = entry
        free_memory(ctx)
    if ctx.warm:
        return {}
    ref = seen.get(ours_name)
    for name, got in seen.items():
        if name != ours_name and ref is not None:
            diffs = {k: float(f"{rel_err(got[k], ref[k]):.3e}") for k in got if k in ref}
            results[name]["rel_diff_vs_ragkern"] = diffs
            results[name]["agrees"] = all(d <= agree_tol for d in diffs.values())
    return {"impls": results, "agree_tol": agree_tol, **_ratios(results)}


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


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


# ----------------------------------------------------------------------------------------------- attention

_flex_compiled: dict = {}


def _flex():
    """FlexAttention, compiled on CUDA (eager elsewhere: the CPU has no flex backward, so a dry run is forward
    only)."""
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _flex_compiled:
        _flex_compiled["fn"] = (
            torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
        )
    return _flex_compiled["fn"]


def _varlen_kwargs(fn: Callable, Hq: int, Hkv: int) -> tuple[dict, bool]:
    """Causal and GQA keywords of torch's ``varlen_attn`` across versions (2.10: ``is_causal``; later:
    ``window_size=(-1, 0)``); False when it cannot do GQA itself (k, v then expanded beforehand)."""
    params = inspect.signature(fn).parameters
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = Hq == Hkv or "enable_gqa" in params
    if Hq != Hkv and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw, gqa


def attention_bench(ctx: Ctx, head_dim: int, blocks: bool) -> dict:
    from ragkern.kernels import block_tiles, varlen_attention
    from ragkern.kernels.attention import block_mask
    from ragkern.kernels.attention import triton as have_triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    total = 256 if ctx.dry else 16384
    Hq, Hkv, D, dev = 32 if not ctx.dry else 4, 8 if not ctx.dry else 2, head_dim, ctx.device
    lengths, blk = rag.packed_row(total, seed=0, scale=1 / 32 if ctx.dry else 1.0)
    blk = blk.to(dev) if blocks else None
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(total, H, D, generator=g).to(dev, torch.bfloat16) for H in (Hq, Hkv, Hkv, Hq))
    pairs = rag.visible_pairs(lengths, blk.cpu() if blocks else None)
    flops = 3.5 * 4 * pairs * Hq * D
    bw = ctx.cuda  # the CPU has no FlexAttention backward: the dry run times its forward alone

    def bhtd(x):  # (T, H, D) -> (1, H, T, D), contiguous: the layout SDPA and flex take
        return _leaf(x.transpose(0, 1).unsqueeze(0).contiguous())

    def canon(o):  # (1, H, T, D) -> (T, H, D)
        return o[0].transpose(0, 1)

    impls: dict = {}
    lq, lk, lv = (_leaf(x) for x in (q, k, v))
    backend = "triton" if ctx.cuda else "torch"

    def build():  # once per batch in training (the first layer), shared by every layer's forward and backward
        return block_tiles(cu, blk, max(lengths), head_dim=D, dtype=torch.bfloat16)

    tiles = build() if blocks and have_triton is not None else None
    impls["ragkern_triton" if ctx.cuda else "ragkern_torch"] = dict(
        ours=True, leaves=[lq, lk, lv], grad=do, check=lambda o: {"out": o},
        fwd=lambda: varlen_attention(lq, lk, lv, cu, max(lengths), block_ids=blk, block_tiles=tiles, backend=backend,
                                     validate=False),
        note="as a layer in training: validate=False (rows checked once per batch)"
        + ("; block tile lists prebuilt once per batch (metadata_build_ms)" if blocks and ctx.cuda else ""),
    )  # fmt: skip
    if blocks and ctx.cuda:
        pq, pk, pv = (_leaf(x) for x in (q, k, v))
        impls["ragkern_triton_tiles_per_call"] = dict(
            ours=True, leaves=[pq, pk, pv], grad=do, check=lambda o: {"out": o}, compiles=False,
            fwd=lambda: varlen_attention(pq, pk, pv, cu, max(lengths), block_ids=blk, backend="triton", validate=False),
            note="tile lists rebuilt in every call (the forward's and the backward's): the cost before they were shared",
        )  # fmt: skip
    # SDPA, one example at a time (what an unpacked batch of one runs)
    bq, bk, bv = bhtd(q), bhtd(k), bhtd(v)
    ek, ev = (
        _leaf(x.repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1).unsqueeze(0).contiguous()) for x in (k, v)
    )
    do_b = do.transpose(0, 1).unsqueeze(0).contiguous()
    if not blocks:

        def flash(kk, vv, gqa):  # noqa: E306
            ctxm = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if ctx.cuda else contextlib.nullcontext()
            with ctxm:
                outs = [F.scaled_dot_product_attention(bq[:, :, s:e], kk[:, :, s:e], vv[:, :, s:e], is_causal=True,
                                                       enable_gqa=gqa) for s, e in bounds]  # fmt: skip
            return torch.cat(outs, dim=2)

        gqa_ok = True
        if ctx.cuda:  # the flash backend with enable_gqa, else k/v expanded to the query heads beforehand
            try:
                flash(bk, bv, True)
            except Exception:  # noqa: BLE001 - "No available kernel" and the like
                gqa_ok = False
        impls["sdpa_flash_per_example"] = dict(
            leaves=[bq, bk, bv] if gqa_ok else [bq, ek, ev], grad=do_b, check=lambda o: {"out": canon(o)},
            fwd=(lambda: flash(bk, bv, True)) if gqa_ok else (lambda: flash(ek, ev, False)), compiles=False,
            note=None if gqa_ok else "flash backend refused enable_gqa: k/v expanded to the query heads beforehand",
        )  # fmt: skip
    else:
        masks = [block_mask(blk[s:e], causal=True) for s, e in bounds]

        def masked():
            outs = [F.scaled_dot_product_attention(bq[:, :, s:e], ek[:, :, s:e], ev[:, :, s:e], attn_mask=m)
                    for (s, e), m in zip(bounds, masks)]  # fmt: skip
            return torch.cat(outs, dim=2)

        impls["sdpa_masked_per_example"] = dict(
            leaves=[bq, ek, ev], grad=do_b, check=lambda o: {"out": canon(o)}, fwd=masked, compiles=False,
            note="dense (L, L) mask per example, default backend; k/v expanded to the query heads beforehand",
        )  # fmt: skip
    # FlexAttention: document mask (+ the passage rule), block mask built once outside the timing
    try:
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
        fq, fk, fv = (bhtd(x) for x in (q, k, v))
        for t in (fq, fk, fv):
            t.requires_grad_(bw)
        bm = create_block_mask(and_masks(*mods), None, None, total, total, device=dev)
        impls["flex_blocks" if blocks else "flex_doc"] = dict(
            leaves=[fq, fk, fv] if bw else [], grad=do_b if bw else None, check=lambda o: {"out": canon(o)},
            fwd=lambda: _flex()(fq, fk, fv, block_mask=bm, enable_gqa=True), backward=bw,
            note=None if bw else "dry run: forward only (FlexAttention has no CPU backward)",
        )  # fmt: skip
    except ImportError as e:
        impls["flex_doc"] = dict(skip=f"FlexAttention not importable: {e}")
    # torch's own varlen attention (flash kernels), when this torch has it
    varlen = None
    with contextlib.suppress(ImportError):
        from torch.nn.attention import varlen as varlen_mod

        varlen = getattr(varlen_mod, "varlen_attn", None)
    if blocks:
        pass  # no mask argument beyond causal / window: not a peer for passage blocks
    elif varlen is None:
        impls["torch_varlen"] = dict(skip="torch.nn.attention.varlen.varlen_attn not in this torch")
    elif not ctx.cuda:
        _varlen_kwargs(varlen, Hq, Hkv)
        impls["torch_varlen"] = dict(skip="varlen_attn needs CUDA (dry run: signature checked only)")
    else:
        kw, gqa = _varlen_kwargs(varlen, Hq, Hkv)
        vk, vv = (
            (_leaf(x) for x in (k, v))
            if gqa
            else (_leaf(x.repeat_interleave(Hq // Hkv, dim=1)) for x in (k, v))
        )
        vq = _leaf(q)
        impls["torch_varlen"] = dict(
            leaves=[vq, vk, vv], grad=do, check=lambda o: {"out": o}, compiles=False,
            fwd=lambda: varlen(vq, vk, vv, cu, cu, max(lengths), max(lengths), **kw),
            note=f"keywords {sorted(kw)}" + ("" if gqa else "; no enable_gqa: k/v expanded beforehand"),
        )  # fmt: skip
    res = _measure(ctx, impls, flops, agree_tol=5e-2)
    if ctx.warm:
        return {}
    if tiles is not None:  # the once-per-batch build, timed alone (CPU wall clock in a dry run)
        res["metadata_build_ms"] = ctx.time_ms(build)["median_ms"]
        res["metadata_build_note"] = "block_tiles(): fwd, dK/dV and dQ tile lists, built once per batch"
    return {"shape": {"tokens": total, "examples": len(lengths), "max_len": max(lengths), "Hq": Hq, "Hkv": Hkv,
                      "head_dim": D, "blocks": blocks, "visible_pairs": pairs, "dtype": "bf16"},
            "flops": flops, "backward": bw, **res}  # fmt: skip


# ----------------------------------------------------------------------------------------------- FLCE


def flce_bench(ctx: Ctx, targets: int) -> dict:
    from ragkern.kernels import fused_linear_cross_entropy

    N, D, V = (256, 64, 1000) if ctx.dry else (16384, 4096, 128256)
    n_t = max(1, targets * N // 16384)
    dev, bf16 = ctx.device, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    h0, w0 = (
        torch.randn(N, D, generator=g).to(dev, bf16),
        (torch.randn(V, D, generator=g) * D**-0.5).to(dev, bf16),
    )
    y = torch.full((N,), -100, dtype=torch.long)
    pos = torch.randperm(N, generator=g)[:n_t]
    y[pos] = torch.randint(0, V, (n_t,), generator=g)
    y = y.to(dev)
    rows = (y != -100).nonzero().squeeze(1)

    def impl(fn, ours=False, skip=None, compiles=True, note=None):
        h, w = _leaf(h0), _leaf(w0)
        return dict(ours=ours, leaves=[h, w], grad=None, fwd=lambda: fn(h, w), skip=skip, compiles=compiles, note=note,
                    check=lambda out: {"loss": out.float(), "dh": h.grad, "dW": w.grad})  # fmt: skip

    need_cuda = None if ctx.cuda else "needs CUDA"
    backend = "triton" if ctx.cuda else "torch"
    impls = {
        "ragkern": impl(lambda h, w: fused_linear_cross_entropy(h, w, y, backend=backend, impl="chunked"),
                        ours=True, note="impl='chunked' (the default): cuBLAS GEMMs over the target rows in chunks "
                        "of <= 256 MiB of logits, one Triton row kernel per chunk"),
        "ragkern_triton": impl(lambda h, w: fused_linear_cross_entropy(h, w, y, backend="triton", impl="triton"),
                               ours=True, note="impl='triton': the Triton kernels that never hold logits",
                               skip=None if ctx.cuda else "needs CUDA (the interpreter computes bf16 dots wrongly; "
                               "correctness checks impl='triton' in fp32 / fp16)"),
    }  # fmt: skip
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger_flce"] = impl(lambda h, w: liger(w, h, y), skip=need_cuda)
    except ImportError as e:
        impls["liger_flce"] = dict(skip=f"liger_kernel not importable: {e}")
    try:
        from cut_cross_entropy import linear_cross_entropy

        impls["cut_cross_entropy"] = impl(lambda h, w: linear_cross_entropy(h, w, y), skip=need_cuda,
                                          note="default options (impl 'cce', filter_eps 'high')")  # fmt: skip
    except ImportError as e:
        impls["cut_cross_entropy"] = dict(skip=f"cut_cross_entropy not importable: {e}")
    impls["torch_plain"] = impl(lambda h, w: F.cross_entropy(h @ w.T, y), compiles=False,
                                note="bf16 logits of every row, (N, V) materialised")  # fmt: skip
    impls["torch_targets_only"] = impl(lambda h, w: F.cross_entropy(h[rows] @ w.T, y[rows]), compiles=False,
                                       note="bf16 logits of the target rows only")  # fmt: skip
    res = _measure(ctx, impls, 6.0 * n_t * D * V, agree_tol=3e-2)
    if ctx.warm:
        return {}
    return {
        "shape": {"N": N, "D": D, "V": V, "targets": n_t, "dtype": "bf16"},
        "flops": 6.0 * n_t * D * V,
        **res,
    }


# ----------------------------------------------------------------------------------------------- LoRA


def lora_bench(ctx: Ctx, dropout: float) -> dict:
    from peft import LoraConfig, get_peft_model
    from ragkern.kernels import lora_linear

    import ragkern.lora

    T, K, N, r = (128, 64, 64, 4) if ctx.dry else (16384, 4096, 4096, 16)
    dev, bf16 = ctx.device, torch.bfloat16
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(K, N, bias=False))
    model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"])
    )
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=r**-0.5)  # peft starts B at zero: that hides wrong math
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

    def peft_like(lay, ours, note=None):
        x = _leaf(x0)
        a, b = lay.lora_A["default"].weight, lay.lora_B["default"].weight
        return dict(ours=ours, leaves=[x, a, b], grad=gy, fwd=lambda: lay(x), note=note,
                    check=lambda out: outputs(out, x))  # fmt: skip

    x = _leaf(x0)
    a, b = (_leaf(layer.lora_A["default"].weight), _leaf(layer.lora_B["default"].weight))
    impls = {
        "ragkern_kernel": dict(ours=True, leaves=[x, a, b], grad=gy, check=lambda out: outputs(out, x),
                               fwd=lambda: lora_linear(x, w, a, b, scaling, dropout_p=dropout,
                                                       backend="triton" if ctx.cuda else "torch")),
        "ragkern_peft_layer": peft_like(fused_layer, True, note=f"peft layer after ragkern.lora.apply: {summary}"),
        "peft": peft_like(layer, False),
    }  # fmt: skip
    flops = 4.0 * T * K * N + 6.0 * T * r * (K + N)
    res = _measure(ctx, impls, flops, agree_tol=5e-2)
    if ctx.warm:
        return {}
    if dropout > 0:
        res["agree_note"] = "dropout masks differ between implementations: outputs not compared"
    return {
        "shape": {"T": T, "K": K, "N": N, "r": r, "dropout": dropout, "dtype": "bf16"},
        "flops": flops,
        **res,
    }


# ----------------------------------------------------------------------------------------------- plan


def plan(ctx: Ctx, part: str) -> list[tuple[str, object, dict, bool]]:
    if part == "attention":
        dims = [16] if ctx.dry else [128, 64]  # D=128 first: the budget skips D=64 before it
        cases = [(f"attention D={D} {'blocks' if b else 'causal'}", attention_bench, dict(head_dim=D, blocks=b), True)
                 for D in dims for b in (False, True)]  # fmt: skip
        if not ctx.dry:  # last, as the budget allows: the backward split over two column halves (d_split=2)
            cases.append(("attention D=256 causal", attention_bench, dict(head_dim=256, blocks=False), True))
        return cases
    if part == "flce":
        return [(f"flce {t // 1024}k targets", flce_bench, dict(targets=t), True) for t in (1024, 16384)]
    if part == "lora":
        return [(f"lora dropout={p}", lora_bench, dict(dropout=p), True) for p in (0.0, 0.05)]
    raise ValueError(part)
