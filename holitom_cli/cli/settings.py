"""Turn raw command-line values into validated settings objects.

The heavy modules (compression, pipeline) are imported inside the functions so that importing this module
stays cheap (``holitom --help`` must not import torch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from holitom_cli.cli.options import DEFAULT_FRAMES
from holitom_cli.errors import ConfigError
from holitom_cli.limits import DEFAULT_FPS_MAX_FRAMES, MAX_FRAMES, MAX_NEW_TOKENS, MAX_QUESTION_CHARS

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

    _check_ranges(retain_ratio, tau, inner_layer, inner_prune_ratio)

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


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_ranges(
    retain_ratio: float | None, tau: float | None, inner_layer: int | None, inner_prune_ratio: float | None
) -> None:
    """The command-line ranges of the compression options, with the option's name in the message.

    ``--tau`` is a cosine-similarity threshold: [0, 1] on the command line, where 1 switches temporal merging
    off (the library's ``HoliTomConfig`` accepts [-1, +inf), but a negative threshold counts unrelated tokens
    as "static", and anything above 1 behaves exactly like 1, so both are almost always typos).
    """
    if retain_ratio is not None and not (_finite(retain_ratio) and 0 < retain_ratio <= 1):
        raise ConfigError(
            f"--retain-ratio must be in (0, 1], got {retain_ratio}",
            hint="Try --retain-ratio 0.15 (keep 15% of the visual tokens); 1 keeps them all.",
        )
    if tau is not None and not (_finite(tau) and 0 <= tau <= 1):
        raise ConfigError(
            f"--tau must be in [0, 1], got {tau}",
            hint="Try --tau 0.8 (typical); lower merges more, 1 switches temporal merging off.",
        )
    if inner_layer is not None and inner_layer < 1:
        raise ConfigError(
            f"--inner-layer must be at least 1, got {inner_layer}",
            hint="Leave it out for the automatic layer (18 of 28 layers).",
        )
    if inner_prune_ratio is not None and not (_finite(inner_prune_ratio) and 0 <= inner_prune_ratio < 1):
        raise ConfigError(
            f"--inner-prune-ratio must be in [0, 1), got {inner_prune_ratio}",
            hint="Try --inner-prune-ratio 0.5 (merge half of the visual tokens inside the LLM).",
        )


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
    if frames is not None and frames > MAX_FRAMES:
        raise ConfigError(
            f"--frames must be at most {MAX_FRAMES}, got {frames}",
            hint=f"Try --frames 32; {MAX_FRAMES} frames is the cap (every frame costs vision and LLM time).",
        )
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ConfigError(f"--fps must be a positive number, got {fps}", hint="Try --fps 1.")
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"--max-frames must be at least 1, got {max_frames}", hint="Try --max-frames 64.")
    if max_frames is not None and max_frames > MAX_FRAMES:
        raise ConfigError(
            f"--max-frames must be at most {MAX_FRAMES}, got {max_frames}",
            hint=f"Try --max-frames 64; {MAX_FRAMES} frames is the cap.",
        )

    from holitom_cli.pipeline import SamplingOptions

    if fps is not None:
        # Without --max-frames, a high --fps on a long video would sample thousands of frames: cap it.
        cap = max_frames if max_frames is not None else DEFAULT_FPS_MAX_FRAMES
        return SamplingOptions(frames=None, fps=fps, max_frames=cap)
    return SamplingOptions(frames=frames if frames is not None else DEFAULT_FRAMES, fps=None, max_frames=None)


def check_question_text(question: Any, name: str = "the question") -> None:
    """Refuse, before any work, a question that is too long or is not valid text.

    Arguments that were not valid UTF-8 on the command line reach Python as lone surrogates
    (``surrogateescape``); no tokenizer can encode them, so they are refused here with a hint.
    """
    if not isinstance(question, str):
        return
    if len(question) > MAX_QUESTION_CHARS:
        raise ConfigError(
            f"{name} is {len(question):,} characters long, more than the limit of {MAX_QUESTION_CHARS:,}",
            hint="Ask a shorter question: the model reads the question and the video in one context.",
        )
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{name} is not valid UTF-8 text (undecodable byte at character {exc.start + 1})",
            hint="Check the terminal's encoding (e.g. LANG=C.UTF-8) or how the question was produced.",
        ) from None


def check_command_inputs(params: Mapping[str, Any]) -> None:
    """Bounds of ``holitom_cli.limits`` on a command's raw values, checked before the command body runs
    (``cli/app.py`` calls it for every command): every question (any parameter whose name contains
    ``question`` holding text, or a list of texts) and ``--max-new-tokens``."""
    for key, value in params.items():
        if "question" not in key:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        for i, text in enumerate(values):  # several: named by number, as ``ask`` names them
            check_question_text(text, "the question" if len(values) == 1 else f"question {i + 1}")
    n = params.get("max_new_tokens")
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_NEW_TOKENS:
        raise ConfigError(
            f"--max-new-tokens must be at most {MAX_NEW_TOKENS}, got {n}",
            hint="Try --max-new-tokens 256; long answers are bounded by the model's context too.",
        )
