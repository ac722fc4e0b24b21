"""Model loading and the model-family adapters: the only code that knows transformers internals.

``load_model(model, *, revision=None, device="auto", dtype="auto", quantize=None, offline=False)`` returns a
:class:`VideoLanguageModel`. Importing this package does not import torch or transformers (they load on use).
"""

from __future__ import annotations

from holitom_cli.models.loading import (
    FAMILIES,
    SUPPORTED_FAMILIES,
    CachedModel,
    VideoLanguageModel,
    download_model,
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
    "VideoLanguageModel",
    "download_model",
    "list_cached_models",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]
