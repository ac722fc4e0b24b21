"""Model loading and the model-family adapters: the only code that knows transformers internals.

``load_model(model, *, revision=None, device="auto", dtype="auto", quantize=None, offline=False)`` returns the
family's :class:`~holitom_cli.models.base.VideoAdapter`; ``family_info()`` lists the registered families.
Importing this package does not import torch or transformers (they load on use).
"""

from __future__ import annotations

from holitom_cli.models.loading import (
    FAMILIES,
    SUPPORTED_FAMILIES,
    CachedModel,
    download_model,
    family_info,
    list_cached_models,
    load_model,
    resolve_device,
    resolve_dtype,
)
from holitom_cli.models.noise import quiet_library_noise

# Before any library that logs noise is imported (bitsandbytes logs at import time): see models/noise.py.
quiet_library_noise()

__all__ = [
    "FAMILIES",
    "SUPPORTED_FAMILIES",
    "CachedModel",
    "VideoAdapter",
    "VideoLanguageModel",
    "download_model",
    "family_info",
    "list_cached_models",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]


def __getattr__(name: str):  # VideoAdapter (alias VideoLanguageModel): imported on use (it imports torch)
    if name in ("VideoAdapter", "VideoLanguageModel"):
        from holitom_cli.models.base import VideoAdapter

        return VideoAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
