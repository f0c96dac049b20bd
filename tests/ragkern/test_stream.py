"""Streaming: lazy RAFT building and encoding, bounded-buffer packing, PackedIterableDataset across ranks."""

import datasets
import numpy as np
import pytest
import torch

from ragkern import PackingCollator
from ragkern.data import EncodedStream, RaftBuilder, RaftStream, encode_records, iter_encode_records
from ragkern.packing import (
    BinCollator,
    PackedIterableDataset,
    StreamPackStats,
    pack_lengths,
    pack_stream,
    stream_dataloader,
)
from tests.ragkern.tiny import tiny_model, word_tokenizer


def _examples(lengths):
    return [{"input_ids": [5] * int(n), "id": i} for i, n in enumerate(lengths)]


class Counting:
    """An instrumented stream: records how many examples the packer has pulled."""

    def __init__(self, examples):
        self.examples, self.pulled = examples, 0

    def __iter__(self):
        for e in self.examples:
            self.pulled += 1
            yield e


@pytest.mark.parametrize("buffer_size", [1, 7, 64])
def test_pack_stream_holds_at_most_buffer_size_and_emits_each_example_once(buffer_size):
    lengths = np.random.default_rng(buffer_size).integers(1, 300, 1000)
    source = Counting(_examples(lengths))
    stats = StreamPackStats(512)
    seen, held = [], []
    for b in pack_stream(source, 512, buffer_size=buffer_size, stats=stats):
        # pulled from the stream but not yet handed out = what the packer holds
        held.append(source.pulled - len(seen))
        assert sum(len(e["input_ids"]) for e in b) <= 512
        seen += [e["id"] for e in b]
    assert max(held) <= buffer_size
    assert stats.max_buffered == buffer_size  # the buffer was used, not bypassed
    assert sorted(seen) == list(range(1000))
    assert (stats.examples, stats.tokens) == (1000, int(lengths.sum()))


def test_pack_stream_fill_ratio_near_offline_packing():
    lengths = np.random.default_rng(0).integers(16, 512, 3000)
    stats = StreamPackStats(1024)
    bins = list(pack_stream(iter(_examples(lengths)), 1024, buffer_size=64, stats=stats))
    offline = lengths.sum() / (len(pack_lengths(lengths, 1024)) * 1024)
    assert stats.bins == len(bins)
    assert stats.fill_ratio == pytest.approx(lengths.sum() / (len(bins) * 1024))
    assert stats.fill_ratio >= 0.98 and stats.fill_ratio >= offline - 0.01
    tiny = StreamPackStats(1024)
    list(pack_stream(iter(_examples(lengths)), 1024, buffer_size=2, stats=tiny))
    assert tiny.fill_ratio < stats.fill_ratio - 0.05  # the buffer is what buys the fill


def test_pack_stream_rejects_an_example_that_cannot_fit():
    with pytest.raises(ValueError, match=r"stream example 1 has 9 tokens.*max_length=8"):
        list(pack_stream(iter(_examples([3, 9])), 8))


@pytest.mark.parametrize("world_size", [2, 3])
def test_packed_iterable_dataset_deals_every_bin_once_and_evenly_to_ranks(world_size):
    examples = _examples(np.random.default_rng(1).integers(1, 200, 301))
    per_rank = [
        list(PackedIterableDataset(examples, 256, buffer_size=32, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert len({len(bins) for bins in per_rank}) == 1  # same number of steps on every rank
    ids = [e["id"] for bins in per_rank for b in bins for e in b]
    assert sorted(ids) == list(range(301))


def test_too_short_stream_for_the_ranks_drops_and_counts():
    stats = StreamPackStats(100)
    bins = list(pack_stream(iter(_examples([60, 60, 60])), 100, multiple_of=4, stats=stats))
    assert len(bins) == 0 and stats.dropped_for_ranks == 3


def _deal(examples, max_length, buffer_size, world_size):
    """Every rank's bins (lists of example ids) and the pass's stats, as PackedIterableDataset deals them."""
    per_rank, stats = [], None
    for r in range(world_size):
        ds = PackedIterableDataset(
            examples, max_length, buffer_size=buffer_size, rank=r, world_size=world_size
        )
        per_rank.append([[e["id"] for e in b] for b in ds])
        stats = ds.stats
    return per_rank, stats


@pytest.mark.parametrize(
    "n, buffer_size, emitted_before_the_end",
    [(5, 4, 0), (21, 4, 16)],  # the reviewer's case; then two full rounds of 8 bins before a tail of 5
)
def test_ranks_get_the_same_bins_when_the_tail_is_shorter_than_the_ranks(
    n, buffer_size, emitted_before_the_end, caplog
):
    """9-token examples in bins of 10: one per bin, nothing to split; 8 ranks, < 8 examples at the end.

    Bins already handed to ranks cannot be taken back: they go out in rounds of 8, so the tail is a partial
    round, dropped whole (and counted exactly) rather than leaving ranks 3-7 a step short (a DDP hang).
    """
    examples = _examples([9] * n)
    source = Counting(examples)
    first_round_at = None
    for i, _ in enumerate(pack_stream(source, 10, buffer_size=buffer_size, multiple_of=8)):
        if i == 0:
            first_round_at = source.pulled
    assert first_round_at is None or first_round_at < n  # rounds go out while the stream is read
    with caplog.at_level("WARNING", logger="ragkern.packing"):
        per_rank, stats = _deal(examples, 10, buffer_size, 8)
    assert [len(bins) for bins in per_rank] == [emitted_before_the_end // 8] * 8
    seen = sorted(i for bins in per_rank for b in bins for i in b)
    assert len(seen) == stats.examples == emitted_before_the_end
    assert stats.dropped_for_ranks == n - emitted_before_the_end == 5
    assert "dropped the 5 shortest" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("seed", range(12))
def test_every_rank_gets_the_same_bins_and_drops_are_counted(seed):
    rng = np.random.default_rng(seed)
    world = int(rng.integers(2, 9))
    long_only = seed % 3 == 0  # one example per bin: the tail cannot be split
    lengths = (
        rng.integers(33, 64, rng.integers(1, 60)) if long_only else rng.integers(1, 64, rng.integers(1, 200))
    )
    examples = _examples(lengths)
    per_rank, stats = _deal(examples, 64, int(rng.integers(1, 20)), world)
    assert len({len(bins) for bins in per_rank}) == 1
    seen = [i for bins in per_rank for b in bins for i in b]
    assert len(seen) == len(set(seen)) == stats.examples
    assert stats.dropped_for_ranks == len(examples) - len(seen) < world
    assert all(sum(lengths[i] for i in b) <= 64 and b == sorted(b) for bins in per_rank for b in bins)


def _records(n):
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"text": " ".join(["the river of rome"] * (1 + i % 7)), "id": i})
        elif i % 3 == 1:
            out.append(
                {
                    "question": "who lives in rome?",
                    "passages": ["alpha lives in rome", "beta lives in paris " * (1 + i % 5)],
                    "answer": "alpha",
                    "oracle": [0],
                    "id": i,
                }
            )
        else:
            out.append({"prompt": "where is paris?", "completion": "in france", "id": i})
    return out


def test_streaming_encode_of_an_iterable_dataset_equals_in_memory_encode():
    tok = word_tokenizer()
    records = _records(30)
    stream = datasets.IterableDataset.from_generator(lambda: iter(records))
    expected = encode_records(records, tok, max_length=24, show_progress=False)
    assert expected.stats.dap_chunks > 0 and expected.stats.trimmed > 0  # the length policy is exercised
    encoded = EncodedStream(stream, tok, max_length=24)
    assert list(encoded) == expected.examples
    assert encoded.stats == expected.stats
    assert list(encoded) == expected.examples  # a second pass reads the stream again


def test_iter_encode_records_is_lazy():
    tok = word_tokenizer()
    source = Counting(_records(30))
    it = iter_encode_records(source, tok, max_length=64)
    assert source.pulled == 0
    next(it)
    assert source.pulled == 1


def test_raft_stream_matches_build_all_and_redraws_per_epoch():
    corpus = [f"passage {w} lives in rome" for w in ("alpha", "beta", "gamma", "delta", "paris", "city")]
    qa = [
        {"question": f"who is {w}?", "answer": w, "oracle_passages": [f"{w} is the answer"]}
        for w in ("alpha", "beta", "gamma", "delta")
    ]
    builder = RaftBuilder(corpus, num_distractors=2, seed=0)
    stream = RaftStream(datasets.IterableDataset.from_generator(lambda: iter(qa)), builder)
    assert list(stream) == builder.build_all(qa, epoch=0)
    stream.set_epoch(1)
    assert list(stream) == builder.build_all(qa, epoch=1) != builder.build_all(qa, epoch=0)


def test_bin_collator_rows_equal_packing_collator_on_the_bins_examples():
    examples = [
        {"input_ids": list(range(4, 4 + n)), "labels": list(range(4, 4 + n)), "source": "dap"}
        for n in (5, 9, 3, 7, 2)
    ]
    ds = PackedIterableDataset(examples, 12, buffer_size=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=BinCollator(PackingCollator()))
    bins = list(ds)
    rows = list(loader)
    assert len(rows) == 2
    want = PackingCollator()([e for b in bins[:2] for e in b])
    assert rows[0].keys() == want.keys()
    assert all(torch.equal(torch.as_tensor(rows[0][k]), torch.as_tensor(want[k])) for k in want)


def test_packed_stream_trains_with_a_plain_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    tok = word_tokenizer()
    stream = EncodedStream(
        datasets.IterableDataset.from_generator(lambda: iter(_records(40))), tok, max_length=64
    )
    train = PackedIterableDataset(stream, 64, buffer_size=8)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        accelerator_config={
            "dispatch_batches": False
        },  # bins are dealt by the dataset, not split by accelerate
        disable_tqdm=True,
    )
    model = tiny_model("llama", vocab_size=len(tok)).train()
    before = model.model.embed_tokens.weight.detach().clone()
    trainer = Trainer(
        model=model, args=args, train_dataset=train, data_collator=BinCollator(PackingCollator())
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert not torch.equal(before, model.model.embed_tokens.weight)
    assert 0 < train.fill_ratio <= 1


def test_stream_dataloader_deals_rows_to_ranks_and_forwards_set_epoch():
    tok = word_tokenizer()
    corpus = [f"{w} lives in rome" for w in ("alpha", "beta", "gamma", "delta", "paris", "city", "river")]
    qa = [
        {"question": f"who is {w}?", "answer": w, "oracle_passages": [f"{w} is here"]} for w in corpus[:4] * 5
    ]
    stream = EncodedStream(RaftStream(qa, RaftBuilder(corpus, num_distractors=2, seed=0)), tok, max_length=40)
    train = PackedIterableDataset(stream, 80, buffer_size=6)
    loaders = [
        stream_dataloader(train, PackingCollator(), bins_per_batch=2, rank=r, world_size=2) for r in (0, 1)
    ]
    rows = [list(loader) for loader in loaders]
    assert len(rows[0]) == len(rows[1]) > 0  # same number of steps on both ranks
    tokens = sum(int(row["input_ids"].numel()) for rank in rows for row in rank)
    assert tokens == loaders[0].dataset.stats.tokens  # the two ranks' rows hold every packed token once
    assert train.world_size is None  # the loaders hold copies
    for loader in loaders:
        loader.set_epoch(1)  # Trainer does this every epoch: the RAFT stream re-draws its distractors
    again = [list(loader) for loader in loaders]
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rows[0], again[0]))


def test_rag_trainer_trains_a_packed_stream_like_a_plain_trainer(tmp_path):
    """RagTrainer takes a PackedIterableDataset: same rows (and so the same losses) as the plain-Trainer path."""
    from transformers import Trainer, TrainingArguments

    from ragkern import RagTrainer, RagTrainingArguments

    tok = word_tokenizer()

    def run(rag: bool) -> tuple[list[float], list[dict]]:
        stream = EncodedStream(
            datasets.IterableDataset.from_generator(lambda: iter(_records(40))), tok, max_length=64
        )
        train = PackedIterableDataset(stream, 64, buffer_size=8)
        common = dict(
            output_dir=str(tmp_path / str(rag)),
            max_steps=3,
            per_device_train_batch_size=1,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        model = tiny_model("llama", vocab_size=len(tok)).train()
        if rag:
            args = RagTrainingArguments(max_length=64, fused_loss=False, **common)
            trainer = RagTrainer(model=model, args=args, train_dataset=train)
        else:
            model.set_attn_implementation("ragkern")
            args = TrainingArguments(
                remove_unused_columns=False, accelerator_config={"dispatch_batches": False}, **common
            )
            trainer = Trainer(
                model=model, args=args, train_dataset=train, data_collator=BinCollator(PackingCollator())
            )
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        return [h["loss"] for h in logs], logs

    rag_losses, rag_logs = run(True)
    plain_losses, _ = run(False)
    assert len(rag_losses) == 3
    assert rag_losses == pytest.approx(plain_losses, rel=1e-5)
    assert all(0 < h["fill_ratio"] <= 1 for h in rag_logs)


def test_rag_trainer_refuses_a_stream_packed_longer_than_max_length(tmp_path):
    from ragkern import RagTrainer, RagTrainingArguments

    tok = word_tokenizer()
    stream = EncodedStream(_records(4), tok, max_length=64)
    args = RagTrainingArguments(
        output_dir=str(tmp_path), max_length=32, max_steps=1, report_to=[], use_cpu=True
    )
    with pytest.raises(ValueError, match="max_length=32"):
        RagTrainer(
            model=tiny_model("llama", vocab_size=len(tok)),
            args=args,
            train_dataset=PackedIterableDataset(stream, 64),
        )


def test_set_epoch_past_the_first_pass_warns_once_about_resuming(caplog):
    ds = PackedIterableDataset(_examples([3, 4]), 8)
    with caplog.at_level("WARNING", logger="ragkern.packing"):
        ds.set_epoch(0)
        assert not caplog.records
        ds.set_epoch(1)
        ds.set_epoch(2)
    assert len(caplog.records) == 1 and "will not resume in the same order" in caplog.records[0].getMessage()


@pytest.mark.parametrize("repeat", [False, True])
def test_rag_trainer_resumes_a_stream_in_the_same_order(tmp_path, repeat, caplog):
    """A 5-bin stream, 7 steps: a checkpoint of the first pass resumes exactly; later ones if it repeats."""
    from ragkern import RagTrainer, RagTrainingArguments

    tok = word_tokenizer()

    def run(out, resume=None):
        records = datasets.IterableDataset.from_generator(lambda: iter(_records(12)))
        stream = EncodedStream(records.repeat(None) if repeat else records, tok, max_length=64)
        args = RagTrainingArguments(
            output_dir=str(out),
            max_length=64,
            max_steps=7,
            per_device_train_batch_size=1,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            save_strategy="steps",
            save_steps=3,
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
            fused_loss=False,
        )
        model = tiny_model("llama", vocab_size=len(tok)).train()
        trainer = RagTrainer(
            model=model, args=args, train_dataset=PackedIterableDataset(stream, 64, buffer_size=4)
        )
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    with caplog.at_level("WARNING", logger="ragkern.packing"):
        full = run(tmp_path / "full")
    assert len(full) == 7
    passes = any("another pass over the stream" in r.getMessage() for r in caplog.records)
    assert passes != repeat  # 12 records make 5 bins: Trainer needs a second pass unless the stream repeats
    checkpoint = tmp_path / "full" / ("checkpoint-6" if repeat else "checkpoint-3")
    assert run(tmp_path / "resumed", resume=str(checkpoint)) == pytest.approx(full, rel=1e-6)


def _id_examples(n: int) -> list[dict]:
    """Examples whose first token is their id + 4 (ids < 60), of varied lengths, every token a target."""
    rng = np.random.default_rng(7)
    return [{"input_ids": [4 + i] + [3] * int(rng.integers(1, 20)), "id": i} for i in range(n)]


def _hf_stream(examples: list[dict], shards: int) -> datasets.IterableDataset:
    data = datasets.Dataset.from_list([{"input_ids": e["input_ids"]} for e in examples])
    return data.to_iterable_dataset(num_shards=shards)


@pytest.mark.parametrize(
    "kind,workers,shards", [("hf", w, s) for s in (1, 2) for w in (0, 1, 2)] + [("list", 2, 1)]
)
def test_stream_trains_every_example_exactly_once_per_pass_whatever_the_workers(
    tmp_path, kind, workers, shards
):
    """DataLoader workers over a stream: a datasets.IterableDataset shards itself per worker (the packer must not
    split again), a list does not (each worker must take its share of bins): either way one pass trains each
    example once, and the fill ratio comes from the workers."""
    from ragkern import RagTrainer, RagTrainingArguments

    examples = _id_examples(40)
    source = _hf_stream(examples, shards) if kind == "hf" else examples
    train = PackedIterableDataset(source, 48, buffer_size=8)
    one_pass = len(list(stream_dataloader(train, PackingCollator(), num_workers=workers)))
    trained = []

    class Recording(RagTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            cu = inputs["cu_seq_lens_q"].tolist()
            trained.extend(int(inputs["input_ids"][0, a]) - 4 for a in cu[:-1])
            return super().training_step(model, inputs, num_items_in_batch)

    args = RagTrainingArguments(
        output_dir=str(tmp_path),
        max_length=48,
        max_steps=one_pass,
        per_device_train_batch_size=1,
        learning_rate=0.0,
        dataloader_num_workers=workers,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Recording(model=tiny_model("llama"), args=args, train_dataset=train)
    trainer.train()
    assert sorted(trained) == list(range(len(examples)))
    fills = [h["fill_ratio"] for h in trainer.state.log_history if "loss" in h]
    assert fills and all(0.5 < f <= 1 for f in fills)
