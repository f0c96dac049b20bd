"""``pack_stats``: what tokenizing a dataset at ``max_length`` gives (lengths, packing fill, length policy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..packing import pack_lengths
from .prepare import EncodedDataset, encode_records
from .records import load_records


def pack_stats(
    records_or_path,
    tokenizer,
    max_length: int,
    *,
    batch_size: int = 8,
    num_bins: int = 20,
    png: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Tokenize a dataset and report its length histogram, packing vs padding fill, and the length policy.

    Args:
        records_or_path: a path (``.jsonl`` / ``.json`` / ``.parquet``), records, or an :class:`EncodedDataset`.
        tokenizer: a fast tokenizer with an EOS token (and a chat template for chat records).
        max_length: the packed row length.
        batch_size: examples per batch for the padding baseline (random batches, padded to their longest).
        num_bins: histogram bins over ``[1, max_length]``.
        png: if given, write the histogram there (needs matplotlib).

    Returns:
        ``{"examples", "tokens", "length": {min, mean, p50, p90, p99, max}, "histogram": {"edges", "counts"},
        "packing": {"bins", "fill_ratio"}, "padding": {"batch_size", "fill_ratio"}, "packing_vs_padding",
        "policy": {records, dropped_too_long, trimmed, dropped_distractors, truncated_passages, dap_chunks,
        skipped_invalid}}``; fill ratios are real tokens / tokens computed on.
    """
    if isinstance(records_or_path, EncodedDataset):
        encoded = records_or_path
    else:
        records = (
            load_records(records_or_path) if isinstance(records_or_path, (str, Path)) else records_or_path
        )
        encoded = encode_records(records, tokenizer, max_length=max_length, show_progress=False)
    lengths = np.asarray(encoded.lengths, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError("no examples left to measure (every record was dropped or the input is empty)")
    tokens = int(lengths.sum())
    bins = pack_lengths(lengths.tolist(), max_length)
    order = np.random.default_rng(seed).permutation(lengths.size)
    padded = sum(
        int(lengths[b].max()) * len(b) for b in np.array_split(order, -(-lengths.size // batch_size))
    )
    counts, edges = np.histogram(lengths, bins=num_bins, range=(1, max_length))
    s = encoded.stats
    out = {
        "examples": int(lengths.size),
        "tokens": tokens,
        "length": {
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 2),
            "p50": int(np.percentile(lengths, 50)),
            "p90": int(np.percentile(lengths, 90)),
            "p99": int(np.percentile(lengths, 99)),
            "max": int(lengths.max()),
        },
        "histogram": {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()},
        "packing": {"bins": len(bins), "fill_ratio": round(tokens / (len(bins) * max_length), 4)},
        "padding": {"batch_size": batch_size, "fill_ratio": round(tokens / padded, 4)},
        "policy": {
            "records": s.records,
            "dropped_too_long": s.dropped_too_long,
            "trimmed": s.trimmed,
            "dropped_distractors": s.dropped_distractors,
            "truncated_passages": s.truncated_passages,
            "dap_chunks": s.dap_chunks,
            "skipped_invalid": s.skipped_invalid,
        },
    }
    out["packing_vs_padding"] = round(out["packing"]["fill_ratio"] / out["padding"]["fill_ratio"], 3)
    if png is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("writing a PNG histogram needs matplotlib: pip install matplotlib") from e
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.hist(lengths, bins=edges)
        ax.set_xlabel("tokens per example")
        ax.set_ylabel("examples")
        ax.set_title(f"{lengths.size} examples; packing fill {out['packing']['fill_ratio']:.3f}")
        fig.savefig(png, dpi=100, bbox_inches="tight")
        plt.close(fig)
    return out
