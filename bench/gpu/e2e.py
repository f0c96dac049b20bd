"""End to end: randomly initialised models of real shapes (configs written out below, nothing downloaded),
full fine-tuning in bf16 autocast (``bf16=True``: fp32 weights, AdamW), on the same RAG examples two ways:

  ragkern  RagTrainer: bins of 16,384 tokens, one packed row per step, "ragkern" attention, fused loss
  hf       transformers.Trainer: 4 examples per step padded to the longest, sdpa, logits materialised

The ragkern run packs the examples and trains its first bins; the hf run then trains exactly the examples of
those bins. The first steps of each (compiles, allocator warm-up) are not timed. Reported per way: real
(non-padding) tokens/s over the timed steps, peak CUDA memory, and MFU: model FLOPs / (time x the card's
datasheet dense bf16 peak, ``harness.DATASHEET_BF16_TFLOPS``), with model FLOPs = 6 x (parameters of every
nn.Linear, lm_head included) x real tokens + 12 x layers x heads x head_dim x (causal pairs within each example),
the PaLM/Megatron definition, the same for both ways. The FLOPs each way executes are reported apart
(``executed_tflops_per_s``): ragkern runs the lm_head on target rows only; the padded way runs every linear on
its padding too, and its attention is counted as causal pairs over each padded row (a lower bound).
Dry run: the same configs shrunk (``ragkern.selftest.small_config``), rows of 256 tokens, on the CPU.
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch

from . import rag
from .harness import Ctx, free_memory, run_guarded

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
HF_BATCH = 4  # examples per padded step: at most 4 x 3.5k tokens, no more than a packed row


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
    from transformers import AutoModelForCausalLM

    import ragkern  # noqa: F401  (registers the "ragkern" attention)

    torch.manual_seed(0)
    with torch.device(ctx.device):  # initialised on the device: seconds, not minutes
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


class _Counting:
    """Wraps a collator and records, per batch in training order, real tokens, computed tokens, target tokens,
    the causal (query, key) pairs within examples and within whole rows."""

    def __init__(self, collate):
        self.collate, self.batches, self.examples = collate, [], []

    def __call__(self, features):
        batch = self.collate(features)
        lengths = [len(f["input_ids"]) for f in features]
        rows, width = batch["input_ids"].shape
        self.examples.append(list(features))
        self.batches.append({"real": sum(lengths), "computed": rows * width, "pairs": rag.visible_pairs(lengths),
                             "row_pairs": rows * width * (width + 1) // 2,
                             "targets": int((batch["labels"] != -100).sum())})  # fmt: skip
        return batch


def _timer(ctx: Ctx, warmup: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time between the end of the last warm-up step and the end of each later step (synchronised),
        and the peak memory over the timed steps."""

        def __init__(self):
            self.ends, self.peak = [], None

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


def _way(ctx: Ctx, config, trainer, counting: _Counting, timer, warmup: int, packed: bool) -> dict:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # disable_tqdm would print every log dict
    trainer.train()
    steps = len(timer.ends)
    batches = counting.batches[:steps]  # the loader may collate one batch ahead of the last step
    timed = batches[warmup:]
    if not timed:
        raise RuntimeError(f"only {steps} steps ran; {warmup} are warm-up")
    seconds = timer.ends[-1] - timer.ends[warmup - 1]
    real = sum(b["real"] for b in timed)
    linear = sum(
        m.in_features * m.out_features for m in trainer.model.modules() if isinstance(m, torch.nn.Linear)
    )
    head = trainer.model.get_output_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim
    flops = sum(6 * linear * b["real"] + attn * b["pairs"] for b in timed)
    if packed:  # packed rows hold real tokens only; the fused loss runs the lm_head on target rows
        executed = sum(
            6 * (linear - head) * b["real"] + 6 * head * b["targets"] + attn * b["pairs"] for b in timed
        )
    else:
        executed = sum(6 * linear * b["computed"] + attn * b["row_pairs"] for b in timed)
    return {
        "steps_timed": len(timed), "warmup_steps": warmup, "seconds": round(seconds, 3), "real_tokens": real,
        "computed_tokens": sum(b["computed"] for b in timed), "target_tokens": sum(b["targets"] for b in timed),
        "tokens_per_s": round(real / seconds, 1), "model_tflops_per_s": round(flops / seconds / 1e12, 2),
        "executed_tflops_per_s": round(executed / seconds / 1e12, 2), "peak_mem_bytes": timer.peak,
        "linear_params": linear,
    }  # fmt: skip


def e2e_case(ctx: Ctx, model: str, peak_tflops: float | None = None) -> dict:
    from transformers import Trainer, TrainingArguments

    from ragkern import PackingCollator, RagTrainer, RagTrainingArguments
    from ragkern.collator import PaddingCollator

    config = _config(ctx, model)
    row = 256 if ctx.dry else 16384
    warmup, timed = (1, 2) if ctx.dry else (2, 3 if ctx.quick else 6)
    scale = 1 / 32 if ctx.dry else 1.0
    examples = rag.examples(
        int(row * (warmup + timed) * 1.1), config.vocab_size, seed=0, scale=scale, max_length=row
    )
    out = {"config": CONFIGS[model], "shrunk_for_dry_run": ctx.dry, "row_tokens": row, "hf_batch": HF_BATCH}
    trained: list[dict] = []

    def ragkern_way(tmp):
        counting, timer = _Counting(PackingCollator()), _timer(ctx, warmup)
        net = _model(ctx, config, "ragkern")
        args = _args(RagTrainingArguments, ctx, tmp, warmup + timed, 1, max_length=row)
        trainer = RagTrainer(
            model=net, args=args, data_collator=counting, train_dataset=examples, callbacks=[timer]
        )
        res = _way(ctx, config, trainer, counting, timer, warmup, packed=True)
        trained.extend(f for batch in counting.examples[: len(timer.ends)] for f in batch)
        return {**res, "fill_ratio": round(res["real_tokens"] / (row * res["steps_timed"]), 4)}

    def hf_way(tmp):
        # the examples of the bins ragkern trained; if it failed, as many tokens from the start of the list
        chosen = trained or _first_tokens(examples, row * (warmup + timed))
        data = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in chosen]
        counting, timer = _Counting(PaddingCollator(pad_token_id=0)), _timer(ctx, warmup)
        net = _model(ctx, config, "sdpa")
        args = _args(TrainingArguments, ctx, tmp, -(-len(data) // HF_BATCH), HF_BATCH)
        trainer = Trainer(model=net, args=args, data_collator=counting, train_dataset=data, callbacks=[timer])
        res = _way(ctx, config, trainer, counting, timer, warmup, packed=False)
        return {**res, "fill_ratio": round(res["real_tokens"] / max(res["computed_tokens"], 1), 4)}

    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for way, fn in (("ragkern", ragkern_way), ("hf", hf_way)):
            out[way] = run_guarded(fn, tmp)  # one way failing (an OOM, a crash) keeps the other's numbers
            free_memory(ctx)
            if "error" in out[way]:
                errors.append(f"{way}: {out[way]['error']}")
            elif peak_tflops:
                out[way]["mfu"] = round(out[way]["model_tflops_per_s"] / peak_tflops, 4)
    if errors:
        return {"status": "error", "error": " | ".join(errors)[:2000], **out}
    out["speedup_tokens_per_s"] = round(out["ragkern"]["tokens_per_s"] / out["hf"]["tokens_per_s"], 3)
    return out


def _first_tokens(examples: list[dict], n_tokens: int) -> list[dict]:
    out, used = [], 0
    for ex in examples:
        if used >= n_tokens:
            break
        out.append(ex)
        used += len(ex["input_ids"])
    return out


def plan(ctx: Ctx, peak_tflops: float | None = None) -> list[tuple[str, object, dict, bool]]:
    models = ["qwen2.5-0.5b"] if ctx.quick else ["qwen2.5-0.5b", "llama-3.2-1b"]
    return [(f"e2e {m}", e2e_case, dict(model=m, peak_tflops=peak_tflops), False) for m in models]
