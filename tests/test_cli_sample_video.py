"""The README's sample video: small, decodable, and showing what its description says."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from holitom_cli.video import load_video

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.mp4"


def _mask(frame: np.ndarray, colour: str) -> np.ndarray:
    """Pixels clearly of one primary colour in an (H, W, 3) RGB frame."""
    r, g, b = (frame[..., i].astype(int) for i in range(3))
    if colour == "red":
        return (r > 150) & (g < 100) & (b < 100)
    if colour == "green":
        return (g > 120) & (r < 120) & (b < 100)
    return (b > 150) & (r < 100) & (g < 140)  # blue


def test_sample_video_is_small_and_decodes():
    assert SAMPLE.stat().st_size < 1_000_000
    clip = load_video(SAMPLE, num_frames=8)
    assert clip.frames.shape == (8, 240, 320, 3)
    assert clip.meta.fps == 12.0 and clip.meta.frame_count == 96 and clip.meta.duration_s == 8.0


def test_sample_video_content_matches_its_description():
    clip = load_video(SAMPLE, num_frames=96)
    red_x = [np.nonzero(_mask(f, "red"))[1].mean() for f in clip.frames]
    assert all(b > a for a, b in zip(red_x, red_x[1:], strict=False))  # moves left to right, every frame
    assert red_x[0] < 80 and red_x[-1] > 240
    blue = [int(_mask(f, "blue").sum()) for f in clip.frames]
    assert all(n < 50 for n in blue[:48]) and all(n > 2500 for n in blue[48:])  # appears at 4 s (frame 48)
    green = np.stack([_mask(f, "green") for f in clip.frames])
    assert green[0].sum() > 1000
    assert (green != green[0]).mean() < 0.002  # static (up to compression noise)
