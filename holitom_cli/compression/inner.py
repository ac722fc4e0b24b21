"""Stage 4 of HoliTom: the inner-LLM merge of visual hidden states (spec section 5).

At the input of decoder layer K the visual span is shortened: the tokens the last prompt token attended to
most are kept, every other visual token is folded into its most cosine-similar kept token, and the folded
tokens are dropped. The reference folds with a sequential in-place pairwise average,
``h[t] <- (h[t] + h[i]) / 2`` over the pruned tokens ``i`` in ascending position order. For a kept token ``t``
that receives the members ``i_1 < ... < i_m`` this is the closed form

    h_t * 2^-m  +  sum_j h_{i_j} * 2^-(m - j + 1)

(later members weigh more), which is what :func:`merge_visual_states` computes, vectorised.
"""

from __future__ import annotations

import torch

__all__ = ["fold_members", "inner_keep_count", "merge_plan", "merge_visual_states", "most_similar"]


def inner_keep_count(num_visual: int, prune_ratio: float) -> int:
    """Number of visual tokens kept at layer K: ``round(L * (1 - prune_ratio))`` (Python round).

    At least one token is kept when ``num_visual >= 1`` (the reference would have no target for the
    pruned tokens and fail); this only matters for spans of one or two tokens.
    """
    if num_visual <= 0:
        return 0
    return max(1, min(num_visual, round(num_visual * (1.0 - prune_ratio))))


def merge_visual_states(
    hidden: torch.Tensor, scores: torch.Tensor, prune_ratio: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the highest-scoring visual tokens and fold the others into them.

    Args:
        hidden: (L, C) hidden states of the visual span at the input of LLM layer K (residual stream).
        scores: (L,) attention the last prompt token pays to each visual token (mean over heads).
        prune_ratio: fraction of the span to remove, in [0, 1).

    Returns:
        merged: (K, C) merged states of the kept tokens, in ``kept_index`` order, dtype of ``hidden``.
        kept_index: (K,) long, ascending positions (into the span) of the kept tokens,
        with ``K = round(L * (1 - prune_ratio))`` (at least 1 for a non-empty span).

    Ties in ``scores`` keep the lower position. The similarity is computed in ``hidden``'s dtype exactly
    as the reference does (see :func:`most_similar`; ties pick the kept token with the higher score, the
    reference's top-k order); the averaging weights and sums in float32.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (L, C), got shape {tuple(hidden.shape)}")
    num = hidden.shape[0]
    if scores.shape != (num,):
        raise ValueError(f"scores must be ({num},), got shape {tuple(scores.shape)}")
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    device = hidden.device
    keep = inner_keep_count(num, prune_ratio)
    if keep >= num:
        return hidden, torch.arange(num, device=device, dtype=torch.long)

    kept_index, pruned_index, target = merge_plan(hidden, scores, keep)
    return fold_members(hidden, kept_index, pruned_index, target), kept_index


def merge_plan(
    hidden: torch.Tensor, scores: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Who is kept and where every pruned token goes.

    Args:
        hidden: (L, C); scores: (L,); keep: K, 1 <= K < L.
    Returns:
        kept_index (K,) ascending, pruned_index (P,) ascending, target (P,) slot in ``kept_index`` of the
        kept token each pruned token joins. Every size is known on the host: nothing here waits for the
        device (no nonzero, no bincount, no item).
    """
    device = hidden.device
    # Stable descending sort: among equal scores the lower position wins (deterministic top-k).
    order = torch.sort(scores.float(), descending=True, stable=True).indices  # (L,)
    by_score = order[:keep]  # (K,) kept tokens in the reference's top-k order
    kept_index, to_ascending = torch.sort(by_score)  # kept_index[j] = by_score[to_ascending[j]]
    pruned_index = torch.sort(order[keep:]).values  # (P,) ascending
    target = most_similar(hidden.index_select(0, pruned_index), hidden.index_select(0, by_score))
    slot = torch.empty_like(to_ascending).scatter_(0, to_ascending, torch.arange(keep, device=device))
    return kept_index, pruned_index, slot[target]


def most_similar(pruned: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """For every pruned state (P, C) the slot of its most cosine-similar kept state (K, C): (P,) long.

    Computed like the reference, in the states' dtype (bf16/fp16 in a model): norms, one batched matrix
    product, ``dot / (|p| |k|)``, first maximum on ties. In half precision this rounding decides which kept
    token a pruned token joins, so we keep it; the only change is that a zero-norm pair gives similarity
    0 instead of NaN.
    """
    pruned_norm = torch.norm(pruned, dim=-1, keepdim=True)  # (P, 1)
    kept_norm = torch.norm(kept, dim=-1, keepdim=True)  # (K, 1)
    sim = torch.bmm(pruned[None], kept[None].transpose(1, 2))[0]  # (P, K) dot products
    sim.div_((pruned_norm * kept_norm.T).clamp_min_(torch.finfo(sim.dtype).tiny))
    return sim.max(dim=-1).indices


#: Float32 working rows per chunk of kept tokens in :func:`fold_members` on the CPU (fresh multi-MiB
#: allocations are slow to touch; a small reused-size chunk stays in cache). Accelerators use one chunk.
CPU_FOLD_BYTES = 4 << 20


def fold_members(
    hidden: torch.Tensor, kept_index: torch.Tensor, pruned_index: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The closed form of the sequential pairwise average, in float32: (K, C) in ``hidden``'s dtype.

    Args:
        hidden: (L, C); kept_index: (K,) ascending; pruned_index: (P,) ascending; target: (P,) slot in
        ``kept_index`` of each pruned token.
    """
    keep, device = kept_index.numel(), hidden.device
    # m = members per kept slot; within a slot the members are in ascending position order.
    members = torch.zeros(keep, dtype=torch.long, device=device)
    members.scatter_add_(0, target, torch.ones_like(target))  # (K,), no bincount: no device sync
    by_slot = torch.sort(target, stable=True).indices  # pruned tokens grouped by slot, ascending inside
    slot_sorted, member_rows = target[by_slot], pruned_index[by_slot]  # (P,)
    group_start = torch.cumsum(members, 0) - members  # (K,)
    rank_in_slot = torch.arange(by_slot.numel(), device=device) - group_start[slot_sorted]  # j - 1
    # weight of member j (1-based) is 2^-(m - j + 1) = 2^-(m - rank_in_slot)
    member_weight = torch.pow(2.0, -(members[slot_sorted] - rank_in_slot).float())  # (P,)
    kept_weight = torch.pow(2.0, -members.float())  # (K,)

    channels = hidden.shape[1]
    step = max(1, CPU_FOLD_BYTES // (4 * channels)) if device.type == "cpu" else keep
    # member range of every chunk: a host copy of group_start, on the CPU only (free there)
    bounds = [*group_start.tolist(), by_slot.numel()] if step < keep else [0] * keep + [by_slot.numel()]
    out = hidden.new_empty(keep, channels)  # (K, C)
    for a in range(0, keep, step):
        b = min(a + step, keep)
        acc = hidden.index_select(0, kept_index[a:b]).float().mul_(kept_weight[a:b, None])
        g0, g1 = bounds[a], bounds[b]
        if g1 > g0:
            src = hidden.index_select(0, member_rows[g0:g1]).float().mul_(member_weight[g0:g1, None])
            acc.index_add_(0, slot_sorted[g0:g1] - a, src)
        out[a:b] = acc  # one rounding to hidden's dtype
    return out
