"""Correctness on the device: each kernel (fp32, fp16, bf16) against its reference in the package
(``varlen_attention_reference``, ``fused_linear_cross_entropy_reference``, ``lora_linear_reference``) run in
float64, on fresh random inputs with odd sizes, outputs NaN-poisoned; then the packing invariants through a RagTrainer step in bf16
autocast.

Error norms (see ``harness.compare``): ``rel_err = ||out - ref|| / ||ref||`` within TOL[dtype], the worst row
within 10 x TOL. The attention checks also report the error of torch's own path (SDPA per example) in the
same dtype, for scale.
Dry run: tiny sizes in the Triton interpreter, fp32 and fp16 only (the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import copy
import math
import tempfile

import torch

from .harness import DTYPES, Ctx, compare, fresh_seed, interpreting, nan_poisoned_empty

TOL = {
    "attention": {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2},
    "flce": {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2},
    "lora": {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2},
}


def _dtypes(ctx: Ctx) -> list[str]:
    return ["fp32", "fp16"] if ctx.dry or interpreting() else ["fp32", "fp16", "bf16"]


def _randn(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


# ----------------------------------------------------------------------------------------------- attention


def _blocks(lengths: list[int], g: torch.Generator) -> torch.Tensor:
    """Per example: a global prefix, up to three passages of random length, a global suffix."""
    out = []
    for n in lengths:
        ids = torch.zeros(n, dtype=torch.int32)
        cuts = sorted(torch.randint(0, n + 1, (4,), generator=g).tolist())
        for b, (a, e) in enumerate(zip(cuts[:-1], cuts[1:]), start=1):
            ids[a:e] = b
        out.append(ids)
    return torch.cat(out)


def attention_case(
    ctx: Ctx,
    dtype: str,
    head_dim: int,
    blocks: bool,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
) -> dict:
    """Triton attention (output and the three gradients) vs the float64 reference; ``window``/``softcap``: a
    sliding window (Mistral/Gemma) and a logit soft-cap (Gemma 2)."""
    from ragkern.kernels import varlen_attention
    from ragkern.kernels.attention import varlen_attention_reference

    lengths = [1, 5, 17, 37] if ctx.dry else [1, 17, 64, 129, 300, 1000, 37]  # partial, single, many tiles
    Hq, Hkv = (4, 2) if ctx.dry else (8, 2)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    T, dt = sum(lengths), DTYPES[dtype]
    q, k, v = (_randn(g, T, H, head_dim).to(ctx.device, dt) for H in (Hq, Hkv, Hkv))
    do = _randn(g, T, Hq, head_dim).to(ctx.device, dt)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=ctx.device)
    blk = _blocks(lengths, g).to(ctx.device) if blocks else None
    opts = dict(causal=causal, block_ids=blk, window=window, softcap=softcap)

    def run(fn, leaves, **kw):
        leaves = [x.detach().clone().requires_grad_() for x in leaves]
        o = fn(*leaves, cu, **kw, **opts)
        o.backward(do.to(o.dtype))
        return {"out": o.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}

    with nan_poisoned_empty():
        outs = run(varlen_attention, (q, k, v), max_seqlen=max(lengths), backend="triton")
    if ctx.warm:
        return {}
    refs = run(varlen_attention_reference, [x.double() for x in (q, k, v)])
    base = run(varlen_attention_reference, (q, k, v)) if ctx.cuda or dt != torch.float16 else None
    ok, metrics = compare(outs, refs, TOL["attention"][dtype], base)
    return {"status": "ok" if ok else "failed", "seed": seed, "lengths": lengths, "heads": [Hq, Hkv],
            "tolerance": TOL["attention"][dtype], "metrics": metrics}  # fmt: skip


# ----------------------------------------------------------------------------------------------- FLCE


def flce_case(ctx: Ctx, dtype: str, variant: str, impl: str = "chunked") -> dict:
    """``variant``: "plain" (mean loss) or "all" (bias, softcap, label smoothing, z-loss, token weights,
    ``reduction="none"`` with a random upstream gradient); ``impl``: "chunked" (cuBLAS GEMMs and the row
    kernel, in chunks that do not divide the target rows at full size) or "triton" (the no-logits kernels).
    The argmax hits are checked too: equal to the float64 reference's on every row whose two best logits are
    further apart than the dtype's logit error."""
    from ragkern.kernels import cross_entropy as ce_mod
    from ragkern.kernels import fused_linear_cross_entropy
    from ragkern.kernels.cross_entropy import fused_linear_cross_entropy_reference

    N, H, V = (37, 24, 67) if ctx.dry else (1031, 264, 5003)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    dt, dev = DTYPES[dtype], ctx.device
    h = _randn(g, N, H).to(dev, dt)
    w = _randn(g, V, H, scale=H**-0.5).to(dev, dt)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.3] = -100
    y = y.to(dev)
    full = variant == "all"
    b = _randn(g, V, scale=0.1).to(dev, dt) if full else None
    opts = dict(
        softcap=30.0 if full else None, label_smoothing=0.1 if full else 0.0, z_loss=1e-3 if full else 0.0
    )
    weights = (torch.rand(N, generator=g) + 0.5).to(dev) if full else None
    reduction = "none" if full else "mean"
    up = torch.rand(N, generator=g).to(dev) if full else None
    rows = (y != -100).nonzero().squeeze(1)[::3]  # a third of the targets: the argmax, so hits show both ways
    y[rows] = (h[rows].double() @ w.double().T + (b.double() if full else 0.0)).argmax(1)

    def grads(loss, leaves):
        (loss * up).sum().backward() if up is not None else loss.backward()
        return {f"d{n}": t.grad for n, t in zip("hwb", leaves)}

    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b) if t is not None]
    chunk_bytes = ce_mod._CHUNK_BYTES
    ce_mod._CHUNK_BYTES = (10 if ctx.dry else 300) * V * h.element_size()  # chunks of 10 / 256 target rows
    try:
        with nan_poisoned_empty():
            loss, hits = fused_linear_cross_entropy(leaves[0], leaves[1], y, bias=leaves[2] if full else None,
                                                    weights=weights, reduction=reduction, backend="triton",
                                                    impl=impl, return_hits=True, **opts)  # fmt: skip
            outs = {"loss": loss.detach(), **grads(loss, leaves)}
    finally:
        ce_mod._CHUNK_BYTES = chunk_bytes
    if ctx.warm:
        return {}
    ref_leaves = [t.detach().double().requires_grad_() for t in (h, w, b) if t is not None]
    ref, ref_hits = fused_linear_cross_entropy_reference(
        *ref_leaves[:2], y, bias=ref_leaves[2] if full else None, weights=weights.double() if full else None,
        reduction=reduction, return_hits=True, **opts,
    )  # fmt: skip
    refs = {"loss": ref.detach(), **grads(ref, ref_leaves)}
    ok, metrics = compare(outs, refs, TOL["flce"][dtype])
    hit_check = _hits_check(hits, ref_hits, ref_leaves, y, opts["softcap"], TOL["flce"][dtype])
    ok = ok and hit_check["mismatched"] == 0
    return {"status": "ok" if ok else "failed", "seed": seed, "shape": {"N": N, "H": H, "V": V},
            "targets": int((y != -100).sum()), "tolerance": TOL["flce"][dtype], "metrics": metrics,
            "hits": hit_check}  # fmt: skip


def _hits_check(hits, ref_hits, ref_leaves, y, softcap, tol) -> dict:
    """Argmax hits against the float64 reference's, on the target rows whose two best logits differ by more than
    ``tol`` relative to the best (closer ones may rank either way in the kernel's dtype)."""
    h, w, *b = (t.detach() for t in ref_leaves)
    z = h @ w.T + (b[0] if b else 0.0)
    z = softcap * torch.tanh(z / softcap) if softcap else z
    top = z.topk(2, dim=1).values
    clear = ((top[:, 0] - top[:, 1]) > tol * (1 + top[:, 0].abs())) & (y != -100)
    ignored_hits = int(hits[y == -100].sum())
    mismatched = int((hits.cpu() != ref_hits.cpu())[clear.cpu()].sum()) + ignored_hits
    return {"compared": int(clear.sum()), "mismatched": mismatched, "reference_hits": int(ref_hits.sum())}


# ----------------------------------------------------------------------------------------------- LoRA


def lora_case(ctx: Ctx, dtype: str, dropout: float, rank: int = 16) -> dict:
    from ragkern.kernels import lora_linear
    from ragkern.kernels.lora import dropout_keep_mask, lora_linear_reference

    T, K, N = (37, 40, 24) if ctx.dry else (1031, 520, 392)
    r = min(rank, 4) if ctx.dry else rank
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    dt, dev = DTYPES[dtype], ctx.device
    x, w, bias = (
        _randn(g, T, K).to(dev, dt),
        _randn(g, N, K, scale=K**-0.5).to(dev, dt),
        _randn(g, N).to(dev, dt),
    )
    a, b = _randn(g, r, K, scale=K**-0.5).to(dev, dt), _randn(g, N, r, scale=r**-0.5).to(dev, dt)
    gy = _randn(g, T, N).to(dev, dt)
    scaling, drop_seed = 2.0, int(torch.randint(0, 2**31 - 1, (1,), generator=g))

    def run(fn, tensors):
        xx, aa, bb = (t.detach().clone().requires_grad_() for t in (tensors[0], tensors[3], tensors[4]))
        y = fn(xx, tensors[1], aa, bb, tensors[2])
        y.backward(gy.to(y.dtype))
        return {"y": y.detach(), "dx": xx.grad, "dA": aa.grad, "dB": bb.grad}

    def kernel(xx, ww, aa, bb, bi):
        return lora_linear(
            xx, ww, aa, bb, scaling, bias=bi, dropout_p=dropout, seed=drop_seed, backend="triton"
        )

    with nan_poisoned_empty():
        outs = run(kernel, (x, w, bias, a, b))
    if ctx.warm:
        return {}
    keep = (
        dropout_keep_mask((T, K), dropout, drop_seed, device=dev, backend="triton") if dropout > 0 else None
    )

    def reference(xx, ww, aa, bb, bi):
        return lora_linear_reference(xx, ww, aa, bb, scaling, bias=bi, dropout_p=dropout, keep=keep)

    refs = run(reference, [t.double() for t in (x, w, bias, a, b)])
    ok, metrics = compare(outs, refs, TOL["lora"][dtype])
    return {"status": "ok" if ok else "failed", "seed": seed, "shape": {"T": T, "K": K, "N": N, "r": r},
            "dropout": dropout, "tolerance": TOL["lora"][dtype], "metrics": metrics}  # fmt: skip


# ----------------------------------------------------------------------------------------------- trainer


def _model(ctx: Ctx, attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    import ragkern  # noqa: F401  (registers the "ragkern" attention)

    dims = (dict(hidden_size=64, intermediate_size=96, head_dim=16, vocab_size=128) if ctx.dry else
            dict(hidden_size=256, intermediate_size=512, head_dim=64, vocab_size=512))  # fmt: skip
    cfg = AutoConfig.for_model("llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, **dims)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).to(ctx.device)


def _examples(lengths: list[int], vocab: int, seed: int) -> list[dict]:
    """Labels on every token but a prompt third; block ids: global prefix, two passages, global suffix."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        cut = n // 3
        blocks = [0] * cut + [1] * ((n - cut) // 3) + [2] * ((n - cut) // 3)
        out.append(
            {
                "input_ids": ids,
                "labels": [-100] * cut + ids[cut:],
                "block_ids": blocks + [0] * (n - len(blocks)),
            }
        )
    return out


def _capture():
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        grads = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.grads is None:
                self.grads = {
                    n: p.grad.detach().double().clone()
                    for n, p in model.named_parameters()
                    if p.grad is not None
                }

    return Capture()


def _one_by_one(model, examples, n_targets, device, autocast: bool) -> dict:
    """Gradients of ``model`` run on each example alone (stock attention), summed: the packed row's due.
    bf16: the fused loss, as RagTrainer runs it; fp32: the plain loss (the fused kernel's fp32 dots may be TF32)."""
    from ragkern import PackingCollator
    from ragkern.loss import causal_lm_loss

    model.zero_grad()
    for ex in examples:
        one = PackingCollator()([ex])
        batch = {"input_ids": one["input_ids"].to(device), "labels": one["labels"].to(device)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, _ = causal_lm_loss(model, batch, num_items_in_batch=n_targets, fused=autocast)
        loss.backward()
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in b)


def _leak(model, examples, device, block_attention: bool) -> dict:
    """Invariant 2 in bf16 autocast: edit example 2, every other example's logits stay bit-identical."""
    from ragkern import PackingCollator

    collate = PackingCollator(block_attention=block_attention)
    edited = copy.deepcopy(examples)
    vocab = model.config.vocab_size
    edited[2]["input_ids"] = [4 + (t + 1) % (vocab - 4) for t in edited[2]["input_ids"]]
    logits = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for exs in (examples, edited):
            batch = {
                k: (v.to(device) if torch.is_tensor(v) else v)
                for k, v in collate(exs).items()
                if k != "labels"
            }
            logits.append(model(**batch).logits[0].float())
    cu = collate(examples)["cu_seq_lens_q"].tolist()
    a, b = cu[2], cu[3]
    others = torch.equal(logits[0][:a], logits[1][:a]) and torch.equal(logits[0][b:], logits[1][b:])
    return {
        "passed": others and not torch.equal(logits[0][a:b], logits[1][a:b]),
        "others_bit_identical": others,
    }


def trainer_invariants(ctx: Ctx) -> dict:
    """Invariants 1 and 2 through one RagTrainer step with ``bf16=True`` (autocast), "ragkern" attention.

    Equivalence: the step's gradients against the same examples run one by one with sdpa. Both sides carry bf16
    rounding, so each is measured against the fp32 one-by-one gradients: packing passes when its error is at
    most twice (+1e-3) the error bf16 autocast makes without packing. Leakage: bit-identical logits after the
    step, with and without passage block masks.
    """
    from transformers.trainer_callback import PrinterCallback

    from ragkern import PackingCollator, RagTrainer, RagTrainingArguments

    lengths = [7, 1, 13, 5, 2] if ctx.dry else [37, 1, 130, 64, 9, 300, 17]
    model = _model(ctx, "ragkern")
    reference = _model(ctx, "sdpa")
    reference.load_state_dict(model.state_dict())
    seed = fresh_seed()
    examples = _examples(lengths, model.config.vocab_size, seed)
    n_targets = sum(int((PackingCollator()([e])["labels"] != -100).sum()) for e in examples)
    capture = _capture()
    with tempfile.TemporaryDirectory() as out:
        args = RagTrainingArguments(
            output_dir=out, max_length=sum(lengths), per_device_train_batch_size=1, max_steps=1, bf16=True,
            learning_rate=1e-3, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
            report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=7, use_cpu=not ctx.cuda,
            dataloader_pin_memory=False,
        )  # fmt: skip
        trainer = RagTrainer(model=model, args=args, train_dataset=examples, callbacks=[capture])
        trainer.remove_callback(PrinterCallback)  # disable_tqdm would print every log dict
        trainer.train()
    if capture.grads is None:
        raise RuntimeError("the RagTrainer step produced no gradients")
    single_bf16 = _one_by_one(reference, examples, n_targets, ctx.device, autocast=True)
    single_fp32 = _one_by_one(reference, examples, n_targets, ctx.device, autocast=False)
    if capture.grads.keys() != single_fp32.keys():
        return {"status": "failed", "detail": "packed and one-by-one runs reach different parameters"}
    err_packed, err_single = _max_rel(capture.grads, single_fp32), _max_rel(single_bf16, single_fp32)
    equivalent = math.isfinite(err_packed) and err_packed <= 2 * err_single + 1e-3
    leaks = {f"block_attention={b}": _leak(model.eval(), examples, ctx.device, b) for b in (False, True)}
    ok = equivalent and all(v["passed"] for v in leaks.values())
    return {"status": "ok" if ok else "failed", "seed": seed, "lengths": lengths,
            "equivalence": {"passed": equivalent, "packed_bf16_vs_fp32_max_rel": float(f"{err_packed:.3e}"),
                            "one_by_one_bf16_vs_fp32_max_rel": float(f"{err_single:.3e}")},
            "leakage": leaks}  # fmt: skip


# ----------------------------------------------------------------------------------------------- plan


def plan(ctx: Ctx) -> list[tuple[str, object, dict, bool]]:
    """(case name, function, kwargs, warmable) of this part, in run order: bf16 (what the benchmarks and
    training run) first, then the invariants, then fp16 and fp32, so a spent budget skips the least needed."""
    # 256 also in quick: its backward tiles are the largest (a dQ tile once needed more shared memory than a block has)
    dims = [16] if ctx.dry else [64, 128, 256] if ctx.quick else [64, 128, 96, 256]
    by_dtype = {}
    for dtype in _dtypes(ctx):
        cases = []
        for D in dims:
            if ctx.quick and dtype != "bf16" and D != 128:
                continue  # quick: every dtype at D=128, bf16 at every head_dim
            for blocks in (False, True):
                cases.append((f"attention {dtype} D={D} {'blocks' if blocks else 'causal'}", attention_case,
                              dict(dtype=dtype, head_dim=D, blocks=blocks), True))  # fmt: skip
        if dtype == ("fp32" if ctx.dry else "bf16"):  # windows (edge inside tiles) and Gemma 2's soft-cap
            D_w = dims[-1] if ctx.dry else 128
            for name, extra in (
                (f"D={D_w} window", dict(head_dim=D_w, blocks=False, window=13 if ctx.dry else 77)),
                (f"D={D_w} blocks window", dict(head_dim=D_w, blocks=True, window=13 if ctx.dry else 77)),
                (f"D={dims[-1]} window softcap", dict(head_dim=dims[-1], blocks=False, window=9 if ctx.dry else 200,
                                                      softcap=5.0)),
            ):  # fmt: skip
                cases.append((f"attention {dtype} {name}", attention_case, dict(dtype=dtype, **extra), True))
        if not ctx.quick and dtype == ("fp32" if ctx.dry else "bf16"):
            cases.append((f"attention {dtype} D={dims[-1] if ctx.dry else 128} non-causal", attention_case,
                          dict(dtype=dtype, head_dim=dims[-1] if ctx.dry else 128, blocks=False, causal=False), True))  # fmt: skip
        for impl in ("chunked", "triton"):
            for variant in ("plain", "all"):
                cases.append((f"flce {impl} {dtype} {variant}", flce_case,
                              dict(dtype=dtype, variant=variant, impl=impl), True))  # fmt: skip
        for p in (0.0, 0.1):
            cases.append((f"lora {dtype} r=16 dropout={p}", lora_case, dict(dtype=dtype, dropout=p), True))
        if dtype == "bf16" and not ctx.quick:
            cases.append(
                ("lora bf16 r=8 dropout=0.0", lora_case, dict(dtype="bf16", dropout=0.0, rank=8), True)
            )
        by_dtype[dtype] = cases
    invariants = [("trainer invariants bf16 autocast", trainer_invariants, {}, False)]
    return by_dtype.get("bf16", []) + invariants + by_dtype["fp16"] + by_dtype["fp32"]
