"""A stacked horizontal bar chart of the TTFT breakdown per arm, drawn with Pillow only (no matplotlib).

``draw_ttft_chart(panels, path)``: one panel per configuration (e.g. "0.5B, 32 frames"), one bar per arm
(baseline and each preset), segments = TTFT stages in seconds, the total written after each bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

#: Stage key -> (legend label, colour). The order is the stacking order (left to right).
STAGES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "decode_video": ("video decode", (140, 140, 140)),
    "vision": ("vision tower", (66, 133, 244)),
    "compression": ("compression", (251, 188, 5)),
    "prefill": ("LLM prefill", (219, 68, 55)),
}


@dataclass
class Panel:
    """One configuration: a title and, per arm, the seconds spent in each stage of ``STAGES``."""

    title: str
    arms: list[tuple[str, dict[str, float]]]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _nice_step(span: float) -> float:
    """A round tick step giving about 5 ticks over ``span``."""
    raw = span / 5 if span > 0 else 1.0
    mag = 10 ** int(f"{raw:e}".split("e")[1])
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def draw_ttft_chart(panels: Sequence[Panel], path: str | Path, title: str = "Time to first token") -> Path:
    """Draw the panels into a PNG at ``path`` and return the path."""
    width, left, right = 1000, 150, 90
    bar_h, gap, panel_head, axis_h = 26, 10, 34, 26
    top = 70
    height = top + sum(panel_head + len(p.arms) * (bar_h + gap) + axis_h + 16 for p in panels) + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_txt, f_small = _font(20), _font(14), _font(12)
    draw.text((left, 12), title, fill="black", font=f_title)

    # legend
    x = left
    for label, colour in STAGES.values():
        draw.rectangle([x, 44, x + 14, 58], fill=colour)
        draw.text((x + 20, 43), label, fill="black", font=f_small)
        x += 20 + _text_width(draw, label, f_small) + 24

    y = top
    plot_w = width - left - right
    for panel in panels:
        draw.text((10, y + 6), panel.title, fill="black", font=f_txt)
        y += panel_head
        totals = [sum(stages.get(k, 0.0) for k in STAGES) for _, stages in panel.arms]
        vmax = max(totals + [1e-9])
        step = _nice_step(vmax)
        scale = plot_w / (step * (int(vmax / step) + 1))
        y_axis = y + len(panel.arms) * (bar_h + gap)
        ticks = [i * step for i in range(int(plot_w / (step * scale) + 1e-6) + 1)]
        for tick in ticks:  # grid first, so the bars cover it
            tx = round(left + tick * scale)
            draw.line([tx, y - 2, tx, y_axis], fill=(225, 225, 225))
        for (name, stages), total in zip(panel.arms, totals, strict=True):
            draw.text((left - 10 - _text_width(draw, name, f_txt), y + 5), name, fill="black", font=f_txt)
            x = float(left)
            for key, (_, colour) in STAGES.items():
                w = stages.get(key, 0.0) * scale
                if w > 0:
                    draw.rectangle([round(x), y, max(round(x + w) - 1, round(x)), y + bar_h], fill=colour)
                x += w
            draw.text((round(x) + 6, y + 5), f"{total:.2f} s", fill="black", font=f_small)
            y += bar_h + gap
        # axis with ticks
        draw.line([left, y, left + plot_w, y], fill="black")
        for tick in ticks:
            tx = round(left + tick * scale)
            draw.line([tx, y, tx, y + 4], fill="black")
            label = f"{tick:g} s"
            draw.text((tx - _text_width(draw, label, f_small) // 2, y + 6), label, fill="black", font=f_small)
        y += axis_h + 16
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
