"""DPC-KNN's float32 path with checked decisions (compression/dpc.py) against the float64 path.

The float64 path (:func:`exact_distances` + the same decision code) is the independent computation: the fast
path must give the same centres and the same nearest centre for every token, and its error bound must hold
with room to spare on the kinds of input the outer stage sees.
"""

from __future__ import annotations

import math

import pytest
import torch

from holitom_cli.compression import dpc


def float64_clusters(x: torch.Tensor, cluster_num: int, k: int):
    """(centres, others, nearest) of the float64 path, the one used before the float32 path existed."""
    return dpc.exact_clusters(x, cluster_num, k)[:3]


def video_like_tokens(seed: int, num: int = 150, channels: int = 3584, offset: float = 3.0) -> torch.Tensor:
    """Static-token means of one segment: a shared offset (real projected features have one), a few groups of
    similar positions and per-position noise, averaged over frames, as the outer stage computes them."""
    g = torch.Generator().manual_seed(seed)
    shared = offset * torch.randn(channels, generator=g)
    groups = torch.randn(8, channels, generator=g)
    member = torch.randint(0, 8, (num,), generator=g)
    frames = shared + groups[member] + 0.6 * torch.randn(num, channels, generator=g)
    frames = frames[None] + 0.2 * torch.randn(6, num, channels, generator=g)  # 6 frames
    return frames.bfloat16().float().mean(0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_fast_path_decides_like_float64(seed: int, ratio: float) -> None:
    x = video_like_tokens(seed)
    cluster_num = round(x.shape[0] * ratio)
    k = min(7, cluster_num)
    centres, others, nearest, dist = dpc.assign_clusters(x, cluster_num, k)
    expected = float64_clusters(x, cluster_num, k)
    assert torch.equal(centres, expected[0])
    assert torch.equal(others, expected[1])
    assert torch.equal(nearest, expected[2])
    assert torch.equal(dist, dist.T)
    assert torch.equal(dist.diagonal(), torch.zeros(x.shape[0]))
    # the distances are the float64 ones to float32-Gram accuracy
    torch.testing.assert_close(dist, dpc.exact_distances(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "make", "limit"),
    [
        ("video-like", lambda g: video_like_tokens(int(g.initial_seed())), 0.5),
        ("large offset", lambda g: 50.0 + torch.randn(120, 3584, generator=g), 0.5),
        ("huge offset", lambda g: 1e5 + torch.randn(120, 2048, generator=g), 0.5),
        ("low rank", lambda g: torch.randn(140, 4, generator=g) @ torch.randn(4, 3584, generator=g), 0.5),
        (
            "near duplicates",
            lambda g: torch.randn(1, 2048, generator=g) + 1e-3 * torch.randn(90, 2048, generator=g),
            0.5,
        ),
        ("non-negative", lambda g: torch.rand(160, 2048, generator=g), 0.5),
        ("small C", lambda g: torch.randn(60, 24, generator=g), 0.5),
        # the known tight family: every product of a row pair equal, so the rounding errors do not cancel
        ("constant rows", lambda g: torch.randn(80, 1, generator=g) * torch.ones(1, 2048), 1.0),
    ],
)
def test_error_bound_holds(name: str, make, limit: float) -> None:
    """|D32^2 - D64^2| against the bound, where D64 are the float32 distances of the float64 path (what the
    decisions are compared with): below half of it for generic inputs, below it for the tight family."""
    worst = 0.0
    for seed in range(3):
        x = make(torch.Generator().manual_seed(seed)).float()
        dist, bound = dpc.fast_distances(x)
        error = (dist.double().square() - dpc.exact_distances(x).double().square()).abs()
        worst = max(worst, float((error / bound.double()[:, None]).max()))
    print(f"{name}: largest error {worst:.3f} of the bound")
    assert worst < limit, f"{name}: the float32 error reached {worst:.2f} of the bound"


@pytest.mark.parametrize(
    ("name", "x", "cluster_num"),
    [
        # densities below float32's normal range (mean squared kNN distance ~100): whole segment in float64
        (
            "subnormal densities",
            lambda: (
                7.6738868749528075
                * (
                    lambda g: torch.randn(60, 2048, generator=g) * (1 + 0.02 * torch.rand(60, 1, generator=g))
                )(torch.Generator().manual_seed(336))
            ),
            51,
        ),
        # a common offset of 1e5: the float64 path must centre too, or it is the inaccurate one
        ("huge offset", lambda: 1e5 + torch.randn(120, 2048, generator=torch.Generator().manual_seed(3)), 40),
        # float64 rows of close calls: both (i, j) and (j, i) computed, one kept
        (
            "refined pairs",
            lambda: 1e4 + torch.randn(120, 2048, generator=torch.Generator().manual_seed(0)),
            40,
        ),
    ],
)
def test_review_cases(name: str, x, cluster_num: int) -> None:
    """Inputs found by review of the first version, each once giving a different result or an asymmetric
    matrix."""
    x = x().float()
    got = dpc.assign_clusters(x, cluster_num, 7)
    assert [t.tolist() for t in got[:3]] == [t.tolist() for t in float64_clusters(x, cluster_num, 7)], name
    assert torch.equal(got[3], got[3].T) and torch.equal(got[3].diagonal(), torch.zeros(x.shape[0]))


def test_exact_duplicates_fall_back_to_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Duplicated tokens tie in density: too close to call in float32, so the segment runs in float64."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 3584, generator=g)
    x[40:] = x[:40]  # every token twice
    calls = []
    real = dpc.exact_distances
    monkeypatch.setattr(dpc, "exact_distances", lambda t: calls.append(1) or real(t))
    centres, others, nearest, _ = dpc.assign_clusters(x, 20, 7)
    assert calls, "the fast path kept decisions it could not be sure of"
    expected = float64_clusters(x, 20, 7)
    assert [centres.tolist(), others.tolist(), nearest.tolist()] == [t.tolist() for t in expected]


def test_a_token_between_two_centres_is_decided_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token halfway between two centres: float32 cannot tell which is nearer, so its distances to the
    centres are recomputed from float64, and it joins the centre the float64 path picks."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 512, generator=g) * 4
    centres = torch.tensor([3, 11, 20])
    x[29] = (x[3] + x[11]) / 2  # equidistant, up to rounding
    rows = []
    real = dpc._exact_rows
    monkeypatch.setattr(dpc, "_exact_rows", lambda a, r, c: rows.append(r.tolist()) or real(a, r, c))
    dist, bound = dpc.fast_distances(x)
    others, nearest = dpc._fast_nearest(x, dist, bound, centres)
    expected = dpc.nearest_centre(dpc.exact_distances(x), centres)
    assert rows and 29 in rows[0] and len(rows[0]) < 5, rows
    assert others.tolist() == expected[0].tolist()
    assert nearest.tolist() == expected[1].tolist()
    assert torch.equal(dist, dist.T)


@pytest.mark.parametrize("kappa", [0.0, 1e4])
def test_any_bound_gives_the_float64_result(monkeypatch: pytest.MonkeyPatch, kappa: float) -> None:
    """kappa = 0 trusts float32 up to rounding, a huge kappa sends every segment to float64: on well-separated
    tokens both must agree with float64 (the checks decide only whether to recompute)."""
    monkeypatch.setattr(dpc, "ERROR_KAPPA", kappa)
    x = video_like_tokens(3, num=100)
    got = dpc.assign_clusters(x, 30, 7)
    assert [t.tolist() for t in got[:3]] == [t.tolist() for t in float64_clusters(x, 30, 7)]


@pytest.mark.parametrize(("dtype", "channels"), [(torch.float64, 2048), (torch.float32, 896)])
def test_float64_input_and_narrow_tokens_use_the_exact_path(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, channels: int
) -> None:
    def no_fast_path(_: torch.Tensor):
        raise AssertionError("took the float32 path")

    monkeypatch.setattr(dpc, "fast_distances", no_fast_path)
    x = torch.randn(30, channels, dtype=dtype, generator=torch.Generator().manual_seed(0))
    centres, dist = dpc.cluster_dpc_knn(x, 5, 5)
    assert dist.dtype == torch.float32
    assert centres.tolist() == float64_clusters(x, 5, 5)[0].tolist()


@pytest.mark.parametrize(("num", "cluster_num"), [(1, 1), (5, 1), (5, 5), (9, 2)])
def test_edge_cluster_counts(monkeypatch: pytest.MonkeyPatch, num: int, cluster_num: int) -> None:
    monkeypatch.setattr(dpc, "FAST_MIN_CHANNELS", 0)  # the checked path at C = 32
    x = torch.randn(num, 32, generator=torch.Generator().manual_seed(num))
    got = dpc.assign_clusters(x, cluster_num, min(7, cluster_num))
    assert [t.tolist() for t in got[:3]] == [
        t.tolist() for t in float64_clusters(x, cluster_num, min(7, cluster_num))
    ]
    assert math.isclose(float(got[3].max()), float(dpc.exact_distances(x).max()), rel_tol=1e-4)


def test_close_density_calls_are_settled_on_float64_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few close calls in the density order or at the score cut: only those tokens' rows are recomputed
    in float64 (no whole-segment fallback), and the result is the float64 one."""
    x = video_like_tokens(0)
    cluster_num = round(x.shape[0] * 0.6)
    rows, fallbacks = [], []
    real_rows, real_exact = dpc._exact_rows, dpc.exact_distances

    def recorded_rows(x, r, c):  # (rows, columns) of every float64 recomputation
        rows.append((r.numel(), x.shape[0] if c is None else c.numel()))
        return real_rows(x, r, c)

    monkeypatch.setattr(dpc, "_exact_rows", recorded_rows)
    monkeypatch.setattr(dpc, "exact_distances", lambda t: fallbacks.append(1) or real_exact(t))
    got = dpc.assign_clusters(x, cluster_num, 7)
    assert not fallbacks
    assert rows and rows[0][1] == x.shape[0] and rows[0][0] <= dpc.MAX_EXACT_ROWS
    monkeypatch.setattr(dpc, "exact_distances", real_exact)
    assert [t.tolist() for t in got[:3]] == [t.tolist() for t in float64_clusters(x, cluster_num, 7)]


@pytest.mark.parametrize("num", [40, 255, 256, 301])
def test_upper_gram_both_ways(num: int) -> None:
    """One product below 256 tokens, row blocks from 256 on: the upper triangle of x x^T either way."""
    x = torch.randn(num, 96, generator=torch.Generator().manual_seed(num), dtype=torch.float64)
    upper = dpc._upper_gram(x)
    assert torch.equal(upper, upper.triu())
    torch.testing.assert_close(upper, (x @ x.T).triu(), rtol=1e-12, atol=1e-12)
    dist = dpc.exact_distances(x.float())
    assert torch.equal(dist, dist.T)
