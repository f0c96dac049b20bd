"""Bin packing of examples into rows of at most ``max_length`` tokens, and the batch sampler over the bins.

Also the one place where packed-sequence boundaries change form::

    lengths        [3, 2, 4]
    cu_seqlens     [0, 3, 5, 9]             int32, flash-attn's convention
    position_ids   [0 1 2 0 1 0 1 2 3]      restart at 0 per example
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

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


def pack_in_order(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Bins of consecutive examples, each of at most ``max_length`` tokens (next fit): a new bin starts when
    the next example does not fit. Reading the bins one after the other gives the examples in their order,
    which evaluation and prediction need to map outputs back to examples; fill is lower than
    :func:`pack_lengths`'s."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    bins: list[list[int]] = []
    room = 0
    for i, n in enumerate(int(x) for x in lengths):
        if not 1 <= n <= max_length:
            raise ValueError(f"example {i} has length {n}; lengths must be in [1, max_length={max_length}]")
        if n > room:
            bins.append([])
            room = max_length
        bins[-1].append(i)
        room -= n
    return bins


def bins_for_ranks(num_bins: int, num_replicas: int) -> int:
    """The bin count every packing is split up to so that each of ``num_replicas`` ranks gets as many bins:
    the next multiple of ``num_replicas``."""
    return -(-num_bins // num_replicas) * num_replicas


def split_fullest(bins: list[list]) -> bool:
    """Split the bin holding the most examples (the first of equals) into two halves, in place; False (and
    nothing split) when every bin holds one example. The one way bins are added for the ranks' sake."""
    i = max(range(len(bins)), key=lambda j: (len(bins[j]), -j), default=None)
    if i is None or len(bins[i]) < 2:
        return False
    b = bins[i]
    bins[i : i + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
    return True


class PackedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields the example indices of ``bins_per_batch`` packed bins per micro-batch, for this rank.

    The bins come from :func:`pack_lengths`; each epoch shuffles their order from ``seed + epoch`` (the same on
    every rank) and deals them to ranks round-robin. Bins are split (the fullest by count first) until there are
    ``num_bins`` of them, by default the next multiple of ``num_replicas``, so every rank runs the same number of
    steps without repeating or dropping an example.

    Data that changes every epoch (e.g. :class:`ragkern.data.RaftEpochDataset`): pass ``epoch_lengths``, a callable
    that makes the dataset hold epoch ``e``'s examples and returns their lengths; :meth:`set_epoch` calls it and
    re-packs. ``lengths`` then describes the dataset as it is now. Give ``num_bins`` (at least the bins any epoch
    needs) so that ``len()`` stays the same every epoch, as ``Trainer`` counts steps once.

    ``in_order=True`` (evaluation, prediction, ``train_sampling_strategy="sequential"``) packs consecutive
    examples (:func:`pack_in_order`) and never shuffles: on one rank the batches hold the examples in dataset
    order.

    :meth:`bins_needed` and :meth:`batches` give the counts a sampler will have before building one.
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
        num_bins: int | None = None,
        epoch_lengths: Callable[[int], Sequence[int]] | None = None,
        in_order: bool = False,
    ):
        if bins_per_batch < 1:
            raise ValueError(f"bins_per_batch must be >= 1, got {bins_per_batch}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is not in [0, num_replicas={num_replicas})")
        if num_bins is not None and (num_bins < 1 or num_bins % num_replicas):
            raise ValueError(
                f"num_bins={num_bins} must be a positive multiple of num_replicas={num_replicas}"
            )
        if in_order and shuffle:
            raise ValueError("in_order=True keeps the dataset order: it excludes shuffle")
        self.max_length = max_length
        self.bins_per_batch = bins_per_batch
        self.in_order = in_order
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_bins = num_bins
        self.epoch_lengths = epoch_lengths
        self.epoch = 0
        self._packed_epoch: int | None = None if epoch_lengths is not None else 0
        self._pack(lengths)

    @staticmethod
    def bins_needed(
        lengths: Sequence[int], max_length: int, *, num_replicas: int = 1, in_order: bool = False
    ) -> int:
        """The bins a sampler packs ``lengths`` into (before any larger ``num_bins``)."""
        pack = pack_in_order if in_order else pack_lengths
        return bins_for_ranks(len(pack(lengths, max_length)), num_replicas)

    @staticmethod
    def batches(num_bins: int, *, num_replicas: int = 1, bins_per_batch: int = 1) -> int:
        """Micro-batches per epoch on each rank (``len()``) of a sampler with ``num_bins`` bins."""
        return math.ceil(num_bins // num_replicas / bins_per_batch)

    def _pack(self, lengths: Sequence[int]) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        pack = pack_in_order if self.in_order else pack_lengths
        bins = pack(self.lengths, self.max_length)
        target = self.num_bins if self.num_bins is not None else bins_for_ranks(len(bins), self.num_replicas)
        if len(bins) > target:
            raise ValueError(
                f"the examples need {len(bins)} bins of {self.max_length} tokens, more than num_bins={target}; "
                "raise num_bins"
            )
        while len(bins) < target:
            if not split_fullest(bins):
                raise ValueError(
                    f"{len(bins)} single-example bins cannot be split into {target} bins (num_replicas="
                    f"{self.num_replicas}); add examples or use fewer ranks"
                )
        self.bins = bins

    @property
    def fill_ratio(self) -> float:
        """Real tokens / (bins x max_length) of this packing (of the current epoch); 0 with no bins."""
        return float(self.lengths.sum()) / (len(self.bins) * self.max_length) if self.bins else 0.0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch``; with ``epoch_lengths``, switch the data to that epoch and re-pack it."""
        self.epoch = epoch
        if self.epoch_lengths is not None and epoch != self._packed_epoch:
            self._pack(self.epoch_lengths(epoch))
            self._packed_epoch = epoch

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
        return self.batches(
            len(self.bins), num_replicas=self.num_replicas, bins_per_batch=self.bins_per_batch
        )


logger = logging.getLogger(__name__)


@dataclass
class StreamPackStats:
    """What :func:`pack_stream` has emitted so far (updated bin by bin)."""

    max_length: int
    examples: int = 0
    tokens: int = 0
    bins: int = 0
    max_buffered: int = 0  # the most examples held at once (<= buffer_size)
    split_for_ranks: int = 0  # bins split at the end of the stream so their count divides by the ranks
    dropped_for_ranks: int = 0  # examples dropped at the end: too few left to make a full round of bins

    @property
    def fill_ratio(self) -> float:
        """Real tokens / (bins x max_length) of the bins emitted so far."""
        return self.tokens / (self.bins * self.max_length) if self.bins else 0.0


def _fullest_first(buffer: list[dict], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bins of the buffer (indices into it), the fullest first."""
    lengths = [len(e["input_ids"]) for e in buffer]
    bins = pack_lengths(lengths, max_length)
    return sorted(bins, key=lambda b: -sum(lengths[i] for i in b))


def pack_stream(
    examples: Iterable[dict],
    max_length: int,
    *,
    buffer_size: int = 1024,
    multiple_of: int = 1,
    stats: StreamPackStats | None = None,
) -> Iterator[list[dict]]:
    """Pack a stream of examples into bins of at most ``max_length`` tokens, holding at most ``buffer_size``.

    ::

        stream --> buffer (<= buffer_size examples) --full--> best-fit decreasing over the buffer
                                                              (pack_lengths): emit the fullest bins until at
                                                              most buffer_size // 2 examples are left in it
        end of stream --> pack what is left, emit every bin (fullest first)

    With ``multiple_of`` W > 1 (W ranks share the stream), bins go out in rounds of W, one per rank::

        emitted:  [b0 .. bW-1] [bW .. b2W-1] ...   held back: < W bins, not handed to any rank yet
        end:      held-back bins + buffer --> packed again, split (the most examples first) until the count
                  is a multiple of W; if even one example per bin cannot make it, the shortest examples
                  are dropped (fewer than W, counted in ``stats.dropped_for_ranks``, with a warning)

    so every rank gets the same number of bins, whatever the length of the stream.

    The examples left in the buffer are those of the least-filled bins: they are packed again with the
    examples that arrive next, so fill approaches that of packing everything at once as the buffer grows.
    Every example is emitted exactly once (but for those dropped for the ranks); bins hold the examples
    themselves (a list of dicts each), in arrival order within a bin.

    Args:
        examples: encoded examples (dicts with ``input_ids``, each of 1 to ``max_length`` tokens), e.g. a
            :class:`ragkern.data.EncodedStream`; read once, lazily.
        max_length: tokens per bin.
        buffer_size: the most examples held at once in the buffer (>= 1); up to ``multiple_of - 1`` packed
            bins may wait for their round besides.
        multiple_of: bins are emitted in rounds of this many (the number of ranks sharing the stream), and
            their total is a multiple of it (see above).
        stats: updated as bins are emitted: count, tokens, ``fill_ratio``, the largest buffer held.

    Raises:
        ValueError: an example with no tokens or more than ``max_length`` (encode the stream with the length
            policy first, e.g. :func:`ragkern.data.iter_encode_records`).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    stats = StreamPackStats(max_length) if stats is None else stats
    return _pack_stream(examples, max_length, buffer_size, multiple_of, stats)


def _pack_stream(examples, max_length, buffer_size, multiple_of, stats) -> Iterator[list[dict]]:
    # Examples are held as (arrival number, example): bins list their examples in arrival order.
    def emit(b: list[tuple[int, dict]]) -> list[dict]:
        out = [e for _, e in b]
        stats.bins += 1
        stats.examples += len(out)
        stats.tokens += sum(len(e["input_ids"]) for e in out)
        return out

    def pack(items: list[tuple[int, dict]]) -> list[list[tuple[int, dict]]]:
        return [[items[i] for i in sorted(b)] for b in _fullest_first([e for _, e in items], max_length)]

    buffer: list[tuple[int, dict]] = []
    # Packed bins not handed out yet: they go out in rounds of multiple_of, one bin per rank, so that the
    # ranks stay in step and the end of the stream is the only place where their counts could differ.
    pending: list[list[tuple[int, dict]]] = []
    for n, example in enumerate(examples):
        length = len(example["input_ids"])
        if not 1 <= length <= max_length:
            raise ValueError(
                f"stream example {n} has {length} tokens; packing needs 1 to max_length={max_length}: encode "
                "the records with the length policy first (ragkern.data.iter_encode_records)"
            )
        buffer.append((n, example))
        stats.max_buffered = max(stats.max_buffered, len(buffer))
        if len(buffer) < buffer_size:
            continue
        held, keep = len(buffer), []
        for b in pack(buffer):
            if held > buffer_size // 2:
                pending.append(b)
                held -= len(b)
            else:
                keep.extend(b)
        buffer = sorted(keep, key=lambda x: x[0])
        ready = len(pending) - len(pending) % multiple_of
        for b in pending[:ready]:
            yield emit(b)
        pending = pending[ready:]
    # The last round: the held-back bins are packed again with the buffer, then split or trimmed to rounds.
    bins = pack(sorted([x for b in pending for x in b] + buffer, key=lambda x: x[0]))
    while len(bins) % multiple_of and split_fullest(bins):
        stats.split_for_ranks += 1
    extra = len(bins) % multiple_of
    if extra:  # every bin is one example, too few for a full round: drop the shortest
        tokens = [len(b[0][1]["input_ids"]) for b in bins]
        dropped = set(sorted(range(len(bins)), key=lambda j: (tokens[j], -j))[:extra])
        bins = [b for j, b in enumerate(bins) if j not in dropped]
        stats.dropped_for_ranks += extra
        logger.warning(
            "pack_stream: the stream ended with %d examples in its last bins, one each, which cannot make a "
            "multiple of %d bins (one per rank); dropped the %d shortest",
            len(bins) + extra,
            multiple_of,
            extra,
        )
    for b in bins:
        yield emit(b)


WORKER_SPLITS = ("auto", "source", "bins")


def shards_by_worker(source) -> bool:
    """Whether ``source`` hands each DataLoader worker its own share of the stream by itself.

    A ``datasets.IterableDataset`` does (it splits its shards between the workers), and so does a stream over
    one that names, in its class attribute ``worker_shards_from``, the attribute holding its source (ragkern's
    :class:`~ragkern.data.EncodedStream` and :class:`~ragkern.data.RaftStream`: ``"records"``). Anything else
    (lists, files, generators) is read whole by every worker.
    """
    seen = set()
    while id(source) not in seen:
        seen.add(id(source))
        datasets = sys.modules.get("datasets")
        if datasets is not None and isinstance(source, datasets.IterableDataset):
            return True
        inner = getattr(type(source), "worker_shards_from", None)
        if inner is None or not hasattr(source, inner):
            return False
        source = getattr(source, inner)
    return False


def _hide_worker_info(iterable: Iterable[dict]) -> Iterator[dict]:
    """Iterate ``iterable`` as if outside any DataLoader worker, so a source that would shard itself per
    worker (a ``datasets.IterableDataset``, possibly wrapped) yields the whole stream."""
    worker = getattr(torch.utils.data._utils, "worker", None)
    if worker is None or not hasattr(worker, "_worker_info"):  # pragma: no cover - torch internals moved
        yield from iterable
        return
    it = iter(iterable)
    while True:
        saved, worker._worker_info = worker._worker_info, None
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            worker._worker_info = saved
        yield item


class PackedIterableDataset(torch.utils.data.IterableDataset):
    """Packed bins of a stream of encoded examples, for ``Trainer``/``DataLoader``: each item is one bin (a list
    of example dicts), packed by :func:`pack_stream` with a bounded buffer; nothing is materialised.

    Use it with :class:`BinCollator` (a micro-batch of bins -> one packed row)::

        stream = EncodedStream(iter_records("big.jsonl"), tokenizer, max_length=4096)
        train = PackedIterableDataset(stream, 4096, buffer_size=2048)
        loader = DataLoader(train, batch_size=1, collate_fn=BinCollator(PackingCollator()))

    Epochs: every ``__iter__`` reads ``examples`` again (pass a re-iterable, e.g. an
    :class:`~ragkern.data.EncodedStream` over a file or a ``datasets.IterableDataset``, not a one-shot
    generator), or calls it with the epoch when it is a callable ``epoch -> iterable``. :meth:`set_epoch` is
    passed on to ``examples`` (a ``datasets.IterableDataset`` reshuffles; a RAFT stream re-draws distractors).

    Ranks: every rank reads the whole stream and packs it the same way (the stream must be in the same order
    on every rank); rank ``r`` of ``world_size`` takes bins ``r, r + world_size, ...``. Bins go out in
    rounds of ``world_size`` and the end of the stream is split (or, too short, trimmed) so that every rank
    gets the same number of bins (:func:`pack_stream`'s ``multiple_of``), so ranks run the same number of
    steps. ``rank``/``world_size`` default to torch.distributed's, read when iteration starts. The length of a
    stream is unknown: like any iterable dataset under ``Trainer``, give ``max_steps``.

    DataLoader workers (``worker_split``): every example is trained exactly once per pass whatever the number
    of workers. ``"source"``: the source gives each worker its own share (a ``datasets.IterableDataset``
    splits its shards between workers, also under :class:`~ragkern.data.EncodedStream`): each worker packs
    its share and deals its bins to the ranks, so workers tokenize in parallel (a dataset with fewer shards
    than workers leaves workers idle: ``datasets`` warns). ``"bins"``: every worker reads and packs the whole
    stream (any source sharding per worker is switched off) and keeps every ``num_workers``-th of this rank's
    bins: correct for any source, but each worker tokenizes everything. ``"auto"`` (default): ``"source"``
    when :func:`shards_by_worker` says the source shards itself, else ``"bins"``. :attr:`fill_ratio` covers the
    bins this rank's workers emitted (through shared memory set up by :func:`stream_dataloader`).

    Resuming: ``Trainer`` sees one epoch of ``max_steps`` steps and resumes by skipping ``global_step x
    gradient_accumulation_steps`` micro-batches of the first pass, re-reading and re-packing the stream. A
    checkpoint saved during the first pass resumes in the same order; when the stream is shorter than
    ``max_steps`` and ``Trainer`` goes on to a second pass (``set_epoch(1)``, logged as a warning), a
    checkpoint saved after the first pass resumes at the start of the next pass instead, so the order differs
    from an uninterrupted run. When exact resumes matter, keep ``max_steps`` within one pass, or make the
    stream repeat itself (e.g. ``datasets.IterableDataset.repeat(None)``: one endless pass).

    Attributes:
        stats: the :class:`StreamPackStats` of the current pass (all ranks' bins; ``stats.fill_ratio``).
        source_names: optional example ``source`` tags, for ``PackingCollator(source_names=...)``.
    """

    def __init__(
        self,
        examples: Iterable[dict] | Callable[[int], Iterable[dict]],
        max_length: int,
        *,
        buffer_size: int = 1024,
        rank: int | None = None,
        world_size: int | None = None,
        source_names: Sequence[str] | None = None,
        worker_split: str = "auto",
    ):
        if worker_split not in WORKER_SPLITS:
            raise ValueError(f"worker_split={worker_split!r} is not one of {WORKER_SPLITS}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (torch.distributed's are used)")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        if buffer_size < 1 or max_length < 1:
            raise ValueError(f"max_length={max_length} and buffer_size={buffer_size} must be >= 1")
        self.examples = examples
        self.max_length = max_length
        self.buffer_size = buffer_size
        self.rank, self.world_size = rank, world_size
        self.source_names = tuple(source_names) if source_names is not None else None
        self.worker_split = worker_split
        self.epoch = 0
        self.stats = StreamPackStats(max_length)
        self._warned_repass = False
        # (workers, 2) float64 in shared memory: tokens and bins each worker emitted (stream_dataloader sets it)
        self.worker_stats: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch > 0 and not self._warned_repass:  # under Trainer: the stream was shorter than max_steps
            self._warned_repass = True
            logger.warning(
                "PackedIterableDataset: epoch %d, another pass over the stream (under Trainer: the stream "
                "ended before max_steps); a checkpoint saved from here on will not resume in the same order, "
                "as Trainer resumes by skipping global_step x gradient_accumulation_steps batches of the first "
                "pass. For exact resumes keep max_steps within one pass, or repeat the stream inside it",
                epoch,
            )
        self.epoch = epoch
        if not callable(self.examples) and hasattr(self.examples, "set_epoch"):
            self.examples.set_epoch(epoch)

    def _rank(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @property
    def fill_ratio(self) -> float:
        """Real tokens / (bins x max_length): of the bins the DataLoader workers emitted when they report
        through :attr:`worker_stats`, else of this process's pass (all ranks' bins)."""
        if self.worker_stats is not None and self.worker_stats[:, 1].sum() > 0:
            tokens, bins = self.worker_stats.sum(0).tolist()
            return tokens / (bins * self.max_length)
        return self.stats.fill_ratio

    def __iter__(self) -> Iterator[list[dict]]:
        rank, world = self._rank()
        worker = torch.utils.data.get_worker_info()
        wid, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        source = self.examples(self.epoch) if callable(self.examples) else self.examples
        split = self.worker_split
        if split == "auto":
            split = "source" if shards_by_worker(source) else "bins"
        if workers > 1 and split == "bins":
            source = _hide_worker_info(source)
        share = workers if split == "bins" else 1  # "source": this worker's examples are its own already
        self.stats = StreamPackStats(self.max_length)
        report = self.worker_stats if worker is not None and self.worker_stats is not None else None
        if report is not None:
            report[wid] = 0
        bins = pack_stream(
            source, self.max_length, buffer_size=self.buffer_size, multiple_of=world, stats=self.stats
        )
        for i, b in enumerate(bins):
            if i % world == rank and (i // world) % share == wid % share:
                if report is not None:
                    report[wid, 0] += sum(len(e["input_ids"]) for e in b)
                    report[wid, 1] += 1
                yield b


@dataclass
class BinCollator:
    """Collate a micro-batch of bins (items of :class:`PackedIterableDataset`) into one packed row: the bins'
    examples are concatenated, in order, and handed to ``collator`` (e.g. ``PackingCollator()``)."""

    collator: Callable[[list[dict]], dict]

    def __call__(self, bins: list[list[dict]]) -> dict:
        return self.collator([example for b in bins for example in b])


class _StreamLoader(torch.utils.data.DataLoader):
    def set_epoch(self, epoch: int) -> None:  # Trainer calls it on its dataloader every epoch
        self.dataset.set_epoch(epoch)


def stream_dataloader(
    dataset: PackedIterableDataset,
    collator: Callable[[list[dict]], dict],
    *,
    bins_per_batch: int = 1,
    rank: int = 0,
    world_size: int = 1,
    **loader_kwargs,
) -> torch.utils.data.DataLoader:
    """The training ``DataLoader`` of a :class:`PackedIterableDataset` on one rank of ``world_size``.

    Each micro-batch is ``bins_per_batch`` of this rank's bins collated into one row by ``collator`` (through
    :class:`BinCollator`). The loader has ``set_epoch`` (forwarded to the dataset, so the stream re-shuffles or
    re-draws), which ``Trainer`` calls every epoch. Do not pass it through ``accelerator.prepare``: the dataset
    already deals bins to ranks, and accelerate's batch dispatching would split the packed rows. The dataset is
    copied with ``rank``/``world_size`` set (its packing stats: ``loader.dataset.stats``); ``loader_kwargs`` go
    to ``DataLoader`` (``num_workers``, ``pin_memory``, ...).
    """
    if bins_per_batch < 1:
        raise ValueError(f"bins_per_batch must be >= 1, got {bins_per_batch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    mine = copy.copy(dataset)
    mine.rank, mine.world_size = rank, world_size
    workers = loader_kwargs.get("num_workers") or 0
    mine.worker_stats = torch.zeros(workers, 2, dtype=torch.float64).share_memory_() if workers else None
    return _StreamLoader(mine, batch_size=bins_per_batch, collate_fn=BinCollator(collator), **loader_kwargs)
