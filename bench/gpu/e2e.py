"""End to end: ragkern against what users run, with ablations, repeats and per-step times.

Randomly initialised models of real shapes (configs written out below, nothing downloaded), bf16 autocast over
fp32 weights (``bf16=True``), AdamW, on the same synthetic RAG examples (``rag.examples``). The examples are packed
once into bins of ``row`` tokens (ragkern's best-fit-decreasing ``PackedBatchSampler``, seed 0): optimizer step
``k`` of every arm trains exactly the examples of bin ``k``, so every arm sees the same examples, in the same
order, with the same tokens per optimizer step (recorded per step and compared in the JSON). Arms:

  hf_pad_sdpa          Trainer + padding (ragkern.collator.PaddingCollator), sdpa: the floor. A bin's examples
                       go in micro-batches of at most ``PAD_MICRO`` examples padded to their longest, with
                       gradient accumulation, so one optimizer step is still one bin.
  hf_flat_sdpa         Trainer + DataCollatorWithFlattening (one row per step, position_ids restart per example;
                       transformers' sdpa masks detect packed position_ids and keep the examples apart)
  hf_flat_flex         the same on FlexAttention
  hf_flat_sdpa_liger   hf_flat_sdpa + use_liger_kernel=True (Liger's fused linear cross-entropy and kernels)
  hf_flat_flex_liger   hf_flat_flex + Liger (full mode)
  trl_sft_liger        TRL SFTTrainer, padding_free, the bins handed over in TRL's bfd packed format
                       (``seq_lengths`` per row: TRL builds the position ids from it), use_liger_kernel=True:
                       Liger's layer kernels; TRL 1.16 keeps its own chunked LM-head loss (no full logits) and
                       turns Liger's fused linear cross-entropy off
  rk_pack_torch        RagTrainer packing only: its "ragkern" attention routed to the PyTorch path (per-example
                       SDPA, ``kernels.attention`` backend "torch"), fused_loss=False. RagTrainer refuses
                       attn_implementation="sdpa" with packing (sdpa would let packed examples attend to each
                       other); the per-example path keeps the boundaries by construction.
  rk_pack_triton       + the Triton varlen attention, fused_loss=False
  rk_full              + the fused loss on target rows (RagTrainer's defaults)
  hf_flat_sdpa_lora    LoRA row: Trainer + flattening + peft LoRA (the peer)
  rk_lora              RagTrainer (defaults) + peft LoRA, fused_lora=False
  rk_lora_fused        RagTrainer (defaults) + peft LoRA, fused_lora=True

Every arm runs >= 3 warm-up and >= 20 timed optimizer steps (the dry run: 3 and 2), ``REPEATS`` times in
rotating order (repeat r runs the arms rotated by r), each run from the same initial weights (seed 0). Recorded
per run: per-step wall times, tokens per step, tokens/s, peak CUDA memory over the timed steps; per arm: the
median and p20/p80 of the step times over all repeats, the median tokens/s over repeats and its min/max, MFU and
the ratios against the padding floor and against the strongest peer (the fastest non-ragkern arm that ran;
LoRA arms against the LoRA peer).

MFU: model FLOPs / (seconds x the card's datasheet dense bf16 peak, ``harness.DATASHEET_BF16_TFLOPS``), with
model FLOPs = 6 x (parameters of every nn.Linear, lm_head included) x real tokens + 12 x layers x heads x
head_dim x (causal pairs within each example), the PaLM/Megatron definition, the same for every arm (LoRA arms
too, which skip the weight gradients: their MFU is comparable, not their executed work). The FLOPs each arm
executes are reported apart (``executed_tflops_per_s``): padded micro-batches run every linear on their padding
and attention over each padded row; a flattened sdpa row runs a masked SDPA over the whole row (causal row pairs,
a lower bound); the fused loss runs the lm_head on target rows only.

Longest row (``max_row``): one bin of L tokens (L = 16k, 32k, 64k, 128k) per optimizer step, two steps (the
second holds the optimizer state), stopping at the first L that runs out of memory (``torch.OutOfMemoryError``,
memory freed). Full mode: every full fine-tuning arm; quick mode: rk_full and the strongest peer, as the budget
allows. Dry run: the same configs shrunk (``ragkern.selftest.small_config``), rows of 256 tokens, on the CPU.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import rag
from .harness import CaseTimeout, Ctx, free_memory, undoing_patches

CONFIGS = {
    # Qwen/Qwen2.5-0.5B config.json
    "qwen2.5-0.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False,
        sliding_window=32768, max_window_layers=24, attention_dropout=0.0,
    ),
    # meta-llama/Llama-3.2-1B config.json
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
        mlp_bias=False, attention_dropout=0.0,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    ),
}  # fmt: skip
PAD_MICRO = 4  # examples per padded micro-batch (at most 4 x 3.5k tokens; a whole padded bin would not fit)
REPEATS = 3
WARMUP, TIMED = 3, 20  # optimizer steps per run
DRY_TIMED = 2  # the dry run's timed steps: its numbers only show that the code runs
# Quick mode trains rows of 8k tokens: 11 arms x 3 repeats x 23 steps of 16k would not fit its budget
QUICK_ROW = 8192
MAX_ROWS = (16384, 32768, 65536, 131072)  # the longest-row search (dry run: DRY_MAX_ROWS)
DRY_MAX_ROWS = (256, 512)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


@dataclass(frozen=True)
class Arm:
    name: str
    trainer: str  # "hf" (transformers.Trainer) | "trl" (SFTTrainer) | "rk" (RagTrainer)
    collate: str  # "pad" | "flat" | "trl" | "pack"
    attn: str  # the model's attn_implementation
    liger: bool = False
    fused_loss: bool = True  # RagTrainer only
    torch_attention: bool = False  # RagTrainer: the "ragkern" attention on its PyTorch path
    lora: bool = False
    fused_lora: bool | None = None
    full_only: bool = False
    what: str = ""

    @property
    def ours(self) -> bool:
        return self.trainer == "rk"


ARMS = (
    Arm("hf_pad_sdpa", "hf", "pad", "sdpa", what="Trainer + padding + sdpa (the floor)"),
    Arm("hf_flat_sdpa", "hf", "flat", "sdpa", what="Trainer + DataCollatorWithFlattening + sdpa"),
    Arm("hf_flat_flex", "hf", "flat", "flex_attention", what="Trainer + flattening + FlexAttention"),
    Arm("hf_flat_sdpa_liger", "hf", "flat", "sdpa", liger=True, what="Trainer + flattening + sdpa + Liger"),
    Arm("hf_flat_flex_liger", "hf", "flat", "flex_attention", liger=True, full_only=True,
        what="Trainer + flattening + FlexAttention + Liger"),
    Arm("trl_sft_liger", "trl", "trl", "sdpa", liger=True,
        what="TRL SFTTrainer padding_free, bfd-packed rows (seq_lengths), sdpa + Liger's layer kernels; the loss is "
             "TRL's own chunked LM head (TRL 1.16 turns Liger's fused linear cross-entropy off)"),
    Arm("rk_pack_torch", "rk", "pack", "ragkern", fused_loss=False, torch_attention=True,
        what="RagTrainer packing only: per-example PyTorch SDPA, logits materialised"),
    Arm("rk_pack_triton", "rk", "pack", "ragkern", fused_loss=False,
        what="RagTrainer packing + Triton varlen attention, logits materialised"),
    Arm("rk_full", "rk", "pack", "ragkern", what="RagTrainer: packing + Triton attention + fused loss"),
    Arm("hf_flat_sdpa_lora", "hf", "flat", "sdpa", lora=True, what="LoRA: Trainer + flattening + sdpa + peft"),
    Arm("rk_lora", "rk", "pack", "ragkern", lora=True, fused_lora=False,
        what="LoRA: RagTrainer + peft layers (fused_lora=False)"),
    Arm("rk_lora_fused", "rk", "pack", "ragkern", lora=True, fused_lora=True,
        what="LoRA: RagTrainer + the fused LoRA kernel (fused_lora=True)"),
)  # fmt: skip
FLOOR = "hf_pad_sdpa"
OURS = "rk_full"


def arms_for(ctx: Ctx) -> list[Arm]:
    return [a for a in ARMS if not (a.full_only and ctx.quick)]


def _config(ctx: Ctx, name: str):
    from transformers import AutoConfig

    values = copy.deepcopy(CONFIGS[name])  # transformers rewrites rope_scaling in place
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    if ctx.dry:
        from ragkern.selftest import small_config

        config = small_config(config)
    config.use_cache = False
    return config


def _model(ctx: Ctx, config, attn: str):
    """The model every arm starts from: the same initial weights (seed 0) whatever the attention."""
    from transformers import AutoModelForCausalLM

    import ragkern  # noqa: F401  (registers the "ragkern" attention)

    torch.manual_seed(0)
    with torch.device(ctx.device):  # initialised on the device: seconds, not minutes
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- data


def plan_bins(examples: list[dict], row: int, steps: int, all_bins: bool = False) -> list[list[int]]:
    """The example indices of the first ``steps`` bins (``all_bins``: of every bin), in the order RagTrainer
    trains them (its sampler with the same arguments: best-fit-decreasing bins of ``row`` tokens, shuffled with
    seed 0)."""
    from ragkern.packing import PackedBatchSampler

    sampler = PackedBatchSampler([len(e["input_ids"]) for e in examples], row, shuffle=True, seed=0)
    bins = list(sampler)
    if len(bins) < steps:
        raise ValueError(f"{len(bins)} bins of {row} tokens; {steps} steps need more examples")
    return [list(b) for b in (bins if all_bins else bins[:steps])]


def _lengths(batch: dict) -> list[int]:
    """Example lengths of a collated batch: per padded row (attention_mask), else from position_ids restarts."""
    if "attention_mask" in batch and batch["input_ids"].shape[0] > 1:
        return [int(n) for n in batch["attention_mask"].sum(1).tolist()]
    pos = batch["position_ids"].reshape(-1)
    starts = (pos == 0).nonzero().reshape(-1).tolist() + [pos.numel()]
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


class _Counting:
    """Wraps a collator and records, per collated (micro-)batch in training order: real tokens, computed tokens,
    target tokens, example lengths, the causal (query, key) pairs within examples and within whole rows."""

    def __init__(self, collate, unwrap: bool = False):
        self.collate, self.unwrap, self.batches = collate, unwrap, []

    def __call__(self, features):
        if self.unwrap:  # a pre-batched dataset: each item is one micro-batch's list of examples
            (features,) = features
        batch = self.collate(features)
        rows, width = batch["input_ids"].shape
        lengths = _lengths(batch) if ("position_ids" in batch or rows > 1) else [width]
        real = sum(lengths)
        self.batches.append({"real": real, "computed": rows * width, "lengths": lengths,
                             "pairs": rag.visible_pairs(lengths), "row_pairs": rows * width * (width + 1) // 2,
                             "targets": int((batch["labels"] != -100).sum())})  # fmt: skip
        return batch


def _micro_batches(examples: list[dict], bins: list[list[int]], micro: int) -> tuple[list[list[dict]], int]:
    """Each bin split into ``ga`` micro-batches (as even as possible, order kept): ``ga`` = min(micro, the
    fewest examples of any bin), so gradient accumulation over ``ga`` micro-batches trains exactly one bin."""
    ga = max(1, min(micro, min(len(b) for b in bins)))
    items = []
    for b in bins:
        per = math.ceil(len(b) / ga)
        chunks = [b[i : i + per] for i in range(0, len(b), per)]
        while len(chunks) < ga:  # ceil split left fewer chunks: split the largest
            big = max(range(len(chunks)), key=lambda i: len(chunks[i]))
            c = chunks.pop(big)
            chunks[big:big] = [c[: len(c) // 2], c[len(c) // 2 :]]
        items += [[examples[i] for i in c] for c in chunks]
    return items, ga


def _trl_rows(examples: list[dict], bins: list[list[int]]) -> list[dict]:
    """Each bin as one row in TRL's packed format: input_ids and labels concatenated, ``seq_lengths`` per example."""
    rows = []
    for b in bins:
        exs = [examples[i] for i in b]
        rows.append({"input_ids": [t for e in exs for t in e["input_ids"]],
                     "labels": [t for e in exs for t in e["labels"]],
                     "seq_lengths": [len(e["input_ids"]) for e in exs]})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------- trainers


def _timer(ctx: Ctx, warmup: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time at the start of training and the end of each optimizer step (synchronised), and the peak
        memory over the steps after the warm-up."""

        def __init__(self):
            self.begin, self.ends, self.peak = None, [], None

        def on_train_begin(self, args, state, control, **kwargs):
            ctx.sync()
            if warmup == 0 and ctx.cuda:  # no warm-up (the longest-row probes): the peak of every step
                torch.cuda.reset_peak_memory_stats(ctx.device)
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            ctx.sync()
            self.ends.append(time.perf_counter())
            if len(self.ends) == warmup and ctx.cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)

        def on_train_end(self, args, state, control, **kwargs):
            if ctx.cuda:
                self.peak = int(torch.cuda.max_memory_allocated(ctx.device))

    return StepTimer()


def _args(cls, ctx: Ctx, out: str, steps: int, batch: int, **extra):
    return cls(
        output_dir=out, per_device_train_batch_size=batch, max_steps=steps, bf16=True, learning_rate=1e-5,
        lr_scheduler_type="constant", optim="adamw_torch_fused" if ctx.cuda else "adamw_torch", report_to=[],
        save_strategy="no", logging_steps=10**6, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=False, use_cpu=not ctx.cuda, seed=0, **extra,
    )  # fmt: skip


def _in_order(cls):
    """``cls`` with its training data read in dataset order (the items are the bins, already in order)."""

    class InOrder(cls):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    InOrder.__name__ = f"InOrder{cls.__name__}"
    return InOrder


@contextmanager
def _torch_attention(on: bool):
    """The "ragkern" attention's packed rows on its PyTorch path (per-example SDPA) instead of Triton / flash-attn."""
    if not on:
        yield
        return
    import ragkern.attention as ra

    varlen, flash = ra.varlen_attention, ra.flash_attn_varlen_func

    def torch_varlen(*args, **kwargs):
        kwargs.update(backend="torch", block_tiles=None)
        return varlen(*args, **kwargs)

    ra.varlen_attention, ra.flash_attn_varlen_func = torch_varlen, None
    try:
        yield
    finally:
        ra.varlen_attention, ra.flash_attn_varlen_func = varlen, flash


def needs(arm: Arm, ctx: Ctx) -> str | None:
    """Why ``arm`` cannot run here (a missing peer, a CPU), or None."""
    import importlib.util

    if arm.liger and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if arm.trainer == "trl" and importlib.util.find_spec("trl") is None:
        return "trl is not installed"
    if arm.lora and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    if arm.attn == "flex_attention" and not ctx.cuda:
        return "FlexAttention has no backward on the CPU (needs CUDA)"
    if arm.liger and not ctx.cuda:
        # tried: its fused linear cross-entropy alone runs in the interpreter, but use_liger_kernel=True patches
        # more kernels, one of which fails there (InterpreterError: 'float' object has no attribute 'to')
        return "Liger: use_liger_kernel=True fails in the CPU Triton interpreter (needs CUDA)"
    return None


def _build(
    ctx: Ctx, arm: Arm, config, examples: list[dict], bins: list[list[int]], row: int, tmp: str, timer
):
    """``(trainer, counting collator, micro-batches per optimizer step)`` for ``arm`` on ``bins``."""
    steps = len(bins)
    net = _model(ctx, config, arm.attn)
    if arm.lora:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(task_type="CAUSAL_LM", **LORA))
    if arm.trainer == "rk":
        from ragkern import PackingCollator, RagTrainer, RagTrainingArguments

        counting = _Counting(PackingCollator())
        extra = {} if arm.fused_lora is None else {"fused_lora": arm.fused_lora}
        args = _args(
            RagTrainingArguments, ctx, tmp, steps, 1, max_length=row, fused_loss=arm.fused_loss, **extra
        )
        # all the examples: RagTrainer's sampler packs them into the same bins as plan_bins, in the same order
        trainer = RagTrainer(
            model=net, args=args, data_collator=counting, train_dataset=examples, callbacks=[timer]
        )
        return trainer, counting, 1
    if arm.trainer == "trl":
        from datasets import Dataset  # SFTTrainer takes a datasets.Dataset only
        from trl import SFTConfig, SFTTrainer

        args = _args(SFTConfig, ctx, tmp, steps, 1, padding_free=True, packing=False, max_length=None,
                     use_liger_kernel=arm.liger, dataset_kwargs={"skip_prepare_dataset": True},
                     completion_only_loss=False)  # fmt: skip
        data = Dataset.from_list(_trl_rows(examples, bins))
        trainer = _in_order(SFTTrainer)(
            model=net, args=args, train_dataset=data, callbacks=[timer], processing_class=_tokenizer_stub(config)
        )  # fmt: skip
        # SFTTrainer refuses a custom collator with padding_free: its own one (position ids from seq_lengths) is
        # wrapped after construction; the loader is built from it when training starts
        counting = trainer.data_collator = _Counting(trainer.data_collator)
        return trainer, counting, 1
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    from ragkern.collator import PaddingCollator

    if arm.collate == "pad":
        items, ga = _micro_batches(examples, bins, PAD_MICRO)
        counting = _Counting(PaddingCollator(pad_token_id=0), unwrap=True)
    else:
        items, ga = [[examples[i] for i in b] for b in bins], 1
        counting = _Counting(_flattening(DataCollatorWithFlattening), unwrap=True)
    items = [[{"input_ids": e["input_ids"], "labels": e["labels"]} for e in item] for item in items]
    args = _args(
        TrainingArguments, ctx, tmp, steps, 1, gradient_accumulation_steps=ga, use_liger_kernel=arm.liger
    )
    trainer = _in_order(Trainer)(model=net, args=args, data_collator=counting, train_dataset=_Listed(items),
                                 callbacks=[timer])  # fmt: skip
    return trainer, counting, ga


class _Listed(torch.utils.data.Dataset):
    """A list as a map-style dataset (Trainer would otherwise try to treat a list of lists as columns)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _flattening(cls):
    """DataCollatorWithFlattening that keeps the labels as given (its default marks the first token of each
    example -100, as ragkern's collator does) and returns position_ids only."""
    try:
        return cls(return_position_ids=True, separator_id=-100)
    except TypeError:  # older signatures
        return cls()


def _tokenizer_stub(config):
    """SFTTrainer wants a processing class; the data is tokenised already, so a minimal tokenizer does."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>"
    )


# ------------------------------------------------------------------------------------------- one run


def _merge(micro: list[dict]) -> dict:
    """One optimizer step's counts from its micro-batches."""
    out = {k: sum(b[k] for b in micro) for k in ("real", "computed", "pairs", "row_pairs", "targets")}
    out["lengths"] = sorted(n for b in micro for n in b["lengths"])
    return out


def _linear_params(model: torch.nn.Module) -> tuple[int, int]:
    """Parameters of the base model's nn.Linear layers (LoRA adapters left out) and of its lm_head."""
    linear = sum(m.in_features * m.out_features for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in n)  # fmt: skip
    return linear, model.get_output_embeddings().weight.numel()


def _flops(config, arm: Arm, linear: int, head: int, steps: list[dict]) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs) of ``steps``: see the module docstring."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim
    model = sum(6 * linear * s["real"] + attn * s["pairs"] for s in steps)
    if arm.collate == "pad":  # every linear on the padding too, attention over each padded row
        executed = sum(6 * linear * s["computed"] + attn * s["row_pairs"] for s in steps)
    elif arm.trainer == "rk":  # per-example attention; the fused loss runs the lm_head on target rows only
        lm = (lambda s: 6 * head * s["targets"]) if arm.fused_loss else (lambda s: 6 * head * s["real"])
        executed = sum(6 * (linear - head) * s["real"] + lm(s) + attn * s["pairs"] for s in steps)
    elif arm.attn == "sdpa":  # a flattened row: one masked SDPA over the whole row
        executed = sum(6 * linear * s["real"] + attn * s["row_pairs"] for s in steps)
    else:  # FlexAttention skips the masked blocks
        executed = model
    return model, executed


def run_arm(
    ctx: Ctx, arm: Arm, config, examples: list[dict], bins: list[list[int]], row: int, warmup: int
) -> dict:
    """Train ``arm`` on ``bins`` (one per optimizer step) from the initial weights; its numbers after ``warmup``
    steps. Raises what training raises (an OOM included); the caller frees the memory."""
    from transformers.trainer_callback import PrinterCallback

    t0 = time.perf_counter()
    # undoing_patches: Liger (use_liger_kernel, TRL) patches transformers for the whole process
    with (
        tempfile.TemporaryDirectory() as tmp,
        _torch_attention(arm.torch_attention),
        undoing_patches(config.model_type),
    ):
        timer = _timer(ctx, warmup)
        trainer, counting, ga = _build(ctx, arm, config, examples, bins, row, tmp, timer)
        trainer.remove_callback(PrinterCallback)  # disable_tqdm would print every log dict
        setup = time.perf_counter() - t0
        trainer.train()
        linear, head = _linear_params(trainer.model)
        del trainer
    steps = len(timer.ends)
    # the loader may collate ahead of the last step: the first steps x ga micro-batches are the trained ones
    per_step = [_merge(counting.batches[k * ga : (k + 1) * ga]) for k in range(steps)]
    timed = per_step[warmup:]
    if not timed:
        raise RuntimeError(f"only {steps} steps ran; {warmup} are warm-up")
    step_s = [b - a for a, b in zip(timer.ends[warmup - 1 : -1] if warmup else [timer.begin] + timer.ends[:-1],
                                    timer.ends[warmup:] if warmup else timer.ends)]  # fmt: skip
    seconds = sum(step_s)
    flops, executed = _flops(config, arm, linear, head, timed)
    real = sum(s["real"] for s in timed)
    return {
        "steps": steps, "warmup_steps": warmup, "steps_timed": len(timed), "micro_batches_per_step": ga,
        "setup_s": round(setup, 3), "wall_s": round(time.perf_counter() - t0, 3),
        "step_ms": [round(s * 1e3, 3) for s in step_s], "seconds": round(seconds, 4),
        "step_tokens": [s["real"] for s in per_step], "step_lengths": [s["lengths"] for s in per_step],
        "real_tokens": real, "computed_tokens": sum(s["computed"] for s in timed),
        "target_tokens": sum(s["targets"] for s in timed), "tokens_per_s": round(real / seconds, 1),
        "model_tflops_per_s": round(flops / seconds / 1e12, 4),
        "executed_tflops_per_s": round(executed / seconds / 1e12, 4), "peak_mem_bytes": timer.peak,
        "linear_params": linear,
    }  # fmt: skip


def _guarded(ctx: Ctx, fn, *args) -> dict:
    """``fn(*args)``, or {"status": "oom" | "error", ...}; the memory is freed either way."""
    from .harness import CaseTimeout, short_traceback

    try:
        out = {"status": "ok", **fn(*args)}
    except CaseTimeout:  # the part's alarm: the case stops here and keeps what it measured (e2e_case)
        free_memory(ctx)
        raise
    except torch.OutOfMemoryError as e:
        out = {"status": "oom", "error": f"OutOfMemoryError: {str(e)[:300]}"}
    except Exception as e:  # noqa: BLE001 - one arm failing keeps the others' numbers
        out = {"status": "error", "error": f"{type(e).__name__}: {e}"[:1500], "traceback": short_traceback()}
    free_memory(ctx)
    return out


# ------------------------------------------------------------------------------------------- summaries


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(runs: list[dict], peak_tflops: float | None) -> dict:
    """One arm over its repeats: median tokens/s (min / max over repeats), step-time median and p20 / p80 over
    every timed step of every repeat, peak memory (the largest), MFU."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        bad = next((r for r in runs if r.get("status") in ("error", "oom")), runs[0] if runs else {})
        return {"status": bad.get("status", "skipped"), "error": bad.get("error") or bad.get("reason")}
    tps = [r["tokens_per_s"] for r in ok]
    steps = [ms for r in ok for ms in r["step_ms"]]
    out = {
        "status": "ok", "repeats": len(ok), "tokens_per_s": round(statistics.median(tps), 1),
        "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
        "step_ms_median": round(statistics.median(steps), 3), "step_ms_p20": round(_quantile(steps, 0.2), 3),
        "step_ms_p80": round(_quantile(steps, 0.8), 3),
        "model_tflops_per_s": round(statistics.median(r["model_tflops_per_s"] for r in ok), 4),
        "executed_tflops_per_s": round(statistics.median(r["executed_tflops_per_s"] for r in ok), 4),
        "peak_mem_bytes": max((r["peak_mem_bytes"] for r in ok if r["peak_mem_bytes"] is not None), default=None),
        "real_tokens_per_repeat": ok[0]["real_tokens"], "step_tokens": ok[0]["step_tokens"],
    }  # fmt: skip
    if peak_tflops:
        out["mfu"] = round(out["model_tflops_per_s"] / peak_tflops, 4)
    return out


def ratios(arms: dict[str, dict], lora: set[str], ours: set[str], floor: str = FLOOR) -> dict:
    """Each arm's tokens/s over the padding floor's (full fine-tuning arms) and over the strongest peer's: the
    fastest arm that is not ours and ran, among the full fine-tuning arms, or among the LoRA arms for a LoRA
    arm. Writes ``vs_floor`` / ``vs_strongest_peer`` into each arm that ran; returns the references."""

    def fastest(names):
        ran = [n for n in names if arms[n].get("status") == "ok"]
        return max(ran, key=lambda n: arms[n]["tokens_per_s"]) if ran else None

    full = [n for n in arms if n not in lora]
    refs = {"floor": floor if arms.get(floor, {}).get("status") == "ok" else None,
            "strongest_peer": fastest([n for n in full if n not in ours]),
            "strongest_lora_peer": fastest([n for n in arms if n in lora and n not in ours])}  # fmt: skip
    for name, a in arms.items():
        if a.get("status") != "ok":
            continue
        peer = refs["strongest_lora_peer"] if name in lora else refs["strongest_peer"]
        a["vs_floor"] = (round(a["tokens_per_s"] / arms[refs["floor"]]["tokens_per_s"], 3)
                         if refs["floor"] and name not in lora else None)  # fmt: skip
        a["vs_strongest_peer"] = round(a["tokens_per_s"] / arms[peer]["tokens_per_s"], 3) if peer else None
    return refs


# ------------------------------------------------------------------------------------------- the case


def _rotations(names: list[str], repeats: int) -> list[list[str]]:
    """Repeat r runs the arms in order rotated by r."""
    n = len(names)
    return [names[r % n :] + names[: r % n] for r in range(repeats)] if n else [[] for _ in range(repeats)]


def max_row(
    ctx: Ctx,
    arm: Arm,
    config,
    rows: tuple[int, ...],
    deadline: float,
    setup_s: float,
    step_s: float,
    row: int,
) -> dict:
    """The longest of ``rows`` that ``arm`` trains (two optimizer steps of one bin of that many tokens), trying
    them in order and stopping at the first out-of-memory or when the time left would not cover the next (its
    estimate: ``setup_s`` and two steps of ``step_s`` per ``row`` tokens, scaled by (L / row)^2 for attention)."""
    scale = 1 / 32 if ctx.dry else 1.0
    out: dict = {"tried": {}, "max_row": None}
    for L in rows:
        estimate = setup_s + 2 * step_s * max(L / row, 1) ** 2
        if time.perf_counter() + estimate > deadline:
            out["stopped"] = f"budget: {L} tokens would need about {estimate:.0f} s"
            break
        examples = rag.examples(int(L * 2.3), config.vocab_size, seed=1, scale=scale, max_length=min(L, 4096))
        res = _guarded(ctx, _probe, ctx, arm, config, examples, L)
        out["tried"][L] = res
        if res["status"] != "ok":
            out["stopped"] = f"{res['status']} at {L} tokens"
            break
        out["max_row"] = L
    return out


def _probe(ctx: Ctx, arm: Arm, config, examples: list[dict], L: int) -> dict:
    """Two optimizer steps on the examples of the two fullest bins of ``L`` tokens, re-binned as every arm bins
    them (RagTrainer packs the examples it is given)."""
    full = sorted(
        plan_bins(examples, L, 2, all_bins=True), key=lambda b: -sum(len(examples[i]["input_ids"]) for i in b)
    )
    examples = [examples[i] for b in full[:2] for i in b]
    bins = plan_bins(examples, L, 2)
    r = run_arm(ctx, arm, config, examples, bins, L, 0)
    return {"row_tokens": L, "step_tokens": r["step_tokens"], "step_ms": r["step_ms"],
            "peak_mem_bytes": r["peak_mem_bytes"]}  # fmt: skip


def _one_run(ctx, model, arm, r, mine, walls, deadline, config, examples, bins, row, warmup) -> list[float]:
    """Repeat ``r`` of ``arm`` appended to ``mine`` (its runs so far), unless it failed before or would not fit
    before ``deadline`` (estimated from its last run, else the median run so far); returns its wall time."""
    if any(x.get("status") in ("error", "oom") for x in mine):
        mine.append({"status": "skipped", "reason": "failed in an earlier repeat", "repeat": r})
        return []
    done = [x["wall_s"] for x in mine if "wall_s" in x]  # this arm's last run has its compiles behind it
    estimate = done[-1] if done else (statistics.median(walls) if walls else 0.0)
    if time.perf_counter() + estimate > deadline:
        mine.append({"status": "skipped", "reason": "case budget spent", "repeat": r})
        return []
    res = _guarded(ctx, run_arm, ctx, arm, config, examples, bins, row, warmup)
    res["repeat"] = r
    mine.append(res)
    tail = f" {res['tokens_per_s']:.0f} tok/s" if res["status"] == "ok" else f" {res.get('error', '')[:160]}"
    print(f"    e2e {model} r{r} {arm.name}: {res['status']}{tail}", flush=True)
    return [res["wall_s"]] if "wall_s" in res else []


def e2e_case(ctx: Ctx, model: str, peak_tflops: float | None = None, budget_s: float | None = None) -> dict:
    """Every arm of ``arms_for(ctx)`` on ``model``'s shape: see the module docstring. ``budget_s``: seconds for the
    whole case; runs that would not finish in what is left are recorded as skipped (the timed repeats first,
    then the longest-row search)."""
    t_start = time.perf_counter()
    deadline = t_start + (budget_s if budget_s else 10**9)
    config = _config(ctx, model)
    row = 256 if ctx.dry else QUICK_ROW if ctx.quick else 16384
    warmup, timed = WARMUP, DRY_TIMED if ctx.dry else TIMED
    scale = 1 / 32 if ctx.dry else 1.0
    examples = rag.examples(int(row * (warmup + timed) * 1.5), config.vocab_size, seed=0, scale=scale,
                            max_length=row)  # fmt: skip
    bins = plan_bins(examples, row, warmup + timed)
    arms = arms_for(ctx)
    out: dict = {
        "config": CONFIGS[model], "shrunk_for_dry_run": ctx.dry, "row_tokens": row, "repeats": REPEATS,
        "warmup_steps": warmup, "timed_steps": timed, "pad_micro_batch": PAD_MICRO, "lora": LORA,
        "bins": {"count": len(bins), "tokens": [sum(len(examples[i]["input_ids"]) for i in b) for b in bins],
                 "examples": [len(b) for b in bins]},
        "arms_described": {a.name: a.what for a in arms},
    }  # fmt: skip
    if ctx.dry:
        out["dry_run_note"] = (f"dry run: {warmup} warm-up and {timed} timed steps per run (>= 20 timed on a GPU), "
                               "tiny shapes on the CPU: the times only show that the code runs")  # fmt: skip
    runs: dict[str, list[dict]] = {a.name: [] for a in arms}
    why_not = {a.name: needs(a, ctx) for a in arms}
    by_name = {a.name: a for a in arms}
    if ctx.dry and why_not.get("trl_sft_liger"):  # TRL still runs, without Liger: its code path is exercised
        by_name["trl_sft_liger"] = Arm(
            "trl_sft_liger", "trl", "trl", "sdpa", what=by_name["trl_sft_liger"].what
        )
        out["trl_note"] = f"dry run: TRL ran without Liger ({why_not['trl_sft_liger']})"
        why_not["trl_sft_liger"] = None
    runnable = [a.name for a in arms if why_not[a.name] is None]
    orders = _rotations(runnable, REPEATS)
    out["orders"] = orders
    walls: list[float] = []
    try:
        for r, order in enumerate(orders):
            for name in order:
                walls += _one_run(
                    ctx,
                    model,
                    by_name[name],
                    r,
                    runs[name],
                    walls,
                    deadline,
                    config,
                    examples,
                    bins,
                    row,
                    warmup,
                )
    except CaseTimeout as e:  # stopped by the part's alarm: what ran is kept, the rest is recorded as not run
        out["stopped"] = str(e)
        deadline = time.perf_counter()
        for r, order in enumerate(orders):
            for name in order:
                if not any(x.get("repeat") == r for x in runs[name]):
                    runs[name].append({"status": "skipped", "reason": f"stopped: {e}", "repeat": r})
    summary: dict[str, dict] = {}
    for a in arms:
        if why_not[a.name] is not None:
            summary[a.name] = {"status": "skipped", "reason": why_not[a.name], "runs": []}
            continue
        summary[a.name] = {**summarise(runs[a.name], peak_tflops), "runs": runs[a.name],
                           "liger": by_name[a.name].liger, "ours": a.ours, "lora": a.lora}  # fmt: skip
    lora = {a.name for a in arms if a.lora}
    refs = ratios(summary, lora, {a.name for a in arms if a.ours})
    out["arms"], out["references"] = summary, refs
    out["equal_tokens_per_step"] = _equal_steps(summary)
    # the longest row each arm trains
    full = [a for a in arms if not a.lora and summary[a.name]["status"] == "ok"]
    if ctx.mode != "full":  # quick and dry run: ragkern and the strongest peer only
        full = [a for a in full if a.name in (OURS, refs["strongest_peer"])]
    ok_runs = [r for x in runs.values() for r in x if r.get("status") == "ok"]
    setup_s = max((r["setup_s"] for r in ok_runs), default=10.0)
    step_s = max((statistics.median(r["step_ms"]) / 1e3 for r in ok_runs), default=1.0)
    rows = DRY_MAX_ROWS if ctx.dry else MAX_ROWS
    out["max_row"] = {}
    try:
        for a in full:
            out["max_row"][a.name] = max_row(
                ctx, by_name[a.name], config, rows, deadline, setup_s, step_s, row
            )
    except CaseTimeout as e:
        out["stopped"] = str(e)
    # the keys the first version of this part reported, for readers of older records
    for key, name in (("ragkern", OURS), ("hf", FLOOR)):
        if summary.get(name, {}).get("status") == "ok":
            run = next(r for r in runs[name] if r.get("status") == "ok")
            out[key] = {**{k: run[k] for k in ("real_tokens", "computed_tokens", "target_tokens", "peak_mem_bytes")},
                        "tokens_per_s": summary[name]["tokens_per_s"]}  # fmt: skip
    if summary.get(OURS, {}).get("vs_floor") is not None:
        out["speedup_tokens_per_s"] = summary[OURS]["vs_floor"]
    out["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    if summary.get(OURS, {}).get("status") != "ok":
        return {"status": "error", "error": f"{OURS}: {summary.get(OURS, {}).get('error')}", **out}
    return out


def _equal_steps(summary: dict[str, dict]) -> dict:
    """Whether every run of every arm trained the same examples (lengths) per optimizer step."""
    seen = {}
    for name, a in summary.items():
        for r in a.get("runs", []):
            if r.get("status") == "ok":
                seen.setdefault(json.dumps(r["step_lengths"]), []).append(f"{name} r{r['repeat']}")
    return {"equal": len(seen) <= 1, "groups": list(seen.values()) if len(seen) > 1 else None}


def plan(
    ctx: Ctx, peak_tflops: float | None = None, budget_s: float | None = None
) -> list[tuple[str, object, dict, bool]]:
    """One case per model shape (quick and dry run: Qwen2.5-0.5B only), the part's budget shared between them."""
    models = ["qwen2.5-0.5b"] if ctx.quick or ctx.dry else ["qwen2.5-0.5b", "llama-3.2-1b"]
    share = None if budget_s is None else budget_s / len(models)
    return [
        (f"e2e {m}", e2e_case, dict(model=m, peak_tflops=peak_tflops, budget_s=share), False) for m in models
    ]
