"""``ragkern demo``: train a tiny Llama on CPU to answer from its oracle passage, and measure whether it does.

The task (fictional facts, drawn fresh per record so that only reading can answer)::

    Passages:
    [1] dovak mipel           <- each passage: a fictional name and its code word
    [2] zurin talop           <- the names and the codes of one record are distinct, so
    [3] kemod vasur              the answer's code is in its oracle passage and in no distractor
    [4] lofin budek
    Question: kemod ?         -> answer "kemod vasur"   (oracle = [2], 0-based)

Codes are re-drawn for every record, so memorising facts cannot help: the model must find the question's
name among the passages and copy the word after it. The answer repeats the name first, so the code is
predicted right after the name, as in the passage (an induction pattern: find the earlier occurrence of
the current token, copy the next one). A model that copies a random passage's code scores 1 / num_passages
(chance); exact match counts the whole answer.

The recipe (:class:`DemoRecipe`): a 2-layer Llama (hidden 128, tied embeddings), a small vocabulary, a soft
curriculum (training records have 1..num_passages passages), a high peak learning rate with warm-up and
cosine decay, packed rows of short examples through :class:`ragkern.RagTrainer`, one CPU thread (tiny
matrices; on a shared machine more threads mostly wait for each other).

Status (measured on a heavily shared 2-core machine, 1,500-2,000 steps): held-out accuracy rises from 0 to
about chance (0.2-0.3 with 4 passages): the model learns to copy *a* passage's code, but matching the
question's name to its passage has not formed within that many steps. The learning curve in metrics.json
shows where a run stands.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from .data import build_word_tokenizer
from .evaluate import evaluate_answers

_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()


@dataclass
class DemoRecipe:
    """Task, model and training settings of the demo (defaults: the measured recipe)."""

    num_passages: int = 4  # passages per evaluation record; chance = 1 / num_passages
    min_train_passages: int = 1  # training records draw 1..num_passages passages: a soft curriculum
    num_names: int = 24  # fictional names (question keys)
    num_codes: int = 24  # code words (answers); disjoint from the names
    train_records: int = 12_000  # encoded once (about 10 s); steps beyond one epoch reshuffle them
    eval_records: int = 300  # held-out, distinct records
    curve_records: int = 100  # held-out records scored at each learning-curve point
    curve_points: int = 6
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_steps: int = 2000
    bins_per_step: int = 1
    max_length: int = 512  # tokens per packed bin
    learning_rate: float = 1e-2
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    extra: dict = field(default_factory=dict)


def _words(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = (
            rng.choice(_ONSETS)
            + rng.choice(_VOWELS)
            + rng.choice(_ONSETS)
            + rng.choice(_VOWELS)
            + rng.choice(_ONSETS)
        )
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def task_vocabulary(recipe: DemoRecipe) -> tuple[list[str], list[str]]:
    """(names, codes): fixed word lists of the task, disjoint, drawn from a fixed seed."""
    rng, taken = random.Random(1234), {"passages", "question"}
    return _words(recipe.num_names, rng, taken), _words(recipe.num_codes, rng, taken)


def make_records(
    n: int, *, seed: int, recipe: DemoRecipe | None = None, num_passages: int | tuple[int, int] | None = None
) -> list[dict]:
    """``n`` RAFT records ``{"question", "passages", "answer", "oracle"}``, deterministic in ``seed``.

    ``num_passages`` is an int, or a range ``(lo, hi)`` drawn per record (default: ``recipe.num_passages``).
    Every record draws distinct names and distinct codes, so its answer occurs only in the oracle passage.
    """
    recipe = recipe or DemoRecipe()
    names, codes = task_vocabulary(recipe)
    lo, hi = (num_passages, num_passages) if isinstance(num_passages, int) else (num_passages or (0, 0))
    if num_passages is None:
        lo = hi = recipe.num_passages
    if not 1 <= lo <= hi <= min(len(names), len(codes)):
        raise ValueError(f"num_passages={num_passages} must be >= 1 and at most the number of names/codes")
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        keys, values = rng.sample(names, k), rng.sample(codes, k)
        oracle = rng.randrange(k)
        records.append(
            {
                "question": f"{keys[oracle]} ?",
                "passages": [f"{a} {b}" for a, b in zip(keys, values)],
                "answer": f"{keys[oracle]} {values[oracle]}",
                "oracle": [oracle],
            }
        )
    return records


def build_tokenizer(recipe: DemoRecipe | None = None):
    """The demo's offline word-level tokenizer (special tokens, punctuation, the task's words)."""
    names, codes = task_vocabulary(recipe or DemoRecipe())
    return build_word_tokenizer(["passages", "question", *names, *codes])


def build_model(tokenizer, recipe: DemoRecipe, seed: int) -> LlamaForCausalLM:
    """A tiny randomly initialised Llama (no download)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class LearningCurve(TrainerCallback):
    """Scores held-out records at a few training steps: ``points`` = [{step, seconds, accuracy}]."""

    def __init__(self, tokenizer, records: list[dict], steps: list[int], quiet: bool = False):
        self.tokenizer, self.records, self.steps = tokenizer, records, set(steps)
        self.points: list[dict] = []
        self.quiet = quiet
        self._start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            acc = evaluate_answers(model, self.tokenizer, self.records, max_new_tokens=4)["exact_match"]
            point = {
                "step": state.global_step,
                "seconds": round(time.perf_counter() - self._start, 1),
                "accuracy": acc,
            }
            self.points.append(point)
            if not self.quiet:
                print(f"\n  step {point['step']:>5}  {point['seconds']:>6.1f} s  held-out accuracy {acc:.3f}")


def run_demo(
    output_dir: str | Path = "ragkern-demo",
    *,
    seed: int = 0,
    quick: bool = False,
    max_steps: int | None = None,
    recipe: DemoRecipe | None = None,
    quiet: bool = False,
    num_threads: int | None = 1,
) -> dict:
    """Train the demo model with :class:`ragkern.RagTrainer` and report held-out answer accuracy.

    ``quick`` runs a few steps on little data (a smoke run, not a result); ``max_steps`` overrides the recipe.
    Writes the model and tokenizer (safetensors) and ``metrics.json`` to ``output_dir``; returns the metrics:
    ``accuracy_before``, ``accuracy_after``, ``chance``, ``fill_ratio``, ``tokens_per_second``,
    ``learning_curve`` and timings. ``num_threads`` sets torch's CPU threads for the run (None: unchanged).
    """
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run_demo(Path(output_dir), seed, quick, max_steps, recipe or DemoRecipe(), quiet)
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    out: Path, seed: int, quick: bool, max_steps: int | None, recipe: DemoRecipe, quiet: bool
) -> dict:
    from . import RagTrainer, RagTrainingArguments

    t0 = time.perf_counter()
    steps = max_steps if max_steps is not None else (10 if quick else recipe.max_steps)
    if steps < 1:
        raise ValueError(f"max_steps={steps} must be >= 1")
    n_train = min(recipe.train_records, 400) if quick else recipe.train_records
    n_eval = 40 if quick else recipe.eval_records
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(recipe)
    train = make_records(
        n_train,
        seed=seed * 1000 + 1,
        recipe=recipe,
        num_passages=(recipe.min_train_passages, recipe.num_passages),
    )
    held_out = make_records(n_eval, seed=seed * 1000 + 2, recipe=recipe)
    curve_set = held_out[: min(recipe.curve_records, n_eval)]
    model = build_model(tokenizer, recipe, seed)

    say = (lambda *a: None) if quiet else print
    chance = 1.0 / recipe.num_passages
    say(
        f"ragkern demo: {len(train)} training records ({recipe.min_train_passages}..{recipe.num_passages} passages), {len(held_out)} held-out "
        f"records with {recipe.num_passages} passages (chance {chance:.2f}); Llama {recipe.num_layers} layers, "
        f"hidden {recipe.hidden_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    )
    before = evaluate_answers(model, tokenizer, held_out, max_new_tokens=4)["exact_match"]
    say(f"accuracy before training: {before:.3f}")

    n_points = min(recipe.curve_points, steps)
    curve = LearningCurve(
        tokenizer, curve_set, [round(steps * (i + 1) / n_points) for i in range(n_points)], quiet=quiet
    )
    args = RagTrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=recipe.bins_per_step,
        max_length=recipe.max_length,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(recipe.warmup_ratio * steps)),
        weight_decay=recipe.weight_decay,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        disable_tqdm=quiet,
        dataloader_num_workers=0,
        **recipe.extra,
    )
    trainer = RagTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[curve]
    )
    t_train = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t_train

    final = evaluate_answers(model, tokenizer, held_out, max_new_tokens=4)
    after = final["exact_match"]
    logs = trainer.state.log_history
    metrics = {
        "accuracy_before": before,
        "accuracy_after": after,
        "chance": chance,
        "num_passages": recipe.num_passages,
        "eval_records": len(held_out),
        "fill_ratio": next((h["fill_ratio"] for h in reversed(logs) if "fill_ratio" in h), None),
        "tokens_per_second": result.metrics.get("train_tokens_per_second"),
        "train_steps": steps,
        "train_loss": result.metrics.get("train_loss"),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": None,
        "learning_curve": curve.points,
        "examples": final["predictions"][:5],
        "recipe": asdict(recipe),
        "seed": seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    say(
        f"accuracy after training: {after:.3f} (before {before:.3f}, chance {chance:.2f}) on {len(held_out)} "
        f"held-out records | fill ratio {metrics['fill_ratio']} | {metrics['tokens_per_second']} tokens/s | "
        f"training {train_seconds:.0f} s, total {metrics['total_seconds']:.0f} s"
    )
    say(
        "learning curve (step, seconds, held-out accuracy): "
        + ", ".join(f"({p['step']}, {p['seconds']}, {p['accuracy']:.2f})" for p in curve.points)
    )
    say(f"model and metrics.json written to {out}")
    return metrics
