"""Qwen2.5-VL vision side: merged video tokens and HoliTom's saliency, per temporal patch.

Saliency (our choice, the natural analogue of HoliTom's "attention received in SigLIP's last layer"):
Qwen2.5-VL's vision encoder mixes window-attention blocks with full-attention blocks
(``fullatt_block_indexes``), and a full-attention block attends within each temporal patch. We take the LAST
full-attention block, recompute its softmax attention probabilities (from the block's own ``qkv``, the
vision RoPE passed to it, and ``scaling``) for every temporal patch, average over heads and over query rows:
the attention each patch receives. The merger groups m x m (2 x 2) neighbouring patches into one LLM token;
the saliency of that token is the mean over its m x m patches. A forward pre-hook computes it aside; the
encoder itself runs its normal (SDPA) path, so the features are unchanged.

Rows inside the encoder's blocks are in window order (cells permuted by ``get_vision_window_index``, each
cell's m*m patches consecutive); the scores are put back into raster order (unit, row, col) before use.
"""

from __future__ import annotations

from typing import Any

import torch

from holitom_cli.errors import ModelError
from holitom_cli.models.compat import qwen_video_features, vision_window_index

__all__ = [
    "FullAttentionSaliency",
    "last_full_attention_block",
    "received_attention_segments",
    "vision_encoder_flops",
]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def last_full_attention_block(visual: Any) -> int:
    """Index of the vision encoder's last full-attention block (ModelError if there is none)."""
    indexes = [int(i) for i in getattr(visual.config, "fullatt_block_indexes", None) or []]
    depth = len(visual.blocks)
    if not indexes or not all(0 <= i < depth for i in indexes):
        raise ModelError(
            f"the vision encoder has no valid full-attention block (fullatt_block_indexes={indexes}, "
            f"{depth} blocks)",
            hint="the checkpoint's vision_config is not a Qwen2.5-VL one",
        )
    return max(indexes)


def received_attention_segments(
    attn: torch.nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings: tuple
) -> torch.Tensor:
    """Attention received by each row within its segment, mean over heads and query rows.

    Args:
        attn: a Qwen2.5-VL vision attention (``qkv``, ``num_heads``, ``scaling``).
        hidden: (S, C) the attention's input (after ``norm1``); cu_seqlens: (segments + 1,) boundaries.
        position_embeddings: (cos, sin), each (S, head_dim).

    Returns:
        (S,) float32; inside every segment the values sum to 1.
    """
    seq = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, d)
    cos, sin = (t.float()[:, None, :] for t in position_embeddings)  # (S, 1, d)
    q = q.float() * cos + _rotate_half(q.float()) * sin
    k = k.float() * cos + _rotate_half(k.float()) * sin
    out = torch.empty(seq, dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        logits = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * attn.scaling  # (H, n, n)
        out[a:b] = torch.softmax(logits, dim=-1).mean(dim=0).mean(dim=0)  # heads, then queries -> (n,)
    return out


class FullAttentionSaliency:
    """Context manager: records :func:`received_attention_segments` of one block's attention per call.

    ``result()`` gives a list of (S_i,) tensors, one per encoder call, in the block's (window) row order,
    each with the segment length it saw (checked against the temporal patch size by the caller).
    """

    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn
        self.calls: list[tuple[torch.Tensor, list[int]]] = []
        self._handle: Any = None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        cu_seqlens = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        position_embeddings = kwargs.get("position_embeddings")
        if cu_seqlens is None or position_embeddings is None:
            raise ModelError(
                "the vision attention was called without cu_seqlens / position_embeddings",
                hint="this transformers version calls the vision blocks in a way holitom does not know",
            )
        with torch.no_grad():
            scores = received_attention_segments(module, hidden, cu_seqlens, position_embeddings)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        self.calls.append((scores, [int(n) for n in lengths]))

    def __enter__(self) -> FullAttentionSaliency:
        self._handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def encode_units(
    base_model: Any,
    pixels: torch.Tensor,
    grid_thw: tuple[int, int, int],
    chunk_units: int,
    on_progress: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged features and saliency of one video, ``chunk_units`` temporal patches per encoder call.

    Every vision block attends within one temporal patch (full blocks) or within windows of one temporal
    patch, so running the patches in chunks gives the same tokens as one call.

    Args:
        base_model: ``Qwen2_5_VLModel``; pixels: (T' gh gw, D) patches; grid_thw: (T', gh, gw).

    Returns:
        features (T', gh/m * gw/m, C) model dtype; saliency (T', gh/m * gw/m) float32, both raster order.
    """
    visual = base_model.visual
    cfg = base_model.config.vision_config
    merge = int(cfg.spatial_merge_size)
    units, gh, gw = grid_thw
    rows_per_unit, cells = gh * gw, (gh // merge) * (gw // merge)
    block = visual.blocks[last_full_attention_block(visual)]
    features, saliency = [], []
    if on_progress is not None:
        on_progress(0, units)
    with FullAttentionSaliency(block.attn) as recorder:
        for start in range(0, units, chunk_units):
            n = min(chunk_units, units - start)
            grid = torch.tensor([[n, gh, gw]], dtype=torch.long, device=pixels.device)
            chunk = pixels[start * rows_per_unit : (start + n) * rows_per_unit]
            recorder.calls.clear()
            feats = qwen_video_features(base_model, chunk, grid)  # (n * cells, C) raster order
            if len(recorder.calls) != 1 or recorder.calls[0][1] != [rows_per_unit] * n:
                seen = [c[1] for c in recorder.calls]
                raise ModelError(
                    f"the last full-attention vision block ran {len(seen)} time(s) with segments {seen}, "
                    f"expected once with {n} segments of {rows_per_unit} patches (one per temporal patch)",
                    hint="this transformers version runs the vision encoder in a way holitom does not know",
                )
            scores = (
                recorder.calls[0][0].view(n * cells, merge * merge).mean(dim=1)
            )  # (n cells,) window order
            window = vision_window_index(cfg, grid.cpu()).to(scores.device)  # window position -> cell
            raster = torch.empty_like(scores)
            raster[window] = scores  # raster[cell] = score of the window row holding that cell
            features.append(feats.reshape(n, cells, -1))
            saliency.append(raster.reshape(n, cells))
            if on_progress is not None:
                on_progress(start + n, units)
    return torch.cat(features), torch.cat(saliency)


def _window_sizes(cells: int, window: int) -> list[int]:
    """Sizes (in merged cells) of the windows along one axis: full windows, then the remainder."""
    return [window] * (cells // window) + ([cells % window] if cells % window else [])


def vision_encoder_flops(vision_config: Any, units: int, rows: int, cols: int) -> float:
    """FLOPs of Qwen2.5-VL's vision encoder + merger for ``units`` temporal patches of rows x cols tokens.

    One multiply-add = 2 FLOPs; the patch-embedding convolution, norms, RoPE and softmax are not counted (as
    for LLaVA-OneVision's tower). Per temporal patch, with p = rows cols m^2 patches of width h:
    qkv + output projection ``2 * 4 p h^2`` and the SwiGLU MLP ``2 * 3 p h i`` in every block; attention
    scores + weighted values ``2 * 2 n^2 h`` per attended group of n patches: the whole temporal patch in the
    ``fullatt_block_indexes`` blocks, each window of ``window_size / (m * patch_size)`` merged cells per side
    in the others (edge windows smaller); the merger's two linear layers on the p / m^2 merged tokens.
    """
    merge = int(vision_config.spatial_merge_size)
    h, inter = int(vision_config.hidden_size), int(vision_config.intermediate_size)
    depth = int(vision_config.depth)
    full_blocks = len(set(int(i) for i in vision_config.fullatt_block_indexes))
    window = max(1, int(vision_config.window_size) // merge // int(vision_config.patch_size))
    patches = rows * cols * merge * merge
    dense = 2 * 4 * patches * h * h + 2 * 3 * patches * h * inter
    full_pairs = patches * patches
    sq = merge * merge  # patches per merged cell
    sizes = [r * c * sq for r in _window_sizes(rows, window) for c in _window_sizes(cols, window)]
    window_pairs = sum(n * n for n in sizes)  # (query, key) pairs over the windows of one temporal patch
    attention = 2 * 2 * h * (full_blocks * full_pairs + (depth - full_blocks) * window_pairs)
    merged_in = h * sq
    merger = 2 * rows * cols * (merged_in * merged_in + merged_in * int(vision_config.out_hidden_size))
    return float(units * (depth * dense + attention + merger))
