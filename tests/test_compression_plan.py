"""The merge plan of compress_video_tokens (issue 10): applied to the features it gives the compressed
features; applied to positions it gives the coordinates of the selected tokens; its weights are the spec's.

The expected values come from the spec's loop implementation in test_compression_reference.py (float64),
not from the plan's own arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from test_compression_reference import CASES, loop_compress, scene_video

from holitom_cli.compression import HoliTomConfig, compress_video_tokens
from holitom_cli.compression.plan import MergePlan


def _case(seed: int, retain: float, tau: float, window: int, dim: int = 6):
    features, attention = scene_video(seed, frames=6 + seed % 4, num=25 + 11 * (seed % 3), dim=dim)
    cfg = HoliTomConfig(retain_ratio=retain, tau=tau, max_window=window, beta=0.6, dpc_k=7)
    return features, attention, cfg


@pytest.mark.parametrize(("seed", "retain", "tau", "window"), CASES)
def test_plan_applied_to_the_features_gives_the_compressed_features(seed, retain, tau, window) -> None:
    features, attention, cfg = _case(seed, retain, tau, window)
    out = compress_video_tokens(features, attention, cfg)
    merged = out.plan.apply(features)
    assert merged.dtype == features.dtype and merged.shape == out.features.shape
    torch.testing.assert_close(merged, out.features, rtol=1e-6, atol=1e-6)
    # the spec's values (float64 loop), independently of both
    *_, tokens, _, _, _ = loop_compress(features, attention, cfg)
    torch.testing.assert_close(merged.double(), torch.stack(tokens), rtol=1e-5, atol=1e-5)
    # selected tokens are copies: exactly equal
    dynamic = ~out.is_static
    assert torch.equal(merged[dynamic], out.features[dynamic])
    # the flat (T'N, C) form gives the same
    assert torch.equal(out.plan.apply(features.reshape(-1, features.shape[-1])), merged)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("seed", "retain", "tau", "window"), CASES[:5])
def test_plan_in_low_precision(dtype, seed, retain, tau, window) -> None:
    """bf16/fp16 input: float32 accumulation rounded once, like the compression (at most one ulp apart)."""
    features, attention, cfg = _case(seed, retain, tau, window, dim=24)
    features = features.to(dtype)
    out = compress_video_tokens(features, attention, cfg)
    merged = out.plan.apply(features)
    assert merged.dtype == dtype
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(merged.double(), out.features.double(), rtol=ulp, atol=1e-3)
    dynamic = ~out.is_static
    assert torch.equal(merged[dynamic], out.features[dynamic])
    # the float64 spec on the same values, rounded once
    *_, tokens, _, _, _ = loop_compress(features.double(), attention, cfg)
    torch.testing.assert_close(merged.double(), torch.stack(tokens).to(dtype).double(), rtol=ulp, atol=1e-3)


@pytest.mark.parametrize(("seed", "retain", "tau", "window"), CASES)
def test_plan_weights_and_sources(seed, retain, tau, window) -> None:
    features, attention, cfg = _case(seed, retain, tau, window)
    out = compress_video_tokens(features, attention, cfg)
    plan: MergePlan = out.plan
    frames, num, _ = features.shape
    assert (plan.num_inputs, plan.num_outputs) == (frames * num, out.num_tokens)
    assert plan.index.shape == plan.output.shape == plan.weight.shape
    assert plan.weight.dtype == torch.float32 and bool((plan.weight > 0).all())
    sums = torch.zeros(plan.num_outputs, dtype=torch.float64).index_add_(0, plan.output, plan.weight.double())
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-6)
    sources = torch.bincount(plan.output, minlength=plan.num_outputs)
    assert bool((sources >= 1).all())
    # a selected token has exactly one source, itself; a static token's sources lie in its segment,
    # at positions static there, every frame of the segment equally weighted
    flat = out.frame_index * num + out.spatial_index
    for m in range(plan.num_outputs):
        index, weight = plan.sources(m)
        if not bool(out.is_static[m]):
            assert index.tolist() == [int(flat[m])] and weight.tolist() == [1.0]
            continue
        seg = next(k for k, (s, e) in enumerate(out.segments) if s == int(out.frame_index[m]))
        s, e = out.segments[seg]
        units, positions = index // num, index % num
        assert bool(((units >= s) & (units <= e)).all())
        assert bool(out.static_mask[seg, positions].all())
        assert int(out.spatial_index[m]) in positions.tolist()  # the centre is a source
        for p in positions.unique().tolist():
            per_frame = weight[positions == p]
            assert per_frame.numel() == e - s + 1
            torch.testing.assert_close(per_frame, per_frame[:1].expand_as(per_frame))


@pytest.mark.parametrize(("seed", "retain", "tau", "window"), CASES)
def test_plan_applied_to_positions_gives_the_selected_coordinates(seed, retain, tau, window) -> None:
    features, attention, cfg = _case(seed, retain, tau, window)
    out = compress_video_tokens(features, attention, cfg)
    frames, num, _ = features.shape
    cols = 5
    unit = torch.arange(frames)[:, None].expand(frames, num)
    cell = torch.arange(num)[None, :].expand(frames, num)
    coords = torch.stack([unit, cell // cols, cell % cols], dim=-1)  # (T', N, 3) long
    merged = out.plan.apply(coords)
    assert merged.dtype == torch.long and merged.shape == (out.num_tokens, 3)
    dynamic = ~out.is_static
    assert merged[dynamic, 0].tolist() == out.frame_index[dynamic].tolist()
    assert merged[dynamic, 1].tolist() == (out.spatial_index[dynamic] // cols).tolist()
    assert merged[dynamic, 2].tolist() == (out.spatial_index[dynamic] % cols).tolist()
    # a temporally merged token's unit coordinate is the mean of its segment's units (every unit weighed
    # equally), its row/col a mix of the static positions of that segment
    mean_units = out.plan.apply(coords.double())[:, 0]
    for m in torch.nonzero(out.is_static).flatten().tolist():
        s, e = next((s, e) for s, e in out.segments if s == int(out.frame_index[m]))
        assert float(mean_units[m]) == pytest.approx((s + e) / 2, abs=1e-6)


def test_plan_applies_to_trailing_dims_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any trailing shape, and a chunk far smaller than the width, give the same result."""
    from holitom_cli.compression import plan as plan_module

    features, attention, cfg = _case(3, 0.5, 0.9, 3, dim=12)
    out = compress_video_tokens(features, attention, cfg)
    whole = out.plan.apply(features)
    monkeypatch.setattr(plan_module, "APPLY_CHUNK_BYTES", 1)  # one column per chunk
    assert torch.equal(out.plan.apply(features), whole)
    shaped = out.plan.apply(features.reshape(*features.shape[:2], 3, 4))
    assert torch.equal(shaped.reshape(whole.shape), whole)
    with pytest.raises(ValueError, match="input tokens"):
        out.plan.apply(features[:, :-1])


@pytest.mark.parametrize(("seed", "retain", "tau", "window"), CASES[:4])
def test_span_merges_aligned_tensors_with_the_plan(seed, retain, tau, window) -> None:
    """span_from_compression merges every aligned tensor exactly as the features: an affine image of the
    features (weights sum to 1) comes out as the same affine image of the merged features."""
    from holitom_cli.models.base import VisualTokens, span_from_compression

    features, attention, cfg = _case(seed, retain, tau, window)
    frames, num, _ = features.shape
    tokens = VisualTokens(
        features=features,
        saliency=attention,
        grid=(1, num),
        unit_times=[float(t) for t in range(frames)],
        suffix=torch.zeros(1, features.shape[-1]),
        aligned={"deep": 2.0 * features.reshape(frames, num, 2, -1) + 1.0},
    )
    out = compress_video_tokens(features, attention, cfg)
    span = span_from_compression(tokens, out)
    expected = (2.0 * out.features + 1.0).reshape(out.num_tokens, 2, -1)
    torch.testing.assert_close(span.aligned["deep"], expected, rtol=1e-5, atol=1e-5)
    assert len(span) == out.num_tokens + 1 and span.unit[-1] == -1  # the suffix comes last, unplaced
    assert span.unit[:-1].tolist() == out.frame_index.tolist()
    assert span.col[:-1].tolist() == out.spatial_index.tolist()
