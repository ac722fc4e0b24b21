"""Named HoliTom settings chosen by intent (the paper's LLaVA-OneVision-7B operating points)."""

from __future__ import annotations

from holitom_cli.compression.config import HoliTomConfig
from holitom_cli.errors import ConfigError

__all__ = ["DEFAULT_PRESET", "PRESETS", "PRESET_DESCRIPTIONS", "get_preset"]

PRESETS: dict[str, HoliTomConfig] = {
    "fastest": HoliTomConfig(retain_ratio=0.10, tau=0.65),
    "fast": HoliTomConfig(retain_ratio=0.15, tau=0.80),
    "balanced": HoliTomConfig(retain_ratio=0.20, tau=0.80),
    "accurate": HoliTomConfig(retain_ratio=0.25, tau=0.80),
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "fastest": "keep 10% of video tokens, merge aggressively over time; the paper's headline point "
    "(LLaVA-OV-7B: 6.9% of the FLOPs, 99.1% of the accuracy)",
    "fast": "keep 15% of video tokens (paper: 10.5% of the FLOPs, 99.7% of the accuracy)",
    "balanced": "keep 20% of video tokens (paper: 14.2% of the FLOPs, 100.7% of the accuracy); the default",
    "accurate": "keep 25% of video tokens (paper: 17.4% of the FLOPs, 100.7% of the accuracy)",
}

DEFAULT_PRESET = "balanced"


def get_preset(name: str) -> HoliTomConfig:
    """The preset called ``name``; raises ConfigError listing the available names."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        names = ", ".join(PRESETS)
        raise ConfigError(
            f"unknown preset {name!r}; available presets: {names}",
            hint=f"pick one of: {names} (default: {DEFAULT_PRESET})",
        ) from None
