"""Stage 3 of HoliTom: spatial merging (spec section 4).

* Static (temporally merged) tokens of a segment are clustered with DPC-KNN and each cluster is merged into
  its centre: ``beta * centre + (1 - beta) * mean(members)``.
* Dynamic tokens are selected per frame by vision attention (pure top-k, no merging).

Everything here is deterministic: where the reference adds 1e-6 random noise to the densities (which only
matters for exact ties), a tie is broken as if the lower index were denser; score ties pick the lower index.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "cluster_dpc_knn",
    "dynamic_keep_count",
    "merge_clusters",
    "nearest_centre",
    "pairwise_distance",
    "select_top_attention",
    "static_cluster_count",
]


def static_cluster_count(num_static: int, ratio: float) -> int:
    """Clusters kept from a segment's static tokens: Python ``round(n_s * r')`` (half to even; may be 0)."""
    return round(num_static * ratio)


def dynamic_keep_count(num_dynamic: int, ratio: float) -> int:
    """Dynamic tokens kept per frame: ``math.ceil(n_d * r')``, the same float product as the reference."""
    return math.ceil(num_dynamic * ratio)


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """(S, C) -> (S, S) float32 Euclidean distances divided by sqrt(C); exactly symmetric, zero diagonal.

    Computed from a float64 Gram matrix (far more precise than float32 differences or a float32 Gram;
    a float32 Gram changes DPC-KNN decisions on real-sized features). Only the upper triangle is
    multiplied out, in row blocks (about 2/3 of the full product's work), and mirrored, so that
    ``D[i, j] == D[j, i]`` bit for bit (density ties must be exact ties).
    """
    x64 = x.double()
    num = x64.shape[0]
    step = -(-num // 4) if num >= 64 else max(num, 1)  # 4 row blocks: 10 of 16 block products
    gram = torch.zeros(num, num, dtype=torch.float64, device=x.device)
    for i in range(0, num, step):
        gram[i : i + step, i:] = x64[i : i + step] @ x64[i:].T  # rows i.. against rows i..S-1
    gram = gram.triu()  # (S, S) upper triangle, diagonal included
    sq_norm = gram.diagonal().clone()
    gram = gram + gram.T  # exactly symmetric; the diagonal is doubled, and unused below
    sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * gram).clamp_(min=0.0)
    sq_dist.fill_diagonal_(0.0)
    return (sq_dist.sqrt() / math.sqrt(x.shape[-1])).float()


def cluster_dpc_knn(x: torch.Tensor, cluster_num: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (spec 4.3).

    Args:
        x: (S, C) tokens.
        cluster_num: number of centres, 1 <= cluster_num <= S.
        k: neighbours for the density (callers pass ``min(dpc_k, cluster_num)``); the token itself counts.
    Returns:
        centres: (cluster_num,) long, sorted ascending.
        dist: (S, S) float32 scaled distances.
    """
    num = x.shape[0]
    if not 1 <= cluster_num <= num:
        raise ValueError(f"cluster_num must be in [1, {num}], got {cluster_num}")
    dist = pairwise_distance(x)  # (S, S)
    knn = torch.topk(dist, k=min(k, num), dim=1, largest=False).values  # (S, k), includes self (0)
    density = torch.exp(-(knn**2).mean(dim=1))  # (S,)
    index = torch.arange(num, device=x.device)
    # j is "denser" than i: strictly higher density, or equal density and a lower index (deterministic
    # stand-in for the reference's random tie-break noise)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )  # (S, S) [i, j]
    to_denser = torch.where(denser, dist, torch.full_like(dist, math.inf)).min(dim=1).values
    delta = torch.where(torch.isinf(to_denser), dist.max(), to_denser)  # (S,)
    score = delta * density
    order = torch.sort(score, descending=True, stable=True).indices  # ties: lower index first
    centres = torch.sort(order[:cluster_num]).values
    return centres, dist


def nearest_centre(dist: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-centre tokens and the cluster each joins.

    Args:
        dist: (S, S) from :func:`cluster_dpc_knn`; centres: (K,) long ascending.
    Returns:
        others (S-K,) long ascending, the non-centre tokens; nearest (S-K,) long, the slot 0..K-1 of each
        one's nearest centre (first on ties). No host synchronisation.
    """
    num = dist.shape[0]
    is_centre = torch.zeros(num, dtype=torch.bool, device=dist.device)
    is_centre[centres] = True
    others = torch.nonzero_static(~is_centre, size=num - centres.numel()).squeeze(1)  # (S-K,), no sync
    to_centres = dist.index_select(0, others).index_select(1, centres)  # (S-K, K)
    return others, to_centres.argmin(dim=1)


def merge_clusters(x: torch.Tensor, centres: torch.Tensor, dist: torch.Tensor, beta: float) -> torch.Tensor:
    """Merge every non-centre token into its nearest centre.

    Args:
        x: (S, C) tokens; centres: (K,) long ascending; dist: (S, S) from :func:`cluster_dpc_knn`.
    Returns:
        (K, C) float32: ``beta * centre + (1 - beta) * mean(members)``; a centre without members unchanged.
    """
    x32 = x.float()
    others, nearest = nearest_centre(dist, centres)  # (S-K,), (S-K,) slot of the nearest centre
    sums = torch.zeros(centres.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, nearest, x32.index_select(0, others))
    counts = torch.zeros(centres.numel(), dtype=torch.float32, device=x.device)
    counts.index_add_(0, nearest, torch.ones_like(nearest, dtype=torch.float32))  # (K,), no bincount sync
    centre_x = x32.index_select(0, centres)
    mean = sums / counts.clamp(min=1.0)[:, None]
    merged = beta * centre_x + (1.0 - beta) * mean
    return torch.where((counts > 0)[:, None], merged, centre_x)


def select_top_attention(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Per-row top-``keep`` selection mask.

    Args:
        scores: (F, D) attention of the dynamic tokens of F frames.
    Returns:
        (F, D) bool, ``keep`` True per row; ties keep the lower column.
    """
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if keep <= 0 or cols == 0:
        return mask
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :keep]
    mask.scatter_(1, order, True)
    return mask
