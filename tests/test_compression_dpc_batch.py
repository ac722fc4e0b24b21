"""DPC-KNN of many segments at once (compression/dpc_batch.py) against the float64 path, segment by segment.

The independent computation is :func:`dpc.exact_clusters` (float64 distances, one segment at a time): the
batch must give every segment the same centres and the same nearest centre for every token, whatever the
other segments in the batch, their sizes and their cluster counts.
"""

from __future__ import annotations

import pytest
import torch

from holitom_cli.compression import dpc, dpc_batch
from tests.test_compression_dpc import video_like_tokens


def padded(segments: list[torch.Tensor]) -> torch.Tensor:
    """(B, n, C) with zero padding rows, as the outer stage builds the batch."""
    num = max(x.shape[0] for x in segments)
    out = torch.zeros(len(segments), num, segments[0].shape[1])
    for b, x in enumerate(segments):
        out[b, : x.shape[0]] = x
    return out


def expected_masks(segments: list[torch.Tensor], cluster_nums: list[int], k: int):
    """(is_centre, slot) built from the float64 path, segment by segment."""
    num = max(x.shape[0] for x in segments)
    is_centre = torch.zeros(len(segments), num, dtype=torch.bool)
    slot = torch.full((len(segments), num), -1, dtype=torch.long)
    for b, (x, cluster_num) in enumerate(zip(segments, cluster_nums, strict=True)):
        centres, others, nearest = dpc.exact_clusters(x, cluster_num, min(k, cluster_num))[:3]
        is_centre[b, centres] = True
        slot[b, centres] = torch.arange(cluster_num)
        slot[b, others] = nearest
    return is_centre, slot


def check(segments: list[torch.Tensor], cluster_nums: list[int], k: int = 7) -> None:
    sizes = [x.shape[0] for x in segments]
    is_centre, slot = dpc_batch.segment_clusters(padded(segments), sizes, cluster_nums, k)
    want_centre, want_slot = expected_masks(segments, cluster_nums, k)
    assert torch.equal(is_centre, want_centre)
    assert torch.equal(slot, want_slot)


@pytest.mark.parametrize("seed", range(4))
def test_a_batch_decides_every_segment_like_float64(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(60, 196, (6,), generator=g).tolist()
    segments = [video_like_tokens(100 * seed + b, num=size) for b, size in enumerate(sizes)]
    ratios = [0.1, 0.2, 0.35, 0.5, 0.15, 0.25]
    check(segments, [max(1, round(size * r)) for size, r in zip(sizes, ratios, strict=True)])


def test_edge_segments_in_one_batch() -> None:
    """All centres, one centre, fewer clusters than dpc_k (its own k), a single token, a segment of 2."""
    segments = [video_like_tokens(s, num=n) for s, n in enumerate([120, 90, 40, 1, 2, 150])]
    check(segments, [120, 1, 5, 1, 1, 30])


def test_segments_needing_float64_rows_or_the_whole_float64_path() -> None:
    """Exact duplicates (density ties: the float64 path) and a halfway token beside ordinary segments."""
    dup = video_like_tokens(7, num=80)
    dup[40:] = dup[:40]
    halfway = video_like_tokens(8, num=100)
    halfway[99] = (halfway[0] + halfway[1]) / 2
    check([video_like_tokens(9), dup, halfway, video_like_tokens(10, num=60)], [20, 16, 25, 9])


def test_narrow_tokens_take_the_float64_path_per_segment() -> None:
    segments = [video_like_tokens(s, num=50, channels=64) for s in range(3)]
    assert not dpc.fast_path(padded(segments))
    check(segments, [10, 5, 25])


def test_a_clean_segment_is_one_the_single_segment_checks_settle() -> None:
    """Soundness of the batched twin of dpc._unsettled: wherever it calls a segment clean, the
    single-segment checks on the same distances find nothing to settle (60 segments in 12 batches)."""
    clean_segments = 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        sizes = torch.randint(30, 160, (5,), generator=g).tolist()
        segments = [video_like_tokens(1000 + 10 * seed + b, num=n, offset=float(b))
                    for b, n in enumerate(sizes)]  # fmt: skip
        x = padded(segments)
        valid = torch.arange(x.shape[1])[None, :] < torch.tensor(sizes)[:, None]
        distances = dpc_batch.BatchDistances(len(sizes), x.shape[1], x.device)
        for b, size in enumerate(sizes):
            distances.add(b, x[b, :size])
        cluster_nums = [max(7, round(n * 0.2)) for n in sizes]
        d = dpc.decide_batch(distances.dist, valid, torch.tensor(cluster_nums), 7)
        clean = dpc_batch._clean(d, distances.dist, valid, distances.bound, 7)
        for b, size in enumerate(sizes):
            dist = distances.dist[b, :size, :size]
            single = dpc._decide(dist, cluster_nums[b], 7)
            assert torch.equal(single.centres, d.is_centre[b, :size].nonzero().squeeze(1))
            if clean[b]:
                assert dpc._unsettled(single, dist, distances.bound[b, :size], 7) is None
        clean_segments += int(clean.sum())
    assert clean_segments >= 10  # the batch path is taken on ordinary segments (25 of 60 when written)


@pytest.mark.parametrize("cluster_nums", [[5, 11], [5, 0]])
def test_a_cluster_count_outside_one_to_the_size_is_refused(cluster_nums: list[int]) -> None:
    segments = [video_like_tokens(1, num=20), video_like_tokens(2, num=10)]
    with pytest.raises(ValueError, match="cluster_num must be in"):
        dpc_batch.segment_clusters(padded(segments), [20, 10], cluster_nums, 7)
