"""Bin packing of examples into rows of at most ``max_length`` tokens, and the batch sampler over the bins.

Also the one place where packed-sequence boundaries change form::

    lengths        [3, 2, 4]
    cu_seqlens     [0, 3, 5, 9]             int32, flash-attn's convention
    position_ids   [0 1 2 0 1 0 1 2 3]      restart at 0 per example
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def cu_seqlens_from_lengths(lengths: Sequence[int] | torch.Tensor, device=None) -> torch.Tensor:
    """``(n + 1,)`` int32 offsets of examples of the given lengths."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def position_ids_from_lengths(lengths: Sequence[int], device=None) -> torch.Tensor:
    """``(sum(lengths),)`` int64 positions restarting at 0 for every example."""
    return torch.cat([torch.arange(n, device=device) for n in lengths]) if len(lengths) else torch.zeros(0)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Example offsets of one packed row, inferred from where ``position_ids`` (shape ``(T,)``) restart at 0.

    This is a fallback only: an example that does not start at position 0 cannot be told apart from its
    predecessor, which is why the collator passes ``cu_seq_lens_q/k`` explicitly.
    """
    position_ids = position_ids.reshape(-1)
    starts = torch.nonzero(position_ids == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    total = torch.tensor([position_ids.numel()], device=starts.device)
    return torch.cat([starts, total]).to(torch.int32)


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bins of at most ``max_length`` tokens; returns the example indices of each bin.

    Exact best fit: every example, longest first, goes to the open bin with the least room that still fits
    it. Examples of equal length are placed in runs (a best-fit bin keeps receiving them while they fit), and
    open bins are indexed by their free room in a bitset, so the work grows with the number of bins touched,
    not with examples x bins.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if arr.size == 0:
        return []
    if arr.min() < 1:
        i = int(np.argmin(arr))
        raise ValueError(f"example {i} has length {int(arr[i])}; lengths must be >= 1")
    if arr.max() > max_length:
        i = int(np.argmax(arr))
        raise ValueError(
            f"example {i} has {int(arr[i])} tokens > max_length={max_length}: drop or split it before packing"
        )
    order = np.argsort(-arr, kind="stable")
    sorted_lengths = arr[order]
    # Runs of equal length: group boundaries in the sorted order.
    edges = np.flatnonzero(np.diff(sorted_lengths)) + 1
    starts = np.concatenate([[0], edges]).tolist()
    ends = np.concatenate([edges, [arr.size]]).tolist()
    order = order.tolist()

    bins: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(max_length + 1)]  # free room -> bins with exactly that room
    mask = 0  # bit c set <=> by_room[c] is not empty
    for g0, g1 in zip(starts, ends):
        size = int(sorted_lengths[g0])
        i = g0
        while i < g1:
            fits = mask >> size
            if fits:
                room = size + (fits & -fits).bit_length() - 1  # least room >= size
                b = by_room[room].pop()
                if not by_room[room]:
                    mask ^= 1 << room
                k = min(g1 - i, room // size)
                bins[b].extend(order[i : i + k])
            else:
                b = len(bins)
                room = max_length
                k = min(g1 - i, room // size)
                bins.append(order[i : i + k])
            i += k
            room -= k * size
            if not by_room[room]:
                mask |= 1 << room
            by_room[room].append(b)
    return bins


class PackedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields the example indices of ``bins_per_batch`` packed bins per micro-batch, for this rank.

    The bins come from :func:`pack_lengths` once; each epoch shuffles their order from ``seed + epoch`` (the
    same on every rank) and deals them to ranks round-robin. Bins are split, before any epoch, until their
    count is a multiple of ``num_replicas``, so every rank runs the same number of steps without repeating
    or dropping an example.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_length: int,
        *,
        bins_per_batch: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if bins_per_batch < 1:
            raise ValueError(f"bins_per_batch must be >= 1, got {bins_per_batch}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is not in [0, num_replicas={num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_length = max_length
        self.bins_per_batch = bins_per_batch
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.bins = self._split_for_ranks(pack_lengths(self.lengths, max_length))

    def _split_for_ranks(self, bins: list[list[int]]) -> list[list[int]]:
        while len(bins) % self.num_replicas:
            splittable = [i for i, b in enumerate(bins) if len(b) > 1]
            if not splittable:
                raise ValueError(
                    f"{len(bins)} single-example bins cannot be shared evenly by {self.num_replicas} ranks; "
                    "add examples or use fewer ranks"
                )
            i = max(splittable, key=lambda j: (len(bins[j]), -j))  # split the fullest-by-count bin
            b = bins[i]
            bins[i : i + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
        return bins

    @property
    def fill_ratio(self) -> float:
        """Real tokens / (bins x max_length) of this packing."""
        return float(self.lengths.sum()) / (len(self.bins) * self.max_length)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_bins(self) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(len(self.bins), generator=g).tolist()
        else:
            perm = list(range(len(self.bins)))
        return [self.bins[i] for i in perm[self.rank :: self.num_replicas]]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._rank_bins()
        for i in range(0, len(mine), self.bins_per_batch):
            yield [idx for b in mine[i : i + self.bins_per_batch] for idx in b]

    def __len__(self) -> int:
        return math.ceil(len(self.bins) // self.num_replicas / self.bins_per_batch)
