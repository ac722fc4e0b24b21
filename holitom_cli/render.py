"""The merge-map picture: what HoliTom kept, merged and dropped, drawn on the sampled frames.

Pillow + numpy only (no torch import): tensors from a ``CompressionResult`` are read through
``np.asarray`` / ``.tolist()``, so numpy arrays work as well.

One PNG contact sheet (:func:`render_merge_map`) shows every temporal unit (a sampled frame for
LLaVA-OneVision; for families whose unit spans several frames, the caller passes the unit's first frame) as a
tile with the ``rows x cols`` token grid over it (the frame resized to the grid's shape: square for
LLaVA-OneVision, the resized video's aspect for Qwen2.5-VL). Each cell ``(t, p)`` (unit ``t``, spatial index
``p`` in row-major order, row = p // cols) is in one state:

- **kept**: a per-frame (dynamic) token that goes to the LLM -> outlined in :data:`KEPT_COLOUR`;
- **merged**: a position merged temporally over its segment, drawn on the segment's first frame (where
  the merged token lives) shaded in the segment's colour (:data:`SEGMENT_COLOURS`);
  a static token that survived clustering as a cluster centre also gets a dot (:data:`CENTRE_COLOUR`);
- **folded**: the same merged position on the segment's other frames -> darkened (x :data:`FOLD_DIM`);
- **dropped**: a dynamic token not chosen by the attention selection -> lightly dimmed (x :data:`DROP_DIM`).

A timeline strip across the top shows the segments as coloured spans with frame numbers; the footer
holds the caller's caption, a token-count line computed from the result, and a legend.
:func:`render_merge_gif` draws one picture per frame for an animated GIF, its tile as wide as the canvas
(:func:`gif_layout`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from holitom_cli.errors import HolitomError

# -- colours (RGB); exposed so tests can read pixels back ------------------------------------------------
KEPT_COLOUR = (255, 221, 0)  # outline of kept per-frame tokens
CENTRE_COLOUR = (255, 255, 255)  # dot on static cluster centres ...
CENTRE_RING = (0, 0, 0)  # ... with a black ring
SEGMENT_COLOURS = (  # cycled over segments; none equals KEPT_COLOUR or CENTRE_COLOUR
    (0, 145, 255),
    (255, 64, 129),
    (0, 200, 83),
    (170, 0, 255),
    (255, 109, 0),
    (0, 184, 212),
    (213, 0, 0),
    (48, 79, 254),
)
NO_COMPRESSION_COLOUR = (110, 110, 120)  # timeline bar when compression is off
BACKGROUND = (22, 22, 26)
TEXT_COLOUR = (235, 235, 235)
MUTED_TEXT = (160, 160, 170)
SHADE_ALPHA = 0.55  # merged cell = (1 - a) * frame + a * segment colour
FOLD_DIM = 0.3  # folded cell = frame * FOLD_DIM
DROP_DIM = 0.7  # dropped cell = frame * DROP_DIM
GRID_DIM = 0.6  # grid lines = pixel * GRID_DIM (inner cell boundaries only)

# cell states (values of the (T, N) state map)
KEPT, MERGED, FOLDED, DROPPED = 0, 1, 2, 3

# -- geometry --------------------------------------------------------------------------------------------
MARGIN = 16
GAP = 10
LABEL_H = 22  # under each tile: a 3 px segment-colour strip, then "#t  1.25 s"
HEADER_H = 62  # timeline: title row, bar, frame-number row
BAR_H = 20
MAX_COLUMNS = 8
MIN_WIDTH = 760
DEFAULT_TILE = 160  # target size of a tile's longer side in pixels, rounded to a multiple of the grid
MIN_GIF_TILE = 320  # smallest tile of a GIF picture (the tile spans the canvas)
FONT_SIZE = 12


def grid_shape(grid: int | Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of a token grid given as a side (square) or as (rows, cols)."""
    rows, cols = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if rows < 1 or cols < 1:
        raise ValueError(f"need a grid of at least 1 x 1 tokens, got {rows} x {cols}")
    return rows, cols


@dataclass(frozen=True)
class MergeMapLayout:
    """Where things are on the sheet: pixel boxes ``(x0, y0, x1, y1)``, ends exclusive."""

    num_tiles: int
    rows_cells: int  # token grid rows
    cols_cells: int  # token grid columns
    cell: int  # pixels per token cell (square cells)
    columns: int  # tiles per sheet row
    width: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.rows_cells, self.cols_cells

    @property
    def tile_width(self) -> int:
        return self.cols_cells * self.cell

    @property
    def tile_height(self) -> int:
        return self.rows_cells * self.cell

    @property
    def tile(self) -> int:
        """A tile's width (its side for a square grid)."""
        return self.tile_width

    @property
    def rows(self) -> int:
        return math.ceil(self.num_tiles / self.columns)

    @property
    def tiles_top(self) -> int:
        return MARGIN + HEADER_H

    @property
    def tiles_bottom(self) -> int:
        return self.tiles_top + self.rows * (self.tile_height + LABEL_H + GAP) - GAP

    @property
    def content_width(self) -> int:
        return self.width - 2 * MARGIN

    @property
    def outline_width(self) -> int:
        return max(1, min(3, self.cell // 8))

    @property
    def marker_radius(self) -> int:
        return max(2, self.cell // 4)

    def tile_box(self, tile_index: int) -> tuple[int, int, int, int]:
        if not 0 <= tile_index < self.num_tiles:
            raise IndexError(f"tile {tile_index} out of range 0..{self.num_tiles - 1}")
        col, row = tile_index % self.columns, tile_index // self.columns
        x0 = MARGIN + col * (self.tile_width + GAP)
        y0 = self.tiles_top + row * (self.tile_height + LABEL_H + GAP)
        return x0, y0, x0 + self.tile_width, y0 + self.tile_height

    def cell_box(self, tile_index: int, cell_index: int) -> tuple[int, int, int, int]:
        """Box of token ``cell_index`` (row-major, row = cell_index // cols) on tile ``tile_index``."""
        if not 0 <= cell_index < self.rows_cells * self.cols_cells:
            raise IndexError(f"cell {cell_index} out of range 0..{self.rows_cells * self.cols_cells - 1}")
        tx, ty, _, _ = self.tile_box(tile_index)
        row, col = divmod(cell_index, self.cols_cells)
        x0, y0 = tx + col * self.cell, ty + row * self.cell
        return x0, y0, x0 + self.cell, y0 + self.cell


def merge_map_layout(
    num_tiles: int, grid: int | Sequence[int] = 14, tile: int | None = None
) -> MergeMapLayout:
    """Layout of a sheet with ``num_tiles`` tiles of a ``grid`` (side, or (rows, cols)) of token cells;
    ``tile`` is the wanted size of a tile's longer side (rounded to the grid)."""
    if num_tiles < 1:
        raise ValueError(f"need at least one tile, got {num_tiles}")
    rows, cols = grid_shape(grid)
    side = max(rows, cols)
    cell = max(2, (tile if tile is not None else DEFAULT_TILE) // side)
    if tile is None:
        cell = max(cell, math.ceil(DEFAULT_TILE / side))
    columns = min(num_tiles, MAX_COLUMNS)
    width = max(MIN_WIDTH, 2 * MARGIN + columns * (cols * cell + GAP) - GAP)
    return MergeMapLayout(num_tiles, rows, cols, cell, columns, width)


def gif_layout(grid: int | Sequence[int] = 14, tile: int | None = None) -> MergeMapLayout:
    """Layout of one GIF picture: a single tile that spans the whole content width of the canvas.

    ``tile`` None fills a :data:`MIN_WIDTH` canvas; a given ``tile`` (the tile's width) is rounded down to a
    multiple of the grid's columns (at least :data:`MIN_GIF_TILE` pixels, so the timeline and the caption
    stay readable), and the canvas is as wide as the tile plus the margins.
    """
    rows, cols = grid_shape(grid)
    cell = (tile if tile is not None else MIN_WIDTH - 2 * MARGIN) // cols
    cell = max(2, cell, math.ceil(MIN_GIF_TILE / cols))
    return MergeMapLayout(1, rows, cols, cell, 1, 2 * MARGIN + cols * cell)


def cell_box(
    tile_index: int,
    cell_index: int,
    *,
    num_frames: int,
    grid: int | Sequence[int] = 14,
    tile: int | None = None,
) -> tuple[int, int, int, int]:
    """Box of a token cell on the contact sheet of :func:`render_merge_map` with the same arguments."""
    return merge_map_layout(num_frames, grid, tile).cell_box(tile_index, cell_index)


# -- reading the compression result ----------------------------------------------------------------------
def _array(x: Any, dtype: Any = None) -> np.ndarray:
    """numpy view of a numpy array, a (CPU or not) torch tensor or a list."""
    if not isinstance(x, np.ndarray) and hasattr(x, "tolist"):
        x = x.tolist()
    return np.asarray(x, dtype=dtype)


@dataclass(frozen=True)
class CellStates:
    """Per-cell picture of a result: ``state (T, N)`` int, ``centre (T, N)`` bool, ``segments``."""

    state: np.ndarray
    centre: np.ndarray
    segments: list[tuple[int, int]]
    compressed: bool


def infer_grid(result: Any, default: int = 14) -> tuple[int, int]:
    """A square grid from the result's ``static_mask (S, N)`` (sqrt N), else ``default`` x ``default``.

    Only for callers that do not know the grid: a non-square grid must be passed explicitly.
    """
    mask = getattr(result, "static_mask", None) if result is not None else None
    if mask is None:
        return default, default
    arr = _array(mask)
    n = int(arr.shape[-1]) if arr.ndim == 2 else int(arr.size)
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens per unit is not a square grid: pass grid=(rows, cols)")
    return side, side


def cell_states(result: Any, num_frames: int, grid: int | Sequence[int]) -> CellStates:
    """State of every (unit, position) cell; ``result=None`` (compression off) means all kept."""
    rows, cols = grid_shape(grid)
    n = rows * cols
    if result is None:
        return CellStates(
            state=np.full((num_frames, n), KEPT, dtype=np.int8),
            centre=np.zeros((num_frames, n), dtype=bool),
            segments=[(0, num_frames - 1)],
            compressed=False,
        )
    segments = [(int(s), int(e)) for s, e in result.segments]
    if not segments or segments[0][0] != 0 or segments[-1][1] != num_frames - 1:
        raise ValueError(f"segments {segments} do not cover the {num_frames} frames")
    static_mask = _array(result.static_mask, bool).reshape(len(segments), -1)
    if static_mask.shape[1] != n:
        raise ValueError(f"result has {static_mask.shape[1]} tokens per unit, a {rows} x {cols} grid {n}")
    frame_index = _array(result.frame_index, np.int64).reshape(-1)
    spatial_index = _array(result.spatial_index, np.int64).reshape(-1)
    is_static = _array(result.is_static, bool).reshape(-1)
    if frame_index.size and (frame_index.max() >= num_frames or spatial_index.max() >= n):
        raise ValueError("result indexes frames or positions outside the picture")

    state = np.full((num_frames, n), DROPPED, dtype=np.int8)
    for k, (start, end) in enumerate(segments):
        state[start, static_mask[k]] = MERGED
        state[start + 1 : end + 1, static_mask[k]] = FOLDED
    dynamic = ~is_static
    state[frame_index[dynamic], spatial_index[dynamic]] = KEPT
    centre = np.zeros((num_frames, n), dtype=bool)
    centre[frame_index[is_static], spatial_index[is_static]] = True
    return CellStates(state=state, centre=centre, segments=segments, compressed=True)


def counts_line(result: Any, num_frames: int, grid: int | Sequence[int], unit: str = "frame") -> str:
    """One line with the token counts at each stage, from the result's own numbers."""
    rows, cols = grid_shape(grid)
    n_in = num_frames * rows * cols
    if result is None:
        return f"tokens: {n_in} ({_plural(num_frames, unit)} x {rows * cols}), all kept (compression off)"
    n_in = int(getattr(result, "num_input", n_in))
    after_temporal = int(getattr(result, "num_after_temporal", n_in))
    n_out = int(_array(result.frame_index).reshape(-1).size)
    n_static = int(_array(result.is_static, bool).sum())
    merged_segments = sum(1 for s, e in result.segments if e > s)
    line = (
        f"tokens: {n_in} in -> {after_temporal} after temporal merging "
        f"({n_in - after_temporal} folded, {_plural(merged_segments, 'multi-frame segment')}) -> "
        f"{n_out} to the LLM "
        f"({n_out / max(n_in, 1):.1%}: {n_static} static centres + {n_out - n_static} per-frame)"
    )
    ratio = getattr(result, "effective_ratio", None)
    if ratio is not None:
        line += f"; spatial keep ratio r' = {float(ratio):.3f}"
    return line


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# -- drawing ---------------------------------------------------------------------------------------------
@cache
def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def segment_colour(segment_number: int) -> tuple[int, int, int]:
    return SEGMENT_COLOURS[segment_number % len(SEGMENT_COLOURS)]


def _frames_array(frames: Any, timestamps: Sequence[float]) -> np.ndarray:
    arr = _array(frames) if not isinstance(frames, list | tuple) else np.stack([_array(f) for f in frames])
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"frames must be (T, H, W, 3) RGB, got shape {arr.shape}")
    if len(timestamps) != arr.shape[0]:
        raise ValueError(f"{arr.shape[0]} frames but {len(timestamps)} timestamps")
    return np.clip(arr, 0, 255).astype(np.uint8)


def _draw_tile(frame: np.ndarray, states: np.ndarray, colour: tuple[int, int, int], lay: MergeMapLayout):
    """Tile image for one unit: ``frame (H, W, 3)`` uint8, ``states (N,)`` -> RGB (tile_h, tile_w, 3)."""
    (gr, gc), c = lay.grid, lay.cell
    size = (lay.tile_width, lay.tile_height)
    px = np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR))
    # per-cell view (gr, c, gc, c, 3): cell (row, col) = px[row*c:(row+1)*c, col*c:(col+1)*c]
    cells = px.astype(np.float32).reshape(gr, c, gc, c, 3)
    st = states.reshape(gr, gc)
    merged = (st == MERGED)[:, None, :, None, None]
    shade = (1 - SHADE_ALPHA) * cells + SHADE_ALPHA * np.asarray(colour, np.float32)
    cells = np.where(merged, shade, cells)
    cells = np.where((st == FOLDED)[:, None, :, None, None], cells * FOLD_DIM, cells)
    cells = np.where((st == DROPPED)[:, None, :, None, None], cells * DROP_DIM, cells)
    out = cells.reshape(lay.tile_height, lay.tile_width, 3)
    # inner cell boundaries get a darker 1 px grid line
    out[np.arange(1, gr) * c, :, :] *= GRID_DIM
    out[:, np.arange(1, gc) * c, :] *= GRID_DIM
    out = np.rint(out).astype(np.uint8)
    w = lay.outline_width
    for row, col in zip(*np.nonzero(st == KEPT), strict=True):
        y0, x0 = row * c, col * c
        box = out[y0 : y0 + c, x0 : x0 + c]
        box[:w, :] = box[-w:, :] = KEPT_COLOUR
        box[:, :w] = box[:, -w:] = KEPT_COLOUR
    return out


def _draw_timeline(
    draw: ImageDraw.ImageDraw, cs: CellStates, num_frames: int, lay: MergeMapLayout, hi=None, unit="frame"
):
    font = _font()
    x0, x1, top = MARGIN, MARGIN + lay.content_width, MARGIN
    title = (
        f"{_plural(len(cs.segments), 'segment')} over {_plural(num_frames, unit)}"
        if cs.compressed
        else f"{_plural(num_frames, unit)}, compression off: every token kept"
    )
    draw.text((x0, top), title, fill=TEXT_COLOUR, font=font)
    bar_top = top + 18
    slot = (x1 - x0) / num_frames
    for k, (s, e) in enumerate(cs.segments):
        sx0, sx1 = round(x0 + s * slot), round(x0 + (e + 1) * slot) - 1
        colour = segment_colour(k) if cs.compressed else NO_COMPRESSION_COLOUR
        draw.rectangle([sx0, bar_top, sx1, bar_top + BAR_H - 1], fill=colour)
        label = f"{s}-{e}" if e > s else f"{s}"
        if cs.compressed and font.getlength(label) + 6 < sx1 - sx0:
            draw.text(((sx0 + sx1) / 2, bar_top + BAR_H / 2), label, fill=(0, 0, 0), font=font, anchor="mm")
    if hi is not None:  # GIF: mark the current frame on the bar
        hx0, hx1 = round(x0 + hi * slot), round(x0 + (hi + 1) * slot) - 1
        draw.rectangle([hx0, bar_top - 3, hx1, bar_top + BAR_H + 2], outline=TEXT_COLOUR, width=2)
    step = max(1, math.ceil(font.getlength(f"{num_frames - 1}  ") / slot))
    for t in range(0, num_frames, step):  # unit numbers under the bar
        draw.text(
            (x0 + (t + 0.5) * slot, bar_top + BAR_H + 3), str(t), fill=MUTED_TEXT, font=font, anchor="mt"
        )


def _wrap(text: str, width: float, font) -> list[str]:
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


_LEGEND = (
    ("kept", "kept token (per frame)"),
    ("merged", "merged over its segment (segment colour, first frame)"),
    ("centre", "static cluster centre"),
    ("folded", "folded into the first frame"),
    ("dropped", "dropped by attention selection"),
)


def _shade(base: tuple[int, int, int], colour: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(round((1 - SHADE_ALPHA) * b + SHADE_ALPHA * s) for b, s in zip(base, colour, strict=True))


def _draw_footer(img: Image.Image, top: int, lines: list[str], lay: MergeMapLayout) -> None:
    draw, font = ImageDraw.Draw(img), _font()
    y = top
    for line in lines:
        draw.text((MARGIN, y), line, fill=TEXT_COLOUR, font=font)
        y += 16
    y += 6
    x = MARGIN
    for kind, text in _LEGEND:
        item_w = 22 + font.getlength(text) + 18
        if x > MARGIN and x + item_w > MARGIN + lay.content_width:
            x, y = MARGIN, y + 20
        sw = [x, y, x + 15, y + 15]
        base = (128, 128, 128)
        if kind == "kept":
            draw.rectangle(sw, fill=base, outline=KEPT_COLOUR, width=2)
        elif kind in ("merged", "centre"):
            draw.rectangle(sw, fill=_shade(base, SEGMENT_COLOURS[0]))
        if kind == "centre":
            draw.ellipse([x + 3, y + 3, x + 12, y + 12], fill=CENTRE_COLOUR, outline=CENTRE_RING)
        elif kind in ("folded", "dropped"):
            dim = FOLD_DIM if kind == "folded" else DROP_DIM
            draw.rectangle(sw, fill=tuple(round(b * dim) for b in base))
        draw.text((x + 22, y + 8), text, fill=TEXT_COLOUR, font=font, anchor="lm")
        x += round(item_w)


def _footer_lines(caption: str, result: Any, num_frames: int, lay: MergeMapLayout, unit: str) -> list[str]:
    counts = counts_line(result, num_frames, lay.grid, unit)
    text = "\n".join(part for part in (caption.strip(), counts) if part)
    return _wrap(text, lay.content_width, _font())


def _legend_rows(lay: MergeMapLayout) -> int:
    font, x, rows = _font(), MARGIN, 1
    for _, text in _LEGEND:
        item_w = 22 + font.getlength(text) + 18
        if x > MARGIN and x + item_w > MARGIN + lay.content_width:
            x, rows = MARGIN, rows + 1
        x += round(item_w)
    return rows


def _compose(
    frames: np.ndarray,
    timestamps: Sequence[float],
    cs: CellStates,
    shown: list[int],
    lay: MergeMapLayout,
    footer: list[str],
    highlight: int | None = None,
    unit: str = "frame",
) -> Image.Image:
    height = lay.tiles_bottom + 14 + 16 * len(footer) + 6 + 20 * _legend_rows(lay) + MARGIN
    img = Image.new("RGB", (lay.width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    _draw_timeline(draw, cs, frames.shape[0], lay, highlight, unit)
    seg_of = np.zeros(frames.shape[0], dtype=int)
    for k, (s, e) in enumerate(cs.segments):
        seg_of[s : e + 1] = k
    font = _font()
    for i, t in enumerate(shown):
        colour = segment_colour(seg_of[t]) if cs.compressed else NO_COMPRESSION_COLOUR
        x0, y0, x1, y1 = lay.tile_box(i)
        img.paste(Image.fromarray(_draw_tile(frames[t], cs.state[t], colour, lay)), (x0, y0))
        r = lay.marker_radius
        for p in np.nonzero(cs.centre[t])[0]:
            cx0, cy0, _, _ = lay.cell_box(i, int(p))
            cx, cy = cx0 + lay.cell // 2, cy0 + lay.cell // 2
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=CENTRE_COLOUR, outline=CENTRE_RING)
        draw.rectangle([x0, y1 + 1, x1 - 1, y1 + 3], fill=colour)  # segment strip under the tile
        label = f"#{t}  {float(timestamps[t]):.2f} s"
        if highlight is not None:  # GIF: one unit per picture, say which
            label += f"  ·  {unit} {t + 1} of {frames.shape[0]}"
        draw.text((x0, y1 + 6), label, fill=TEXT_COLOUR, font=font)
    _draw_footer(img, lay.tiles_bottom + 14, footer, lay)
    return img


def _prepare(frames, timestamps, result, grid):
    arr = _frames_array(frames, timestamps)
    grid = grid_shape(grid) if grid is not None else infer_grid(result)
    return arr, grid, cell_states(result, arr.shape[0], grid)


def render_merge_map(
    frames: Any,
    timestamps: Sequence[float],
    result: Any,
    *,
    grid: int | Sequence[int] | None = None,
    caption: str = "",
    tile: int | None = None,
    unit: str = "frame",
) -> Image.Image:
    """Contact sheet of all temporal units: ``frames (T', H, W, 3)`` uint8 RGB (one picture per unit, e.g.
    its first frame), ``timestamps (T',)`` seconds.

    ``result``: a ``CompressionResult`` (or any object with ``segments``, ``static_mask (S, N)``,
    ``frame_index (M,)``, ``spatial_index (M,)``, ``is_static (M,)``), or None for "compression off".
    ``grid``: the token grid, (rows, cols) or a side; None takes a square sqrt(N) from the result (14
    without one). ``tile``: wanted size of a tile's longer side in pixels (rounded down to a multiple of the
    grid). ``unit``: what a tile is called in the texts ("frame", "unit"). Tile ``i`` shows unit ``i``;
    locate cells with ``merge_map_layout(T', grid, tile).cell_box(i, p)``.
    """
    arr, grid, cs = _prepare(frames, timestamps, result, grid)
    lay = merge_map_layout(arr.shape[0], grid, tile)
    footer = _footer_lines(caption, result, arr.shape[0], lay, unit)
    return _compose(arr, timestamps, cs, list(range(arr.shape[0])), lay, footer, unit=unit)


def render_merge_gif(
    frames: Any,
    timestamps: Sequence[float],
    result: Any,
    *,
    grid: int | Sequence[int] | None = None,
    caption: str = "",
    tile: int | None = None,
    unit: str = "frame",
) -> list[Image.Image]:
    """One picture per temporal unit: its tile across the whole canvas width, under the timeline (current
    unit marked) and over the caption.

    Same arguments as :func:`render_merge_map`; ``tile`` (the tile's width) defaults to filling a
    :data:`MIN_WIDTH` canvas. In every picture the tile is at ``gif_layout(grid, tile)`` position 0.
    """
    arr, grid, cs = _prepare(frames, timestamps, result, grid)
    lay = gif_layout(grid, tile)
    footer = _footer_lines(caption, result, arr.shape[0], lay, unit)
    return [
        _compose(arr, timestamps, cs, [t], lay, footer, highlight=t, unit=unit) for t in range(arr.shape[0])
    ]


# -- saving ----------------------------------------------------------------------------------------------
def check_output_path(path: str | os.PathLike[str], *, gif: bool = False, gif_flag: bool = True) -> Path:
    """Validate an output path before any heavy work; raises :class:`HolitomError` with a hint.

    ``gif_flag``: the command has a ``--gif`` option (``inspect``); otherwise (``ask --explain``, chat's
    ``/explain``) a ``.gif`` name is what asks for an animation, and the hint says so.
    """
    out = Path(path).expanduser()
    want = ".gif" if gif else ".png"
    if out.suffix.lower() != want:
        animated = (" (or add --gif for an animated .gif)" if gif_flag
                    else " (or end it in .gif for an animation)")  # fmt: skip
        hint = f"name the file with a {want} extension, e.g. merge-map{want}" + ("" if gif else animated)
        raise HolitomError(f"cannot write the merge map to '{path}': the file must end in {want}", hint=hint)
    if out.is_dir():
        raise HolitomError(f"cannot write the merge map to '{path}': it is a folder", hint="give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise HolitomError(
            f"cannot write the merge map to '{path}': '{parent}' is a file, not a folder",
            hint="choose a path inside a folder",
        )
    if not parent.is_dir():
        raise HolitomError(
            f"cannot write the merge map to '{path}': folder '{parent}' does not exist",
            hint=f"create it first (mkdir -p {parent}) or choose another path",
        )
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise HolitomError(
            f"cannot write the merge map to '{path}': permission denied", hint="choose a writable location"
        )
    return out


def save_merge_map(
    path: str | os.PathLike[str],
    frames: Any,
    timestamps: Sequence[float],
    result: Any,
    *,
    grid: int | Sequence[int] | None = None,
    caption: str = "",
    gif: bool = False,
    tile: int | None = None,
    frame_duration_ms: int = 500,
    unit: str = "frame",
) -> Path:
    """Render and write the merge map (PNG, or an animated GIF with ``gif=True``); returns the path."""
    out = check_output_path(path, gif=gif)
    try:
        if gif:
            pics = render_merge_gif(
                frames, timestamps, result, grid=grid, caption=caption, tile=tile, unit=unit
            )
            pics[0].save(
                out, save_all=True, append_images=pics[1:], duration=frame_duration_ms, loop=0, optimize=False
            )
        else:
            picture = render_merge_map(
                frames, timestamps, result, grid=grid, caption=caption, tile=tile, unit=unit
            )
            picture.save(out)
    except OSError as exc:
        raise HolitomError(
            f"cannot write the merge map to '{path}': {exc}", hint="choose a writable location"
        ) from exc
    return out
