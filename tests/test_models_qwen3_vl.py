"""The Qwen3-VL adapter against the unmodified transformers model and hand-run references (issue 10).

Every expected value comes from outside the adapter: transformers' own ``smart_resize`` / ``patchify`` of
the Qwen3-VL video processor and its processor's timestamp and prompt-expansion code (a), ``model.generate``
fed pixels (b), the family's own ``get_rope_index`` (c), decoder layers run by hand under M-RoPE with q/k
norms and deepstack injection (d), the compression's merge plan (e), and the library's own eager vision
attention, recorded (f).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers

from holitom_cli.compression import HoliTomConfig, compress_video_tokens
from holitom_cli.errors import ConfigError, ModelError
from holitom_cli.models.base import VisualSpan, span_from_compression, uncompressed_span
from holitom_cli.models.compat import cache_keyword, output_cache
from holitom_cli.models.inner_merge import attach_inner_merge

pytestmark = pytest.mark.skipif(
    not hasattr(transformers, "Qwen3VLForConditionalGeneration"),
    reason=f"transformers {transformers.__version__} has no Qwen3-VL (the adapter raises ModelError there)",
)

from holitom_cli.models import qwen3_vl as qwen3  # noqa: E402
from holitom_cli.models.qwen3_preprocess import smart_resize_clip, unit_timestamps  # noqa: E402
from holitom_cli.models.qwen3_random import (  # noqa: E402
    QWEN3_SHAPES,
    build_qwen3_config,
    build_qwen3_tokenizer,
    hub_config,
    preprocessor_configs,
)
from holitom_cli.models.random_qwen import QWEN_SHAPES, save_random_qwen  # noqa: E402

CPU = torch.device("cpu")
QUESTION = "what happens in the video?"
STAMPS = [0.0, 0.5, 1.0, 1.5, 2.0]


def frames_of(count: int, height: int = 90, width: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, height, width, 3))
    noise = rng.integers(-40, 40, (count, height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_qwen(tmp_path_factory.mktemp("qwen3") / "tiny", "qwen3_vl-tiny")


@pytest.fixture(scope="module")
def adapters(checkpoint):
    out = {}
    for impl in ("sdpa", "eager"):
        adapter = qwen3.load(checkpoint, device=CPU, dtype=torch.float32)
        if impl == "eager":
            adapter.model.set_attn_implementation("eager")
        out[impl] = adapter
    return out


@pytest.fixture(scope="module")
def video(adapters):
    """(pixels, tokens) of a 5-frame video (odd: the last frame is repeated) at 2 fps."""
    adapter = adapters["sdpa"]
    pixels = adapter.preprocess(frames_of(5), STAMPS)
    return pixels, adapter.encode_video(pixels)


def has_plan() -> bool:
    from holitom_cli.compression.core import CompressionResult

    return "plan" in getattr(CompressionResult, "__dataclass_fields__", {})


def span_of(tokens, result) -> VisualSpan:
    """``span_from_compression``; before ``CompressionResult.plan`` exists, a pure selection (no static
    tokens) is gathered here instead (exact for a selection)."""
    if has_plan():
        return span_from_compression(tokens, result)
    assert not bool(result.is_static.any()), "merged tokens need CompressionResult.plan"
    plain = dict(tokens.__dict__, aligned={})
    span = span_from_compression(type(tokens)(**plain), result)
    span.aligned = {
        k: v[result.frame_index.long(), result.spatial_index.long()] for k, v in tokens.aligned.items()
    }
    return span


# ------------------------------------------------------------------------------------------ (a) preprocessing
def reference_patches(frames: np.ndarray, height: int, width: int, p: int = 16, m: int = 2) -> np.ndarray:
    """Index-by-index re-derivation of the video processor's output (mean/std 0.5)."""
    from PIL import Image

    resized = np.stack([np.asarray(Image.fromarray(f).resize((width, height), 3)) for f in frames])
    x = ((resized / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)  # (T, 3, H, W) float64
    if len(x) % 2:
        x = np.concatenate([x, x[-1:]])
    rows = []
    for t in range(len(x) // 2):
        for i in range(height // p // m):
            for j in range(width // p // m):
                for a in range(m):
                    for b in range(m):
                        y0, x0 = (i * m + a) * p, (j * m + b) * p
                        patch = x[2 * t : 2 * t + 2, :, y0 : y0 + p, x0 : x0 + p]
                        rows.append(patch.transpose(1, 0, 2, 3).reshape(-1))  # (C, time, y, x)
    return np.stack(rows)


@pytest.mark.parametrize("count", [1, 4, 5])
def test_preprocessing_matches_the_video_processor(adapters, count) -> None:
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize

    adapter = adapters["sdpa"]
    prep = adapter.preprocessing
    frames = frames_of(count)
    pixels = adapter.preprocess(frames, STAMPS[:count])
    spec = QWEN3_SHAPES["qwen3_vl-tiny"]
    h, w = hf_smart_resize(max(count, 2), 90, 120, 2, 32, spec.min_pixels, spec.max_pixels)
    assert pixels.size == (h, w) == (96, 128)
    assert pixels.video_grid_thw.tolist() == [[math.ceil(count / 2), h // 16, w // 16]]
    expected = reference_patches(frames, h, w)
    np.testing.assert_allclose(pixels.pixel_values_videos.numpy(), expected, atol=2e-6)
    # transformers' own patchify of the same normalised frames (pure torch, no torchvision needed)
    x = prep.normalised_frames(frames)[None]  # (1, T, 3, H, W)
    hf, *grid = Qwen3VLVideoProcessor().patchify(x, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert grid == pixels.video_grid_thw[0].tolist()
    assert torch.equal(hf[0], pixels.pixel_values_videos)


def test_clip_budget_resize_equals_transformers() -> None:
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize

    lo, hi = 4096, 25165824  # the hub's video budget
    for t in (2, 3, 8, 32, 64, 128, 400):
        for hw in [(360, 640), (1080, 1920), (20, 96), (33, 2000), (720, 1280), (2160, 3840)]:
            assert smart_resize_clip(t, *hw, 2, 32, lo, hi) == hf_smart_resize(t, *hw, 2, 32, lo, hi), (t, hw)
    assert smart_resize_clip(1, 360, 640, 2, 32, lo, hi) == hf_smart_resize(2, 360, 640, 2, 32, lo, hi)


def test_timestamps_equal_the_processor() -> None:
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    fps = 29.97
    for indices in ([0, 30, 60, 90], [0, 15, 31, 46, 62], [7]):
        ours = unit_timestamps([i / fps for i in indices], 2)
        theirs = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
        assert ours == pytest.approx(theirs, abs=1e-12)


def test_config_files(tmp_path) -> None:
    cfg = build_qwen3_config("qwen3_vl-tiny").vision_config
    for name, content in preprocessor_configs("qwen3_vl-8b").items():
        (tmp_path / name).write_text(json.dumps(content))
    ours = qwen3.Qwen3VideoPreprocessing.from_checkpoint(tmp_path, cfg)
    assert (ours.min_pixels, ours.max_pixels, ours.source) == (
        4096,
        25165824,
        "video_preprocessor_config.json",
    )
    assert ours.mean == ours.std == (0.5, 0.5, 0.5) and ours.patch_size == 16
    (tmp_path / "video_preprocessor_config.json").unlink()  # the image file's budget then applies
    assert qwen3.Qwen3VideoPreprocessing.from_checkpoint(tmp_path, cfg).max_pixels == 16777216
    bad = dict(preprocessor_configs("qwen3_vl-8b")["video_preprocessor_config.json"], patch_size=14)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="patch_size"):
        qwen3.Qwen3VideoPreprocessing.from_checkpoint(tmp_path, cfg)


# ------------------------------------------------------------------------------------------ helpers
def processor_text(adapter, pixels) -> str:
    """The prompt text transformers' Qwen3VLProcessor writes (its own replacement code, without the
    torchvision-only video processor): chat template, then ``<|video_pad|>`` expanded per temporal patch."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    proc = object.__new__(Qwen3VLProcessor)
    proc.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    proc.tokenizer = adapter.tokenizer
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    fps = 2.0  # STAMPS are frames 0, 1, 2, ... of a 2 fps source
    meta = VideoMetadata(
        total_num_frames=len(STAMPS), fps=fps, frames_indices=[round(s * fps) for s in STAMPS]
    )
    replacement = proc.replace_video_token(
        {"video_grid_thw": pixels.video_grid_thw, "video_metadata": [meta]}, 0
    )
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = adapter.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expanded, _ = proc.get_text_with_replacements([text], videos_replacements=[replacement])
    return expanded[0]


def reference_prompt(adapter, pixels) -> torch.Tensor:
    return torch.tensor(
        [adapter.tokenizer(processor_text(adapter, pixels), add_special_tokens=False)["input_ids"]]
    )


def pixel_kwargs(adapter, pixels, ids) -> dict:
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": pixels.pixel_values_videos,
        "video_grid_thw": pixels.video_grid_thw,
        "mm_token_type_ids": (ids == adapter.video_token_id).int() * 2,
    }


class PrefillLogits:
    """Context manager: the logits of the first forward (the prefill) of ``model`` during the block."""

    def __init__(self, model) -> None:
        self.model, self.logits = model, None

    def _hook(self, module, args, kwargs, output) -> None:
        if self.logits is None:
            self.logits = output.logits.detach().clone()

    def __enter__(self):
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def reference_generate(adapter, pixels, max_new_tokens: int = 10) -> list[int]:
    ids = reference_prompt(adapter, pixels)
    adapter.model.model.rope_deltas = None
    out = adapter.model.generate(
        **pixel_kwargs(adapter, pixels, ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, ids.shape[1] :].tolist()


def rope_columns(adapter, pixels) -> torch.Tensor:
    """(3, L_full) positions of the uncompressed prompt from the model's own get_rope_index."""
    ids = reference_prompt(adapter, pixels)
    positions, _ = adapter.model.model.get_rope_index(
        ids, mm_token_type_ids=(ids == adapter.video_token_id).int() * 2, video_grid_thw=pixels.video_grid_thw
    )
    return positions[:, 0]


def forward(adapter, inputs, span, **kwargs):
    """One forward of our inputs (embeddings, deepstack and positions given, no pixels)."""
    deepstack = [span.aligned["deepstack"][:, i] for i in range(adapter.deepstack_levels)]
    length = inputs.input_ids.shape[1]
    positions = torch.cat([torch.arange(length).view(1, 1, -1), inputs.position_ids], 0)
    return adapter.model(
        input_ids=inputs.input_ids,
        position_ids=positions,
        mm_encoder_outputs={"video": qwen3._encoder_output(span.embeds, deepstack)},
        **kwargs,
    )


# ------------------------------------------------------------------------------------------ (b) uncompressed
def test_prompt_is_the_processors(adapters, video) -> None:
    adapter = adapters["sdpa"]
    pixels, tokens = video
    inputs = adapter.build_prompt(QUESTION, uncompressed_span(tokens))
    text = processor_text(adapter, pixels)
    assert "<|vision_start|><0.2 seconds><|vision_start|>" in text and "<2.0 seconds>" in text
    assert torch.equal(inputs.input_ids, reference_prompt(adapter, pixels))
    assert adapter.tokenizer.decode(inputs.input_ids[0]) == text
    assert inputs.extra["visual_positions"].numel() == len(uncompressed_span(tokens))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_uncompressed_generation_equals_transformers_pixel_path(adapters, video, impl) -> None:
    adapter = adapters[impl]
    pixels, tokens = video
    span = uncompressed_span(tokens)
    inputs = adapter.build_prompt(QUESTION, span)
    with PrefillLogits(adapter.model) as mine:
        ours = adapter.generate(inputs, span, max_new_tokens=10)
    with PrefillLogits(adapter.model) as theirs:
        expected = reference_generate(adapter, pixels)
    assert ours.token_ids == expected
    assert len(ours.token_ids) == 10 and ours.kv_lengths == [inputs.input_ids.shape[1] + 9] * 4
    # the prefill logits too, not only the argmax (features encoded under SDPA: eager differs ~1e-5)
    torch.testing.assert_close(mine.logits, theirs.logits, atol=1e-4, rtol=1e-4)


def test_deepstack_matters(adapters, video) -> None:
    """Without the deepstack features the logits change (so the equality above checks they are fed)."""
    adapter = adapters["sdpa"]
    span = uncompressed_span(video[1])
    inputs = adapter.build_prompt(QUESTION, span)
    zero = VisualSpan(
        span.embeds, span.unit, span.row, span.col, {"deepstack": span.aligned["deepstack"] * 0}, span.layout
    )
    with torch.no_grad():
        assert not torch.allclose(
            forward(adapter, inputs, span).logits, forward(adapter, inputs, zero).logits
        )


def test_retain_all_without_temporal_merge_equals_transformers(adapters, video) -> None:
    adapter = adapters["sdpa"]
    pixels, tokens = video
    result = compress_video_tokens(tokens.features, tokens.saliency, HoliTomConfig(retain_ratio=1.0, tau=1.0))
    span = span_of(tokens, result)
    assert len(span) == tokens.num_units * tokens.tokens_per_unit
    with PrefillLogits(adapter.model) as mine:
        ours = adapter.generate(adapter.build_prompt(QUESTION, span), span, max_new_tokens=10)
    with PrefillLogits(adapter.model) as theirs:
        assert ours.token_ids == reference_generate(adapter, pixels)
    torch.testing.assert_close(mine.logits, theirs.logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ (c) positions
def expected_layout(adapter, pixels, tokens, span):
    """(columns of the uncompressed prompt kept, in order) derived from the processor's prompt alone."""
    ids = reference_prompt(adapter, pixels)[0].tolist()
    n = tokens.tokens_per_unit
    pads = [i for i, t in enumerate(ids) if t == adapter.video_token_id]
    firsts = pads[::n]
    outer = (
        firsts[0]
        - 1
        - next(k for k in range(1, firsts[0]) if ids[firsts[0] - 1 - k] == adapter.vision_start_id)
    )
    cols = [outer + 1 + 0][:0] + list(range(outer + 1))
    previous = None
    rows_, cols_ = tokens.grid
    units = span.unit.tolist()
    for i, u in enumerate(units):
        if u != previous:
            if previous is not None:
                cols.append(firsts[previous] + n)
            begin = outer + 1 if u == 0 else firsts[u - 1] + n + 1
            cols += list(range(begin, firsts[u]))
            previous = u
        cols.append(firsts[u] + int(span.row[i]) * cols_ + int(span.col[i]))
    cols.append(firsts[previous] + n)
    cols += list(range(firsts[-1] + n + 1, len(ids)))
    return cols, ids


def check_positions(adapter, pixels, tokens, span: VisualSpan) -> None:
    inputs = adapter.build_prompt(QUESTION, span)
    full = rope_columns(adapter, pixels)
    cols, ids = expected_layout(adapter, pixels, tokens, span)
    assert inputs.input_ids[0].tolist() == [ids[c] for c in cols]
    assert inputs.position_ids.shape == (3, 1, len(cols))
    assert torch.equal(inputs.position_ids[:, 0], full[:, cols])
    assert inputs.visual_len == len(span) == int((inputs.input_ids == adapter.video_token_id).sum())
    visual = inputs.extra["visual_positions"]
    assert torch.equal(inputs.input_ids[0, visual], torch.full((len(span),), adapter.video_token_id))


def test_merged_tokens_keep_their_original_mrope_positions(adapters, video) -> None:
    adapter = adapters["sdpa"]
    pixels, tokens = video
    result = compress_video_tokens(
        tokens.features, tokens.saliency, HoliTomConfig(retain_ratio=0.3, tau=-1.0)
    )
    assert bool(result.is_static.any()) and result.num_tokens < tokens.num_units * tokens.tokens_per_unit
    assert result.frame_index.tolist() == sorted(result.frame_index.tolist())  # grouped by unit
    plain = dict(tokens.__dict__, aligned={})  # positions need no deepstack
    check_positions(adapter, pixels, tokens, span_from_compression(type(tokens)(**plain), result))


def test_positions_and_timestamps_follow_the_kept_units(adapters, video) -> None:
    adapter = adapters["sdpa"]
    pixels, tokens = video
    full = uncompressed_span(tokens)
    pick = torch.tensor([30, 24, 27, 3, 0, 11])  # unit 2 first, unit 1 dropped, out of raster order
    span = VisualSpan(full.embeds[pick], full.unit[pick], full.row[pick], full.col[pick], layout=full.layout)
    check_positions(adapter, pixels, tokens, span)
    text = adapter.tokenizer.decode(adapter.build_prompt(QUESTION, span).input_ids[0])
    assert "<1.2 seconds>" not in text and text.index("<2.0 seconds>") < text.index("<0.2 seconds>")
    assert text.count("<|vision_start|>") == 3 and text.count("<|vision_end|>") == 3  # outer + 2 units
    with pytest.raises(ValueError, match="grid"):
        bad = VisualSpan(full.embeds[:1], torch.tensor([3]), full.row[:1], full.col[:1], layout=full.layout)
        adapter.build_prompt(QUESTION, bad)


# ------------------------------------------------------------------------------------------ (d) inner stage
def compressed(tokens):
    result = compress_video_tokens(tokens.features, tokens.saliency, HoliTomConfig(retain_ratio=0.5, tau=1.0))
    return span_of(tokens, result)


def additive_causal(q: int) -> torch.Tensor:
    return torch.zeros(1, 1, q, q).masked_fill(
        ~torch.ones(q, q).tril().bool(), torch.finfo(torch.float32).min
    )


def run_layers(decoder, hidden, layer_ids, positions, visual=None, deepstack=None) -> torch.Tensor:
    """Layers by hand on (1, q, C) at (3, 1, q) positions, causal; deepstack level l added after layer l."""
    cos_sin = decoder.rotary_emb(hidden, positions)
    for i in layer_ids:
        hidden = decoder.layers[i](
            hidden, attention_mask=additive_causal(hidden.shape[1]), position_embeddings=cos_sin
        )
        if deepstack is not None and i < len(deepstack):
            hidden = hidden.clone()
            hidden[0, visual] += deepstack[i]
    return hidden


def last_row_scores(decoder, layer_id, hidden, positions, visual) -> torch.Tensor:
    layer, cfg = decoder.layers[layer_id], decoder.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = layer.input_layernorm(hidden)[0]
    q = layer.self_attn.q_norm(layer.self_attn.q_proj(x).view(-1, heads, d)).transpose(0, 1)
    k = layer.self_attn.k_norm(layer.self_attn.k_proj(x).view(-1, kv, d)).transpose(0, 1)
    cos, sin = decoder.rotary_emb(hidden, positions)

    def rope(t):
        return t * cos + torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1) * sin

    q, k = rope(q), rope(k).repeat_interleave(heads // kv, dim=0)
    probs = torch.softmax(q @ k.transpose(1, 2) / d**0.5 + additive_causal(x.shape[0])[0], -1)
    return probs[:, -1, visual].mean(0)


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
    """No-cache logits of the last position (prompt + decoded tokens), merge at layer k, by hand."""
    decoder = adapter.decoder
    visual = inputs.extra["visual_positions"].tolist()
    hidden = decoder.embed_tokens(inputs.input_ids).clone()
    hidden[0, visual] = span.embeds
    deepstack = [span.aligned["deepstack"][:, i] for i in range(adapter.deepstack_levels)]
    positions = inputs.position_ids
    if extra_tokens:
        hidden = torch.cat([hidden, decoder.embed_tokens(torch.tensor([list(extra_tokens)]))], 1)
        positions = torch.cat([positions, positions[..., -1:] + torch.arange(1, len(extra_tokens) + 1)], -1)
    n_prompt = inputs.input_ids.shape[1]
    with torch.no_grad():
        hidden = run_layers(decoder, hidden, range(k - 1), positions, visual, deepstack)
        scores = last_row_scores(decoder, k - 1, hidden[:, :n_prompt], positions[..., :n_prompt], visual)
        hidden = run_layers(decoder, hidden, [k - 1], positions, visual, deepstack)
        merged, kept = sequential_merge(hidden[0, visual], scores, prune)
        rows = hidden[0].clone()
        rows[[visual[t] for t in kept]] = merged
        dropped = {visual[t] for t in range(len(visual)) if t not in kept}
        keep = [i for i in range(hidden.shape[1]) if i not in dropped]
        hidden = run_layers(decoder, rows[keep][None], range(k, len(decoder.layers)), positions[..., keep])
        return adapter.model.lm_head(decoder.norm(hidden))[0, -1], kept


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
@pytest.mark.parametrize("k", [2, 3])
def test_inner_merge_equals_hand_run_reference(adapters, video, impl, k) -> None:
    adapter = adapters[impl]
    span = compressed(video[1])
    inputs = adapter.build_prompt(QUESTION, span)
    expected, kept = reference_logits(adapter, inputs, span, k, 0.5)
    handle = attach_inner_merge(adapter.decoder, layer=k, prune_ratio=0.5, recipe=qwen3.INNER_RECIPE)
    with handle, torch.no_grad():
        handle.arm_positions(inputs.extra["visual_positions"])
        logits = forward(adapter, inputs, span, use_cache=False).logits[0, -1]
    assert handle.kept_index.tolist() == kept
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_inner_cached_decode_and_generate_equal_no_cache_recompute(adapters, video, impl) -> None:
    adapter = adapters[impl]
    span = compressed(video[1])
    inputs = adapter.build_prompt(QUESTION, span)
    k, steps = 3, 4
    greedy: list[int] = []
    for _ in range(steps):
        logits, _ = reference_logits(adapter, inputs, span, k, 0.5, greedy)
        greedy.append(int(logits.argmax()))
    result = adapter.generate(inputs, span, max_new_tokens=steps, inner_layer=k, inner_prune_ratio=0.5)
    assert result.token_ids == greedy
    n, m, kept = inputs.input_ids.shape[1], len(span), result.inner_stats.visual_after
    assert result.kv_lengths == [n + steps - 1] * k + [n - (m - kept) + steps - 1] * (4 - k)
    handle = attach_inner_merge(adapter.decoder, layer=k, prune_ratio=0.5, recipe=qwen3.INNER_RECIPE)
    with handle, torch.no_grad():
        handle.arm_positions(inputs.extra["visual_positions"])
        cache = output_cache(forward(adapter, inputs, span, use_cache=True))
        last, keyword = inputs.position_ids[..., -1:], cache_keyword(adapter.model)
        for i, token in enumerate(greedy[:-1]):
            step_pos = torch.cat([torch.full((1, 1, 1), n + i), last + i + 1], 0)
            step = adapter.model(input_ids=torch.tensor([[token]]), position_ids=step_pos, **{keyword: cache})
            expected, _ = reference_logits(adapter, inputs, span, k, 0.5, greedy[: i + 1])
            torch.testing.assert_close(step.logits[0, -1], expected, atol=1e-4, rtol=1e-4)


def test_inner_layer_inside_the_deepstack_layers_is_refused(adapters, video) -> None:
    adapter = adapters["sdpa"]
    span = compressed(video[1])
    inputs = adapter.build_prompt(QUESTION, span)
    with pytest.raises(ConfigError, match="deepstack"):
        adapter.generate(inputs, span, max_new_tokens=2, inner_layer=1)
    with pytest.raises(ModelError, match="q_norm/k_norm"):  # the built-in Qwen2 recipe does not fit
        attach_inner_merge(adapter.decoder, 2, 0.5, recipe=qwen3.AttentionRecipe(("Qwen3VLTextModel",)))


def test_each_visual_position_gets_its_tokens_deepstack(adapters, video) -> None:
    """Out of raster order, units dropped: deepstack row i is added at visual position i (by hand)."""
    adapter = adapters["sdpa"]
    tokens = video[1]
    full = uncompressed_span(tokens)
    pick = torch.tensor([30, 24, 27, 3, 0, 11])
    span = VisualSpan(
        full.embeds[pick], full.unit[pick], full.row[pick], full.col[pick],
        {"deepstack": full.aligned["deepstack"][pick]}, full.layout,
    )  # fmt: skip
    inputs = adapter.build_prompt(QUESTION, span)
    decoder = adapter.decoder
    visual = inputs.extra["visual_positions"].tolist()
    levels = [span.aligned["deepstack"][:, i] for i in range(adapter.deepstack_levels)]
    with torch.no_grad():
        hidden = decoder.embed_tokens(inputs.input_ids).clone()
        hidden[0, visual] = span.embeds
        hidden = run_layers(decoder, hidden, range(len(decoder.layers)), inputs.position_ids, visual, levels)
        expected = adapter.model.lm_head(decoder.norm(hidden))[0]
        torch.testing.assert_close(forward(adapter, inputs, span).logits[0], expected, atol=1e-4, rtol=1e-4)
        shuffled = VisualSpan(
            span.embeds,
            span.unit,
            span.row,
            span.col,
            {"deepstack": span.aligned["deepstack"].flip(0)},
            span.layout,
        )
        assert not torch.allclose(forward(adapter, inputs, shuffled).logits[0], expected, atol=1e-3)


# ------------------------------------------------------------------------------------------ (e) merge plan
@pytest.mark.skipif(
    not has_plan(), reason="CompressionResult.plan (holitom_cli/compression/plan.py) not there yet"
)
def test_plan_reproduces_the_merged_features_and_merges_deepstack(adapters, video) -> None:
    adapter = adapters["sdpa"]
    pixels, tokens = video
    # a tau that leaves both merged static tokens and selected dynamic ones (random features: similarity ~ 0)
    for tau in (0.0, 0.3, -0.3, 0.6, -0.6, 0.9):
        result = compress_video_tokens(
            tokens.features, tokens.saliency, HoliTomConfig(retain_ratio=0.3, tau=tau)
        )
        if bool(result.is_static.any()) and bool((~result.is_static).any()):
            break
    assert bool(result.is_static.any()) and bool((~result.is_static).any())
    torch.testing.assert_close(result.plan.apply(tokens.features), result.features, atol=1e-6, rtol=1e-6)
    span = span_from_compression(tokens, result)
    deep = tokens.aligned["deepstack"]  # (T', N, levels, C): every level merged as the features are
    for level in range(deep.shape[2]):
        torch.testing.assert_close(span.aligned["deepstack"][:, level], result.plan.apply(deep[:, :, level]))
    # a selected (dynamic) token carries its own deepstack features exactly
    dyn = (~result.is_static).nonzero()[0, 0]
    u, p = int(result.frame_index[dyn]), int(result.spatial_index[dyn])
    assert torch.equal(span.aligned["deepstack"][dyn], deep[u, p])
    # and generation feeds them: our logits equal a hand-run forward with the merged deepstack injected
    inputs = adapter.build_prompt(QUESTION, span)
    decoder = adapter.decoder
    visual = inputs.extra["visual_positions"].tolist()
    with torch.no_grad():
        hidden = decoder.embed_tokens(inputs.input_ids).clone()
        hidden[0, visual] = span.embeds
        levels = [span.aligned["deepstack"][:, i] for i in range(adapter.deepstack_levels)]
        hidden = run_layers(decoder, hidden, range(len(decoder.layers)), inputs.position_ids, visual, levels)
        expected = adapter.model.lm_head(decoder.norm(hidden))[0, -1]
        torch.testing.assert_close(
            forward(adapter, inputs, span).logits[0, -1], expected, atol=1e-4, rtol=1e-4
        )


# ------------------------------------------------------------------------------------------ (f) saliency
def test_saliency_is_the_last_blocks_attention_and_features_are_the_models(
    adapters, video, monkeypatch
) -> None:
    from transformers.models.qwen3_vl import modeling_qwen3_vl as hf

    adapter = adapters["sdpa"]
    pixels, tokens = video
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
            out = adapter.model.model.get_video_features(pixels.pixel_values_videos, pixels.video_grid_thw)
    finally:
        visual.config._attn_implementation = previous
        for h in hooks:
            h.remove()
    units = tokens.num_units

    def cells(block):  # the merger's 2x2 groups: 4 consecutive rows per merged cell, raster order
        return torch.cat(seen[block]).view(-1, 4).mean(1).view(units, -1)

    last = len(visual.blocks) - 1
    torch.testing.assert_close(tokens.saliency, cells(last), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(tokens.saliency, cells(0), atol=1e-4)
    assert tokens.grid == (3, 4)  # non-square: 3 rows x 4 cols
    feats = out.pooler_output[0]
    torch.testing.assert_close(tokens.features.reshape(-1, feats.shape[-1]), feats, atol=1e-5, rtol=1e-5)
    for level, ref in enumerate(out.deepstack_features):
        got = tokens.aligned["deepstack"][:, :, level].reshape(-1, feats.shape[-1])
        torch.testing.assert_close(got, ref[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ shapes, metadata
REAL = {  # published config.json numbers of Qwen/Qwen3-VL-{2B,8B}-Instruct
    "qwen3_vl-2b": dict(
        layers=28, hidden=2048, ffn=6144, heads=16, kv=8, tied=True, depth=24, vh=1024, ds=[5, 11, 17]
    ),
    "qwen3_vl-8b": dict(
        layers=36, hidden=4096, ffn=12288, heads=32, kv=8, tied=False, depth=27, vh=1152, ds=[8, 16, 24]
    ),
}  # fmt: skip


@pytest.mark.parametrize("shape", sorted(REAL))
def test_real_shapes_have_the_published_config(shape) -> None:
    tokenizer = build_qwen3_tokenizer(True)
    cfg = build_qwen3_config(shape, tokenizer)
    t, v, want = cfg.text_config, cfg.vision_config, REAL[shape]
    assert (t.num_hidden_layers, t.hidden_size, t.intermediate_size) == (
        want["layers"],
        want["hidden"],
        want["ffn"],
    )
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (want["heads"], want["kv"], 128)
    assert bool(cfg.tie_word_embeddings) == want["tied"] and t.vocab_size == 151936
    assert t.rope_parameters["mrope_section"] == [24, 20, 20] and t.rope_parameters["rope_theta"] == 5e6
    assert (v.depth, v.hidden_size, list(v.deepstack_visual_indexes)) == (
        want["depth"],
        want["vh"],
        want["ds"],
    )
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.out_hidden_size) == (
        16,
        2,
        2,
        want["hidden"],
    )
    assert type(v).__name__ == "Qwen3VLVisionConfig"  # the hub's vision model_type "qwen3_vl" is mapped
    assert (cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        151656,
        151652,
        151653,
    )
    assert tokenizer.convert_tokens_to_ids("</think>") == 151668
    assert hub_config(shape, tokenizer)["text_config"]["max_position_embeddings"] == 262144


def test_random_model_cli_builds_a_checkpoint_that_loads(tmp_path, capsys) -> None:
    from holitom_cli.models.random_model import main

    assert {"qwen3_vl-tiny", "qwen3_vl-2b", "qwen3_vl-8b"} <= set(QWEN_SHAPES)
    assert main([str(tmp_path), "--shape", "qwen3_vl-tiny"]) == 0
    assert "qwen3_vl-tiny" in capsys.readouterr().err
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and "text_config" in config and "vision_config" in config
    assert {"video_preprocessor_config.json", "preprocessor_config.json", "tokenizer.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    adapter = qwen3.load(tmp_path, device=CPU, dtype=torch.float32)
    assert adapter.preprocessing.source == "video_preprocessor_config.json"
    assert type(adapter.decoder).__name__ == "Qwen3VLTextModel"
    text = adapter.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_language_dims_metadata_and_old_transformers(adapters, video, monkeypatch, checkpoint) -> None:
    adapter = adapters["sdpa"]
    dims = adapter.language_dims()
    assert (dims.num_layers, dims.hidden_size, dims.num_heads, dims.num_kv_heads) == (4, 64, 4, 2)
    assert dims.context == 32768 and adapter.num_layers == 4 and adapter.deepstack_levels == 2
    assert qwen3.FAMILY == adapter.FAMILY == "qwen3_vl"
    assert (
        "Qwen/Qwen3-VL-8B-Instruct" in qwen3.DEFAULT_CHECKPOINTS and "model.visual" in qwen3.QUANTIZATION_SKIP
    )
    assert adapter.vision_flops(video[1]) > 0
    assert adapter.text_tokens(QUESTION) == len(adapter.tokenizer(adapter._render(QUESTION))["input_ids"]) - 1
    with pytest.raises(ConfigError, match="special token"):
        adapter.build_prompt("what is <|vision_end|>?", uncompressed_span(video[1]))
    from holitom_cli.models import compat

    with pytest.raises(ModelError, match="has no Qwen9VLForConditionalGeneration: Qwen9-VL needs a newer"):
        compat.model_class("Qwen9VLForConditionalGeneration", "Qwen9-VL")
    # loading goes through that seam: a transformers without the class gives a clear ModelError
    monkeypatch.setattr(qwen3, "model_class", lambda name, family: compat.model_class(name + "Gone", family))
    with pytest.raises(ModelError, match="Qwen3-VL needs a newer transformers"):
        qwen3.load(checkpoint, device=CPU, dtype=torch.float32)
