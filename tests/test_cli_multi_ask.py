"""``holitom ask VIDEO Q1 Q2 ...`` (issue 11): several questions in one call, through the real CLI.

The expected answers are separate one-question runs with ``--no-cache`` (a fresh pipeline each: nothing is
reused), so the reuse inside one call (the prepared video, the prompt prefix's KV) must not change a token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from holitom_cli.cli.app import app
from holitom_cli.limits import MAX_ASK_QUESTIONS, MAX_QUESTION_CHARS

FRAMES, NEW = 4, 5
QUESTIONS = ["What does the red circle do?", "What colour is the square?", "How many objects are there?"]
runner = CliRunner()


@pytest.fixture(scope="module")
def video(make_video):
    return make_video(frames=16, size=(96, 64), fps=8.0, pattern="moving")


def ask(model_dir, video, *args):
    base = ["ask", str(video), *map(str, args), "-m", str(model_dir), "--frames", str(FRAMES)]
    return runner.invoke(app, [*base, "--max-new-tokens", str(NEW)])


def json_lines(result) -> list[dict]:
    assert result.stdout.endswith("\n"), result.stdout
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def cold(tiny_model_dir, video) -> dict[str, dict]:
    """Each question alone, in its own run without the video cache: the reference answers."""
    out = {}
    for question in QUESTIONS:
        result = ask(tiny_model_dir, video, question, "--json", "--no-cache")
        assert result.exit_code == 0, result.stderr
        (out[question],) = json_lines(result)
    return out


def test_several_questions_give_one_json_line_each_equal_to_cold_runs(tiny_model_dir, video, cold):
    result = ask(tiny_model_dir, video, *QUESTIONS, "--json", "--no-cache")
    assert result.exit_code == 0, result.stderr
    records = json_lines(result)
    assert [r["question"] for r in records] == QUESTIONS
    for record in records:
        expected = cold[record["question"]]
        assert record["answer"] == expected["answer"]
        assert record["tokens"] == expected["tokens"] and record["prompt_tokens"] == expected["prompt_tokens"]
        assert "error" not in record
    first, second, third = (r["reused"] for r in records)
    # the first question prepared the video (no cache): nothing reused; the later ones reuse it from memory
    assert first["video"] is False and first["prefix_kv_tokens"] == 0 and first["video_source"] is None
    assert second["video"] is True and second["video_source"] == "memory"
    assert second["vision_s_saved"] == pytest.approx(records[0]["timings"]["vision_s"])
    # the questions share the prompt up to the question: the second one reuses that prefix's KV
    assert 0 < second["prefix_kv_tokens"] < records[1]["prompt_tokens"]
    assert third["prefix_kv_tokens"] > 0
    for record in (cold[q] for q in QUESTIONS):  # a cold run reuses nothing
        assert record["reused"]["video"] is False and record["reused"]["prefix_kv_tokens"] == 0


def test_text_output_blank_line_between_answers_reports_and_summary(tiny_model_dir, video, cold):
    result = ask(tiny_model_dir, video, *QUESTIONS[:2])
    assert result.exit_code == 0, result.stderr
    answers = [cold[q]["answer"] for q in QUESTIONS[:2]]
    assert result.stdout == answers[0] + "\n\n" + answers[1] + "\n"
    err = result.stderr
    assert "Question 1 of 2: " + QUESTIONS[0] in err and "Question 2 of 2: " + QUESTIONS[1] in err
    assert err.count("Visual tokens") == 2 and "Summary" in err
    assert "Reused: the prepared video from memory (vision tower not run:" in err
    assert "prompt positions from an earlier question" in err


def test_questions_file_after_the_dash_q_ones(tiny_model_dir, video, cold, tmp_path):
    qfile = tmp_path / "questions.txt"
    qfile.write_text(f"\n{QUESTIONS[1]}\n   \n{QUESTIONS[2]}\n", encoding="utf-8")  # blank lines ignored
    result = ask(tiny_model_dir, video, "-q", QUESTIONS[0], "--questions", qfile, "--json")
    assert result.exit_code == 0, result.stderr
    records = json_lines(result)
    assert [r["question"] for r in records] == QUESTIONS
    assert [r["answer"] for r in records] == [cold[q]["answer"] for q in QUESTIONS]


def test_repeated_dash_q(tiny_model_dir, video, cold):
    result = ask(tiny_model_dir, video, "-q", QUESTIONS[2], "-q", QUESTIONS[0], "--json")
    assert result.exit_code == 0, result.stderr
    assert [r["answer"] for r in json_lines(result)] == [
        cold[QUESTIONS[2]]["answer"],
        cold[QUESTIONS[0]]["answer"],
    ]


@pytest.fixture
def no_model(monkeypatch):
    from holitom_cli.pipeline import Pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the input could be refused before")

    monkeypatch.setattr(Pipeline, "load", classmethod(refuse))


def _refused(result, needle: str) -> None:
    """Exit 1, ``Error: ...`` naming ``needle`` and a ``Hint:``, nothing else on stderr or stdout."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("Error: ") and needle in lines[0], lines[0]
    assert lines[1].startswith("Hint: ")
    assert result.stdout == ""


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make_args", "needle"),
    [
        (lambda t: ["q1", "   ", "q3"], "question 2 is empty"),
        (
            lambda t: ["q1", "y" * (MAX_QUESTION_CHARS + 1)],
            f"question 2 is {MAX_QUESTION_CHARS + 1:,} characters",
        ),
        (lambda t: ["q1", "--questions", t / "missing.txt"], "cannot read questions file"),
        (
            lambda t: ["q1", "--questions", _file(t, "latin1.txt", b"ok\ncaf\xe9?\n")],
            "not valid UTF-8 (line 2",
        ),
        (lambda t: ["q1", "--questions", _file(t, "blank.txt", b"\n  \n")], "is empty"),
        (
            lambda t: [
                "--questions",
                _file(t, "long.txt", b"fine\n" + b"z" * (MAX_QUESTION_CHARS + 1) + b"\n"),
            ],
            f"question 2 is {MAX_QUESTION_CHARS + 1:,} characters",
        ),
        (
            lambda t: ["--questions", _file(t, "many.txt", b"q?\n" * (MAX_ASK_QUESTIONS + 1))],
            f"more than the limit of {MAX_ASK_QUESTIONS:,}",
        ),
    ],
    ids=[
        "empty-question",
        "too-long",
        "missing-file",
        "not-utf8-file",
        "blank-file",
        "too-long-in-file",
        "too-many",
    ],
)
def test_bad_questions_among_several_refused_before_the_model(make_args, needle, video, tmp_path, no_model):
    result = runner.invoke(app, ["ask", str(video), *map(str, make_args(tmp_path)), "-m", "unused"])
    _refused(result, needle)


def test_questions_as_arguments_and_dash_q_is_a_usage_error(video):
    result = runner.invoke(app, ["ask", str(video), "q1", "-q", "q2"])
    assert result.exit_code == 2 and "not both" in result.output


def test_one_failing_question_is_reported_and_the_others_answered(tiny_model_dir, video, cold, monkeypatch):
    import holitom_cli.pipeline as pipeline

    # A context that holds the first question's prompt and answer exactly, so a slightly longer question does
    # not fit with the video (alone it still fits: it passes the check before the video work).
    context = cold[QUESTIONS[0]]["prompt_tokens"] + NEW
    monkeypatch.setattr(pipeline, "context_length", lambda model: context)
    long_question = QUESTIONS[0] + " Why?"
    result = ask(tiny_model_dir, video, QUESTIONS[0], long_question, QUESTIONS[0], "--json")
    assert result.exit_code == 1, result.stderr
    first, failed, third = json_lines(result)
    assert first["answer"] == third["answer"] == cold[QUESTIONS[0]]["answer"]
    assert failed["question"] == long_question and failed["answer"] is None
    assert f"more than the model's context of {context:,} tokens" in failed["error"]
    assert failed["video"]["frame_indices"] == first["video"]["frame_indices"] and "tokens" not in failed
    err = result.stderr
    assert "Error: question 2: the prompt needs" in err and "Error: 1 of 3 questions failed" in err
    assert "Traceback" not in err


def test_compare_baseline_per_question(tiny_model_dir, video, cold):
    result = ask(tiny_model_dir, video, *QUESTIONS[:2], "--json", "--compare-baseline", "--repeats", "1")
    assert result.exit_code == 0, result.stderr
    records = json_lines(result)
    for record, question in zip(records, QUESTIONS[:2], strict=True):
        none = json_lines(ask(tiny_model_dir, video, question, "--json", "--no-compress", "--no-cache"))[0]
        assert record["answer"] == cold[question]["answer"]
        assert record["baseline"]["answer"] == none["answer"]
        assert record["speedup"]["repeats"] == 1


def test_explain_with_several_questions_writes_one_picture(tiny_model_dir, video, tmp_path):
    out = tmp_path / "map.png"
    result = ask(tiny_model_dir, video, *QUESTIONS[:2], "--json", "--explain", out)
    assert result.exit_code == 0, result.stderr
    assert [r["merge_map"] for r in json_lines(result)] == [str(out)] * 2
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stderr.count("Merge map written to") == 1


def test_second_call_takes_the_video_from_the_cache(tiny_model_dir, video, cold, tmp_path):
    cache = ["--cache-dir", tmp_path / "cache"]
    (first,) = json_lines(ask(tiny_model_dir, video, QUESTIONS[0], "--json", *cache))
    second, third = json_lines(ask(tiny_model_dir, video, QUESTIONS[0], QUESTIONS[1], "--json", *cache))
    assert first["reused"]["video"] is False
    assert second["reused"]["video"] is True and second["reused"]["video_source"] == "cache"
    # the vision tower's time kept in the entry, minus the read: what the hit saved
    saved = second["reused"]["vision_s_saved"]
    assert 0 <= saved <= first["timings"]["vision_s"]
    assert saved == pytest.approx(third["reused"]["vision_s_saved"] - second["timings"]["vision_s"], abs=1e-6)
    assert second["answer"] == first["answer"] == cold[QUESTIONS[0]]["answer"]
    assert third["answer"] == cold[QUESTIONS[1]]["answer"] and third["reused"]["prefix_kv_tokens"] > 0
    assert third["reused"]["video_source"] == "memory"  # read from the cache once, then reused in memory


# ------------------------------------------------------------------------------------------- Qwen2.5-VL


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    from holitom_cli.models.random_qwen import save_random_qwen

    return save_random_qwen(tmp_path_factory.mktemp("qwen-multi") / "tiny", "qwen2_5_vl-tiny")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--no-inner"], ["--no-compress"]], ids=["inner", "no-inner", "full"])
def test_qwen_several_questions_equal_cold_runs(qwen_dir, make_video, extra):
    clip = make_video(frames=24, size=(160, 96), fps=12.0, pattern="moving")
    args = ["--json", "--no-cache", *extra]
    lines = json_lines(ask(qwen_dir, clip, *QUESTIONS[:2], *args))
    for record, question in zip(lines, QUESTIONS[:2], strict=True):
        (alone,) = json_lines(ask(qwen_dir, clip, question, *args))
        assert record["answer"] == alone["answer"] and record["tokens"] == alone["tokens"]
    assert lines[0]["model"]["family"] == "qwen2_5_vl"
    assert lines[1]["reused"]["video"] is True and lines[1]["reused"]["prefix_kv_tokens"] > 0


@pytest.mark.parametrize("count", [1, 2])
def test_a_picture_that_cannot_be_written_never_loses_the_answers(tiny_model_dir, video, cold, count):
    """(review of issue 11) /proc refuses new files: the check before the model passes (the folder exists),
    the write after the answer fails. The answers are still printed; the picture's error says what failed."""
    result = ask(tiny_model_dir, video, *QUESTIONS[:count], "--json", "--explain", "/proc/holitom-map.png")
    assert result.exit_code == 1
    records = json_lines(result)
    assert [r["answer"] for r in records] == [cold[q]["answer"] for q in QUESTIONS[:count]]
    assert records[0].get("merge_map") is None and "merge map" in records[0]["merge_map_error"]
    assert "Traceback" not in result.stderr and "Error:" in result.stderr
