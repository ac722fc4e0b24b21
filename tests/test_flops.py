"""FLOPs: the paper's rows (spec section 8), hand counts, and a measured count of a literal forward pass."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from holitom_cli.compression import (
    LanguageModelShape,
    VisionShape,
    decode_step_flops,
    exact_prefill_flops,
    paper_prefill_flops,
    vision_flops,
)

QWEN2_7B = (28, 3584, 18944)
QWEN2_72B = (80, 8192, 29568)


def tflops(*args, **kwargs) -> float:
    return round(paper_prefill_flops(*args, **kwargs) / 1e12, 1)


def test_paper_rows_onevision_7b() -> None:
    assert tflops(*QWEN2_7B, 32 * 196) == 40.8
    outer = [tflops(*QWEN2_7B, n) for n in (1568, 1280, 960, 640)]
    assert outer == [8.7, 7.0, 5.2, 3.4]
    full = [tflops(*QWEN2_7B, n, inner_layer=18, inner_prune_ratio=0.5) for n in (1568, 1280, 960, 640)]
    assert full == [7.1, 5.8, 4.3, 2.8]
    assert round(100 * full[-1] / 40.8, 1) == 6.9
    assert tflops(*QWEN2_7B, 6272, inner_layer=2, inner_prune_ratio=0.8) == 9.3  # FastV row


def test_paper_rows_other_backbones() -> None:
    assert tflops(*QWEN2_72B, 6272) == 429.3
    assert tflops(*QWEN2_72B, 960) == 59.0
    assert tflops(*QWEN2_72B, 960, inner_layer=60, inner_prune_ratio=0.5) == 51.6
    assert tflops(*QWEN2_72B, 6272, inner_layer=2, inner_prune_ratio=0.8) == 86.4
    assert tflops(*QWEN2_7B, 64 * 169) == 80.2  # LLaVA-Video-7B, 64 frames
    assert tflops(*QWEN2_7B, 64 * 26) == 9.3  # 64 * ceil(169 * 0.15)
    assert tflops(*QWEN2_7B, 1664, inner_layer=18, inner_prune_ratio=0.5) == 7.6


TINY = LanguageModelShape(
    num_layers=2, hidden_size=4, ffn_size=6, num_heads=2, num_kv_heads=1, head_dim=2, vocab_size=10
)


def test_exact_count_tiny_by_hand() -> None:
    # per layer, n = 3: q,o 2*(2*3*4*4) = 192; k,v 2*(2*3*4*2) = 96; attention: 6 causal pairs * 2 heads *
    # (2*2 scores + 2*2 sums) = 96; mlp 3 * 2*3*4*6 = 432; lm_head on one token: 2*4*10 = 80
    out = exact_prefill_flops(TINY, seq_len=3)
    assert out["projections"] == 2 * (192 + 96)
    assert out["attention"] == 2 * 96
    assert out["mlp"] == 2 * 432
    assert out["lm_head"] == 80
    assert out["total"] == 2 * 816 + 80
    assert out["tokens_per_layer"] == [3, 3]
    # inner stage at layer 1 removes one token: layer 1 runs on n = 2: 128 + 64 + 3 pairs * 16 + 288 = 528
    short = exact_prefill_flops(TINY, seq_len=3, visual_tokens_removed_at_inner=1, inner_layer=1)
    assert short["total"] == 816 + 528 + 80
    assert short["tokens_per_layer"] == [3, 2]
    assert exact_prefill_flops(TINY, seq_len=3, include_lm_head=False)["total"] == 2 * 816


def literal_forward(
    shape: LanguageModelShape, x: torch.Tensor, inner_layer: int | None, removed: int
) -> None:
    """A naive GQA/SwiGLU decoder forward whose matrix products a FlopCounterMode can count.

    Causal attention is written per query (query i only multiplies with keys 0..i), the LM head is applied to
    the last position, and layers >= inner_layer see the sequence without its first ``removed`` tokens.
    """
    gen = torch.Generator().manual_seed(0)
    d, hd, h, kv = shape.hidden_size, shape.head_dim, shape.num_heads, shape.num_kv_heads

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen)

    for layer in range(shape.num_layers):
        if inner_layer is not None and layer == inner_layer:
            x = x[removed:]
        n = x.shape[0]
        q = (x @ weight(d, h * hd)).view(n, h, hd)
        k = (x @ weight(d, kv * hd)).view(n, kv, hd)
        v = (x @ weight(d, kv * hd)).view(n, kv, hd)
        out = torch.empty(n, h, hd)
        for head in range(h):
            group = head // (h // kv)
            for i in range(n):
                scores = q[i, head][None] @ k[: i + 1, group].T  # (1, i+1)
                out[i, head] = (scores.softmax(-1) @ v[: i + 1, group])[0]
        x = x + out.view(n, h * hd) @ weight(h * hd, d)
        gate, up = x @ weight(d, shape.ffn_size), x @ weight(d, shape.ffn_size)
        x = x + (torch.nn.functional.silu(gate) * up) @ weight(shape.ffn_size, d)
    _ = x[-1:] @ weight(d, shape.vocab_size)


@pytest.mark.parametrize(("inner_layer", "removed"), [(None, 0), (1, 2), (2, 4)])
def test_exact_count_matches_measured_flops(inner_layer: int | None, removed: int) -> None:
    shape = LanguageModelShape(
        num_layers=3, hidden_size=8, ffn_size=12, num_heads=4, num_kv_heads=2, head_dim=3, vocab_size=11
    )
    seq = 7
    with FlopCounterMode(display=False) as counter:
        literal_forward(shape, torch.randn(seq, 8), inner_layer, removed)
    expected = exact_prefill_flops(
        shape, seq, visual_tokens_removed_at_inner=removed, inner_layer=inner_layer
    )
    assert counter.get_total_flops() == expected["total"]


@pytest.mark.parametrize("n", [1, 17, 640, 6272])
def test_exact_count_reduces_to_paper_formula(n: int) -> None:
    """Paper: 4nd^2 + 2n^2d + 2ndm per layer. It counts multiply-adds (1 per MAC, we count 2), full
    (non-causal) attention, no GQA (kv = heads, heads * hd = d) and two MLP matrices (we count three)."""
    d, m = 3584, 18944
    shape = LanguageModelShape(
        num_layers=1, hidden_size=d, ffn_size=m, num_heads=28, num_kv_heads=28, head_dim=128, vocab_size=1
    )
    out = exact_prefill_flops(shape, n, include_lm_head=False)
    macs_projections = out["projections"] / 2
    macs_attention_full = out["attention"] / 2 * (2 * n) / (n + 1)  # undo the causal n(n+1)/2 pair count
    macs_two_matrix_mlp = out["mlp"] / 2 * 2 / 3
    assert macs_projections == 4 * n * d * d
    assert macs_attention_full == pytest.approx(2 * n * n * d, rel=1e-12)
    assert macs_two_matrix_mlp == 2 * n * d * m
    paper = paper_prefill_flops(1, d, m, n)
    assert macs_projections + macs_attention_full + macs_two_matrix_mlp == pytest.approx(paper, rel=1e-12)


def test_decode_step_by_hand() -> None:
    # one token, per layer: 2*(2*4*4) + 2*(2*4*2) = 96 projections; attention 2 heads * (2*2 scores +
    # 2*2 sums) = 16 FLOPs per key; mlp 3*2*4*6 = 144; lm_head 80
    per_layer = lambda keys: 96 + 16 * keys + 144  # noqa: E731
    assert decode_step_flops(TINY, 5) == 2 * per_layer(5) + 80
    assert decode_step_flops(TINY, [5, 3]) == per_layer(5) + per_layer(3) + 80
    with pytest.raises(ValueError):
        decode_step_flops(TINY, [5])


def test_vision_flops_by_hand() -> None:
    vs = VisionShape(
        num_layers=2,
        hidden_size=4,
        intermediate_size=8,
        num_heads=2,
        patches=3,
        projector_in=4,
        projector_hidden=5,
        projector_out=6,
    )
    # per frame: layer = 4*2*3*4*4 (qkvo) + 2*2*3*3*4 (attention) + 2*2*3*4*8 (mlp) = 384 + 144 + 384 = 912
    # projector = 2*3*(4*5 + 5*6) = 300
    assert vision_flops(vs, frames=5) == 5 * (2 * 912 + 300)
