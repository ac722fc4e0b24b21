"""``holitom ask`` end to end on the tiny random checkpoint, compared with the pipeline called directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from holitom_cli.cli.app import app
from holitom_cli.compression import HoliTomConfig, get_preset
from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions

FRAMES, NEW_TOKENS = 4, 5
TOKENS_PER_FRAME = 49  # tiny checkpoint: 13x13 patches pooled to 7x7
QUESTION = "What does the red circle do?"
runner = CliRunner()


@pytest.fixture(scope="module")
def video(make_video):
    return make_video(frames=16, size=(96, 64), fps=8.0, pattern="moving")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def expected(pipe, video):
    """Answers computed with the library directly: what the CLI must reproduce."""
    prepared = pipe.prepare_video(video, SamplingOptions(frames=FRAMES))
    gen = GenerationOptions(max_new_tokens=NEW_TOKENS)
    return {
        "balanced": pipe.ask(prepared, QUESTION, get_preset("balanced"), gen).text,
        "none": pipe.ask(prepared, QUESTION, None, gen).text,
    }


def ask(tiny_model_dir, video, *extra):
    args = ["ask", str(video), QUESTION, "-m", str(tiny_model_dir), "--frames", str(FRAMES)]
    args += ["--max-new-tokens", str(NEW_TOKENS), *[str(e) for e in extra]]
    return runner.invoke(app, args)


def _json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1  # one object, one line
    return json.loads(result.stdout)


def test_ask_streams_the_answer_to_stdout_and_reports_on_stderr(tiny_model_dir, video, expected):
    result = ask(tiny_model_dir, video)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected["balanced"] + "\n"
    for needle in ("Visual tokens", "time to first token", "Prefill FLOPs", "decode speed", "peak memory"):
        assert needle in result.stderr


def test_ask_json_schema(tiny_model_dir, video, expected):
    record = _json(ask(tiny_model_dir, video, "--json"))
    required = {"answer", "question", "model", "config", "video", "tokens", "flops", "timings"}
    assert required | {"peak_memory_bytes", "versions"} <= set(record)
    assert record["answer"] == expected["balanced"] and record["question"] == QUESTION
    assert record["config"] == HoliTomConfig(retain_ratio=0.2, tau=0.8).to_dict()
    assert record["model"]["name"] == str(tiny_model_dir)
    # Video: 16 frames at 8 fps, 4 sampled uniformly with the reference's integer linspace.
    v = record["video"]
    indices = np.linspace(0, 15, FRAMES, dtype=int).tolist()
    assert v["frame_indices"] == indices == [0, 5, 10, 15]
    assert v["timestamps"] == pytest.approx([i / 8.0 for i in indices])
    assert v["fps"] == pytest.approx(8.0) and v["duration"] == pytest.approx(2.0)
    assert v["path"] == str(video)
    tok = record["tokens"]
    assert set(tok) == {"input", "after_temporal", "into_llm", "after_inner"}
    assert tok["input"] == FRAMES * TOKENS_PER_FRAME
    assert tok["input"] >= tok["after_temporal"] >= tok["into_llm"] - 1
    # Inner merge at the automatic layer: round(0.64 * 6 layers) = 4; it removes visual tokens.
    assert record["inner"]["layer"] == round(0.64 * 6) == 4
    assert tok["after_inner"] < tok["into_llm"]
    fl = record["flops"]
    assert fl["ratio"] == pytest.approx(fl["holitom"] / fl["baseline"])
    assert 0 < fl["holitom"] < fl["baseline"]
    paper = fl["paper_formula"]
    assert set(paper) == {"baseline", "holitom", "ratio"} and paper["holitom"] < paper["baseline"]
    t = record["timings"]
    for key in ("decode_video_s", "vision_s", "compress_s", "prefill_s", "ttft_s", "decode_tokens_per_s"):
        assert isinstance(t[key], float) and t[key] >= 0, key
    assert t["ttft_s"] >= t["vision_s"] + t["compress_s"] + t["prefill_s"] - 1e-9
    assert isinstance(record["peak_memory_bytes"], int) and record["peak_memory_bytes"] > 0
    assert record["versions"]["holitom"] and record["versions"]["torch"]
    assert "baseline" not in record


def test_every_json_key_is_documented(tiny_model_dir, video):
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "json-schema.md").read_text()
    record = _json(ask(tiny_model_dir, video, "--json", "--compare-baseline"))
    for key in record:
        assert f"`{key}`" in doc, key
    for section in ("video", "tokens", "timings", "speedup"):
        for key in record[section]:
            assert f"`{key}`" in doc, f"{section}.{key}"


def test_no_compress_runs_the_full_model(tiny_model_dir, video, expected):
    record = _json(ask(tiny_model_dir, video, "--json", "--no-compress"))
    assert record["config"] is None and record["inner"] is None
    n = FRAMES * TOKENS_PER_FRAME
    assert record["tokens"] == {"input": n, "after_temporal": n, "into_llm": n + 1, "after_inner": n + 1}
    assert record["answer"] == expected["none"]
    assert record["flops"]["ratio"] == pytest.approx(1.0)


def test_compare_baseline_json(tiny_model_dir, video, expected):
    record = _json(ask(tiny_model_dir, video, "--json", "--compare-baseline", "--repeats", "1"))
    assert record["answer"] == expected["balanced"]
    base = record["baseline"]
    assert base["answer"] == expected["none"]
    assert base["tokens"]["into_llm"] == FRAMES * TOKENS_PER_FRAME + 1
    up = record["speedup"]
    # one run each: the median of one pair is that pair's ratio, and the spread is that one value
    assert up["repeats"] == 1
    assert up["ttft"] == pytest.approx(base["timings"]["ttft_s"] / record["timings"]["ttft_s"])
    assert up["spread"]["ttft"] == [pytest.approx(up["ttft"])] * 2
    assert up["prefill_flops"] == pytest.approx(base["flops"]["holitom"] / record["flops"]["holitom"])
    assert up["prefill_flops"] > 1


def test_compare_baseline_shows_both_answers_and_a_table(tiny_model_dir, video, expected):
    result = ask(tiny_model_dir, video, "--compare-baseline", "--repeats", "2")
    assert result.exit_code == 0, result.stderr
    # the full model runs first in each interleaved pair; the first answer of each side is streamed
    assert result.stdout == expected["none"] + "\n\n" + expected["balanced"] + "\n"
    assert "Full model vs HoliTom" in result.stderr and "time to first token" in result.stderr
    assert "median of 2 interleaved runs" in result.stderr


def test_compression_and_frame_options_reach_the_pipeline(tiny_model_dir, video):
    record = _json(
        ask(tiny_model_dir, video, "--json", "-p", "fast", "--retain-ratio", 0.5, "--tau", 0.9, "--no-inner")
    )
    assert record["config"] == HoliTomConfig(retain_ratio=0.5, tau=0.9, inner=False).to_dict()
    assert record["inner"] is None and record["tokens"]["after_inner"] == record["tokens"]["into_llm"]
    args = ["ask", str(video), QUESTION, "-m", str(tiny_model_dir), "--fps", "2", "--max-frames", "3"]
    record = _json(runner.invoke(app, [*args, "--max-new-tokens", "2", "--json", "--inner-layer", "2"]))
    # 16 frames at 8 fps sampled at 2 fps = every 4th frame (4 frames), capped to 3 frames.
    assert len(record["video"]["frame_indices"]) == 3
    assert record["inner"]["layer"] == 2 and record["config"]["inner_layer"] == 2


def test_explain_writes_a_merge_map(tiny_model_dir, video, tmp_path):
    from PIL import Image

    out = tmp_path / "map.png"
    record = _json(ask(tiny_model_dir, video, "--json", "--explain", out))
    assert record["merge_map"] == str(out)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_quiet_prints_no_report(tiny_model_dir, video, expected):
    result = ask(tiny_model_dir, video, "--quiet")
    assert result.exit_code == 0
    assert result.stdout == expected["balanced"] + "\n"
    assert "Visual tokens" not in result.stderr and "Loading" not in result.stderr


def test_corrupt_video_is_a_clean_error(tiny_model_dir, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    result = ask(tiny_model_dir, bad)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-2].startswith("Error: ")
    assert "Hint: " in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_inner_layer_beyond_the_model_is_a_clean_error(tiny_model_dir, video):
    result = ask(tiny_model_dir, video, "--inner-layer", 99)
    assert result.exit_code == 1 and "inner_layer" in result.stderr and "Traceback" not in result.stderr
