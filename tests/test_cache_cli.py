"""The video cache through the CLI (issue 11 acceptance): ``ask`` twice, replaced bytes, a damaged entry,
``--no-cache``, an unusable folder, ``batch`` and ``inspect`` through the cache, ``holitom cache list|clear``.

Answers are compared with the library's on the unmodified path (``prepare_video`` + ``ask``, no cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from holitom_cli.cli.app import app
from holitom_cli.compression import get_preset
from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions

FRAMES, NEW = 4, 5
QUESTION = "What does the red circle do?"
runner = CliRunner()


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline.load(str(tiny_model_dir))  # the CLI's defaults (device and dtype auto)


def reference(pipe, video: Path) -> str:
    """The answer without any cache: the vision tower run on the file as it is now."""
    prepared = pipe.prepare_video(video, SamplingOptions(frames=FRAMES))
    return pipe.ask(prepared, QUESTION, get_preset("balanced"), GenerationOptions(max_new_tokens=NEW)).text


def ask_args(model: Path, video: Path, *extra) -> list[str]:
    args = ["ask", str(video), QUESTION, "-m", str(model), "--frames", str(FRAMES)]
    return [*args, "--max-new-tokens", str(NEW), "--json", *map(str, extra)]


def ask(model: Path, video: Path, *extra) -> tuple[dict, str]:
    result = runner.invoke(app, ask_args(model, video, *extra))
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout), result.stderr


def entries(cache: Path) -> list[Path]:
    folder = cache / "videos"
    return sorted(folder.glob("*.hvc")) if folder.exists() else []


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("HOLITOM_CACHE", str(folder))
    return folder


def test_second_ask_process_reuses_the_video(tiny_model_dir, make_video, pipe, cache):
    """The acceptance: two ``holitom ask`` processes on one video with a fresh cache folder."""
    video = make_video(frames=16, fps=8.0)
    env = {**os.environ, "HOLITOM_CACHE": str(cache)}
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "holitom_cli", *ask_args(tiny_model_dir, video)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr
        runs.append(json.loads(proc.stdout))
    first, second = runs
    assert first["reused"]["video"] is False and second["reused"]["video"] is True
    assert first["answer"] == second["answer"] == reference(pipe, video)
    # the vision tower did not run: the time is the cache read's, a small fraction of the first run's
    assert second["timings"]["vision_s"] < 0.5 * first["timings"]["vision_s"]
    assert second["timings"]["decode_video_s"] == 0.0
    assert first["video"] == second["video"]  # same metadata, indices, grid
    assert len(entries(cache)) == 1


def test_replaced_bytes_under_the_same_name_miss(tiny_model_dir, make_video, pipe, cache, tmp_path):
    video = make_video(frames=16, fps=8.0, path=tmp_path / "clip.mp4")
    before, _ = ask(tiny_model_dir, video)
    make_video(frames=20, fps=8.0, pattern="static-left", path=video)  # other bytes, same name
    after, _ = ask(tiny_model_dir, video)
    assert after["reused"]["video"] is False
    assert after["answer"] == reference(pipe, video)
    assert after["video"]["frame_count"] == 20 and before["video"]["frame_count"] == 16
    assert len(entries(cache)) == 2


@pytest.mark.parametrize("keep", [0.5, 0.0, 0.999])
def test_a_truncated_cache_file_gives_the_right_answer(tiny_model_dir, make_video, pipe, cache, keep):
    video = make_video(frames=16, fps=8.0)
    ask(tiny_model_dir, video)
    (entry,) = entries(cache)
    data = entry.read_bytes()
    entry.write_bytes(data[: int(len(data) * keep)])
    result = runner.invoke(app, ask_args(tiny_model_dir, video))
    assert result.exit_code == 0 and "Traceback" not in result.stderr, result.stderr
    record = json.loads(result.stdout)
    assert record["reused"]["video"] is False and record["answer"] == reference(pipe, video)
    warnings = [line for line in result.stderr.splitlines() if "Warning" in line]
    assert len(warnings) == 1 and "damaged video cache entry" in warnings[0], result.stderr
    again, stderr = ask(tiny_model_dir, video)  # rebuilt: the next run hits it
    assert (
        again["reused"]["video"] is True and again["answer"] == record["answer"] and "Warning" not in stderr
    )


def test_no_cache_writes_nothing(tiny_model_dir, make_video, pipe, cache):
    video = make_video(frames=16, fps=8.0)
    record, _ = ask(tiny_model_dir, video, "--no-cache")
    assert record["answer"] == reference(pipe, video) and record["reused"]["video"] is False
    assert not cache.exists()
    ask(tiny_model_dir, video)
    record, _ = ask(tiny_model_dir, video, "--no-cache")  # nor reads
    assert record["reused"]["video"] is False


def test_cache_dir_option_and_an_unusable_folder(tiny_model_dir, make_video, pipe, cache, tmp_path):
    video = make_video(frames=16, fps=8.0)
    other = tmp_path / "elsewhere"
    ask(tiny_model_dir, video, "--cache-dir", other)
    assert len(entries(other)) == 1 and not cache.exists()  # --cache-dir overrides HOLITOM_CACHE
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ask_args(tiny_model_dir, video, "--cache-dir", blocker))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["answer"] == reference(pipe, video)
    warnings = [line for line in result.stderr.splitlines() if "Warning" in line]
    assert len(warnings) == 1 and "video cache off" in warnings[0]


def test_a_bad_cache_size_fails_before_the_model_loads(make_video, cache, tmp_path):
    video = make_video(frames=16, fps=8.0)
    for command in (["ask", str(video), QUESTION], ["inspect", str(video)], ["batch", str(video), "-q", "x",
                    "-o", str(tmp_path / "out.jsonl")]):  # fmt: skip
        result = runner.invoke(app, [*command, "-m", str(tmp_path / "no-model"), "--cache-size", "ten gigs"])
        assert result.exit_code == 1, (command, result.stderr)
        assert result.stderr.startswith("Error: invalid cache size 'ten gigs'"), result.stderr
        assert "Loading" not in result.stderr


def test_batch_prepares_each_video_through_the_cache(tiny_model_dir, make_video, pipe, cache, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    videos = [make_video(frames=16, fps=8.0, path=folder / "a.mp4"),
              make_video(frames=12, pattern="static-left", path=folder / "b.mp4")]  # fmt: skip
    base = ["batch", str(folder), "-q", QUESTION, "-m", str(tiny_model_dir), "--frames", str(FRAMES),
            "--max-new-tokens", str(NEW), "--quiet"]  # fmt: skip
    lines = []
    for name in ("one.jsonl", "two.jsonl"):
        result = runner.invoke(app, [*base, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.stderr
        lines.append([json.loads(x) for x in (tmp_path / name).read_text().splitlines()])
    assert len(entries(cache)) == 2
    assert [r["reused"]["video"] for r in lines[0]] == [False, False]
    assert [r["reused"]["video"] for r in lines[1]] == [True, True]
    expected = {v.name: reference(pipe, v) for v in videos}
    for run in lines:
        assert {Path(r["video"]["path"]).name: r["answer"] for r in run} == expected


def test_inspect_through_the_cache_draws_the_same_picture(tiny_model_dir, make_video, cache, tmp_path):
    video = make_video(frames=16, fps=8.0)
    base = ["inspect", str(video), "-m", str(tiny_model_dir), "--frames", str(FRAMES), "--quiet"]
    pictures = []
    for name, extra in (("one.png", []), ("two.png", []), ("three.png", ["--no-cache"])):
        out = tmp_path / name
        result = runner.invoke(app, [*base, "-o", str(out), *extra])
        assert result.exit_code == 0, result.stderr
        pictures.append(out.read_bytes())
        if name == "two.png":
            assert len(entries(cache)) == 1
    assert pictures[0] == pictures[1] == pictures[2]  # the third: without the cache


def test_cache_list_and_clear(tiny_model_dir, make_video, cache, tmp_path):
    empty = runner.invoke(app, ["cache"])
    assert empty.exit_code == 0 and "0 cached video(s)" in empty.stdout
    video = make_video(frames=16, fps=8.0, path=tmp_path / "my clip.mp4")
    ask(tiny_model_dir, video)
    listed = runner.invoke(app, ["cache", "list", "--json", "--cache-size", "1GB"])
    assert listed.exit_code == 0, listed.stderr
    payload = json.loads(listed.stdout)
    (entry,) = payload["entries"]
    assert payload["folder"] == str(cache / "videos") and payload["max_bytes"] == 10**9
    assert entry["video"] == "my clip.mp4" and entry["model"] == str(tiny_model_dir)
    assert entry["frames"] == FRAMES and entry["size_bytes"] == entries(cache)[0].stat().st_size
    assert payload["total_bytes"] == entry["size_bytes"] and entry["damaged"] is False
    table = runner.invoke(app, ["cache"])
    assert table.exit_code == 0 and "my clip.mp4" in table.stdout and "1 cached video(s)" in table.stdout

    (cache / "videos" / "keep.txt").write_text("not an entry")
    refused = runner.invoke(app, ["cache", "clear"], input="")  # not a terminal: no prompt, no removal
    assert refused.exit_code == 1 and refused.stderr.startswith("Error: ") and len(entries(cache)) == 1
    cleared = runner.invoke(app, ["cache", "clear", "--yes"])
    assert cleared.exit_code == 0 and "Removed 1 cached video(s)" in cleared.stdout
    assert entries(cache) == [] and (cache / "videos" / "keep.txt").exists()


def test_cache_command_refuses_a_folder_that_is_not_ours(tmp_path):
    foreign = tmp_path / "home"
    (foreign / "videos").mkdir(parents=True)
    (foreign / "videos" / ("a" * 40 + ".hvc")).write_text("looks like an entry, is not ours")
    for args in (
        ["cache", "--cache-dir", str(foreign)],
        ["cache", "clear", "--yes", "--cache-dir", str(foreign)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "not a holitom video cache folder" in result.stderr
    assert (foreign / "videos" / ("a" * 40 + ".hvc")).exists()
