"""Tokenizing RAFT records with ``datasets.Dataset.map`` through ragkern's encode path, num_proc 1 vs 2.

    python bench/tokenization.py [--records 100000] [--tokens 1000] [--num-proc 1 2] [--batch-size 256]

Issue 3 acceptance: "Tokenizing 100,000 RAFT records (about 1,000 tokens each) with datasets.map and num_proc
is benchmarked in bench/ (records/s, written to JSON)". (Not named tokenize.py: run as a script, the file
would shadow the standard library's ``tokenize`` module, which linecache and inspect import.)

* Tokenizer: a byte-level BPE (8,192 tokens) trained offline with the ``tokenizers`` library on the benchmark's
  own generated text, with the usual chat template shape (``ragkern.data.tokenizer.CHAT_TEMPLATE``): merges
  across spaces and offsets work as with Llama 3 / Qwen tokenizers, but the vocabulary is smaller.
* Records: deterministic synthetic RAFT records (seeded): a question, 4..6 titled passages of pseudo-words,
  a short answer, ``oracle`` = one passage; the passage length is calibrated so a record renders to about
  ``--tokens`` tokens.
* Work timed: ``Dataset.map(batched=True, num_proc=k)`` of a function that runs
  :func:`ragkern.data.encode_records` (render with the chat template, tokenize once with offsets, labels,
  block_ids, length policy at ``--max-length``) over each batch, writing int32 columns to the Arrow cache on
  disk, as a user's preprocessing does. Generating the records and training the tokenizer are not timed.
* Reported per num_proc: wall-clock records/s and tokens/s, and records per CPU second (this process and the
  map workers), which holds on a machine shared with other jobs when the wall clock does not.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the map workers fork; keep Rust threads out of it

import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from datasets import Dataset, Features, Sequence, Value, disable_progress_bars  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _common import write_results  # noqa: E402

from ragkern.data import build_bpe_tokenizer, encode_records  # noqa: E402

SYLLABLES = "ka lo ven mi tar so qui ne ra dul phe ost bri gan ze ul ter mon fa si".split()
FEATURES = Features(
    {
        "input_ids": Sequence(Value("int32")),
        "labels": Sequence(Value("int32")),
        "block_ids": Sequence(Value("int32")),
        "source": Value("string"),
    }
)


def pseudo_words(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct pronounceable pseudo-words of 1..4 syllables, fixed by the seed."""
    rng = np.random.default_rng(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        k = int(rng.integers(1, 5))
        words["".join(SYLLABLES[int(i)] for i in rng.integers(0, len(SYLLABLES), size=k))] = None
    return np.array(list(words))


def build_tokenizer(
    words: np.ndarray, *, vocab_size: int = 8192, text_words: int = 400_000, seed: int = 0
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``text_words`` words of sentences of ``words`` (Zipf-like frequencies), with
    a chat template."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(words) + 1)
    picks = rng.choice(len(words), size=text_words, p=weights / weights.sum())
    text = [" ".join(words[picks[i : i + 20]]) + "." for i in range(0, len(picks), 20)]
    return build_bpe_tokenizer(text, vocab_size=vocab_size)


def make_records(n: int, words: np.ndarray, *, passage_words: int, seed: int = 0) -> dict[str, list]:
    """``n`` RAFT records as columns (what ``Dataset.from_dict`` takes); record i depends on (seed, i) only."""
    weights = 1.0 / np.arange(1, len(words) + 1)
    p = weights / weights.sum()
    cols: dict[str, list] = {"id": [], "question": [], "passages": [], "answer": [], "oracle": []}
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        k = int(rng.integers(4, 7))
        sizes = rng.integers(passage_words * 3 // 4, passage_words * 5 // 4 + 1, size=k) * 5 // k
        body = words[rng.choice(len(words), size=int(sizes.sum()) + k * 2 + 15, p=p)]
        passages, at = [], 0
        for s in sizes:
            title = " ".join(body[at : at + 2])
            passages.append({"title": title, "text": " ".join(body[at + 2 : at + 2 + s]) + "."})
            at += 2 + s
        oracle = int(rng.integers(0, k))
        answer = " ".join(body[at : at + 3])
        passages[oracle]["text"] += f" {answer}."
        cols["id"].append(i)
        cols["question"].append("What is " + " ".join(body[at + 3 : at + 15]) + "?")
        cols["passages"].append(passages)
        cols["answer"].append(answer)
        cols["oracle"].append([oracle])
    return cols


def calibrate(words, tokenizer, tokens: int, *, max_length: int, seed: int = 0) -> int:
    """Words per passage (for 5 passages) that make a record about ``tokens`` tokens long."""
    passage_words = 100
    for _ in range(3):
        sample = make_records(50, words, passage_words=passage_words, seed=seed + 1)
        records = [dict(zip(sample, v)) for v in zip(*sample.values())]
        mean = float(
            np.mean(encode_records(records, tokenizer, max_length=max_length, show_progress=False).lengths)
        )
        passage_words = max(1, round(passage_words * tokens / mean))
    return passage_words


def encode_batch(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    """The map function: a batch of records (columns) -> their examples (columns), length policy applied."""
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    encoded = encode_records(records, tokenizer, max_length=max_length, show_progress=False)
    return {name: [e[name] for e in encoded.examples] for name in FEATURES}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the map workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(dataset: Dataset, tokenizer, *, num_proc: int, batch_size: int, max_length: int) -> dict:
    """Time one ``Dataset.map`` over every record; tokens are counted from the written columns."""
    load_before = os.getloadavg()[0]
    cpu = cpu_seconds()
    t = time.perf_counter()
    out = dataset.map(
        encode_batch,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=dataset.column_names,
        features=FEATURES,
        load_from_cache_file=False,
        new_fingerprint=f"ragkern-bench-tokenization-{num_proc}",
    )
    seconds = time.perf_counter() - t
    cpu = cpu_seconds() - cpu
    table = out.data.table
    tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py())
    labels = pc.list_flatten(table.column("labels"))
    targets = int(pc.sum(pc.not_equal(labels, -100)).as_py())
    return {
        "num_proc": num_proc,
        "records": len(dataset),
        "examples": len(out),
        "seconds": round(seconds, 2),
        "records_per_s": round(len(dataset) / seconds, 1),
        "tokens_per_s": round(tokens / seconds),
        "cpu_seconds": round(cpu, 3),
        "records_per_cpu_s": round(len(dataset) / cpu, 1),  # what one core does, whatever else runs
        "tokens": tokens,
        "mean_tokens_per_record": round(tokens / len(dataset), 1),
        "target_tokens": targets,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "output": out,
    }


def benchmark(
    n: int,
    *,
    tokens: int = 1000,
    num_procs=(1, 2),
    batch_size: int = 256,
    max_length: int = 2048,
    vocab_size: int = 8192,
    text_words: int = 400_000,
    cache_dir: str | None = None,
) -> dict:
    """Generate ``n`` records, then time ``Dataset.map`` once per ``num_procs`` entry (see the module docstring).

    Returns ``{"setup": {...}, "runs": [...]}``; each run also holds its output dataset under ``"output"``.
    """
    words = pseudo_words(5000)
    tokenizer = build_tokenizer(words, vocab_size=vocab_size, text_words=text_words)
    passage_words = calibrate(words, tokenizer, tokens, max_length=max_length)
    t = time.perf_counter()
    dataset = Dataset.from_dict(make_records(n, words, passage_words=passage_words))
    if cache_dir is not None:  # keep the records on disk, so map writes its output to the Arrow cache there
        dataset.save_to_disk(os.path.join(cache_dir, "records"))
        dataset = Dataset.load_from_disk(os.path.join(cache_dir, "records"))
    setup = {
        "records": n,
        "target_tokens_per_record": tokens,
        "passage_words": passage_words,
        "tokenizer": f"byte-level BPE, vocab {len(tokenizer)}, trained offline on the generated text",
        "max_length": max_length,
        "map_batch_size": batch_size,
        "generate_seconds": round(time.perf_counter() - t, 1),
        "cpu_count": os.cpu_count(),
    }
    runs = [
        run(dataset, tokenizer, num_proc=k, batch_size=batch_size, max_length=max_length) for k in num_procs
    ]
    return {"setup": setup, "runs": runs}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--tokens", type=int, default=1000, help="about this many tokens per record")
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=256, help="records per map batch")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    a = p.parse_args()
    disable_progress_bars()
    with tempfile.TemporaryDirectory() as cache_dir:
        result = benchmark(
            a.records,
            tokens=a.tokens,
            num_procs=a.num_proc,
            batch_size=a.batch_size,
            max_length=a.max_length,
            cache_dir=cache_dir,
        )
        for r in result["runs"]:
            del r["output"]
    base = result["runs"][0]
    for r in result["runs"]:
        r["speedup_vs_first"] = round(r["records_per_s"] / base["records_per_s"], 2)
        print(
            f"num_proc={r['num_proc']}: {r['records']:,} records in {r['seconds']:.1f} s = "
            f"{r['records_per_s']:,.0f} records/s, {r['tokens_per_s']:,} tokens/s "
            f"({r['mean_tokens_per_record']} tokens/record; x{r['speedup_vs_first']}; "
            f"{r['records_per_cpu_s']:,.0f} records per CPU second; "
            f"load average {r['load_average_1min'][0]} -> {r['load_average_1min'][1]})"
        )
    if not a.no_write:
        print(f"wrote {write_results('tokenization', result)}")


if __name__ == "__main__":
    main()
