"""Stage 3 pieces on tiny hand-built inputs: DPC-KNN centres, beta merges, budgets, attention top-k."""

from __future__ import annotations

import math

import pytest
import torch

from holitom_cli.compression.spatial import (
    cluster_dpc_knn,
    dynamic_keep_count,
    merge_clusters,
    select_top_attention,
    static_cluster_count,
)

# Three groups far apart, each a centre with two side points (2-D, so distances are divided by sqrt(2)).
# Group A (spread 1) is the densest, then B (spread 2), then C (sides at +3 and -2).
POINTS = torch.tensor(
    [
        [0.0, 0.0], [1.0, 0.0], [-1.0, 0.0],  # A: 0, 1, 2
        [100.0, 0.0], [102.0, 0.0], [98.0, 0.0],  # B: 3, 4, 5
        [0.0, 100.0], [3.0, 100.0], [-2.0, 100.0],  # C: 6, 7, 8
    ]
)  # fmt: skip


def test_dpc_knn_hand_computed_three_clusters() -> None:
    centres, dist = cluster_dpc_knn(POINTS, cluster_num=3, k=3)
    # hand computation with k = 3 (self + 2 neighbours), D = euclid / sqrt(2):
    #   rho_A0 = exp(-(0 + 1/2 + 1/2) / 3) = exp(-1/3); rho_B3 = exp(-(0 + 2 + 2) / 3) = exp(-4/3);
    #   rho_C6 = exp(-(0 + 4.5 + 2) / 3) = exp(-13/6); side points are all sparser than their centre.
    #   delta_A0 = max distance = |(102,0)-(-2,100)| / sqrt(2) = sqrt(20816) / sqrt(2)
    #   delta_B3 = distance to the nearest denser point (1,0) = 99 / sqrt(2)
    #   delta_C6 = distance to (0,0) = 100 / sqrt(2); every side point has delta <= 3 / sqrt(2)
    assert centres.tolist() == [0, 3, 6]
    assert dist[4, 8].item() == pytest.approx(math.sqrt(20816) / math.sqrt(2))
    assert dist.max().item() == pytest.approx(math.sqrt(20816) / math.sqrt(2))
    score_a = math.sqrt(20816) / math.sqrt(2) * math.exp(-1 / 3)
    score_b = 99 / math.sqrt(2) * math.exp(-4 / 3)
    score_c = 100 / math.sqrt(2) * math.exp(-13 / 6)
    best_side = 3 / math.sqrt(2) * math.exp(-(0 + 0.5 + 2) / 3)  # an upper bound for the side points
    assert score_a > score_b > score_c > best_side


def test_beta_merge_hand_computed() -> None:
    centres, dist = cluster_dpc_knn(POINTS, cluster_num=3, k=3)
    merged = merge_clusters(POINTS, centres, dist, beta=0.6)
    # A: 0.6*(0,0) + 0.4*mean((1,0),(-1,0)) = (0,0); B: (100,0); C: 0.6*(0,100) + 0.4*(0.5,100) = (0.2,100)
    torch.testing.assert_close(merged, torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.2, 100.0]]))
    uniform = merge_clusters(POINTS, centres, dist, beta=0.0)  # plain mean of the members
    torch.testing.assert_close(uniform, torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.5, 100.0]]))
    torch.testing.assert_close(merge_clusters(POINTS, centres, dist, beta=1.0), POINTS[[0, 3, 6]])


def test_more_clusters_and_empty_cluster() -> None:
    # as many clusters as tokens: every token is a centre
    centres, dist = cluster_dpc_knn(POINTS, cluster_num=9, k=7)
    assert centres.tolist() == list(range(9))
    merged = merge_clusters(POINTS, centres, dist, beta=0.6)
    torch.testing.assert_close(merged, POINTS)  # every cluster empty: centres unchanged


def test_nearest_centre_assignment_first_index_on_ties() -> None:
    # token 1 is equally far from centres 0 and 2 -> goes to centre 0 (first index)
    x = torch.tensor([[0.0], [1.0], [2.0]])
    dist = torch.cdist(x, x)
    merged = merge_clusters(x, torch.tensor([0, 2]), dist, beta=0.5)
    torch.testing.assert_close(merged, torch.tensor([[0.5], [2.0]]))


def test_one_cluster_picks_lowest_index() -> None:
    # our deterministic rule (the reference decides this case by random noise): all densities tie at
    # exp(0) = 1, the lowest index counts as densest and gets the largest delta
    x = torch.tensor([[5.0, 1.0], [0.0, 0.0], [9.0, 9.0], [4.0, 4.0]])
    centres, _ = cluster_dpc_knn(x, cluster_num=1, k=1)
    assert centres.tolist() == [0]


def test_two_clusters_deterministic_pair_rule() -> None:
    # 1-D points 0, 1, 10 with k = 2: points 0 and 1 tie in density exp(-1/2); index 0 counts as denser,
    # so delta_0 = max D = 10, delta_1 = 1, delta_2 = 9 but rho_2 = exp(-81/2): centres {0, 1}
    x = torch.tensor([[0.0], [1.0], [10.0]])
    centres, dist = cluster_dpc_knn(x, cluster_num=2, k=2)
    assert centres.tolist() == [0, 1]
    # the member 10 is nearer to centre 1: centre 0 stays empty (unchanged), centre 1 -> 0.6*1 + 0.4*10
    torch.testing.assert_close(merge_clusters(x, centres, dist, beta=0.6), torch.tensor([[0.0], [4.6]]))


def test_distances_are_exactly_symmetric_with_zero_diagonal() -> None:
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    _, dist = cluster_dpc_knn(x, cluster_num=5, k=5)
    assert torch.equal(dist, dist.T)
    assert torch.equal(dist.diagonal(), torch.zeros(40))
    torch.testing.assert_close(dist[3, 7], (x[3] - x[7]).norm() / 4.0)


@pytest.mark.parametrize(
    ("num", "ratio", "expected"),
    [(196, 0.10, 20), (196, 0.15, 30), (196, 0.20, 40), (196, 0.25, 49), (92, 0.5, 46), (0, 0.3, 0)],
)
def test_dynamic_budget_is_ceil(num: int, ratio: float, expected: int) -> None:
    assert dynamic_keep_count(num, ratio) == expected


def test_static_budget_is_bankers_round() -> None:
    assert static_cluster_count(29, 0.5) == 14  # round(14.5) == 14
    assert static_cluster_count(31, 0.5) == 16  # round(15.5) == 16
    assert static_cluster_count(3, 0.1) == 0  # may vanish


def test_select_top_attention_ties_and_rows() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2]])
    mask = select_top_attention(scores, 2)
    assert mask.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert not select_top_attention(scores, 0).any()
