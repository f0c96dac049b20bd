import numpy as np
import pytest
import torch

from ragkern.packing import (
    PackedBatchSampler,
    bins_for_ranks,
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    pack_in_order,
    pack_lengths,
    position_ids_from_lengths,
    shards_by_worker,
    split_fullest,
)


def brute_force_bfd(lengths, max_length):
    """Textbook best-fit decreasing: each item, longest first, into the fullest bin that fits it."""
    rooms, bins = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b, r in enumerate(rooms) if r >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: rooms[b])
            bins[b].append(i)
            rooms[b] -= lengths[i]
        else:
            bins.append([i])
            rooms.append(max_length - lengths[i])
    return bins


def rooms(bins, lengths, max_length):
    return sorted(max_length - sum(lengths[i] for i in b) for b in bins)


@pytest.mark.parametrize("seed", range(40))
def test_pack_lengths_is_exact_best_fit_decreasing(seed):
    rng = np.random.default_rng(seed)
    max_length = int(rng.integers(5, 64))
    lengths = rng.integers(1, max_length + 1, size=int(rng.integers(1, 80))).tolist()
    bins = pack_lengths(lengths, max_length)
    # Every example exactly once, no bin over capacity.
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= max_length for b in bins)
    # Best fit is unique up to ties between bins of equal room, which leave the same rooms behind.
    assert rooms(bins, lengths, max_length) == rooms(
        brute_force_bfd(lengths, max_length), lengths, max_length
    )


def test_pack_lengths_rejects_bad_lengths():
    with pytest.raises(ValueError, match="example 1 has 9 tokens > max_length=8"):
        pack_lengths([3, 9, 2], 8)
    with pytest.raises(ValueError, match="example 0 has length 0"):
        pack_lengths([0, 1], 8)
    assert pack_lengths([], 8) == []


def test_conversions_round_trip():
    lengths = [3, 1, 5, 2]
    cu = cu_seqlens_from_lengths(lengths)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 9, 11]
    pos = position_ids_from_lengths(lengths)
    assert pos.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 1]
    assert torch.equal(cu_seqlens_from_position_ids(pos), cu)


def sampler(seed=0, **kw):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 100, size=301).tolist()
    return PackedBatchSampler(lengths, 128, seed=seed, **kw), lengths


def test_sampler_covers_every_example_once_per_epoch():
    s, lengths = sampler(bins_per_batch=3)
    for epoch in range(2):
        s.set_epoch(epoch)
        seen = [i for batch in s for i in batch]
        assert sorted(seen) == list(range(len(lengths)))
    assert len(list(s)) == len(s)


def test_sampler_is_deterministic_and_reshuffles_per_epoch():
    a, _ = sampler(seed=3)
    b, _ = sampler(seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    c, _ = sampler(seed=4)
    assert list(c) != first


@pytest.mark.parametrize("num_replicas", [2, 3, 4])
def test_sampler_splits_ranks_evenly_without_repeats(num_replicas):
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 100, size=97).tolist()
    per_rank = [
        list(PackedBatchSampler(lengths, 128, seed=5, num_replicas=num_replicas, rank=r, bins_per_batch=2))
        for r in range(num_replicas)
    ]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of steps on every rank
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(seen) == list(range(len(lengths)))


def test_sampler_fill_ratio_and_capacity():
    s, lengths = sampler()
    assert s.fill_ratio == pytest.approx(sum(lengths) / (len(s.bins) * 128))
    for batch in s:
        assert sum(lengths[i] for i in batch) <= 128


@pytest.mark.parametrize("in_order", [False, True], ids=["best_fit", "in_order"])
@pytest.mark.parametrize("num_replicas,bins_per_batch", [(1, 1), (2, 3), (3, 2)])
def test_bin_and_batch_counts_are_the_samplers(in_order, num_replicas, bins_per_batch):
    """The counts a trainer plans with (steps per epoch, bins per epoch) are those the sampler then has."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 100, size=67).tolist()
    s = PackedBatchSampler(
        lengths,
        128,
        shuffle=not in_order,
        in_order=in_order,
        num_replicas=num_replicas,
        bins_per_batch=bins_per_batch,
    )
    assert PackedBatchSampler.bins_needed(lengths, 128, num_replicas=num_replicas, in_order=in_order) == len(
        s.bins
    )
    assert len(s.bins) == bins_for_ranks(
        len((pack_in_order if in_order else pack_lengths)(lengths, 128)), num_replicas
    )
    assert (
        PackedBatchSampler.batches(len(s.bins), num_replicas=num_replicas, bins_per_batch=bins_per_batch)
        == len(s)
        == len(list(s))
    )


def test_split_fullest_halves_the_bin_with_most_examples():
    bins = [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert split_fullest(bins) and bins == [[0, 1], [2], [3, 4], [5, 6, 7]]  # the first of the fullest
    singles = [[0], [1]]
    assert not split_fullest(singles) and singles == [[0], [1]]
    assert not split_fullest([])


def test_in_order_sampler_with_epoch_data_keeps_each_epochs_order():
    epochs = {0: [5, 9, 3, 7], 1: [8, 2, 6, 4, 1]}
    s = PackedBatchSampler(epochs[0], 12, shuffle=False, in_order=True, num_bins=4, epoch_lengths=epochs.get)
    s.set_epoch(1)
    assert [i for batch in s for i in batch] == list(range(5)) and len(s.bins) == 4


def test_shards_by_worker_follows_the_explicit_attribute_not_the_class_name():
    datasets = pytest.importorskip("datasets")
    stream = datasets.Dataset.from_list([{"x": 1}]).to_iterable_dataset()

    class Wrapper:  # any stream over its source, declared as such
        worker_shards_from = "inner"

        def __init__(self, inner):
            self.inner = inner

    class EncodedStream:  # the name alone no longer counts
        def __init__(self, records):
            self.records = records

    assert shards_by_worker(stream) and shards_by_worker(Wrapper(Wrapper(stream)))
    assert not shards_by_worker(Wrapper([{"x": 1}])) and not shards_by_worker(EncodedStream(stream))
    from ragkern.data import EncodedStream as Real

    assert Real.worker_shards_from == "records"
