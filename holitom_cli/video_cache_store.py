"""The video cache on disk: the file format of one entry, and the folder of entries (see docs/cache.md).

:class:`VideoCache` keeps one file per entry in ``root/videos`` (marked as ours by a ``CACHEDIR.TAG``),
writes them atomically (a temp file in the same folder, fsync, ``os.replace``: a reader never sees half a
file), touches an entry's mtime when it is used and evicts the least recently used entries beyond its cap.
Processes may share the folder: a file vanishing under a reader or an eviction is a miss, nothing more.

An entry, ``<key digest>.hvc``::

    MAGIC (20 bytes) | manifest length (8 bytes, little endian) | manifest BLAKE2b (32 bytes)
    | manifest (UTF-8 JSON) | payload

The payload is a safetensors file holding every tensor of the prepared video (features, saliency, suffix,
aligned and layout tensors); the manifest (checksummed itself) holds the cache key, the payload's size and
BLAKE2b checksum, each
tensor's dtype and shape, and the rest of the prepared video as plain JSON (grid, unit times, frame indices,
the video's metadata, ...). Reading never runs code from the file: JSON and safetensors only, no pickle.
Anything that does not check out (magic, lengths, JSON, key, checksum, tensor names, dtypes, shapes) raises
:class:`EntryError`, which the cache treats as a miss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from holitom_cli.errors import ConfigError

#: The default cap on the cache's size: 10 GB. A 32-frame video is about 11 MB at LLaVA-OV-0.5B in
#: bfloat16 (about 900 videos fit), 45 MB at 7B; float32 (CPUs without bfloat16) doubles that.
DEFAULT_MAX_BYTES = 10 * 1000**3
SUFFIX = ".hvc"
MARKER = "CACHEDIR.TAG"
_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"  # the cache directory tag standard's
_MARKER_TEXT = (
    f"{_SIGNATURE}\n# This file marks a holitom video cache folder (see holitom's docs/cache.md).\n"
    "# Backup tools that honour cache directory tags skip it: https://bford.info/cachedir/\n"
)
_ENTRY = re.compile(r"[0-9a-f]{40}" + re.escape(SUFFIX))
_TEMP_PREFIX = ".tmp-"
STALE_TEMP_S = 3600  # a temp file this old belongs to a writer that died: eviction removes it

#: Bumped whenever the layout or the meaning of an entry changes: older entries then miss.
FORMAT_VERSION = 1
MAGIC = b"HOLITOM-VIDEO-CACHE\n"
_LENGTH = struct.Struct("<Q")
_DIGEST = 32  # bytes of a BLAKE2b digest
_HEAD = len(MAGIC) + _LENGTH.size + _DIGEST
#: A manifest is a few KB (unit times, frame indices); anything larger is not one of ours.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


class EntryError(Exception):
    """A cache file that is truncated, corrupt, foreign or written for another key."""


def warning(text: str) -> None:
    """One ``Warning: ...`` line on stderr."""
    sys.stderr.write(f"Warning: {text}\n")
    sys.stderr.flush()


def key_digest(key: dict[str, Any]) -> str:
    """The entry's file name: a hash of the canonical JSON of its key."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=20).hexdigest()


def payload_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=_DIGEST).hexdigest()


# ----------------------------------------------------------------------------------------------- values


def _encode(value: Any, name: str, tensors: dict[str, Any]) -> Any:
    """A JSON-able form of ``value``; tensors go to ``tensors`` and are referenced by name."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        return {"$tensor": name}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise EntryError(f"{name}: only string keys can be stored")
        return {"$dict": {k: _encode(v, f"{name}.{k}", tensors) for k, v in value.items()}}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{name}[{i}]", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}[{i}]", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise EntryError(f"{name}: a {type(value).__name__} cannot be stored")


def _decode(value: Any, tensors: dict[str, Any], used: set[str]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$tensor"} and isinstance(value["$tensor"], str):
            name = value["$tensor"]
            if name not in tensors or name in used:
                raise EntryError(f"the manifest refers to a missing tensor {name!r}")
            used.add(name)
            return tensors[name]
        if set(value) == {"$dict"} and isinstance(value["$dict"], dict):
            return {k: _decode(v, tensors, used) for k, v in value["$dict"].items()}
        if set(value) == {"$tuple"} and isinstance(value["$tuple"], list):
            return tuple(_decode(v, tensors, used) for v in value["$tuple"])
        raise EntryError("unknown object in the manifest")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise EntryError("unknown value in the manifest")


def _tensor_spec(tensor: Any) -> dict[str, Any]:
    return {"dtype": str(tensor.dtype).replace("torch.", ""), "shape": list(tensor.shape)}


# ----------------------------------------------------------------------------------------------- write


def encode_entry(key: dict[str, Any], tokens: Any, clip: dict[str, Any], info: dict[str, Any]) -> bytes:
    """The bytes of an entry for ``key``: the VisualTokens ``tokens`` (every dataclass field), ``clip``
    (indices, timestamps, meta, sampling: JSON) and ``info`` (model name, vision FLOPs, ... : JSON)."""
    from safetensors.torch import save

    tensors: dict[str, Any] = {}
    fields = {f.name: _encode(getattr(tokens, f.name), f.name, tensors) for f in dataclasses.fields(tokens)}
    payload = save(tensors) if tensors else b""
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "payload": {"size": len(payload), "blake2b": payload_digest(payload)},
        "tensors": {name: _tensor_spec(t) for name, t in tensors.items()},
        "tokens": fields,
        "clip": clip,
        "info": info,
    }
    return assemble(manifest, payload)


def assemble(manifest: dict[str, Any], payload: bytes) -> bytes:
    """The bytes of an entry file: the header, the manifest and its checksum, the payload."""
    text = json.dumps(manifest, sort_keys=True, allow_nan=False).encode("utf-8")
    digest = hashlib.blake2b(text, digest_size=_DIGEST).digest()
    return MAGIC + _LENGTH.pack(len(text)) + digest + text + payload


# ----------------------------------------------------------------------------------------------- read


def read_manifest(handle: BinaryIO, file_size: int) -> dict[str, Any]:
    """The manifest at the start of an open entry file (the payload is not read)."""
    head = handle.read(_HEAD)
    if len(head) < _HEAD or not head.startswith(MAGIC):
        raise EntryError("not a holitom video-cache file")
    (length,) = _LENGTH.unpack(head[len(MAGIC) : len(MAGIC) + _LENGTH.size])
    if length > MAX_MANIFEST_BYTES or _HEAD + length > file_size:
        raise EntryError("the manifest is truncated or too large")
    text = handle.read(length)
    if len(text) != length:
        raise EntryError("the manifest is truncated")
    if hashlib.blake2b(text, digest_size=_DIGEST).digest() != head[-_DIGEST:]:
        raise EntryError("the manifest does not match its checksum")
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EntryError(f"the manifest is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise EntryError("an entry of another format version")
    for name, kind in (("key", dict), ("payload", dict), ("tensors", dict), ("tokens", dict), ("clip", dict)):
        if not isinstance(manifest.get(name), kind):
            raise EntryError(f"the manifest has no {name}")
    return manifest


def read_entry(
    handle: BinaryIO, file_size: int, key: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(manifest, fields)`` of an entry written for ``key``: ``fields`` are the VisualTokens fields with
    their tensors on the CPU, each checked against the checksum and the manifest's dtype and shape."""
    from safetensors.torch import load

    manifest = read_manifest(handle, file_size)
    if manifest["key"] != key:
        raise EntryError("an entry written for another key")
    expected = manifest["payload"]
    size = expected.get("size")
    if not isinstance(size, int) or handle.tell() + size != file_size:
        raise EntryError("the payload is truncated or has extra bytes")
    payload = handle.read(size)
    if len(payload) != size or payload_digest(payload) != expected.get("blake2b"):
        raise EntryError("the payload does not match its checksum")
    try:
        tensors = load(payload) if payload else {}
    except Exception as exc:  # SafetensorError and friends: a damaged payload
        raise EntryError(f"the tensors do not load ({exc})") from None
    specs = manifest["tensors"]
    if set(tensors) != set(specs):
        raise EntryError("the tensors differ from the manifest's list")
    for name, tensor in tensors.items():
        if _tensor_spec(tensor) != specs[name]:
            raise EntryError(f"tensor {name!r} differs from the manifest (dtype or shape)")
    used: set[str] = set()
    fields = {name: _decode(value, tensors, used) for name, value in manifest["tokens"].items()}
    if used != set(tensors):
        raise EntryError("the payload holds tensors the manifest does not use")
    return manifest, fields


# ----------------------------------------------------------------------------------------------- the folder


@dataclass(frozen=True)
class CacheEntry:
    """One entry file: its size, last use (mtime) and manifest (None when it cannot be read)."""

    path: Path
    size: int
    last_used: float
    manifest: dict[str, Any] | None = None


class VideoCache:
    """Entries in ``root/videos``, at most ``max_bytes`` in all (least recently used evicted first)."""

    def __init__(
        self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES, warn: Callable[[str], None] | None = warning
    ):
        self.root = Path(root)
        self.folder = self.root / "videos"
        self.max_bytes = int(max_bytes)
        self.warn = warn or (lambda text: None)

    # ------------------------------------------------------------------------- folder

    def is_ours(self) -> bool:
        try:
            with open(self.folder / MARKER, encoding="utf-8", errors="replace") as handle:
                text = handle.read(4096)
        except OSError:
            return False
        return text.startswith(_SIGNATURE) and "holitom" in text

    def check_ours(self) -> None:
        """ConfigError when the folder exists, is not empty and has no holitom marker (not ours)."""
        if self.folder.exists() and not self.is_ours():
            try:
                empty = self.folder.is_dir() and not any(os.scandir(self.folder))
            except OSError:
                empty = False
            if not empty:
                raise ConfigError(
                    f"{self.folder} is not a holitom video cache folder (no {MARKER} written by holitom)",
                    hint="point --cache-dir or HOLITOM_CACHE at a folder of its own",
                )

    def ensure(self) -> None:
        """Create the folder and its marker; ConfigError when it is not ours or cannot be written."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.check_ours()
            if not self.is_ours():
                (self.folder / MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot use {self.folder} as the video cache ({exc.strerror or exc})",
                hint="check the path and its permissions, or set --cache-dir / HOLITOM_CACHE",
            ) from None
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise ConfigError(
                f"the video cache folder {self.folder} is not writable", hint="check its permissions"
            )

    def entry_path(self, key: dict[str, Any]) -> Path:
        return self.folder / f"{key_digest(key)}{SUFFIX}"

    def entries(self, manifests: bool = False) -> list[CacheEntry]:
        """Our entry files, least recently used first (files vanishing meanwhile are skipped)."""
        found = []
        try:
            items = list(os.scandir(self.folder))
        except OSError:
            return []
        for item in items:
            if not _ENTRY.fullmatch(item.name):
                continue
            try:
                info = item.stat(follow_symlinks=False)
            except OSError:
                continue
            manifest = _manifest_of(Path(item.path)) if manifests else None
            found.append(CacheEntry(Path(item.path), info.st_size, info.st_mtime, manifest))
        found.sort(key=lambda e: e.last_used)
        return found

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    # ------------------------------------------------------------------------- read / write

    def load(self, key: dict[str, Any], build: Callable[[dict, dict], Any]) -> Any:
        """``build(manifest, fields)`` of the entry for ``key``, or None on a miss. An entry that does not
        check out (or that ``build`` refuses) is dropped with one warning line; it is never used."""
        path = self.entry_path(key)
        try:
            with _open_entry(path) as handle:
                info = os.fstat(handle.fileno())
                try:
                    if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
                        raise EntryError("not a regular file")
                    value = build(*read_entry(handle, info.st_size, key))
                except Exception as exc:  # EntryError, OSError, a refused field: all mean "do not trust it"
                    self._drop(path, info, exc)
                    return None
        except OSError:  # not there (or gone): a plain miss
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # last use, for the LRU order
        return value

    def store(self, key: dict[str, Any], data: bytes) -> bool:
        """Write an entry atomically, then evict down to the cap. False when not stored (too big for the cap,
        or the write failed: one warning line)."""
        if len(data) > self.max_bytes:
            return False
        path = self.entry_path(key)
        temp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".part", dir=self.folder)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
            temp = None
            _fsync_folder(self.folder)
        except OSError as exc:
            self.warn(f"could not write to the video cache in {self.folder} ({exc.strerror or exc})")
            return False
        finally:
            if temp is not None:
                _remove(Path(temp))
        self.evict(keep=path)
        return True

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until the total is within the cap (``keep`` last of all), and
        temp files of writers that died. Returns the entries removed."""
        now = time.time()
        try:
            for item in os.scandir(self.folder):
                if item.name.startswith(_TEMP_PREFIX) and now - item.stat().st_mtime > STALE_TEMP_S:
                    _remove(Path(item.path))
        except OSError:
            pass
        entries = self.entries()
        total, removed = sum(e.size for e in entries), 0
        for entry in sorted(entries, key=lambda e: (e.path == keep, e.last_used)):
            if total <= self.max_bytes:
                break
            if _remove(entry.path):
                removed += 1
            total -= entry.size
        return removed

    def clear(self) -> tuple[int, int]:
        """Remove every entry (our entry files only, nothing else in the folder): (entries, bytes) removed."""
        self.check_ours()
        count = size = 0
        for entry in self.entries():
            if _remove(entry.path):
                count, size = count + 1, size + entry.size
        return count, size

    def _drop(self, path: Path, seen: os.stat_result, exc: BaseException) -> None:
        try:
            now = os.stat(path)
            if (now.st_ino, now.st_mtime_ns) == (seen.st_ino, seen.st_mtime_ns):  # not replaced meanwhile
                _remove(path)
        except OSError:
            pass
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        self.warn(f"dropped a damaged video cache entry ({reason}); preparing the video again")


def _open_entry(path: Path) -> BinaryIO:
    """An entry file opened for reading without ever blocking (a FIFO put in its place opens at once)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    return os.fdopen(fd, "rb")


def _manifest_of(path: Path) -> dict[str, Any] | None:
    try:
        with _open_entry(path) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None
            return read_manifest(handle, info.st_size)
    except Exception:  # damaged or vanished: listed without details
        return None


def _remove(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:  # gone already (another process evicted it), or not ours to remove
        return False


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
