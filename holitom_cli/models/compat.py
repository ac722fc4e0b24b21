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
* :func:`cache_prefix` / :func:`prefilled_cache`: read the first positions of a ``DynamicCache``'s layers,
  and build a ``DynamicCache`` holding given keys and values in its first layers (prefix reuse).
* :func:`video_features`: LLaVA-OneVision's ``get_video_features``, and the shape of what it returns.
* :func:`qwen_video_features`: Qwen2.5-VL's ``get_video_features`` (merged tokens in raster order).
* :func:`vision_window_index`: Qwen2.5-VL's window order of merged cells inside its vision encoder.
* :func:`rope_index`: the family's own ``get_rope_index`` (3-D M-RoPE positions of a prompt; Qwen3-VL's
  takes no ``second_per_grid_ts``).
* :func:`model_class`: a transformers model class by name (ModelError naming the version when it is absent).
* :func:`deepstack_video_features`: Qwen3-VL's ``get_video_features``: merged tokens and deepstack levels.

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
    "cache_prefix",
    "check_transformers_version",
    "deepstack_video_features",
    "layer_cache",
    "model_class",
    "output_cache",
    "prefilled_cache",
    "qwen_video_features",
    "rope_index",
    "transformers_version",
    "video_features",
    "vision_window_index",
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


def cache_prefix(cache: Any, layers: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the first ``length`` positions' (keys, values), each (B, KV, length, d), of layers
    0..layers-1 of a ``DynamicCache``; [] when the cache does not hold them in that layout."""
    held = list(getattr(cache, "layers", None) or [])[:layers]
    out = []
    for layer in held:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if (
            not isinstance(keys, torch.Tensor)
            or not isinstance(values, torch.Tensor)
            or keys.dim() != 4
            or keys.shape[-2] < length
        ):
            return []
        out.append((keys[:, :, :length].clone(), values[:, :, :length].clone()))
    return out if len(out) == layers else []


def prefilled_cache(config: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A ``DynamicCache`` for a model of ``config`` whose layers 0..len(kv)-1 hold ``kv`` and whose other
    layers are empty (the inner stage fills those from its merged sequence). ``kv`` is not modified: the cache
    appends to new tensors."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (keys, values) in enumerate(kv):
        cache.update(keys, values, i)
    if int(cache.get_seq_length(0)) != (int(kv[0][0].shape[-2]) if kv else 0):
        raise ModelError(
            "a prefilled DynamicCache does not report the length it was given",
            hint=_UPGRADE_HINT,
        )
    return cache


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


def qwen_video_features(
    base_model: Any, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor
) -> torch.Tensor:
    """Qwen2.5-VL's merged video tokens of one video, as the model splices them into the prompt.

    Args:
        base_model: the ``Qwen2_5_VLModel`` (``model.model`` of the generation class).
        pixel_values_videos: (t * gh * gw, C * tps * p * p) patches of one video.
        video_grid_thw: (1, 3) long, (t, gh, gw).

    Returns:
        (t * gh/m * gw/m, D): per temporal patch, the merged cells in row-major order.
    """
    method = base_model.get_video_features
    if "video_grid_thw" not in inspect.signature(method).parameters:
        raise ModelError(
            "get_video_features takes no video_grid_thw: this transformers version is not one holitom knows",
            hint=_UPGRADE_HINT,
        )
    out = method(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw, return_dict=True)
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(pooled, (list, tuple)):
        pooled = torch.cat(list(pooled), dim=0)
    merge = int(base_model.config.vision_config.spatial_merge_size)
    expected = int(video_grid_thw.prod()) // merge**2
    if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or pooled.shape[0] != expected:
        shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise ModelError(
            f"get_video_features returned {shape} for grid {video_grid_thw.tolist()}, "
            f"expected {expected} rows",
            hint=_UPGRADE_HINT,
        )
    return pooled


def vision_window_index(vision_config: Any, grid_thw: torch.Tensor) -> torch.Tensor:
    """(cells,) long: the merged cell (raster index over t, h/m, w/m) at each window-ordered position.

    Qwen2.5-VL's vision encoder permutes the merged cells into window order before its blocks and back after
    the merger; a hook inside the blocks sees rows in this order (each cell's m*m patches consecutive).
    """
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError as exc:
        raise ModelError(
            "transformers.vision_utils.get_vision_window_index is missing: this transformers version is "
            "not one holitom knows",
            hint=_UPGRADE_HINT,
        ) from exc
    params = inspect.signature(get_vision_window_index).parameters
    if not {"grid_thw", "spatial_merge_size", "window_size", "patch_size"} <= set(params):
        raise ModelError("get_vision_window_index changed its signature", hint=_UPGRADE_HINT)
    index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=int(vision_config.spatial_merge_size),
        window_size=int(vision_config.window_size),
        patch_size=int(vision_config.patch_size),
    )
    return index


def rope_index(
    base_model: Any,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    video_grid_thw: torch.Tensor,
    second_per_grid_ts: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own 3-D M-RoPE positions of a prompt holding one uncompressed video.

    Args:
        base_model: a Qwen-VL ``...Model`` with ``get_rope_index``.
        input_ids: (1, L); mm_token_type_ids: (1, L) int, 2 at the video placeholders, 0 elsewhere.
        video_grid_thw: (1, 3) long; second_per_grid_ts: seconds per temporal patch (Qwen2-VL /
            Qwen2.5-VL), None for a family whose ``get_rope_index`` has no time scale (Qwen3-VL: the
            timestamps are text in the prompt, and ``mm_token_type_ids`` is required).

    Returns:
        (position_ids (3, 1, L) long, rope_deltas (1, 1) long).
    """
    method = getattr(base_model, "get_rope_index", None)
    if method is None:
        raise ModelError(f"{type(base_model).__name__} has no get_rope_index", hint=_UPGRADE_HINT)
    params = inspect.signature(method).parameters
    needed = {"input_ids", "video_grid_thw"}
    needed |= {"second_per_grid_ts"} if second_per_grid_ts is not None else {"mm_token_type_ids"}
    if not needed <= set(params):
        raise ModelError("get_rope_index changed its signature", hint=_UPGRADE_HINT)
    kwargs: dict[str, Any] = {"video_grid_thw": video_grid_thw}
    if second_per_grid_ts is not None:
        kwargs["second_per_grid_ts"] = torch.tensor([float(second_per_grid_ts)])
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = mm_token_type_ids
    positions, deltas = method(input_ids, **kwargs)
    if tuple(positions.shape) != (3, 1, input_ids.shape[1]):
        raise ModelError(
            f"get_rope_index returned positions of shape {tuple(positions.shape)}, expected "
            f"(3, 1, {input_ids.shape[1]})",
            hint=_UPGRADE_HINT,
        )
    return positions, deltas


def model_class(name: str, family: str) -> Any:
    """``transformers.<name>`` (a model or config class), or ModelError when this version lacks it.

    ``family`` names the model family in the message (e.g. "Qwen3-VL").
    """
    import transformers

    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError) as exc:
        shown = ".".join(map(str, transformers_version()))
        raise ModelError(
            f"transformers {shown} has no {name}: {family} needs a newer transformers",
            hint=_UPGRADE_HINT,
        ) from exc


def deepstack_video_features(
    base_model: Any, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Qwen3-VL's merged video tokens of one video and its deepstack features, as the model uses them.

    Args:
        base_model: the ``Qwen3VLModel`` (``model.model`` of the generation class).
        pixel_values_videos: (t * gh * gw, C * tps * p * p) patches of one video.
        video_grid_thw: (1, 3) long, (t, gh, gw).

    Returns:
        features (t * gh/m * gw/m, D), per temporal patch the merged cells in row-major order, and one
        tensor of that shape per deepstack level (``deepstack_visual_indexes`` order), the ones the
        language model adds to its first layers' outputs at the visual positions.
    """
    method = base_model.get_video_features
    if "video_grid_thw" not in inspect.signature(method).parameters:
        raise ModelError(
            "get_video_features takes no video_grid_thw: this transformers version is not one holitom knows",
            hint=_UPGRADE_HINT,
        )
    out = method(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw, return_dict=True)
    merge = int(base_model.config.vision_config.spatial_merge_size)
    expected = int(video_grid_thw.prod()) // merge**2
    levels = len(getattr(base_model.config.vision_config, "deepstack_visual_indexes", None) or [])

    def one(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            value = torch.cat(list(value), dim=0) if value else None
        return value

    pooled = one(getattr(out, "pooler_output", None))
    deepstack = [one(level) for level in (getattr(out, "deepstack_features", None) or [])]
    shapes_ok = isinstance(pooled, torch.Tensor) and pooled.dim() == 2 and pooled.shape[0] == expected
    if (
        not shapes_ok
        or len(deepstack) != levels
        or not all(isinstance(d, torch.Tensor) and tuple(d.shape) == tuple(pooled.shape) for d in deepstack)
    ):
        shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise ModelError(
            f"get_video_features returned features {shape} and {len(deepstack)} deepstack levels for grid "
            f"{video_grid_thw.tolist()}, expected {expected} rows and {levels} levels of the same shape",
            hint=_UPGRADE_HINT,
        )
    return pooled, deepstack
