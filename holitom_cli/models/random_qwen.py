"""Random-weight Qwen2.5-VL checkpoints built from the real configurations (tests, demos, benchmarks).

A folder holds what a downloaded ``Qwen/Qwen2.5-VL-*-Instruct`` folder holds: ``config.json`` (the hub's
flat layout: text settings at the top level, ``vision_config``, ``rope_scaling`` with ``mrope_section``),
safetensors weights, ``generation_config.json``, ``preprocessor_config.json`` (min/max pixels, patch sizes,
CLIP mean/std, as on the hub), ``video_preprocessor_config.json`` (the video processor's pixel budget) and
tokenizer files with the hub's chat template.

Shapes (``QWEN_SHAPES``; the ``--shape`` names of ``python -m holitom_cli.models.random_model``):

==================  =========================================  ============================================
shape               vision encoder                             language model
==================  =========================================  ============================================
qwen2_5_vl-tiny     4 blocks (full attention: 1, 3), hidden     4 layers, hidden 64, 4 heads / 2 KV heads,
                    32, 2 heads, patch 14, window 56 px         M-RoPE sections [2, 3, 3]
qwen2_5_vl-3b       32 blocks (full: 7, 15, 23, 31), hidden     36 layers, 2048, FFN 11008, 16 / 2 heads,
                    1280, FFN 3420, 16 heads, window 112 px     vocab 151936, tied, M-RoPE [16, 24, 24]
qwen2_5_vl-7b       as 3b, output width 3584                   28 layers, 3584, 18944, 28 / 4, vocab 152064
==================  =========================================  ============================================

The tokenizer is the module's small byte-level BPE plus the Qwen2-VL special tokens; for the real shapes
they keep their real ids (``<|endoftext|>`` 151643 ... ``<|vision_start|>`` 151652, ``<|vision_end|>``
151653, ``<|image_pad|>`` 151655, ``<|video_pad|>`` 151656 ... ``<|file_sep|>`` 151664).

Other Qwen families register their shapes from their own module (:func:`register_random_family`); the
modules ``holitom_cli/models/qwen*_random.py`` are imported when this module loads, so their shapes appear
in ``QWEN_SHAPES`` (the ``--shape`` choices of ``random_model``) and :func:`save_random_qwen` /
:func:`build_random_qwen` route them to the registering family's builders.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from holitom_cli.models.random_model import train_bpe_tokenizer

#: The Qwen2-VL / Qwen2.5-VL added tokens, in id order from 151643 in the real tokenizer.
QWEN_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
QWEN_VL_FIRST_SPECIAL_ID = 151643


@dataclass(frozen=True)
class QwenShape:
    """Dimensions of one random Qwen2.5-VL checkpoint (see the module docstring)."""

    vision_depth: int
    vision_hidden: int
    vision_ffn: int
    vision_heads: int
    window_size: int
    fullatt_blocks: tuple[int, ...]
    text_layers: int
    text_hidden: int
    text_ffn: int
    text_heads: int
    text_kv_heads: int
    mrope_section: tuple[int, int, int]
    vocab_size: int | None  # None: the tokenizer's own size (tiny)
    tie_embeddings: bool
    real_special_ids: bool
    min_pixels: int  # video_preprocessor_config size.shortest_edge
    max_pixels: int  # video_preprocessor_config size.longest_edge
    max_position_embeddings: int = 128000


_VISION_REAL = {
    "vision_depth": 32,
    "vision_hidden": 1280,
    "vision_ffn": 3420,
    "vision_heads": 16,
    "window_size": 112,
    "fullatt_blocks": (7, 15, 23, 31),
}
_VIDEO_PIXELS_REAL = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}

QWEN_SHAPES: dict[str, QwenShape] = {
    "qwen2_5_vl-tiny": QwenShape(
        4, 32, 64, 2, 56, (1, 3), 4, 64, 128, 4, 2, (2, 3, 3), None, False, False, 56 * 56, 112 * 112, 32768
    ),
    "qwen2_5_vl-3b": QwenShape(
        **_VISION_REAL, text_layers=36, text_hidden=2048, text_ffn=11008, text_heads=16, text_kv_heads=2,
        mrope_section=(16, 24, 24), vocab_size=151936, tie_embeddings=True, real_special_ids=True,
        **_VIDEO_PIXELS_REAL,
    ),
    "qwen2_5_vl-7b": QwenShape(
        **_VISION_REAL, text_layers=28, text_hidden=3584, text_ffn=18944, text_heads=28, text_kv_heads=4,
        mrope_section=(16, 24, 24), vocab_size=152064, tie_embeddings=False, real_special_ids=True,
        **_VIDEO_PIXELS_REAL,
    ),
}  # fmt: skip


def build_qwen_tokenizer(real_special_ids: bool) -> Any:
    """The small BPE with the Qwen2-VL special tokens (real ids when asked) and the hub's chat template."""
    from holitom_cli.models.qwen2_5_vl import QWEN_VL_CHAT_TEMPLATE

    first = QWEN_VL_FIRST_SPECIAL_ID if real_special_ids else None
    return train_bpe_tokenizer(QWEN_VL_SPECIAL_TOKENS, first, QWEN_VL_CHAT_TEMPLATE)


def hub_config(shape: str | QwenShape, tokenizer: Any | None = None) -> dict[str, Any]:
    """``config.json`` content in the hub's flat layout (what ``Qwen2_5_VLConfig.from_pretrained`` reads)."""
    spec = QWEN_SHAPES[shape] if isinstance(shape, str) else shape
    if tokenizer is None:
        tokenizer = build_qwen_tokenizer(spec.real_special_ids)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_VL_SPECIAL_TOKENS}
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": spec.text_hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.text_ffn,
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_hidden_layers": spec.text_layers,
        "num_key_value_heads": spec.text_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": spec.tie_embeddings,
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": spec.vision_depth,
            "hidden_act": "silu",
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_ffn,
            "num_heads": spec.vision_heads,
            "in_chans": 3,
            "out_hidden_size": spec.text_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": spec.window_size,
            "fullatt_block_indexes": list(spec.fullatt_blocks),
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(spec.mrope_section)},
        "vocab_size": spec.vocab_size if spec.vocab_size is not None else len(tokenizer),
    }


def build_qwen_config(shape: str | QwenShape, tokenizer: Any | None = None) -> Any:
    """The ``Qwen2_5_VLConfig`` of a shape, parsed from :func:`hub_config` like a downloaded config."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_dict(hub_config(shape, tokenizer))


def preprocessor_configs(shape: str | QwenShape) -> dict[str, dict[str, Any]]:
    """``preprocessor_config.json`` (as on the hub) and ``video_preprocessor_config.json`` contents."""
    spec = QWEN_SHAPES[shape] if isinstance(shape, str) else shape
    clip = {
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    sizes = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    image = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        **sizes,
        **clip,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "size": {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        **clip,
        "do_convert_rgb": True,
        **sizes,
    }
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def _fill_random(model: Any, seed: int) -> None:
    """Biases 0, norm weights 1, token embeddings N(0, 0.02^2), other weights N(0, 4 / fan_in), seeded."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # RMSNorm weights (norm, norm1, norm2, ln_q)
                param.fill_(1.0)
            else:
                fan_in = math.prod(param.shape[1:])
                std = 0.02 if "embed_tokens" in name else 2.0 * fan_in**-0.5
                param.copy_(torch.randn(param.shape, generator=gen) * std)


@dataclass(frozen=True)
class RandomFamily:
    """Random checkpoints of another Qwen family, registered from that family's own module.

    label: the family's display name (e.g. "Qwen3-VL"). shapes: shape name -> that family's spec.
    build(shape, dtype=..., seed=...) -> (model, tokenizer); save(out_dir, shape=..., dtype=..., seed=...)
    -> the folder written.
    """

    label: str
    shapes: Mapping[str, Any]
    build: Callable[..., tuple[Any, Any]]
    save: Callable[..., Path]


#: Shape name -> the family that registered it (Qwen2.5-VL's own shapes are not listed here).
RANDOM_FAMILIES: dict[str, RandomFamily] = {}


def register_random_family(family: RandomFamily) -> None:
    """Add a family's shapes to ``QWEN_SHAPES`` and route them to its builders (idempotent per family)."""
    for name, spec in family.shapes.items():
        owner = RANDOM_FAMILIES.get(name)
        if (name in QWEN_SHAPES and owner is None) or (owner is not None and owner.label != family.label):
            raise ValueError(f"random shape {name!r} is already registered")
        RANDOM_FAMILIES[name] = family
        QWEN_SHAPES[name] = spec


def family_label(shape: str) -> str:
    """The display name of the family a shape belongs to ("Qwen2.5-VL" for this module's own shapes)."""
    return RANDOM_FAMILIES[shape].label if shape in RANDOM_FAMILIES else "Qwen2.5-VL"


def build_random_qwen(shape: str, dtype: str = "float32", seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a shape, weights allocated directly in ``dtype``."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    if shape in RANDOM_FAMILIES:
        return RANDOM_FAMILIES[shape].build(shape, dtype=dtype, seed=seed)
    if shape not in QWEN_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(QWEN_SHAPES)}")
    spec = QWEN_SHAPES[shape]
    tokenizer = build_qwen_tokenizer(spec.real_special_ids)
    config = build_qwen_config(spec, tokenizer)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with no_init_weights():
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    _fill_random(model, seed)
    model.tie_weights()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.bos_token_id = pad
    model.generation_config.eos_token_id = [end, pad]
    model.generation_config.pad_token_id = pad
    model.generation_config.do_sample = False
    model.eval()
    return model, tokenizer


def save_random_qwen(
    out_dir: str | Path, shape: str = "qwen2_5_vl-tiny", dtype: str = "float32", seed: int = 0
) -> Path:
    """Build a random checkpoint of ``shape`` and save it to ``out_dir`` (created). Returns the folder."""
    if shape in RANDOM_FAMILIES:
        return RANDOM_FAMILIES[shape].save(out_dir, shape=shape, dtype=dtype, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_random_qwen(shape, dtype=dtype, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # config.json in the hub's flat layout, so loading goes through the same parsing as a downloaded folder
    (out / "config.json").write_text(
        json.dumps({**hub_config(shape, tokenizer), "torch_dtype": dtype}, indent=2)
    )
    for name, content in preprocessor_configs(shape).items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out


def _register_sibling_families() -> None:
    """Import ``holitom_cli.models.qwen*_random`` modules: each registers its shapes on import."""
    import importlib
    import pkgutil

    package = Path(__file__).resolve().parent
    for info in pkgutil.iter_modules([str(package)]):
        if info.name.startswith("qwen") and info.name.endswith("_random"):
            importlib.import_module(f"holitom_cli.models.{info.name}")


_register_sibling_families()
