"""The HoliTom settings: one frozen, validated dataclass (no environment variables)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from holitom_cli.errors import ConfigError

__all__ = ["HoliTomConfig", "auto_inner_layer"]

# Inner-merge layer used by the paper for the two LLM depths it reports (Qwen2-7B: 28, Qwen2-72B: 80).
_KNOWN_INNER_LAYERS = {28: 18, 80: 60}


def auto_inner_layer(num_layers: int) -> int | None:
    """Automatic inner-merge layer K: 18 for 28 layers, 60 for 80, ``round(0.64 * L)`` otherwise.

    The result is clamped to ``1 <= K <= L - 1``; an LLM with fewer than 2 layers has no valid K (None).
    """
    if num_layers < 2:
        return None
    if num_layers in _KNOWN_INNER_LAYERS:
        return _KNOWN_INNER_LAYERS[num_layers]
    return min(max(1, round(0.64 * num_layers)), num_layers - 1)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class HoliTomConfig:
    """Settings of the four HoliTom stages.

    Outer stages (before the LLM):
        retain_ratio: target fraction r of the T*N pooled video tokens that reach the LLM, in (0, 1].
        tau: cosine-similarity threshold (strict ``>``) for a token position to count as static between two
            adjacent frames. Any number >= -1; values >= 1 switch temporal merging off.
        beta: weight of a cluster centre when static tokens are merged, in [0, 1].
        dpc_k: k of the k-nearest-neighbour density in DPC-KNN (capped by the cluster count), >= 1.
        max_window: longest temporal segment, in frames, >= 1 (1 switches temporal merging off).
    Inner stage (inside the LLM):
        inner: run the inner-LLM merge at all.
        inner_layer: decoder layer K whose input is shortened; None picks it from the model depth
            (see :func:`auto_inner_layer`).
        inner_prune_ratio: fraction of the visual tokens removed at layer K, in [0, 1).
    """

    retain_ratio: float = 0.20
    tau: float = 0.80
    beta: float = 0.6
    dpc_k: int = 7
    max_window: int = 1024
    inner: bool = True
    inner_layer: int | None = None
    inner_prune_ratio: float = 0.5

    def __post_init__(self) -> None:
        r = self.retain_ratio
        if not (_is_number(r) and 0.0 < r <= 1.0):
            raise ConfigError(
                f"retain_ratio must be a number in (0, 1], got {r!r}",
                hint="use e.g. 0.15 to keep 15% of the video tokens (1.0 keeps them all)",
            )
        if not (_is_number(self.tau) and -1.0 <= self.tau < math.inf):
            raise ConfigError(
                f"tau must be a number >= -1 (any value in [-1, +inf) is accepted), got {self.tau!r}",
                hint="tau is a cosine-similarity threshold: 0.8 is typical, 0.65 merges more, "
                ">= 1 never merges",
            )
        if not (_is_number(self.beta) and 0.0 <= self.beta <= 1.0):
            raise ConfigError(
                f"beta must be a number in [0, 1], got {self.beta!r}",
                hint="beta is the weight of a cluster centre in the static-token merge (default 0.6)",
            )
        if not (_is_int(self.dpc_k) and self.dpc_k >= 1):
            raise ConfigError(
                f"dpc_k must be an integer >= 1, got {self.dpc_k!r}", hint="the reference uses dpc_k=7"
            )
        if not (_is_int(self.max_window) and self.max_window >= 1):
            raise ConfigError(
                f"max_window must be an integer >= 1, got {self.max_window!r}",
                hint="max_window is the longest temporal segment in frames (default 1024 = unlimited)",
            )
        if not isinstance(self.inner, bool):
            raise ConfigError(
                f"inner must be true or false, got {self.inner!r}",
                hint="set inner=False to skip the merge inside the LLM",
            )
        if self.inner_layer is not None and not (_is_int(self.inner_layer) and self.inner_layer >= 1):
            raise ConfigError(
                f"inner_layer must be an integer >= 1 or None (automatic), got {self.inner_layer!r}",
                hint="leave it unset to use 18 for 28-layer LLMs, 60 for 80 layers, 64% of the depth "
                "otherwise",
            )
        p = self.inner_prune_ratio
        if not (_is_number(p) and 0.0 <= p < 1.0):
            raise ConfigError(
                f"inner_prune_ratio must be a number in [0, 1), got {p!r}",
                hint="it is the fraction of visual tokens removed inside the LLM (default 0.5)",
            )

    def resolve_inner_layer(self, num_layers: int) -> int | None:
        """Decoder layer K for an LLM with ``num_layers`` layers, or None when the inner stage is off.

        Raises ConfigError when an explicit ``inner_layer`` is not in ``1 <= K < num_layers``.
        """
        if not self.inner:
            return None
        if self.inner_layer is None:
            return auto_inner_layer(num_layers)
        if not 1 <= self.inner_layer < num_layers:
            raise ConfigError(
                f"inner_layer must satisfy 1 <= inner_layer < {num_layers} for this {num_layers}-layer "
                f"model, got {self.inner_layer}",
                hint=f"choose a layer between 1 and {num_layers - 1}, or leave it unset (automatic)",
            )
        return self.inner_layer

    def replace(self, **changes: Any) -> HoliTomConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-serialisable."""
        return dataclasses.asdict(self)
