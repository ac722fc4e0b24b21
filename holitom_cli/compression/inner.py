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

__all__ = ["inner_keep_count", "merge_visual_states"]


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

    Ties in ``scores`` keep the lower position; ties in similarity pick the lower kept position.
    The averaging weights and the similarity are computed in float32.
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

    # Stable descending sort: among equal scores the lower position wins (deterministic top-k).
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    kept_index = torch.sort(order[:keep]).values  # (K,) ascending
    is_kept = torch.zeros(num, dtype=torch.bool, device=device)
    is_kept[kept_index] = True
    pruned_index = torch.nonzero(~is_kept).squeeze(1)  # (P,) ascending

    h32 = hidden.float()
    unit = torch.nn.functional.normalize(h32, dim=-1, eps=1e-12)
    sim = unit[pruned_index] @ unit[kept_index].T  # (P, K) cosine similarity
    target = sim.argmax(dim=1)  # (P,) slot in kept_index; first maximum on ties

    # m = members per kept slot; within a slot the members are in ascending position order.
    members = torch.bincount(target, minlength=keep)  # (K,)
    by_slot = torch.sort(target, stable=True).indices  # pruned tokens grouped by slot, ascending inside
    slot_sorted = target[by_slot]
    group_start = torch.cumsum(members, 0) - members  # (K,)
    rank_in_slot = torch.arange(by_slot.numel(), device=device) - group_start[slot_sorted]  # j - 1
    # weight of member j (1-based) is 2^-(m - j + 1) = 2^-(m - rank_in_slot)
    exponent = (members[slot_sorted] - rank_in_slot).float()
    member_weight = torch.pow(2.0, -exponent)  # (P,)
    kept_weight = torch.pow(2.0, -members.float())  # (K,)

    merged = h32[kept_index] * kept_weight[:, None]
    merged.index_add_(0, slot_sorted, h32[pruned_index[by_slot]] * member_weight[:, None])
    return merged.to(hidden.dtype), kept_index
