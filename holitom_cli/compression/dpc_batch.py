"""DPC-KNN for all the multi-frame segments of a video at once (issue 13).

Per segment, DPC-KNN is some 150 small operations on (n_s, n_s) and (K, C) tensors; on a CPU their fixed
cost, not their arithmetic, dominates the outer stage. Here the segments' static means come as one padded
(B, n, C) batch; each segment's float32 Gram matrix is taken alone (:class:`BatchDistances`, while its
tokens are in cache), and the rest of the float32 path of :mod:`.dpc` runs once for the whole batch: the
same decisions (:func:`.dpc.decide_batch`) and a conservative batched twin of
:func:`.dpc._unsettled`. A segment whose decisions all hold within the bound takes the batch's result;
any other (a close call in the density order or at the score cut, densities or scores below float32's
normal range, fewer than ``dpc_k`` clusters) continues alone from its slice of the batch's distances with
:func:`.dpc.assign_from_fast`, exactly as it would unbatched. So the clusters are those of
:func:`.dpc.assign_clusters` for every segment: the float64 path's, up to its bound's assumption.

Shapes: B segments, n = the most static tokens of any segment (rows past a segment's ``size`` are
padding), C channels, K_b clusters of segment b.
"""

from __future__ import annotations

import math

import torch

from holitom_cli.compression import dpc

__all__ = ["BatchDistances", "segment_clusters"]


class BatchDistances:
    """The float32 distances and bounds of :func:`.dpc.fast_distances` for B segments, padded: (B, n, n),
    +inf wherever a row or column is padding, and (B, n). Filled one segment at a time, so that a caller
    can take each segment's Gram matrix while its tokens are still in cache."""

    def __init__(self, batch: int, num: int, device: torch.device) -> None:
        self.dist = torch.full((batch, num, num), math.inf, dtype=torch.float32, device=device)
        self.bound = torch.zeros(batch, num, dtype=torch.float32, device=device)

    def add(self, b: int, x: torch.Tensor) -> None:
        """Segment b's tokens (n_b, C) float32."""
        size = x.shape[0]
        self.dist[b, :size, :size], self.bound[b, :size] = dpc.fast_distances(x)


def _clean(
    d: dpc._Decisions, dist: torch.Tensor, valid: torch.Tensor, bound: torch.Tensor, k: int
) -> torch.Tensor:
    """(B,) bool: no swap of neighbours in the density order that could change a decision, and the score
    cut holds, for every distance matrix within ``bound``: the checks of :func:`.dpc._unsettled` (True
    implies it returns None for that segment; False sends the segment through it)."""
    num = valid.shape[1]
    r_density = dpc.density_error(d.mean_sq, bound, k)
    r_delta = 2 * dpc.relative_error(d.delta, bound)
    rho, r_rho = d.density.gather(1, d.by_density), r_density.gather(1, d.by_density)
    low, high = rho * (1 - r_rho), rho * (1 + r_rho)
    ranked = torch.arange(num, device=valid.device)[None, :] < valid.sum(1, keepdim=True)  # (B, n)
    close = (low[:, :-1] <= high[:, 1:]) & ranked[:, 1:]  # neighbours in the density order that may swap
    ok = ~close[:, 0] & ~((low[:, :-2] <= high[:, 2:]) & ranked[:, 2:]).any(1)  # the densest; bands of 3+
    # a swap of a (denser) and b matters only if a is (nearly) b's nearest denser token, or b would be a's
    a, b = d.by_density[:, :-1], d.by_density[:, 1:]
    d_ab = dist.flatten(1).gather(1, a * num + b)
    reach = d_ab * (1 - dpc.relative_error(d_ab, torch.maximum(bound.gather(1, a), bound.gather(1, b))))
    near = (d.delta * (1 + r_delta)).gather
    ok &= ~(close & (reach <= torch.maximum(near(1, a), near(1, b)))).any(1)
    if k > 1:
        ok &= d.density.masked_fill(~valid, 1.0).amin(1) >= dpc.TINY
    ok &= d.score.masked_fill(~valid, 1.0).amin(1) >= dpc.TINY
    r_score = r_delta + r_density
    floor = (d.score * (1 - r_score)).masked_fill(~d.is_centre, math.inf).amin(1)
    ceiling = (d.score * (1 + r_score)).masked_fill(d.is_centre | ~valid, -math.inf).amax(1)
    return ok & (floor > ceiling)


def _nearest_batch(
    dist: torch.Tensor, bound: torch.Tensor, is_centre: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's slot (B, n) long: a centre its own, another token its nearest centre's; and (B, n)
    bool, the non-centres whose two nearest centres are within the bound of each other (to settle in
    float64, as :func:`.dpc._fast_nearest` does)."""
    slot_of = is_centre.cumsum(1) - 1  # (B, n) slot of each centre
    two, col = torch.topk(dist.masked_fill(~is_centre[:, None, :], math.inf), 2, dim=2, largest=False)
    error = dpc.relative_error(two, bound[:, :, None])  # (B, n, 2)
    close = two[..., 1] * (1 - error[..., 1]) <= two[..., 0] * (1 + error[..., 0])
    nearest = slot_of.gather(1, col[..., 0])
    return torch.where(is_centre, slot_of, nearest), close & valid & ~is_centre


def segment_clusters(
    x: torch.Tensor, sizes: list[int], cluster_nums: list[int], dpc_k: int,
    distances: BatchDistances | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """DPC-KNN of B segments (spec 4.3).

    Args:
        x: (B, n, C) working-dtype tokens; segment b is ``x[b, :sizes[b]]``, the rest padding (never read).
        cluster_nums: K_b per segment, 1 <= K_b <= sizes[b]; dpc_k: the neighbours of the density
            (capped per segment at K_b, as in :func:`.dpc.assign_clusters`).
        distances: the segments' :class:`BatchDistances`, if the caller has them (used only where
            :func:`.dpc.fast_path` holds); else they are computed here.
    Returns:
        is_centre (B, n) bool; slot (B, n) long: a centre's slot 0..K_b-1 (centres in ascending order), the
        slot of a non-centre's nearest centre (first on ties), -1 on padding. The same as
        :func:`.dpc.assign_clusters` on each segment.
    """
    batch, num, _ = x.shape
    device = x.device
    for size, cluster_num in zip(sizes, cluster_nums, strict=True):
        if not 1 <= cluster_num <= size:
            raise ValueError(f"cluster_num must be in [1, {size}], got {cluster_num}")
    valid = torch.arange(num, device=device)[None, :] < torch.tensor(sizes, device=device)[:, None]
    is_centre = torch.zeros(batch, num, dtype=torch.bool, device=device)
    slot = torch.full((batch, num), -1, dtype=torch.long, device=device)
    trivial = [b for b in range(batch) if cluster_nums[b] == sizes[b]]  # every token is a centre
    for b in trivial:
        is_centre[b, : sizes[b]] = True
        slot[b, : sizes[b]] = torch.arange(sizes[b], device=device)
    rest = [b for b in range(batch) if cluster_nums[b] < sizes[b]]
    if not rest:
        return is_centre, slot
    if not dpc.fast_path(x):
        for b in rest:
            _fill(is_centre, slot, b, dpc.assign_clusters(x[b, : sizes[b]], cluster_nums[b],
                                                         min(dpc_k, cluster_nums[b])))  # fmt: skip
        return is_centre, slot
    if distances is None:
        distances = BatchDistances(batch, num, device)
        for b in rest:
            distances.add(b, x[b, : sizes[b]])
    dist, bound = distances.dist, distances.bound
    k = min(dpc_k, num)
    batched = [b for b in rest if min(dpc_k, cluster_nums[b]) == k]  # the segments that share k
    if batched:
        d = dpc.decide_batch(dist, valid, torch.tensor(cluster_nums, device=device), k)
        clean = _clean(d, dist, valid, bound, k).tolist()  # host: which segments need more
        batch_slot, close = _nearest_batch(dist, bound, d.is_centre, valid)
    for b in rest:
        size, cluster_num = sizes[b], cluster_nums[b]
        x_b = x[b, :size]
        if b in batched and clean[b]:
            is_centre[b], slot[b] = d.is_centre[b], batch_slot[b].masked_fill(~valid[b], -1)
            rows = close[b].nonzero().squeeze(1)
            if rows.numel():
                slot[b, rows] = dpc.exact_nearest(x_b, rows, d.is_centre[b, :size].nonzero().squeeze(1))
            continue
        found = dpc.assign_from_fast(x_b, dist[b, :size, :size].clone(), bound[b, :size].clone(),
                                     cluster_num, min(dpc_k, cluster_num))  # fmt: skip
        _fill(is_centre, slot, b, found if found is not None else dpc.exact_clusters(
            x_b, cluster_num, min(dpc_k, cluster_num)))  # fmt: skip
    return is_centre, slot


def _fill(is_centre: torch.Tensor, slot: torch.Tensor, b: int, found: tuple) -> None:
    """Write one segment's (centres, others, nearest, ...) into the batch's masks."""
    centres, others, nearest = found[:3]
    is_centre[b, centres] = True
    slot[b, centres] = torch.arange(centres.numel(), device=slot.device)
    slot[b, others] = nearest
