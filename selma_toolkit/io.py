"""Atomic writes, resumable JSON-lines files, output checks and the run-folder lock: every stage
writes through these.

A long stage must never leave a half-written file behind: each write goes to a temporary file in
the same folder, is flushed to disk, and replaces the target with one rename. Two processes must
never write one run folder at once: :func:`folder_lock` refuses the second.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any, BinaryIO

from selma_toolkit.errors import DatasetError, DiskFullError, FolderLockedError, Option, OutputError, Remedy

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    with atomic_file(path) as tmp, open(tmp, mode) as handle:
        yield handle
        handle.flush()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write by name; on success it is fsynced and renamed over
    ``path``, on any exception removed (``path`` is left as it was). For writers that open the file
    themselves, such as safetensors' ``save_file`` (which writes tensors from their own memory where
    ``save`` would build the whole file as bytes first); :func:`atomic_open` for a handle."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise disk_full_error(path, exc) from None
        raise
    try:
        # mkstemp creates files readable by the owner only; give the result the permissions a
        # plain open() would (0666 minus the umask), so a shared dataset folder stays readable.
        os.fchmod(fd, 0o666 & ~_umask())
        yield Path(tmp)
        os.fsync(fd)  # the same file as the writer's own descriptor: its data reaches the disk
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL and not isinstance(exc, DiskFullError):
            raise disk_full_error(path, exc) from None
        raise


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(path: Path, exc: OSError, kept: str = "nothing was written over it") -> DiskFullError:
    """The one-line error for a write to ``path`` that ran out of space (an OSError too); ``kept``
    says what of the file is left."""
    import shutil

    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    error = DiskFullError(
        what=f"{exc.strerror or 'no space left on device'} while writing it ({free} in {path.parent}); {kept}",
        where=str(path),
        remedies=[Remedy.do("free some space, then run the command again"), Remedy.change("out", "folder")],
    )
    error.errno, error.strerror = exc.errno, exc.strerror
    return error


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
            raise DatasetError(
                f"{path}:{number}: not valid JSON ({exc.msg}); expected one JSON object a line"
            ) from None
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
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open until close(), as a file object is

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line and fsync it (a full disk: :class:`DiskFullError`; the
        records before it stay, and a torn line is cut off when the file is opened again)."""
        try:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise disk_full_error(self.path, exc, "the records before this one are kept") from None
            raise

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- output checks


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) when it is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_folder(path: str | os.PathLike[str], option: str = "out") -> Path:
    """Check, without creating anything, that ``path`` is or can become a folder this process can
    write; raise :class:`OutputError` naming the path (the value of ``option``), what is in the way
    and what to do."""
    path = Path(path)
    if _file_in_the_way(path) == path:
        raise OutputError(
            what="an existing file",
            where=Option(option),
            found=path,
            expected="a folder (or a path that does not exist yet)",
            remedies=[Remedy.change(option, "folder"), Remedy.do("move the file away")],
        )
    _check_creatable(path, path, option)
    return path


def check_output_file(path: str | os.PathLike[str], option: str = "out") -> Path:
    """Check, without creating anything, that a file can be written at ``path`` (atomically, beside
    it); raise :class:`OutputError` when ``path`` is a folder or its folder cannot be made or written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            what="an existing folder",
            where=Option(option),
            found=path,
            expected=f"a file name such as {path / 'merged.safetensors'}",
        )
    _check_creatable(path.parent, path, option)
    return path


def _check_creatable(folder: Path, target: Path, option: str) -> None:
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        raise OutputError(
            what=f"cannot be created because {blocker} is a file, not a folder",
            where=str(target),
            remedies=[Remedy.change(option, "path")],
        )
    nearest = _nearest_existing(folder)
    # os.access also answers "no" on a read-only file system, for root too (root ignores mode bits).
    if not os.access(nearest, os.W_OK | os.X_OK):
        where = "" if nearest == target else f" (its nearest existing folder {nearest})"
        raise OutputError(
            what=f"cannot write here{where}: permission denied or a read-only file system",
            where=str(target),
            remedies=[Remedy.change(option, "folder you can write"), Remedy.do("change its permissions")],
        )


# ------------------------------------------------------------------------------ folder lock

LOCK_NAME = ".selma.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], command: str) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) while the block runs; yield the lock file.

    A second holder, in this or any other process, is refused at once with
    :class:`FolderLockedError` naming the folder and the holder (pid, host, command, start time).

    The lock is the operating system's (``fcntl.flock`` on ``folder/.selma.lock``), not the lock
    file's existence: the kernel drops it when the holding process ends in any way, kill -9, OOM
    kill and power loss included, so a dead run never leaves a lock that blocks the next one. (A
    lock that is a file's existence stays until someone deletes it by hand, and a "pid still
    alive?" test cannot tell a reused pid or another host's process.) The file's contents only say
    who holds it: a clean release empties it, so a record found on taking the lock was left by a
    holder that was killed, and is logged as taken over.
    """
    import socket
    from datetime import datetime

    try:
        import fcntl
    except ImportError:  # Windows: no flock; `selma run` works there, unguarded
        fcntl = None  # type: ignore[assignment]

    folder = check_output_folder(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(
            what=f"cannot write in this run folder ({exc.strerror})",
            where=str(folder),
            remedies=[Remedy.change("out", "folder you can write")],
        ) from None
    try:
        locked = False
        try:
            if fcntl is None:
                raise OSError(0, "no fcntl.flock on this system")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise FolderLockedError(
                what=f"this run folder is in use by another process ({_describe(_read_record(fd))}); two runs on one "
                "folder would write the same files",
                where=str(folder),
                remedies=[
                    Remedy.do(
                        "wait for it to finish or stop it, then run again (the lock ends with that process, "
                        "even if it is killed)"
                    ),
                    Remedy.change("out", "folder"),
                ],
            ) from None
        except OSError as exc:  # a file system without locks (some network or FUSE mounts), or Windows
            log.warning("%s: cannot lock this folder (%s); nothing stops a second run on it", folder, exc.strerror)
        previous = _read_record(fd)
        if previous is not None and locked:
            log.warning(
                "%s: taking over the lock left by a process that ended without releasing it (%s), "
                "killed or crashed; its partial outputs are resumed",
                folder,
                _describe(previous),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        os.fsync(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _read_record(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": raw[:80].decode("utf-8", "replace")}
    return record if isinstance(record, dict) else {"unreadable": str(record)[:80]}


def _describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "holder still starting: pid not written yet"
    if "unreadable" in record:
        return f"holder record unreadable: {record['unreadable']!r}"
    return (
        f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, `{record.get('command', '?')}` "
        f"started {record.get('started', '?')}"
    )
