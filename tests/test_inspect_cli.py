"""``holitom inspect`` through the real Typer app on the tiny random model, read back pixel by pixel."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from holitom_cli import render
from holitom_cli.cli.app import app

SIDE = 104  # the tiny model's vision input size: frames are not resized, so cell columns map cleanly
HALF = 56  # left half: x < 56


def write_split_video(path: Path, frames: int) -> Path:
    """Left half a fixed picture (grey, red disc); right half two bands, white/black, swapped every frame.

    The conftest ``static-left`` pattern moves a small square, which leaves most right-half cells static;
    here every right-half cell changes completely between adjacent frames, while the right half's mean
    colour stays the same (the swap is a permutation), which keeps a random vision tower's global mixing
    from disturbing the left-half tokens.
    """
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 6.0, (SIDE, SIDE))
    assert writer.isOpened()
    left = np.full((SIDE, HALF, 3), 90, np.uint8)
    cv2.circle(left, (HALF // 2, SIDE // 2), SIDE // 5, (230, 40, 40), -1)
    for i in range(frames):
        frame = np.empty((SIDE, SIDE, 3), np.uint8)
        frame[:, :HALF] = left
        top, bottom = (235, 15) if i % 2 == 0 else (15, 235)
        frame[: SIDE // 2, HALF:] = top
        frame[SIDE // 2 :, HALF:] = bottom
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def run(*args: str):
    result = CliRunner().invoke(app, ["inspect", *map(str, args)])
    return result


def pixel(img: Image.Image, xy) -> tuple[int, int, int]:
    return img.convert("RGB").getpixel(xy)


def is_kept(img, lay, t, p) -> bool:
    x0, y0, _, y1 = lay.cell_box(t, p)
    return pixel(img, (x0, (y0 + y1) // 2)) == render.KEPT_COLOUR


def inner_pixel(img, lay, t, p):
    """Inside the cell, clear of the grid line, the outline and the centre dot."""
    x0, y0, _, _ = lay.cell_box(t, p)
    return pixel(img, (x0 + 3, y0 + 3))


@pytest.fixture(scope="module")
def split_video(tmp_path_factory) -> Path:
    return write_split_video(tmp_path_factory.mktemp("inspect") / "split.mp4", frames=6)


def adjacent_similarity(model_dir: Path, video: Path, frames: int) -> tuple[np.ndarray, int]:
    """Cosine similarity of each token position between adjacent frames, (T-1, N), from the pooled features
    (spec 2.1), computed here with numpy rather than by the compression code."""
    from holitom_cli.pipeline import Pipeline, SamplingOptions

    prepared = Pipeline.load(str(model_dir), device="cpu").prepare_video(
        video, SamplingOptions(frames=frames)
    )
    feats = prepared.features.float().numpy()
    unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    return (unit[:-1] * unit[1:]).sum(-1), prepared.grid[1]


def test_static_left_is_merged_moving_right_is_kept(tiny_model_dir, split_video, tmp_path):
    # A random-weight vision tower has no notion of "the same content": how similar a static patch stays
    # depends on its weights. So the test measures the adjacent-frame similarities on this very video and puts
    # tau in the gap between the static left columns (all above) and the changing right columns (all below).
    # The precondition asserts the gap exists, so a change to the random model fails here, clearly.
    # --retain-ratio 1 makes the spatial stage keep everything (r' = 1: every dynamic token kept, every static
    # token its own cluster centre), so the picture's states depend on the temporal stage only.
    sim, grid = adjacent_similarity(tiny_model_dir, split_video, 6)
    col, cell_w = np.arange(grid * grid) % grid, SIDE / grid
    left_cols = (col + 1) * cell_w <= HALF  # cells fully inside the left half (columns 0..2 of 7)
    right_cols = col * cell_w >= HALF  # cells fully inside the right half (columns 4..6 of 7)
    assert left_cols.any() and right_cols.any()
    left_min, right_max = sim[:, left_cols].min(), sim[:, right_cols].max()
    assert left_min - right_max > 0.1, (
        f"no similarity gap: left min {left_min:.3f}, right max {right_max:.3f}"
    )
    tau = float((left_min + right_max) / 2)

    out = tmp_path / "map.png"
    res = run(split_video, "-o", out, "-m", tiny_model_dir, "--frames", 6, "--tau", f"{tau:.4f}",
              "--retain-ratio", "1", "--device", "cpu", "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    img = Image.open(out)
    lay = render.merge_map_layout(6, grid)
    assert img.size[0] == lay.width
    a, seg0 = render.SHADE_ALPHA, render.SEGMENT_COLOURS[0]
    for p in np.nonzero(left_cols)[0]:
        # frame 0 starts segment 0: the merged token lives there, shaded in segment 0's colour, with a dot
        assert not is_kept(img, lay, 0, p), p
        r, g, b = inner_pixel(img, lay, 0, p)
        # shaded = (1 - a) * frame + a * (0, 145, 255): blue at least a * 255 (minus codec noise) and red at
        # most (1 - a) * 235 + noise, whereas the raw left half (grey 90, red disc) has blue <= 90
        assert b >= a * seg0[2] - 6 and r <= (1 - a) * 235 + 6, (p, (r, g, b))
        x0, y0, _, _ = lay.cell_box(0, p)
        assert pixel(img, (x0 + lay.cell // 2, y0 + lay.cell // 2)) == render.CENTRE_COLOUR, p
        for t in range(1, 6):  # folded away (dark) or, if tau cut a segment here, shaded again: never kept
            assert not is_kept(img, lay, t, p), (t, p)
            inside = np.array(inner_pixel(img, lay, t, p))
            folded = inside.max() <= render.FOLD_DIM * 235 + 6
            # shaded: pixel - a * colour is a dimmed frame pixel, in [0, (1 - a) * 255] for every channel
            shaded = any(
                np.all((inside - a * np.array(c) >= -6) & (inside - a * np.array(c) <= (1 - a) * 255 + 6))
                for c in render.SEGMENT_COLOURS
            )
            assert folded or shaded, (t, p, inside)
    for t in range(6):
        for p in np.nonzero(right_cols)[0]:
            assert is_kept(img, lay, t, p), (t, p)


def test_no_compress_and_single_frame(tiny_model_dir, split_video, make_video, tmp_path):
    out = tmp_path / "off.png"
    res = run(split_video, "-o", out, "-m", tiny_model_dir, "--frames", 3, "--no-compress", "--device", "cpu")
    assert res.exit_code == 0, res.output
    img = Image.open(out)
    grid = 7  # 104 px input, 8 px patches -> 13 x 13 -> pooled to ceil(13 / 2) = 7
    lay = render.merge_map_layout(3, grid)
    assert all(is_kept(img, lay, t, p) for t in range(3) for p in range(grid * grid))

    single = make_video(frames=1, size=(96, 64), pattern="static")
    out = tmp_path / "one.png"
    res = run(single, "-o", out, "-m", tiny_model_dir, "--retain-ratio", "0.25", "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    img = Image.open(out)
    lay = render.merge_map_layout(1, grid)
    assert img.size[0] == lay.width
    kept = [p for p in range(grid * grid) if is_kept(img, lay, 0, p)]
    # one frame: no temporal merging (R = 0, r' = r), so the frame keeps ceil(N * r) tokens (spec 4.4)
    assert len(kept) == math.ceil(grid * grid * 0.25)
    # no static tokens, so no cluster-centre dots
    for p in set(range(grid * grid)) - set(kept):
        x0, y0, _, _ = lay.cell_box(0, p)
        assert pixel(img, (x0 + lay.cell // 2, y0 + lay.cell // 2)) != render.CENTRE_COLOUR

    out = tmp_path / "one-all.png"
    res = run(single, "-o", out, "-m", tiny_model_dir, "--retain-ratio", "1", "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    img = Image.open(out)
    assert all(is_kept(img, lay, 0, p) for p in range(grid * grid))


def test_gif_has_one_picture_per_frame(tiny_model_dir, split_video, tmp_path):
    out = tmp_path / "map.gif"
    res = run(split_video, "-o", out, "--gif", "-m", tiny_model_dir, "--frames", 4, "--quiet")
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        assert im.format == "GIF" and im.n_frames == 4


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("missing/sub/map.png", [], "does not exist"),
        ("map.jpg", [], "must end in .png"),
        ("map.png", ["--gif"], "must end in .gif"),
    ],
)
def test_bad_output_path_fails_before_the_model_loads(split_video, tmp_path, name, extra, message):
    # the model path does not exist: if the model were loaded first, the error would be about the model
    res = run(split_video, "-o", tmp_path / name, "-m", tmp_path / "no-such-model", *extra)
    assert res.exit_code == 1
    assert message in res.output and "Error:" in res.output and "Hint:" in res.output
    assert not (tmp_path / name).exists()


def test_missing_video_is_an_error(tmp_path):
    res = run(tmp_path / "nope.mp4", "-o", tmp_path / "map.png", "-m", tmp_path / "no-such-model")
    assert res.exit_code == 1 and "video not found" in res.output


def test_output_inside_a_file_says_it_is_a_file(split_video, tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    res = run(split_video, "-o", tmp_path / "notes.txt" / "map.png", "-m", tmp_path / "no-such-model")
    assert res.exit_code == 1 and "is a file, not a folder" in res.output and "mkdir" not in res.output
    assert (tmp_path / "notes.txt").read_text() == "keep"
