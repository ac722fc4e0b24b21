"""compress_video_tokens: the spec's synthetic 8-frame video (4.4, 13) and properties on random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from holitom_cli.compression import CompressionResult, HoliTomConfig, compress_video_tokens

N = 196


def cut_video(dynamic_counts: list[int], lengths: list[int], dim: int = 16, seed: int = 0):
    """Scenes of the given lengths; in scene i the first ``dynamic_counts[i]`` positions (in a shuffled
    order) change completely every frame, the other positions stay fixed up to a tiny noise."""
    gen = torch.Generator().manual_seed(seed)
    chunks, static_sets = [], []
    for moving, length in zip(dynamic_counts, lengths, strict=True):
        base = torch.randn(N, dim, generator=gen)
        perm = torch.randperm(N, generator=gen)
        frames = base[None].repeat(length, 1, 1) + 1e-3 * torch.randn(length, N, dim, generator=gen)
        frames[:, perm[:moving]] = torch.randn(length, moving, dim, generator=gen)
        chunks.append(frames)
        static_sets.append(sorted(perm[moving:].tolist()))
    features = torch.cat(chunks)
    return features, torch.rand(features.shape[0], N, generator=gen), static_sets


def formula_count(segments, static_counts, num, ratio) -> int:
    """Spec 4.4: sum over multi-frame segments of round(n_s r') + L ceil(n_d r'), singletons ceil(N r')."""
    total = 0
    for (s, e), n_s in zip(segments, static_counts, strict=True):
        if e > s:
            total += round(n_s * ratio) + (e - s + 1) * math.ceil((num - n_s) * ratio)
        else:
            total += math.ceil(num * ratio)
    return total


def test_spec_synthetic_eight_frame_video() -> None:
    # the spec's run (section 13): dynamic per frame 92/101/53, static 104/95/143, segments of 3/3/2 frames
    features, attention, static_sets = cut_video([92, 101, 53], [3, 3, 2])
    out = compress_video_tokens(features, attention, HoliTomConfig(retain_ratio=0.10, tau=0.8))
    assert out.segments == [(0, 2), (3, 5), (6, 7)]
    assert out.reduced == 104 * 2 + 95 * 2 + 143 * 1 == 541
    assert out.num_input == 1568
    assert out.num_after_temporal == 1568 - 541
    assert out.effective_ratio == pytest.approx(0.1527, abs=1e-4)
    assert [sorted(torch.nonzero(m).squeeze(1).tolist()) for m in out.static_mask] == static_sets
    per_segment = [int(((out.frame_index >= s) & (out.frame_index <= e)).sum()) for s, e in out.segments]
    assert per_segment == [61, 63, 40]
    assert out.num_tokens == 164
    assert out.num_tokens == formula_count(out.segments, [104, 95, 143], N, out.effective_ratio)
    # static tokens: round(n_s r') per segment, placed at the segment's first frame
    assert [int((out.is_static & (out.frame_index == s)).sum()) for s, _ in out.segments] == [16, 15, 22]


@pytest.mark.parametrize(("retain", "per_frame"), [(0.10, 20), (0.15, 30), (0.20, 40), (0.25, 49)])
def test_no_temporal_merge_counts_match_paper(retain: float, per_frame: int) -> None:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(4, N, 256, generator=gen)  # independent frames: nothing is similar
    out = compress_video_tokens(features, torch.rand(4, N, generator=gen), HoliTomConfig(retain_ratio=retain))
    assert out.reduced == 0
    assert out.num_tokens == 4 * per_frame
    assert out.frame_index.tolist() == [t for t in range(4) for _ in range(per_frame)]


def check_invariants(out: CompressionResult, features: torch.Tensor, attention: torch.Tensor, retain: float):
    frames, num, _ = features.shape
    # counts follow formula 4.4
    static_counts = out.static_mask.sum(1).tolist()
    total = frames * num
    ratio = min(retain / ((total - out.reduced) / total), 1.0)
    assert out.effective_ratio == ratio
    assert out.num_tokens == formula_count(out.segments, static_counts, num, ratio)
    # R is the sum of the segments' gains
    assert out.reduced == sum(n_s * (e - s) for (s, e), n_s in zip(out.segments, static_counts, strict=True))
    # indices unique per (frame, position) and in range
    pairs = list(zip(out.frame_index.tolist(), out.spatial_index.tolist(), strict=True))
    assert len(set(pairs)) == len(pairs)
    assert all(0 <= f < frames and 0 <= p < num for f, p in pairs)
    starts = {s for s, _ in out.segments}
    for i, (f, p) in enumerate(pairs):
        seg = next(k for k, (s, e) in enumerate(out.segments) if s <= f <= e)
        if out.is_static[i]:
            assert f in starts and bool(out.static_mask[seg, p])
        else:
            assert not bool(out.static_mask[seg, p])
            assert torch.equal(out.features[i], features[f, p])  # dynamic tokens are selected unchanged
    # frames never go backwards
    assert out.frame_index.tolist() == sorted(out.frame_index.tolist())
    assert out.features.dtype == features.dtype
    assert out.frame_index.dtype == out.spatial_index.dtype == torch.long


@pytest.mark.parametrize("seed", range(6))
def test_properties_on_random_videos(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    frames, num, dim = 5 + seed, 36, 8
    base = torch.randn(num, dim, generator=gen)
    motion = torch.rand(frames, num, 1, generator=gen) < 0.4 + 0.1 * (seed % 3)
    features = base + motion * torch.randn(frames, num, dim, generator=gen)
    attention = torch.rand(frames, num, generator=gen)
    retain = [0.1, 0.2, 0.33, 0.5, 0.75, 1.0][seed]
    out = compress_video_tokens(features, attention, HoliTomConfig(retain_ratio=retain, tau=0.8))
    check_invariants(out, features, attention, retain)


def test_keep_everything_returns_input_in_frame_order() -> None:
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(5, 12, 4, generator=gen)
    features[2] = features[1]  # identical frames must not merge with tau >= 1
    out = compress_video_tokens(features, torch.rand(5, 12), HoliTomConfig(retain_ratio=1.0, tau=1.0))
    assert torch.equal(out.features, features.reshape(-1, 4))
    assert out.frame_index.tolist() == [t for t in range(5) for _ in range(12)]
    assert out.spatial_index.tolist() == list(range(12)) * 5
    assert not out.is_static.any()
    assert out.segments == [(t, t) for t in range(5)]


def test_identical_frames_collapse_into_one_segment() -> None:
    gen = torch.Generator().manual_seed(2)
    frame = torch.randn(1, 16, 6, generator=gen)
    features = frame.repeat(6, 1, 1)
    out = compress_video_tokens(features, torch.rand(6, 16), HoliTomConfig(retain_ratio=0.1, tau=0.8))
    assert out.segments == [(0, 5)]
    assert out.reduced == 5 * 16
    assert out.static_mask.all()
    assert out.effective_ratio == min(0.1 / ((96 - 80) / 96), 1.0)  # 0.6
    assert out.num_tokens == round(16 * out.effective_ratio) == 10
    assert out.is_static.all() and (out.frame_index == 0).all()
    assert out.spatial_index.tolist() == sorted(out.spatial_index.tolist())
    # r' = 1: every static token is its own cluster centre, and the segment mean is the frame itself
    full = compress_video_tokens(features, torch.rand(6, 16), HoliTomConfig(retain_ratio=0.5, tau=0.8))
    assert full.segments == [(0, 5)] and full.effective_ratio == 1.0
    torch.testing.assert_close(full.features, frame[0])
    assert full.spatial_index.tolist() == list(range(16))


def test_single_frame_keeps_top_attention_in_spatial_order() -> None:
    features = torch.randn(1, 10, 3)
    attention = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0, 0.7, 0.2, 0.6, 0.5, 0.4]])
    out = compress_video_tokens(features, attention, HoliTomConfig(retain_ratio=0.3))
    assert out.segments == [(0, 0)]
    assert out.spatial_index.tolist() == [1, 3, 5]  # ceil(10 * 0.3) = 3 highest, ascending
    assert torch.equal(out.features, features[0, [1, 3, 5]])
    assert out.static_mask.shape == (1, 10) and not out.static_mask.any()


def test_static_tokens_come_first_then_each_frame() -> None:
    features, attention, _ = cut_video([100], [3], dim=8, seed=4)
    out = compress_video_tokens(features, attention, HoliTomConfig(retain_ratio=0.5))
    assert out.segments == [(0, 2)]
    flags = out.is_static.tolist()
    n_static = sum(flags)
    assert n_static > 0 and flags == [True] * n_static + [False] * (len(flags) - n_static)
    dyn_frames = out.frame_index[n_static:].tolist()
    assert dyn_frames == sorted(dyn_frames)
    for t in range(3):
        pos = out.spatial_index[n_static:][out.frame_index[n_static:] == t].tolist()
        assert pos == sorted(pos) and len(pos) == math.ceil(100 * out.effective_ratio)


def test_max_window_limits_segment_length() -> None:
    features = torch.randn(1, 8, 4).repeat(7, 1, 1)
    out = compress_video_tokens(features, torch.rand(7, 8), HoliTomConfig(max_window=3))
    assert out.segments == [(0, 2), (3, 5), (6, 6)]


def test_half_precision_input() -> None:
    features, attention, _ = cut_video([92, 101, 53], [3, 3, 2])
    out16 = compress_video_tokens(features.bfloat16(), attention, HoliTomConfig(retain_ratio=0.10))
    assert out16.features.dtype == torch.bfloat16
    assert out16.segments == [(0, 2), (3, 5), (6, 7)]
    assert out16.num_tokens == 164


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError):
        compress_video_tokens(torch.randn(3, 4, 2), torch.rand(3, 5), HoliTomConfig())
    with pytest.raises(ValueError):
        compress_video_tokens(torch.randn(4, 2), torch.rand(4, 2), HoliTomConfig())


def test_result_is_frozen() -> None:
    out = compress_video_tokens(torch.randn(2, 4, 3), torch.rand(2, 4), HoliTomConfig())
    with pytest.raises(AttributeError):
        out.reduced = 3  # type: ignore[misc]
