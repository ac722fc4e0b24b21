"""Shared fixtures: a tiny random LLaVA-OneVision checkpoint and synthetic videos written with OpenCV."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_video_cache(tmp_path_factory):
    """Every test (and every CLI process it starts) uses its own video cache, never ~/.cache/holitom."""
    old = os.environ.get("HOLITOM_CACHE")
    os.environ["HOLITOM_CACHE"] = str(tmp_path_factory.mktemp("holitom-cache"))
    yield
    if old is None:
        os.environ.pop("HOLITOM_CACHE", None)
    else:
        os.environ["HOLITOM_CACHE"] = old


@pytest.fixture(autouse=True)
def _fresh_video_cache(tmp_path_factory, monkeypatch):
    """A fresh one per test, so no test sees another's cached videos (module fixtures use the session's)."""
    monkeypatch.setenv("HOLITOM_CACHE", str(tmp_path_factory.mktemp("video-cache")))


_COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 30), (200, 60, 200), (30, 200, 210)]


def synthetic_frame(i: int, width: int, height: int, pattern: str = "moving") -> np.ndarray:
    """Frame ``i`` of a synthetic video as (H, W, 3) uint8 RGB.

    Patterns: ``moving``: coloured shapes moving over a slowly changing background; ``static-left``: the left
    half is a fixed picture, the right half holds a moving square; ``static``: the same frame every time.
    """
    import cv2

    frame = np.zeros((height, width, 3), np.uint8)
    if pattern == "static":
        i = 0
    if pattern in ("moving", "static"):
        frame[:, :] = (20 + (3 * i) % 60, 30, 60)
        for k, colour in enumerate(_COLOURS[:3]):
            x = int((width * (0.15 + 0.25 * k) + i * (2 + k)) % width)
            y = int(height * (0.3 + 0.2 * k))
            cv2.circle(frame, (x, y), max(3, height // 8), colour, -1)
        cv2.rectangle(frame, (0, height - 6), (int(width * ((i % 20) / 20)), height - 1), _COLOURS[3], -1)
    elif pattern == "static-left":
        half = width // 2
        frame[:, :half] = (90, 90, 90)
        cv2.circle(frame, (half // 2, height // 2), max(3, height // 5), _COLOURS[0], -1)
        frame[:, half:] = (10, 10, 40)
        side = max(4, height // 4)
        x = half + int((i * 3) % max(1, half - side))
        y = int((i * 2) % max(1, height - side))
        cv2.rectangle(frame, (x, y), (x + side, y + side), _COLOURS[2], -1)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return frame


def write_video(
    path: str | Path,
    frames: int = 24,
    size: tuple[int, int] = (96, 64),
    fps: float = 12.0,
    pattern: str = "moving",
    fourcc: str = "mp4v",
) -> Path:
    """Write a synthetic video (``size`` = (width, height)) and return its path."""
    import cv2

    path = Path(path)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} to {path}"
    for i in range(frames):
        writer.write(cv2.cvtColor(synthetic_frame(i, size[0], size[1], pattern), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="session")
def make_video(tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``make_video(frames=24, size=(96, 64), fps=12.0, pattern="moving", path=None,
    fourcc="mp4v")``.

    Writes an ``.mp4`` (mp4v) synthetic video into a session temp folder unless ``path`` is given.
    """
    folder = tmp_path_factory.mktemp("videos")
    counter = itertools.count()

    def make(
        frames: int = 24,
        size: tuple[int, int] = (96, 64),
        fps: float = 12.0,
        pattern: str = "moving",
        path: str | Path | None = None,
        fourcc: str = "mp4v",
    ) -> Path:
        if path is None:
            ext = {"mp4v": ".mp4", "MJPG": ".avi", "XVID": ".avi", "FFV1": ".mkv"}.get(fourcc, ".mp4")
            path = folder / f"video_{next(counter)}_{pattern}{ext}"
        return write_video(path, frames=frames, size=size, fps=fps, pattern=pattern, fourcc=fourcc)

    return make


@pytest.fixture(scope="session")
def sample_video(make_video) -> Path:
    """A 24-frame 96x64 12 fps mp4 with moving coloured shapes."""
    return make_video(frames=24, size=(96, 64), fps=12.0, pattern="moving")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight LLaVA-OneVision checkpoint (float32), built once per test session."""
    from holitom_cli.models.random_model import save_random_checkpoint

    return save_random_checkpoint(
        tmp_path_factory.mktemp("tiny_model"), shape="tiny", dtype="float32", seed=0
    )
