"""Random-weight Qwen3-VL checkpoints built from the real configurations (tests, demos, benchmarks).

Registered with :mod:`holitom_cli.models.random_qwen` on import, so ``python -m
holitom_cli.models.random_model --shape qwen3_vl-tiny OUT`` builds one. A folder holds what a downloaded
``Qwen/Qwen3-VL-*-Instruct`` folder holds: ``config.json`` in the hub's nested layout (``text_config``
with ``rope_scaling`` ``mrope_section`` / ``mrope_interleaved``, ``vision_config`` with
``deepstack_visual_indexes``), safetensors weights, ``generation_config.json``,
``preprocessor_config.json`` and ``video_preprocessor_config.json`` (patch 16, mean/std 0.5, the video
budget over the whole clip) and tokenizer files with a chat template shaped like the hub's (no default
system prompt).

==================  ==========================================  ============================================
shape               vision encoder                              language model
==================  ==========================================  ============================================
qwen3_vl-tiny       3 blocks, hidden 32, 2 heads, patch 16,      4 layers, hidden 64, 4 heads / 2 KV heads,
                    deepstack after blocks 0, 1                  head_dim 16, M-RoPE sections [2, 3, 3]
qwen3_vl-2b         24 blocks, hidden 1024, FFN 4096, 16 heads,  28 layers, 2048, FFN 6144, 16 / 8 heads,
                    deepstack after blocks 5, 11, 17             head_dim 128, vocab 151936, tied
qwen3_vl-8b         27 blocks, hidden 1152, FFN 4304, 16 heads,  36 layers, 4096, FFN 12288, 32 / 8 heads,
                    deepstack after blocks 8, 16, 24             head_dim 128, vocab 151936, not tied
==================  ==========================================  ============================================

The real shapes follow the published ``config.json`` files of ``Qwen/Qwen3-VL-{2B,8B}-Instruct`` (M-RoPE
sections [24, 20, 20], rope_theta 5e6, 262144 positions, 2304 learned vision positions); nothing can be
downloaded here to re-check them. The tokenizer is the small BPE of ``random_model`` plus the Qwen3-VL
special tokens, at their real ids for the real shapes (``<|vision_start|>`` 151652 ... ``<|video_pad|>``
151656 ... ``</think>`` 151668).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from holitom_cli.models.random_model import train_bpe_tokenizer
from holitom_cli.models.random_qwen import (
    QWEN_VL_FIRST_SPECIAL_ID,
    QWEN_VL_SPECIAL_TOKENS,
    RandomFamily,
    register_random_family,
)

#: Qwen3-VL's added tokens, in id order from 151643 (Qwen2-VL's, then the tool-response and thinking tags).
QWEN3_VL_SPECIAL_TOKENS = (
    *QWEN_VL_SPECIAL_TOKENS, "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip


@dataclass(frozen=True)
class Qwen3Shape:
    """Dimensions of one random Qwen3-VL checkpoint (see the module docstring)."""

    vision_depth: int
    vision_hidden: int
    vision_ffn: int
    vision_heads: int
    deepstack: tuple[int, ...]
    num_position_embeddings: int
    text_layers: int
    text_hidden: int
    text_ffn: int
    text_heads: int
    text_kv_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]
    vocab_size: int | None  # None: the tokenizer's own size (tiny)
    tie_embeddings: bool
    real_special_ids: bool
    min_pixels: int  # video_preprocessor_config size.shortest_edge
    max_pixels: int  # video_preprocessor_config size.longest_edge (the whole clip's budget)
    max_position_embeddings: int = 262144


_REAL_VIDEO = {"min_pixels": 4096, "max_pixels": 25165824}
QWEN3_SHAPES: dict[str, Qwen3Shape] = {
    "qwen3_vl-tiny": Qwen3Shape(
        vision_depth=3, vision_hidden=32, vision_ffn=64, vision_heads=2, deepstack=(0, 1),
        num_position_embeddings=64, text_layers=4, text_hidden=64, text_ffn=128, text_heads=4,
        text_kv_heads=2, head_dim=16, mrope_section=(2, 3, 3), vocab_size=None, tie_embeddings=False,
        real_special_ids=False, min_pixels=32 * 32 * 2, max_pixels=8 * 96 * 128,
        max_position_embeddings=32768,
    ),
    "qwen3_vl-2b": Qwen3Shape(
        vision_depth=24, vision_hidden=1024, vision_ffn=4096, vision_heads=16, deepstack=(5, 11, 17),
        num_position_embeddings=2304, text_layers=28, text_hidden=2048, text_ffn=6144, text_heads=16,
        text_kv_heads=8, head_dim=128, mrope_section=(24, 20, 20), vocab_size=151936, tie_embeddings=True,
        real_special_ids=True, **_REAL_VIDEO,
    ),
    "qwen3_vl-8b": Qwen3Shape(
        vision_depth=27, vision_hidden=1152, vision_ffn=4304, vision_heads=16, deepstack=(8, 16, 24),
        num_position_embeddings=2304, text_layers=36, text_hidden=4096, text_ffn=12288, text_heads=32,
        text_kv_heads=8, head_dim=128, mrope_section=(24, 20, 20), vocab_size=151936, tie_embeddings=False,
        real_special_ids=True, **_REAL_VIDEO,
    ),
}  # fmt: skip


def _spec(shape: str | Qwen3Shape) -> Qwen3Shape:
    if isinstance(shape, Qwen3Shape):
        return shape
    if shape not in QWEN3_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(QWEN3_SHAPES)}")
    return QWEN3_SHAPES[shape]


def build_qwen3_tokenizer(real_special_ids: bool) -> Any:
    """The small BPE with the Qwen3-VL special tokens (real ids when asked) and the hub-shaped template."""
    from holitom_cli.models.qwen3_vl import QWEN3_VL_CHAT_TEMPLATE

    first = QWEN_VL_FIRST_SPECIAL_ID if real_special_ids else None
    return train_bpe_tokenizer(QWEN3_VL_SPECIAL_TOKENS, first, QWEN3_VL_CHAT_TEMPLATE)


def hub_config(shape: str | Qwen3Shape, tokenizer: Any | None = None) -> dict[str, Any]:
    """``config.json`` content in the hub's nested layout (what ``Qwen3VLConfig.from_pretrained`` reads)."""
    spec = _spec(shape)
    if tokenizer is None:
        tokenizer = build_qwen3_tokenizer(spec.real_special_ids)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN3_VL_SPECIAL_TOKENS}
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": spec.tie_embeddings,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "head_dim": spec.head_dim,
            "hidden_act": "silu",
            "hidden_size": spec.text_hidden,
            "initializer_range": 0.02,
            "intermediate_size": spec.text_ffn,
            "max_position_embeddings": spec.max_position_embeddings,
            "num_attention_heads": spec.text_heads,
            "num_hidden_layers": spec.text_layers,
            "num_key_value_heads": spec.text_kv_heads,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {
                "mrope_interleaved": True,
                "mrope_section": list(spec.mrope_section),
                "rope_type": "default",
            },
            "rope_theta": 5000000,
            "tie_word_embeddings": spec.tie_embeddings,
            "use_cache": True,
            "vocab_size": spec.vocab_size if spec.vocab_size is not None else len(tokenizer),
        },
        "vision_config": {
            "model_type": "qwen3_vl",  # as on the hub; transformers maps it to qwen3_vl_vision
            "deepstack_visual_indexes": list(spec.deepstack),
            "depth": spec.vision_depth,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": spec.vision_hidden,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": spec.vision_ffn,
            "num_heads": spec.vision_heads,
            "num_position_embeddings": spec.num_position_embeddings,
            "out_hidden_size": spec.text_hidden,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }


def build_qwen3_config(shape: str | Qwen3Shape, tokenizer: Any | None = None) -> Any:
    """The ``Qwen3VLConfig`` of a shape, parsed from :func:`hub_config` like a downloaded config."""
    from holitom_cli.models.compat import model_class

    return model_class("Qwen3VLConfig", "Qwen3-VL").from_dict(hub_config(shape, tokenizer))


def preprocessor_configs(shape: str | Qwen3Shape) -> dict[str, dict[str, Any]]:
    """``preprocessor_config.json`` and ``video_preprocessor_config.json`` contents, shaped like the hub's."""
    spec = _spec(shape)
    half = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    sizes = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}
    image = {
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        **sizes,
        **half,
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
    }
    video = {
        "size": {"longest_edge": spec.max_pixels, "shortest_edge": spec.min_pixels},
        **sizes,
        **half,
        "processor_class": "Qwen3VLProcessor",
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def _fill_random(model: Any, seed: int) -> None:
    """Biases 0, norm weights 1, embeddings N(0, 0.02^2), other weights N(0, 4 / fan_in), seeded."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # RMSNorm / LayerNorm weights (incl. q_norm, k_norm)
                param.fill_(1.0)
            else:
                fan_in = math.prod(param.shape[1:])
                std = 0.02 if ("embed_tokens" in name or "pos_embed" in name) else 2.0 * fan_in**-0.5
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def build_random_qwen3(shape: str, dtype: str = "float32", seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a shape, weights allocated directly in ``dtype``."""
    import torch
    from transformers.initialization import no_init_weights

    from holitom_cli.models.compat import model_class

    spec = _spec(shape)
    tokenizer = build_qwen3_tokenizer(spec.real_special_ids)
    config = build_qwen3_config(spec, tokenizer)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with no_init_weights():
            model = model_class("Qwen3VLForConditionalGeneration", "Qwen3-VL")(config)
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


def save_random_qwen3(
    out_dir: str | Path, shape: str = "qwen3_vl-tiny", dtype: str = "float32", seed: int = 0
) -> Path:
    """Build a random checkpoint of ``shape`` and save it to ``out_dir`` (created). Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_random_qwen3(shape, dtype=dtype, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "config.json").write_text(
        json.dumps({**hub_config(shape, tokenizer), "torch_dtype": dtype}, indent=2)
    )
    for name, content in preprocessor_configs(shape).items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out


register_random_family(
    RandomFamily(label="Qwen3-VL", shapes=QWEN3_SHAPES, build=build_random_qwen3, save=save_random_qwen3)
)
