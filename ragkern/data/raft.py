"""Build RAFT records from QA records and a corpus: oracle + distractors, seeded, optionally re-drawn per epoch.

A QA record ``{"question", "answer", "oracle_passages": [...], "reasoning"?, "id"?}`` becomes a RAFT record::

    {"question", "answer", "passages": [p1, ..., pk], "oracle": [positions], "reasoning"?, "id", "source"}

* ``num_distractors`` corpus passages are drawn at random, or (``negatives="bm25"``) among the ``hard_pool``
  passages that BM25 ranks closest to the question; a passage equal to an oracle (same text or same id) is
  never a distractor.
* The oracle passages are kept with probability ``p_oracle`` (RAFT's P%); otherwise the example holds
  distractors only (as many passages as with the oracle, so the count does not give it away) and
  ``"oracle": []``.
* Passages are shuffled (``shuffle=True``); the encoder numbers them [1], [2], ... The placeholder ``{cite}``
  in ``answer`` or ``reasoning`` becomes the oracle's markers (e.g. ``[2]``) or, without the oracle, nothing.
* Every draw comes from a generator seeded by ``(seed, epoch, index)``: the same record gets the same example
  for the same epoch whatever the order or the process, and a new one in the next epoch.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from .encode import RecordError, passage_text, validate_record
from .prepare import EncodedDataset, encode_records
from .records import load_records

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased word tokens, what the BM25 index and its queries see."""
    return _WORD.findall(text.lower())


# BM25 ranks kept per question beyond the hard pool (room for the excluded oracle passages).
_RANK_MARGIN = 64


class RaftBuilder:
    """Turns QA records into RAFT records against a fixed corpus (see the module docstring).

    Args:
        corpus: passages (strings or ``{"title", "text", "id"?}`` dicts): a list, a ``datasets.Dataset`` with a
            ``text`` column, or a path loadable by :func:`ragkern.data.load_records` (``{"text"}`` records).
        num_distractors: distractor passages per example.
        p_oracle: probability that an example keeps its oracle passages.
        negatives: ``"random"`` or ``"bm25"`` (hard negatives, via ``rank_bm25``).
        hard_pool: with BM25, distractors are drawn among this many top-ranked non-oracle passages
            (>= num_distractors; larger pools give more variety across epochs).
        shuffle: shuffle the passages of every example (else the oracle comes first).
        seed: the seed of every draw.
        split_source: tag examples ``"<source>/oracle"`` or ``"<source>/no_oracle"`` so that per-source loss
            logging reports RAFT's two cases apart.
    """

    def __init__(
        self,
        corpus,
        *,
        num_distractors: int = 3,
        p_oracle: float = 0.8,
        negatives: str = "random",
        hard_pool: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        split_source: bool = False,
    ):
        if isinstance(corpus, str) or hasattr(corpus, "__fspath__"):
            corpus = load_records(corpus, name="corpus")
        self.corpus = [c if isinstance(c, str) else dict(c) for c in corpus]
        self.texts = [passage_text(p, field=f"corpus[{i}]") for i, p in enumerate(self.corpus)]
        self.ids = [p.get("id") if isinstance(p, dict) else None for p in self.corpus]
        if num_distractors < 0:
            raise ValueError(f"num_distractors must be >= 0, got {num_distractors}")
        if not 0.0 <= p_oracle <= 1.0:
            raise ValueError(f"p_oracle must be in [0, 1], got {p_oracle}")
        if negatives not in ("random", "bm25"):
            raise ValueError(f"negatives must be 'random' or 'bm25', got {negatives!r}")
        self.num_distractors = num_distractors
        self.p_oracle = p_oracle
        self.negatives = negatives
        self.hard_pool = max(hard_pool or 4 * num_distractors, num_distractors)
        self.shuffle = shuffle
        self.seed = seed
        self.split_source = split_source
        self._bm25 = None
        self._pools: dict[str, np.ndarray] = {}

    def _excluded(self, oracles: list) -> set[int]:
        texts = {passage_text(p, field="oracle_passages").strip() for p in oracles}
        ids = {p.get("id") for p in oracles if isinstance(p, dict) and p.get("id") is not None}
        return {
            i
            for i, (t, pid) in enumerate(zip(self.texts, self.ids))
            if t.strip() in texts or (pid is not None and pid in ids)
        }

    def _ranked(self, question: str, top: int | None) -> np.ndarray:
        """The ``top`` corpus indices (all with None) by decreasing BM25 score for the question, ties in corpus
        order: the prefix of a stable argsort. The top ``hard_pool + _RANK_MARGIN`` are cached per question
        (reused across epochs), so the cache stays small on a large corpus."""
        if top is not None and question in self._pools:
            return self._pools[question]
        if self._bm25 is None:
            from rank_bm25 import BM25Okapi

            self._bm25 = BM25Okapi([bm25_tokens(t) for t in self.texts])
        scores = self._bm25.get_scores(bm25_tokens(question))
        if top is None or top >= len(scores):
            ranked = np.argsort(-scores, kind="stable")
        else:  # every index scoring at least the top-th score, stably sorted: the stable argsort's prefix
            threshold = np.partition(scores, len(scores) - top)[len(scores) - top]
            candidates = np.flatnonzero(scores >= threshold)
            ranked = candidates[np.argsort(-scores[candidates], kind="stable")][:top]
        if top is not None:
            self._pools[question] = ranked
        return ranked

    def _distractors(self, question: str, exclude: set[int], k: int, rng: np.random.Generator) -> list[int]:
        if self.negatives == "bm25":
            want = max(self.hard_pool, k)
            top = self._ranked(question, want + _RANK_MARGIN)
            pool = [int(i) for i in top if int(i) not in exclude][:want]
            if len(pool) < want and len(top) < len(self.texts):  # many excluded: rank the whole corpus
                pool = [int(i) for i in self._ranked(question, None) if int(i) not in exclude][:want]
        else:
            pool = [i for i in range(len(self.texts)) if i not in exclude]
        if len(pool) < k:
            raise ValueError(
                f"the corpus has {len(pool)} passages that are not the oracle, fewer than the {k} distractors "
                "asked for; lower num_distractors or add passages"
            )
        return [pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)]

    def build(self, record: dict, *, index: int, epoch: int = 0) -> dict:
        """The RAFT record for QA record number ``index`` in ``epoch`` (deterministic in seed, epoch, index)."""
        if validate_record(record) != "qa":
            raise RecordError(
                "RaftBuilder takes QA records {question, answer, oracle_passages}",
                field="oracle_passages",
                record=record,
            )
        rng = np.random.default_rng([self.seed, epoch, index])
        oracles = list(record["oracle_passages"])
        keep_oracle = bool(rng.random() < self.p_oracle)
        n_distractors = self.num_distractors + (0 if keep_oracle else len(oracles))
        picked = self._distractors(record["question"], self._excluded(oracles), n_distractors, rng)
        passages = [*(oracles if keep_oracle else []), *(self.corpus[i] for i in picked)]
        order = rng.permutation(len(passages)) if self.shuffle else np.arange(len(passages))
        passages = [passages[int(i)] for i in order]
        oracle = sorted(int(np.nonzero(order == j)[0][0]) for j in range(len(oracles))) if keep_oracle else []
        cite = "".join(f"[{k + 1}]" for k in oracle)
        out = {k: v for k, v in record.items() if k != "oracle_passages"}
        out.update(passages=passages, oracle=oracle)
        out.setdefault("id", index)
        out.setdefault("source", "raft")
        if self.split_source:
            out["source"] = f"{out['source']}/{'oracle' if oracle else 'no_oracle'}"
        for name in ("answer", "reasoning"):
            if isinstance(out.get(name), str) and "{cite}" in out[name]:
                out[name] = re.sub(r" ?\{cite\}", f" {cite}" if cite else "", out[name]).strip()
        return out

    def build_all(self, records, *, epoch: int = 0) -> list[dict]:
        """RAFT records for every QA record, for the given epoch."""
        return [self.build(r, index=i, epoch=epoch) for i, r in enumerate(records)]


class RaftEpochDataset(EncodedDataset):
    """QA records whose RAFT examples are re-drawn every epoch: new distractors, new order, a fresh oracle draw.

    An :class:`EncodedDataset` holding the examples of the current epoch. ``build_epoch(e)`` rebuilds and
    re-encodes the examples of epoch ``e`` (length policy applied, see :func:`ragkern.data.encode_records`);
    ``lengths`` and ``stats`` then describe that epoch, so the packing sampler must be rebuilt from ``lengths``
    after each ``build_epoch`` (the method is deliberately not called ``set_epoch``: accelerate would call that
    under a sampler whose bins were packed for the previous lengths). The number of examples can change
    between epochs only through the length policy (``stats.dropped_too_long``). ``lengths_for_epoch(e)`` gives
    an epoch's lengths without switching to it.
    """

    def __init__(
        self,
        records,
        builder: RaftBuilder,
        tokenizer,
        *,
        max_length: int,
        epoch: int = 0,
        strict: bool = False,
    ):
        self.records = load_records(records, kinds=("qa",), name="qa records")
        self.builder, self.tokenizer, self.max_length = builder, tokenizer, max_length
        self.strict = strict  # raise on an example over max_length instead of trimming/dropping and counting
        self.epoch = None
        self.build_epoch(epoch)

    def _encode(self, epoch: int) -> EncodedDataset:
        raft = self.builder.build_all(self.records, epoch=epoch)
        return encode_records(
            raft, self.tokenizer, max_length=self.max_length, strict=self.strict, show_progress=False
        )

    def build_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        encoded = self._encode(epoch)
        self.examples, self.lengths, self.stats = encoded.examples, encoded.lengths, encoded.stats
        self.epoch = epoch

    def lengths_for_epoch(self, epoch: int) -> list[int]:
        return self.lengths if epoch == self.epoch else self._encode(epoch).lengths
