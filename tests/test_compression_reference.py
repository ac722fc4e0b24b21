"""The vectorised outer-LLM compression against a plain-loop implementation of the spec (sections 2 to 6).

The loop version below is written from the spec's pseudo-code, independently of the package: per-pair cosine
similarity, a double-loop gain table, the DP exactly as spec 2.3, the static/dynamic split, DPC-KNN with
loops in float64, nearest-centre assignment and the beta merge, and the one_token output order.
Exact density ties (only possible with 1 or 2 clusters) are broken like our documented rule: the lower
index counts as denser; score ties pick the lower index.
"""

from __future__ import annotations

import math

import pytest
import torch

from holitom_cli.compression import HoliTomConfig, compress_video_tokens, temporal_segments


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-300)


def loop_segments(features: torch.Tensor, tau: float, max_window: int):
    frames, num, _ = features.shape
    similar = [
        [cosine(features[t, p], features[t + 1, p]) > tau for p in range(num)] for t in range(frames - 1)
    ]

    def static_positions(s: int, e: int) -> list[int]:
        return [p for p in range(num) if all(similar[t][p] for t in range(s, e))]

    gain = [[0] * frames for _ in range(frames)]
    for s in range(frames):
        for e in range(s + 1, frames):
            gain[s][e] = len(static_positions(s, e)) * (e - s)
    dp: dict[int, int] = {-1: 0}
    start: dict[int, int] = {}
    for i in range(frames):
        best_val, best_start = dp[i - 1], i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            v = dp[j] + gain[j + 1][i]
            if v > best_val:
                best_val, best_start = v, j + 1
        dp[i], start[i] = best_val, best_start
    segments = []
    i = frames - 1
    while i >= 0:
        segments.append((start[i], i))
        i = start[i] - 1
    return segments[::-1], dp[frames - 1], static_positions


def loop_dpc_knn(x: list[torch.Tensor], cluster_num: int, k: int):
    num, dim = len(x), x[0].numel()
    dist = [
        [float((x[i].double() - x[j].double()).norm()) / math.sqrt(dim) for j in range(num)]
        for i in range(num)
    ]
    density = []
    for i in range(num):
        nearest = sorted(dist[i])[:k]
        density.append(math.exp(-sum(d * d for d in nearest) / k))
    global_max = max(max(row) for row in dist)
    score = []
    for i in range(num):
        denser = [j for j in range(num) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta = min(dist[i][j] for j in denser) if denser else global_max
        score.append(delta * density[i])
    ranked = sorted(range(num), key=lambda i: (-score[i], i))
    return sorted(ranked[:cluster_num]), dist


def loop_compress(features: torch.Tensor, attention: torch.Tensor, cfg: HoliTomConfig):
    frames, num, _ = features.shape
    segments, reduced, static_positions = loop_segments(features, cfg.tau, cfg.max_window)
    total = frames * num
    ratio = min(cfg.retain_ratio / ((total - reduced) / total), 1.0)
    tokens, frame_idx, pos_idx, static_flags = [], [], [], []
    for s, e in segments:
        static = static_positions(s, e) if e > s else []
        dynamic = [p for p in range(num) if p not in static]
        means = [features[s : e + 1, p].double().mean(0) for p in static]
        cluster_num = round(len(static) * ratio)
        if cluster_num > 0:
            centres, dist = loop_dpc_knn(means, cluster_num, min(cfg.dpc_k, cluster_num))
            members: dict[int, list[int]] = {c: [] for c in centres}
            for i in range(len(static)):
                if i in centres:
                    continue
                nearest = min(centres, key=lambda c, i=i: (dist[i][c], c))
                members[nearest].append(i)
            for c in centres:
                if members[c]:
                    mean = sum(means[i] for i in members[c]) / len(members[c])
                    tokens.append(cfg.beta * means[c] + (1 - cfg.beta) * mean)
                else:
                    tokens.append(means[c])
                frame_idx.append(s)
                pos_idx.append(static[c])
                static_flags.append(True)
        keep = math.ceil(len(dynamic) * ratio)
        for t in range(s, e + 1):
            ranked = sorted(dynamic, key=lambda p, t=t: (-float(attention[t, p]), p))
            for p in sorted(ranked[:keep]):
                tokens.append(features[t, p].double())
                frame_idx.append(t)
                pos_idx.append(p)
                static_flags.append(False)
    return segments, reduced, ratio, tokens, frame_idx, pos_idx, static_flags


def scene_video(seed: int, frames: int, num: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scenes; inside a scene each position is static (tiny noise) or moving (large noise)."""
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(frames - 1, generator=gen)[: 1 + seed % 3].add(1).tolist())
    bounds = [0, *cuts, frames]
    chunks = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        base = torch.randn(num, dim, generator=gen)
        level = torch.rand(num, 1, generator=gen)  # per-position amount of motion
        noise = torch.randn(b - a, num, dim, generator=gen) * (level * 1.5) ** 2
        chunks.append(base[None] + noise)
    return torch.cat(chunks), torch.rand(frames, num, generator=gen)


CASES = [
    (0, 0.10, 0.80, 1024),
    (1, 0.15, 0.80, 1024),
    (2, 0.25, 0.65, 1024),
    (3, 0.50, 0.90, 3),
    (4, 0.20, 0.70, 2),
    (5, 0.35, 0.80, 1024),
    (6, 1.00, 0.80, 1024),
    (7, 0.05, 0.50, 1024),
]


@pytest.fixture(params=["float64", "checked float32"], autouse=True)
def dpc_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with both DPC-KNN distance paths (these small test widths would otherwise always
    take the float64 one; see compression/dpc.py)."""
    from holitom_cli.compression import dpc

    monkeypatch.setattr(dpc, "FAST_MIN_CHANNELS", 10**9 if request.param == "float64" else 0)
    return request.param


@pytest.mark.parametrize(("seed", "retain", "tau", "window"), CASES)
def test_vectorised_matches_loop_reference(seed: int, retain: float, tau: float, window: int) -> None:
    features, attention = scene_video(seed, frames=6 + seed % 4, num=25 + 11 * (seed % 3), dim=6)
    cfg = HoliTomConfig(retain_ratio=retain, tau=tau, max_window=window, beta=0.6, dpc_k=7)
    out = compress_video_tokens(features, attention, cfg)
    segments, reduced, ratio, tokens, frames, positions, flags = loop_compress(features, attention, cfg)

    assert out.segments == segments
    assert temporal_segments(features, tau=tau, max_window=window) == segments
    assert out.reduced == reduced
    assert out.effective_ratio == ratio
    assert out.frame_index.tolist() == frames
    assert out.spatial_index.tolist() == positions
    assert out.is_static.tolist() == flags
    torch.testing.assert_close(out.features.double(), torch.stack(tokens), rtol=1e-5, atol=1e-5)


def test_reference_cases_exercise_three_or_more_clusters() -> None:
    """Guard: the comparison above really covers multi-frame segments with >= 3 static clusters."""
    seen = 0
    for seed, retain, tau, window in CASES:
        features, attention = scene_video(seed, frames=6 + seed % 4, num=25 + 11 * (seed % 3), dim=6)
        cfg = HoliTomConfig(retain_ratio=retain, tau=tau, max_window=window)
        out = compress_video_tokens(features, attention, cfg)
        for s, e in out.segments:
            seen += int((out.is_static & (out.frame_index == s)).sum() >= 3 and e > s)
    assert seen >= 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_frames", [1, 3, 100])
@pytest.mark.parametrize(("seed", "retain", "tau", "window"), CASES[:5])
def test_every_input_dtype_gives_the_plan_of_its_values(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, chunk_frames: int, seed: int, retain: float,
    tau: float, window: int,
) -> None:  # fmt: skip
    """bf16 / fp16 / float32 input: the plan is the spec's plan on exactly those values (float64 loop),
    whatever the chunking of the similarity pass (1 frame, 3 frames, all frames per chunk)."""
    from holitom_cli.compression import temporal

    features, attention = scene_video(seed, frames=7 + seed % 4, num=25 + 11 * (seed % 3), dim=24)
    features = features.to(dtype)
    monkeypatch.setattr(temporal, "CPU_CHUNK_BYTES", chunk_frames * features[0].numel() * 4)
    cfg = HoliTomConfig(retain_ratio=retain, tau=tau, max_window=window)
    out = compress_video_tokens(features, attention, cfg)
    segments, reduced, ratio, tokens, frames, positions, flags = loop_compress(
        features.double(), attention, cfg
    )
    assert out.features.dtype == dtype
    assert (out.segments, out.reduced, out.effective_ratio) == (segments, reduced, ratio)
    assert (out.frame_index.tolist(), out.spatial_index.tolist(), out.is_static.tolist()) == (
        frames,
        positions,
        flags,
    )
    # tokens: the float64 result rounded once to the input dtype (kept dynamic tokens exactly)
    expected = torch.stack(tokens).to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(out.features.double(), expected.double(), rtol=tol, atol=tol)
    dynamic = ~out.is_static
    assert torch.equal(out.features[dynamic], features[out.frame_index[dynamic], out.spatial_index[dynamic]])
