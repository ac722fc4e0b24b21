"""The outer-LLM HoliTom pipeline: segmentation -> temporal merge -> spatial merge (spec sections 2 to 6).

Shapes: T frames, N pooled tokens per frame, C channels, M output tokens, S segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from holitom_cli.compression.config import HoliTomConfig
from holitom_cli.compression.dpc import fast_path
from holitom_cli.compression.dpc_batch import BatchDistances, segment_clusters
from holitom_cli.compression.memory import empty_output
from holitom_cli.compression.plan import MergePlan, PlanParts, cluster_part, selection_part
from holitom_cli.compression.spatial import dynamic_keep_count, merge_assigned, static_cluster_count
from holitom_cli.compression.temporal import Segmentation, segment_video, working_dtype

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
    plan: which input tokens (flat ``t * N + p``) went into each output token, with weights;
    ``plan.apply(features)`` gives ``features`` (up to float32 rounding), and the plan merges any other
    tensor aligned with the input tokens the same way (see :mod:`holitom_cli.compression.plan`).
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
    plan: MergePlan

    @property
    def num_tokens(self) -> int:
        """M, the number of compressed tokens."""
        return int(self.features.shape[0])


def effective_ratio(retain_ratio: float, num_input: int, reduced: int) -> float:
    """r' = min(r / ((TN - R) / TN), 1), the same float operations as the reference (spec 2.4)."""
    return min(retain_ratio / ((num_input - reduced) / num_input), 1.0)


def segment_means(
    features: torch.Tensor, start: int, end: int, out: torch.Tensor, frame: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, C) uniform mean over frames ``start..end`` of every position, accumulated frame by frame.

    ``out`` is a reusable (N, C) working-dtype buffer (float32, float64 for float64 input): the sum runs in
    that dtype, in frame order; a lower-precision frame is first converted into the reusable ``frame``
    buffer (same shape), so bf16 input is never copied to float32 as a whole.
    """
    out.copy_(features[start])
    for t in range(start + 1, end + 1):
        out.add_(features[t] if frame is None else frame.copy_(features[t]))
    return out.div_(end - start + 1)


def _mean_buffers(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reusable (N, C) buffers of :func:`segment_means`: an accumulator, and a conversion buffer
    when the input is not already in the working dtype."""
    _, num, channels = features.shape
    work = working_dtype(features.dtype)
    acc = features.new_empty(num, channels, dtype=work)
    return acc, (features.new_empty(num, channels, dtype=work) if features.dtype != work else None)


#: Bytes of the working-dtype (B, n, C) batch of segment means that :func:`_static_tokens` clusters at
#: once (it bounds the stage's working memory, whatever the number of frames).
BATCH_BYTES = 16 << 20


def _batches(jobs: list[tuple], row_bytes: int) -> list[list[tuple]]:
    """Consecutive jobs ``(segment, start, end, positions)`` grouped so that each group's padded batch
    (its largest n_s rows per segment) stays within :data:`BATCH_BYTES` (a job alone may exceed it)."""
    groups: list[list[tuple]] = []
    widest = 0
    for job in jobs:
        size = job[3].numel()
        if groups and max(widest, size) * row_bytes * (len(groups[-1]) + 1) <= BATCH_BYTES:
            groups[-1].append(job)
            widest = max(widest, size)
        else:
            groups.append([job])
            widest = size
    return groups


def _batch_store(features: torch.Tensor, groups: list[list[tuple]], row_bytes: int) -> torch.Tensor:
    """One (rows, C) working-dtype store for the means of every group, its size rounded up to a power of
    two: the allocator then hands the same pages to the next call of a similar size (fresh pages cost
    more than batching the segments saves)."""
    needed = max([len(g) * max(job[3].numel() for job in g) for g in groups], default=0) * row_bytes
    rows = (1 << max(needed - 1, 1).bit_length()) // row_bytes
    return features.new_empty(rows, features.shape[2], dtype=working_dtype(features.dtype))


def _static_tokens(
    features: torch.Tensor, jobs: list[tuple[int, int, int, torch.Tensor]], ratio: float, cfg: HoliTomConfig,
    buffers: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
) -> list[tuple[torch.Tensor, torch.Tensor, tuple]]:  # fmt: skip
    """Stage 2 + 3 for the static positions of a batch of multi-frame segments.

    ``jobs``: ``(segment, start, end, static positions)``, each with ``round(n_s r') >= 1``; ``buffers``:
    the two reusable buffers of :func:`segment_means` and a (rows, C) store of at least B n rows for the
    batch's means. Returns per job the (K, C) working-dtype cluster tokens, the (K,) positions of their
    centres (ascending) and the plan part of the K tokens
    (:func:`~holitom_cli.compression.plan.cluster_part`).
    """
    _, num, channels = features.shape
    sizes = [job[3].numel() for job in jobs]
    cluster_nums = [static_cluster_count(size, ratio) for size in sizes]
    widest = max(sizes)
    means = buffers[2][: len(jobs) * widest].view(len(jobs), widest, channels)  # (B, n, C)
    distances = BatchDistances(len(jobs), widest, features.device) if fast_path(means) else None
    for b, (_, start, end, static_pos) in enumerate(jobs):
        rows = means[b, : sizes[b]]
        segment = segment_means(features, start, end, *buffers[:2])
        torch.index_select(segment, 0, static_pos, out=rows)  # the padding rows are never read
        if distances is not None and cluster_nums[b] < sizes[b]:
            distances.add(b, rows)  # while the means are in cache
    is_centre, slot = segment_clusters(means, sizes, cluster_nums, cfg.dpc_k, distances)
    out = []
    for b, (_, start, end, static_pos) in enumerate(jobs):
        centres = torch.nonzero_static(is_centre[b], size=cluster_nums[b]).squeeze(1)
        others = torch.nonzero_static(~is_centre[b, : sizes[b]], size=sizes[b] - cluster_nums[b]).squeeze(1)
        nearest = slot[b].index_select(0, others)
        part = cluster_part(static_pos, start, end, num, centres, others, nearest, cfg.beta)
        merged = merge_assigned(means[b, : sizes[b]], centres, others, nearest, cfg.beta)
        out.append((merged, static_pos[centres], part))
    return out


def _dynamic_tokens(
    attention: torch.Tensor, frame_static: torch.Tensor, keep: torch.Tensor, total: int
) -> torch.Tensor:
    """Stage 3 for the dynamic tokens of every frame at once.

    Args:
        attention: (T, N); frame_static: (T, N) bool, static positions of each frame's segment;
        keep: (T,) long, dynamic tokens kept per frame; total: ``keep.sum()`` (known on the host).
    Returns:
        (total,) long flat indices ``t * N + p`` into the (T*N) tokens, frame-major, ascending position
        inside a frame: per frame the ``keep[t]`` dynamic positions with the highest attention, ties to
        the lower position.
    """
    frames, num = attention.shape
    # stable sorts: by attention (descending), then dynamic before static, preserving that order
    by_score = torch.sort(attention.float(), dim=1, descending=True, stable=True).indices  # (T, N)
    static_first = torch.sort(frame_static.gather(1, by_score).to(torch.uint8), dim=1, stable=True).indices
    order = by_score.gather(1, static_first)  # dynamic positions by attention, then the static ones
    rank = torch.arange(num, device=attention.device)
    kept = torch.zeros(frames, num, dtype=torch.bool, device=attention.device)
    kept.scatter_(1, order, rank[None, :] < keep[:, None])  # (T, N)
    return torch.nonzero_static(kept.flatten(), size=total).squeeze(1)  # ascending = frame-major order


def _plan(seg: Segmentation, num: int, ratio: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """On the host: (static positions (N,) bool per segment, dynamic tokens kept per frame (T,) long)."""
    masks, keep = [], []
    for s, e in seg.segments:
        static = seg.static_mask((s, e))  # (N,) bool, host (Segmentation.run lives on the host)
        masks.append(static)
        keep += [dynamic_keep_count(num - int(static.sum()), ratio)] * (e - s + 1)
    return masks, torch.tensor(keep, dtype=torch.long)


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
    device = features.device

    masks, keep = _plan(seg, num, ratio)  # host
    static_mask = torch.stack(masks)  # (S, N)
    lengths = [e - s + 1 for s, e in seg.segments]
    frame_static = torch.cat([m.expand(n, num) for m, n in zip(masks, lengths, strict=True)])  # (T, N)
    flat = _dynamic_tokens(attention, frame_static.to(device), keep.to(device), int(keep.sum()))  # (M_d,)
    dyn_offset = [0, *torch.cumsum(keep, 0).tolist()]  # host: dynamic tokens before frame t

    # Static cluster tokens per multi-frame segment (stage 2 + 3); sizes are host integers.
    counts = static_mask.sum(1).tolist()  # host
    positions = torch.nonzero(static_mask)[:, 1].to(device).split(counts)  # one host-to-device copy
    jobs = [(i, s, e, pos) for i, ((s, e), pos) in enumerate(zip(seg.segments, positions, strict=True))
            if e > s and static_cluster_count(pos.numel(), ratio) > 0]  # fmt: skip
    clusters: list[tuple[torch.Tensor, torch.Tensor, tuple] | None] = [None] * len(seg.segments)
    row_bytes = features.shape[2] * torch.finfo(working_dtype(features.dtype)).bits // 8  # one store row
    groups = _batches(jobs, row_bytes)
    buffers = (*_mean_buffers(features), _batch_store(features, groups, row_bytes))
    for group in groups:
        for job, cluster in zip(group, _static_tokens(features, group, ratio, cfg, buffers), strict=True):
            clusters[job[0]] = cluster

    # Output in "one_token" order, written in place: per segment its clusters, then its dynamic tokens.
    sizes = [(0 if c is None else c[0].shape[0], dyn_offset[e + 1] - dyn_offset[s]) for c, (s, e) in
             zip(clusters, seg.segments, strict=True)]  # fmt: skip
    tokens = empty_output(features, sum(a + b for a, b in sizes), features.shape[2])  # (M, C)
    flat_features = features.reshape(frames * num, features.shape[2])
    index_parts, static_parts, row = [], [], 0
    plan = PlanParts(num_input, device)  # the same decisions as index bookkeeping (no feature work)
    for (start, end), cluster, (n_static, n_dyn) in zip(seg.segments, clusters, sizes, strict=True):
        if cluster is not None:
            tokens[row : row + n_static].copy_(cluster[0])  # cast to the input dtype
            index_parts.append(cluster[1] + start * num)
            static_parts.append(torch.ones(n_static, dtype=torch.bool, device=device))
            plan.add(cluster[2], n_static)
            row += n_static
        if n_dyn:
            a, b = dyn_offset[start], dyn_offset[end + 1]
            torch.index_select(flat_features, 0, flat[a:b], out=tokens[row : row + n_dyn])
            index_parts.append(flat[a:b])
            static_parts.append(torch.zeros(n_dyn, dtype=torch.bool, device=device))
            plan.add(selection_part(flat[a:b]), n_dyn)
            row += n_dyn
    empty = torch.empty(0, dtype=torch.long, device=device)
    flat_index = torch.cat(index_parts) if index_parts else empty  # (M,) t * N + p
    is_static = torch.cat(static_parts) if static_parts else empty.bool()
    frame_index = torch.div(flat_index, num, rounding_mode="floor")
    spatial_index = flat_index - frame_index * num
    return CompressionResult(
        features=tokens,
        frame_index=frame_index,
        spatial_index=spatial_index,
        is_static=is_static,
        segments=list(seg.segments),
        static_mask=static_mask.to(device),
        num_input=num_input,
        reduced=int(seg.reduced),
        num_after_temporal=num_input - int(seg.reduced),
        effective_ratio=ratio,
        plan=plan.build(),
    )
