"""The on-disk video cache: prepared videos (what the vision tower made) kept between runs (issue 11).

``prepare_video_cached(pipe, path, sampling, cache=open_cache(...))`` returns the same PreparedVideo as
``pipe.prepare_video`` but reads it from the cache when this file's bytes were prepared before with the same
sampling and the same model, skipping decoding and the vision tower. See docs/cache.md for the whole story:

- where: ``<root>/videos/``, root = ``--cache-dir``, else ``$HOLITOM_CACHE``, else
  ``$XDG_CACHE_HOME/holitom``, else ``~/.cache/holitom``; a ``CACHEDIR.TAG`` marks the folder as ours.
- the key: the file's BLAKE2b content hash (never its name), the sampling, the model's identity (name, family,
  dtype, quantization, device type, the checkpoint folder's files by size and mtime, the hub commit), the
  torch / transformers / holitom versions and the entry format version.
- one file per entry, written atomically (temp file + fsync + rename); a damaged or foreign entry is a miss:
  dropped, rebuilt, one warning line; LRU eviction under a size cap (``DEFAULT_MAX_BYTES``, ``--cache-size``).

How entries sit on disk (the file format, the folder, eviction) is :mod:`holitom_cli.video_cache_store`.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from holitom_cli.errors import ConfigError
from holitom_cli.video_cache_store import (
    DEFAULT_MAX_BYTES,
    FORMAT_VERSION,
    CacheEntry,
    VideoCache,
    encode_entry,
    warning,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "CacheEntry",
    "VideoCache",
    "cache_key",
    "default_cache_dir",
    "format_size",
    "open_cache",
    "parse_size",
    "prepare_video_cached",
]

_CHUNK = 4 * 1024 * 1024
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


# ----------------------------------------------------------------------------------------------- settings


def default_cache_dir() -> Path:
    """``$HOLITOM_CACHE``, else ``$XDG_CACHE_HOME/holitom``, else ``~/.cache/holitom``."""
    explicit = os.environ.get("HOLITOM_CACHE", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():  # the XDG spec: relative values are ignored
        return Path(xdg) / "holitom"
    return Path.home() / ".cache" / "holitom"


_MAX_SIZE = 10**18  # 1 EB: a larger --cache-size is a typo


def parse_size(text: str) -> int:
    """Bytes in ``"10GB"``, ``"500M"``, ``"1.5 GiB"``, ``"800000"``: K/M/G/T (with or without B) are powers
    of 1000, KiB/MiB/GiB/TiB powers of 1024; case does not matter. ConfigError otherwise (0 included)."""
    hint = "e.g. --cache-size 10GB, 500MB or 2GiB (use --no-cache to turn the cache off)"
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*", str(text), re.IGNORECASE)
    if match is None or (match.group(3) and not (match.group(2) and match.group(4))):
        raise ConfigError(f"invalid cache size {text!r}", hint=hint)
    number, unit = float(match.group(1)), match.group(2).lower()
    scale = 1024 ** "kmgt".index(unit) * 1024 if match.group(3) else _UNITS[unit]
    size = int(number * scale)
    if size < 1:
        raise ConfigError(f"the cache size must be at least 1 byte, got {text!r}", hint=hint)
    if size > _MAX_SIZE:
        raise ConfigError(f"the cache size {text!r} is larger than any disk (over 1 EB)", hint=hint)
    return size


def format_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


# ----------------------------------------------------------------------------------------------- the key


@dataclass(frozen=True)
class FileId:
    """A video file's content hash, and its stat at hashing time (to notice it changing meanwhile)."""

    blake2b: str
    size: int
    mtime_ns: int
    inode: int


def file_id(path: Path) -> FileId:
    """Hash the file's bytes in chunks (never the whole file in memory). OSError for anything but a regular
    file (opened non-blocking: a FIFO never blocks here; ``load_video`` then says what is wrong)."""
    digest = hashlib.blake2b(digest_size=32)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return FileId(digest.hexdigest(), info.st_size, info.st_mtime_ns, info.st_ino)


def _unchanged(path: Path, ident: FileId) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (info.st_size, info.st_mtime_ns, info.st_ino) == (ident.size, ident.mtime_ns, ident.inode)


def checkpoint_id(folder: Path) -> dict[str, Any]:
    """The checkpoint folder (absolute), its hub commit when it is a hub snapshot (``snapshots/<commit>``),
    and every config / weights / tokenizer file in it by name, size, mtime, inode and ctime: a rebuilt
    checkpoint misses, also when its files were copied in with their old timestamps (``cp -p``, ``rsync -a``:
    the ctime of a written file cannot be set back)."""
    folder = folder.expanduser().absolute()
    files = []
    try:
        for item in sorted(os.scandir(folder), key=lambda e: e.name):
            if item.name.endswith((".json", ".safetensors", ".jinja", ".txt", ".model", ".tiktoken")):
                info = item.stat()  # follows the hub cache's symlinks to the blobs
                files.append([item.name, info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns])
    except OSError:
        files = []
    revision = folder.name if folder.parent.name == "snapshots" else None
    return {"path": str(folder), "revision": revision, "files": files}


def model_id(adapter: Any) -> dict[str, Any]:
    """What identifies the vision outputs of a loaded adapter (see the module docstring)."""
    import torch
    import transformers

    from holitom_cli import __version__

    folder = getattr(adapter, "path", None)
    if folder is None:
        folder = getattr(getattr(adapter.model, "config", None), "_name_or_path", None)
    return {
        "name": adapter.name,
        "family": adapter.family,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "quantize": adapter.quantize,
        "device": adapter.device.type,
        "checkpoint": checkpoint_id(Path(folder)) if folder else None,
        "versions": {
            "holitom": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def sampling_id(sampling: Any) -> dict[str, Any]:
    """The sampling settings that pick the frames (``frames`` is ignored when ``fps`` is set)."""
    from holitom_cli.limits import DEFAULT_FPS_MAX_FRAMES

    if sampling.fps is not None:
        cap = sampling.max_frames if sampling.max_frames is not None else DEFAULT_FPS_MAX_FRAMES
        return {"frames": None, "fps": float(sampling.fps), "max_frames": cap}
    return {"frames": sampling.frames, "fps": None, "max_frames": None}


def cache_key(model: dict[str, Any], video: FileId, sampling: Any) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "video": {"blake2b": video.blake2b, "size": video.size},
        "sampling": sampling_id(sampling),
        "model": model,
    }


def open_cache(
    no_cache: bool,
    cache_size: str | None,
    cache_dir: str | None = None,
    *,
    warn: Callable[[str], None] | None = warning,
) -> VideoCache | None:
    """The cache the commands use, or None with ``--no-cache``.

    A bad ``--cache-size`` is a ConfigError (a typo: fail before the model loads). A folder that cannot be
    used (a file in its place, not writable, not ours) only turns the cache off, with one warning line: the
    cache saves time, it never stops an answer.
    """
    max_bytes = parse_size(cache_size) if cache_size is not None else DEFAULT_MAX_BYTES
    if no_cache:
        return None
    if cache_dir is not None and not str(cache_dir).strip():
        raise ConfigError("--cache-dir is empty", hint="give a folder, or drop the option")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = VideoCache(root, max_bytes, warn=warn)
    try:
        cache.ensure()
    except ConfigError as exc:
        if warn is not None:
            warn(f"video cache off: {exc.message}")
        return None
    return cache


# ----------------------------------------------------------------------------------------------- prepare


def prepare_video_cached(
    pipeline: Any,
    path: str | os.PathLike,
    sampling: Any,
    *,
    cache: VideoCache | None,
    on_progress: Any = None,
    need_pixels: bool = False,
) -> Any:
    """``pipeline.prepare_video(path, sampling)``, through ``cache`` (None: exactly ``prepare_video``).

    A hit skips decoding and the vision tower: ``source == "cache"``, ``vision_s`` is the time hashing the
    file and reading the entry took, ``clip.frames`` is None and ``decode_s`` 0 unless ``need_pixels`` (then
    the frames are decoded again, the vision tower still skipped). A miss runs ``prepare_video`` and stores
    the result (its ``vision_s`` includes hashing and writing). Run ``check_video_path`` on the file first,
    as without the cache: the hash is computed on the file that passed it.
    """
    from holitom_cli.pipeline import SamplingOptions
    from holitom_cli.video import VideoClip

    sampling = sampling or SamplingOptions()
    if cache is None or isinstance(path, VideoClip):
        return pipeline.prepare_video(path, sampling, on_progress=on_progress)
    start = time.perf_counter()
    file = Path(path)
    try:
        video = file_id(file)
    except OSError:  # prepare_video says what is wrong with the file
        return pipeline.prepare_video(path, sampling, on_progress=on_progress)
    adapter = pipeline.model
    key = cache_key(model_id(adapter), video, sampling)
    hit = cache.load(key, lambda manifest, fields: _restore(adapter, file, manifest, fields))
    if hit is not None:
        hit.vision_s = time.perf_counter() - start
        if not need_pixels:
            return hit
        clip = _decode(file, sampling)
        if list(clip.indices) == list(hit.clip.indices):
            hit.clip = clip
            return hit
        return pipeline.prepare_video(clip, sampling, on_progress=on_progress)  # should not happen: recompute
    hashed = time.perf_counter() - start
    prepared = pipeline.prepare_video(path, sampling, on_progress=on_progress)
    writing = time.perf_counter()
    if _unchanged(file, video):  # the file did not change while it was read: its hash is the key
        data = _entry_bytes(key, prepared, file)
        if data is not None:
            cache.store(key, data)
    prepared.vision_s += hashed + (time.perf_counter() - writing)
    return prepared


def _decode(file: Path, sampling: Any) -> Any:
    from holitom_cli.video import load_video

    return load_video(
        file, num_frames=sampling.frames or 32, fps=sampling.fps, max_frames=sampling.max_frames
    )


def _entry_bytes(key: dict[str, Any], prepared: Any, file: Path) -> bytes | None:
    """The entry of a prepared video, or None when something in it cannot be stored (then it is not)."""
    import dataclasses

    from holitom_cli.video_cache_store import EntryError

    clip = prepared.clip
    meta = {k: v for k, v in dataclasses.asdict(clip.meta).items() if k != "path"}
    stored_clip = {
        "indices": [int(i) for i in clip.indices],
        "timestamps": [float(t) for t in clip.timestamps],
        "meta": meta,
        "sampling": dict(clip.sampling),
    }
    info = {
        "model_name": prepared.model_name,
        "vision_flops": float(prepared.vision_flops),
        "vision_s": float(prepared.vision_s),
        "video_name": file.name,
        "frames": prepared.num_frames,
        "visual_tokens": prepared.num_input_tokens,
        "created": time.time(),
    }
    try:
        return encode_entry(key, prepared.tokens, stored_clip, info)
    except (EntryError, ValueError, TypeError):
        return None


def _on_device(value: Any, device: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _on_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_device(v, device) for v in value)
    return value


def _restore(adapter: Any, file: Path, manifest: dict[str, Any], fields: dict[str, Any]) -> Any:
    """The PreparedVideo of a checked entry (raises on anything that does not fit: the entry is dropped)."""
    import dataclasses

    from holitom_cli.models.base import VisualTokens
    from holitom_cli.pipeline import PreparedVideo
    from holitom_cli.video import VideoClip, VideoMeta

    if set(fields) != {f.name for f in dataclasses.fields(VisualTokens)}:
        raise ValueError("the stored tokens have other fields than this holitom's")
    tokens = VisualTokens(**_on_device(fields, adapter.device))  # checks the shapes against each other
    stored, info = manifest["clip"], manifest["info"]
    clip = VideoClip(
        frames=None,
        indices=[int(i) for i in stored["indices"]],
        timestamps=[float(t) for t in stored["timestamps"]],
        meta=VideoMeta(path=str(file), **stored["meta"]),
        decode_s=0.0,
        sampling=dict(stored["sampling"]),
    )
    if info["model_name"] != adapter.name:
        raise ValueError("an entry of another model")
    return PreparedVideo(
        clip=clip,
        tokens=tokens,
        vision_s=0.0,
        model_name=adapter.name,
        vision_flops=float(info["vision_flops"]),
        source="cache",
        encode_s=float(info["vision_s"]),
    )
