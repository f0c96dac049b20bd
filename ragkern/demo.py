"""``ragkern demo``: train a tiny model on CPU to answer from its oracle passage, and measure whether it does.

The task (fictional facts, values drawn fresh per record so that only reading can answer)::

    Passages:
    [1] barof star besir      <- each passage: a fictional name, a relation, a fictional value
    [2] vubad metal pimud     <- the passages of a record state different relations; every value is
    [3] rakud river bizog        drawn fresh from its relation's words, so the answer is in the
    [4] kobok song redon         oracle passage and nowhere else, and cannot be memorised
    Question: vubad metal ?   -> answer "metal pimud"   (oracle = [1], 0-based)

The model must find the passage that states the asked relation and copy its value. The answer repeats the
relation first, so the value is predicted right after the relation word. Copying a random passage's value
scores 1 / num_passages (``chance``); guessing a value of the right relation without reading scores about
1 / values_per_relation. ``accuracy_without_oracle`` re-asks the held-out questions with the oracle passage
removed: a model that reads falls to about 1 / values_per_relation there (a guess of the right kind). The
held-out records have 4 passages and one question; each has its own draws of names, relations and values.

The recipe (:class:`DemoRecipe`), and why:

* training records ask about 1..4 of their passages (``"vubad metal ? kobok song ?"`` -> ``"metal pimud song
  redon"``): up to 4 answers to read per record instead of 1, the strongest single lever (the held-out
  questions ask one);
* a 2-layer Qwen3 (a Llama with RMS-normed queries and keys; hidden 128, tied embeddings), AdamW with weight
  decay 0.1: the model reads relation by relation (it learns, per relation, to attend to that relation's
  values), and a relation whose attention has saturated on another token (0.99 on the ``<|assistant|>`` token
  before it, we looked) gets no gradient and stays unread: the held-out accuracy then stalls at 5/8 to 7/8 of
  the relations (0.55, 0.68, 0.78). Normed queries and keys and weight decay keep the attention logits from
  saturating early;
* 8 attention heads of 16 dimensions (not 4 of 32; same parameters and cost). With 4 heads, seed 0 stalled
  with relations unread (0.57 with AVX512 kernels: city, color, river and tree unread; 0.84 with AVX2: metal
  and river half read); with 8 it reads every relation by step 400 on the same cells. Two likely reasons (not
  separated): twice the heads that can each pick up a relation, and with normed queries and keys a head's
  attention logits are bounded by sqrt(head_dim) times its norm weights, so a narrower head saturates later;
* a word-level vocabulary of ~180 tokens; a soft curriculum (training records have 1..4 passages); peak
  learning rate 3e-3, 10% warm-up, cosine decay; 1,500 steps of one packed 512-token row (~10 examples)
  through :class:`ragkern.RagTrainer`, on one CPU thread (tiny matrices; on a shared machine more threads
  mostly wait for each other).

Measured with `ragkern demo` itself (bench/demo_grid.py, bench/results/demo_grid.json; the runs are
deterministic given seed and CPU kernels, so the accuracy measured on a busy machine is what an idle one
gets), seeds 0-4 under both the default (AVX512) and ``ATEN_CPU_CAPABILITY=avx2`` kernels of an AMD EPYC:
held-out accuracy 1.00 in all 10 runs, at least 0.9 by step 450 in 8 runs and by step 600 in all 10 (the other
two: 0.76 and 0.86 at step 450), then held at 1.00; 0.06-0.11 with the oracle removed. Run one at a time at
load average ~1: 60-68 s wall per run, equal to its CPU time (one thread).

What did not work (same grid cells, by steps): the previous recipe (3-layer Llama, one question per record,
2,000 steps) stalled at 0.68 on seed 0 with AVX512 kernels (3 relations of 8 unread) where AVX2 reached
1.00: a rounding edge. Asking about several passages made that Llama reach 1.00 by step 1,200, but over
1,500 steps it stalled at 0.30; with 2 layers 6 of 8 runs reached 1.00 and two stalled (0.55, 0.78);
adding weight decay 0.1 still left one of 7 at 0.68; a Llama with weight decay and a peak rate of 1.5e-3
reached 1.00 on all 10 but later (step 600-900 for 0.9). One value pool shared by all relations (so only
an induction head can read) stayed at chance (0.27) after 1,500 steps; 4 relations instead of 8 stayed at
0.21; an answer "metal is pimud" (a fixed token before the value) stalled at 0.30 and 0.50.

``--block-attention`` trains with the passage block mask (each passage sees only itself) and scores every
answer, the learning curve included, under that mask: ``accuracy_after`` is the block-masked accuracy. It then
answers the held-out questions again with each passage's KV cache encoded once and reused
(:mod:`ragkern.inference`), reporting that accuracy and the prefill tokens saved (``cache_reuse``). Same grid,
same recipe: 1.00 block-masked and 1.00 with reused caches in all 10 runs, at least 0.98 by step 600 in all
(0.14-0.87 at step 450 on seeds 1, 3, 4); 0.06-0.12 with the oracle removed; 69-78 s of CPU time per run (seed
0: 77 s wall).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, TrainerCallback

from .data import build_word_tokenizer
from .evaluate import cited_markers, evaluate_answers

_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()


@dataclass
class DemoRecipe:
    """Task, model and training settings of the demo (defaults: the measured recipe)."""

    num_passages: int = 4  # passages per evaluation record; chance = 1 / num_passages
    min_train_passages: int = 1  # training records draw 1..num_passages passages: a soft curriculum
    num_names: int = 24  # fictional names
    num_relations: int = 8  # relations (city, color, ...); each passage of a record states a different one
    distinct_relations: bool = True
    train_questions: int = 4  # a training record asks about 1..train_questions of its passages (held-out: 1)
    values_per_relation: int = 12  # fictional values per relation (answers), drawn fresh per record
    train_records: int = 12_000  # encoded once (about 10 s); steps beyond one epoch reshuffle them
    eval_records: int = 300  # held-out, distinct records
    curve_records: int = 100  # held-out records scored at each learning-curve point
    curve_points: int = 10
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 8  # head_dim 16: more heads to pick up each relation, later saturation (see above)
    intermediate_size: int = 256
    max_steps: int = 1500
    bins_per_step: int = 1
    max_length: int = 512  # tokens per packed bin
    learning_rate: float = 3e-3
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.1
    extra: dict = field(default_factory=dict)


RELATIONS = ("city", "color", "river", "metal", "tree", "ship", "song", "star")


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


@dataclass(frozen=True)
class TaskVocabulary:
    """The task's fixed word lists: fictional ``names``, English ``relations`` and, per relation, its
    fictional ``values`` (disjoint across relations, so a value's relation is known from the word)."""

    names: tuple[str, ...]
    relations: tuple[str, ...]
    values: dict[str, tuple[str, ...]]

    def words(self) -> list[str]:
        return [*self.names, *self.relations, *(v for r in self.relations for v in self.values[r])]


def task_vocabulary(recipe: DemoRecipe) -> TaskVocabulary:
    """The task's words, drawn from a fixed seed (independent of the run's seed)."""
    if not 1 <= recipe.num_passages <= recipe.num_relations <= len(RELATIONS):
        raise ValueError(
            f"need 1 <= num_passages ({recipe.num_passages}) <= num_relations ({recipe.num_relations}) "
            f"<= {len(RELATIONS)}"
        )
    rng, taken = random.Random(1234), {"passages", "question", *RELATIONS}
    relations = RELATIONS[: recipe.num_relations]
    names = tuple(_words(recipe.num_names, rng, taken))
    values = {r: tuple(_words(recipe.values_per_relation, rng, taken)) for r in relations}
    return TaskVocabulary(names, relations, values)


def make_records(
    n: int,
    *,
    seed: int,
    recipe: DemoRecipe | None = None,
    num_passages: int | tuple[int, int] | None = None,
    questions: int = 1,
) -> list[dict]:
    """``n`` RAFT records ``{"question", "passages", "answer", "oracle"}``, deterministic in ``seed``.

    ``num_passages`` is an int, or a range ``(lo, hi)`` drawn per record (default: ``recipe.num_passages``).
    A record's passages state facts about distinct names with distinct relations; every value is drawn
    fresh, so the answer occurs only in the oracle passage and cannot be memorised.

    ``questions > 1`` asks about 1..questions of a record's passages (as many as it has at most), in random
    order: ``"vubad metal ? kobok song ?"`` -> ``"metal pimud song redon"``, ``oracle`` = the asked passages.
    """
    recipe = recipe or DemoRecipe()
    vocab = task_vocabulary(recipe)
    if num_passages is None:
        num_passages = recipe.num_passages
    lo, hi = (num_passages, num_passages) if isinstance(num_passages, int) else num_passages
    if not 1 <= lo <= hi <= len(vocab.relations):
        raise ValueError(f"num_passages={num_passages} must be >= 1 and at most {len(vocab.relations)}")
    if questions < 1:
        raise ValueError(f"questions={questions} must be >= 1")
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        names = rng.sample(vocab.names, k)
        if recipe.distinct_relations:
            relations = rng.sample(vocab.relations, k)
            values = [rng.choice(vocab.values[r]) for r in relations]
        else:  # one relation for the whole record: only the name tells the oracle apart
            relations = [rng.choice(vocab.relations)] * k
            values = rng.sample(vocab.values[relations[0]], k)
        asked = (
            [rng.randrange(k)] if questions == 1 else rng.sample(range(k), rng.randint(1, min(questions, k)))
        )
        records.append(
            {
                "question": " ".join(f"{names[o]} {relations[o]} ?" for o in asked),
                "passages": [f"{a} {r} {v}" for a, r, v in zip(names, relations, values)],
                "answer": " ".join(f"{relations[o]} {values[o]}" for o in asked),
                "oracle": sorted(asked),
            }
        )
    return records


def build_tokenizer(recipe: DemoRecipe | None = None):
    """The demo's offline word-level tokenizer (special tokens, punctuation, the task's words)."""
    return build_word_tokenizer(["passages", "question", *task_vocabulary(recipe or DemoRecipe()).words()])


def build_model(tokenizer, recipe: DemoRecipe, seed: int) -> Qwen3ForCausalLM:
    """A tiny randomly initialised Qwen3 (a Llama with RMS-normed queries and keys; no download)."""
    config = Qwen3Config(
        head_dim=recipe.hidden_size // recipe.num_heads,
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
    return Qwen3ForCausalLM(config)


class LearningCurve(TrainerCallback):
    """Scores held-out records at a few training steps: ``points`` = [{step, seconds, accuracy}]."""

    def __init__(
        self,
        tokenizer,
        records: list[dict],
        steps: list[int],
        quiet: bool = False,
        block_attention: bool = False,
    ):
        self.tokenizer, self.records, self.steps = tokenizer, records, set(steps)
        self.points: list[dict] = []
        self.quiet, self.block_attention = quiet, block_attention
        self._start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            acc = evaluate_answers(
                model,
                self.tokenizer,
                self.records,
                max_new_tokens=4,
                block_attention=self.block_attention,
                show_progress=False,  # a few seconds, under the training bar
            )["exact_match"]
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
    block_attention: bool = False,
) -> dict:
    """Train the demo model with :class:`ragkern.RagTrainer` and report held-out answer accuracy.

    ``quick`` runs a few steps on little data (a smoke run, not a result); ``max_steps`` overrides the recipe.
    Writes the model and tokenizer (safetensors) and ``metrics.json`` to ``output_dir``; returns the metrics:
    ``accuracy_before``, ``accuracy_after``, ``chance``, ``fill_ratio``, ``tokens_per_second``,
    ``learning_curve`` and timings. ``num_threads`` sets torch's CPU threads for the run (None: unchanged).

    ``accuracy_without_oracle`` scores the same held-out questions with their oracle passage removed: a model
    that answers from the passage falls to about ``1 / values_per_relation`` there.

    ``block_attention=True`` trains with the passage block mask (each passage attends only to itself) and
    adds ``cache_reuse``: accuracy with a full block-masked prefill vs with passage KV caches encoded once and
    reused (:func:`ragkern.inference.evaluate_cache_reuse`), and the prefill tokens saved.
    """
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run_demo(
            Path(output_dir), seed, quick, max_steps, recipe or DemoRecipe(), quiet, block_attention
        )
    finally:
        torch.set_num_threads(threads)


def _without_oracle(record: dict) -> dict:
    (o,) = record["oracle"]
    return {**record, "passages": record["passages"][:o] + record["passages"][o + 1 :], "oracle": []}


def _run_demo(
    out: Path,
    seed: int,
    quick: bool,
    max_steps: int | None,
    recipe: DemoRecipe,
    quiet: bool,
    block_attention: bool,
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
        questions=recipe.train_questions,
    )
    held_out = make_records(n_eval, seed=seed * 1000 + 2, recipe=recipe)
    curve_set = held_out[: min(recipe.curve_records, n_eval)]
    model = build_model(tokenizer, recipe, seed)
    if block_attention:  # the block mask lives in the "ragkern" attention; RagTrainer would switch it anyway
        model.set_attn_implementation("ragkern")

    def accuracy(records: list[dict]) -> dict:
        # A block-attention model answers under the block mask it was trained with.
        return evaluate_answers(
            model,
            tokenizer,
            records,
            max_new_tokens=4,
            block_attention=block_attention,
            show_progress=not quiet,
        )

    say = (lambda *a: None) if quiet else print
    n_params = sum(p.numel() for p in model.parameters())
    chance = 1.0 / recipe.num_passages
    say(
        f"ragkern demo: {len(train)} training records ({recipe.min_train_passages}..{recipe.num_passages} "
        f"passages, 1..{recipe.train_questions} questions), {len(held_out)} held-out records with "
        f"{recipe.num_passages} passages and one question (chance {chance:.2f}); Qwen3 {recipe.num_layers} "
        f"layers, hidden {recipe.hidden_size}, {n_params / 1e6:.2f}M parameters"
        + ("; passage block attention" if block_attention else "")
    )
    before = accuracy(held_out)["exact_match"]
    say(f"accuracy before training: {before:.3f}")

    n_points = min(recipe.curve_points, steps)
    curve = LearningCurve(
        tokenizer,
        curve_set,
        [round(steps * (i + 1) / n_points) for i in range(n_points)],
        quiet=quiet,
        block_attention=block_attention,
    )
    args = RagTrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=recipe.bins_per_step,
        max_length=recipe.max_length,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=max(1, round(recipe.warmup_ratio * steps)),
        weight_decay=recipe.weight_decay,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        disable_tqdm=quiet,
        dataloader_num_workers=0,
        block_attention=block_attention,
        **recipe.extra,
    )
    trainer = RagTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[curve]
    )
    t_train = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t_train

    final = accuracy(held_out)
    after = final["exact_match"]
    no_oracle = accuracy([_without_oracle(r) for r in held_out])["exact_match"]
    reuse = None
    if block_attention:
        from .inference import evaluate_cache_reuse

        reuse = evaluate_cache_reuse(model, tokenizer, held_out, max_new_tokens=4)
    logs = trainer.state.log_history
    metrics = {
        "accuracy_before": before,
        "accuracy_after": after,
        "accuracy_without_oracle": no_oracle,
        "chance": chance,
        "block_attention": block_attention,
        "cache_reuse": reuse,
        "num_passages": recipe.num_passages,
        "eval_records": len(held_out),
        "fill_ratio": next((h["fill_ratio"] for h in reversed(logs) if "fill_ratio" in h), None),
        "tokens_per_second": result.metrics.get("train_tokens_per_second"),
        "train_steps": steps,
        "train_loss": result.metrics.get("train_loss"),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "learning_curve": curve.points,
        "examples": _without_citations(final["predictions"][:5], held_out),
        "recipe": asdict(recipe),
        "seed": seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    how = " (block-masked, as trained)" if block_attention else ""
    say(
        f"accuracy after training{how}: {after:.3f} (before {before:.3f}, chance {chance:.2f}) on "
        f"{len(held_out)} held-out records | fill ratio {metrics['fill_ratio']} | "
        f"{metrics['tokens_per_second']:.0f} tokens/s on {metrics['torch_threads']} thread(s), "
        f"{metrics['cpu_capability']} kernels | training {train_seconds:.0f} s, "
        f"total {metrics['total_seconds']:.0f} s"
    )
    say(f"control: accuracy with the oracle passage removed: {no_oracle:.3f} (the answer is only in it)")
    if reuse is not None:
        say(
            f"block attention: accuracy with reused passage caches {reuse['exact_match_cached']:.3f} vs a "
            f"full block-masked prefill {reuse['exact_match_full_prefill']:.3f} (same answer on "
            f"{reuse['agreement']:.1%}); "
            f"prefill tokens {reuse['prefill_tokens_full']} -> {reuse['prefill_tokens_cached']} "
            f"({reuse['prefill_saved_fraction']:.1%} saved; {reuse['passage_tokens_encoded']} passage tokens "
            "encoded once, offline)"
        )
    say(
        "learning curve (step, seconds, held-out accuracy): "
        + ", ".join(f"({p['step']}, {p['seconds']}, {p['accuracy']:.2f})" for p in curve.points)
    )
    say(f"model and metrics.json written to {out}")
    return metrics


def _without_citations(predictions: list[dict], records: list[dict]) -> list[dict]:
    """``predictions`` without ``cites_oracle`` when no answer of the task carries a citation marker (the
    demo's answers cite nothing, so "cites_oracle: false" would only be noise)."""
    if any(cited_markers(r["answer"]) for r in records):
        return predictions
    return [{k: v for k, v in p.items() if k != "cites_oracle"} for p in predictions]
