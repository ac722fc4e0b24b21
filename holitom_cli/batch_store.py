"""The batch output file: an append-only, locked, crash-safe JSONL store of results (issue 9).

Promises (docs/reliability.md):

* **Only our own file.** :meth:`ResultStore.open` writes to a path only if it does not exist, is empty, or its
  first complete line is a batch record (:func:`is_batch_record`: ``schema_version``, ``question``,
  ``video.path``, ``settings_hash``, ``error``), or it holds nothing but the torn first line of one. Anything
  else (a video, a CSV, a README, another program's JSONL, an ``ask --json`` answer) is refused untouched,
  and so is a path that is the same file as one of the inputs.
* **Never a complete line deleted.** The only repair is of the last line when it has no newline: a complete
  record is completed with its newline, anything else is cut off with ``os.ftruncate`` in place (the inode
  never changes; no temporary file is ever made). Damaged lines elsewhere are left as they are and skipped.
  A retried item gets a new line; the last line of an item is the one that counts.
* **One writer.** The file is held with ``fcntl.flock(LOCK_EX | LOCK_NB)`` on its own descriptor for the whole
  run (no lock file); a second run fails at once, naming the first one's pid (read from ``/proc/locks``).
* **Every line whole.** Each line is one ``os.write`` loop plus ``fsync`` with SIGINT blocked; if the write
  or the fsync fails (ENOSPC, EIO, ...), the file is cut back to its last complete line and
  :class:`OutputError` says what happened.
* **Regular files only.** ``-``, FIFOs, devices (``/dev/stdout``, ``/dev/null``), sockets and pipes
  (``/dev/fd/63``) are refused before anything is opened for writing (and the open is non-blocking).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from holitom_cli.errors import HolitomError

try:  # pragma: no cover - always there on Linux and macOS
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking
    fcntl = None  # type: ignore[assignment]

#: How the first line of every record starts (``schema_version`` is always the first key).
RECORD_PREFIX = b'{"schema_version": '
_FIRST_LINE_LIMIT = 64 * 1024 * 1024  # a first line longer than this is not one of ours
_NOT_OURS_HINT = (
    "batch -o only appends to a file it wrote itself (or an empty one): choose a new file name, "
    "such as answers.jsonl."
)
_STREAM_HINT = "Write to a regular file, then cat it: holitom batch ... -o answers.jsonl && cat answers.jsonl"


class OutputError(HolitomError):
    """The output file cannot be used or written (refused, locked, disk full, I/O error)."""


def display_name(path: str | os.PathLike) -> str:
    """``path`` as valid UTF-8 text, bytes that are not UTF-8 shown as ``\\udcXX`` (for JSON and messages)."""
    text = os.fsdecode(path) if not isinstance(path, str) else path
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ------------------------------------------------------------------------------------------- records


def is_batch_record(record: Any) -> bool:
    """Whether a parsed line has the shape of a line written by ``holitom batch``."""
    if not isinstance(record, dict):
        return False
    video = record.get("video")
    version = record.get("schema_version")
    return (
        isinstance(version, int)
        and not isinstance(version, bool)
        and isinstance(record.get("question"), str)
        and isinstance(video, dict)
        and isinstance(video.get("path"), str)
        and isinstance(record.get("settings_hash"), str)
        and "error" in record
    )


def record_key(record: dict[str, Any]) -> tuple[str, str, str] | None:
    """The (video path, question, settings hash) key of a stored line, or None if it has none."""
    video = record.get("video")
    path = video.get("path") if isinstance(video, dict) else None
    question = record.get("question")
    digest = record.get("settings_hash")
    if isinstance(path, str) and isinstance(question, str) and isinstance(digest, str):
        return (path, question, digest)
    return None


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def json_safe(value: Any) -> Any:
    """A copy fit for strict UTF-8 JSON: NaN and infinities become None, and strings holding surrogates
    (file names that are not UTF-8, decoded with ``surrogateescape``) get ``\\udcXX`` escapes instead."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return display_name(value)
    if isinstance(value, dict):
        return {display_name(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps_line(record: dict[str, Any]) -> str:
    """One strict-JSON line (no trailing newline); never contains a raw newline; always encodes to UTF-8."""
    return json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


# ------------------------------------------------------------------------------------------- checks


def _os_message(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower() if exc.errno else str(exc)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(
            f"cannot use {display_name(path)} as output: {_os_message(exc)}",
            hint="Choose a shorter file name in a folder you can write to."
            if exc.errno == errno.ENAMETOOLONG
            else "Choose an output file in a folder you can write to.",
        ) from exc


def check_output_path(path: Path, inputs: Iterable[Path] = ()) -> None:
    """Refusals that need no open: ``-``, a folder, a non-regular file, a missing folder, an input file.

    Nothing is created or changed. ``inputs`` are the files the run reads (videos, manifest, questions).
    """
    path = Path(path)
    name = display_name(path)
    if str(path) == "-":
        raise OutputError("batch cannot write to standard output (-o -)", hint=_STREAM_HINT)
    st = _stat(path)
    if st is None:
        parent = path.parent
        parent_st = _stat(parent)
        if parent_st is None or not stat.S_ISDIR(parent_st.st_mode):
            raise OutputError(
                f"output folder {display_name(parent)} does not exist",
                hint=f"Create it first: mkdir -p {display_name(parent)}",
            )
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output path {name} is a directory", hint="Pass a file name such as out.jsonl.")
    if not stat.S_ISREG(st.st_mode):
        kind = "a pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a device" if (
            stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        ) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file"
        raise OutputError(f"output {name} is {kind}, not a regular file", hint=_STREAM_HINT)
    for item in inputs:
        try:
            other = os.stat(item)
        except (OSError, ValueError):
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            raise OutputError(
                f"output {name} is the same file as the input {display_name(item)}",
                hint="Choose a new output file, such as answers.jsonl.",
            )


def lock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file of ``fd``, from ``/proc/locks`` (Linux); None if unknown."""
    st = os.fstat(fd)
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.readlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "N: -> FLOCK ..." lines are waiters
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted and int(fields[4]) > 0:
                return int(fields[4])
        except ValueError:
            continue
    return None


# ------------------------------------------------------------------------------------------- store


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT while a line is written so a Ctrl-C cannot land between two partial writes."""
    if hasattr(signal, "pthread_sigmask"):
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    else:  # pragma: no cover - Windows
        yield


@dataclass
class StoreState:
    """What opening an existing results file found (and the one repair it made)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    dropped_lines: int = 0  # a torn last line cut off (0 or 1)
    completed_lines: int = 0  # a complete last record that only lacked its newline (0 or 1)
    invalid_lines: int = 0  # damaged lines before the end: left in place, skipped
    failed_before: int = 0  # items whose last line is an error (retried when retry_errors)


class ResultStore:
    """An append-only JSONL file of results, locked for one run and safe against being killed at any instant.

    Use :meth:`open`, then :meth:`append` one record at a time, then :meth:`close` (or ``with``).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = display_name(self.path)
        self._fd: int | None = None
        self._retry_errors = True
        self.state = StoreState()

    @staticmethod
    def check_writable(path: Path, inputs: Iterable[Path] = ()) -> None:
        """Fail early if ``path`` cannot be an output (see :func:`check_output_path`); changes nothing."""
        check_output_path(path, inputs)

    # -- open

    def open(self, retry_errors: bool = True, inputs: Iterable[Path] = ()) -> StoreState:
        """Check and lock the file, read what it holds, repair a torn last line, and get ready to append.

        With ``retry_errors``, items whose last line is an error are not counted as done (so they run again
        and get a new line). Raises :class:`OutputError` (file untouched) when the path is refused or locked.
        """
        inputs = list(inputs)
        check_output_path(self.path, inputs)
        fd = self._open_locked()
        try:
            raw = self._read_all(fd)
            state = self._recognise_and_repair(fd, raw)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._retry_errors = retry_errors
        self.state = state
        return state

    def _open_locked(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
        flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
        for _ in range(5):
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                raise OutputError(
                    f"cannot write to {self.name}: {_os_message(exc)}",
                    hint="Choose a shorter file name in a folder you can write to."
                    if exc.errno == errno.ENAMETOOLONG
                    else "Choose an output file in a folder you can write to.",
                ) from exc
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OutputError(f"output {self.name} is not a regular file", hint=_STREAM_HINT)
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        pid = lock_holder(fd)
                        who = f" (pid {pid})" if pid else ""
                        raise OutputError(
                            f"{self.name} is being written by another holitom batch{who}",
                            hint="Wait for that run to finish (or stop it), or choose another -o file.",
                        ) from None
                try:
                    now = os.stat(self.path)
                except OSError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # replaced between open and lock: try the new file
        raise OutputError(
            f"{self.name} keeps being replaced by another program", hint="Choose another -o file."
        )

    def _read_all(self, fd: int) -> bytes:
        """The file's bytes; stops after the first line when that line cannot be one of ours."""
        chunks: list[bytes] = []
        size = 0
        first_line_seen = False
        while True:
            chunk = os.pread(fd, 1 << 20, size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if not first_line_seen:
                head = b"".join(chunks)
                newline = head.find(b"\n")
                if newline >= 0:
                    first_line_seen = True
                    first = head[:newline]
                    if not is_batch_record(_parse(first)):
                        return head  # not ours: no need to read the rest
                elif size > _FIRST_LINE_LIMIT:
                    return head
        return b"".join(chunks)

    def _refuse(self, why: str) -> OutputError:
        return OutputError(f"{self.name} is not a holitom batch output file ({why}); refusing to touch it",
                           hint=_NOT_OURS_HINT)  # fmt: skip

    def _recognise_and_repair(self, fd: int, raw: bytes) -> StoreState:
        state = StoreState()
        if not raw:
            return state
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline, else its last, unfinished line
        if lines:
            if not is_batch_record(_parse(lines[0])):
                raise self._refuse("its first line is not a batch record")
        elif not tail.startswith(RECORD_PREFIX):
            raise self._refuse("it holds no complete line and does not start like a batch record")
        last: dict[tuple[str, str, str], dict[str, Any]] = {}
        for line in lines:
            record = _parse(line)
            if record is None or not is_batch_record(record):
                state.invalid_lines += 1
                continue
            state.records.append(record)
            key = record_key(record)
            if key is not None:
                last[key] = record
        if tail:
            record = _parse(tail)
            with _sigint_blocked():
                if record is not None and is_batch_record(record):
                    _write_all(fd, b"\n")  # the record is whole: only its newline is missing
                    state.completed_lines = 1
                    state.records.append(record)
                    key = record_key(record)
                    if key is not None:
                        last[key] = record
                else:
                    os.ftruncate(fd, len(raw) - len(tail))  # in place: same inode, nothing else moves
                    state.dropped_lines = 1
                os.fsync(fd)
        state.failed_before = sum(1 for r in last.values() if r.get("error") is not None)
        return state

    # -- use

    def done_keys(self) -> set[tuple[str, str, str]]:
        """Keys of the items already answered (with ``retry_errors=False`` at open: failed ones too)."""
        done: set[tuple[str, str, str]] = set()
        for record in self.state.records:
            key = record_key(record)
            if key is not None and (record.get("error") is None or not self._retry_errors):
                done.add(key)
        return done

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, then flush it to disk; on failure, cut the file back and raise."""
        if self._fd is None:
            raise RuntimeError("ResultStore.append() before open()")
        if "schema_version" in record and next(iter(record)) != "schema_version":
            record = {"schema_version": record["schema_version"], **record}
        data = (dumps_line(record) + "\n").encode("utf-8")
        fd = self._fd
        with _sigint_blocked():
            start = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                except OSError:
                    pass
                raise self._write_error(exc) from exc
        self.state.records.append(record)

    def _write_error(self, exc: OSError) -> OutputError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
            hint = "Free some space (or pass another -o), then run the same command again to continue."
        elif exc.errno == errno.EIO:
            what = "input/output error"
            hint = "The disk or network share failed; check it, then run the same command again to continue."
        else:
            what = _os_message(exc)
            hint = "Fix the cause, then run the same command again: answered items are kept."
        return OutputError(f"{what} writing {self.name}", hint=hint)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the lock
            self._fd = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - a regular file never does this without an error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


__all__ = [
    "OutputError",
    "RECORD_PREFIX",
    "ResultStore",
    "StoreState",
    "check_output_path",
    "display_name",
    "dumps_line",
    "json_safe",
    "is_batch_record",
    "lock_holder",
    "record_key",
]
