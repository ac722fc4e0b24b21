"""Qwen3-VL vision side: merged video tokens, deepstack features and HoliTom's saliency, per temporal patch.

Qwen3-VL's vision encoder has no window attention: every block attends within one temporal patch
(``cu_seqlens`` has one segment per temporal patch), rows in the processor's patch order (per temporal patch,
merged cells row-major, each cell's ``m x m`` patches consecutive). The merger maps each cell to one LLM
token; ``deepstack_merger_list`` maps the hidden states after blocks ``deepstack_visual_indexes`` the same
way, and the language model adds those to its first layers' outputs at the visual positions.

Saliency (our choice, as for Qwen2.5-VL): the attention received in the vision encoder's last full-attention
block, i.e. its last block, within each temporal patch: softmax probabilities recomputed aside from the
block's own ``qkv``, the vision RoPE passed to it and ``scaling``, averaged over heads and query rows, then
over the ``m x m`` patches the merger folds into one token. A forward pre-hook computes it; the encoder runs
its normal (SDPA) path, so the features are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from holitom_cli.errors import ModelError
from holitom_cli.models.compat import deepstack_video_features

__all__ = ["LastBlockSaliency", "encode_units", "received_attention"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def received_attention(
    attn: torch.nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings: tuple
) -> torch.Tensor:
    """Attention received by each row within its segment, mean over heads and query rows.

    Args:
        attn: a Qwen3-VL vision attention (``qkv``, ``num_heads``, ``scaling``).
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


class LastBlockSaliency:
    """Context manager: records :func:`received_attention` of one vision attention module per call."""

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
            scores = received_attention(module, hidden, cu_seqlens, position_embeddings)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        self.calls.append((scores, [int(n) for n in lengths]))

    def __enter__(self) -> LastBlockSaliency:
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merged features, deepstack features and saliency of one video, ``chunk_units`` patches per call.

    Every vision block attends within one temporal patch and the learned position embedding depends on the
    frame grid only, so running the temporal patches in chunks gives the same tokens as one call.

    Args:
        base_model: ``Qwen3VLModel``; pixels: (T' gh gw, D) patches; grid_thw: (T', gh, gw).

    Returns:
        features (T', N, C) model dtype; deepstack (T', N, levels, C) model dtype; saliency (T', N) float32,
        N = gh/m * gw/m in raster order.
    """
    visual = base_model.visual
    merge = int(base_model.config.vision_config.spatial_merge_size)
    units, gh, gw = grid_thw
    rows_per_unit, cells = gh * gw, (gh // merge) * (gw // merge)
    if not len(visual.blocks):
        raise ModelError("the vision encoder has no blocks", hint="the checkpoint is not a Qwen3-VL one")
    block = visual.blocks[len(visual.blocks) - 1]
    features, deepstack, saliency = [], [], []
    if on_progress is not None:
        on_progress(0, units)
    with LastBlockSaliency(block.attn) as recorder:
        for start in range(0, units, chunk_units):
            n = min(chunk_units, units - start)
            grid = torch.tensor([[n, gh, gw]], dtype=torch.long, device=pixels.device)
            chunk = pixels[start * rows_per_unit : (start + n) * rows_per_unit]
            recorder.calls.clear()
            feats, levels = deepstack_video_features(base_model, chunk, grid)  # (n cells, C) raster order
            if len(recorder.calls) != 1 or recorder.calls[0][1] != [rows_per_unit] * n:
                seen = [c[1] for c in recorder.calls]
                raise ModelError(
                    f"the last vision block ran {len(seen)} time(s) with segments {seen}, expected once with "
                    f"{n} segments of {rows_per_unit} patches (one per temporal patch)",
                    hint="this transformers version runs the vision encoder in a way holitom does not know",
                )
            scores = recorder.calls[0][0].view(n * cells, merge * merge).mean(dim=1)  # (n cells,) raster
            features.append(feats.reshape(n, cells, -1))
            if levels:
                deepstack.append(torch.stack(levels, dim=1).reshape(n, cells, len(levels), -1))
            else:
                deepstack.append(feats.new_empty(n, cells, 0, feats.shape[-1]))
            saliency.append(scores.reshape(n, cells))
            if on_progress is not None:
                on_progress(start + n, units)
    return torch.cat(features), torch.cat(deepstack), torch.cat(saliency)
