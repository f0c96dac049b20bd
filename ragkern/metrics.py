"""What RagTrainer logs beyond ``Trainer``, accumulated in one place (as TRL's ``_metrics[mode]``).

Training, between two logs: tokens and target tokens run (speed), and per source the target-token loss sum,
target count and argmax hits (``mean_token_accuracy``, ``loss/<source>``, ``accuracy/<source>``); speed also
summed over the run (``train_tokens``, ``train_tokens_per_second`` at the end of ``train()``, per run).
Evaluation, over the whole set: the same per-source sums plus the per-example sums of
:func:`ragkern.normalization.example_stats`, for a set loss that does not depend on the batching.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .normalization import example_stats, set_loss, target_stats


class PackedMetrics:
    """Accumulators of training and evaluation metrics; ``reduce`` sums a tensor over ranks (called on every
    rank alike; the identity on one process). Source ids index ``sources`` (None: one untagged source)."""

    def __init__(
        self,
        sources: tuple[str, ...] | None,
        *,
        token_accuracy: bool,
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.sources = sources
        self.num_sources = len(sources or ()) or 1
        self.token_accuracy = token_accuracy
        self.reduce = reduce
        self._stats: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self.start_run()

    @property
    def per_source(self) -> bool:
        return self.sources is not None and len(self.sources) > 1

    @property
    def wants_hits(self) -> bool:
        """Whether training needs argmax hits per target (accuracy or per-source logs)."""
        return self.token_accuracy or self.per_source

    def start_run(self) -> None:
        """Speed and training stats start from zero (every ``train()`` and ``auto_find_batch_size`` retry)."""
        self._window = {"tokens": 0, "targets": 0, "start": time.perf_counter()}
        self._totals = {"tokens": 0, "targets": 0}
        self._stats["train"] = None

    def count_tokens(self, inputs: dict) -> None:
        """A training micro-batch's real tokens (not padding) and target tokens, for the speed logs."""
        mask = inputs.get("attention_mask")
        self._window["tokens"] += int(inputs["input_ids"].numel() if mask is None else mask.sum())
        self._window["targets"] += int((inputs["labels"][:, 1:] != -100).sum())

    def add(self, mode: str, token_loss, hits, labels, source_ids, batch: dict | None = None) -> torch.Tensor:
        """Add a batch's stats to ``mode`` ("train" or "eval"; "eval" needs ``batch`` for the per-example
        column) and return them: ``(3, S)`` loss sums, targets, hits per source (+ one example column)."""
        stats = target_stats(token_loss.detach(), hits, labels, source_ids, self.num_sources)
        if mode == "eval":
            stats = torch.cat([stats, example_stats(token_loss.detach(), batch)], dim=1)
        old = self._stats[mode]
        self._stats[mode] = stats if old is None else old + stats
        return stats

    def start_eval(self) -> None:
        self._stats["eval"] = None

    def train_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """What to add to a training log (``loss`` every ``logging_steps``, ``train_runtime`` at the end)."""
        now = time.perf_counter()
        window = self.reduce(
            torch.tensor([self._window["tokens"], self._window["targets"]], dtype=torch.float64)
        )
        self._totals["tokens"] += int(window[0])
        self._totals["targets"] += int(window[1])
        elapsed = max(now - self._window["start"], 1e-9)
        out = {}
        if "train_runtime" in logs:
            runtime = max(logs["train_runtime"], 1e-9)
            out["train_tokens"] = self._totals["tokens"]
            out["train_tokens_per_second"] = round(self._totals["tokens"] / runtime, 2)
            out["train_target_tokens_per_second"] = round(self._totals["targets"] / runtime, 2)
        elif window[0] > 0:
            out["tokens_per_second"] = round(float(window[0]) / elapsed, 2)
            out["target_tokens_per_second"] = round(float(window[1]) / elapsed, 2)
        if "loss" in logs and self.wants_hits:
            out.update(self._target_logs())
        self._window = {"tokens": 0, "targets": 0, "start": now}
        return out

    def _target_logs(self) -> dict[str, float]:
        """mean_token_accuracy and per-source loss/accuracy since the last log (summed over ranks)."""
        stats = self._stats["train"]
        if stats is None:
            stats = torch.zeros(3, self.num_sources, dtype=torch.float64)
        self._stats["train"] = None
        sums, counts, right = self.reduce(stats).tolist()
        logs = {}
        if self.token_accuracy and sum(counts):
            logs["mean_token_accuracy"] = round(sum(right) / sum(counts), 4)
        if self.per_source:
            for name, s, c, r in zip(self.sources, sums, counts, right):
                if c:
                    logs[f"loss/{name}"] = round(s / c, 4)
                    logs[f"accuracy/{name}"] = round(r / c, 4)
        return logs

    def eval_metrics(
        self, prefix: str, *, loss_mode: str | None, source_weight: torch.Tensor | None = None
    ) -> dict[str, float]:
        """The evaluation's metrics (summed over ranks): ``{prefix}_loss`` normalised by ``loss_mode`` over the
        whole set (None: leave Trainer's), ``{prefix}_mean_token_accuracy``, per-source loss and accuracy."""
        stats, self._stats["eval"] = self._stats["eval"], None
        if stats is None:
            return {}
        stats = self.reduce(stats)
        sums, counts, right = stats[:, :-1]
        total = float(counts.sum())
        metrics = {}
        if loss_mode is not None and total:
            metrics[f"{prefix}_loss"] = set_loss(stats, loss_mode, source_weight)
        if self.token_accuracy and total:
            metrics[f"{prefix}_mean_token_accuracy"] = float(right.sum()) / total
        if self.per_source and len(sums) == len(self.sources):
            for name, s, n, r in zip(self.sources, sums.tolist(), counts.tolist(), right.tolist()):
                if n:
                    metrics[f"{prefix}_loss/{name}"] = round(s / n, 4)
                    metrics[f"{prefix}_accuracy/{name}"] = round(r / n, 4)
        return metrics
