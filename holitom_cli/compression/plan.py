"""The merge plan: which input tokens went into each output token, with which weights (issue 10).

ToMe's plan-then-apply: :func:`~holitom_cli.compression.core.compress_video_tokens` decides once which of
the T' x N input tokens make up each of its M output tokens, and the plan applies that decision to any tensor
aligned with the input tokens (features, (unit, row, col) positions, Qwen3-VL's deepstack features)::

    result = compress_video_tokens(features (T', N, C), saliency (T', N), cfg)
    result.plan.apply(features)          # == result.features (up to float32 rounding)
    result.plan.apply(deepstack_k)       # (T', N, C_k) -> (M, C_k), merged exactly like the features

Every output token is a weighted sum of input tokens, weights summing to 1 (spec sections 3-4):

* a selected (dynamic) token: weight 1 on itself;
* a static cluster token of segment [s, e] (L = e - s + 1 frames), centre c, members m_1..m_k: the
  temporal mean (1/L per frame) of ``beta * c + (1 - beta) / k * sum(m_j)``, i.e. ``beta / L`` on each
  frame of the centre's position and ``(1 - beta) / (k L)`` on each frame of every member's position; a
  centre without members: ``1 / L`` on each frame of its position.

Pure torch. E = number of (input, output) pairs; flat input index = ``u * N + n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MergePlan", "PlanParts", "cluster_part", "selection_part"]

#: Bytes of one float32 (E, chunk) working block of :meth:`MergePlan.apply` (CPU cache friendly, and
#: never an (E, C) float32 copy of a big input).
APPLY_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class MergePlan:
    """Output token ``output[e]`` receives ``weight[e] * x[index[e]]``, for every pair e.

    index: (E,) long, flat input token ``u * N + n`` (0..num_inputs-1).
    output: (E,) long, the output token it goes into (0..num_outputs-1), non-decreasing.
    weight: (E,) float32; per output the weights sum to 1.
    """

    index: torch.Tensor
    output: torch.Tensor
    weight: torch.Tensor
    num_inputs: int
    num_outputs: int

    @property
    def num_pairs(self) -> int:
        return int(self.index.numel())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(T', N, *rest) or (T' N, *rest) -> (M, *rest) in ``x``'s dtype (integers rounded).

        Accumulates in float32 (float64 for float64 and integer input), chunked over the trailing size so
        that no (E, prod(rest)) float32 copy of a big input is made.
        """
        flat = self._flatten(x)  # (T'N, R)
        width = flat.shape[1]
        work = torch.float64 if (x.dtype == torch.float64 or not x.is_floating_point()) else torch.float32
        out = torch.zeros(self.num_outputs, width, dtype=work, device=x.device)  # (M, R)
        index, output = self.index.to(x.device), self.output.to(x.device)
        weight = self.weight.to(x.device, work)[:, None]  # (E, 1)
        step = max(1, APPLY_CHUNK_BYTES // max(1, self.num_pairs * torch.finfo(work).bits // 8))
        for a in range(0, width, step):
            block = flat[:, a : a + step].index_select(0, index).to(work)  # (E, r) the chunk's sources
            out[:, a : a + step].index_add_(0, output, block.mul_(weight))
        if not x.is_floating_point():
            out = out.round_()
        return out.to(x.dtype).reshape(self.num_outputs, *x.shape[self._lead(x) :])

    def _lead(self, x: torch.Tensor) -> int:
        """Leading dims that index the input tokens: 2 for (T', N, ...), 1 for (T' N, ...)."""
        if x.dim() >= 2 and x.shape[0] * x.shape[1] == self.num_inputs and x.shape[0] != self.num_inputs:
            return 2
        if x.dim() >= 1 and x.shape[0] == self.num_inputs:
            return 1
        raise ValueError(f"the plan merges {self.num_inputs} input tokens; got a tensor {tuple(x.shape)}")

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        lead = self._lead(x)
        return x.reshape(self.num_inputs, math.prod(x.shape[lead:]))

    def sources(self, output: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat input indices, weights) of one output token."""
        sel = self.output == output
        return self.index[sel], self.weight[sel]


# ----------------------------------------------------------------------------------------------- building


@dataclass
class PlanParts:
    """Collects the pairs of a plan part by part, in output order."""

    num_inputs: int
    device: torch.device
    rows: int = 0  # outputs so far

    def __post_init__(self) -> None:
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, part: tuple[torch.Tensor, torch.Tensor, torch.Tensor], outputs: int) -> None:
        """``part`` = (index, local output 0..outputs-1, weight) for the next ``outputs`` output tokens."""
        index, local, weight = part
        self._parts.append((index, local + self.rows, weight))
        self.rows += outputs

    def build(self) -> MergePlan:
        if not self._parts:
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            return MergePlan(empty, empty, empty.float(), self.num_inputs, 0)
        index, output, weight = (torch.cat(p) for p in zip(*self._parts, strict=True))
        return MergePlan(index, output, weight, self.num_inputs, self.rows)


def selection_part(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selected tokens ``flat (K,)`` (flat input indices), one output each, weight 1."""
    local = torch.arange(flat.numel(), device=flat.device)
    return flat, local, torch.ones(flat.numel(), dtype=torch.float32, device=flat.device)


def cluster_part(
    positions: torch.Tensor, start: int, end: int, num: int, centres: torch.Tensor, others: torch.Tensor,
    nearest: torch.Tensor, beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The static cluster tokens of segment ``start..end``.

    Args:
        positions: (S,) long, the segment's static positions (each the temporal mean over its frames).
        centres: (K,) long ascending, indices into ``positions`` of the cluster centres (output k = centre k).
        others, nearest: (S - K,) long, the non-centres (ascending) and the output slot 0..K-1 each joins
            (:func:`~holitom_cli.compression.spatial.nearest_centre`).
        beta: the centre's weight when its cluster has members.
    Returns:
        (index, local output, weight) with S (e - s + 1) pairs; no host synchronisation.
    """
    device = positions.device
    size, k = positions.numel(), centres.numel()
    slot = torch.empty(size, dtype=torch.long, device=device)  # (S,) output slot of every static token
    slot[centres] = torch.arange(k, device=device)
    slot[others] = nearest
    members = torch.zeros(k, dtype=torch.float32, device=device)
    members.index_add_(0, nearest, torch.ones(nearest.numel(), dtype=torch.float32, device=device))
    centre_w = torch.where(members > 0, torch.full_like(members, beta), torch.ones_like(members))  # (K,)
    weight = torch.empty(size, dtype=torch.float32, device=device)
    weight[centres] = centre_w
    weight[others] = (1.0 - beta) / members[nearest]
    frames = end - start + 1
    offsets = torch.arange(start, end + 1, device=device)[:, None] * num  # (L, 1)
    index = (offsets + positions[None, :]).reshape(-1)  # (L S,) frame-major
    return index, slot.repeat(frames), (weight / frames).repeat(frames)
