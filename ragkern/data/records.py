"""Load and validate records from JSONL / JSON / Parquet files, ``datasets`` datasets or any iterable.

Every record is checked with :func:`ragkern.data.validate_record` as it is read, so a bad record fails at load
time, not mid-epoch, with an error naming where it is::

    data/train.jsonl:17: field 'oracle': oracle[0] = 5 is not a passage index in [0, 3) (0-based)

With ``on_error="skip"`` (lenient loading) bad records are skipped and counted instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from .encode import RecordError, validate_record

logger = logging.getLogger(__name__)

FORMATS = (".jsonl", ".json", ".parquet")


class LoadError(RecordError):
    """A record that failed to load or validate; ``where`` is ``"file:line"`` (or ``"<name> row i"``)."""

    def __init__(self, where: str, message: str, *, field: str | None = None):
        self.where = where
        ValueError.__init__(self, f"{where}: {message}")
        self.field = field
        self.record_id = None


class Records(list):
    """A list of validated records, with the count and first messages of the records skipped."""

    def __init__(self, records=(), *, skipped: int = 0, errors: list[str] | None = None):
        super().__init__(records)
        self.skipped = skipped
        self.errors = errors or []


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record or exception) for every record of a file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                where = f"{path}:{n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, LoadError(where, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, LoadError(where, f"malformed JSON: {e.msg} (column {e.colno})")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoadError(str(path), f"not a UTF-8 JSON document: {e}") from e
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise LoadError(str(path), "a .json file must hold a list of records (or {'data': [...]})")
        for i, record in enumerate(data):
            yield f"{path} record #{i}", record
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", record
    else:
        raise ValueError(f"{path}: unknown file type {suffix!r}; expected one of {FORMATS}")


def _checked(
    rows: Iterable[tuple[str, object]], kinds: tuple[str, ...] | None, on_error: str, errors: Records
) -> Iterator[dict]:
    for where, record in rows:
        try:
            if isinstance(record, LoadError):
                raise record
            try:
                kind = validate_record(record)
            except RecordError as e:
                field = f"field {e.field!r}: " if e.field else ""
                raise LoadError(where, f"{field}{e}", field=e.field) from e
            if kinds is not None and kind not in kinds:
                raise LoadError(where, f"a {kind} record where {' or '.join(kinds)} records are expected")
        except LoadError as e:
            if on_error == "raise":
                raise
            errors.skipped += 1
            if len(errors.errors) < 20:
                errors.errors.append(str(e))
            continue
        yield record


def iter_records(
    source, *, kinds: tuple[str, ...] | None = None, on_error: str = "raise", name: str = "records"
) -> Iterator[dict]:
    """Stream validated records from a path, a ``datasets`` (Iterable)Dataset or any iterable of dicts.

    Nothing is materialised: use this for ``IterableDataset`` sources. See :func:`load_records`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if isinstance(source, (str, Path)):
        rows: Iterable = _rows(Path(source))
    else:
        rows = ((f"{name} row {i}", r) for i, r in enumerate(source))
    yield from _checked(rows, kinds, on_error, Records())


def load_records(
    source, *, kinds: tuple[str, ...] | None = None, on_error: str = "raise", name: str = "records"
) -> Records:
    """Load and validate records into a list.

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.parquet`` path (or a list of them), a ``datasets.Dataset``, an
            ``IterableDataset`` or any iterable of dicts.
        kinds: the record kinds accepted (``"raft"``, ``"qa"``, ``"instruct"``, ``"dap"``); None accepts all.
        on_error: ``"raise"`` a :class:`LoadError` naming file, line and field, or ``"skip"`` the bad record
            and count it in ``Records.skipped`` (a warning gives the first messages).
        name: what to call an in-memory source in messages.

    Raises:
        LoadError: malformed JSON, non-UTF-8 bytes, a missing / empty / mistyped field, an unknown role, an
            oracle index out of range (``on_error="raise"``).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    sources = (
        source
        if isinstance(source, (list, tuple)) and all(isinstance(s, (str, Path)) for s in source)
        else [source]
    )
    out = Records()
    for src in sources:
        if isinstance(src, (str, Path)):
            rows: Iterable = _rows(Path(src))
        else:
            rows = ((f"{name} row {i}", r) for i, r in enumerate(src))
        out.extend(_checked(rows, kinds, on_error, out))
    if out.skipped:
        logger.warning("skipped %d invalid records (first: %s)", out.skipped, out.errors[:3])
    return out
