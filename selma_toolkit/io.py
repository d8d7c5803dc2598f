"""Atomic writes and resumable JSON-lines files: every stage writes through these.

A long stage must never leave a half-written file behind: each write goes to a temporary file in
the same folder, is flushed to disk, and replaces the target with one rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from selma_toolkit.errors import DatasetError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates files readable by the owner only; give the result the permissions a
        # plain open() would (0666 minus the umask), so a shared dataset folder stays readable.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike[str], *, missing: str) -> Any:
    """Read one JSON document. Errors name the file; ``missing`` is the message (what to do) when
    the file is absent, e.g. "no scores file; run `selma evaluate` first"."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_jsonl(path: str | os.PathLike[str], *, repair_tail: bool = False) -> list[dict[str, Any]]:
    """Read a JSON-lines file: one JSON object a line.

    A malformed line raises :class:`DatasetError` naming the file and line. With ``repair_tail``,
    a malformed *last* line without a trailing newline (the mark of a write cut short by a kill)
    is dropped instead, so a resumed stage continues from the last complete record.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            is_torn_tail = number == len(lines) and not raw.endswith("\n")
            if repair_tail and is_torn_tail:
                break
            raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg}); expected one JSON object a line") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
        records.append(record)
    return records


class JsonlAppender:
    """Append records to a JSON-lines file so that a kill at any point loses at most the record
    being written, and a reader never sees a half record except as a torn last line.

    On open, a torn last line left by an earlier kill is cut off (the file is rewritten atomically
    without it), so appends always start on a fresh line.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                atomic_write_bytes(self.path, raw[: raw.rfind(b"\n") + 1])
        self._handle = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line and fsync it."""
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
