"""Random Qwen2.5-VL checkpoints: the real configs' numbers, the hub's token ids, files a download holds."""

from __future__ import annotations

import json

import pytest
import torch

from holitom_cli.models import qwen2_5_vl as qwen
from holitom_cli.models.random_model import main
from holitom_cli.models.random_qwen import QWEN_SHAPES, build_qwen_config, build_qwen_tokenizer, hub_config

# Published numbers of Qwen/Qwen2.5-VL-{3B,7B}-Instruct config.json (text model; vision tower shared).
REAL = {
    "qwen2_5_vl-3b": dict(layers=36, hidden=2048, ffn=11008, heads=16, kv=2, vocab=151936, tied=True),
    "qwen2_5_vl-7b": dict(layers=28, hidden=3584, ffn=18944, heads=28, kv=4, vocab=152064, tied=False),
}
REAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<|file_sep|>": 151664,
}


@pytest.fixture(scope="module")
def real_tokenizer():
    return build_qwen_tokenizer(True)


@pytest.mark.parametrize("shape", sorted(REAL))
def test_real_shapes_have_the_published_config(shape, real_tokenizer) -> None:
    cfg = build_qwen_config(shape, real_tokenizer)
    t, v, want = cfg.text_config, cfg.vision_config, REAL[shape]
    got = (t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads)
    assert got == (want["layers"], want["hidden"], want["ffn"], want["heads"])
    assert (t.num_key_value_heads, t.vocab_size, bool(cfg.tie_word_embeddings)) == (
        want["kv"],
        want["vocab"],
        want["tied"],
    )
    assert t.rope_parameters["mrope_section"] == [16, 24, 24] and t.rope_parameters["rope_theta"] == 1e6
    assert t.max_position_embeddings == 128000 and set(t.layer_types) == {"full_attention"}
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads) == (32, 1280, 3420, 16)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.window_size) == (14, 2, 2, 112)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31] and v.tokens_per_second == 2
    assert v.out_hidden_size == want["hidden"]
    assert (cfg.video_token_id, cfg.image_token_id) == (151656, 151655)
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (151652, 151653)


def test_real_tokenizer_ids_and_chat_template(real_tokenizer) -> None:
    for token, expected in REAL_IDS.items():
        assert real_tokenizer.convert_tokens_to_ids(token) == expected
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what?"}]}]
    text = real_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>what?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = real_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(151656) == 1 and 151652 in ids and 151653 in ids
    assert real_tokenizer.decode([1000, 2000]).strip().startswith("r1000")  # fillers decode to plain text


def test_tiny_checkpoint_on_disk_loads_like_a_download(tmp_path, capsys) -> None:
    assert main([str(tmp_path), "--shape", "qwen2_5_vl-tiny"]) == 0
    assert "qwen2_5_vl-tiny" in capsys.readouterr().err
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert {"preprocessor_config.json", "video_preprocessor_config.json"} <= names
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["rope_scaling"]["type"] == "mrope"
    assert "hidden_size" in config and "vision_config" in config  # the hub's flat layout
    image = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (image["min_pixels"], image["max_pixels"]) == (3136, 12845056)
    adapter = qwen.load(tmp_path, device=torch.device("cpu"), dtype=torch.float32)
    assert adapter.preprocessing.source == "video_preprocessor_config.json"
    assert adapter.preprocessing.max_pixels == QWEN_SHAPES["qwen2_5_vl-tiny"].max_pixels
    assert adapter.model.config.text_config.num_hidden_layers == 4
    assert adapter.model.generation_config.eos_token_id == [
        adapter.tokenizer.convert_tokens_to_ids("<|im_end|>"),
        adapter.tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]


def test_hub_config_parses_back_to_the_same_dimensions() -> None:
    flat = hub_config("qwen2_5_vl-7b", build_qwen_tokenizer(True))
    assert flat["vocab_size"] == 152064 and flat["vision_config"]["fullatt_block_indexes"] == [7, 15, 23, 31]
