"""Qwen3-VL video preprocessing without torchvision, and the per-temporal-patch timestamps of its processor.

What the checkpoint's ``Qwen3VLVideoProcessor`` does (transformers 5.20-5.24), step by step:

1. smart resize of the whole clip: both sides to multiples of ``factor = patch_size * merge_size`` (32),
   sides below ``factor`` scaled up first, then scaled down (floor) or up (ceil) so that
   ``min_pixels <= T'' * H * W <= max_pixels`` where ``T''`` is the frame count rounded to the temporal
   patch size: the budget (``size.longest_edge``) is for the whole clip, not per frame. The processor's
   optional ``cap_pixels_per_frame`` (off by default up to 5.24) is not applied, as by default;
2. bicubic resize of the uint8 frames, rescale by ``rescale_factor`` (1/255), normalise with the checkpoint's
   mean/std (0.5 for every Qwen3-VL release);
3. an odd frame count is padded by repeating the last frame; consecutive frame pairs form one temporal patch;
4. patchify exactly as Qwen2-VL: per temporal patch, merged cells in row-major order, inside a cell its
   ``merge x merge`` patches row-major, each patch flattened as (channel, time, y, x).

Differences (our choices): Pillow's bicubic filter resizes (the video processor's torchvision resize cannot
run beside the CPU torch), so pixels can differ from a torchvision-resized clip by the usual bicubic/antialias
rounding; a single frame is sized as the two-frame temporal patch it becomes (the processor refuses fewer
frames than the temporal patch size).

Timestamps, as ``Qwen3VLProcessor._calculate_timestamps``: each temporal patch is labelled with the mean of
its first and last frame's time (the last frame repeated for an odd count), written ``<{t:.1f} seconds>``.
The processor derives the times from ``frames_indices / fps``; here they are the sampled frames' own
timestamps, i.e. the frames actually sampled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from holitom_cli.errors import ModelError

__all__ = ["Qwen3Pixels", "Qwen3VideoPreprocessing", "smart_resize_clip", "unit_timestamps"]

# Checked in this order, like transformers' AutoVideoProcessor (the video file wins over the image one).
_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")
# Qwen3VLVideoProcessor's class defaults, used for keys a saved config leaves out.
_DEFAULTS: dict[str, Any] = {
    "min_pixels": 128 * 32 * 32,
    "max_pixels": 32 * 32 * 768,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": (0.5, 0.5, 0.5),
    "image_std": (0.5, 0.5, 0.5),
}


def smart_resize_clip(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
) -> tuple[int, int]:
    """(H', W') of every frame: multiples of ``factor`` with the clip's ``T'' H' W'`` inside the budget."""
    if min(height, width) < 1:
        raise ModelError(f"a {width}x{height} frame cannot be resized for Qwen3-VL")
    num_frames = max(int(num_frames), temporal_factor)  # one frame becomes a two-frame temporal patch
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ModelError(
            f"a {width}x{height} frame cannot be resized for Qwen3-VL (aspect ratio above 200)",
            hint="use a video with a less extreme aspect ratio",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def unit_timestamps(timestamps: list[float], temporal_patch_size: int) -> list[float]:
    """Per temporal patch: the mean of its first and last frame's time (last frame repeated), seconds."""
    times = [float(t) for t in timestamps]
    if pad := -len(times) % temporal_patch_size:
        times += [times[-1]] * pad
    return [
        (times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)
    ]


@dataclass
class Qwen3Pixels:
    """Preprocessed video, as transformers' processor returns it, plus the timing the prompt needs.

    pixel_values_videos: (T' * gh * gw, C * temporal_patch_size * p * p) float32 patches.
    video_grid_thw: (1, 3) long, (T', gh, gw) in patches. unit_times: T' floats, each temporal patch's first
    frame (seconds). unit_seconds: T' floats, the processor's timestamp of each temporal patch (the mean of
    its first and last frame). size: resized (H, W).
    """

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    unit_times: list[float]
    unit_seconds: list[float]
    num_frames: int
    size: tuple[int, int]


def _read(path: Path) -> tuple[dict[str, Any], str]:
    for name in _FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            spec = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelError(
                f"the preprocessor config {file} is broken ({type(exc).__name__}: {exc})",
                hint="the download may be incomplete: run `holitom download` again, or fix the file",
            ) from exc
        if isinstance(spec, dict):
            return spec.get("video_processor") or spec, name
    return {}, "defaults"


@dataclass(frozen=True)
class Qwen3VideoPreprocessing:
    """The checkpoint's video preprocessing settings (see the module docstring for the steps)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    resample: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    @classmethod
    def from_checkpoint(cls, path: Path, vision_config: Any) -> Qwen3VideoPreprocessing:
        """Settings from ``video_preprocessor_config.json`` or ``preprocessor_config.json``, checked
        against the vision tower's patch, temporal patch and merge sizes."""
        spec, source = _read(Path(path))
        size = spec.get("size") or {}
        values = dict(_DEFAULTS)
        values["min_pixels"] = size.get("shortest_edge", spec.get("min_pixels", values["min_pixels"]))
        values["max_pixels"] = size.get("longest_edge", spec.get("max_pixels", values["max_pixels"]))
        for key in ("resample", "rescale_factor", "image_mean", "image_std"):
            if spec.get(key) is not None:
                values[key] = spec[key]
        normalize = spec.get("do_normalize", True)
        mean = tuple(float(v) for v in values["image_mean"]) if normalize else (0.0,) * 3
        std = tuple(float(v) for v in values["image_std"]) if normalize else (1.0,) * 3
        tower = {
            "patch_size": int(vision_config.patch_size),
            "temporal_patch_size": int(vision_config.temporal_patch_size),
            "merge_size": int(vision_config.spatial_merge_size),
        }
        for key, expected in tower.items():
            found = int(spec.get(key, expected))
            if found != expected:
                raise ModelError(
                    f"the checkpoint's {source} has {key}={found} but its vision tower uses {expected}",
                    hint="the checkpoint's preprocessor config does not match its model config",
                )
        if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
            raise ModelError(f"{source}: image_mean and image_std must hold 3 values, std > 0")
        return cls(
            min_pixels=int(values["min_pixels"]),
            max_pixels=int(values["max_pixels"]),
            resample=int(values["resample"]),
            rescale_factor=float(values["rescale_factor"]) if spec.get("do_rescale", True) else 1.0,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            source=source,
            **tower,
        )

    def target_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        return smart_resize_clip(
            num_frames,
            height,
            width,
            self.temporal_patch_size,
            self.patch_size * self.merge_size,
            self.min_pixels,
            self.max_pixels,
        )

    def normalised_frames(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 3, H', W') float32: resized, rescaled, normalised."""
        from PIL import Image

        height, width = self.target_size(int(frames.shape[0]), int(frames.shape[1]), int(frames.shape[2]))
        resized = np.stack(
            [np.asarray(Image.fromarray(f).resize((width, height), resample=self.resample)) for f in frames]
        )  # (T, H', W', 3) uint8
        x = torch.from_numpy((resized.astype(np.float64) * self.rescale_factor).astype(np.float32))
        x = (x - torch.tensor(self.mean, dtype=torch.float32)) / torch.tensor(self.std, dtype=torch.float32)
        return x.permute(0, 3, 1, 2).contiguous()

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(T, 3, H', W') -> ((T' gh gw, 3 tps p p), (T', gh, gw)); an odd T repeats the last frame."""
        tps, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -x.shape[0] % tps:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        frames, channels, height, width = x.shape
        gt, gh, gw = frames // tps, height // p, width // p
        # (T', tps, C, gh/m, m, p, gw/m, m, p) -> (T', gh/m, gw/m, m, m, C, tps, p, p)
        x = x.view(gt, tps, channels, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, channels * tps * p * p), (gt, gh, gw)

    def __call__(self, frames: np.ndarray, timestamps: list[float]) -> Qwen3Pixels:
        """(T, H, W, 3) uint8 RGB frames and their timestamps (seconds) -> :class:`Qwen3Pixels`."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
            raise ValueError(
                f"frames must be (T, H, W, 3) uint8 with T >= 1, got {frames.shape} {frames.dtype}"
            )
        if len(timestamps) != frames.shape[0]:
            raise ValueError(f"{len(timestamps)} timestamps for {frames.shape[0]} frames")
        x = self.normalised_frames(frames)
        patches, grid = self.patchify(x)
        tps = self.temporal_patch_size
        return Qwen3Pixels(
            pixel_values_videos=patches,
            video_grid_thw=torch.tensor([grid], dtype=torch.long),
            unit_times=[float(timestamps[i]) for i in range(0, frames.shape[0], tps)],
            unit_seconds=unit_timestamps(list(timestamps), tps),
            num_frames=int(frames.shape[0]),
            size=(int(x.shape[2]), int(x.shape[3])),
        )
