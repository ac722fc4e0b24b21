"""Prefill cost models: the paper's formula, and an exact count of what our forward pass runs.

Convention everywhere: one multiply-add = 2 FLOPs. Normalisations, RoPE, softmax, activations, residual
additions and embedding look-ups are not counted (they are O(n*d), negligible next to the matrix products).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "LanguageModelShape",
    "VisionShape",
    "decode_step_flops",
    "exact_prefill_flops",
    "paper_layer_flops",
    "paper_prefill_flops",
    "vision_flops",
]


def paper_layer_flops(tokens: float, hidden_size: int, ffn_size: int) -> float:
    """The paper's per-layer cost ``4 n d^2 + 2 n^2 d + 2 n d m`` (spec section 8, FastV-style)."""
    n, d, m = float(tokens), float(hidden_size), float(ffn_size)
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def paper_prefill_flops(
    num_layers: int,
    hidden_size: int,
    ffn_size: int,
    visual_tokens: int,
    inner_layer: int | None = None,
    inner_prune_ratio: float = 0.0,
) -> float:
    """Prefill FLOPs as the paper counts them (visual tokens only; no text, GQA or third SwiGLU matrix).

    ``L * f(n)`` without the inner stage, ``K * f(n) + (L - K) * f(round(n * (1 - r_in)))`` with it.
    """
    full = paper_layer_flops(visual_tokens, hidden_size, ffn_size)
    if inner_layer is None:
        return num_layers * full
    kept = round(visual_tokens * (1.0 - inner_prune_ratio))
    return inner_layer * full + (num_layers - inner_layer) * paper_layer_flops(kept, hidden_size, ffn_size)


@dataclass(frozen=True)
class LanguageModelShape:
    """Sizes of a Qwen2-style decoder (GQA attention, SwiGLU MLP)."""

    num_layers: int
    hidden_size: int
    ffn_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def _layer_parts(shape: LanguageModelShape, queries: int, attended_pairs: int) -> tuple[float, float, float]:
    """(projections, attention, mlp) FLOPs of one decoder layer.

    ``queries`` tokens go through the projections and the MLP; ``attended_pairs`` is the number of
    (query, key) pairs scored (n(n+1)/2 for a causal prefill of n tokens).
    """
    d, hd = shape.hidden_size, shape.head_dim
    q_and_o = 2 * 2 * queries * d * (shape.num_heads * hd)
    k_and_v = 2 * 2 * queries * d * (shape.num_kv_heads * hd)
    attention = 2 * 2 * hd * shape.num_heads * attended_pairs  # QK^T scores + weighted sum of V
    mlp = 3 * 2 * queries * d * shape.ffn_size  # gate, up, down
    return float(q_and_o + k_and_v), float(attention), float(mlp)


def exact_prefill_flops(
    shape: LanguageModelShape,
    seq_len: int,
    visual_tokens_removed_at_inner: int = 0,
    inner_layer: int | None = None,
    include_lm_head: bool = True,
) -> dict:
    """FLOPs of one causal prefill of ``seq_len`` tokens (text + visual), as our forward pass runs it.

    Layers ``>= inner_layer`` run on ``seq_len - visual_tokens_removed_at_inner`` tokens (their keys are the
    kept tokens only). The LM head is applied to the last position only, as ``generate`` does in prefill.

    Returns a JSON-able dict: ``projections``, ``attention``, ``mlp``, ``lm_head``, ``total`` (FLOPs) and
    ``tokens_per_layer`` (list of the sequence length each layer processes).
    """
    short = seq_len - (visual_tokens_removed_at_inner if inner_layer is not None else 0)
    if short < 0:
        raise ValueError("cannot remove more tokens than the sequence holds")
    tokens = [seq_len if inner_layer is None or i < inner_layer else short for i in range(shape.num_layers)]
    projections = attention = mlp = 0.0
    for n in tokens:
        p, a, m = _layer_parts(shape, n, n * (n + 1) // 2)
        projections, attention, mlp = projections + p, attention + a, mlp + m
    lm_head = float(2 * shape.hidden_size * shape.vocab_size) if include_lm_head and seq_len > 0 else 0.0
    return {
        "projections": projections,
        "attention": attention,
        "mlp": mlp,
        "lm_head": lm_head,
        "total": projections + attention + mlp + lm_head,
        "tokens_per_layer": tokens,
    }


def decode_step_flops(shape: LanguageModelShape, context_len_per_layer: list[int] | int) -> float:
    """FLOPs of generating one token with a KV cache.

    ``context_len_per_layer``: keys the new token attends to in each layer, itself included (the cache
    length after appending it); one int means the same length in every layer. Includes the LM head.
    """
    if isinstance(context_len_per_layer, int):
        contexts = [context_len_per_layer] * shape.num_layers
    else:
        contexts = list(context_len_per_layer)
        if len(contexts) != shape.num_layers:
            raise ValueError(f"need {shape.num_layers} context lengths, got {len(contexts)}")
    total = 0.0
    for keys in contexts:
        total += sum(_layer_parts(shape, 1, keys))
    return total + 2.0 * shape.hidden_size * shape.vocab_size


@dataclass(frozen=True)
class VisionShape:
    """Sizes of a SigLIP-style vision tower plus the 2-layer MLP projector of LLaVA."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patches: int
    projector_in: int
    projector_hidden: int
    projector_out: int


def vision_flops(vshape: VisionShape, frames: int) -> float:
    """FLOPs of encoding ``frames`` frames: encoder layers (bidirectional attention) + projector.

    Per frame and layer with p patches and width h: q/k/v/o ``4*2*p*h*h``, attention ``2*2*p*p*h``,
    MLP ``2*2*p*h*i``; projector ``2*p*(in*hidden + hidden*out)`` on every patch. The patch-embedding
    convolution and pooling are not counted.
    """
    p, h, i = vshape.patches, vshape.hidden_size, vshape.intermediate_size
    layer = 4 * 2 * p * h * h + 2 * 2 * p * p * h + 2 * 2 * p * h * i
    proj_in, proj_hidden, proj_out = vshape.projector_in, vshape.projector_hidden, vshape.projector_out
    projector = 2 * p * (proj_in * proj_hidden + proj_hidden * proj_out)
    return float(frames * (vshape.num_layers * layer + projector))
