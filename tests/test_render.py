"""The merge-map picture, drawn from hand-built results and read back pixel by pixel.

Frames are a single flat colour, so every cell's expected pixel follows from the documented drawing rules
(kept: outline in KEPT_COLOUR; merged: SHADE_ALPHA blend with the segment colour on the segment's first frame;
folded: x FOLD_DIM; dropped: x DROP_DIM; centre: a CENTRE_COLOUR dot), computed here with plain arithmetic.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from holitom_cli import render
from holitom_cli.errors import HolitomError

BASE = (200, 120, 60)  # flat frame colour
GRID = 4
T = 4
SEGMENTS = [(0, 2), (3, 3)]
STATIC = {0, 1, 4, 5}  # positions merged temporally in segment (0, 2)
CENTRES = {0, 5}  # of those, the cluster centres that went to the LLM
KEPT_IN_SEG0 = {2, 3, 8, 13}  # dynamic positions kept on frames 0..2; the other dynamic ones are dropped
DROPPED_ON_LAST = {15}  # frame 3 (a singleton segment) keeps everything but position 15


def flat_frames(num: int = T, h: int = 30, w: int = 40) -> np.ndarray:
    frames = np.empty((num, h, w, 3), dtype=np.uint8)
    frames[...] = BASE
    return frames


def hand_result(as_torch: bool = False) -> SimpleNamespace:
    """A CompressionResult-like object: static tokens first per segment, then per-frame tokens."""
    n = GRID * GRID
    frame_index, spatial_index, is_static = [], [], []
    for p in sorted(CENTRES):
        frame_index.append(0), spatial_index.append(p), is_static.append(True)
    for t in range(3):
        for p in sorted(KEPT_IN_SEG0):
            frame_index.append(t), spatial_index.append(p), is_static.append(False)
    for p in range(n):
        if p not in DROPPED_ON_LAST:
            frame_index.append(3), spatial_index.append(p), is_static.append(False)
    static_mask = np.zeros((2, n), dtype=bool)
    static_mask[0, sorted(STATIC)] = True
    fields = dict(
        frame_index=np.array(frame_index),
        spatial_index=np.array(spatial_index),
        is_static=np.array(is_static),
        static_mask=static_mask,
    )
    if as_torch:
        import torch

        fields = {k: torch.from_numpy(v) for k, v in fields.items()}
    reduced = len(STATIC) * 2
    return SimpleNamespace(
        segments=list(SEGMENTS),
        num_input=T * n,
        num_after_temporal=T * n - reduced,
        reduced=reduced,
        effective_ratio=0.5,
        **fields,
    )


def expected_state(t: int, p: int) -> str:
    """The state of cell (t, p), straight from the hand-built description above."""
    if t < 3:
        if p in STATIC:
            return "merged" if t == 0 else "folded"
        return "kept" if p in KEPT_IN_SEG0 else "dropped"
    return "dropped" if p in DROPPED_ON_LAST else "kept"


def px(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return img.convert("RGB").getpixel(xy)


def close(a, b, tol: int = 1) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def interior(box) -> tuple[int, int]:
    """A pixel inside the cell, clear of the grid line, the outline and the centre dot."""
    x0, y0, _, _ = box
    return x0 + 2, y0 + 2


def test_every_cell_reads_back_as_its_state():
    img = render.render_merge_map(flat_frames(), [0.0, 0.5, 1.0, 1.5], hand_result(), grid=GRID, tile=48)
    lay = render.merge_map_layout(T, GRID, 48)
    assert lay.cell == 12 and lay.outline_width == 1
    a, seg_colour = render.SHADE_ALPHA, render.SEGMENT_COLOURS[0]
    shaded = tuple(round((1 - a) * b + a * c) for b, c in zip(BASE, seg_colour, strict=True))
    folded = tuple(round(b * render.FOLD_DIM) for b in BASE)
    dropped = tuple(round(b * render.DROP_DIM) for b in BASE)
    seen = set()
    for t in range(T):
        for p in range(GRID * GRID):
            box = lay.cell_box(t, p)
            x0, y0, x1, y1 = box
            state = expected_state(t, p)
            seen.add(state)
            edge = px(img, (x0, (y0 + y1) // 2))  # left edge, middle
            inside = px(img, interior(box))
            centre = px(img, (x0 + lay.cell // 2, y0 + lay.cell // 2))
            if state == "kept":
                assert edge == render.KEPT_COLOUR, (t, p)
                assert close(inside, BASE), (t, p, inside)
            else:
                assert edge != render.KEPT_COLOUR, (t, p)
                want = {"merged": shaded, "folded": folded, "dropped": dropped}[state]
                assert close(inside, want), (t, p, state, inside, want)
            is_centre = t == 0 and p in CENTRES
            assert (centre == render.CENTRE_COLOUR) == is_centre, (t, p)
    assert seen == {"kept", "merged", "folded", "dropped"}


def test_torch_tensors_are_accepted_and_give_the_same_picture():
    pytest.importorskip("torch", reason="torch is only needed to build the tensor-valued result")
    ts = [0.0, 0.5, 1.0, 1.5]
    a = render.render_merge_map(flat_frames(), ts, hand_result(), grid=GRID)
    b = render.render_merge_map(flat_frames(), ts, hand_result(as_torch=True), grid=GRID)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_grid_is_taken_from_the_result():
    img = render.render_merge_map(flat_frames(), [0, 1, 2, 3], hand_result(), tile=48)
    lay = render.merge_map_layout(T, GRID, 48)
    assert img.size[0] == lay.width
    assert px(img, lay.cell_box(0, 2)[:2]) == render.KEPT_COLOUR
    with pytest.raises(ValueError, match="grid"):
        render.render_merge_map(flat_frames(), [0, 1, 2, 3], hand_result(), grid=14)


def test_timeline_spans_have_segment_colours():
    img = render.render_merge_map(flat_frames(), [0, 1, 2, 3], hand_result(), grid=GRID)
    lay = render.merge_map_layout(T, GRID)
    slot = lay.content_width / T
    y = render.MARGIN + 18 + 1  # just inside the top of the bar
    for k, (start, end) in enumerate(SEGMENTS):
        for t in range(start, end + 1):
            x = int(render.MARGIN + (t + 0.1) * slot)
            assert px(img, (x, y)) == render.SEGMENT_COLOURS[k], (k, t)


def count_runs(row: np.ndarray, background) -> int:
    """Number of maximal runs of non-background pixels in an (W, 3) row."""
    on = np.any(row != np.asarray(background), axis=1)
    return int(on[0]) + int(np.count_nonzero(on[1:] & ~on[:-1]))


@pytest.mark.parametrize("num_frames", [1, 3, 8, 11])
def test_size_and_tile_count(num_frames):
    frames = flat_frames(num_frames)
    img = render.render_merge_map(frames, [i / 2 for i in range(num_frames)], None, grid=14)
    cols = min(num_frames, 8)
    rows = -(-num_frames // 8)
    tile = 14 * 12  # default tile: 12 px cells for a 14 x 14 grid
    assert img.size[0] == max(render.MIN_WIDTH, 2 * render.MARGIN + cols * tile + (cols - 1) * render.GAP)
    arr = np.asarray(img)
    lay = render.merge_map_layout(num_frames, 14)
    found = 0
    for r in range(rows):
        y = lay.tiles_top + r * (tile + render.LABEL_H + render.GAP) + tile // 2
        found += count_runs(arr[y], render.BACKGROUND)
    assert found == num_frames
    assert img.size[1] > lay.tiles_bottom


def test_no_compression_draws_every_cell_kept():
    frames = flat_frames(2)
    img = render.render_merge_map(frames, [0.0, 1.0], None, grid=3, tile=60)
    lay = render.merge_map_layout(2, 3, 60)
    for t in range(2):
        for p in range(9):
            x0, y0, x1, y1 = lay.cell_box(t, p)
            assert px(img, (x0, (y0 + y1) // 2)) == render.KEPT_COLOUR
            assert close(px(img, (x0 + lay.cell // 2, y0 + lay.cell // 2)), BASE)
    assert "all kept" in render.counts_line(None, 2, 3)


def test_counts_line_reports_each_stage():
    res = hand_result()
    n_out = 2 + 3 * len(KEPT_IN_SEG0) + (16 - len(DROPPED_ON_LAST))
    line = render.counts_line(res, T, GRID)
    assert f"{T * 16} in -> {T * 16 - 8} after temporal merging" in line
    assert f"-> {n_out} to the LLM" in line
    assert "2 static centres" in line
    assert "1 multi-frame segment)" in line  # one segment spans several frames: singular


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="timestamps"):
        render.render_merge_map(flat_frames(), [0.0], hand_result())
    with pytest.raises(ValueError, match="RGB"):
        render.render_merge_map(np.zeros((2, 5, 5), np.uint8), [0, 1], None)
    bad = hand_result()
    bad.segments = [(0, 2)]  # does not reach frame 3
    with pytest.raises(ValueError, match="cover"):
        render.render_merge_map(flat_frames(), [0, 1, 2, 3], bad)


def test_save_png_and_gif(tmp_path):
    ts = [0.0, 0.5, 1.0, 1.5]
    out = render.save_merge_map(tmp_path / "m.png", flat_frames(), ts, hand_result(), caption="hello")
    assert out == tmp_path / "m.png"
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == render.render_merge_map(flat_frames(), ts, hand_result(), caption="hello").size
    gif = render.save_merge_map(tmp_path / "m.gif", flat_frames(), ts, hand_result(), gif=True)
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == T
    pics = render.render_merge_gif(flat_frames(), ts, hand_result())
    lay = render.gif_layout(GRID)
    # picture t shows frame t: cell 0 is merged (shaded) on frame 0, folded on 1-2, kept on 3
    x, y = interior(lay.cell_box(0, 0))
    assert px(pics[1], (x, y)) == px(pics[2], (x, y)) == tuple(round(b * render.FOLD_DIM) for b in BASE)
    assert px(pics[3], lay.cell_box(0, 0)[:2]) == render.KEPT_COLOUR


@pytest.mark.parametrize(
    ("name", "gif", "match"),
    [
        ("missing/dir/m.png", False, "does not exist"),
        ("m.jpg", False, r"must end in \.png"),
        ("m.png", True, r"must end in \.gif"),
        ("adir.png", False, "is a folder"),
    ],
)
def test_bad_output_paths(tmp_path, name, gif, match):
    (tmp_path / "adir.png").mkdir()
    with pytest.raises(HolitomError, match=match) as info:
        render.save_merge_map(tmp_path / name, flat_frames(), [0, 1, 2, 3], None, gif=gif)
    assert info.value.hint
    assert not (tmp_path / name).is_file()


@pytest.mark.parametrize(
    ("gif_flag", "hint"), [(True, "add --gif"), (False, "end it in .gif for an animation")]
)
def test_wrong_extension_hint_names_what_the_command_offers(tmp_path, gif_flag, hint):
    """inspect has a --gif option; ask --explain and chat's /explain choose the animation by the name."""
    with pytest.raises(HolitomError) as info:
        render.check_output_path(tmp_path / "m.jpg", gif_flag=gif_flag)
    assert hint in info.value.hint


def test_module_does_not_import_torch():
    code = "import sys, holitom_cli.render; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
