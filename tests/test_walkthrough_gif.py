"""Issue 9, finding 8: every GIF picture is one sampled frame's tile across the whole canvas, read back by
pixels (not only "a file exists"), and counts are pluralised."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_render import BASE, GRID, T, expected_state, flat_frames, hand_result, px

from holitom_cli import render

TS = [0.0, 0.5, 1.0, 1.5]


def expected_cell(t: int, p: int) -> tuple[int, ...] | None:
    """Interior pixel of cell (t, p) by the drawing rules (None: kept, whose interior is the frame)."""
    state = expected_state(t, p)
    if state == "merged":
        return tuple(
            round((1 - render.SHADE_ALPHA) * b + render.SHADE_ALPHA * c)
            for b, c in zip(BASE, render.segment_colour(0), strict=True)
        )
    if state == "folded":
        return tuple(round(b * render.FOLD_DIM) for b in BASE)
    if state == "dropped":
        return tuple(round(b * render.DROP_DIM) for b in BASE)
    return BASE


def test_gif_tile_spans_the_canvas():
    """Found from the pixels alone: just under the timeline, the picture runs from margin to margin."""
    pics = render.render_merge_gif(flat_frames(), TS, hand_result(), caption="question")
    assert len(pics) == T
    for pic in pics:
        width, _ = pic.size
        arr = np.asarray(pic.convert("RGB"))
        row = arr[render.MARGIN + render.HEADER_H + 40]  # a row through the tile (below the timeline)
        drawn = np.nonzero(np.any(row != np.asarray(render.BACKGROUND), axis=1))[0]
        assert drawn.min() == render.MARGIN and drawn.max() == width - render.MARGIN - 1
        assert np.any(row != np.asarray(render.BACKGROUND), axis=1)[
            render.MARGIN : width - render.MARGIN
        ].all()


@pytest.mark.parametrize("t", range(T))
def test_gif_picture_t_shows_frame_t_cell_by_cell(t):
    pic = render.render_merge_gif(flat_frames(), TS, hand_result())[t]
    lay = render.gif_layout(GRID)
    for p in range(GRID * GRID):
        box = lay.cell_box(0, p)
        if expected_state(t, p) == "kept":
            assert px(pic, box[:2]) == render.KEPT_COLOUR, (t, p)
        want = expected_cell(t, p)
        inset = lay.outline_width + 2  # clear of the grid line, the outline and the centre dot
        got = px(pic, (box[0] + inset, box[1] + inset))
        assert all(abs(a - b) <= 1 for a, b in zip(got, want, strict=True)), (t, p, got, want)


def test_gif_file_keeps_the_layout(tmp_path):
    out = render.save_merge_map(tmp_path / "m.gif", flat_frames(), TS, hand_result(), gif=True)
    lay = render.gif_layout(GRID)
    with Image.open(out) as im:
        assert im.n_frames == T
        for k in range(T):
            im.seek(k)
            rgb = im.convert("RGB")
            assert rgb.size[0] == lay.width
            # a pixel near the right end of the tile is part of the picture, not empty canvas
            x = lay.tile_box(0)[2] - lay.cell // 2
            y = (lay.tile_box(0)[1] + lay.tile_box(0)[3]) // 2
            assert max(abs(a - b) for a, b in zip(rgb.getpixel((x, y)), render.BACKGROUND, strict=True)) > 20


def test_gif_with_a_given_tile_size():
    lay = render.gif_layout(7, tile=400)
    assert lay.tile == 7 * (400 // 7) and lay.width == lay.tile + 2 * render.MARGIN
    small = render.gif_layout(14, tile=20)  # never smaller than a readable picture
    assert small.tile >= render.MIN_GIF_TILE


def test_single_frame_counts_are_singular():
    one = flat_frames(1)
    assert "(1 frame x" in render.counts_line(None, 1, GRID)
    pics = render.render_merge_gif(one, [0.0], None, grid=GRID)
    assert len(pics) == 1 and pics[0].size[0] == render.gif_layout(GRID).width
