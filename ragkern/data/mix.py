"""Hybrid mixing: records of several sources (RAFT, instruction, DAP; any schemas) drawn at stated weights.

Each output record is a copy of a source record with ``"source": <name>``, which the encoder carries into the
example (and the collator into per-token source ids). The draw is seeded: at each step a source is chosen with
probability ``weight / sum(weights)`` among the sources not yet exhausted, and its next record (in a per-source
shuffled order) is taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np


def _check(sources: Mapping, weights: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    names = list(sources)
    if not names:
        raise ValueError("mix needs at least one source")
    unknown = set(weights) - set(names)
    if unknown:
        raise ValueError(f"weights name unknown sources {sorted(unknown)}; sources are {names}")
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {dict(zip(names, w.tolist()))}")
    return names, w


def iter_mix(
    sources: Mapping[str, Iterable[dict]],
    weights: Mapping[str, float],
    *,
    seed: int = 0,
    stopping: str = "first_exhausted",
) -> Iterator[dict]:
    """Stream a weighted mix of iterables (nothing materialised; records keep their order within a source).

    ``stopping="first_exhausted"`` stops when the first source with weight > 0 runs out (the mix ratios hold
    throughout); ``"all_exhausted"`` keeps drawing from the remaining sources (ratios drift at the end).
    """
    if stopping not in ("first_exhausted", "all_exhausted"):
        raise ValueError(f"stopping must be 'first_exhausted' or 'all_exhausted', got {stopping!r}")
    names, w = _check(sources, weights)
    its = [iter(sources[n]) for n in names]
    rng = np.random.default_rng(seed)
    live = w > 0
    while live.any():
        p = np.where(live, w, 0.0)
        k = int(rng.choice(len(names), p=p / p.sum()))
        try:
            record = next(its[k])
        except StopIteration:
            if stopping == "first_exhausted":
                return
            live[k] = False
            continue
        yield {**record, "source": names[k]}


def mix_sources(
    sources: Mapping[str, Iterable[dict]],
    weights: Mapping[str, float],
    *,
    num_records: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    stopping: str = "first_exhausted",
) -> list[dict]:
    """A weighted mix of sized sources (lists, ``datasets.Dataset``, :class:`~ragkern.data.Records`).

    Args:
        sources: name -> records; the name becomes each record's ``source`` tag (what losses are logged under).
        weights: name -> sampling weight (need not sum to 1); a missing name has weight 0.
        num_records: stop after this many records; with ``None``, at the stopping rule.
        seed: seed of the per-source shuffles and of the draws.
        shuffle: shuffle each source before drawing from it.
        stopping: see :func:`iter_mix`. With ``num_records`` larger than a source, ``"all_exhausted"`` also
            repeats nothing: records are never duplicated.
    """
    rng = np.random.default_rng([seed, 1])
    ordered = {}
    for name, records in sources.items():
        records = list(records)
        order = rng.permutation(len(records)) if shuffle else range(len(records))
        ordered[name] = [records[int(i)] for i in order]
    out = []
    for record in iter_mix(ordered, weights, seed=seed, stopping=stopping):
        if num_records is not None and len(out) >= num_records:
            break
        out.append(record)
    return out
