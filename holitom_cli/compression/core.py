"""The outer-LLM HoliTom pipeline: segmentation -> temporal merge -> spatial merge (spec sections 2 to 6).

Shapes: T frames, N pooled tokens per frame, C channels, M output tokens, S segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from holitom_cli.compression.config import HoliTomConfig
from holitom_cli.compression.spatial import (
    cluster_dpc_knn,
    dynamic_keep_count,
    merge_clusters,
    select_top_attention,
    static_cluster_count,
)
from holitom_cli.compression.temporal import segment_video

__all__ = ["CompressionResult", "compress_video_tokens", "effective_ratio"]


@dataclass(frozen=True)
class CompressionResult:
    """Compressed video tokens in the reference's "one_token" order (no newline token appended).

    features: (M, C) tokens, dtype of the input features.
    frame_index: (M,) long, frame of each token (a temporally merged token: its segment's first frame).
    spatial_index: (M,) long, position in the frame's token grid, 0..N-1.
    is_static: (M,) bool, the token is a temporally merged (and clustered) static token.
    segments: inclusive (start, end) frame ranges, in temporal order.
    static_mask: (S, N) bool, per segment the positions merged temporally (all False for singletons).
    num_input: T * N. reduced: R, tokens removed by temporal merging. num_after_temporal: T * N - R.
    effective_ratio: r' = min(r * TN / (TN - R), 1), the retention applied by the spatial stage.
    """

    features: torch.Tensor
    frame_index: torch.Tensor
    spatial_index: torch.Tensor
    is_static: torch.Tensor
    segments: list[tuple[int, int]]
    static_mask: torch.Tensor
    num_input: int
    reduced: int
    num_after_temporal: int
    effective_ratio: float

    @property
    def num_tokens(self) -> int:
        """M, the number of compressed tokens."""
        return int(self.features.shape[0])


def effective_ratio(retain_ratio: float, num_input: int, reduced: int) -> float:
    """r' = min(r / ((TN - R) / TN), 1), the same float operations as the reference (spec 2.4)."""
    return min(retain_ratio / ((num_input - reduced) / num_input), 1.0)


def _segment_tokens(
    features: torch.Tensor,
    attention: torch.Tensor,
    start: int,
    end: int,
    static: torch.Tensor,
    ratio: float,
    cfg: HoliTomConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temporal + spatial merge of one segment.

    Args:
        features: (T, N, C) float32; attention: (T, N); static: (N,) bool positions merged in this segment.
    Returns:
        tokens (m, C) float32, frame (m,) long, position (m,) long, is_static (m,) bool, in output order:
        static cluster tokens ascending, then each frame's kept dynamic tokens ascending.
    """
    device = features.device
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    static_pos = torch.nonzero(static).squeeze(1)  # (n_s,)
    cluster_num = static_cluster_count(static_pos.numel(), ratio)
    if cluster_num > 0:
        means = features[start : end + 1, static_pos].mean(dim=0)  # (n_s, C) segment mean
        centres, dist = cluster_dpc_knn(means, cluster_num, min(cfg.dpc_k, cluster_num))
        merged = merge_clusters(means, centres, dist, cfg.beta)  # (K, C)
        count = centres.numel()
        parts.append(
            (
                merged,
                torch.full((count,), start, dtype=torch.long, device=device),
                static_pos[centres],
                torch.ones(count, dtype=torch.bool, device=device),
            )
        )

    dynamic_pos = torch.nonzero(~static).squeeze(1)  # (n_d,)
    keep = dynamic_keep_count(dynamic_pos.numel(), ratio)
    if keep > 0:
        mask = select_top_attention(attention[start : end + 1, dynamic_pos], keep)  # (L, n_d)
        rows, cols = torch.nonzero(mask, as_tuple=True)  # frame-major, ascending position
        frame = rows + start
        pos = dynamic_pos[cols]
        parts.append((features[frame, pos], frame, pos, torch.zeros_like(frame, dtype=torch.bool)))

    if not parts:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return features.new_empty(0, features.shape[2]), empty, empty, empty.bool()
    return tuple(torch.cat(items) for items in zip(*parts, strict=True))  # type: ignore[return-value]


def compress_video_tokens(
    features: torch.Tensor, attention: torch.Tensor, cfg: HoliTomConfig
) -> CompressionResult:
    """Run HoliTom's outer-LLM compression on one video.

    Args:
        features: (T, N, C) float, pooled projected per-frame video tokens.
        attention: (T, N), per-token vision saliency (attention received, mean over heads and queries).
        cfg: settings (retain_ratio, tau, beta, dpc_k, max_window are used here).
    Returns:
        A :class:`CompressionResult` with M tokens in "one_token" order.
    """
    if features.dim() != 3 or not features.is_floating_point():
        raise ValueError(f"features must be a float (T, N, C) tensor, got {tuple(features.shape)}")
    frames, num, _ = features.shape
    if frames < 1 or num < 1:
        raise ValueError(f"features must have T >= 1 frames and N >= 1 tokens, got {tuple(features.shape)}")
    if attention.shape != (frames, num):
        raise ValueError(f"attention must be ({frames}, {num}), got {tuple(attention.shape)}")

    seg = segment_video(features, cfg.tau, cfg.max_window)
    num_input = frames * num
    ratio = effective_ratio(cfg.retain_ratio, num_input, seg.reduced)

    x32 = features.float()
    attn = attention.float()
    masks, outputs = [], []
    for start, end in seg.segments:
        static = seg.static_mask((start, end))
        masks.append(static)
        outputs.append(_segment_tokens(x32, attn, start, end, static, ratio, cfg))
    tokens, frame_index, spatial_index, is_static = (torch.cat(items) for items in zip(*outputs, strict=True))
    return CompressionResult(
        features=tokens.to(features.dtype),
        frame_index=frame_index,
        spatial_index=spatial_index,
        is_static=is_static,
        segments=list(seg.segments),
        static_mask=torch.stack(masks),
        num_input=num_input,
        reduced=int(seg.reduced),
        num_after_temporal=num_input - int(seg.reduced),
        effective_ratio=ratio,
    )
