"""The Qwen2.5-VL adapter against the unmodified transformers model and hand-run references (issue 10).

Every expected value comes from outside the adapter: transformers' PIL image processor and an index-by-index
numpy re-derivation of the video processor's documented math (a), ``model.generate`` fed pixels (b), the
family's own ``get_rope_index`` (c), decoder layers run by hand under M-RoPE (d), and the library's own eager
vision attention, recorded (e).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from holitom_cli.compression import HoliTomConfig, compress_video_tokens
from holitom_cli.errors import ModelError
from holitom_cli.models import qwen2_5_vl as qwen
from holitom_cli.models.base import VisualSpan, span_from_compression, uncompressed_span
from holitom_cli.models.compat import cache_keyword, output_cache
from holitom_cli.models.inner_merge import attach_inner_merge
from holitom_cli.models.qwen_preprocess import QwenVideoPreprocessing
from holitom_cli.models.random_qwen import (
    QWEN_SHAPES,
    build_qwen_config,
    preprocessor_configs,
    save_random_qwen,
)

CPU = torch.device("cpu")
QUESTION = "what happens in the video?"
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def frames_of(count: int, height: int = 90, width: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, height, width, 3))
    noise = rng.integers(-40, 40, (count, height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_qwen(tmp_path_factory.mktemp("qwen") / "tiny", "qwen2_5_vl-tiny")


@pytest.fixture(scope="module")
def adapters(checkpoint):
    """SDPA and eager adapters of the same tiny checkpoint."""
    out = {}
    for impl in ("sdpa", "eager"):
        adapter = qwen.load(checkpoint, device=CPU, dtype=torch.float32)
        if impl == "eager":
            adapter.model.set_attn_implementation("eager")
        out[impl] = adapter
    return out


@pytest.fixture(scope="module")
def video(adapters):
    """(pixels, tokens) of a 5-frame video (odd: the last frame is repeated) at 2 fps."""
    adapter = adapters["sdpa"]
    pixels = adapter.preprocess(frames_of(5), [0.0, 0.5, 1.0, 1.5, 2.0])
    return pixels, adapter.encode_video(pixels)


# ------------------------------------------------------------------------------------------ (a) preprocessing
def reference_patches(frames: np.ndarray, height: int, width: int, p: int = 14, m: int = 2) -> np.ndarray:
    """Index-by-index re-derivation of the video processor's output for frames (T, H, W, 3) uint8."""
    from PIL import Image

    resized = np.stack([np.asarray(Image.fromarray(f).resize((width, height), 3)) for f in frames])
    x = ((resized / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)  # (T, 3, H, W) float64
    if len(x) % 2:
        x = np.concatenate([x, x[-1:]])
    rows = []
    for t in range(len(x) // 2):
        for i in range(height // p // m):
            for j in range(width // p // m):
                for a in range(m):
                    for b in range(m):
                        y0, x0 = (i * m + a) * p, (j * m + b) * p
                        patch = x[2 * t : 2 * t + 2, :, y0 : y0 + p, x0 : x0 + p]  # (time, C, p, p)
                        rows.append(patch.transpose(1, 0, 2, 3).reshape(-1))  # (C, time, y, x)
    return np.stack(rows)


@pytest.mark.parametrize("count", [1, 4, 5])
def test_preprocessing_matches_the_documented_math(adapters, count) -> None:
    adapter = adapters["sdpa"]
    frames = frames_of(count, 90, 120)
    pixels = adapter.preprocess(frames, [0.5 * i for i in range(count)])
    h, w = hf_smart_resize(90, 120, 28, 56 * 56, 112 * 112)  # the tiny checkpoint's video pixel budget
    assert pixels.size == (h, w) == (84, 112)
    assert pixels.video_grid_thw.tolist() == [[math.ceil(count / 2), h // 14, w // 14]]
    expected = reference_patches(frames, h, w)
    assert pixels.pixel_values_videos.shape == expected.shape
    np.testing.assert_allclose(pixels.pixel_values_videos.numpy(), expected, atol=2e-6)
    assert pixels.unit_times == [0.5 * i for i in range(0, count, 2)]


def test_one_frame_equals_transformers_pil_image_processor(tmp_path) -> None:
    cfg = build_qwen_config("qwen2_5_vl-tiny").vision_config
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_configs("qwen2_5_vl-7b")["preprocessor_config.json"])
    )
    ours = QwenVideoPreprocessing.from_checkpoint(
        tmp_path, cfg
    )  # only the hub's image config: min/max pixels
    assert (ours.min_pixels, ours.max_pixels) == (3136, 12845056)
    frame = frames_of(1, 75, 130, seed=3)
    hf = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)(images=[frame], return_tensors="np")
    for frames in (frame, np.concatenate([frame, frame])):  # odd count repeats the frame: same as the image
        pixels = ours(frames, [0.0] * len(frames))
        assert pixels.video_grid_thw.tolist() == hf["image_grid_thw"].tolist()
        np.testing.assert_allclose(pixels.pixel_values_videos.numpy(), hf["pixel_values"], atol=1e-6)


def test_smart_resize_and_config_files(tmp_path) -> None:
    cfg = build_qwen_config("qwen2_5_vl-tiny").vision_config
    for name, content in preprocessor_configs("qwen2_5_vl-7b").items():
        (tmp_path / name).write_text(json.dumps(content))
    ours = QwenVideoPreprocessing.from_checkpoint(tmp_path, cfg)  # the video file wins
    assert (ours.min_pixels, ours.max_pixels, ours.source) == (
        128 * 784,
        768 * 784,
        "video_preprocessor_config.json",
    )
    for hw in [(360, 640), (1080, 1920), (64, 96), (33, 2000), (720, 1280)]:
        assert ours.target_size(*hw) == hf_smart_resize(*hw, 28, 128 * 784, 768 * 784)
    bad = dict(preprocessor_configs("qwen2_5_vl-7b")["video_preprocessor_config.json"], patch_size=16)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="patch_size"):
        QwenVideoPreprocessing.from_checkpoint(tmp_path, cfg)


def test_frame_timing_as_qwen_vl_utils(adapters) -> None:
    prep = adapters["sdpa"].preprocessing
    frames = frames_of(4, 56, 56)
    stamps = [0.0, 20.0, 40.0, 60.0]
    # 4 frames sampled from 1800 at 30 fps: sample_fps = 4 / 1800 * 30, second_per_grid_ts = 2 / sample_fps
    assert prep(frames, stamps, video_fps=30.0, total_frames=1800).second_per_grid_ts == pytest.approx(30.0)
    assert prep(frames, stamps).second_per_grid_ts == pytest.approx(2 / (3 / 60))  # spacing of the samples


# ------------------------------------------------------------------------------------------ helpers
def reference_prompt(adapter, grid: torch.Tensor) -> torch.Tensor:
    """The processor's prompt: the chat template, its one <|video_pad|> expanded to T' h w / 4 pads."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = adapter.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|video_pad|>", "<|video_pad|>" * (int(grid.prod()) // 4))
    return torch.tensor([adapter.tokenizer(text, add_special_tokens=False)["input_ids"]])


def reference_generate(adapter, pixels, max_new_tokens: int = 10) -> list[int]:
    ids = reference_prompt(adapter, pixels.video_grid_thw)
    out = adapter.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=pixels.pixel_values_videos,
        video_grid_thw=pixels.video_grid_thw,
        second_per_grid_ts=torch.tensor([pixels.second_per_grid_ts]),
        mm_token_type_ids=(ids == adapter.video_token_id).int() * 2,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out[0, ids.shape[1] :].tolist()


def rope_columns(adapter, pixels) -> torch.Tensor:
    """(3, L_full) positions of the uncompressed prompt from the model's own get_rope_index."""
    ids = reference_prompt(adapter, pixels.video_grid_thw)
    positions, _ = adapter.model.model.get_rope_index(
        ids,
        mm_token_type_ids=(ids == adapter.video_token_id).int() * 2,
        video_grid_thw=pixels.video_grid_thw,
        second_per_grid_ts=torch.tensor([pixels.second_per_grid_ts]),
    )
    return positions[:, 0]


# ------------------------------------------------------------------------------------------ (b) uncompressed
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_uncompressed_generation_equals_transformers_pixel_path(adapters, video, impl) -> None:
    adapter = adapters[impl]
    pixels, tokens = video
    span = uncompressed_span(tokens)
    inputs = adapter.build_prompt(QUESTION, span)
    assert torch.equal(inputs.input_ids, reference_prompt(adapter, pixels.video_grid_thw))
    ours = adapter.generate(inputs, span, max_new_tokens=10)
    assert ours.token_ids == reference_generate(adapter, pixels)
    assert len(ours.token_ids) == 10 and ours.kv_lengths == [inputs.input_ids.shape[1] + 9] * 4


def test_retain_all_without_temporal_merge_equals_transformers(adapters, video) -> None:
    adapter = adapters["sdpa"]
    pixels, tokens = video
    result = compress_video_tokens(tokens.features, tokens.saliency, HoliTomConfig(retain_ratio=1.0, tau=1.0))
    span = span_from_compression(tokens, result)
    assert len(span) == tokens.num_units * tokens.tokens_per_unit
    ours = adapter.generate(adapter.build_prompt(QUESTION, span), span, max_new_tokens=10)
    assert ours.token_ids == reference_generate(adapter, pixels)


# ------------------------------------------------------------------------------------------ (c) positions
def check_positions(adapter, pixels, tokens, span: VisualSpan) -> None:
    inputs = adapter.build_prompt(QUESTION, span)
    full = rope_columns(adapter, pixels)
    rows, cols = tokens.grid
    n_full = tokens.num_units * rows * cols
    start = inputs.visual_start
    cols_kept = start + (span.unit * rows + span.row) * cols + span.col
    expected = torch.cat([full[:, :start], full[:, cols_kept], full[:, start + n_full :]], dim=1)
    assert inputs.position_ids.shape == (3, 1, inputs.input_ids.shape[1])
    assert torch.equal(inputs.position_ids[:, 0], expected)
    assert inputs.visual_len == len(span)
    assert int((inputs.input_ids == adapter.video_token_id).sum()) == len(span)


def test_merged_tokens_keep_their_original_mrope_positions(adapters, video) -> None:
    adapter = adapters["sdpa"]
    pixels, tokens = video
    result = compress_video_tokens(
        tokens.features, tokens.saliency, HoliTomConfig(retain_ratio=0.3, tau=-1.0)
    )
    assert bool(result.is_static.any()) and result.num_tokens < tokens.num_units * tokens.tokens_per_unit
    check_positions(adapter, pixels, tokens, span_from_compression(tokens, result))


def test_positions_follow_unit_row_col_not_order(adapters, video) -> None:
    adapter = adapters["sdpa"]
    pixels, tokens = video
    full = uncompressed_span(tokens)
    pick = torch.tensor([35, 0, 13, 7, 24, 11])  # out of raster order, some dropped
    span = VisualSpan(full.embeds[pick], full.unit[pick], full.row[pick], full.col[pick], layout=full.layout)
    check_positions(adapter, pixels, tokens, span)
    with pytest.raises(ValueError, match="grid"):
        bad = VisualSpan(full.embeds[:1], torch.tensor([3]), full.row[:1], full.col[:1], layout=full.layout)
        adapter.build_prompt(QUESTION, bad)


# ------------------------------------------------------------------------------------------ (d) inner stage
def compressed(tokens):
    result = compress_video_tokens(tokens.features, tokens.saliency, HoliTomConfig(retain_ratio=0.5, tau=0.0))
    return span_from_compression(tokens, result)


def prompt_embeds(adapter, inputs, span) -> torch.Tensor:
    embeds = adapter.model.model.language_model.embed_tokens(inputs.input_ids).clone()
    embeds[0, inputs.visual_start : inputs.visual_start + inputs.visual_len] = span.embeds
    return embeds


def additive_causal(q: int) -> torch.Tensor:
    return torch.zeros(1, 1, q, q).masked_fill(
        ~torch.ones(q, q).tril().bool(), torch.finfo(torch.float32).min
    )


def run_layers(decoder, hidden, layer_ids, positions) -> torch.Tensor:
    """Layers run by hand on (1, q, C) at (3, 1, q) M-RoPE positions with an explicit causal mask."""
    cos_sin = decoder.rotary_emb(hidden, positions)
    for i in layer_ids:
        hidden = decoder.layers[i](
            hidden, attention_mask=additive_causal(hidden.shape[1]), position_embeddings=cos_sin
        )
    return hidden


def last_row_scores(decoder, layer_id, hidden, positions, start, length) -> torch.Tensor:
    layer, cfg = decoder.layers[layer_id], decoder.config
    heads, kv, d = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads,
    )
    x = layer.input_layernorm(hidden)[0]
    q = layer.self_attn.q_proj(x).view(-1, heads, d).transpose(0, 1)
    k = layer.self_attn.k_proj(x).view(-1, kv, d).transpose(0, 1)
    cos, sin = decoder.rotary_emb(hidden, positions)

    def rope(t):
        return t * cos + torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1) * sin

    q, k = rope(q), rope(k).repeat_interleave(heads // kv, dim=0)
    probs = torch.softmax(q @ k.transpose(1, 2) / d**0.5 + additive_causal(x.shape[0])[0], -1)
    return probs[:, -1, start : start + length].mean(0)


def sequential_merge(hidden, scores, prune_ratio):
    num = hidden.shape[0]
    keep = max(1, round(num * (1 - prune_ratio)))
    kept = sorted(sorted(range(num), key=lambda i: (-float(scores[i]), i))[:keep])
    out = hidden.clone()
    for i in range(num):
        if i not in kept:
            sims = [float(torch.cosine_similarity(hidden[i], hidden[t], dim=0)) for t in kept]
            target = kept[sims.index(max(sims))]
            out[target] = (out[target] + out[i]) / 2
    return out[kept], kept


def reference_logits(adapter, inputs, span, k, prune, extra_tokens=()):
    """No-cache logits of the last position: prompt (+ decoded tokens at last position + 1, + 2, ...)."""
    decoder = adapter.decoder
    start, length = inputs.visual_start, inputs.visual_len
    hidden = prompt_embeds(adapter, inputs, span)
    positions = inputs.position_ids
    if extra_tokens:
        ids = torch.tensor([list(extra_tokens)])
        hidden = torch.cat([hidden, decoder.embed_tokens(ids)], 1)
        steps = positions[..., -1:] + torch.arange(1, len(extra_tokens) + 1)
        positions = torch.cat([positions, steps], -1)
    n_prompt = inputs.input_ids.shape[1]
    with torch.no_grad():
        hidden = run_layers(decoder, hidden, range(k - 1), positions)
        scores = last_row_scores(
            decoder, k - 1, hidden[:, :n_prompt], positions[..., :n_prompt], start, length
        )
        hidden = run_layers(decoder, hidden, [k - 1], positions)
        merged, kept = sequential_merge(hidden[0, start : start + length], scores, prune)
        keep = list(range(start)) + [start + t for t in kept] + list(range(start + length, hidden.shape[1]))
        hidden = torch.cat([hidden[:, :start], merged[None], hidden[:, start + length :]], 1)
        hidden = run_layers(decoder, hidden, range(k, len(decoder.layers)), positions[..., keep])
        return adapter.model.lm_head(decoder.norm(hidden))[0, -1], kept


def forward(adapter, inputs, span, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return adapter.model(
        input_ids=inputs.input_ids,
        position_ids=inputs.position_ids,
        mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=(span.embeds,))},
        **kwargs,
    )


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_inner_keep_all_reproduces_the_unpatched_model(adapters, video, impl) -> None:
    adapter = adapters[impl]
    span = compressed(video[1])
    inputs = adapter.build_prompt(QUESTION, span)
    plain = adapter.generate(inputs, span, max_new_tokens=8)
    keep_all = adapter.generate(inputs, span, max_new_tokens=8, inner_layer=2, inner_prune_ratio=0.0)
    assert keep_all.token_ids == plain.token_ids
    assert keep_all.inner_stats.visual_before == keep_all.inner_stats.visual_after == len(span)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_inner_merge_equals_hand_run_reference_under_mrope(adapters, video, impl, k) -> None:
    adapter = adapters[impl]
    span = compressed(video[1])
    inputs = adapter.build_prompt(QUESTION, span)
    expected, kept = reference_logits(adapter, inputs, span, k, 0.5)
    with attach_inner_merge(adapter.decoder, layer=k, prune_ratio=0.5) as handle, torch.no_grad():
        handle.arm(inputs.visual_start, inputs.visual_len)
        logits = forward(adapter, inputs, span, use_cache=False).logits[0, -1]
    assert handle.kept_index.tolist() == kept
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_inner_cached_decode_and_generate_equal_no_cache_recompute(adapters, video, impl) -> None:
    adapter = adapters[impl]
    span = compressed(video[1])
    inputs = adapter.build_prompt(QUESTION, span)
    k, steps = 2, 4
    greedy: list[int] = []  # the greedy loop over the no-cache reference
    for _ in range(steps):
        logits, _ = reference_logits(adapter, inputs, span, k, 0.5, greedy)
        greedy.append(int(logits.argmax()))
    result = adapter.generate(inputs, span, max_new_tokens=steps, inner_layer=k, inner_prune_ratio=0.5)
    assert result.token_ids == greedy
    n, m, kept = inputs.input_ids.shape[1], len(span), result.inner_stats.visual_after
    assert result.kv_lengths == [n + steps - 1] * k + [n - (m - kept) + steps - 1] * (4 - k)
    # cached decode step by step (bare forwards with explicit M-RoPE positions) against the recompute
    with attach_inner_merge(adapter.decoder, layer=k, prune_ratio=0.5) as handle, torch.no_grad():
        handle.arm(inputs.visual_start, inputs.visual_len)
        cache = output_cache(forward(adapter, inputs, span, use_cache=True))
        last, keyword = inputs.position_ids[..., -1:], cache_keyword(adapter.model)
        for i, token in enumerate(greedy[:-1]):
            step = adapter.model(
                input_ids=torch.tensor([[token]]), position_ids=last + i + 1, **{keyword: cache}
            )
            expected, _ = reference_logits(adapter, inputs, span, k, 0.5, greedy[: i + 1])
            torch.testing.assert_close(step.logits[0, -1], expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ (e) saliency
def recorded_saliency(adapter, pixels, monkeypatch) -> dict[int, torch.Tensor]:
    """Per vision block: attention received per patch, mean over heads and queries, from the library's own
    eager attention (recorded), in the block's row order."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

    visual = adapter.model.model.visual
    current, seen = {"block": -1}, {}
    original = hf.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        if module in [b.attn for b in visual.blocks]:
            seen.setdefault(current["block"], []).append(weights[0].float().mean(0).mean(0))
        return out, weights

    monkeypatch.setattr(hf, "eager_attention_forward", recording)
    hooks = [
        blk.register_forward_pre_hook(lambda mod, args, i=i: current.__setitem__("block", i))
        for i, blk in enumerate(visual.blocks)
    ]
    previous = visual.config._attn_implementation
    visual.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            adapter.model.model.get_video_features(pixels.pixel_values_videos, pixels.video_grid_thw)
    finally:
        visual.config._attn_implementation = previous
        for h in hooks:
            h.remove()
    return {b: torch.cat(v) for b, v in seen.items()}


def to_raster(scores: torch.Tensor, pixels, vision_config) -> torch.Tensor:
    from transformers.vision_utils import get_vision_window_index

    window, _ = get_vision_window_index(pixels.video_grid_thw, 2, vision_config.window_size, 14)
    cells = scores.view(-1, 4).mean(1)  # the merger's 2x2 groups (window order)
    out = torch.empty_like(cells)
    out[window] = cells
    t = int(pixels.video_grid_thw[0, 0])
    return out.view(t, -1)


def test_saliency_is_last_full_attention_block(tmp_path, monkeypatch) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from holitom_cli.models.random_qwen import build_qwen_tokenizer, hub_config

    shape = dataclasses.replace(QWEN_SHAPES["qwen2_5_vl-tiny"], fullatt_blocks=(0, 2))  # block 3 is windowed
    tokenizer = build_qwen_tokenizer(False)
    from transformers import Qwen2_5_VLConfig

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig.from_dict(hub_config(shape, tokenizer))
    ).eval()
    for name, content in preprocessor_configs(shape).items():
        (tmp_path / name).write_text(json.dumps(content))
    adapter = qwen.Qwen2_5_VL(model, tokenizer, tmp_path, "test")
    pixels = adapter.preprocess(frames_of(4, 112, 84, seed=5), [0.0, 0.5, 1.0, 1.5])
    tokens = adapter.encode_video(pixels)
    recorded = recorded_saliency(adapter, pixels, monkeypatch)
    expected = to_raster(recorded[2], pixels, model.config.vision_config)
    torch.testing.assert_close(tokens.saliency, expected, atol=1e-6, rtol=1e-5)
    assert tokens.saliency.shape == (2, 12) and tokens.grid == (4, 3)  # non-square: 4 rows x 3 cols
    assert not torch.allclose(tokens.saliency, to_raster(recorded[0], pixels, model.config.vision_config))
    # the features are the model's own (chunked per temporal patch = one call)
    with torch.no_grad():
        feats = model.model.get_video_features(
            pixels.pixel_values_videos, pixels.video_grid_thw
        ).pooler_output[0]
    torch.testing.assert_close(tokens.features.reshape(-1, feats.shape[-1]), feats, atol=1e-5, rtol=1e-5)


def test_language_dims_and_metadata(adapters) -> None:
    adapter = adapters["sdpa"]
    dims = adapter.language_dims()
    assert (dims.num_layers, dims.hidden_size, dims.num_heads, dims.num_kv_heads) == (4, 64, 4, 2)
    assert dims.context == 32768 and adapter.num_layers == 4
    assert qwen.FAMILY == adapter.FAMILY == "qwen2_5_vl"
    assert (
        "model.visual" in qwen.QUANTIZATION_SKIP and "Qwen/Qwen2.5-VL-7B-Instruct" in qwen.DEFAULT_CHECKPOINTS
    )
    assert type(adapter.decoder).__name__ == "Qwen2_5_VLTextModel"
