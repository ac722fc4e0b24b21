"""Batch input and output, independent of any model: what to ask, and where the answers go.

Inputs: a folder of videos (:func:`find_videos`), a manifest in JSONL or CSV (:func:`read_manifest`), and
questions from a text file (:func:`read_questions`); :func:`build_items` turns them into (video, question)
pairs. Text files are read as UTF-8 (a UTF-8, UTF-16 or UTF-32 byte-order mark is honoured); anything else
is a :class:`ConfigError` naming the file, the line and the expected encoding. File names that are not UTF-8
are kept as ``surrogateescape`` paths; :func:`path_text` is the text recorded for them (``\\udcXX`` escapes),
the same at write time and at resume time.

Output: :class:`holitom_cli.batch_store.ResultStore` (re-exported here), the locked, append-only JSONL store.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from holitom_cli.batch_store import (  # noqa: F401 - re-exported: the store's historical home
    OutputError,
    ResultStore,
    StoreState,
    display_name,
    dumps_line,
    json_safe,
    record_key,
)
from holitom_cli.errors import ConfigError

MANIFEST_SUFFIXES = (".jsonl", ".csv")
_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


@dataclass(frozen=True)
class BatchItem:
    """One question about one video. ``video`` is an absolute path."""

    video: Path
    question: str


def path_text(path: str | os.PathLike) -> str:
    """The text that stands for ``path`` in the JSONL output and in resume keys (valid UTF-8 always)."""
    return display_name(path)


# ------------------------------------------------------------------------------------------- inputs


def find_videos(folder: Path, extensions: Iterable[str], recursive: bool = False) -> list[Path]:
    """Video files in ``folder`` (and its sub-folders when ``recursive``), sorted by path, absolute.

    ``extensions`` are lower-case suffixes with the dot (``".mp4"``); matching ignores case. Hidden files
    (name starting with a dot) are skipped. Names that are not valid UTF-8 are kept (``surrogateescape``).
    """
    exts = {e.lower() for e in extensions}
    pattern = "**/*" if recursive else "*"
    found = []
    for p in Path(folder).glob(pattern):
        try:
            if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
                found.append(p.resolve())
        except OSError:  # vanished, or a name the system refuses: not a video we can read
            continue
    return sorted(found, key=os.fsencode)


def read_text_file(path: Path, what: str, hint: str) -> str:
    """A text file decoded as UTF-8 (or UTF-16/32 with a byte-order mark); ConfigError naming the line if not.

    ``what`` names the file in messages ("manifest", "questions file").
    """
    path = Path(path)
    name = path_text(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {name}: {exc.strerror or exc}", hint=hint) from exc
    encoding = "utf-8"
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            encoding = codec
            break
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        if encoding.startswith("utf-8"):
            start = exc.start
            line = raw.count(b"\n", 0, start) + 1
            column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
            where = f"line {line}, column {column}: byte 0x{raw[start]:02x}"
            expected = "UTF-8"
        else:
            where = f"byte {exc.start}"
            expected = f"{encoding.upper()} (it starts with a {encoding.upper()} byte-order mark)"
        raise ConfigError(
            f"{what} {name} is not valid {expected} ({where})",
            hint=f"Save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {name} > fixed{path.suffix}",
        ) from exc


def _check_text(value: str, where: str, field_name: str) -> str:
    """Refuse text with lone surrogates (only JSON ``\\ud800`` escapes can make them): not Unicode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{where}: '{field_name}' holds an invalid Unicode character (lone surrogate "
            f"\\u{ord(value[exc.start]):04x})",
            hint="Write questions as valid Unicode text (UTF-8, no \\ud800-\\udfff escapes).",
        ) from None
    return value


def read_questions(path: Path) -> list[str]:
    """Questions from a text file, one per line; blank lines are ignored."""
    text = read_text_file(path, "questions file", "Pass a UTF-8 text file with one question per line.")
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise ConfigError(f"questions file {path_text(path)} is empty", hint="Write one question per line.")
    return questions


def _video_path(base: Path, video: str, where: str) -> Path:
    """A manifest's video value as an absolute path; ``\\udc80``-``\\udcff`` stand for non-UTF-8 bytes."""
    value = video.strip()
    if "\x00" in value:
        raise ConfigError(f"{where}: 'video' holds a NUL character")
    try:
        os.fsencode(value)
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{where}: 'video' holds an invalid Unicode character (lone surrogate "
            f"\\u{ord(value[exc.start]):04x})",
            hint="Write the file name as UTF-8 text (\\udc80-\\udcff escapes stand for bytes that are not).",
        ) from None
    try:
        return (base / value).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{where}: cannot use video path {path_text(value)}: {exc}") from exc


def read_manifest(path: Path) -> list[tuple[Path, str | None]]:
    """Rows of a JSONL or CSV manifest as (absolute video path, question or None).

    Each row needs a ``video`` field; ``question`` is optional (then the command line's questions apply).
    Relative video paths are relative to the manifest's folder.
    """
    path = Path(path)
    name = path_text(path.name)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ConfigError(
            f"unsupported manifest format: {name}",
            hint="Use a .jsonl or .csv file with 'video' and 'question' columns, or pass a folder of videos.",
        )
    text = read_text_file(path, "manifest", "Pass a UTF-8 .jsonl or .csv file.")
    rows: list[tuple[str, dict[str, Any]]] = []
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise ConfigError(
                    f"{name} line {lineno} is not valid JSON: {why}",
                    hint='Each line must be an object such as {"video": "a.mp4", "question": "..."}.',
                ) from exc
            if not isinstance(row, dict):
                raise ConfigError(f"{name} line {lineno} is not a JSON object")
            rows.append((f"{name} line {lineno}", row))
    else:
        try:
            reader = csv.DictReader(text.splitlines())
            if not reader.fieldnames or "video" not in reader.fieldnames:
                raise ConfigError(
                    f"{name} has no 'video' column",
                    hint="The first row must name the columns: video,question",
                )
            rows = [(f"{name} line {reader.line_num}", row) for row in reader]
        except csv.Error as exc:
            raise ConfigError(f"{name} line {reader.line_num} is not valid CSV: {exc}") from exc
    base = path.resolve().parent
    out: list[tuple[Path, str | None]] = []
    for where, row in rows:
        video = row.get("video")
        if not isinstance(video, str) or not video.strip():
            raise ConfigError(f"{where} has no 'video' value")
        question = row.get("question")
        if question is not None and not isinstance(question, str):
            raise ConfigError(f"{where}: 'question' must be a string")
        question = _check_text(question.strip(), where, "question") if question else None
        out.append((_video_path(base, video, where), question or None))
    if not out:
        raise ConfigError(f"manifest {path_text(path)} has no rows")
    return out


def build_items(rows: Iterable[tuple[Path, str | None]], questions: Iterable[str]) -> list[BatchItem]:
    """(video, question) pairs: each row's own question, plus every extra question for every video.

    Order follows the rows; duplicates are removed. Raises ConfigError when a video ends up with no question.
    """
    extra = [_check_text(q, "question", "--question") for q in questions if q.strip()]
    items: dict[tuple[Path, str], None] = {}
    for video, question in rows:
        if question is None and not extra:
            raise ConfigError(
                f"no question for {path_text(video.name)}",
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


def item_key(item: BatchItem, digest: str) -> tuple[str, str, str]:
    """The key of an item, comparable with :func:`record_key` of its stored line."""
    return (path_text(item.video), item.question, digest)


