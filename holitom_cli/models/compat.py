"""The one seam between holitom and the transformers internals it touches.

transformers renames internals inside a major version (5.24 passes the cache to decoder layers as ``cache=``
instead of ``past_key_values=``; 5.0-5.12 named ``get_video_features``' first argument ``pixel_values``), so
every such access goes through a function here, and each function checks what it finds and fails loudly
(``ModelError``) on a shape it does not know instead of silently doing nothing.

What is touched, and where:

* :func:`check_transformers_version`: the tested range, checked when a model loads.
* :func:`layer_cache`: the cache object among a decoder layer's call kwargs (the inner-stage hooks).
* :func:`cache_keyword`: which keyword a layer or model takes the cache under (checked once per attach).
* :func:`output_cache`: the cache in a ``generate``/``forward`` output, without deprecation warnings.
* :func:`video_features`: LLaVA-OneVision's ``get_video_features``, and the shape of what it returns.

Tested versions: the oldest declared in pyproject.toml (``TESTED_MIN``) and the newest release, both in CI.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from holitom_cli.errors import ModelError

__all__ = [
    "CACHE_KEYWORDS",
    "TESTED_MIN",
    "cache_keyword",
    "check_transformers_version",
    "layer_cache",
    "output_cache",
    "transformers_version",
    "video_features",
]

TESTED_MIN = (5, 20, 0)  # keep in step with pyproject.toml's transformers>=
_BELOW = (6, 0, 0)  # first version outside the declared range
# Keywords under which a decoder layer has received the cache: 5.24+ first, then the older name.
CACHE_KEYWORDS = ("cache", "past_key_values")
_UPGRADE_HINT = 'install a tested version: pip install "transformers>=5.20,<6"'


def _parse(version: str) -> tuple[int, int, int]:
    parts: list[int] = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def transformers_version() -> tuple[int, int, int]:
    """The installed transformers version as (major, minor, patch)."""
    import transformers

    return _parse(transformers.__version__)


def check_transformers_version(version: tuple[int, int, int] | None = None) -> None:
    """Raise ``ModelError`` when transformers is outside the range holitom declares and tests."""
    found = version if version is not None else transformers_version()
    if not TESTED_MIN <= found < _BELOW:
        shown = ".".join(map(str, found))
        raise ModelError(
            f"transformers {shown} is not supported (holitom is tested with >=5.20,<6)",
            hint=_UPGRADE_HINT,
        )


def cache_keyword(layer: torch.nn.Module) -> str:
    """The keyword under which ``layer.forward`` takes the KV cache (``cache`` or ``past_key_values``).

    Works for a decoder layer, a decoder (``Qwen2Model``) or a causal-LM head model alike.

    Raises ``ModelError`` when the layer takes neither: hooks that looked for the wrong keyword would see no
    cache and skip their guards, so an unknown signature must stop the run.
    """
    try:
        params = inspect.signature(layer.forward).parameters
    except (TypeError, ValueError) as exc:  # pragma: no cover - builtins only
        name = type(layer).__name__
        raise ModelError(f"cannot read the signature of {name}.forward", hint=_UPGRADE_HINT) from exc
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise ModelError(
        f"{type(layer).__name__}.forward takes the cache under none of {CACHE_KEYWORDS}: "
        "this transformers version is not one holitom knows",
        hint=_UPGRADE_HINT,
    )


def layer_cache(kwargs: dict[str, Any]) -> Any:
    """The cache object a decoder layer was called with (None without a cache)."""
    for name in CACHE_KEYWORDS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def output_cache(output: Any) -> Any:
    """The cache held by a model or ``generate`` output (None if it has none).

    Reads the field itself: on 5.24+ the old ``past_key_values`` attribute is a property that logs a
    deprecation line.
    """
    if output is None:
        return None
    fields = getattr(type(output), "__dataclass_fields__", None) or {}
    for name in CACHE_KEYWORDS:
        if name in fields:
            return getattr(output, name, None)
    return None


def _video_pixels_keyword(method: Any) -> str:
    params = inspect.signature(method).parameters
    for name in ("pixel_values_videos", "pixel_values"):
        if name in params:
            return name
    raise ModelError(
        "get_video_features takes neither pixel_values_videos nor pixel_values: "
        "this transformers version is not one holitom knows",
        hint=_UPGRADE_HINT,
    )


def video_features(base_model: Any, pixel_values_videos: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """LLaVA-OneVision's projected, pooled video tokens followed by the one ``image_newline``.

    Args:
        base_model: the ``LlavaOnevisionModel`` (``model.model`` of the generation class).
        pixel_values_videos: (1, t, 3, S, S).
        tokens_per_frame: N, pooled tokens per frame.

    Returns:
        (t * N + 1, C): the frames' tokens in order, then the newline embedding.
    """
    method = base_model.get_video_features
    keyword = _video_pixels_keyword(method)
    out = method(**{keyword: pixel_values_videos}, return_dict=True)
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(pooled, (list, tuple)):
        pooled = pooled[0]
    if not isinstance(pooled, torch.Tensor):
        raise ModelError("get_video_features returned no tensor", hint=_UPGRADE_HINT)
    if pooled.dim() == 3:
        pooled = pooled[0]
    frames = int(pixel_values_videos.shape[1])
    if pooled.shape[0] != frames * tokens_per_frame + 1:
        raise ModelError(
            f"get_video_features returned {pooled.shape[0]} tokens for {frames} frames, expected "
            f"{frames} x {tokens_per_frame} + 1 newline",
            hint=_UPGRADE_HINT,
        )
    return pooled
