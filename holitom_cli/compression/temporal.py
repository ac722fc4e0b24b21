"""Stage 1 of HoliTom: redundancy-aware temporal segmentation (spec section 2).

Shapes: T frames, N pooled tokens per frame, C channels.

A token position ``p`` is *similar* between frames ``t`` and ``t+1`` when the cosine similarity of the two
feature vectors is strictly greater than ``tau``. A position is static in a segment ``[s, e]`` when it is
similar for every adjacent pair ``t = s .. e-1``; such a position keeps one token instead of ``e-s+1`` and
so removes ``e-s`` tokens. A dynamic programme partitions the frames into contiguous segments maximising the
total number of removed tokens, with the reference's tie-breaking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Segmentation",
    "adjacent_similarity",
    "frames_per_chunk",
    "gain_table",
    "run_lengths",
    "segment_video",
    "select_segments",
    "temporal_segments",
    "working_dtype",
]


#: Bytes of float32 working buffer per chunk of frames in :func:`adjacent_similarity` on the CPU: small
#: enough to stay in cache (one 196 x 3584 frame is 2.7 MiB), large enough to amortise the per-call overhead.
CPU_CHUNK_BYTES = 4 << 20
#: The same on accelerators, where launch overhead matters more than cache size.
DEVICE_CHUNK_BYTES = 256 << 20


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the outer stage: float64 stays float64, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def frames_per_chunk(features: torch.Tensor) -> int:
    """How many frames of ``features`` (T, N, C) one float32 working chunk holds (at least 1)."""
    _, num, channels = features.shape
    budget = CPU_CHUNK_BYTES if features.device.type == "cpu" else DEVICE_CHUNK_BYTES
    return max(1, budget // max(1, num * channels * 4))


def _row_dots(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = (a * b).sum(-1)`` for (..., C) tensors with contiguous rows, as one batched matrix
    product of (1, C) by (C, 1) per row (float32/float64 accumulation, no (..., C) product buffer)."""
    channels = a.shape[-1]
    rows = a.reshape(-1, 1, channels)
    cols = b.reshape(-1, 1, channels).transpose(1, 2)  # (R, C, 1) as a transposed view: the fast layout
    torch.bmm(rows, cols, out=out.view(-1, 1, 1))


def adjacent_similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the same position in adjacent frames.

    Args:
        features: (T, N, C), any float dtype.
    Returns:
        (T-1, N) float32, clamped to [-1, 1] (so that tau >= 1 never merges, whatever the rounding).

    Precision: ``dot(a, b) / (|a| |b|)`` with products and sums in float32 (float64 for float64 input),
    from the input values as given (a bf16/fp16 value is exact in float32); the dot products are batched
    (1, C) x (C, 1) matrix products, the norms ``vector_norm``. Memory: the frames go through two reusable
    float32 chunks of :func:`frames_per_chunk` frames, never a (T, N, C) copy; every frame is converted
    and normalised once.
    """
    frames, num, channels = features.shape
    work = working_dtype(features.dtype)
    dots = torch.empty(frames - 1, num, dtype=work, device=features.device)  # (T-1, N) a . b
    norms = torch.empty(frames, num, dtype=work, device=features.device)  # (T, N) |a|
    step = frames_per_chunk(features)
    convert = features.dtype != work
    buffers = [features.new_empty(step, num, channels, dtype=work) for _ in range(2 if convert else 0)]
    prev = None  # (N, C) last frame of the previous chunk
    for i, a in enumerate(range(0, frames, step)):
        f = min(step, frames - a)
        cur = buffers[i % 2][:f].copy_(features[a : a + f]) if convert else features[a : a + f]
        torch.linalg.vector_norm(cur, dim=-1, out=norms[a : a + f])
        if prev is not None:  # the pair (a-1, a) across the chunk boundary
            _row_dots(prev, cur[0], dots[a - 1])
        if f > 1:  # the pairs inside the chunk
            _row_dots(cur[:-1], cur[1:], dots[a : a + f - 1])
        prev = cur[f - 1]
    eps = 1e-12  # as F.normalize: a zero vector has similarity 0 with everything
    sim = dots / (norms[:-1].clamp_min(eps) * norms[1:].clamp_min(eps))
    return sim.float().clamp_(-1.0, 1.0)


def run_lengths(similar: torch.Tensor) -> torch.Tensor:
    """For every start frame ``s`` and position ``p``: how many consecutive pairs from ``s`` are similar.

    Args:
        similar: (T-1, N) bool, ``similar[t, p]`` for the pair (t, t+1).
    Returns:
        (T, N) long ``run[s, p]``: the largest ``w`` with ``similar[s .. s+w-1, p]`` all true, i.e. the
        segment ``[s, s+w]`` keeps ``p`` static for every ``e <= s + w``. ``run[T-1] == 0``.
    """
    pairs, num = similar.shape
    frames = pairs + 1
    t = torch.arange(frames, device=similar.device)[:, None].expand(frames, num)  # (T, N)
    # index of the first dissimilar pair at or after each t (a virtual dissimilar pair at T-1)
    breaks = torch.full((frames, num), pairs, dtype=torch.long, device=similar.device)
    breaks[:pairs] = torch.where(similar, pairs, t[:pairs])
    next_break = breaks.flip(0).cummin(dim=0).values.flip(0)  # (T, N)
    return next_break - t


def gain_table(run: torch.Tensor) -> torch.Tensor:
    """Removed tokens of every candidate segment.

    Args:
        run: (T, N) long from :func:`run_lengths`.
    Returns:
        (T, T) long ``G[s, w]`` = |static(s, s+w)| * w for the segment ``[s, s+w]`` (``w >= 1``);
        ``G[s, 0] = 0``, and zero where ``s + w >= T``.
    """
    frames, num = run.shape
    hist = torch.zeros(frames, frames + 1, dtype=torch.long, device=run.device)
    hist.scatter_add_(1, run, torch.ones_like(run))  # hist[s, l] = positions whose run from s is l
    at_least = hist.flip(1).cumsum(1).flip(1)[:, :frames]  # at_least[s, w] = #positions with run >= w
    widths = torch.arange(frames, device=run.device)
    return at_least * widths[None, :]


def select_segments(gains: list[list[int]], max_window: int) -> tuple[list[tuple[int, int]], int]:
    """The reference's dynamic programme (spec 2.3) on a precomputed gain table.

    Args:
        gains: T x T nested list, ``gains[s][w]`` = tokens removed by the segment ``[s, s+w]``.
        max_window: longest segment in frames (>= 1).
    Returns:
        (segments, reduced): inclusive ``(start, end)`` frame ranges in temporal order, and the total R.

    Tie-breaking as in the reference: the singleton option first, then windows from short to long, and a
    candidate replaces the current best only when strictly better.
    """
    frames = len(gains)
    best = [0] * (frames + 1)  # best[i + 1] = dp[i]; best[0] = dp[-1] = 0
    start = [0] * frames
    for i in range(frames):
        value, first = best[i], i
        for width in range(2, min(i + 1, max_window) + 1):
            s = i - width + 1
            candidate = best[s] + gains[s][width - 1]
            if candidate > value:
                value, first = candidate, s
        best[i + 1] = value
        start[i] = first
    segments: list[tuple[int, int]] = []
    i = frames - 1
    while i >= 0:
        segments.append((start[i], i))
        i = start[i] - 1
    segments.reverse()
    return segments, best[frames]


@dataclass(frozen=True)
class Segmentation:
    """Result of stage 1.

    segments: inclusive (start, end) frame ranges covering 0..T-1 in order.
    reduced: R, tokens removed by temporal merging (sum of the segments' gains).
    run: (T, N) long run lengths, on the host; position p is static in segment (s, e), e > s, iff
    run[s, p] >= e - s.
    """

    segments: list[tuple[int, int]]
    reduced: int
    run: torch.Tensor

    def static_mask(self, segment: tuple[int, int]) -> torch.Tensor:
        """(N,) bool: positions merged temporally in ``segment`` (all False for a singleton)."""
        s, e = segment
        if e == s:
            return torch.zeros(self.run.shape[1], dtype=torch.bool, device=self.run.device)
        return self.run[s] >= e - s


def segment_video(features: torch.Tensor, tau: float, max_window: int) -> Segmentation:
    """Stage 1 on features (T, N, C): similarity, gain table, dynamic programme."""
    if features.dim() != 3 or features.shape[0] < 1:
        raise ValueError(f"features must be (T, N, C) with T >= 1, got shape {tuple(features.shape)}")
    frames, num, _ = features.shape
    if frames == 1:
        return Segmentation([(0, 0)], 0, torch.zeros(1, num, dtype=torch.long))
    similar = (adjacent_similarity(features) > tau).cpu()  # (T-1, N): the one device-to-host transfer
    run = run_lengths(similar)  # (T, N), on the host from here on
    gains = gain_table(run).tolist()
    segments, reduced = select_segments(gains, max_window)
    return Segmentation(segments, reduced, run)


def temporal_segments(
    features: torch.Tensor, tau: float = 0.8, max_window: int = 1024
) -> list[tuple[int, int]]:
    """Inclusive (start, end) frame ranges chosen by HoliTom's segmentation of features (T, N, C)."""
    return segment_video(features, tau, max_window).segments
