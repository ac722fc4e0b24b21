"""HoliTom token compression: pure torch, no transformers / typer / rich / cv2 imports.

Outer stages (before the LLM): :func:`compress_video_tokens`; inner stage (inside the LLM):
:func:`merge_visual_states`; settings: :class:`HoliTomConfig` and the named :data:`PRESETS`;
cost model: the FLOPs functions of :mod:`holitom_cli.compression.flops`.
"""

from __future__ import annotations

from holitom_cli.compression.config import HoliTomConfig, auto_inner_layer
from holitom_cli.compression.core import CompressionResult, compress_video_tokens, effective_ratio
from holitom_cli.compression.flops import (
    LanguageModelShape,
    VisionShape,
    decode_step_flops,
    exact_prefill_flops,
    paper_prefill_flops,
    vision_flops,
)
from holitom_cli.compression.inner import inner_keep_count, merge_visual_states
from holitom_cli.compression.presets import DEFAULT_PRESET, PRESET_DESCRIPTIONS, PRESETS, get_preset
from holitom_cli.compression.temporal import temporal_segments

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "PRESET_DESCRIPTIONS",
    "CompressionResult",
    "HoliTomConfig",
    "LanguageModelShape",
    "VisionShape",
    "auto_inner_layer",
    "compress_video_tokens",
    "decode_step_flops",
    "exact_prefill_flops",
    "effective_ratio",
    "get_preset",
    "inner_keep_count",
    "merge_visual_states",
    "paper_prefill_flops",
    "temporal_segments",
    "vision_flops",
]
