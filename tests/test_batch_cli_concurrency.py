"""Real processes on one output file (issue 9): one writer at a time, and resume after repeated kill -9.

No timing is asserted: the first run is frozen with SIGSTOP while it holds the file, so the second run can
only end by refusing (if it waited for the lock it would wait forever, and the hang guard would fail it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What moves?", "How many shapes are there?"]
HANG_GUARD_S = 300  # not a timing assertion: only keeps a hang from blocking the suite forever


def _cmd(model_dir: Path, folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "holitom_cli", "batch", str(folder), "-o", str(out), "-m", str(model_dir),
            "--device", "cpu", "-q", QUESTIONS[0], "-q", QUESTIONS[1], "--frames", "4",
            "--max-new-tokens", "3", "--quiet"]  # fmt: skip


def _start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="backslashreplace")  # fmt: skip


def _videos(folder: Path, make_video, count: int) -> list[Path]:
    folder.mkdir()
    patterns = ["moving", "static-left", "static", "moving"]
    return [make_video(frames=12, pattern=patterns[i % 4], path=folder / f"clip{i}.mp4").resolve()
            for i in range(count)]  # fmt: skip


def _wait_for_lines(proc: subprocess.Popen, out: Path, lines: int) -> bool:
    """Poll until ``out`` has ``lines`` complete lines (True) or the run ended (False)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= lines:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    pytest.fail("batch wrote nothing in time")


def _records(out: Path) -> list[dict]:
    data = out.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


@pytest.mark.slow
def test_a_second_run_on_the_same_output_fails_at_once_naming_the_first(tiny_model_dir, make_video, tmp_path):
    videos = _videos(tmp_path / "videos", make_video, 3)
    out = tmp_path / "out.jsonl"
    cmd = _cmd(tiny_model_dir, tmp_path / "videos", out)
    first = _start(cmd)
    try:
        assert _wait_for_lines(first, out, 1), first.stderr.read()
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the lock, in the middle of its work
        held = out.read_bytes()
        second = _start(cmd)
        try:
            _, err = second.communicate(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            second.kill()
            pytest.fail("the second run waited for the lock instead of failing at once")
        assert second.returncode == 1, err
        first_line = err.splitlines()[0]
        assert first_line.startswith("Error: ") and f"pid {first.pid}" in first_line, err
        assert "being written by another holitom batch" in first_line
        assert out.read_bytes() == held  # the second run wrote nothing
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=HANG_GUARD_S)
    assert first.returncode == 0, err
    records = _records(out)
    assert Counter((r["video"]["path"], r["question"]) for r in records) == Counter(
        {(str(v), q): 1 for v in videos for q in QUESTIONS}
    )  # complete, every item exactly once
    assert all(r["error"] is None for r in records)
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "videos"]  # no lock or temporary file left


@pytest.mark.slow
def test_resume_after_repeated_kill_9_keeps_every_complete_line(tiny_model_dir, make_video, tmp_path):
    videos = _videos(tmp_path / "videos", make_video, 3)
    out = tmp_path / "out.jsonl"
    cmd = _cmd(tiny_model_dir, tmp_path / "videos", out)
    expected = Counter({(str(v), q): 1 for v in videos for q in QUESTIONS})
    kept = b""
    kills = 0
    for attempt in range(len(expected) + 1):  # each run adds at least one line before it is killed
        proc = _start(cmd)
        target = kept.count(b"\n") + 1
        if _wait_for_lines(proc, out, target) and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode in (0, -signal.SIGKILL), err  # never refused: a killed run leaves no lock
        data = out.read_bytes()
        assert data.startswith(kept)  # no complete line ever removed or changed
        complete = data[: data.rfind(b"\n") + 1]
        if proc.returncode == 0:
            break
        if attempt % 2 == 0:  # the worst a kill can do mid-write: a torn last line, redone by the next run
            with open(out, "ab") as fh:
                fh.write(b'{"schema_version": 1, "question": "What moves?", "video": {"pa')
        kept = complete
    else:
        pytest.fail("the batch never finished")
    assert kills >= 2
    records = _records(out)
    assert Counter((r["video"]["path"], r["question"]) for r in records) == expected
    assert all(r["error"] is None for r in records)
