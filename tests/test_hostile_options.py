"""Out-of-range options and oversized questions (issue 9), through the real Typer app, in-process.

Each case must give one ``Error:`` line naming the option and a ``Hint:`` line, exit code 1, before any work:
``Pipeline.load`` is replaced by a function that fails the test if it is ever reached.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from holitom_cli.cli.app import app
from holitom_cli.cli.errors import BROKEN_PIPE_EXIT, exit_code_for, one_line
from holitom_cli.cli.settings import (
    build_config,
    check_command_inputs,
    check_question_text,
    sampling_options,
)
from holitom_cli.errors import ConfigError
from holitom_cli.limits import DEFAULT_FPS_MAX_FRAMES, MAX_FRAMES, MAX_NEW_TOKENS, MAX_QUESTION_CHARS

runner = CliRunner()


@pytest.fixture
def no_model(monkeypatch):
    from holitom_cli.pipeline import Pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the input could be refused before")

    monkeypatch.setattr(Pipeline, "load", classmethod(refuse))


def _assert_refused(result, needle: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("Error: ") and needle in lines[0], result.stderr
    assert lines[1].startswith("Hint: "), result.stderr
    assert result.stdout == ""


CASES = {
    "frames-cap": (["--frames", "100000"], f"at most {MAX_FRAMES}"),
    "frames-cap+1": (["--frames", str(MAX_FRAMES + 1)], "--frames"),
    "max-frames-cap": (["--fps", "1", "--max-frames", "100000"], f"at most {MAX_FRAMES}"),
    "fps-nan": (["--fps", "nan"], "--fps"),
    "fps-inf": (["--fps", "inf"], "--fps"),
    "fps-zero": (["--fps", "0"], "--fps"),
    "tau-negative": (["--tau", "-1"], "--tau"),
    "tau-above-1": (["--tau", "1.5"], "--tau"),
    "tau-nan": (["--tau", "nan"], "--tau"),
    "retain-zero": (["--retain-ratio", "0"], "--retain-ratio"),
    "retain-above-1": (["--retain-ratio", "1.01"], "--retain-ratio"),
    "retain-inf": (["--retain-ratio", "inf"], "--retain-ratio"),
    "prune-one": (["--inner-prune-ratio", "1"], "--inner-prune-ratio"),
    "prune-negative": (["--inner-prune-ratio", "-0.1"], "--inner-prune-ratio"),
    "inner-layer-zero": (["--inner-layer", "0"], "--inner-layer"),
    "max-new-tokens-cap": (["--max-new-tokens", str(MAX_NEW_TOKENS + 1)], f"at most {MAX_NEW_TOKENS}"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_out_of_range_options_of_ask(case, sample_video, tiny_model_dir, no_model):
    extra, needle = CASES[case]
    args = ["ask", str(sample_video), "What happens?", "--model", str(tiny_model_dir), *extra]
    _assert_refused(runner.invoke(app, args), needle)


def test_out_of_range_options_of_inspect_and_batch(sample_video, tiny_model_dir, tmp_path, no_model):
    model = ["--model", str(tiny_model_dir)]
    _assert_refused(runner.invoke(app, ["inspect", str(sample_video), "--tau", "-1", *model]), "--tau")
    out = ["-o", str(tmp_path / "answers.jsonl")]
    batch = ["batch", str(sample_video), "-q", "x" * (MAX_QUESTION_CHARS + 1), *out, *model]
    _assert_refused(runner.invoke(app, batch), f"{MAX_QUESTION_CHARS:,}")
    assert not (tmp_path / "answers.jsonl").exists()
    # questions read from a file (and manifests) get the same bound as -q
    qfile = tmp_path / "questions.txt"
    qfile.write_text("What moves?\n" + "y" * (MAX_QUESTION_CHARS + 1) + "\n", encoding="utf-8")
    batch = ["batch", str(sample_video), "--questions", str(qfile), *out, *model]
    _assert_refused(runner.invoke(app, batch), f"{MAX_QUESTION_CHARS:,}")
    assert not (tmp_path / "answers.jsonl").exists()


@pytest.mark.parametrize(
    ("question", "needle"),
    [("a" * 100_000, f"{MAX_QUESTION_CHARS:,}"), ("what\udcff?", "UTF-8"), ("\udce9t\udce9", "UTF-8")],
    ids=["100k-chars", "undecodable-byte", "latin-1-bytes"],
)
def test_questions_refused_before_any_work(question, needle, sample_video, tiny_model_dir, no_model):
    result = runner.invoke(app, ["ask", str(sample_video), question, "--model", str(tiny_model_dir)])
    _assert_refused(result, needle)


def test_usage_errors_keep_exit_code_2(sample_video, no_model):
    for extra in (["--max-new-tokens", "-5"], ["--temperature", "nan"], ["--frames", "0"]):
        result = runner.invoke(app, ["ask", str(sample_video), "q", *extra])
        assert result.exit_code == 2, (extra, result.stderr)
        assert "Traceback" not in result.stderr


def test_boundaries_are_accepted():
    assert build_config(tau=0.0).tau == 0.0 and build_config(tau=1.0).tau == 1.0
    assert build_config(retain_ratio=1.0).retain_ratio == 1.0
    assert build_config(inner_prune_ratio=0.0).inner_prune_ratio == 0.0
    assert sampling_options(frames=MAX_FRAMES).frames == MAX_FRAMES
    assert sampling_options(fps=1.0, max_frames=MAX_FRAMES).max_frames == MAX_FRAMES
    check_question_text("q" * MAX_QUESTION_CHARS)
    check_command_inputs({"question": "ünïcødé 😀", "max_new_tokens": MAX_NEW_TOKENS})


def test_fps_without_max_frames_gets_the_default_cap():
    assert sampling_options(fps=1e9).max_frames == DEFAULT_FPS_MAX_FRAMES
    assert sampling_options(fps=2.0, max_frames=7).max_frames == 7


def test_every_question_of_a_list_is_checked():
    check_command_inputs({"question": None, "questions_file": None})
    with pytest.raises(ConfigError, match="UTF-8"):
        check_command_inputs({"question": ["fine", "bad\udcff"]})


def test_error_lines_are_printable():
    assert one_line("clip\udcff.mp4\nsecond  line\x1b[31m") == "clip\\xff.mp4 second line\\x1b[31m"


def test_broken_pipe_is_quiet_and_141(capsys):
    assert exit_code_for(BrokenPipeError()) == BROKEN_PIPE_EXIT == 141
    assert capsys.readouterr().err == ""
