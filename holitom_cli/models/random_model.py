"""Random-weight LLaVA-OneVision checkpoints built from the real configurations, for tests and benchmarks.

No weights can be downloaded here, so tests, the README's offline demo and the benchmarks run on checkpoints
that have the real architecture (SigLIP vision tower, 2-layer GELU projector, bilinear 2x pooling, one
``image_newline``, Qwen2 language model) and random weights. A checkpoint folder holds what a downloaded
``llava-hf/llava-onevision-qwen2-*-ov-hf`` folder holds (``config.json``, safetensors weights,
``generation_config.json``, ``preprocessor_config.json``, tokenizer files with a Qwen-style chat template), so
it loads through the very same :func:`holitom_cli.models.load_model`.

Shapes (``SHAPES``):

========  =======================================  ==========================================
shape     vision tower                             language model
========  =======================================  ==========================================
tiny      2 layers, hidden 32, 104 px / patch 8    6 layers, hidden 64, 4 heads / 2 KV heads
          (13x13 patches pooled to 7x7 = 49)       (vocabulary = the small tokenizer)
0.5b      SigLIP so400m: 26 layers, hidden 1152,   Qwen2-0.5B: 24 layers, hidden 896, FFN 4864,
          384 px / patch 14 (27x27 -> 14x14=196)   14 heads / 2 KV heads, vocab 152000, tied
7b        as 0.5b                                  Qwen2-7B: 28 layers, 3584, 18944, 28 / 4
72b       as 0.5b                                  Qwen2-72B: 80 layers, 8192, 29568, 64 / 8
========  =======================================  ==========================================

The tokenizer is a small byte-level BPE trained at build time on a few hundred words of English, plus the
Qwen/LLaVA special tokens. For the real shapes the special tokens keep their real ids (``<|endoftext|>``
151643 ... ``<video>`` 151647) by padding the vocabulary with unused filler entries (``Ġr<id>``, which
decode to plain text " r<id>": a random model samples them, and they must not look like special tokens).

Command line: ``python -m holitom_cli.models.random_model --shape tiny OUT_DIR``; the Qwen2.5-VL shapes
(``qwen2_5_vl-tiny``, ``qwen2_5_vl-3b``, ``qwen2_5_vl-7b``) are built by
:mod:`holitom_cli.models.random_qwen`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
#: Ids of SPECIAL_TOKENS in the real Qwen2 / LLaVA-OneVision tokenizer.
REAL_SPECIAL_IDS = (151643, 151644, 151645, 151646, 151647)

#: The Qwen2 chat template (system prompt by default), as used by the reference's ``qwen_1_5`` conversation.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """
the video shows a person walking across the room while a red ball rolls to the left and a blue square
moves to the right. what is happening in this scene? how many people are there, where is the camera,
which colour is the circle, who opens the door, when does the car stop, why does the dog run away.
a man and a woman talk in the kitchen; the cat sleeps on the sofa near the window. outside it is raining
and the street is wet. the children play football in the park, one of them kicks the ball into the net.
the green triangle appears at the top of the frame, then it turns yellow and disappears at the bottom.
answer the question about the video in one short sentence. describe the main action, the objects, the
colours, the people and their motion. is the background static or moving? the shapes bounce off the
walls, the light changes from day to night, the bird flies over the trees and lands on a branch.
yes no maybe first second third last before after during left right up down fast slow big small
one two three four five six seven eight nine ten many few none all some each every other same different
"""


@dataclass(frozen=True)
class Shape:
    """Dimensions of one random checkpoint (see the module docstring)."""

    vision_layers: int
    vision_hidden: int
    vision_ffn: int
    vision_heads: int
    image_size: int
    patch_size: int
    text_layers: int
    text_hidden: int
    text_ffn: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int | None  # None: the tokenizer's own size (tiny)
    tie_embeddings: bool
    real_special_ids: bool


_SIGLIP_SO400M = {
    "vision_layers": 26,
    "vision_hidden": 1152,
    "vision_ffn": 4304,
    "vision_heads": 16,
    "image_size": 384,
    "patch_size": 14,
}

SHAPES: dict[str, Shape] = {
    "tiny": Shape(2, 32, 64, 2, 104, 8, 6, 64, 128, 4, 2, None, False, False),
    "0.5b": Shape(
        **_SIGLIP_SO400M,
        text_layers=24,
        text_hidden=896,
        text_ffn=4864,
        text_heads=14,
        text_kv_heads=2,
        vocab_size=152000,
        tie_embeddings=True,
        real_special_ids=True,
    ),
    "7b": Shape(
        **_SIGLIP_SO400M,
        text_layers=28,
        text_hidden=3584,
        text_ffn=18944,
        text_heads=28,
        text_kv_heads=4,
        vocab_size=152128,
        tie_embeddings=False,
        real_special_ids=True,
    ),
    "72b": Shape(
        **_SIGLIP_SO400M,
        text_layers=80,
        text_hidden=8192,
        text_ffn=29568,
        text_heads=64,
        text_kv_heads=8,
        vocab_size=152128,
        tie_embeddings=False,
        real_special_ids=True,
    ),
}


def build_tokenizer(real_special_ids: bool) -> Any:
    """A small byte-level BPE tokenizer with the Qwen special tokens and chat template.

    Returns a transformers fast tokenizer. With ``real_special_ids`` the special tokens get the real Qwen2 ids
    (151643..151647), the gap being filled with reserved entries that BPE never produces.
    """
    return train_bpe_tokenizer(
        SPECIAL_TOKENS, REAL_SPECIAL_IDS[0] if real_special_ids else None, QWEN_CHAT_TEMPLATE
    )


def train_bpe_tokenizer(
    special_tokens: tuple[str, ...],
    first_special_id: int | None,
    chat_template: str,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
) -> Any:
    """The small byte-level BPE of this module with ``special_tokens`` appended in order.

    With ``first_special_id`` the special tokens start at that id (the real checkpoints' ids), the gap after
    the BPE vocabulary being filled with reserved entries that BPE never produces; otherwise they follow the
    BPE vocabulary directly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = _CORPUS.split()
    # A few hundred words: the corpus plus rotations of it, so frequent pairs get merged.
    texts = [" ".join(words[i:] + words[:i]) for i in range(0, len(words), 7)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(texts, trainer)
    spec = json.loads(bpe.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    base = len(vocab)
    if first_special_id is not None:
        for i in range(base, first_special_id):
            vocab[f"\u0120r{i}"] = i  # byte-level for " r<i>": plain filler text, never produced by BPE
        base = first_special_id
    spec["added_tokens"] = [
        {
            "id": base + i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, tok in enumerate(special_tokens)
    ]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token=eos_token,
        pad_token=pad_token,
        model_max_length=32768,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_config(shape: str | Shape, tokenizer: Any | None = None) -> Any:
    """The ``LlavaOnevisionConfig`` of a shape; ``tokenizer`` gives the token ids (built when None)."""
    from transformers import LlavaOnevisionConfig

    spec = SHAPES[shape] if isinstance(shape, str) else shape
    if tokenizer is None:
        tokenizer = build_tokenizer(spec.real_special_ids)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    vocab_size = spec.vocab_size if spec.vocab_size is not None else len(tokenizer)
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_ffn,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,
    }
    text = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_ffn,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": vocab_size,
        "tie_word_embeddings": spec.tie_embeddings,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        multimodal_projector_bias=True,
        tie_word_embeddings=spec.tie_embeddings,
        architectures=["LlavaOnevisionForConditionalGeneration"],
    )


def preprocessor_config(image_size: int) -> dict[str, Any]:
    """A ``preprocessor_config.json`` like the real checkpoint's (SigLIP: bicubic, 1/255, mean=std=0.5)."""
    return {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "processor_class": "LlavaOnevisionProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pad": True,
    }


def _fill_random(model: Any, seed: int) -> None:
    """Initialise every parameter in place: biases 0, norm weights 1, token embeddings N(0, 0.02^2), the rest
    N(0, 4/fan_in) (fan_in = last dim), from one seeded generator."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1 and "norm" in name:
                param.fill_(1.0)
            else:
                # Token embeddings small, matrices 2/sqrt(fan_in): the residual stream is then driven by
                # attention
                # and MLPs rather than by the current token, so greedy answers depend on the video and the
                # question instead of collapsing into one repeated token (checked on the tiny shape).
                std = 0.02 if "embed_tokens" in name else 2.0 * param.shape[-1] ** -0.5
                # Generate in float32 and copy: the same seed gives the same weights in every dtype.
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def build_random_model(shape: str, dtype: str = "float32", seed: int = 0) -> tuple[Any, Any]:
    """Build ``(model, tokenizer)`` for a shape, weights allocated directly in ``dtype`` (no fp32 copy)."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.initialization import no_init_weights

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    spec = SHAPES[shape]
    tokenizer = build_tokenizer(spec.real_special_ids)
    config = build_config(spec, tokenizer)
    torch_dtype = getattr(torch, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # parameters are allocated in the target dtype directly
    try:
        with no_init_weights():  # skip the library's random init: _fill_random does it once, seeded
            model = LlavaOnevisionForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    _fill_random(model, seed)
    model.tie_weights()
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.do_sample = False
    model.eval()
    return model, tokenizer


def save_random_checkpoint(
    out_dir: str | Path, shape: str = "tiny", dtype: str = "float32", seed: int = 0
) -> Path:
    """Build a random checkpoint of ``shape`` and save it to ``out_dir`` (created). Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_random_model(shape, dtype=dtype, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_size = SHAPES[shape].image_size
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(image_size), indent=2) + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    from holitom_cli.models.random_qwen import QWEN_SHAPES, family_label, save_random_qwen

    parser = argparse.ArgumentParser(
        prog="python -m holitom_cli.models.random_model",
        description="Build a random-weight LLaVA-OneVision, Qwen2.5-VL or Qwen3-VL checkpoint from the real "
        "configs "
        "(no download).",
    )
    parser.add_argument("out_dir", help="folder to write the checkpoint to")
    parser.add_argument("--shape", choices=sorted(SHAPES) + sorted(QWEN_SHAPES), default="tiny")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weight dtype (default: float32 for tiny shapes, bfloat16 otherwise)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dtype = args.dtype or ("float32" if args.shape.endswith("tiny") else "bfloat16")
    if args.shape in QWEN_SHAPES:
        out = save_random_qwen(args.out_dir, shape=args.shape, dtype=dtype, seed=args.seed)
        family = family_label(args.shape)
    else:
        out = save_random_checkpoint(args.out_dir, shape=args.shape, dtype=dtype, seed=args.seed)
        family = "LLaVA-OneVision"
    print(f"wrote a random {args.shape} {family} checkpoint ({dtype}) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
