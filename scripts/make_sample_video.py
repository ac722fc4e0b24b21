"""Write the sample video used by the README: ``assets/sample.mp4``.

Eight seconds at 12 fps, 320x240, mp4v: on a light background, a red circle moves from left to right along the
top, a green triangle stays still in the bottom-left corner, and a blue square appears in the bottom-right at
the fourth second. Simple content that a real video LLM can describe ("What happens to the red circle?",
"When does the blue square appear?"). The output is deterministic for a given OpenCV build.

Usage: ``python scripts/make_sample_video.py [OUT.mp4]``
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT, FPS, SECONDS = 320, 240, 12, 8
BACKGROUND = (235, 235, 235)  # BGR, light grey
RED, GREEN, BLUE = (40, 40, 220), (60, 170, 40), (200, 90, 30)  # BGR


def draw_frame(index: int) -> np.ndarray:
    """Frame ``index`` as a (HEIGHT, WIDTH, 3) uint8 BGR image."""
    frame = np.full((HEIGHT, WIDTH, 3), BACKGROUND, dtype=np.uint8)
    t = index / FPS
    # Red circle: left to right across the top over the whole clip.
    progress = index / (FPS * SECONDS - 1)
    cx = int(round(30 + progress * (WIDTH - 60)))
    cv2.circle(frame, (cx, 70), 24, RED, thickness=-1, lineType=cv2.LINE_AA)
    # Green triangle: static, bottom-left.
    triangle = np.array([[40, 210], [100, 210], [70, 155]], dtype=np.int32)
    cv2.fillPoly(frame, [triangle], GREEN, lineType=cv2.LINE_AA)
    # Blue square: appears at the midpoint, bottom-right.
    if t >= SECONDS / 2:
        cv2.rectangle(frame, (220, 150), (280, 210), BLUE, thickness=-1)
    return frame


def write_sample(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise SystemExit(f"cannot open a video writer for {out}")
    try:
        for i in range(FPS * SECONDS):
            writer.write(draw_frame(i))
    finally:
        writer.release()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    default = Path(__file__).resolve().parent.parent / "assets" / "sample.mp4"
    out = write_sample(Path(argv[0]) if argv else default)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
