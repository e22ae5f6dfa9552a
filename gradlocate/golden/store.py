"""One record store for everything resumable: JSON lines, fingerprinted, mergeable.

A study's expensive work (a sweep's layers, the single-edit matrix's cells, a
selector's scores) is written as it finishes, one JSON record per line:

    {"key": "3f2a.../7", "fingerprint": {"model": "1c9e...", "editor": "77d0...", ...}, ...payload}

The **key** says which piece of work a record is (a layer, an (edit, layer) cell ...);
the **fingerprint** is a digest of each part of what determined it (the model, its
weights' checksum included, the edit, the editor and its settings, the metric
definitions ...), one digest per part, so that a record made under other conditions is
refused with an error that says *which* part differs, never silently reused.

Writing is safe for several processes on one file: each record is one ``O_APPEND``
``write`` of one line, flushed to disk (``fsync``). A line cut short (a writer killed
mid-write) is skipped on reading, and its work is simply done again; any other damage is
an error naming the file, the line and the problem. Several files (one shard per process
or machine) are read together: give a folder, or :meth:`RecordStore.merge` the files.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> store = RecordStore(folder / "work.jsonl", {"model": "gpt2", "lr": 1e-3})
    >>> store.append(0, {"score": 0.5})
    >>> store.append(1, {"score": 0.75})
    >>> RecordStore(folder / "work.jsonl", {"model": "gpt2", "lr": 1e-3}).read()[1]["score"]
    0.75
    >>> RecordStore(folder / "work.jsonl", {"model": "gpt2", "lr": 1e-2}).read()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gradlocate.golden.store.StoreError: ...work.jsonl line 1: the record for key 0 was made under other conditions: lr differs...
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union


__all__ = ["RecordStore", "StoreError", "Fingerprint", "digest", "relative_path"]

Key = Union[int, str]


class StoreError(ValueError):
    """A record file cannot be used: the message names the file, the line and the problem
    (damage, or a record made under other conditions and which of them differ)."""


def digest(obj: Any) -> str:
    """A short stable digest of a JSON-able object (keys sorted; other objects by ``str``).

    Example:
        >>> digest({"b": 1, "a": [1, 2]}) == digest({"a": [1, 2], "b": 1})
        True
        >>> len(digest("x"))
        16
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def relative_path(path: str | os.PathLike[str] | None, root: str | os.PathLike[str] | None = None) -> str | None:
    """``path`` relative to ``root`` when it lies under it (default: the working
    directory, else the checkout gradlocate runs from), else as given: paths written into
    records and results must not carry the layout of the machine that ran them.

    Example:
        >>> relative_path(os.path.join(os.getcwd(), "out", "sweep.jsonl"))
        'out/sweep.jsonl'
        >>> relative_path("/elsewhere/sweep.jsonl", "/work")
        '/elsewhere/sweep.jsonl'
    """
    if path is None:
        return None
    p = Path(os.path.abspath(path))
    checkout = Path(__file__).resolve().parents[2]
    roots = [Path(root)] if root is not None else [Path.cwd()] + ([checkout] if (checkout / ".git").exists() else [])
    for base in roots:
        try:
            return p.relative_to(os.path.abspath(base)).as_posix()
        except ValueError:
            continue
    return str(path)


@dataclass(frozen=True)
class Fingerprint:
    """The digest of each part of what determines a record (part name -> digest).

    Example:
        >>> a = Fingerprint.of({"model": "gpt2", "editor": {"lr": 1e-3}})
        >>> b = Fingerprint.of({"model": "gpt2", "editor": {"lr": 1e-2}})
        >>> a.differs(b.parts)
        ['editor']
    """

    parts: Mapping[str, str]

    @classmethod
    def of(cls, inputs: Mapping[str, Any]) -> Fingerprint:
        """Digest each part of ``inputs`` (e.g. ``{"model": ..., "editor": ..., "metrics": ...}``)."""
        if not isinstance(inputs, Mapping) or not inputs:
            raise TypeError(f"a fingerprint is made from a non-empty dict part -> what determines it, got {inputs!r}")
        return cls({str(k): digest(v) for k, v in inputs.items()})

    def differs(self, parts: Any) -> list[str]:
        """The parts on which a record's stored fingerprint ``parts`` differs from this one
        (missing or extra parts included); ``[]`` when they agree."""
        if not isinstance(parts, Mapping):
            return ["fingerprint (not a dict of part digests)"]
        names = sorted(set(self.parts) | set(parts))
        return [n for n in names if self.parts.get(n) != parts.get(n)]


#: What a store checks records against: one fingerprint for all keys, or one per key.
Expected = Union[Fingerprint, Mapping[str, Any], Callable[[Key], Union[Fingerprint, Mapping[str, Any]]], None]


class RecordStore:
    """Records of resumable work in a JSONL file, or a folder of shard files.

    Args:
        path: a ``.jsonl`` file, or a folder (every ``*.jsonl`` in it is read, and this
            process appends to ``<folder>/<shard>.jsonl``).
        fingerprint: what every record must have been made under: the inputs as a dict
            (part -> what determines it), a :class:`Fingerprint`, or a function of the
            key returning either (when a part depends on the key). ``None``: not checked.
        shard: the file name (without ``.jsonl``) this process writes in a folder.
        validate: ``fn(record) -> problem or None``: what the caller requires of a record
            beyond key and fingerprint (a problem is a :class:`StoreError` naming the line).
    """

    def __init__(self, path: str | os.PathLike[str], fingerprint: Expected = None, *, shard: str = "records",
                 validate: Callable[[dict[str, Any]], str | None] | None = None):
        self.path = Path(path)
        self._expected = fingerprint
        self._shard = shard
        self._validate = validate
        # A folder: one that exists, or a new path ending in "/" or without a suffix.
        self.is_folder = self.path.is_dir() or not self.path.exists() and (
            str(path).endswith(("/", os.sep)) or self.path.suffix == "")

    @property
    def target(self) -> Path:
        """The file this process appends to."""
        return self.path / f"{self._shard}.jsonl" if self.is_folder else self.path

    @property
    def files(self) -> list[Path]:
        """The files read: the file, or every ``*.jsonl`` in the folder."""
        if self.is_folder:
            return sorted(self.path.glob("*.jsonl")) if self.path.is_dir() else []
        return [self.path] if self.path.exists() else []

    def expected(self, key: Key) -> Fingerprint | None:
        """The fingerprint a record with ``key`` must carry (``None``: not checked)."""
        e = self._expected(key) if callable(self._expected) else self._expected
        return None if e is None else e if isinstance(e, Fingerprint) else Fingerprint.of(e)

    def read(self) -> dict[Key, dict[str, Any]]:
        """Every record, by key (of duplicate keys the last read wins: the same work, redone)."""
        out: dict[Key, dict[str, Any]] = {}
        for f in self.files:
            for n, rec in _lines(f):
                self._check(f, n, rec)
                out[rec["key"]] = rec
        return out

    @classmethod
    def merge(cls, paths: Iterable[str | os.PathLike[str]], fingerprint: Expected = None) -> dict[Key, dict[str, Any]]:
        """The records of several files (or folders of shards), by key, each checked.

        Example:
            >>> import tempfile, pathlib
            >>> d = pathlib.Path(tempfile.mkdtemp())
            >>> RecordStore(d / "a.jsonl", {"m": 1}).append("x", {"v": 1})
            >>> RecordStore(d / "b.jsonl", {"m": 1}).append("y", {"v": 2})
            >>> sorted(RecordStore.merge([d / "a.jsonl", d / "b.jsonl"], {"m": 1}))
            ['x', 'y']
        """
        out: dict[Key, dict[str, Any]] = {}
        for p in paths:
            out.update(cls(p, fingerprint).read())
        return out

    def append(self, key: Key, payload: Mapping[str, Any]) -> None:
        """Write one record (``key``, the expected fingerprint, ``payload``) as one line."""
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"a record key is an int or a str, got {key!r}")
        clash = {"key", "fingerprint"} & set(payload)
        if clash:
            raise ValueError(f"a record's payload cannot hold {sorted(clash)}: the store writes those")
        fp = self.expected(key)
        rec = {"key": key, "fingerprint": dict(fp.parts) if fp else None, **payload}
        line = json.dumps(rec, default=_jsonable, allow_nan=True) + "\n"
        target = self.target
        if self.is_folder and self.path.parent.exists():
            self.path.mkdir(exist_ok=True)  # a shard folder is made on the first record
        if not target.parent.exists():
            raise FileNotFoundError(f"folder {str(target.parent)!r} for the record file does not exist")
        _append(target, line.encode("utf-8"))

    def _check(self, f: Path, n: int, rec: dict[str, Any]) -> None:
        problem = self._validate(rec) if self._validate is not None else None
        if problem:
            raise StoreError(f"{f} line {n}: {problem}")
        key = rec["key"]
        fp = self.expected(key)
        if fp is None:
            return
        diff = fp.differs(rec.get("fingerprint"))
        if diff:
            raise StoreError(f"{f} line {n}: the record for key {key!r} was made under other conditions: "
                             f"{', '.join(diff)} differs (stale or foreign record); use another file or folder, "
                             f"or delete this one to redo the work")

    def __repr__(self) -> str:
        return f"RecordStore({str(self.path)!r}, {len(self.files)} file(s))"


def _jsonable(x: Any) -> Any:
    # numpy and torch scalars: written as plain numbers
    return x.item() if hasattr(x, "item") else str(x)


def _append(path: Path, data: bytes) -> None:
    """One ``O_APPEND`` write of ``data`` (one whole line), synced to disk, under an
    exclusive ``flock`` so that the repair below never races another writer: a last line
    cut short by a killed writer is cut off first (its record is redone), or closed with a
    newline if it is a whole record."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _repair_tail(fd)
        written = os.write(fd, data)
        if written != len(data):  # a full disk: the cut line is redone on the next read
            raise OSError(f"only {written} of {len(data)} bytes of a record reached {path}")
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def _repair_tail(fd: int) -> None:
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = size
    while start > 0:  # back to the newline before the last line
        chunk = os.pread(fd, min(start, 65536), max(0, start - 65536))
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            start = start - len(chunk) + nl + 1
            break
        start -= len(chunk)
    try:
        json.loads(os.pread(fd, size - start, start))
        os.write(fd, b"\n")  # a whole record that lacks only its newline
    except ValueError:
        os.ftruncate(fd, start)


def _lines(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of one file. A line cut short (a record's JSON ending
    early) is skipped; anything else that is not a record is a :class:`StoreError`."""
    if path.is_dir():
        raise StoreError(f"{path} is a folder, expected a record file (JSON lines)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise StoreError(f"{path} byte {e.start}: not UTF-8 text; expected JSON lines of records") from None
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            # An interrupted write: that record is redone. Normally the last line (a writer
            # cuts it off before appending); inside the file only if an older writer closed it.
            if _cut_short(line, e):
                continue
            raise StoreError(f"{path} line {n}: not a JSON record ({e.msg} at column {e.colno}); "
                             f"expected one JSON object per line") from None
        if not isinstance(rec, dict) or "key" not in rec or "fingerprint" not in rec:
            what = f"a {type(rec).__name__}" if not isinstance(rec, dict) else f"an object without {_missing(rec)}"
            raise StoreError(f"{path} line {n}: {what}, expected a record (a JSON object with 'key' and "
                             f"'fingerprint', written by gradlocate)")
        yield n, rec


def _missing(rec: dict[str, Any]) -> str:
    return " and ".join(repr(k) for k in ("key", "fingerprint") if k not in rec)


def _cut_short(line: str, e: json.JSONDecodeError) -> bool:
    """A record's line that stops early: it starts as a JSON object does, and the error
    is at its end (more text was expected), or inside its last string, number or literal."""
    if line == "{" or not line.startswith('{"') or e.msg.startswith("Extra data"):
        return False
    return e.msg.startswith("Unterminated string") or re.fullmatch(r"[\w.+-]*", line[e.pos:].rstrip()) is not None
