"""The inner-LLM merge against a plain sequential loop written the way the reference does it (spec 5)."""

from __future__ import annotations

import pytest
import torch

from holitom_cli.compression import merge_visual_states


def sequential_reference(hidden: torch.Tensor, scores: torch.Tensor, prune_ratio: float):
    """Loop version: top-k keep set, argmax cosine target, in-place pairwise averaging in position order."""
    num = hidden.shape[0]
    keep = round(num * (1 - prune_ratio))
    # lowest position first among equal scores
    ranked = sorted(range(num), key=lambda i: (-float(scores[i]), i))
    kept = sorted(ranked[:keep])
    h = hidden.double().clone()
    original = hidden.double()
    for i in range(num):
        if i in kept:
            continue
        best, best_sim = None, None
        for t in kept:
            a, b = original[i], original[t]
            sim = float(a @ b) / max(float(a.norm() * b.norm()), 1e-30)
            if best_sim is None or sim > best_sim:
                best, best_sim = t, sim
        h[best] = (h[best] + h[i]) / 2
    return h[kept], kept


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prune_ratio", [0.3, 0.5, 0.8])
def test_matches_sequential_loop(seed: int, prune_ratio: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    num, dim = 5 + 7 * seed, 6
    hidden = torch.randn(num, dim, generator=gen)
    scores = torch.rand(num, generator=gen)
    merged, kept = merge_visual_states(hidden, scores, prune_ratio)
    expected, expected_kept = sequential_reference(hidden, scores, prune_ratio)
    assert kept.dtype == torch.long
    assert kept.tolist() == expected_kept
    assert merged.shape == (len(expected_kept), dim)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)


def test_many_members_on_one_target_weights_later_members_more() -> None:
    # token 0 is kept (highest score); tokens 1..4 are all most similar to it (only kept token)
    hidden = torch.tensor([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0], [8.0, 0.0], [16.0, 0.0]])
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    merged, kept = merge_visual_states(hidden, scores, prune_ratio=0.8)
    assert kept.tolist() == [0]
    # ((((1+2)/2+4)/2+8)/2+16)/2 = 10.6875
    assert merged[0, 0].item() == pytest.approx(10.6875)
    assert merged[0, 1].item() == 0.0


def test_prune_ratio_zero_returns_input() -> None:
    hidden = torch.randn(7, 3)
    merged, kept = merge_visual_states(hidden, torch.rand(7), 0.0)
    assert torch.equal(merged, hidden)
    assert kept.tolist() == list(range(7))


def test_keep_count_uses_python_round() -> None:
    hidden = torch.randn(13, 4)
    _, kept = merge_visual_states(hidden, torch.rand(13), 0.5)
    assert kept.numel() == 6  # round(6.5) == 6 (half to even)
    _, kept = merge_visual_states(torch.randn(641, 4), torch.rand(641), 0.5)
    assert kept.numel() == 320  # spec example: M=641 -> 320


def test_half_precision_input_keeps_dtype() -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, 8, generator=gen)
    scores = torch.rand(20, generator=gen)
    merged16, kept16 = merge_visual_states(hidden.to(torch.bfloat16), scores, 0.5)
    assert merged16.dtype == torch.bfloat16
    expected, expected_kept = sequential_reference(hidden.to(torch.bfloat16).float(), scores, 0.5)
    assert kept16.tolist() == expected_kept
    torch.testing.assert_close(merged16.double(), expected, rtol=2e-2, atol=2e-2)


def test_score_ties_keep_lower_positions() -> None:
    hidden = torch.randn(6, 3)
    _, kept = merge_visual_states(hidden, torch.ones(6), 0.5)
    assert kept.tolist() == [0, 1, 2]


def test_bad_shapes_and_ratio_raise() -> None:
    with pytest.raises(ValueError):
        merge_visual_states(torch.randn(4, 3), torch.rand(5), 0.5)
    with pytest.raises(ValueError):
        merge_visual_states(torch.randn(4, 3), torch.rand(4), 1.0)


def test_similarity_ties_join_the_higher_scored_kept_token() -> None:
    """The reference takes the first maximum in its top-k order (descending score); so do we."""
    k_low = torch.tensor([1.0, 2.0, 0.5])
    hidden = torch.stack([k_low, 2 * k_low, torch.tensor([1.0, 1.0, 1.0])])  # 0 and 1: same direction
    scores = torch.tensor([0.5, 0.9, 0.1])  # keep 0 and 1; position 1 has the higher score
    merged, kept = merge_visual_states(hidden, scores, prune_ratio=0.34)
    assert kept.tolist() == [0, 1]
    torch.testing.assert_close(merged[0], hidden[0])  # untouched
    torch.testing.assert_close(merged[1], (hidden[1] + hidden[2]) / 2)


def reference_formula_joins(hidden: torch.Tensor, scores: torch.Tensor, prune_ratio: float) -> list[int]:
    """Joins computed the way spec 5 describes the reference, in the states' own dtype (a loop over rows)."""
    num = hidden.shape[0]
    keep = round(num * (1 - prune_ratio))
    by_score = sorted(range(num), key=lambda i: (-float(scores[i]), i))[:keep]  # top-k order
    pruned = [i for i in range(num) if i not in by_score]
    kept_states = hidden[by_score]
    kept_norm = torch.norm(kept_states, dim=-1)
    joins = []
    for i in pruned:
        dots = torch.bmm(hidden[i][None, None], kept_states.T[None])[0, 0]  # (K,) in hidden's dtype
        sim = dots / (torch.norm(hidden[i]) * kept_norm)
        joins.append(by_score[int(torch.argmax(sim))])  # first maximum
    return joins


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_joins_follow_the_reference_precision(dtype: torch.dtype) -> None:
    from holitom_cli.compression.inner import merge_plan

    gen = torch.Generator().manual_seed(11)
    base = torch.randn(6, 48, generator=gen)
    hidden = (base[torch.randint(6, (90,), generator=gen)] + 0.05 * torch.randn(90, 48, generator=gen)).to(
        dtype
    )
    scores = torch.rand(90, generator=gen)
    kept, _, target = merge_plan(hidden, scores, 45)
    assert kept[target].tolist() == reference_formula_joins(hidden, scores, 0.5)
    if dtype == torch.bfloat16:
        # ... and this case is one where the precision matters: float32 similarities join differently
        kept32, _, target32 = merge_plan(hidden.float(), scores, 45)
        assert kept32[target32].tolist() != kept[target].tolist()


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7])
def test_chunked_fold_matches_sequential_loop(monkeypatch: pytest.MonkeyPatch, rows_per_chunk: int) -> None:
    from holitom_cli.compression import inner

    monkeypatch.setattr(inner, "CPU_FOLD_BYTES", rows_per_chunk * 4 * 6)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(41, 6, generator=gen)
    scores = torch.rand(41, generator=gen)
    merged, kept = merge_visual_states(hidden, scores, 0.7)
    expected, expected_kept = sequential_reference(hidden, scores, 0.7)
    assert kept.tolist() == expected_kept
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)
