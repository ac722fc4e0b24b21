"""Issue 9 (new-user walkthrough), pipeline side: what total_s is made of, the context-length check, the
vision progress starting at 0/T, and the interleaved --compare-baseline runs."""

from __future__ import annotations

import pytest

from holitom_cli.cli.records import Comparison, answer_record, compare_with_baseline, speedups
from holitom_cli.compression import get_preset
from holitom_cli.errors import ConfigError
from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions

FRAMES, NEW = 4, 5
QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline.load(str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def video(pipe, sample_video):
    return pipe.prepare_video(sample_video, SamplingOptions(frames=FRAMES))


# ------------------------------------------------------------------------------------------- finding 2


def _check_timings(t: dict) -> None:
    assert t["total_s"] >= t["ttft_s"] + t["decode_video_s"], t  # the walkthrough saw total < TTFT
    parts = ("decode_video_s", "vision_s", "compress_s", "prompt_s", "prefill_s", "generation_s")
    assert all(t[k] >= 0 for k in parts), t
    assert t["ttft_s"] == pytest.approx(t["vision_s"] + t["compress_s"] + t["prompt_s"] + t["prefill_s"])
    assert t["total_s"] == pytest.approx(t["decode_video_s"] + t["ttft_s"] + t["generation_s"])
    assert t["total_s"] >= t["ttft_s"] > 0


@pytest.mark.parametrize("setting", ["balanced", None])
def test_total_includes_every_stage(pipe, video, setting):
    cfg = get_preset(setting) if setting else None
    first = pipe.ask(video, QUESTION, cfg, GenerationOptions(max_new_tokens=NEW)).stats.to_dict()["timings"]
    _check_timings(first)
    # a second question reuses the video (and the compression): still every stage, total still >= TTFT
    again = pipe.ask(video, "And then?", cfg, GenerationOptions(max_new_tokens=NEW)).stats.to_dict()[
        "timings"
    ]
    _check_timings(again)
    # (issue 11) what a later answer spends: the prepared video is reused, so no decoding or vision again
    assert again["vision_s"] == 0.0 and again["decode_video_s"] == 0.0


# ------------------------------------------------------------------------------------------- finding 9


def _set_context(monkeypatch, pipe, n: int) -> None:
    monkeypatch.setattr(pipe.model.config.text_config, "max_position_embeddings", n)


def test_prompt_longer_than_the_context_is_refused_before_prefill(pipe, video, monkeypatch):
    cfg = get_preset("balanced")
    fits = pipe.ask(video, QUESTION, cfg, GenerationOptions(max_new_tokens=NEW))
    needed = fits.stats.prompt_tokens + NEW
    called = []
    monkeypatch.setattr(pipe.model, "generate", lambda *a, **k: called.append(1))
    _set_context(monkeypatch, pipe, needed - 1)
    with pytest.raises(ConfigError) as info:
        pipe.ask(video, QUESTION, cfg, GenerationOptions(max_new_tokens=NEW))
    message = info.value.message
    assert f"{fits.stats.prompt_tokens:,} tokens" in message and f"{needed - 1:,}" in message
    assert f"--max-new-tokens {NEW}" in message
    for word in ("frames", "preset", "question", "--max-new-tokens"):
        assert word in info.value.hint
    assert called == []  # the language model never ran


def test_prompt_that_exactly_fits_runs(pipe, video, monkeypatch):
    cfg = get_preset("balanced")
    fits = pipe.ask(video, QUESTION, cfg, GenerationOptions(max_new_tokens=NEW))
    _set_context(monkeypatch, pipe, fits.stats.prompt_tokens + NEW)
    again = pipe.ask(video, QUESTION, cfg, GenerationOptions(max_new_tokens=NEW))
    assert again.token_ids == fits.token_ids


def test_question_alone_is_checked_without_the_video(pipe, monkeypatch):
    text_tokens = pipe.check_question(QUESTION, GenerationOptions(max_new_tokens=NEW))
    assert text_tokens > 5
    _set_context(monkeypatch, pipe, text_tokens + NEW)  # no room left for even one visual token
    with pytest.raises(ConfigError, match="context"):
        pipe.check_question(QUESTION, GenerationOptions(max_new_tokens=NEW))
    _set_context(monkeypatch, pipe, text_tokens + 1 + NEW)
    assert pipe.check_question(QUESTION, GenerationOptions(max_new_tokens=NEW)) == text_tokens


def test_context_length_is_read_from_the_text_config():
    from types import SimpleNamespace as NS

    from holitom_cli.models.base import context_of
    from holitom_cli.pipeline import context_length

    assert context_length(NS(language_dims=lambda: NS(context=4096))) == 4096  # the adapter's LanguageDims
    assert context_of(NS(max_position_embeddings=4096)) == 4096
    assert context_of(NS()) is None  # unknown: not checked
    assert context_of(NS(max_position_embeddings=None)) is None
    assert context_of(NS(max_position_embeddings=True)) is None


# ------------------------------------------------------------------------------------------- finding 6


def test_vision_progress_starts_at_zero_of_total(pipe, sample_video):
    calls: list[tuple[int, int]] = []
    pipe.prepare_video(
        sample_video, SamplingOptions(frames=FRAMES), on_progress=lambda d, t: calls.append((d, t))
    )
    assert calls[0] == (0, FRAMES)  # the total is known before the vision tower starts
    assert calls[-1] == (FRAMES, FRAMES)
    assert all(total == FRAMES for _, total in calls)


# ------------------------------------------------------------------------------------------- finding 3


def test_compare_runs_are_interleaved_and_greedy_answers_repeat(pipe, video, monkeypatch):
    from holitom_cli.pipeline import Pipeline

    order: list[str] = []
    real_ask = Pipeline.ask

    def spy(self, prepared, question, cfg=None, options=None, on_text=None, **kw):
        order.append("warm-up" if options.max_new_tokens == 1 else ("holitom" if cfg else "baseline"))
        return real_ask(self, prepared, question, cfg, options, on_text=on_text, **kw)

    monkeypatch.setattr(Pipeline, "ask", spy)
    streamed: dict[str, str] = {"baseline": "", "holitom": ""}
    runs = compare_with_baseline(
        pipe,
        video,
        QUESTION,
        get_preset("balanced"),
        GenerationOptions(max_new_tokens=NEW),
        repeats=3,
        on_text=lambda kind, piece: streamed.__setitem__(kind, streamed[kind] + piece),
    )
    assert order == ["warm-up"] + ["baseline", "holitom"] * 3
    assert runs.repeats == 3
    # (issue 11) every compared run is timed as a cold first question: the video's vision time counted on
    # both sides, no prompt prefix reused
    for answer in runs.baseline + runs.holitom:
        assert answer.stats.reused["prefix_kv_tokens"] == 0
        assert answer.stats.timings.vision_s == video.vision_s > 0
    assert all(a.stats.timings.compress_s > 0 for a in runs.holitom)
    # greedy decoding: every repeat of a side gives the same tokens; only the first of each side streams
    assert len({tuple(a.token_ids) for a in runs.holitom}) == 1
    assert len({tuple(a.token_ids) for a in runs.baseline}) == 1
    assert streamed == {"baseline": runs.baseline[0].text, "holitom": runs.holitom[0].text}

    record = answer_record(QUESTION, runs.holitom[0], video, runs.baseline[0], runs=runs)
    up = record["speedup"]
    assert up["repeats"] == 3 and len(up["runs"]["baseline"]) == len(up["runs"]["holitom"]) == 3
    ratios = sorted(
        b["ttft_s"] / h["ttft_s"] for b, h in zip(up["runs"]["baseline"], up["runs"]["holitom"], strict=True)
    )
    assert up["ttft"] == pytest.approx(ratios[1])  # median of the per-pair ratios
    assert up["spread"]["ttft"] == [pytest.approx(ratios[0]), pytest.approx(ratios[2])]
    for key in ("ttft", "prefill", "decode_tokens_per_s"):
        low, high = up["spread"][key]
        assert low <= up[key] <= high
    assert record["answer"] == runs.holitom[0].text and record["baseline"]["answer"] == runs.baseline[0].text


def test_speedups_without_runs_is_the_one_pair():
    t = {"ttft_s": 2.0, "prefill_s": 1.0, "decode_tokens_per_s": 10.0}
    b = {"ttft_s": 4.0, "prefill_s": 3.0, "decode_tokens_per_s": 5.0}
    up = speedups({"timings": t, "flops": {"holitom": 1.0}}, {"timings": b, "flops": {"holitom": 4.0}})
    assert (up["ttft"], up["prefill"], up["decode_tokens_per_s"], up["prefill_flops"]) == (2.0, 3.0, 2.0, 4.0)
    assert up["repeats"] == 1 and up["spread"]["prefill"] == [3.0, 3.0]
    assert Comparison().repeats == 0


@pytest.mark.parametrize("repeats", [0, -1, 1.5, True])
def test_compare_repeats_must_be_a_positive_integer(pipe, video, repeats):
    with pytest.raises(ConfigError, match="repeats"):
        compare_with_baseline(pipe, video, QUESTION, get_preset("balanced"), GenerationOptions(), repeats)
