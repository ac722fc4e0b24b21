"""Stage 1: segmentation, checked on the spec's toy cases (2.3), brute force and a double-loop gain table."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from holitom_cli.compression import temporal_segments
from holitom_cli.compression.temporal import gain_table, run_lengths, segment_video, select_segments

TOY_SIMS = [[0.9, 0.9, 0.1, 0.9], [0.9, 0.9, 0.9, 0.1], [0.1] * 4, [0.9] * 4, [0.9] * 4]


def features_with_similarities(sims: list[list[float]]) -> torch.Tensor:
    """(T, N, 2) unit vectors whose adjacent cosine similarity per position is exactly ``sims[t][p]``."""
    pairs, num = len(sims), len(sims[0])
    angles = torch.zeros(pairs + 1, num, dtype=torch.float64)
    for t in range(pairs):
        for p in range(num):
            angles[t + 1, p] = angles[t, p] + math.acos(sims[t][p])
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def segments_from_sims(sims, tau: float, window: int):
    similar = torch.tensor(sims) > tau
    return select_segments(gain_table(run_lengths(similar)).tolist(), window)


@pytest.mark.parametrize(
    ("sims", "window", "segments", "reduced"),
    [
        (TOY_SIMS, 1024, [(0, 2), (3, 5)], 12),
        (TOY_SIMS, 2, [(0, 1), (2, 2), (3, 4), (5, 5)], 7),
        ([[0.1] * 4] * 5, 1024, [(i, i) for i in range(6)], 0),
        ([[0.9] * 4] * 5, 1024, [(0, 5)], 20),
    ],
)
def test_spec_toy_cases(sims, window: int, segments, reduced: int) -> None:
    assert segments_from_sims(sims, 0.8, window) == (segments, reduced)
    seg = segment_video(features_with_similarities(sims), tau=0.8, max_window=window)
    assert seg.segments == segments
    assert seg.reduced == reduced
    assert temporal_segments(features_with_similarities(sims), tau=0.8, max_window=window) == segments


def test_threshold_is_strict() -> None:
    assert segments_from_sims([[0.5, 0.8]], 0.8, 1024) == ([(0, 0), (1, 1)], 0)  # 0.8 is not > 0.8
    assert segments_from_sims([[0.5, 0.8]], 0.79, 1024) == ([(0, 1)], 1)
    feats = features_with_similarities([[0.5, 0.9]])
    assert temporal_segments(feats, tau=0.85) == [(0, 1)]
    assert temporal_segments(feats, tau=0.95) == [(0, 0), (1, 1)]
    identical = torch.ones(3, 2, 4)
    assert temporal_segments(identical, tau=1.0) == [(0, 0), (1, 1), (2, 2)]  # cos == 1 is not > 1


def test_tie_keeps_the_shorter_earlier_candidate() -> None:
    # pos 0 similar over (0,1),(1,2); pos 1 only over (0,1): [0,1] gains 2, [0,2] gains 1*2 = 2 -> tie
    sims = [[0.9, 0.9], [0.9, 0.1]]
    assert segments_from_sims(sims, 0.8, 1024) == ([(0, 1), (2, 2)], 2)


def loop_gains(similar: torch.Tensor) -> list[list[int]]:
    pairs, num = similar.shape
    frames = pairs + 1
    table = [[0] * frames for _ in range(frames)]
    for s in range(frames):
        for e in range(s + 1, frames):
            count = sum(all(bool(similar[t, p]) for t in range(s, e)) for p in range(num))
            table[s][e - s] = count * (e - s)
    return table


@pytest.mark.parametrize("seed", range(5))
def test_gain_table_matches_double_loop(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    similar = torch.rand(7, 9, generator=gen) < 0.3 + 0.15 * seed
    assert gain_table(run_lengths(similar)).tolist() == loop_gains(similar)


def partitions(frames: int):
    for cuts in itertools.product([False, True], repeat=frames - 1):
        segments, start = [], 0
        for i, cut in enumerate(cuts):
            if cut:
                segments.append((start, i))
                start = i + 1
        segments.append((start, frames - 1))
        yield segments


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [2, 3, 1024])
def test_dp_is_optimal_against_brute_force(seed: int, window: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    frames = 7
    similar = torch.rand(frames - 1, 5, generator=gen) < 0.75
    gains = loop_gains(similar)
    best = max(
        sum(gains[s][e - s] for s, e in part)
        for part in partitions(frames)
        if all(e - s + 1 <= window for s, e in part)
    )
    segments, reduced = select_segments(gain_table(run_lengths(similar)).tolist(), window)
    assert reduced == best
    assert sum(gains[s][e - s] for s, e in segments) == best
    assert all(e - s + 1 <= window for s, e in segments)
    assert [s for s, _ in segments] == [0] + [e + 1 for _, e in segments[:-1]]  # contiguous cover
    assert segments[-1][1] == frames - 1


def test_single_frame() -> None:
    seg = segment_video(torch.randn(1, 5, 3), tau=0.8, max_window=1024)
    assert seg.segments == [(0, 0)]
    assert seg.reduced == 0


def test_fast_at_256_frames() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(256, 196, 32, generator=gen)
    feats[1:] = feats[:1] + 0.6 * torch.randn(255, 196, 32, generator=gen) * (torch.rand(255, 196, 1) < 0.5)
    begin = time.perf_counter()
    seg = segment_video(feats, tau=0.8, max_window=1024)
    assert time.perf_counter() - begin < 3.0
    assert seg.segments[0][0] == 0
    assert seg.segments[-1][1] == 255
