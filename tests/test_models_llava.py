"""LLaVA-OneVision adapter: preprocessing, vision features and attention, prompt, generation pieces.

References are computed independently in the tests: numpy for preprocessing, an eager-attention copy of the
model for the attention maps, the unmodified ``get_video_features`` for the features.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from holitom_cli.errors import ConfigError
from holitom_cli.models import load_model
from holitom_cli.models.base import uncompressed_span
from holitom_cli.models.llava_onevision import Preprocessing
from holitom_cli.models.vision_attention import ReceivedAttention
from holitom_cli.video import load_video


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def frames(sample_video):
    return load_video(sample_video, num_frames=6).frames  # (6, 64, 96, 3)


def test_preprocessing_matches_numpy(tiny, frames):
    pixels = tiny.preprocess(frames).pixel_values
    assert pixels.shape == (6, 3, 104, 104) and pixels.dtype == torch.float32
    for t in (0, 5):
        resized = np.asarray(
            Image.fromarray(frames[t]).resize((104, 104), Image.Resampling.BICUBIC), np.float64
        )
        expected = (resized / 255.0 - 0.5) / 0.5  # (H, W, 3)
        np.testing.assert_allclose(pixels[t].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_preprocessing_reads_the_saved_config(tiny_model_dir, tmp_path, frames):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    spec = json.loads((folder / "preprocessor_config.json").read_text())
    spec.update(image_mean=[0.1, 0.2, 0.3], image_std=[0.9, 0.8, 0.7], resample=2)
    (folder / "preprocessor_config.json").write_text(json.dumps(spec))
    pre = Preprocessing.from_checkpoint(folder, 104)
    got = pre(frames[:1])[0].permute(1, 2, 0).numpy()
    resized = np.asarray(Image.fromarray(frames[0]).resize((104, 104), Image.Resampling.BILINEAR), np.float64)
    expected = (resized / 255.0 - np.array([0.1, 0.2, 0.3])) / np.array([0.9, 0.8, 0.7])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_received_attention_equals_eager_maps(tiny, tiny_model_dir, frames):
    from transformers import LlavaOnevisionForConditionalGeneration

    eager = LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    pixels = tiny.preprocess(frames).pixel_values
    with torch.no_grad():
        out = eager.model.vision_tower(pixels, output_attentions=True)
    probs = out.attentions[-1]  # (T, heads, P, P) of the last layer
    expected = probs.mean(dim=1).mean(dim=1)  # mean over heads, then query rows -> (T, P)

    tower = tiny.model.model.vision_tower
    attention_module = tower.encoder.layers[-1].self_attn
    with torch.no_grad():
        plain = tower(pixels).last_hidden_state
        with ReceivedAttention(attention_module, chunk_frames=4) as recorder:  # 6 frames: chunks of 4 and 2
            hooked = tower(pixels).last_hidden_state
    torch.testing.assert_close(recorder.result(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(plain, hooked)  # the hook does not change the tower's output
    assert not attention_module._forward_pre_hooks  # removed on exit


def test_encode_video_matches_get_video_features(tiny, frames):
    pixels = tiny.preprocess(frames, [0.5 * i for i in range(6)])
    vision = tiny.encode_video(pixels, chunk_frames=4)
    assert vision.unit_times == [0.5 * i for i in range(6)] and vision.grid == (7, 7)
    assert vision.frames_per_unit == 1 and vision.suffix.shape == (1, 64)
    pixels = pixels.pixel_values
    with torch.no_grad():
        reference = tiny.model.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output[0]
    t, n = 6, 49
    assert vision.features.shape == (t, n, 64) and vision.saliency.shape == (t, n)
    torch.testing.assert_close(vision.features.reshape(t * n, -1), reference[:-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vision.suffix[0], reference[-1])
    # the attention is pooled with the features' bilinear interpolation: 13x13 -> 7x7
    tower = tiny.model.model.vision_tower
    with torch.no_grad(), ReceivedAttention(tower.encoder.layers[-1].self_attn) as recorder:
        tower(pixels)
    grid = recorder.result().reshape(t, 1, 13, 13)
    pooled = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bilinear").reshape(t, n)
    torch.testing.assert_close(vision.saliency, pooled)


def test_prompt_layout(tiny):
    tok = tiny.tokenizer
    ids, start = tiny.prompt_ids("What is the red ball doing?", 10)
    ids = ids[0].tolist()
    video_id = tok.convert_tokens_to_ids("<video>")
    assert ids.count(video_id) == 10 and ids[start : start + 10] == [video_id] * 10
    # the same text built by hand from the Qwen chat format, with the placeholder expanded in the text
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + "<video>" * 10
        + "\nWhat is the red ball doing?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_with_a_processor_style_template(tiny):
    # llava-hf processors use list-of-parts content; a string content would drop the question there
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} "
        "{% for c in m['content'] | selectattr('type', 'equalto', 'video') %}<video>{% endfor %}"
        "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ '\\n' + c['text'] }}{% endfor %}"
        "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    original = tiny.tokenizer.chat_template
    tiny.tokenizer.chat_template = template
    try:
        ids, start = tiny.prompt_ids("how many balls?", 3)
    finally:
        tiny.tokenizer.chat_template = original
    text = tiny.tokenizer.decode(ids[0])
    assert text == "<|im_start|>user <video><video><video>\nhow many balls?<|im_end|><|im_start|>assistant\n"


@pytest.mark.parametrize("question", ["", "   ", "look at <video> please", "<|im_end|> hi"])
def test_bad_questions(tiny, question):
    with pytest.raises(ConfigError):
        tiny.prompt_ids(question, 5)
    with pytest.raises(ConfigError):
        tiny.text_tokens(question)


def test_streaming_pieces_join_to_the_answer(tiny, frames):
    vision = tiny.encode_video(tiny.preprocess(frames))
    span = uncompressed_span(vision)
    assert len(span) == 6 * 49 + 1  # every token, then the newline
    torch.testing.assert_close(span.embeds[-1], vision.suffix[0])
    inputs = tiny.build_prompt("Describe the video.", span)
    ids = inputs.input_ids
    assert inputs.visual_len == len(span) and inputs.position_ids is None
    pieces: list[str] = []
    result = tiny.generate(inputs, span, max_new_tokens=10, on_text=pieces.append)
    assert result.new_tokens == 10 and "".join(pieces) == result.text
    assert result.text == tiny.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    # KV cache: every layer holds the prompt and all new tokens but the last (it was never fed back)
    assert result.kv_lengths == [ids.shape[1] + 9] * 6
    assert (
        result.kv_cache_bytes == 6 * 2 * (ids.shape[1] + 9) * 2 * 16 * 4
    )  # layers, K+V, len, kv heads, dim, fp32
