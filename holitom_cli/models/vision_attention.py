"""Attention received by each patch in one vision attention layer, recorded by a forward pre-hook.

HoliTom scores dynamic tokens by the attention they receive in the vision tower's last layer: the softmax
probabilities ``softmax(q k^T / sqrt(d))``, averaged over heads and over query rows. Under SDPA the tower
returns no attention maps, and switching the whole tower to eager keeps every layer's (frames x heads x P x P)
map. Instead, :class:`ReceivedAttention` hooks the one attention module, recomputes the probabilities from
that module's own ``q_proj`` / ``k_proj`` on its input, chunked over frames, and keeps only the (frames, P)
means. The tower itself still runs its normal (SDPA) path, so its outputs are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def received_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_frames: int = 4,
) -> torch.Tensor:
    """Mean attention received by each key position.

    Args:
        module: a multi-head self-attention with ``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``.
        hidden_states: (B, P, C) the attention module's input (B frames, P patches).
        attention_mask: optional additive mask broadcastable to (B, heads, P, P).
        chunk_frames: frames per chunk (memory: chunk x heads x P x P float32).
    Returns:
        (B, P) float32: probabilities averaged over heads and query rows (each row sums to 1 over keys).
    """
    batch, length, _ = hidden_states.shape
    heads, head_dim = module.num_heads, module.head_dim
    scale = getattr(module, "scale", head_dim**-0.5)
    out = torch.empty(batch, length, dtype=torch.float32, device=hidden_states.device)
    for start in range(0, batch, max(1, chunk_frames)):
        h = hidden_states[start : start + chunk_frames]  # (b, P, C)
        b = h.shape[0]
        q = module.q_proj(h).view(b, length, heads, head_dim).transpose(1, 2)  # (b, heads, P, d)
        k = module.k_proj(h).view(b, length, heads, head_dim).transpose(1, 2)  # (b, heads, P, d)
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (b, heads, P, P)
        if attention_mask is not None:
            logits = logits + attention_mask[start : start + b].float()
        probs = torch.softmax(logits, dim=-1)  # over keys
        out[start : start + b] = probs.mean(dim=1).mean(dim=1)  # heads, then query rows -> (b, P)
    return out


class ReceivedAttention:
    """Context manager recording :func:`received_attention` of ``module`` for every forward call.

    ``with ReceivedAttention(layer.self_attn) as rec: tower(pixels)`` then ``rec.result()`` is (B_total, P)
    for all
    calls concatenated in order. The hook is removed on exit; the module's own computation is untouched.
    """

    def __init__(self, module: nn.Module, chunk_frames: int = 4) -> None:
        self.module = module
        self.chunk_frames = chunk_frames
        self.scores: list[torch.Tensor] = []
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        with torch.no_grad():
            self.scores.append(received_attention(module, hidden, mask, self.chunk_frames))

    def __enter__(self) -> ReceivedAttention:
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def result(self) -> torch.Tensor:
        """(B_total, P) float32 scores of all recorded calls."""
        if not self.scores:
            raise RuntimeError("no attention was recorded: the hooked module never ran")
        return torch.cat(self.scores, dim=0)
