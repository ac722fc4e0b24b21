"""``holitom chat VIDEO`` (issue 11): a session on one prepared video, scripted over stdin as a user would.

Expected answers come from the pipeline called directly on a freshly prepared video per answer (so nothing
is reused): the session's reuse of the video and of the prompt prefix must not change a token, and
``/history on`` must give the answers of the conversation prompt. Ctrl-C runs as a real SIGINT on a real
process; the terminal path (readline) runs in a pseudo-terminal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from holitom_cli.cli.app import app
from holitom_cli.compression import get_preset
from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions

FRAMES, NEW = 4, 5
Q1, Q2, Q3, Q4 = "What does the red circle do?", "What colour is it?", "Where is the square?", "And then?"
HANG_GUARD_S = 300
runner = CliRunner()


@pytest.fixture(scope="module")
def video(make_video):
    return make_video(frames=16, size=(96, 64), fps=8.0, pattern="moving")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline.load(str(tiny_model_dir))


def cold(pipe, video, question, preset, history=()):
    """The answer of a cold run: a freshly prepared video, nothing reused."""
    prepared = pipe.prepare_video(video, SamplingOptions(frames=FRAMES))
    cfg = get_preset(preset) if preset is not None else None
    options = GenerationOptions(max_new_tokens=NEW)
    if history:
        return pipe.ask(prepared, question, cfg, options, history=history).text
    return pipe.ask(prepared, question, cfg, options).text


def chat(model_dir, video, lines, *extra):
    args = ["chat", str(video), "-m", str(model_dir), "--frames", str(FRAMES), "--max-new-tokens", str(NEW)]
    return runner.invoke(app, [*args, *map(str, extra)], input="".join(f"{line}\n" for line in lines))


def test_scripted_session(tiny_model_dir, video, pipe, tmp_path):
    out = tmp_path / "out.png"
    lines = [Q1, "/preset fastest", Q2, "/history on", Q3, Q4, "/compare", f"/explain {out}", "/quit", Q1]
    result = chat(tiny_model_dir, video, lines, "--repeats", "1")
    assert result.exit_code == 0, result.stderr
    a1 = cold(pipe, video, Q1, "balanced")
    a2 = cold(pipe, video, Q2, "fastest")
    a3 = cold(pipe, video, Q3, "fastest")  # /history on starts the conversation: Q3 has no earlier turn
    a4 = cold(pipe, video, Q4, "fastest", history=[(Q3, a3)])
    b4 = cold(pipe, video, Q4, None, history=[(Q3, a3)])  # /compare: the last question, full model first
    assert result.stdout == f"{a1}\n{a2}\n{a3}\n{a4}\n{b4}\n\n{a4}\n"  # nothing after /quit
    err = result.stderr
    assert "Ready: 4 frames of" in err and "Settings: preset fastest · retain 10%" in err
    assert "Conversation history on" in err and "Full model vs HoliTom" in err
    assert f"Merge map written to {out}" in err and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reports = [line for line in err.splitlines() if "prompt tokens · TTFT" in line]  # one per answer
    assert len(reports) == 5 and "visual tokens into the LLM" in reports[0]
    assert "reused: video (memory)" in reports[1] and " KV" not in reports[1]  # another preset: other span
    assert "reused: video (memory)" in reports[2] and " KV" in reports[2]  # the prefix of Q2's prompt
    assert "Traceback" not in err


def test_end_of_input_ends_the_session(tiny_model_dir, video, pipe):
    result = chat(tiny_model_dir, video, [Q1])  # no /quit: stdin just ends
    assert result.exit_code == 0, result.stderr
    assert result.stdout == cold(pipe, video, Q1, "balanced") + "\n"


def test_compare_before_any_question_applies_to_the_next(tiny_model_dir, video, pipe):
    result = chat(tiny_model_dir, video, ["/compare", Q2, "/quit"], "-p", "fast", "--repeats", "1")
    assert result.exit_code == 0, result.stderr
    assert "The next question will be answered with and without compression" in result.stderr
    expected = f"{cold(pipe, video, Q2, None)}\n\n{cold(pipe, video, Q2, 'fast')}\n"
    assert result.stdout == expected


def test_hints_and_command_errors_keep_the_session(tiny_model_dir, video, pipe):
    lines = ["", "/bogus", "/explain", "/history maybe", "/preset nope", "/preset none", "/compare", "/help"]
    result = chat(tiny_model_dir, video, [*lines, Q1])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == cold(pipe, video, Q1, None) + "\n"  # /preset none: the unmodified model
    err = result.stderr
    for needle in (
        "Type a question about the video, or /help",
        "Error: unknown command /bogus",
        "Error: /explain needs a file name",
        "Error: /history takes on or off",
        "Error: unknown preset 'nope'",
        "Settings: no compression",
        "Error: /compare needs compression",
        "/preset [NAME]",
    ):
        assert needle in err, needle
    assert "Traceback" not in err


def test_bad_options_refused_before_the_model(video):
    result = runner.invoke(app, ["chat", str(video), "-m", "unused", "--frames", "2", "--fps", "1"])
    assert result.exit_code == 1 and "cannot be used together" in result.stderr
    assert "Loading" not in result.stderr


# ------------------------------------------------------------------------------------------- real processes


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "HOLITOM_CACHE": str(tmp_path / "cache")}
    env.pop("HOLITOM_DEBUG", None)
    return env


def _start(model_dir, video, tmp_path, new_tokens: int, **streams) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "holitom_cli", "chat", str(video), "-m", str(model_dir)]
    cmd += ["--frames", str(FRAMES), "--max-new-tokens", str(new_tokens)]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), **streams)
    guard = threading.Timer(HANG_GUARD_S, proc.kill)  # turns a hang into a failure; nothing is timed
    guard.daemon = True
    guard.start()
    return proc


def _wait_for(stream, needle: bytes) -> bytes:
    seen = b""
    while needle not in seen:
        line = stream.readline()
        assert line, f"ended before {needle!r}: {seen!r}"
        seen += line
    return seen


def test_ctrl_c_stops_an_answer_and_the_session_goes_on(tiny_model_dir, video, tmp_path):
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = _start(tiny_model_dir, video, tmp_path, 2000, **pipes)  # a random model's answer runs that long
    try:
        _wait_for(proc.stderr, b"Ready:")
        proc.stdin.write(f"{Q1}\n".encode())
        proc.stdin.flush()
        first = proc.stdout.read(1)  # the answer is streaming
        assert first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"/preset\n/quit\n")
    finally:
        proc.kill()
    err = err.decode(errors="replace")
    assert proc.returncode == 0, err
    assert "(answer stopped)" in err and "Settings: preset balanced" in err
    assert err.index("(answer stopped)") < err.index("Settings:")  # back at the prompt after the stop
    assert "Traceback" not in err and "Interrupted" not in err


def test_ctrl_c_at_the_prompt_ends_cleanly(tiny_model_dir, video, tmp_path):
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = _start(tiny_model_dir, video, tmp_path, NEW, **pipes)
    try:
        _wait_for(proc.stderr, b"Ready:")
        proc.send_signal(signal.SIGINT)  # the session waits for a line on stdin
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    err = err.decode(errors="replace")
    assert proc.returncode == 0, err
    assert out == b"" and "Traceback" not in err


def test_terminal_prompt_with_line_editing_and_a_history_file(tiny_model_dir, video, pipe, tmp_path):
    pytest.importorskip("readline", reason="the terminal path needs Python's readline module")
    import pty

    master, slave = pty.openpty()
    proc = _start(tiny_model_dir, video, tmp_path, NEW, stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    try:
        _wait_for(proc.stderr, b"Ready:")
        os.write(master, f"{Q1}\n/quit\n".encode())
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
        os.close(master)
    text = seen.decode(errors="replace").replace("\r\n", "\n")
    assert proc.returncode == 0, proc.stderr.read().decode(errors="replace")
    assert "> " in text  # the prompt, on the terminal
    control = {c: None for c in range(32) if chr(c) not in "\n\t"} | {127: None}  # dropped on a terminal
    assert cold(pipe, video, Q1, "balanced").translate(control) in text
    history = (tmp_path / "cache" / "chat_history").read_text(encoding="utf-8")
    assert Q1 in history and "/quit" in history
