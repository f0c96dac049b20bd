"""ragkern.normalization: step divisors and token weights against the formulas, on random packed batches;
ragkern.metrics: the accumulators behind the logs."""

import pytest
import torch

from ragkern import PackingCollator
from ragkern.metrics import PackedMetrics
from ragkern.normalization import (
    example_stats,
    set_loss,
    source_weight_vector,
    step_divisors,
    target_mask,
    target_stats,
    token_weights,
)

SOURCES = ("a", "b", "c")


def batch_of(lengths, seed):
    """A packed batch of examples of ``lengths`` with random targets and sources, and a random token loss."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        labels = [t if torch.rand(1, generator=g) < 0.6 else -100 for t in range(n)]
        source = SOURCES[int(torch.randint(0, 2, (1,), generator=g))]  # "c" never appears
        examples.append({"input_ids": list(range(n)), "labels": labels, "source": source})
    batch = PackingCollator(source_names=SOURCES)(examples)
    token_loss = torch.rand(batch["labels"].shape, generator=g, dtype=torch.float64) * 5
    return batch, token_loss, examples


def per_example(batches):
    """(source, target-token loss sum, target count) of every example of every batch, from the batches' rows."""
    out = []
    for batch, token_loss, examples in batches:
        bounds = batch["cu_seq_lens_q"].tolist()
        mask = target_mask(batch["labels"])[0]
        for ex, a, b in zip(examples, bounds[:-1], bounds[1:]):
            out.append((ex["source"], float(token_loss[0, a:b][mask[a:b]].sum()), int(mask[a:b].sum())))
    return out


STEP = [batch_of([7, 3, 12, 5], seed=1), batch_of([9, 4, 6], seed=2), batch_of([11, 2], seed=3)]
WEIGHTS = {"a": 2.0, "b": 0.5}


def expected(mode):
    rows = [r for r in per_example(STEP) if r[2]]
    if mode == "example":
        return sum(s / n for _, s, n in rows) / len(rows)
    means = {
        src: sum(s for x, s, _ in rows if x == src) / sum(n for x, _, n in rows if x == src)
        for src in {r[0] for r in rows}
    }
    return sum(WEIGHTS[k] * m for k, m in means.items()) / sum(WEIGHTS[k] for k in means)


@pytest.mark.parametrize("mode", ["example", "source"])
def test_token_weights_over_a_step_give_the_steps_loss(mode):
    weight = source_weight_vector(SOURCES, WEIGHTS)
    divisors = step_divisors([b for b, _, _ in STEP], mode, len(SOURCES))
    total = sum(
        float(
            (
                loss
                * token_weights(b, mode, source_ids=b["source_ids"], source_weight=weight, divisors=divisors)
            ).sum()
        )
        for b, loss, _ in STEP
    )
    assert total == pytest.approx(expected(mode), rel=1e-6)
    # Without the step's divisors a batch alone is normalised by its own.
    one = STEP[0]
    alone = float(
        (one[1] * token_weights(one[0], mode, source_ids=one[0]["source_ids"], source_weight=weight)).sum()
    )
    own = float(
        (
            one[1]
            * token_weights(
                one[0],
                mode,
                source_ids=one[0]["source_ids"],
                source_weight=weight,
                divisors=step_divisors([one[0]], mode, len(SOURCES)),
            )
        ).sum()
    )
    assert alone == pytest.approx(own, rel=1e-6)


@pytest.mark.parametrize("mode", ["token", "example", "source"])
def test_set_loss_from_summed_stats(mode):
    stats = sum(
        torch.cat(
            [target_stats(loss, None, b["labels"], b["source_ids"], len(SOURCES)), example_stats(loss, b)], 1
        )
        for b, loss, _ in STEP
    )
    if mode == "token":
        rows = per_example(STEP)
        want = sum(s for _, s, _ in rows) / sum(n for *_, n in rows)
    else:
        want = expected(mode)
    assert set_loss(stats, mode, source_weight_vector(SOURCES, WEIGHTS)) == pytest.approx(want, rel=1e-9)


def test_divisors_count_targets_per_source_and_examples_with_a_target():
    rows = per_example(STEP)
    batches = [b for b, _, _ in STEP]
    by_source = step_divisors(batches, "source", len(SOURCES))
    assert by_source.tolist() == [sum(n for s, _, n in rows if s == name) for name in SOURCES]
    assert step_divisors(batches, "example", len(SOURCES)).tolist() == [sum(1 for r in rows if r[2])]
    with pytest.raises(ValueError, match="needs the batch's source_ids"):
        step_divisors([PackingCollator()([{"input_ids": [1, 2]}])], "source", 1)


def test_target_mask_and_source_weights():
    labels = torch.tensor([[5, 6, -100, 7]])
    assert target_mask(labels).tolist() == [[False, True, False, True]]  # column 0 is never predicted
    assert source_weight_vector(("a", "b"), {"b": 3}).tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match=r"source_weights names \['z'\], which are not sources"):
        source_weight_vector(("a", "b"), {"z": 1})


def test_metrics_are_per_run_and_per_source():
    m = PackedMetrics(("a", "b"), token_accuracy=True, reduce=lambda t: t)
    batch, loss, _ = batch_of([6, 5], seed=4)
    batch["source_ids"].clamp_(max=1)
    hits = torch.ones_like(loss)
    for _ in range(2):
        m.start_run()
        m.count_tokens(batch)
        m.add("train", loss, hits, batch["labels"], batch["source_ids"])
        logs = m.train_logs({"loss": 1.0})
        assert logs["mean_token_accuracy"] == 1.0 and "tokens_per_second" in logs
        end = m.train_logs({"train_runtime": 2.0})
        assert end["train_tokens"] == 11  # per run: the second run counts its own tokens only
    m.add("eval", loss, None, batch["labels"], batch["source_ids"], batch)
    metrics = m.eval_metrics("eval", loss_mode="token")
    assert metrics["eval_loss"] == pytest.approx(
        float(loss[target_mask(batch["labels"])].sum()) / int(target_mask(batch["labels"]).sum())
    )
    assert m.eval_metrics("eval", loss_mode="token") == {}  # taken once
