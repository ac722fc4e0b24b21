"""The paper's reference setting, for the numbers ``holitom presets`` shows next to each preset.

HoliTom's main table (spec section 9.1) is measured on LLaVA-OneVision-7B at 32 frames: its language model
is Qwen2-7B (28 layers, width 3584, FFN 18944) and each frame gives 196 visual tokens. The numbers below
belong to that setting only; other models are measured with ``holitom ask --compare-baseline``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from holitom_cli.compression.config import HoliTomConfig
from holitom_cli.compression.flops import paper_prefill_flops

__all__ = ["PAPER_REFERENCE", "PaperReference"]


@dataclass(frozen=True)
class PaperReference:
    """A model and input size the paper reports, with its prefill-FLOPs shape and accuracies."""

    model: str
    frames: int
    tokens_per_frame: int
    num_layers: int
    hidden_size: int
    ffn_size: int
    #: average accuracy relative to the full model ("Avg %"), with the inner merge, by retain ratio
    accuracy_percent: dict[float, float] = field(default_factory=dict)

    @property
    def full_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    def _flops(self, visual_tokens: int, layer: int | None = None, prune: float = 0.0) -> float:
        return paper_prefill_flops(
            self.num_layers,
            self.hidden_size,
            self.ffn_size,
            visual_tokens,
            layer,
            prune if layer is not None else 0.0,
        )

    def preset_numbers(self, cfg: HoliTomConfig) -> dict[str, Any]:
        """Paper-formula prefill TFLOPs of ``cfg`` in this setting (no temporal merging assumed, as the
        paper's FLOPs column: T * ceil(N r) tokens), the full model's, their ratio with the paper's
        rounding (rounded TFLOPs over rounded TFLOPs: 2.8 / 40.8 = 6.9%), and the reported accuracy."""
        tokens = self.frames * math.ceil(self.tokens_per_frame * cfg.retain_ratio)
        layer = cfg.resolve_inner_layer(self.num_layers)
        tflops = self._flops(tokens, layer, cfg.inner_prune_ratio) / 1e12
        full = self._flops(self.full_tokens) / 1e12
        return {
            "inner_layer": layer,
            "tflops": round(tflops, 2),
            "full_tflops": round(full, 2),
            "flops_percent": round(100 * round(tflops, 1) / round(full, 1), 1),
            "accuracy_percent": self.accuracy_percent.get(round(cfg.retain_ratio, 2)) if cfg.inner else None,
        }


PAPER_REFERENCE = PaperReference(
    model="LLaVA-OneVision-7B",
    frames=32,
    tokens_per_frame=196,
    num_layers=28,
    hidden_size=3584,
    ffn_size=18944,
    accuracy_percent={0.10: 99.1, 0.15: 99.7, 0.20: 100.7, 0.25: 100.7},
)
