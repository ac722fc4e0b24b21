"""``holitom batch`` end to end on the tiny checkpoint: folders, manifests, bad files, kills and resumes."""

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
from typer.testing import CliRunner

from holitom_cli.cli.app import app
from holitom_cli.compression import get_preset
from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What moves?", "How many shapes are there?"]
FAST = ["--frames", "4", "--max-new-tokens", "3"]
runner = CliRunner()


def _write_folder(folder: Path, make_video, count: int = 2, corrupt: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    videos = [make_video(frames=12, pattern=p, path=folder / f"clip{i}.mp4") for i, p in
              zip(range(count), ["moving", "static-left", "moving", "static"], strict=False)]  # fmt: skip
    if corrupt:
        (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2048))
        videos.append(folder / "broken.mp4")
    (folder / "notes.txt").write_text("not a video")
    return [v.resolve() for v in videos]


def _read(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line must be valid JSON


def _keys(records: list[dict]) -> Counter:
    return Counter((r["video"]["path"], r["question"]) for r in records)


def _batch(model_dir: Path, *args) -> object:
    return runner.invoke(app, ["batch", *[str(a) for a in args], "-m", str(model_dir), *FAST, "--quiet"])


@pytest.mark.slow
def test_batch_folder_with_a_corrupt_file(tiny_model_dir, make_video, tmp_path, monkeypatch):
    videos = _write_folder(tmp_path / "videos", make_video)
    out = tmp_path / "out.jsonl"
    prepared_paths = []
    real_prepare = Pipeline.prepare_video

    def spy(self, video, sampling=None, **kw):
        prepared_paths.append(Path(video))
        return real_prepare(self, video, sampling, **kw)

    monkeypatch.setattr(Pipeline, "prepare_video", spy)
    args = [tmp_path / "videos", "-q", QUESTIONS[0], "-q", QUESTIONS[1], "-o", out]
    result = _batch(tiny_model_dir, *args)
    assert result.exit_code == 1, result.stderr  # one video failed
    assert result.stdout == ""
    records = _read(out)
    assert _keys(records) == Counter({(str(v), q): 1 for v in videos for q in QUESTIONS})
    # Each video is decoded and encoded once for both questions.
    assert sorted(prepared_paths) == sorted(videos)
    by_key = {(r["video"]["path"], r["question"]): r for r in records}
    broken = str(videos[-1])
    for q in QUESTIONS:
        assert by_key[(broken, q)]["error"] and by_key[(broken, q)]["answer"] is None
    good = [r for r in records if r["video"]["path"] != broken]
    assert all(r["error"] is None and isinstance(r["answer"], str) for r in good)
    ask_keys = {"answer", "question", "model", "config", "video", "tokens", "flops", "timings", "versions"}
    assert all(ask_keys | {"peak_memory_bytes", "error", "settings_hash"} <= set(r) for r in good)
    assert all(set(r["video"]) >= {"path", "frame_indices", "timestamps", "fps", "duration"} for r in records)
    assert len({r["settings_hash"] for r in records}) == 1
    # The answers are the library's answers for the same settings.
    pipe = Pipeline.load(str(tiny_model_dir))
    prepared = real_prepare(pipe, videos[0], SamplingOptions(frames=4))
    direct = pipe.ask(prepared, QUESTIONS[1], get_preset("balanced"), GenerationOptions(max_new_tokens=3))
    assert by_key[(str(videos[0]), QUESTIONS[1])]["answer"] == direct.text

    # Even with --quiet, a one-line summary says how many failed and where to look.
    assert result.stderr.startswith("Error: 2 of 6 item(s) failed"), result.stderr
    assert "'error' field" in result.stderr and "Traceback" not in result.stderr

    # Re-running skips the answered items and retries only the failed ones: their new lines are appended,
    # no line is ever deleted (the last line of an item is the one that counts).
    before = out.read_bytes()
    prepared_paths.clear()
    again = _batch(tiny_model_dir, *args)
    assert again.exit_code == 1
    assert prepared_paths == [videos[-1]]
    assert out.read_bytes().startswith(before)
    records2 = _read(out)
    assert records2[: len(records)] == records
    assert _keys(records2[len(records) :]) == Counter({(broken, q): 1 for q in QUESTIONS})
    assert [r for r in records2 if r["error"] is None] == good


@pytest.mark.slow
def test_batch_manifest_questions_file_compare_baseline_and_settings_change(
    tiny_model_dir, make_video, tmp_path, monkeypatch
):
    folder = tmp_path / "data"
    a, b = _write_folder(folder, make_video, count=2, corrupt=False)
    manifest = folder / "items.csv"
    manifest.write_text(f'video,question\nclip0.mp4,"What is red?"\n{b},\n')
    qfile = tmp_path / "questions.txt"
    qfile.write_text("Describe the video.\n")
    out = tmp_path / "out.jsonl"
    result = _batch(tiny_model_dir, manifest, "--questions", qfile, "-o", out, "--compare-baseline")
    assert result.exit_code == 0, result.stderr
    records = _read(out)
    assert _keys(records) == Counter(
        {(str(a), "What is red?"): 1, (str(a), "Describe the video."): 1, (str(b), "Describe the video."): 1}
    )
    for r in records:
        assert r["error"] is None and isinstance(r["baseline"]["answer"], str)
        assert r["baseline"]["tokens"]["into_llm"] > r["tokens"]["into_llm"]
        assert r["speedup"]["repeats"] == 3  # the default, as in ask
        assert r["preset"] == {"name": "balanced", "custom": False}

    # Everything answered: nothing to do, and the model is not even loaded.
    def never(*a, **k):
        raise AssertionError("nothing to do: the model must not load")

    with monkeypatch.context() as m:
        m.setattr(Pipeline, "load", classmethod(never))
        done = _batch(tiny_model_dir, manifest, "--questions", qfile, "-o", out, "--compare-baseline")
        assert done.exit_code == 0, done.stderr

    # Other settings are other items: all answered again, the old lines kept.
    result = _batch(tiny_model_dir, manifest, "--questions", qfile, "-o", out, "-p", "fastest")
    assert result.exit_code == 0, result.stderr
    records = _read(out)
    assert len(records) == 6 and len({r["settings_hash"] for r in records}) == 2
    assert {r["config"]["retain_ratio"] for r in records[3:]} == {0.10}
    assert {r["preset"]["name"] for r in records[3:]} == {"fastest"}


def test_batch_generation_options_reach_the_records(tiny_model_dir, sample_video, tmp_path):
    """--top-p/--seed/--repeats and a custom preset are recorded as ask records them."""
    out = tmp_path / "out.jsonl"
    args = [sample_video, "-q", "What moves?", "-o", out, "--temperature", "0.7", "--top-p", "0.9"]
    args += ["--seed", "5", "-p", "fast", "--tau", "0.7", "--compare-baseline", "--repeats", "2"]
    result = _batch(tiny_model_dir, *args)
    assert result.exit_code == 0, result.stderr
    (record,) = _read(out)
    assert record["generation"]["top_p"] == 0.9 and record["generation"]["seed"] == 5
    assert record["preset"] == {"name": "fast", "custom": True}
    assert record["speedup"]["repeats"] == 2 and record["schema_version"] >= 1
    bad = _batch(tiny_model_dir, sample_video, "-q", "x", "-o", tmp_path / "b.jsonl", "--top-p", "0.5")
    assert bad.exit_code != 0 and not (tmp_path / "b.jsonl").exists()


def _start_batch(model_dir: Path, folder: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "holitom_cli", "batch", str(folder), "-o", str(out), "-m", str(model_dir)]
    cmd += ["-q", QUESTIONS[0], "-q", QUESTIONS[1], *FAST, "--quiet"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(proc: subprocess.Popen, out: Path, lines: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= lines:
            return
        if proc.poll() is not None:
            pytest.fail(f"batch ended early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("batch wrote nothing in time")


@pytest.mark.slow
def test_batch_killed_with_sigkill_then_resumed(tiny_model_dir, make_video, tmp_path):
    videos = _write_folder(tmp_path / "videos", make_video, count=3, corrupt=False)
    out = tmp_path / "out.jsonl"
    proc = _start_batch(tiny_model_dir, tmp_path / "videos", out)
    _wait_for_lines(proc, out, 2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    killed = out.read_bytes()
    complete = killed.count(b"\n")
    assert 2 <= complete < 6
    # A kill in the middle of a write leaves a torn last line: simulate the worst case on top.
    torn = b'{"question": "What moves?", "video": {"path": "' + str(videos[2]).encode()
    with open(out, "ab") as fh:
        fh.write(torn)

    result = _batch(tiny_model_dir, tmp_path / "videos", "-q", QUESTIONS[0], "-q", QUESTIONS[1], "-o", out)
    assert result.exit_code == 0, result.stderr
    records = _read(out)  # every line valid JSON, torn line gone
    assert _keys(records) == Counter({(str(v), q): 1 for v in videos for q in QUESTIONS})
    assert out.read_bytes().startswith(killed[: killed.rfind(b"\n") + 1])  # finished lines kept as they were
    assert all(r["error"] is None for r in records)


@pytest.mark.slow
def test_batch_ctrl_c_stops_after_the_current_item(tiny_model_dir, make_video, tmp_path):
    videos = _write_folder(tmp_path / "videos", make_video, count=3, corrupt=False)
    out = tmp_path / "out.jsonl"
    proc = _start_batch(tiny_model_dir, tmp_path / "videos", out)
    _wait_for_lines(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    records = _read(out)  # nothing half-written
    assert 1 <= len(records) < 6
    result = _batch(tiny_model_dir, tmp_path / "videos", "-q", QUESTIONS[0], "-q", QUESTIONS[1], "-o", out)
    assert result.exit_code == 0, result.stderr
    assert _keys(_read(out)) == Counter({(str(v), q): 1 for v in videos for q in QUESTIONS})


def test_settings_that_do_not_fit_the_model_fail_once(tiny_model_dir, sample_video, tmp_path):
    out = tmp_path / "out.jsonl"
    result = _batch(tiny_model_dir, sample_video, "-q", "What?", "-o", out, "--inner-layer", 99)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "inner_layer" in result.stderr
    assert out.read_text() == ""  # no error lines for a mistake in the settings
