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
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from holitom_cli.errors import ConfigError, VideoError

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

    frames: (T, H, W, 3) uint8 RGB; indices: T source frame indices (ascending); timestamps: T seconds.
    """

    frames: np.ndarray
    indices: list[int]
    timestamps: list[float]
    meta: VideoMeta
    decode_s: float = 0.0
    sampling: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def uniform_indices(frame_count: int, num_frames: int) -> list[int]:
    """The reference's uniform sampling: ``linspace(0, n-1, N)`` cast to int; all frames when n <= N."""
    if frame_count <= num_frames:
        return list(range(frame_count))
    return [int(i) for i in np.linspace(0, frame_count - 1, num_frames, dtype=int)]


def fps_indices(frame_count: int, video_fps: float, fps: float, max_frames: int | None) -> list[int]:
    """One frame every ``round(video_fps / fps)`` frames, uniformly resampled to ``max_frames`` if over it."""
    step = max(1, round(video_fps / fps))
    indices = list(range(0, frame_count, step))
    if max_frames is not None and len(indices) > max_frames:
        return uniform_indices(frame_count, max_frames)
    return indices


def _validate(num_frames: int, fps: float | None, max_frames: int | None) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ConfigError(f"frames must be an integer >= 1, got {num_frames!r}", hint="e.g. --frames 32")
    if fps is not None and (not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0):
        raise ConfigError(f"fps must be a number > 0, got {fps!r}", hint="e.g. --fps 1")
    if max_frames is not None and (
        isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1
    ):
        raise ConfigError(
            f"max_frames must be an integer >= 1, got {max_frames!r}", hint="e.g. --max-frames 64"
        )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(f"video not found: {path}", hint="check the path and the file name")
    if path.is_dir():
        raise VideoError(f"{path} is a directory, not a video file", hint="pass the path of a video file")
    if not os.access(path, os.R_OK):
        raise VideoError(
            f"video is not readable: {path} (permission denied)", hint="check the file's permissions"
        )
    if path.stat().st_size == 0:
        raise VideoError(
            f"video file is empty: {path}", hint="the file has 0 bytes; re-export or re-download it"
        )


def _open(path: Path):
    import cv2

    # Keep FFmpeg's own messages ("moov atom not found", ...) off the terminal unless the user asked for them.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise VideoError(
            f"cannot open {path} as a video: the file is corrupt, truncated or not a supported video format",
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


def load_video(
    path: str | os.PathLike, num_frames: int = 32, fps: float | None = None, max_frames: int | None = None
) -> VideoClip:
    """Decode and sample frames of a video file.

    Args:
        path: a video file OpenCV can read.
        num_frames: frames to sample uniformly (ignored when ``fps`` is given).
        fps: sample this many frames per second of video instead; ``max_frames`` caps the count.
    Returns:
        a :class:`VideoClip` with frames (T, H, W, 3) uint8 RGB.
    Raises:
        ConfigError for invalid sampling settings; VideoError for a missing, unreadable, corrupt, truncated or
        empty file.
    """
    import cv2

    _validate(num_frames, fps, max_frames)
    start = time.perf_counter()
    file = Path(path)
    _check_file(file)
    cap = _open(file)
    try:
        claimed = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        video_fps = float(cap.get(cv2.CAP_PROP_FPS))
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        codec = _fourcc(cap.get(cv2.CAP_PROP_FOURCC))
    finally:
        cap.release()
    claimed = max(claimed, 0)
    usable_fps = video_fps if math.isfinite(video_fps) and 0 < video_fps < 10_000 else None
    if fps is not None and usable_fps is None:
        raise VideoError(
            f"{file} does not report a frame rate, so frames cannot be sampled by fps",
            hint="sample a fixed number of frames instead (--frames N)",
        )

    def pick(count: int) -> list[int]:
        if fps is not None:
            return fps_indices(count, usable_fps, fps, max_frames)
        return uniform_indices(count, num_frames)

    count = claimed
    if count <= 0:  # unknown count: find it by decoding
        count = _count_frames(file)
    frames: list[np.ndarray] = []
    indices: list[int] = []
    if count > 0:
        indices = pick(count)
        sparse = len(indices) > 1 and (indices[-1] - indices[0]) / (len(indices) - 1) > SEEK_MIN_GAP
        seeked = _read_seeking(file, indices) if sparse else None
        decoded = 0
        if seeked is not None:
            frames, ended_early = seeked, False
        else:
            frames, decoded, ended_early = _read(file, indices)
        if ended_early:  # the container over-counted: resample on the frames that really decode
            count = decoded if decoded > 0 else _count_frames(file)
            indices = pick(count) if count > 0 else []
            frames, _, ended_early = _read(file, indices)
            if ended_early:
                raise VideoError(
                    f"{file} decodes inconsistently (it stopped at a different frame on a second read)",
                    hint="the file is probably damaged; re-encode it",
                )
    if not frames:
        raise VideoError(
            f"no frames could be decoded from {file}: the file is empty, truncated or corrupt",
            hint="check that the file plays in a video player; re-encode it if it does",
        )
    rgb = np.stack([cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for frame in frames])  # (T, H, W, 3)
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
    sampling = {"frames": num_frames, "fps": fps, "max_frames": max_frames}
    return VideoClip(rgb, indices, timestamps, meta, time.perf_counter() - start, sampling)
