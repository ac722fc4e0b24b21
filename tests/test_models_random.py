"""Random-weight checkpoints: real LLaVA-OneVision dimensions, a local tokenizer, the CLI entry point."""

from __future__ import annotations

import json

import pytest

from holitom_cli.compression import HoliTomConfig
from holitom_cli.models import random_model

# Dimensions of the published llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-ov-hf configs, written out here
# independently of random_model.SHAPES: (layers, hidden, ffn, heads, kv heads).
REAL_TEXT = {"0.5b": (24, 896, 4864, 14, 2), "7b": (28, 3584, 18944, 28, 4), "72b": (80, 8192, 29568, 64, 8)}


@pytest.mark.parametrize("shape", ["0.5b", "7b", "72b"])
def test_real_shape_configs(shape):
    config = random_model.build_config(shape)
    text, vision = config.text_config, config.vision_config
    got = (
        text.num_hidden_layers,
        text.hidden_size,
        text.intermediate_size,
        text.num_attention_heads,
        text.num_key_value_heads,
    )
    assert got == REAL_TEXT[shape]
    assert 151_000 < text.vocab_size < 153_000
    assert (vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size) == (26, 1152, 4304)
    assert (vision.image_size, vision.patch_size, vision.num_attention_heads) == (384, 14, 16)
    assert vision.vision_use_head is False
    assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == "full"
    assert (config.image_token_id, config.video_token_id) == (151646, 151647)


def test_auto_inner_layer_of_real_shapes():
    cfg = HoliTomConfig()
    layers = {s: random_model.build_config(s).text_config.num_hidden_layers for s in ("0.5b", "7b", "72b")}
    assert cfg.resolve_inner_layer(layers["0.5b"]) == round(0.64 * 24) == 15
    assert cfg.resolve_inner_layer(layers["7b"]) == 18
    assert cfg.resolve_inner_layer(layers["72b"]) == 60


def test_tokenizer_special_tokens_and_template():
    real = random_model.build_tokenizer(real_special_ids=True)
    ids = [
        real.convert_tokens_to_ids(t)
        for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
    ]
    assert ids == [151643, 151644, 151645, 151646, 151647]
    encoded = real("<video><video>\nwhat is the red ball doing?", add_special_tokens=False)["input_ids"]
    assert encoded[:2] == [151647, 151647] and all(i < 1000 for i in encoded[2:])
    assert real.decode(encoded[2:]) == "\nwhat is the red ball doing?"
    text = real.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    small = random_model.build_tokenizer(real_special_ids=False)
    assert len(small) < 1000


def test_tiny_checkpoint_folder(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llava_onevision"
    assert config["vision_config"]["image_size"] // config["vision_config"]["patch_size"] == 13
    pre = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    assert pre["resample"] == 3 and pre["size"] == {"height": 104, "width": 104}
    assert (tiny_model_dir / "model.safetensors").stat().st_size < 5_000_000


def test_weights_are_seeded_and_in_target_dtype():
    import torch

    a, _ = random_model.build_random_model("tiny", dtype="bfloat16", seed=1)
    b, _ = random_model.build_random_model("tiny", dtype="float32", seed=1)
    c, _ = random_model.build_random_model("tiny", dtype="float32", seed=2)
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    wa = a.model.language_model.layers[0].mlp.up_proj.weight
    wb = b.model.language_model.layers[0].mlp.up_proj.weight
    wc = c.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(wa, wb.to(torch.bfloat16))  # same seed: same weights whatever the dtype
    assert not torch.equal(wb, wc)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert random_model.main(["--shape", "tiny", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "tiny" in capsys.readouterr().err
