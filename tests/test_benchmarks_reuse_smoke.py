"""Smoke test of ``benchmarks/reuse.py`` (the second-question benchmark of issue 11) on the tiny random model.

The script runs end to end on 4 frames, writes its JSON and markdown, and what it records is checked against
an independent computation: a separately loaded pipeline, without prefix reuse or the video cache, answers
both questions cold, and every arm's greedy token ids must be those. The reuse bookkeeping must say what each
arm is (prefix KV reused only in C and F+, the video reused in C, D, E and F, a cache hit in E), and each
TTFT must be the sum of its measured parts. Timings themselves are not asserted (no timed unit tests).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARMS = ["A", "B", "C", "D", "E", "F+", "F-"]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def result(tiny_model_dir: Path, make_video, tmp_path_factory) -> tuple[dict, Path]:
    from benchmarks import reuse

    out = tmp_path_factory.mktemp("reuse-out")
    video = make_video(frames=24, size=(96, 64), pattern="moving")
    reuse.main(
        [
            "--shape", "tiny", "--model-dir", str(tiny_model_dir), "--dtype", "float32",
            "--frames", "4", "--repeats", "2", "--cold-repeats", "1", "--new-tokens", str(NEW_TOKENS),
            "--video", str(video), "--cache", str(out), "--video-cache", str(out / "video-cache"),
            "--out", str(out), "--name", "reuse_tiny",
        ]
    )  # fmt: skip
    return json.loads((out / "reuse_tiny.json").read_text()), out


def test_result_files_have_every_arm_and_the_targets(result: tuple[dict, Path]) -> None:
    data, out = result
    rows = {r["arm"]: r for r in data["rows"]}
    assert list(rows) == ARMS
    assert {arm: r["runs"] for arm, r in rows.items()} == {
        "A": 1, "B": 2, "C": 2, "D": 2, "E": 2, "F+": 2, "F-": 1,
    }  # fmt: skip
    assert {arm: len(runs) for arm, runs in data["runs"].items()} == {a: rows[a]["runs"] for a in ARMS}
    assert rows["A"]["ttft_gain_vs_A"] == pytest.approx(1.0)
    assert [t["arm"] for t in data["targets"]["second_question_ttft"]] == ["C", "E"]
    pairs = [(p["with_reuse"], p["without"]) for p in data["targets"]["prefix_reuse_prefill"]]
    assert pairs == [("C", "D"), ("F+", "F-")]
    assert data["frames"] == 4 and data["dtype"] == "float32" and data["preset"] == "balanced"
    assert len(data["preparations"]) == 1 and data["preparations"][0]["vision_s"] > 0
    md = (out / "reuse_tiny.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in md
    assert "Targets (issue 11)" in md


def test_reuse_bookkeeping_says_what_each_arm_is(result: tuple[dict, Path]) -> None:
    data, _ = result
    for arm, runs in data["runs"].items():
        for run in runs:
            reused = run["reused"]
            assert run["new_tokens"] == NEW_TOKENS
            # every arm's TTFT is the sum of its measured parts
            parts = ["decode_video_s", "vision_s", "compress_s", "prompt_s", "prefill_s"]
            assert run["ttft_s"] == pytest.approx(sum(run[k] for k in parts))
            if arm in ("A", "B"):  # cold: a fresh prepared video, its decoding and vision counted
                assert reused == {
                    "compression": False, "video": False, "video_source": None, "prefix_kv_tokens": 0
                }  # fmt: skip
                assert run["vision_s"] > 0 and run["decode_video_s"] > 0
            elif arm in ("C", "F+"):  # the prompt prefix (system turn + video) comes from the first answer
                assert reused["video"] and 0 < reused["prefix_kv_tokens"] < run["prompt_tokens"] - 1
                assert reused["video_source"] == "memory"
                assert run["vision_s"] == 0 and run["decode_video_s"] == 0
            elif arm in ("D", "F-"):
                assert reused["video"] and reused["prefix_kv_tokens"] == 0
                assert run["vision_s"] == 0
            else:  # E: a cache hit, nothing else reused: the compression runs again
                assert reused == {
                    "compression": False, "video": True, "video_source": "cache", "prefix_kv_tokens": 0
                }  # fmt: skip
                assert run["decode_video_s"] == 0
            assert reused["compression"] == (arm in ("C", "D"))
    rows = {r["arm"]: r for r in data["rows"]}
    # with HoliTom the reusable prefix ends after the video: fewer tokens than without it
    assert rows["C"]["prefix_kv_tokens"][0] < rows["F+"]["prefix_kv_tokens"][0]


def test_answers_equal_an_independent_cold_run(tiny_model_dir: Path, result: tuple[dict, Path]) -> None:
    from holitom_cli.compression import PRESETS
    from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions

    data, _ = result
    pipe = Pipeline.load(str(tiny_model_dir), device="cpu", dtype="float32", offline=True)
    pipe.reuse_prefix = False
    pipe.model.model.generation_config.min_new_tokens = NEW_TOKENS  # as the script sets on its instance
    options = GenerationOptions(max_new_tokens=NEW_TOKENS)
    q1, q2 = data["questions"]
    cold = {}
    for name, question, cfg in [
        ("q1", q1, None), ("q1 holitom", q1, PRESETS["balanced"]),
        ("q2", q2, None), ("q2 holitom", q2, PRESETS["balanced"]),
    ]:  # fmt: skip
        video = pipe.prepare_video(data["video"], SamplingOptions(frames=4))  # fresh: nothing shared
        cold[name] = pipe.ask(video, question, cfg, options).token_ids
    expected = {
        "A": cold["q1"], "B": cold["q1 holitom"], "C": cold["q2 holitom"], "D": cold["q2 holitom"],
        "E": cold["q2 holitom"], "F+": cold["q2"], "F-": cold["q2"],
    }  # fmt: skip
    for arm, runs in data["runs"].items():
        for run in runs:
            assert run["token_ids"] == expected[arm], arm
    rows = {r["arm"]: r for r in data["rows"]}
    assert all(rows[arm]["answer_equals_cold"] for arm in ["C", "D", "E", "F+"])
