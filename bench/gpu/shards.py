"""Carry a file too big for one device call in parts: split it here, reassemble and verify it there.

A device call takes at most 64 MiB of files (the working tree and its carried paths together), and the
SmolLM2-135M-Instruct GGUF (``bench/gpu/real.py``) is 98 MB. :func:`split` cuts a file into ``N`` parts of
near-equal size, one folder per part (``DEST/p1``, ``DEST/p2``, ...), each folder holding its part, a copy of
the manifest (``manifest.json``: the file's name, size and sha256, and every part's size and sha256) and
copies of the ``extras`` (small files every call needs, e.g. a wheel). Each device call carries one folder;
a warm device machine keeps the ignored folders an earlier call brought (the device README: "ignored build
outputs already there are kept between calls"), so after the last call all parts are there, and
:func:`assemble` checks every part's size and sha256, concatenates them and checks the whole file's sha256.

Only the standard library: ``python3 -m bench.gpu.shards`` runs anywhere (``split``, ``status``,
``assemble``; ``--help``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "ragkern-shards-1"


class ShardError(RuntimeError):
    """Parts missing (``missing`` lists their numbers) or not what the manifest says (``corrupt``)."""

    def __init__(self, message: str, *, missing: list[int] | None = None, corrupt: list[int] | None = None):
        super().__init__(message)
        self.missing, self.corrupt = missing or [], corrupt or []


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def split(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    parts: int,
    extras: tuple = (),
    meta: dict | None = None,
) -> dict:
    """Cut ``src`` into ``parts`` near-equal parts under ``dest/p1 .. dest/pN`` (``dest`` is emptied first);
    returns the manifest, also written to ``dest/manifest.json`` and into every part folder. ``extras`` are
    copied into every part folder; ``meta`` is stored in the manifest as is."""
    src, dest = Path(src), Path(dest)
    size = src.stat().st_size
    if parts < 1 or parts > max(size, 1):
        raise ValueError(f"parts={parts}: need 1 <= parts <= the file's size ({size} bytes)")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    step = -(-size // parts)
    manifest = {"format": FORMAT, "file": src.name, "size": size, "sha256": sha256_file(src), "parts": [],
                "extras": {}, "meta": meta or {}}  # fmt: skip
    with open(src, "rb") as f:
        for i in range(1, parts + 1):
            folder = dest / f"p{i}"
            folder.mkdir()
            data = f.read(step)
            name = f"{src.name}.part{i}"
            (folder / name).write_bytes(data)
            manifest["parts"].append(
                {"index": i, "name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
    for extra in map(Path, extras):
        manifest["extras"][extra.name] = {"size": extra.stat().st_size, "sha256": sha256_file(extra)}
    text = json.dumps(manifest, indent=1) + "\n"
    (dest / MANIFEST).write_text(text)
    for i in range(1, parts + 1):
        (dest / f"p{i}" / MANIFEST).write_text(text)
        for extra in map(Path, extras):
            shutil.copy2(extra, dest / f"p{i}" / extra.name)
    return manifest


def _manifests(root: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted([root / MANIFEST, *root.glob(f"p*/{MANIFEST}")]):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("format") == FORMAT:
            found.append((path.parent, record))
    return found


def status(root: str | os.PathLike) -> dict:
    """What of the split file is under ``root``: ``{"file", "sha256", "parts": N, "present": [i..],
    "missing": [i..], "corrupt": [i..], "folders": {i: folder}}``, or ``{"missing_manifest": True}`` when no
    manifest is there. A part is present when a folder holds a file of its name, size and sha256; a file of
    its name that differs is corrupt (a good copy elsewhere under ``root`` wins). When manifests disagree on
    the file (a stale folder from another split), the file most folders name is the one looked for."""
    root = Path(root)
    found = _manifests(root)
    if not found:
        return {"root": str(root), "missing_manifest": True}
    counts: dict[str, int] = {}
    for _, m in found:
        counts[m["sha256"]] = counts.get(m["sha256"], 0) + 1
    sha = max(counts, key=lambda s: counts[s])
    manifest = next(m for _, m in found if m["sha256"] == sha)
    folders = sorted({folder for folder, m in found if m["sha256"] == sha} | {root})
    present, corrupt, where = [], [], {}
    for part in manifest["parts"]:
        i, good, bad = part["index"], None, False
        for folder in folders:
            path = folder / part["name"]
            if not path.is_file():
                continue
            if path.stat().st_size == part["size"] and sha256_file(path) == part["sha256"]:
                good = path
                break
            bad = True
        if good is not None:
            present.append(i)
            where[i] = str(good)
        elif bad:
            corrupt.append(i)
    n = len(manifest["parts"])
    return {"root": str(root), "file": manifest["file"], "size": manifest["size"], "sha256": sha, "parts": n,
            "present": present, "corrupt": corrupt,
            "missing": [i for i in range(1, n + 1) if i not in present and i not in corrupt],
            "paths": where, "manifest": manifest}  # fmt: skip


def describe(st: dict) -> str:
    """One line for :func:`status`'s result."""
    if st.get("missing_manifest"):
        return f"{st['root']}: no manifest (no part carried)"
    line = f"{st['file']}: {len(st['present'])} of {st['parts']} parts present and verified"
    if st["missing"]:
        line += f"; missing: {', '.join(f'p{i}' for i in st['missing'])}"
    if st["corrupt"]:
        line += f"; CORRUPT (size or sha256 differ from the manifest): {', '.join(f'p{i}' for i in st['corrupt'])}"
    return line


def assemble(root: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Reassemble the split file under ``root`` into ``out`` (written to a temporary name, checked, then
    renamed); returns ``out``. An ``out`` that already has the manifest's size and sha256 is kept as is.
    Raises :class:`ShardError` when a part is missing or corrupt, or the whole file's sha256 differs."""
    st = status(root)
    if st.get("missing_manifest"):
        raise ShardError(f"{root}: no {MANIFEST} (no part carried)", missing=[])
    out = Path(out)
    if out.is_file() and out.stat().st_size == st["size"] and sha256_file(out) == st["sha256"]:
        return out
    if st["missing"] or st["corrupt"]:
        raise ShardError(describe(st), missing=st["missing"], corrupt=st["corrupt"])
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for part in st["manifest"]["parts"]:
                data = Path(st["paths"][part["index"]]).read_bytes()
                h.update(data)
                f.write(data)
        if h.hexdigest() != st["sha256"]:
            raise ShardError(f"{st['file']}: the reassembled file's sha256 {h.hexdigest()} is not the manifest's "
                             f"{st['sha256']}", corrupt=[])  # fmt: skip
        os.chmod(tmp, 0o644)  # mkstemp's 0600 otherwise
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def extra_path(root: str | os.PathLike, name: str) -> Path | None:
    """A verified copy of the extra file ``name`` under ``root`` (any part folder), or None."""
    st = status(root)
    want = (st.get("manifest") or {}).get("extras", {}).get(name)
    if want is None:
        return None
    for path in sorted(Path(root).glob(f"p*/{name}")):
        if path.stat().st_size == want["size"] and sha256_file(path) == want["sha256"]:
            return path
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu.shards", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="cut FILE into N parts under DEST/p1..pN")
    s.add_argument("file", type=Path)
    s.add_argument("dest", type=Path)
    s.add_argument("--parts", type=int, required=True)
    s.add_argument(
        "--extra", type=Path, action="append", default=[], help="a file copied into every part folder"
    )
    t = sub.add_parser(
        "status",
        help="which parts under DIR are present and verified: exit 0 all, 1 some missing, 2 one corrupt",
    )
    t.add_argument("dir", type=Path)
    t.add_argument(
        "--partial-ok", action="store_true", help="exit 0 with parts missing (between device calls)"
    )
    a = sub.add_parser("assemble", help="reassemble and verify the file under DIR into OUT")
    a.add_argument("dir", type=Path)
    a.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "split":
        m = split(args.file, args.dest, parts=args.parts, extras=tuple(args.extra))
        for part in m["parts"]:
            print(
                f"{args.dest}/p{part['index']}/{part['name']}: {part['size']} bytes, sha256 {part['sha256']}"
            )
        return 0
    if args.cmd == "status":
        st = status(args.dir)
        print(describe(st))
        if st.get("corrupt"):
            return 2
        return 0 if args.partial_ok or not (st.get("missing_manifest") or st["missing"]) else 1
    try:
        print(f"{assemble(args.dir, args.out)}: sha256 verified")
    except ShardError as e:
        print(f"cannot assemble: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
