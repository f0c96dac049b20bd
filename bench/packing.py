"""Packing speed and fill: ragkern's exact best-fit decreasing vs first-fit decreasing and greedy sequential.

    python bench/packing.py [--n 1000000] [--max-length 8192]

Target (issue 2): 1,000,000 lengths packed in under 2 s on one core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import write_results  # noqa: E402

from ragkern.packing import pack_lengths  # noqa: E402


def greedy_sequential(lengths, max_length):
    """Concatenate in dataset order, starting a new bin when the next example does not fit (what a
    streaming packer does)."""
    bins, room = 0, 0
    for n in lengths:
        if n > room:
            bins, room = bins + 1, max_length
        room -= n
    return bins


def first_fit_decreasing_bins(lengths, max_length):
    """First-fit decreasing with a numpy scan over open bins (a common reference packer), on a subset."""
    rooms = np.empty(0, dtype=np.int64)
    for n in np.sort(lengths)[::-1]:
        fit = np.flatnonzero(rooms >= n)
        if fit.size:
            rooms[fit[0]] -= n
        else:
            rooms = np.append(rooms, max_length - n)
    return rooms.size


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--max-length", type=int, default=8192)
    p.add_argument("--ffd-subset", type=int, default=20_000, help="FFD is quadratic: time it on a subset")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    mixes = {
        "uniform 100..4000": rng.integers(100, 4001, size=a.n),
        "lognormal (median ~400)": np.clip(
            rng.lognormal(6.0, 1.0, size=a.n).astype(np.int64), 1, a.max_length
        ),
    }
    rows = []
    for name, lengths in mixes.items():
        t = time.perf_counter()
        bins = pack_lengths(lengths, a.max_length)
        seconds = time.perf_counter() - t
        total = int(lengths.sum())
        greedy = greedy_sequential(lengths.tolist(), a.max_length)
        sub = lengths[: a.ffd_subset]
        t = time.perf_counter()
        ffd = first_fit_decreasing_bins(sub, a.max_length)
        ffd_seconds = time.perf_counter() - t
        t = time.perf_counter()
        bfd_sub = len(pack_lengths(sub, a.max_length))
        bfd_sub_seconds = time.perf_counter() - t
        rows.append(
            {
                "mix": name,
                "n": a.n,
                "max_length": a.max_length,
                "bfd_seconds": round(seconds, 3),
                "bfd_bins": len(bins),
                "bfd_fill": round(total / (len(bins) * a.max_length), 5),
                "greedy_sequential_fill": round(total / (greedy * a.max_length), 5),
                "subset": len(sub),
                "subset_bfd_seconds": round(bfd_sub_seconds, 4),
                "subset_ffd_numpy_seconds": round(ffd_seconds, 4),
                "subset_speedup_vs_ffd": round(ffd_seconds / bfd_sub_seconds, 1),
                "subset_bins_bfd_vs_ffd": [bfd_sub, ffd],
            }
        )
        r = rows[-1]
        print(
            f"{name:26s} {a.n:,} lengths -> {r['bfd_bins']:,} bins in {r['bfd_seconds']:.2f} s "
            f"(target < 2 s: {'met' if seconds < 2 else 'NOT met'}), fill {r['bfd_fill']:.4f} "
            f"vs greedy sequential {r['greedy_sequential_fill']:.4f}; on {len(sub):,}: "
            f"{r['subset_speedup_vs_ffd']}x faster than numpy FFD, bins {bfd_sub} vs {ffd}"
        )
    path = write_results("packing", {"results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
