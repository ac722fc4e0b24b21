"""Batch input and output, independent of any model: what to ask, and a crash-safe JSONL result store.

Inputs: a folder of videos (:func:`find_videos`), a manifest in JSONL or CSV (:func:`read_manifest`), and
questions from a text file (:func:`read_questions`); :func:`build_items` turns them into (video, question)
pairs.

Output: :class:`ResultStore` appends one JSON object per line. Every line is written with a single
``os.write`` (with SIGINT blocked) and then ``fsync``'d, so a process killed at any instant leaves complete
lines followed by at most one torn line. Opening the store again detects the torn tail (and any line that is
not a JSON object), removes it, and reports which (video, question, settings) keys are already
answered, so that a re-run redoes exactly the missing items.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from holitom_cli.errors import ConfigError

MANIFEST_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True)
class BatchItem:
    """One question about one video. ``video`` is an absolute path."""

    video: Path
    question: str


# ------------------------------------------------------------------------------------------- inputs


def find_videos(folder: Path, extensions: Iterable[str], recursive: bool = False) -> list[Path]:
    """Video files in ``folder`` (and its sub-folders when ``recursive``), sorted by path, absolute.

    ``extensions`` are lower-case suffixes with the dot (``".mp4"``); matching ignores case. Hidden files
    (name starting with a dot) are skipped.
    """
    exts = {e.lower() for e in extensions}
    pattern = "**/*" if recursive else "*"
    found = [
        p.resolve()
        for p in Path(folder).glob(pattern)
        if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")
    ]
    return sorted(found)


def read_questions(path: Path) -> list[str]:
    """Questions from a text file, one per line; blank lines are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read questions file {path}: {exc.strerror or exc}",
            hint="Pass a UTF-8 text file with one question per line.",
        ) from exc
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise ConfigError(f"questions file {path} is empty", hint="Write one question per line.")
    return questions


def read_manifest(path: Path) -> list[tuple[Path, str | None]]:
    """Rows of a JSONL or CSV manifest as (absolute video path, question or None).

    Each row needs a ``video`` field; ``question`` is optional (then the command line's questions apply).
    Relative video paths are relative to the manifest's folder.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ConfigError(
            f"unsupported manifest format: {path.name}",
            hint="Use a .jsonl or .csv file with 'video' and 'question' columns, or pass a folder of videos.",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc
    rows: list[dict[str, Any]] = []
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path.name} line {lineno} is not valid JSON: {exc.msg}",
                    hint='Each line must be an object such as {"video": "a.mp4", "question": "..."}.',
                ) from exc
            if not isinstance(row, dict):
                raise ConfigError(f"{path.name} line {lineno} is not a JSON object")
            rows.append(row)
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "video" not in reader.fieldnames:
            raise ConfigError(
                f"{path.name} has no 'video' column",
                hint="The first row must name the columns: video,question",
            )
        rows = list(reader)
    base = path.resolve().parent
    out: list[tuple[Path, str | None]] = []
    for n, row in enumerate(rows, start=1):
        video = row.get("video")
        if not isinstance(video, str) or not video.strip():
            raise ConfigError(f"{path.name} row {n} has no 'video' value")
        question = row.get("question")
        if question is not None and not isinstance(question, str):
            raise ConfigError(f"{path.name} row {n}: 'question' must be a string")
        question = question.strip() if question else None
        out.append(((base / video.strip()).resolve(), question or None))
    if not out:
        raise ConfigError(f"manifest {path} has no rows")
    return out


def build_items(rows: Iterable[tuple[Path, str | None]], questions: Iterable[str]) -> list[BatchItem]:
    """(video, question) pairs: each row's own question, plus every extra question for every video.

    Order follows the rows; duplicates are removed. Raises ConfigError when a video ends up with no question.
    """
    extra = [q for q in questions if q.strip()]
    items: dict[tuple[Path, str], None] = {}
    for video, question in rows:
        if question is None and not extra:
            raise ConfigError(
                f"no question for {video.name}",
                hint="Give questions with -q/--question or --questions FILE, or a 'question' column.",
            )
        if question is not None:
            items[(video, question)] = None
        for q in extra:
            items[(video, q.strip())] = None
    return [BatchItem(video, q) for video, q in items]


# ------------------------------------------------------------------------------------------- keys


def settings_hash(settings: dict[str, Any]) -> str:
    """A short stable digest of every setting that changes an answer (16 hex characters)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def record_key(record: dict[str, Any]) -> tuple[str, str, str] | None:
    """The (video path, question, settings hash) key of a stored line, or None if it has none."""
    video = record.get("video")
    path = video.get("path") if isinstance(video, dict) else None
    question = record.get("question")
    digest = record.get("settings_hash")
    if isinstance(path, str) and isinstance(question, str) and isinstance(digest, str):
        return (path, question, digest)
    return None


def item_key(item: BatchItem, digest: str) -> tuple[str, str, str]:
    return (str(item.video), item.question, digest)


def json_safe(value: Any) -> Any:
    """A copy where NaN and infinities become None (strict JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps_line(record: dict[str, Any]) -> str:
    """One strict-JSON line (no trailing newline); never contains a raw newline."""
    return json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


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
    """What opening an existing results file found."""

    records: list[dict[str, Any]] = field(default_factory=list)
    dropped_lines: int = 0  # torn or invalid lines that were removed
    dropped_errors: int = 0  # failed items removed so they are retried


class ResultStore:
    """An append-only JSONL file of results, safe against being killed at any instant.

    Use :meth:`open`, then :meth:`append` one record at a time, then :meth:`close`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.state = StoreState()

    @staticmethod
    def check_writable(path: Path) -> None:
        """Fail early (before loading a model) if ``path`` cannot be created or appended to."""
        path = Path(path)
        if path.exists() and path.is_dir():
            raise ConfigError(
                f"output path {path} is a directory", hint="Pass a file name such as out.jsonl."
            )
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise ConfigError(
                f"output folder {parent} does not exist", hint=f"Create it first: mkdir -p {parent}"
            )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"cannot write to {path}: {exc.strerror or exc}",
                hint="Choose an output file in a folder you can write to.",
            ) from exc
        os.close(fd)

    def open(self, retry_errors: bool = True) -> StoreState:
        """Read what is already stored, repair the file, and open it for appending.

        Lines that are not complete JSON objects (a torn last line after a crash, or damage) are removed.
        With ``retry_errors``, lines recording a failed item are removed too, so those items run again and the
        file keeps one line per item.
        """
        self.check_writable(self.path)
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline (or is empty), else a torn line
        state = StoreState()
        keep: list[bytes] = []
        for line in lines:
            record = _parse(line)
            if record is None:
                if line.strip():
                    state.dropped_lines += 1
                continue
            if retry_errors and record.get("error") is not None:
                state.dropped_errors += 1
                continue
            keep.append(line)
            state.records.append(record)
        if tail:
            state.dropped_lines += 1
        changed = bool(tail) or len(keep) != len(lines)
        if changed:
            if len(keep) == len(lines):
                # Only a torn tail: cutting it off is enough.
                with open(self.path, "r+b") as fh:
                    fh.truncate(len(raw) - len(tail))
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                self._rewrite(keep)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.state = state
        return state

    def _rewrite(self, lines: list[bytes]) -> None:
        """Atomically replace the file with ``lines`` (temporary file, fsync, rename)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def done_keys(self) -> set[tuple[str, str, str]]:
        """Keys of the records already stored."""
        keys = (record_key(r) for r in self.state.records)
        return {k for k in keys if k is not None}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, then flush it to disk."""
        if self._fd is None:
            raise RuntimeError("ResultStore.append() before open()")
        data = (dumps_line(record) + "\n").encode("utf-8")
        with _sigint_blocked():
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        self.state.records.append(record)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
