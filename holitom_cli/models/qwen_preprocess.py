"""Qwen2-VL / Qwen2.5-VL video preprocessing without torchvision, and the frame timing of qwen-vl-utils.

What the checkpoint's ``Qwen2VLVideoProcessor`` does, step by step (transformers' video processor needs
torchvision, which cannot be installed beside the CPU torch; we resize with Pillow like its PIL-only image
processor ``Qwen2VLImageProcessorPil``):

1. smart resize: both sides to multiples of ``factor = patch_size * merge_size`` (rounded), then scaled
   down (floor) or up (ceil) so that ``min_pixels <= H * W <= max_pixels``, aspect ratio kept;
2. bicubic resize of the uint8 frame, rescale by ``rescale_factor`` (1/255), normalise with the
   checkpoint's mean/std (CLIP's for every Qwen-VL release);
3. an odd frame count is padded by repeating the last frame; consecutive frame pairs form one temporal patch
   (``temporal_patch_size`` = 2);
4. patchify: per temporal patch, merged cells in row-major order, inside a cell its ``merge x merge``
   patches row-major, each patch flattened as (channel, time, y, x): ``(T' * gh * gw, C * 2 * p * p)``.

Timing (as qwen-vl-utils): ``sample_fps = frames / total_frames * video_fps`` and
``second_per_grid_ts = temporal_patch_size / sample_fps``; without the source's frame count and fps, the
sampled timestamps' mean spacing gives ``sample_fps``.
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

__all__ = ["QwenPixels", "QwenVideoPreprocessing", "smart_resize"]

# Checked in this order, like transformers' AutoVideoProcessor (the video file wins over the image one).
_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")
# Qwen2VLVideoProcessor's class defaults (size in pixels), used for keys a saved config leaves out.
_DEFAULTS: dict[str, Any] = {
    "min_pixels": 128 * 28 * 28,
    "max_pixels": 768 * 28 * 28,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": (0.48145466, 0.4578275, 0.40821073),
    "image_std": (0.26862954, 0.26130258, 0.27577711),
}
_DEFAULT_FPS = 2.0  # qwen-vl-utils' FPS, used only when the timing cannot be derived


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H', W'): multiples of ``factor`` with ``min_pixels <= H' W' <= max_pixels``, aspect ratio kept."""
    if min(height, width) < 1 or max(height, width) / min(height, width) > 200:
        raise ModelError(
            f"a {width}x{height} frame cannot be resized for Qwen-VL (aspect ratio above 200)",
            hint="use a video with a less extreme aspect ratio",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class QwenPixels:
    """Preprocessed video, as transformers' processor returns it (plus the timing HoliTom needs).

    pixel_values_videos: (T' * gh * gw, C * temporal_patch_size * p * p) float32 patches.
    video_grid_thw: (1, 3) long, (T', gh, gw) in patches. second_per_grid_ts: seconds per temporal patch.
    unit_times: T' floats, the timestamp of each temporal patch's first frame. size: resized (H, W).
    """

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    second_per_grid_ts: float
    unit_times: list[float]
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
class QwenVideoPreprocessing:
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
    def from_checkpoint(cls, path: Path, vision_config: Any) -> QwenVideoPreprocessing:
        """Settings from ``video_preprocessor_config.json`` or ``preprocessor_config.json``, checked
        against the vision tower's patch, temporal patch and merge sizes."""
        spec, source = _read(Path(path))
        size = spec.get("size") or {}
        values = dict(_DEFAULTS)
        values["min_pixels"] = size.get("shortest_edge", values["min_pixels"])
        values["max_pixels"] = size.get("longest_edge", values["max_pixels"])
        for key in ("min_pixels", "max_pixels", "resample", "rescale_factor", "image_mean", "image_std"):
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

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(
            height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )

    def normalised_frames(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 3, H', W') float32: resized, rescaled, normalised."""
        from PIL import Image

        height, width = self.target_size(int(frames.shape[1]), int(frames.shape[2]))
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

    def sample_fps(
        self, timestamps: list[float], video_fps: float | None = None, total_frames: int | None = None
    ) -> float:
        """Frames per second of the sampled frames (qwen-vl-utils' formula when the source is known)."""
        count = len(timestamps)
        if video_fps and total_frames and video_fps > 0 and total_frames > 0:
            return count / total_frames * video_fps
        if count >= 2 and timestamps[-1] > timestamps[0]:
            return (count - 1) / (timestamps[-1] - timestamps[0])
        return _DEFAULT_FPS

    def __call__(
        self,
        frames: np.ndarray,
        timestamps: list[float],
        *,
        video_fps: float | None = None,
        total_frames: int | None = None,
    ) -> QwenPixels:
        """(T, H, W, 3) uint8 RGB frames and their timestamps (seconds) -> :class:`QwenPixels`."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
            raise ValueError(
                f"frames must be (T, H, W, 3) uint8 with T >= 1, got {frames.shape} {frames.dtype}"
            )
        if len(timestamps) != frames.shape[0]:
            raise ValueError(f"{len(timestamps)} timestamps for {frames.shape[0]} frames")
        x = self.normalised_frames(frames)
        patches, grid = self.patchify(x)
        fps = self.sample_fps(list(timestamps), video_fps, total_frames)
        tps = self.temporal_patch_size
        return QwenPixels(
            pixel_values_videos=patches,
            video_grid_thw=torch.tensor([grid], dtype=torch.long),
            second_per_grid_ts=tps / fps,
            unit_times=[float(timestamps[i]) for i in range(0, frames.shape[0], tps)],
            num_frames=int(frames.shape[0]),
            size=(int(x.shape[2]), int(x.shape[3])),
        )
