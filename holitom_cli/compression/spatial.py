"""Stage 3 of HoliTom: spatial merging (spec section 4).

* Static (temporally merged) tokens of a segment are clustered with DPC-KNN (:mod:`.dpc`) and each cluster
  is merged into its centre: ``beta * centre + (1 - beta) * mean(members)``.
* Dynamic tokens are selected per frame by vision attention (pure top-k, no merging).

Everything here is deterministic: where the reference adds 1e-6 random noise to the densities (which only
matters for exact ties), a tie is broken as if the lower index were denser; score ties pick the lower index.
"""

from __future__ import annotations

import math

import torch

from holitom_cli.compression.dpc import cluster_dpc_knn, nearest_centre

__all__ = [
    "cluster_dpc_knn",
    "dynamic_keep_count",
    "merge_assigned",
    "merge_clusters",
    "nearest_centre",
    "select_top_attention",
    "static_cluster_count",
]


def static_cluster_count(num_static: int, ratio: float) -> int:
    """Clusters kept from a segment's static tokens: Python ``round(n_s * r')`` (half to even; may be 0)."""
    return round(num_static * ratio)


def dynamic_keep_count(num_dynamic: int, ratio: float) -> int:
    """Dynamic tokens kept per frame: ``math.ceil(n_d * r')``, the same float product as the reference."""
    return math.ceil(num_dynamic * ratio)


def merge_clusters(x: torch.Tensor, centres: torch.Tensor, dist: torch.Tensor, beta: float) -> torch.Tensor:
    """Merge every non-centre token into its nearest centre.

    Args:
        x: (S, C) tokens; centres: (K,) long ascending; dist: (S, S) from :func:`cluster_dpc_knn`.
    Returns:
        (K, C) float32: ``beta * centre + (1 - beta) * mean(members)``; a centre without members unchanged.
    """
    return merge_assigned(x, centres, *nearest_centre(dist, centres), beta)


def merge_assigned(
    x: torch.Tensor, centres: torch.Tensor, others: torch.Tensor, nearest: torch.Tensor, beta: float
) -> torch.Tensor:
    """:func:`merge_clusters` with the assignment of :func:`nearest_centre` already made."""
    x32 = x.float()
    sums = torch.zeros(centres.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, nearest, x32.index_select(0, others))
    counts = torch.zeros(centres.numel(), dtype=torch.float32, device=x.device)
    counts.index_add_(0, nearest, torch.ones_like(nearest, dtype=torch.float32))  # (K,), no bincount sync
    # in place, with the roundings of beta * centre + (1 - beta) * (sums / counts); a centre without members
    # gets weight 1 and a zero mean, i.e. stays itself
    weight = counts.new_ones(centres.numel()).masked_fill_(counts > 0, beta)  # (K,)
    merged = x32.index_select(0, centres).mul_(weight[:, None])
    return merged.add_(sums.div_(counts.clamp(min=1.0)[:, None]).mul_(1.0 - beta))


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
