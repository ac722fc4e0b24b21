"""Turn raw command-line values into validated settings objects.

The heavy modules (compression, pipeline) are imported inside the functions so that importing this module
stays cheap (``holitom --help`` must not import torch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from holitom_cli.cli.options import DEFAULT_FRAMES
from holitom_cli.errors import ConfigError

if TYPE_CHECKING:
    from holitom_cli.compression import HoliTomConfig
    from holitom_cli.pipeline import SamplingOptions


def build_config(
    preset: str | None = None,
    retain_ratio: float | None = None,
    tau: float | None = None,
    inner_layer: int | None = None,
    inner_prune_ratio: float | None = None,
    no_inner: bool = False,
    no_compress: bool = False,
) -> HoliTomConfig | None:
    """The compression settings in effect, or ``None`` when compression is off.

    Starts from ``preset`` (``None`` means the default preset) and applies every explicit override.
    Giving ``--inner-layer`` or ``--inner-prune-ratio`` turns the inner merge on even if the preset had it
    off.

    Raises:
        ConfigError: unknown preset, a value out of range (validated by ``HoliTomConfig``), or conflicting
            options (``--no-compress`` with any compression setting, ``--no-inner`` with inner settings).
    """
    overrides = {
        "--preset": preset,
        "--retain-ratio": retain_ratio,
        "--tau": tau,
        "--inner-layer": inner_layer,
        "--inner-prune-ratio": inner_prune_ratio,
    }
    if no_compress:
        given = [name for name, value in overrides.items() if value is not None]
        if no_inner:
            given.append("--no-inner")
        if given:
            raise ConfigError(
                f"--no-compress cannot be combined with {', '.join(given)}",
                hint="Drop --no-compress to use compression settings, or drop the compression settings.",
            )
        return None
    if no_inner:
        given = [name for name in ("--inner-layer", "--inner-prune-ratio") if overrides[name] is not None]
        if given:
            raise ConfigError(
                f"--no-inner cannot be combined with {', '.join(given)}",
                hint="The inner-LLM merge is either off (--no-inner) or configured, not both.",
            )

    from holitom_cli.compression import DEFAULT_PRESET, get_preset

    base = get_preset(preset if preset is not None else DEFAULT_PRESET)
    changes: dict[str, object] = {}
    if retain_ratio is not None:
        changes["retain_ratio"] = retain_ratio
    if tau is not None:
        changes["tau"] = tau
    if inner_layer is not None:
        changes["inner_layer"] = inner_layer
        changes["inner"] = True
    if inner_prune_ratio is not None:
        changes["inner_prune_ratio"] = inner_prune_ratio
        changes["inner"] = True
    if no_inner:
        changes["inner"] = False
    if not changes:
        return base
    # replace() builds a new frozen instance, so __post_init__ validates every overridden value.
    return dataclasses.replace(base, **changes)


def sampling_options(
    frames: int | None = None, fps: float | None = None, max_frames: int | None = None
) -> SamplingOptions:
    """Frame sampling settings: a fixed count (default 32) or a rate with an optional cap.

    Raises:
        ConfigError: ``--frames`` together with ``--fps``, ``--max-frames`` without ``--fps``, or values out
            of range.
    """
    if frames is not None and fps is not None:
        raise ConfigError(
            "--frames and --fps cannot be used together",
            hint="Use --frames N for a fixed number of frames, or --fps R (optionally with --max-frames N).",
        )
    if max_frames is not None and fps is None:
        raise ConfigError(
            "--max-frames only applies together with --fps",
            hint="Use --frames N to choose a fixed number of frames.",
        )
    if frames is not None and frames < 1:
        raise ConfigError(f"--frames must be at least 1, got {frames}", hint="Try --frames 32.")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ConfigError(f"--fps must be a positive number, got {fps}", hint="Try --fps 1.")
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"--max-frames must be at least 1, got {max_frames}", hint="Try --max-frames 64.")

    from holitom_cli.pipeline import SamplingOptions

    if fps is not None:
        return SamplingOptions(frames=None, fps=fps, max_frames=max_frames)
    return SamplingOptions(frames=frames if frames is not None else DEFAULT_FRAMES, fps=None, max_frames=None)
