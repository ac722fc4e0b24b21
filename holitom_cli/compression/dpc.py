"""DPC-KNN clustering (spec 4.3) with float64 decisions at float32 cost on the CPU (issue 13).

The clusters depend on the (S, S) distances only through decisions: the order of the densities, the
score cut that picks the centres, and the nearest centre of every other token. Two ways to the distances:

* :func:`exact_distances`: a float64 Gram matrix of the centred tokens (about 15 significant digits),
  returned as float32.
* :func:`fast_distances`: a float32 Gram matrix of the centred tokens, about half the cost, with a bound
  on how far each of its squared distances can be from the float64 one.

:func:`assign_clusters` makes the decisions from the fast distances and keeps them when every one of them
holds for *any* distances within the bound. Close calls in the density order or at the score cut are
settled by recomputing the rows of the tokens involved from float64 (at most ``MAX_EXACT_ROWS``) and
deciding again; a nearest-centre choice too close to call is recomputed from float64 for that token only;
anything else (more close calls, still close after the float64 rows, densities or scores below float32's
normal range) recomputes the whole segment with :func:`exact_distances`. So the centres and the
assignment are those of the float64 path, up to float64 rounding and the bound's statistical assumption.
The fast path is taken on the CPU for float32 tokens of at least ``FAST_MIN_CHANNELS`` channels.

The bound on the squared scaled distances of row i is ``u (ERROR_KAPPA sqrt(C) + 16) (|x_i - m|^2 +
max_j |x_j - m|^2) / C`` (u = 2^-24, m the tokens' mean). The ``sqrt(C)`` part is statistical, not worst
case (the Gram errors are sums of thousands of rounding errors); the 16 covers the deterministic
roundings. ``tests/test_compression_dpc.py`` measures the errors against it on several input families.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "ERROR_KAPPA",
    "TINY",
    "assign_clusters",
    "assign_from_fast",
    "bound_scale",
    "cluster_dpc_knn",
    "decide_batch",
    "density_error",
    "exact_clusters",
    "exact_distances",
    "exact_nearest",
    "fast_distances",
    "fast_path",
    "nearest_centre",
    "relative_error",
]

_U = 2.0**-24  # float32 unit roundoff
TINY = torch.finfo(torch.float32).tiny  # smallest normal float32
_WHOLE = torch.empty(0, dtype=torch.long)  # sentinel of _unsettled: "recompute the whole segment"
#: Size of the statistical part of the float32 error bound (the Gram matrix's dot products), in units of
#: ``u sqrt(C) (|x_i - m|^2 + max_j |x_j - m|^2) / C``.
ERROR_KAPPA = 1.0
#: The deterministic part, in units of ``u (|x_i - m|^2 + max_j |x_j - m|^2) / C``: the centring (4 u), the
#: norms-minus-product formula (3 u) and the float32 distance's own rounding (4 u of D^2 <= 8 u).
_ROUNDING = 16.0
#: The float32 path is taken from this many channels up; below, the float64 Gram matrix costs no more than
#: the checks (2-core CPU, DPC-KNN step: 0.95x at C = 896, about even at 1536-2048, 1.2-1.4x at 3584).
FAST_MIN_CHANNELS = 1536
#: At most this many tokens of a segment get their distances recomputed in float64 to settle close calls
#: of the density order or the score cut; more, and the whole segment is recomputed.
MAX_EXACT_ROWS = 16


def _upper_gram(x: torch.Tensor) -> torch.Tensor:
    """(S, C) -> (S, S) upper triangle of ``x x^T`` (diagonal included, zeros below); from S = 256 on
    multiplied out in row blocks (10 of 16 block products). Below, one product is faster: the blocks are
    too small for the matrix-product kernels (a 140 x 3584 segment: 10 % less time for its distances)."""
    num = x.shape[0]
    if num < 256:
        return (x @ x.T).triu_()
    step = -(-num // 4)
    gram = torch.zeros(num, num, dtype=x.dtype, device=x.device)
    for i in range(0, num, step):
        gram[i : i + step, i:] = x[i : i + step] @ x[i:].T  # rows i.. against rows i..S-1
    return gram.triu()  # the diagonal blocks' lower parts are dropped


def _scaled(upper: torch.Tensor, channels: int) -> torch.Tensor:
    """Upper Gram triangle -> float32 distances / sqrt(C), mirrored (exactly symmetric), zero diagonal."""
    sq_norm = upper.diagonal().clone()
    gram = upper + upper.T  # the diagonal is doubled, and unused below
    sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * gram).clamp_(min=0.0)
    sq_dist.fill_diagonal_(0.0)
    return (sq_dist.sqrt_() / math.sqrt(channels)).float()


def exact_distances(x: torch.Tensor) -> torch.Tensor:
    """(S, C) -> (S, S) float32 Euclidean distances divided by sqrt(C), from a float64 Gram matrix of the
    centred tokens (translating changes no distance, and without a common offset the cancellation error is
    far smaller); exactly symmetric (``D[i, j] == D[j, i]`` bit for bit: density ties must be exact ties),
    zero diagonal."""
    return _scaled(_upper_gram(x.double() - x.mean(0, keepdim=True).double()), x.shape[-1])


def fast_distances(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, C) float32 -> (distances (S, S) float32 as :func:`exact_distances`, bound (S,)).

    From the float32 Gram matrix of ``x - mean(x)`` (distances do not change; the smaller norms make the
    rounding errors smaller). ``bound[i]`` bounds ``|D32[i, j]^2 - D64[i, j]^2|`` for every j, D64 being
    :func:`exact_distances` (see the module docstring and ``ERROR_KAPPA``, ``_ROUNDING``)."""
    channels = x.shape[-1]
    centred = x - x.mean(0, keepdim=True)
    upper = _upper_gram(centred)
    sq_norm = upper.diagonal()
    bound = bound_scale(channels) * (sq_norm + sq_norm.max())
    return _scaled(upper, channels), bound


def bound_scale(channels: int) -> float:
    """``u (ERROR_KAPPA sqrt(C) + 16) / C``: times ``|x_i - m|^2 + max_j |x_j - m|^2``, the bound of row i."""
    return _U * (ERROR_KAPPA * math.sqrt(channels) + _ROUNDING) / channels


def relative_error(dist: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Bound on |D32 - D64| / D32 for distances ``dist`` whose squares are within ``bound`` of the
    float64 ones: |a - b| <= E gives |sqrt(a) - sqrt(b)| <= E / sqrt(a); plus sqrt's and the division's
    rounding."""
    return bound / dist.square().clamp_min(1e-30) + 4 * _U


class _Decisions(NamedTuple):
    """Per token (S,), or (B, S) for a batch of segments."""

    mean_sq: torch.Tensor  # mean squared distance to the k nearest (self included)
    density: torch.Tensor  # (-1 on padding)
    by_density: torch.Tensor  # tokens by density, descending, ties to the lower index
    delta: torch.Tensor  # distance to the nearest denser token (the densest: the largest distance)
    score: torch.Tensor  # delta * density (-inf on padding)
    order: torch.Tensor  # tokens by score, descending, ties to the lower index
    is_centre: torch.Tensor  # bool: among the first K of ``order``
    centres: torch.Tensor | None  # (K,) ascending (single segments only)


def decide_batch(dist: torch.Tensor, valid: torch.Tensor, cluster_nums: torch.Tensor, k: int) -> _Decisions:
    """Spec 4.3 on given distances of B segments: dist (B, S, S), +inf where a row or column is padding;
    valid (B, S) bool; cluster_nums (B,) long. The decisions of a segment with fewer than k tokens are
    meaningless (its k nearest include padding). An exact density tie counts the lower index as denser (a
    deterministic stand-in for the reference's random tie-break noise)."""
    batch, num, _ = dist.shape
    positions = torch.arange(num, device=dist.device).expand(batch, num)
    knn = torch.topk(dist, k=min(k, num), dim=2, largest=False).values  # (B, S, k), includes self (0)
    mean_sq = (knn**2).mean(dim=2)
    density = torch.exp(-mean_sq).masked_fill_(~valid, -1.0)  # padding after every token
    by_density = torch.sort(density, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(by_density).scatter_(1, by_density, positions)
    # j is denser than i iff it comes first in that order
    to_denser = dist.masked_fill(rank[:, None, :] >= rank[:, :, None], math.inf).amin(dim=2)
    farthest = torch.where(valid[:, :, None] & valid[:, None, :], dist, 0.0).amax(dim=(1, 2))  # (B,)
    delta = torch.where(torch.isinf(to_denser), farthest[:, None], to_denser)
    score = (delta * density).masked_fill_(~valid, -math.inf)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # ties: lower index first
    place = torch.empty_like(order).scatter_(1, order, positions)
    return _Decisions(
        mean_sq, density, by_density, delta, score, order, place < cluster_nums[:, None], None
    )


def _decide(dist: torch.Tensor, cluster_num: int, k: int) -> _Decisions:
    """:func:`decide_batch` for one segment (S, S), with its (K,) centres; no host synchronisation."""
    valid = torch.ones(1, dist.shape[0], dtype=torch.bool, device=dist.device)
    cluster_nums = torch.full((1,), cluster_num, dtype=torch.long, device=dist.device)
    d = decide_batch(dist[None], valid, cluster_nums, k)
    d = _Decisions(*(t[0] for t in d[:-1]), None)
    return d._replace(centres=torch.sort(d.order[:cluster_num]).values)


def density_error(mean_sq: torch.Tensor, bound: torch.Tensor, k: int) -> torch.Tensor:
    """Bound on the relative error of the densities: |delta mean_sq| <= bound (order statistics move no
    more than the values), plus rounding; with k = 1 every density is exp(0) = 1 exactly on both paths."""
    return bound + 8 * _U * (1 + mean_sq) if k > 1 else torch.zeros_like(bound)


def _unsettled(d: _Decisions, dist: torch.Tensor, bound: torch.Tensor, k: int) -> torch.Tensor | None:
    """None if the density order and the score cut hold for every distance matrix within ``bound``; else
    the tokens whose decisions are too close to call (their rows, in float64, settle them), or ``_WHOLE``
    when only the whole float64 matrix can."""
    num, cluster_num = dist.shape[0], d.centres.numel()
    if cluster_num == num:
        return None  # every token is a centre
    if (k > 1 and bool(d.density.min() < TINY)) or bool(d.score.min() < TINY):
        return _WHOLE  # below float32's normal range one rounding step is not a relative error any more
    r_density = density_error(d.mean_sq, bound, k)
    r_delta = 2 * relative_error(d.delta, bound)  # a minimum over the row: twice the entry's bound
    rho, r_rho = d.density[d.by_density], r_density[d.by_density]
    low, high = rho * (1 - r_rho), rho * (1 + r_rho)
    close = low[:-1] <= high[1:]  # neighbours in the density order that may swap
    if bool(close.any()):
        if bool(close[0]) or bool((low[:-2] <= high[2:]).any()):  # the densest may change, or a band of 3+
            return d.by_density[torch.cat([close, close[-1:]]) | torch.cat([close[:1], close])]
        a, b = d.by_density[:-1][close], d.by_density[1:][close]  # a is denser than b today
        d_ab = dist[a, b]
        reach = d_ab * (1 - relative_error(d_ab, torch.maximum(bound[a], bound[b])))
        # a swap matters only if a is (nearly) b's nearest denser token, or b would be a's
        matters = reach <= torch.maximum(d.delta[a] * (1 + r_delta[a]), d.delta[b] * (1 + r_delta[b]))
        if bool(matters.any()):
            return torch.cat([a[matters], b[matters]])
    r_score = r_delta + r_density
    low, high = d.score * (1 - r_score), d.score * (1 + r_score)
    top, rest = d.order[:cluster_num], d.order[cluster_num:]
    floor, ceiling = low[top].min(), high[rest].max()
    if bool(floor > ceiling):
        return None
    return torch.cat([top[low[top] <= ceiling], rest[high[rest] >= floor]])  # the tokens around the cut


def _exact_rows(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """(R, Q) float32 distances / sqrt(C) of tokens ``rows`` to tokens ``cols`` (None: to every token), from
    float64 (centred as in :func:`exact_distances`)."""
    mean = x.mean(0, keepdim=True).double()
    a = x.index_select(0, rows).double() - mean
    b = (x if cols is None else x.index_select(0, cols)).double() - mean
    sq_dist = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)
    dist = (sq_dist.clamp_(min=0.0).sqrt_() / math.sqrt(x.shape[-1])).float()
    cols = torch.arange(x.shape[0], device=x.device) if cols is None else cols
    return dist.masked_fill_(rows[:, None] == cols[None, :], 0.0)


def nearest_centre(dist: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-centre tokens and the cluster each joins.

    Args:
        dist: (S, S) from :func:`cluster_dpc_knn`; centres: (K,) long ascending.
    Returns:
        others (S-K,) long ascending, the non-centre tokens; nearest (S-K,) long, the slot 0..K-1 of each
        one's nearest centre (first on ties). No host synchronisation.
    """
    others = _others(dist.shape[0], centres)
    to_centres = dist.index_select(0, others).index_select(1, centres)  # (S-K, K)
    return others, to_centres.argmin(dim=1)


def _others(num: int, centres: torch.Tensor) -> torch.Tensor:
    """(S-K,) long ascending: the tokens 0..S-1 that are not ``centres``; no host synchronisation."""
    is_centre = torch.zeros(num, dtype=torch.bool, device=centres.device)
    is_centre[centres] = True
    return torch.nonzero_static(~is_centre, size=num - centres.numel()).squeeze(1)


def _fast_nearest(
    x: torch.Tensor, dist: torch.Tensor, bound: torch.Tensor, centres: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_centre` on fast distances: a token whose two nearest centres are within the bound
    of each other has its distances to the centres recomputed from float64 (written into ``dist``)."""
    num, cluster_num = dist.shape[0], centres.numel()
    others = _others(num, centres)
    if cluster_num == 1 or cluster_num == num:
        return others, torch.zeros_like(others)
    two, slot = torch.topk(dist.index_select(0, others).index_select(1, centres), 2, dim=1, largest=False)
    error = relative_error(two, bound[others, None])  # (S-K, 2)
    nearest = slot[:, 0]  # the argmin wherever the two nearest cannot swap
    close = (two[:, 1] * (1 - error[:, 1]) <= two[:, 0] * (1 + error[:, 0])).nonzero().squeeze(1)
    if close.numel():
        nearest[close] = exact_nearest(x, others[close], centres, dist)
    return others, nearest


def exact_nearest(
    x: torch.Tensor, rows: torch.Tensor, centres: torch.Tensor, dist: torch.Tensor | None = None
) -> torch.Tensor:
    """(R,) slot of the nearest of ``centres`` to each of tokens ``rows`` from float64 distances (first on
    ties); written into ``dist`` (both triangles) when given."""
    exact = _exact_rows(x, rows, centres)  # (R, K)
    if dist is not None:
        dist[rows[:, None], centres[None, :]] = exact
        dist[centres[:, None], rows[None, :]] = exact.T
    return exact.argmin(dim=1)


def assign_clusters(
    x: torch.Tensor, cluster_num: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN centres and the nearest centre of every other token (spec 4.3).

    Args:
        x: (S, C) tokens.
        cluster_num: number of centres, 1 <= cluster_num <= S.
        k: neighbours for the density (callers pass ``min(dpc_k, cluster_num)``); the token itself counts.
    Returns:
        centres (K,) long ascending; others (S-K,) long ascending, the non-centres; nearest (S-K,) long,
        the slot 0..K-1 of each one's nearest centre (first on ties); dist (S, S) float32 scaled
        distances, exactly symmetric, by which ``nearest`` is the nearest centre.
    """
    num = x.shape[0]
    if not 1 <= cluster_num <= num:
        raise ValueError(f"cluster_num must be in [1, {num}], got {cluster_num}")
    if fast_path(x):
        found = assign_from_fast(x, *fast_distances(x), cluster_num, k)
        if found is not None:
            return found
    return exact_clusters(x, cluster_num, k)


def fast_path(x: torch.Tensor) -> bool:
    """Whether tokens ``x`` (..., C) take the float32 path: on the CPU, float32, C >= FAST_MIN_CHANNELS."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[-1] >= FAST_MIN_CHANNELS


def assign_from_fast(
    x: torch.Tensor, dist: torch.Tensor, bound: torch.Tensor, cluster_num: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`assign_clusters` from :func:`fast_distances` ``(dist, bound)`` (``dist`` is updated in place),
    or None when only the float64 path can decide."""
    d = _decide(dist, cluster_num, k)
    close = _unsettled(d, dist, bound, k)
    if close is not None and close is not _WHOLE and close.numel() <= MAX_EXACT_ROWS:  # settle, once
        rows = torch.unique(close)
        exact = _exact_rows(x, rows, None)  # (R, S)
        block = exact[:, rows]  # (R, R): (i, j) and (j, i) were computed apart; keep one of each pair
        exact[:, rows] = block.triu() + block.triu(1).T
        dist[rows] = exact
        dist[:, rows] = exact.T
        bound = bound.index_fill(0, rows, 0.0)  # those rows are now the float64 ones
        d = _decide(dist, cluster_num, k)
        close = _unsettled(d, dist, bound, k)
    if close is None:
        return (d.centres, *_fast_nearest(x, dist, bound, d.centres), dist)
    return None


def exact_clusters(
    x: torch.Tensor, cluster_num: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`assign_clusters` from :func:`exact_distances` alone: the float64 path."""
    dist = exact_distances(x)
    centres = _decide(dist, cluster_num, k).centres
    return centres, *nearest_centre(dist, centres), dist


def cluster_dpc_knn(x: torch.Tensor, cluster_num: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (spec 4.3): (centres (K,) long ascending,
    dist (S, S) float32 scaled distances); see :func:`assign_clusters`."""
    centres, _, _, dist = assign_clusters(x, cluster_num, k)
    return centres, dist
