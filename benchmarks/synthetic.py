"""Synthetic inputs for the benchmarks: video features with realistic temporal redundancy, and a test clip.

``synthetic_features`` stands in for the pooled, projected vision features (T, N, C) that the compression
stage receives. Real video features are redundant in time: most positions change slowly, a moving object
changes a few positions a lot, and scene cuts change everything. The generator mimics exactly that:

- the video is split into scenes at random cuts (on average one every ``mean_scene`` frames);
- each scene draws a fresh base vector per position (unit-variance Gaussian, C channels);
- within a scene every position drifts slowly (a random walk with step ``drift``) and gets per-frame
  noise whose scale is drawn per position from [``noise_lo``, ``noise_hi``], so the adjacent-frame cosine
  similarity of a position lies between about 0.99 and 0.6 (≈ 1 / (1 + 2 sigma^2));
- a square "object" of ``obj`` x ``obj`` grid cells moves one cell per frame; the positions it covers get
  brand-new vectors each frame (similarity ~0).

The saliency scores (T, N) are a per-frame softmax of Gaussian logits, like a received-attention map.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def synthetic_features(
    frames: int,
    tokens: int = 196,
    channels: int = 896,
    *,
    seed: int = 0,
    mean_scene: float = 12.0,
    drift: float = 0.05,
    noise_lo: float = 0.05,
    noise_hi: float = 0.6,
    obj: int = 3,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Return (features (T, N, C) in ``dtype``, scores (T, N) float32, scene start frames).

    Built frame by frame straight into ``dtype`` so 256 x 196 x 3584 features never exist in fp32.
    """
    g = torch.Generator().manual_seed(seed)
    side = math.isqrt(tokens)
    cut_prob = 1.0 / mean_scene
    feats = torch.empty(frames, tokens, channels, dtype=dtype)
    scene_starts: list[int] = []
    base = sigma = None
    for t in range(frames):
        if t == 0 or torch.rand((), generator=g).item() < cut_prob:
            scene_starts.append(t)
            base = torch.randn(tokens, channels, generator=g)
            sigma = noise_lo + (noise_hi - noise_lo) * torch.rand(tokens, 1, generator=g)
        else:
            base = base + drift * torch.randn(tokens, channels, generator=g)
        frame = base + sigma * torch.randn(tokens, channels, generator=g)
        if side * side == tokens and obj > 0:
            # the moving object: obj x obj cells, one cell to the right per frame, wrapping around
            col0 = (t - scene_starts[-1]) % max(side - obj + 1, 1)
            row0 = (side - obj) // 2
            for r in range(row0, row0 + obj):
                idx = slice(r * side + col0, r * side + col0 + obj)
                frame[idx] = torch.randn(obj, channels, generator=g)
        feats[t] = frame.to(dtype)
    scores = torch.softmax(2.0 * torch.randn(frames, tokens, generator=g), dim=-1)
    return feats, scores, scene_starts


def adjacent_similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the same position in adjacent frames: (T, N, C) -> (T-1, N), float32."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    return (x[1:] * x[:-1]).sum(-1)


def make_test_video(
    path: str | Path, seconds: float = 8.0, fps: int = 10, size: tuple[int, int] = (320, 240)
) -> Path:
    """Write a small mp4v clip with slow camera drift, a moving box and two scene cuts (OpenCV only)."""
    import cv2
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():  # pragma: no cover - depends on the OpenCV build
        raise RuntimeError(f"OpenCV cannot write {path}")
    n = int(seconds * fps)
    rng = np.random.default_rng(0)
    scenes = [rng.integers(0, 255, size=(h // 8, w // 8, 3), dtype=np.uint8) for _ in range(3)]
    for i in range(n):
        scene = scenes[min(3 * i // n, 2)]
        bg = cv2.resize(scene, (w + 40, h), interpolation=cv2.INTER_CUBIC)
        shift = (i * 2) % 40
        img = np.ascontiguousarray(bg[:, shift : shift + w])
        x = int((w - 40) * (i % fps) / fps)
        cv2.rectangle(img, (x, h // 3), (x + 40, h // 3 + 40), (255, 255, 255), -1)
        writer.write(img)
    writer.release()
    return path
