"""Video decoding and frame sampling with OpenCV. Knows nothing of models.

``load_video(path, num_frames=32)`` samples ``num_frames`` frames uniformly with the reference's integer
indices ``np.linspace(0, n - 1, num_frames, dtype=int)`` (``n`` = frames in the video; a video with fewer
frames uses all of them). ``load_video(path, fps=1.0, max_frames=64)`` takes one frame every
``round(video_fps / fps)`` frames and, when that gives more than ``max_frames``, resamples ``max_frames``
frames uniformly over the whole video (the reference's LLaVA-Video sampling).

Container frame counts can be wrong, so the count is clamped to what actually decodes: frames are read in one
sequential pass (``grab`` every frame, ``retrieve`` only the wanted ones), and when the stream ends before the
container's count, the indices are recomputed for the true count and read again. When the wanted frames are
far apart (long videos: on average more than ``SEEK_MIN_GAP`` frames), each one is reached by seeking
instead, which is much faster there; a seek that fails falls back to the sequential pass. Frames come out RGB.

Hostile inputs (issue 9): at most ``limits.MAX_FRAMES`` frames are ever sampled, and ``fps`` sampling
without ``max_frames`` stops at ``limits.DEFAULT_FPS_MAX_FRAMES``. OpenCV is never given the user's file
name: it opens a symlink with a plain ASCII name in a private temporary folder (removed afterwards), because
OpenCV crashes (SIGSEGV) on names that are not valid UTF-8 and FFmpeg reads names such as ``http:x.mp4`` or
``a%d.mp4`` as protocols or patterns. Only regular files are opened (a FIFO would block, a device never
ends), after ``os.stat``. :func:`probe_video` is the cheap check run before a model loads (open + one frame +
frame count).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from holitom_cli.errors import ConfigError, VideoError
from holitom_cli.limits import DEFAULT_FPS_MAX_FRAMES, MAX_FRAMES

#: Mean distance between wanted frames above which frames are reached by seeking rather than decoding through.
SEEK_MIN_GAP = 250

#: File extensions the CLI treats as videos (OpenCV's FFmpeg backend reads more).
VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mov",
    ".avi",
    ".mkv",
    ".webm",
    ".mpg",
    ".mpeg",
    ".wmv",
    ".flv",
    ".ts",
    ".3gp",
)


@dataclass(frozen=True)
class VideoMeta:
    """What the container says about a video, with ``frame_count`` corrected to the frames that decode."""

    path: str
    fps: float | None  # None when the container gives no usable frame rate
    duration_s: float | None  # frame_count / fps
    width: int
    height: int
    codec: str  # FourCC, e.g. "FMP4", "h264"
    frame_count: int  # frames that decoded when the count had to be verified, else the container's count
    claimed_frame_count: int  # the container's count (0 when unknown)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "fps": self.fps,
            "duration_s": self.duration_s,
            "width": self.width,
            "height": self.height,
            "codec": self.codec,
            "frame_count": self.frame_count,
        }


@dataclass
class VideoClip:
    """Sampled frames of one video.

    frames: (T, H, W, 3) uint8 RGB, or None for a clip restored from the video cache (its vision outputs
    are cached, its pixels are not: decode again where pixels are needed); indices: T source frame indices
    (ascending); timestamps: T seconds.
    """

    frames: np.ndarray | None
    indices: list[int]
    timestamps: list[float]
    meta: VideoMeta
    decode_s: float = 0.0
    sampling: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.indices)


def uniform_indices(frame_count: int, num_frames: int) -> list[int]:
    """The reference's uniform sampling: ``linspace(0, n-1, N)`` cast to int; all frames when n <= N."""
    if frame_count <= num_frames:
        return list(range(frame_count))
    return [int(i) for i in np.linspace(0, frame_count - 1, num_frames, dtype=int)]


def fps_indices(frame_count: int, video_fps: float, fps: float, max_frames: int | None) -> list[int]:
    """One frame every ``round(video_fps / fps)`` frames, uniformly resampled to ``max_frames`` if over it.

    An ``fps`` above the video's rate takes every frame once; the candidates are counted before they are
    listed, so a huge (or wrong) frame count never builds a huge list when ``max_frames`` is set.
    """
    ratio = video_fps / fps if fps > 0 else math.inf
    step = max(1, round(min(ratio, max(frame_count, 1))))  # min(): no OverflowError for a tiny fps
    candidates = -(-frame_count // step)
    if max_frames is not None and candidates > max_frames:
        return uniform_indices(frame_count, max_frames)
    return list(range(0, frame_count, step))


def _validate(num_frames: int, fps: float | None, max_frames: int | None) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ConfigError(f"frames must be an integer >= 1, got {num_frames!r}", hint="e.g. --frames 32")
    if num_frames > MAX_FRAMES:
        raise ConfigError(
            f"frames must be at most {MAX_FRAMES}, got {num_frames}",
            hint=f"sample fewer frames, e.g. --frames 32 (the cap is {MAX_FRAMES})",
        )
    if fps is not None and (
        isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0
    ):
        raise ConfigError(f"fps must be a number > 0, got {fps!r}", hint="e.g. --fps 1")
    if max_frames is not None and (
        isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1
    ):
        raise ConfigError(
            f"max_frames must be an integer >= 1, got {max_frames!r}", hint="e.g. --max-frames 64"
        )
    if max_frames is not None and max_frames > MAX_FRAMES:
        raise ConfigError(
            f"max_frames must be at most {MAX_FRAMES}, got {max_frames}",
            hint=f"e.g. --max-frames 64 (the cap is {MAX_FRAMES})",
        )


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://?[^/]")


def looks_like_url(path: str | os.PathLike) -> bool:
    """``https://host/v.mp4`` (also after ``pathlib`` folded ``//`` into ``/``), ``rtsp://...``, ..."""
    text = os.fspath(path)
    text = text if isinstance(text, str) else os.fsdecode(text)
    return bool(_URL.match(text)) and len(text.split(":", 1)[0]) > 1  # not a Windows drive "C:/..."


def _display(path: Path) -> str:
    """The path for messages: printable, one line (undecodable bytes shown as ``\\xff``)."""
    raw = os.fsencode(path)
    text = raw.decode("utf-8", errors="backslashreplace")
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def _check_file(path: Path) -> None:
    """Cheap checks with ``os.stat`` only (never opens a FIFO or a device, which could block or never end)."""
    shown = _display(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if looks_like_url(path):
            url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?=[^/])", r"\1://", shown)  # Path folded "//"
            raise VideoError(
                f"URLs are not supported as videos: {url}",
                hint="download the file first (e.g. with curl -O or yt-dlp) and pass its local path",
            ) from None
        raise VideoError(f"video not found: {shown}", hint="check the path and the file name") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise VideoError(
                f"the video's file name is too long for the file system: {shown[:80]}...",
                hint="rename the file (or a folder of its path) to a shorter name",
            ) from None
        if exc.errno == errno.EACCES:
            raise VideoError(
                f"video is not readable: {shown} (permission denied on a folder of its path)",
                hint="check the permissions of the folders in the path",
            ) from None
        if exc.errno == errno.ELOOP:
            raise VideoError(f"{shown} is a symlink loop", hint="pass the path of a video file") from None
        raise VideoError(
            f"cannot access {shown}: {exc.strerror or exc}", hint="check the path and the file name"
        ) from None
    if stat.S_ISDIR(info.st_mode):
        raise VideoError(f"{shown} is a directory, not a video file", hint="pass the path of a video file")
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a named pipe (FIFO)"
            if stat.S_ISFIFO(info.st_mode)
            else "a device"
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
            else "a socket"
            if stat.S_ISSOCK(info.st_mode)
            else "not a regular file"
        )
        raise VideoError(
            f"{shown} is {kind}, not a video file",
            hint="save the video to a regular file first and pass that file's path",
        )
    if not os.access(path, os.R_OK):
        raise VideoError(
            f"video is not readable: {shown} (permission denied)", hint="check the file's permissions"
        )
    if info.st_size == 0:
        raise VideoError(
            f"video file is empty: {shown}", hint="the file has 0 bytes; re-export or re-download it"
        )
    try:  # the permission bits are not the whole story (ACLs, network file systems, ...)
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        reason = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else exc.strerror or exc
        raise VideoError(
            f"video is not readable: {shown} ({reason})", hint="check the file's permissions"
        ) from None


def _safe_suffix(path: Path) -> str:
    """The alias keeps a known video extension (a hint for FFmpeg); any other is dropped, so that FFmpeg
    detects the format from the content alone (with ``.txt`` it would render the text as a "tty" video)."""
    suffix = path.suffix.lower()
    return suffix if suffix in VIDEO_EXTENSIONS else ""


class _Source(str):
    """The name handed to OpenCV (an alias), remembering the user's path for messages."""

    shown: str = ""


@contextlib.contextmanager
def _opencv_name(path: Path) -> Iterator[_Source]:
    """A name OpenCV can open for ``path``: a symlink ``video.<ext>`` in a private temporary folder.

    OpenCV segfaults on file names that are not valid UTF-8, and FFmpeg interprets some names (``http:x``,
    ``concat:...``, ``img%03d``) instead of opening them; a plain ASCII alias avoids every such case. When
    symlinks are unavailable, the real name is used if it is plain text, else VideoError.
    """
    folder = None
    try:
        folder = tempfile.mkdtemp(prefix="holitom-video-")
        alias = os.path.join(folder, "video" + _safe_suffix(path))
        os.symlink(os.path.abspath(os.fsencode(path)), os.fsencode(alias))
        name = alias
    except OSError:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            folder = None
        name = os.fspath(path)
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise VideoError(
                f"cannot open {_display(path)}: its name is not valid UTF-8",
                hint="rename the file to a name made of plain characters",
            ) from None
    source = _Source(name)
    source.shown = _display(path)
    try:
        yield source
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _open(path: str | os.PathLike):
    import cv2

    # Keep FFmpeg's own messages ("moov atom not found", ...) off the terminal unless the user asked for them.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        shown = getattr(path, "shown", "") or _display(Path(path))
        raise VideoError(
            f"cannot open {shown} as a video: the file is corrupt, truncated or not a supported video format",
            hint="check that the file plays in a video player; re-encode it (e.g. to H.264 .mp4) if it does",
        )
    return cap


def _fourcc(value: float) -> str:
    code = int(value)
    if code <= 0:
        return "unknown"
    text = "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4))
    return text.strip("\x00 ") if text.isprintable() else "unknown"


def _read(path: Path, wanted: list[int]) -> tuple[list[np.ndarray], int, bool]:
    """Read frames ``wanted`` (ascending) in one sequential pass.

    Returns (BGR frames read, number of frames decoded, whether the stream ended before the last wanted
    index).
    """
    cap = _open(path)
    frames: list[np.ndarray] = []
    want = iter(wanted)
    target = next(want, None)
    position = 0
    try:
        while target is not None:
            if not cap.grab():
                return frames, position, True
            if position == target:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    return frames, position, True
                frames.append(frame)
                target = next(want, None)
                while target is not None and target == position:  # duplicate indices (not produced here)
                    frames.append(frame)
                    target = next(want, None)
            position += 1
        return frames, position, False
    finally:
        cap.release()


def _read_seeking(path: Path, wanted: list[int]) -> list[np.ndarray] | None:
    """Read frames ``wanted`` by seeking to each; None when a seek or read fails (caller falls back)."""
    import cv2

    cap = _open(path)
    frames: list[np.ndarray] = []
    try:
        for index in wanted:
            if not cap.set(cv2.CAP_PROP_POS_FRAMES, index):
                return None
            ok, frame = cap.read()
            if not ok or frame is None:
                return None
            frames.append(frame)
    finally:
        cap.release()
    return frames


def _count_frames(path: Path) -> int:
    cap = _open(path)
    count = 0
    try:
        while cap.grab():
            count += 1
    finally:
        cap.release()
    return count


def _container_info(source: str) -> tuple[int, float | None, int, int, str]:
    """(claimed frame count >= 0, usable fps or None, width, height, codec) from the container."""
    import cv2

    cap = _open(source)
    try:
        claimed = _as_int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        video_fps = float(cap.get(cv2.CAP_PROP_FPS))
        width = _as_int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = _as_int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        codec = _fourcc(cap.get(cv2.CAP_PROP_FOURCC))
    finally:
        cap.release()
    usable_fps = video_fps if math.isfinite(video_fps) and 0 < video_fps < 10_000 else None
    return claimed, usable_fps, width, height, codec


def _as_int(value: float) -> int:
    """A container property as a count >= 0 (OpenCV reports unknown values as 0, -1 or nan)."""
    return int(value) if math.isfinite(value) and value > 0 else 0


def probe_video(path: str | os.PathLike) -> VideoMeta:
    """The cheap check run before a model loads: a regular, readable file that OpenCV opens and that
    decodes at least one frame. Reads one frame only (``frame_count`` is the container's count, 0 when
    unknown). Raises VideoError otherwise, with the same messages as :func:`load_video`."""
    file = Path(path)
    _check_file(file)
    with _opencv_name(file) as source:
        claimed, usable_fps, width, height, codec = _container_info(source)
        cap = _open(source)
        try:
            ok, frame = cap.read()
        finally:
            cap.release()
    if not ok or frame is None:
        raise VideoError(
            f"no frames could be decoded from {source.shown}: the file is empty, truncated or corrupt",
            hint="check that the file plays in a video player; re-encode it if it does",
        )
    return VideoMeta(
        path=str(file),
        fps=usable_fps,
        duration_s=(claimed / usable_fps) if usable_fps and claimed else None,
        width=width or int(frame.shape[1]),
        height=height or int(frame.shape[0]),
        codec=codec,
        frame_count=claimed,
        claimed_frame_count=claimed,
    )


def load_video(
    path: str | os.PathLike, num_frames: int = 32, fps: float | None = None, max_frames: int | None = None
) -> VideoClip:
    """Decode and sample frames of a video file.

    Args:
        path: a video file OpenCV can read (any file name: see the module docstring).
        num_frames: frames to sample uniformly (ignored when ``fps`` is given), at most ``MAX_FRAMES``.
        fps: sample this many frames per second of video instead; ``max_frames`` caps the count
            (``DEFAULT_FPS_MAX_FRAMES`` when not given, at most ``MAX_FRAMES``). An ``fps`` above the video's
            own rate takes every source frame once.
    Returns:
        a :class:`VideoClip` with frames (T, H, W, 3) uint8 RGB.
    Raises:
        ConfigError for invalid sampling settings; VideoError for a missing, unreadable, corrupt, truncated or
        empty file, a URL, a directory, a FIFO or a device.
    """
    _validate(num_frames, fps, max_frames)
    start = time.perf_counter()
    file = Path(path)
    _check_file(file)
    cap_frames = max_frames if max_frames is not None else DEFAULT_FPS_MAX_FRAMES
    with _opencv_name(file) as source:
        clip = _load(file, source, num_frames, fps, cap_frames)
    clip.decode_s = time.perf_counter() - start
    clip.sampling = {"frames": num_frames, "fps": fps, "max_frames": cap_frames if fps is not None else None}
    return clip


def _load(file: Path, source: _Source, num_frames: int, fps: float | None, max_frames: int) -> VideoClip:
    import cv2

    shown = source.shown
    claimed, usable_fps, width, height, codec = _container_info(source)
    if fps is not None and usable_fps is None:
        raise VideoError(
            f"{shown} does not report a frame rate, so frames cannot be sampled by fps",
            hint="sample a fixed number of frames instead (--frames N)",
        )

    def pick(count: int) -> list[int]:
        if fps is not None:
            return fps_indices(count, usable_fps, fps, max_frames)
        return uniform_indices(count, num_frames)

    count = claimed
    if count <= 0:  # unknown count: find it by decoding
        count = _count_frames(source)
    frames: list[np.ndarray] = []
    indices: list[int] = []
    if count > 0:
        indices = pick(count)
        sparse = len(indices) > 1 and (indices[-1] - indices[0]) / (len(indices) - 1) > SEEK_MIN_GAP
        seeked = _read_seeking(source, indices) if sparse else None
        decoded = 0
        if seeked is not None:
            frames, ended_early = seeked, False
        else:
            frames, decoded, ended_early = _read(source, indices)
        if ended_early:  # the container over-counted: resample on the frames that really decode
            count = decoded if decoded > 0 else _count_frames(source)
            indices = pick(count) if count > 0 else []
            frames, _, ended_early = _read(source, indices)
            if ended_early:
                raise VideoError(
                    f"{shown} decodes inconsistently (it stopped at a different frame on a second read)",
                    hint="the file is probably damaged; re-encode it",
                )
    if not frames:
        raise VideoError(
            f"no frames could be decoded from {shown}: the file is empty, truncated or corrupt",
            hint="check that the file plays in a video player; re-encode it if it does",
        )
    first = frames[0].shape
    # A stream whose resolution changes midway: every frame is brought to the first frame's size.
    same = [f if f.shape == first else cv2.resize(f, (first[1], first[0])) for f in frames]
    rgb = np.stack([cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for frame in same])  # (T, H, W, 3)
    timestamps = [i / usable_fps if usable_fps else 0.0 for i in indices]
    meta = VideoMeta(
        path=str(file),
        fps=usable_fps,
        duration_s=(count / usable_fps) if usable_fps else None,
        width=width or int(rgb.shape[2]),
        height=height or int(rgb.shape[1]),
        codec=codec,
        frame_count=count,
        claimed_frame_count=claimed,
    )
    return VideoClip(rgb, indices, timestamps, meta)
