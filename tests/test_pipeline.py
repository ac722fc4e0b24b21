"""The pipeline on the tiny random checkpoint: parity with plain transformers, compressed runs, reuse, stats.

The reference for parity is the unmodified transformers model fed pixels the usual way
(``generate(pixel_values_videos=...)``, which runs the vision tower, projector, pooling and newline itself)
with a prompt built in the test by expanding ``<video>`` in the chat text. float32 avoids bf16 near-ties.
"""

from __future__ import annotations

import pytest
import torch

from holitom_cli.compression import HoliTomConfig, exact_prefill_flops, get_preset
from holitom_cli.errors import ConfigError
from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions
from holitom_cli.video import load_video

FRAMES = 10  # > the adapter's 8-frame vision chunk, so chunking is exercised
NEW = 12
QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline.load(str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def video(pipe, sample_video):
    return pipe.prepare_video(sample_video, SamplingOptions(frames=FRAMES))


def _reference_tokens(pipe, frames, question, max_new_tokens=NEW):
    """Greedy tokens of the untouched transformers model on the pixel path."""
    model, tok = pipe.model.model, pipe.model.tokenizer
    num_visual = frames.shape[0] * 49 + 1
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + "<video>" * num_visual
        + "\n"
        + question
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    pixels = pipe.model.preprocess(frames).pixel_values[None]  # (1, T, 3, S, S)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values_videos=pixels,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def reference(pipe, video):
    return _reference_tokens(pipe, video.clip.frames, QUESTION)


def _ask(pipe, video, cfg, question=QUESTION, **kwargs):
    return pipe.ask(video, question, cfg, GenerationOptions(max_new_tokens=NEW), **kwargs)


def test_no_compression_equals_plain_transformers(pipe, video, reference):
    answer = _ask(pipe, video, None)
    assert answer.token_ids == reference
    assert (
        len(set(reference)) > 3
    )  # the tiny model answers something non-trivial, so the comparison means much


def test_outer_stage_with_nothing_to_merge_equals_it(pipe, video, reference):
    cfg = HoliTomConfig(retain_ratio=1.0, tau=1.0, inner=False)
    answer = _ask(pipe, video, cfg)
    assert answer.compression.num_tokens == FRAMES * 49
    assert answer.token_ids == reference


def test_inner_stage_with_prune_zero_equals_it(pipe, video, reference):
    cfg = HoliTomConfig(retain_ratio=1.0, tau=1.0, inner=True, inner_prune_ratio=0.0)
    answer = _ask(pipe, video, cfg)
    assert answer.stats.inner is not None and answer.stats.inner.layer == 4  # round(0.64 * 6)
    assert answer.stats.inner.visual_after == answer.stats.inner.visual_before == FRAMES * 49 + 1
    assert answer.token_ids == reference


def test_compression_changes_the_answer(pipe, video, reference):
    # the parity tests above can fail: a real compression gives other tokens on this model
    answer = _ask(pipe, video, HoliTomConfig(retain_ratio=0.1, inner=False))
    assert answer.token_ids != reference


def test_compressed_run_token_counts_and_kv_lengths(pipe, video, monkeypatch):
    cfg = get_preset("balanced")
    seen = {}
    original = pipe.model.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(pipe.model.model, "generate", spy)
    answer = _ask(pipe, video, cfg)
    result = pipe.compress(video, cfg)
    video_id = pipe.model.tokenizer.convert_tokens_to_ids("<video>")
    n_video = int((seen["input_ids"] == video_id).sum())
    assert n_video == result.num_tokens + 1  # compressed tokens + the newline
    assert seen["mm_encoder_outputs"]["video"].pooler_output.shape[1] == n_video
    assert "pixel_values_videos" not in seen

    s = answer.stats
    assert s.tokens.input == FRAMES * 49
    assert s.tokens.after_temporal == result.num_after_temporal
    assert s.tokens.into_llm == result.num_tokens + 1
    kept = round((result.num_tokens + 1) * (1 - cfg.inner_prune_ratio))
    assert s.tokens.after_inner == kept < s.tokens.into_llm
    k, removed = s.inner.layer, s.tokens.into_llm - kept
    assert s.inner.kv_lengths == [s.prompt_tokens] * k + [s.prompt_tokens - removed] * (6 - k)
    assert s.prompt_tokens == seen["input_ids"].shape[1]
    assert s.new_tokens == len(answer.token_ids) == NEW


def test_flops_are_consistent(pipe, video):
    full = _ask(pipe, video, None).stats
    cfg = get_preset("balanced")
    comp = _ask(pipe, video, cfg).stats
    text_tokens = full.prompt_tokens - full.tokens.into_llm
    t = pipe.model.model.config.text_config
    from holitom_cli.compression import LanguageModelShape

    lm = LanguageModelShape(
        t.num_hidden_layers,
        t.hidden_size,
        t.intermediate_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.hidden_size // t.num_attention_heads,
        t.vocab_size,
    )
    assert full.flops.baseline == full.flops.holitom == exact_prefill_flops(lm, full.prompt_tokens)["total"]
    assert comp.flops.baseline == full.flops.baseline
    removed = comp.tokens.into_llm - comp.tokens.after_inner
    expected = exact_prefill_flops(lm, text_tokens + comp.tokens.into_llm, removed, comp.inner.layer)["total"]
    assert comp.flops.holitom == expected < comp.flops.baseline
    d = comp.to_dict()["flops"]
    assert d["ratio"] == pytest.approx(comp.flops.holitom / comp.flops.baseline)
    assert 0 < d["paper_formula"]["ratio"] < 1 and d["vision"] > 0


def test_reused_video_gives_the_same_answer_as_a_fresh_run(pipe, video, sample_video):
    cfg = get_preset("fast")
    first = _ask(pipe, video, cfg)
    again = _ask(pipe, video, cfg)
    assert again.stats.reused["compression"] is True
    assert pipe.compress(video, cfg) is again.compression
    fresh_video = pipe.prepare_video(sample_video, SamplingOptions(frames=FRAMES))
    fresh = _ask(pipe, fresh_video, cfg)
    assert fresh.stats.reused["compression"] is False
    assert first.token_ids == again.token_ids == fresh.token_ids
    # each answer counts the work done for it: a reused video and compression cost nothing again
    assert again.stats.reused["video"] is True and fresh.stats.reused["video"] is False
    assert again.stats.timings.vision_s == 0.0 == again.stats.timings.compress_s
    assert fresh.stats.timings.vision_s == fresh_video.vision_s > 0
    assert fresh.stats.timings.ttft_s >= fresh_video.vision_s + fresh.stats.timings.compress_s


def test_fps_sampling(pipe, sample_video):
    video = pipe.prepare_video(sample_video, SamplingOptions(frames=None, fps=2.0, max_frames=3))
    assert video.clip.indices == [0, 11, 23]  # 4 candidates at 2 fps of a 12 fps 24-frame video > 3
    assert video.features.shape[0] == 3
    with pytest.raises(ConfigError):
        SamplingOptions(frames=None)


def test_prepared_clip_and_other_questions(pipe, sample_video):
    clip = load_video(sample_video, num_frames=4)
    progress = []
    video = pipe.prepare_video(clip, on_progress=lambda done, total: progress.append((done, total)))
    # (0, T) as soon as the frames are known, then the vision tower's progress, each state once
    assert progress[0] == (0, 4) and progress[-1] == (4, 4)
    assert all(total == 4 for _, total in progress) and len(set(progress)) == len(progress)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert video.clip is clip and video.features.shape == (4, 49, 64)
    answer = pipe.ask(video, "Which colour?", None, GenerationOptions(max_new_tokens=5))
    assert answer.token_ids == _reference_tokens(pipe, clip.frames, "Which colour?", 5)


def test_streaming_and_stats_schema(pipe, video):
    pieces: list[str] = []
    answer = _ask(pipe, video, get_preset("balanced"), on_text=pieces.append)
    assert "".join(pieces) == answer.text
    d = answer.stats.to_dict()
    assert set(d["tokens"]) == {"input", "after_temporal", "into_llm", "after_inner"}
    assert set(d["flops"]) == {"baseline", "holitom", "ratio", "paper_formula", "vision"}
    assert set(d["flops"]["paper_formula"]) == {"baseline", "holitom", "ratio"}
    assert {"decode_video_s", "vision_s", "compress_s", "prefill_s", "ttft_s", "decode_tokens_per_s"} <= set(
        d["timings"]
    )
    assert {"peak_memory_bytes", "kv_cache_bytes", "new_tokens", "prompt_tokens"} <= set(d)
    t = d["timings"]
    assert t["ttft_s"] >= t["vision_s"] + t["compress_s"] + t["prefill_s"] > 0
    assert t["total_s"] >= t["ttft_s"] + t["decode_video_s"]
    assert d["peak_memory_bytes"] > 10_000_000 and d["kv_cache_bytes"] > 0
    import json

    json.dumps(d)  # JSON-serialisable


def test_sampling_with_seed_is_reproducible(pipe, video):
    opts = GenerationOptions(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=7)
    a = pipe.ask(video, QUESTION, None, opts)
    b = pipe.ask(video, QUESTION, None, opts)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6


@pytest.mark.parametrize("question", ["", "  \n "])
def test_empty_question(pipe, video, question):
    with pytest.raises(ConfigError):
        pipe.ask(video, question, None)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SamplingOptions(frames=0),
        lambda: SamplingOptions(fps=-1.0),
        lambda: SamplingOptions(max_frames=0),
        lambda: GenerationOptions(max_new_tokens=0),
        lambda: GenerationOptions(temperature=-0.1),
        lambda: GenerationOptions(top_p=1.5),
        lambda: GenerationOptions(top_p=0.0),
        lambda: GenerationOptions(seed=-1),
        lambda: GenerationOptions(seed=1.5),
    ],
)
def test_invalid_options(make):
    with pytest.raises(ConfigError):
        make()


def test_inner_layer_out_of_range(pipe, video):
    with pytest.raises(ConfigError):
        pipe.ask(video, QUESTION, HoliTomConfig(inner_layer=6), GenerationOptions(max_new_tokens=2))


def test_hooks_are_gone_after_a_compressed_answer(pipe, video, reference):
    _ask(pipe, video, get_preset("fastest"))
    layers = pipe.model.decoder.layers
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
    vision_attention = pipe.model.model.model.vision_tower.encoder.layers[-1].self_attn
    assert not vision_attention._forward_pre_hooks
    assert _ask(pipe, video, None).token_ids == reference


def test_importing_the_api_stays_light():
    # the CLI imports these at start-up; torch, transformers and OpenCV must load only when used
    import subprocess
    import sys

    code = (
        "import sys, holitom_cli.pipeline, holitom_cli.models, holitom_cli.video, holitom_cli.stats;"
        "print(sorted(m for m in ('torch', 'transformers', 'cv2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
