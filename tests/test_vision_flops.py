"""Each adapter's vision FLOPs (issue 10) against torch's FLOP counter on the model's eager vision forward.

``torch.utils.flop_counter.FlopCounterMode`` counts every matrix product the unmodified vision code runs
(eager attention, so the attention products are plain bmm; Qwen2.5-VL's window attention runs one product
per window). Our counts leave out the patch-embedding convolution, so the counter's convolution is excluded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from holitom_cli.models import load_model
from holitom_cli.models.random_qwen import save_random_qwen


def counted(run) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    ops = counter.get_flop_counts()["Global"]
    return sum(v for op, v in ops.items() if "convolution" not in str(op))


def frames(count: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, height, width, 3)).astype(np.uint8)


def test_llava_onevision_vision_flops(tiny_model_dir) -> None:
    vlm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    vlm.model.set_attn_implementation("eager")
    pixels = vlm.preprocess(frames(3, 64, 96))
    base = vlm.model.model
    expected = counted(lambda: base.get_video_features(pixel_values_videos=pixels.pixel_values[None]))
    assert vlm.vision_flops(vlm.encode_video(pixels)) == expected


@pytest.mark.parametrize(("count", "height", "width"), [(4, 200, 260), (5, 90, 120), (2, 300, 120)])
def test_qwen2_5_vl_vision_flops(tmp_path, count, height, width) -> None:
    """Grids with full and partial attention windows (odd frame counts: the last frame repeated)."""
    vlm = load_model(str(save_random_qwen(tmp_path / "q", "qwen2_5_vl-tiny")), device="cpu", dtype="float32")
    vlm.model.set_attn_implementation("eager")
    pixels = vlm.preprocess(frames(count, height, width), [0.5 * i for i in range(count)])
    visual = vlm.model.model.visual
    expected = counted(lambda: visual(pixels.pixel_values_videos, grid_thw=pixels.video_grid_thw))
    tokens = vlm.encode_video(pixels)
    assert tokens.grid[0] != tokens.grid[1]
    assert vlm.vision_flops(tokens) == expected
