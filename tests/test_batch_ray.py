"""``holitom batch --workers 2`` on a local Ray instance with 2 CPUs and the tiny model (issue 12).

What is proven: the answers (greedy) are the single-process batch's on the same items, a corrupt video gives
the same error lines and exit code 1, settings that do not fit the model stop the run once with nothing
written, a worker killed mid-run is restarted by Ray and the run completes with every item once, and a driver
killed with SIGKILL mid-run loses nothing already written: the resumed run finishes with every (video,
question) exactly once, without any of Ray's own messages in the terminal.

The in-process tests share one Ray instance (module fixture: starting Ray takes ~10 s on 2 cores); the kill
test runs the real command in subprocesses, each starting its own private instance, as a user would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from holitom_cli.cli.app import app

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None,
        reason='needs the ray extra (pip install "holitom[ray]"); CI installs it',
    ),
]

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What moves?", "How many shapes are there?"]
FAST = ["--frames", "4", "--max-new-tokens", "3", "--device", "cpu"]
HANG_GUARD_S = 300  # not a timing assertion: only keeps a hang from blocking the suite forever
runner = CliRunner()


def _folder(root: Path, make_video, count: int, corrupt: bool) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    patterns = ["moving", "static-left", "static", "moving"]
    videos = [make_video(frames=12, pattern=patterns[i % 4], path=root / f"clip{i}.mp4").resolve()
              for i in range(count)]  # fmt: skip
    if corrupt:
        broken = root / "broken.mp4"
        broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2048))
        videos.append(broken.resolve())
    return videos


def _args(model_dir: Path, folder: Path, out: Path, *extra) -> list[str]:
    return ["batch", str(folder), "-o", str(out), "-m", str(model_dir), "-q", QUESTIONS[0],
            "-q", QUESTIONS[1], *FAST, *[str(a) for a in extra]]  # fmt: skip


def _read(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def _keys(records: list[dict]) -> Counter:
    return Counter((r["video"]["path"], r["question"]) for r in records)


def _by_key(records: list[dict]) -> dict:
    return {(r["video"]["path"], r["question"]): r for r in records}


@pytest.fixture(scope="module")
def ray_instance():
    """One private Ray instance (2 CPUs, loopback only) for the in-process tests of this module."""
    from holitom_cli.distributed import RayOptions
    from holitom_cli.distributed.ray_batch import _start_ray

    ray, started = _start_ray(RayOptions(workers=2, num_cpus=2), verbose=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def videos(tmp_path_factory, make_video) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("ray_videos") / "videos"
    return folder, _folder(folder, make_video, count=3, corrupt=True)


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, videos, tmp_path_factory) -> list[dict]:
    """The single-process batch's lines for the same items: the reference."""
    out = tmp_path_factory.mktemp("reference") / "single.jsonl"
    result = runner.invoke(app, [*_args(tiny_model_dir, videos[0], out), "--quiet"])
    assert result.exit_code == 1, result.stderr  # the corrupt video
    return _read(out)


def _same_answers(records: list[dict], reference: list[dict]) -> None:
    """Every item exactly once, with the reference's answer, error and measured token counts."""
    assert _keys(records) == _keys(reference) and set(_keys(records).values()) == {1}
    ours, ref = _by_key(records), _by_key(reference)
    for key, r in ref.items():
        mine = ours[key]
        assert set(mine) == set(r), key
        for field in ("answer", "error", "settings_hash", "config", "generation", "tokens", "flops",
                      "video", "new_tokens", "prompt_tokens", "inner", "model", "preset",
                      "schema_version"):  # fmt: skip
            assert mine.get(field) == r.get(field), (key, field)


def test_workers_give_the_single_process_answers_and_errors(
    ray_instance, tiny_model_dir, videos, single_process, tmp_path
):
    out = tmp_path / "ray.jsonl"
    result = runner.invoke(app, _args(tiny_model_dir, videos[0], out, "--workers", 2))
    assert result.exit_code == 1, result.stderr  # the corrupt video, as without --workers
    records = _read(out)
    _same_answers(records, single_process)
    broken = str(videos[1][-1])
    assert all(r["error"] and r["answer"] is None for r in records if r["video"]["path"] == broken)
    assert all(r["error"] is None for r in records if r["video"]["path"] != broken)
    err = result.stderr
    assert "6 answered, 2 failed" in err and "failed broken.mp4: cannot open" in err
    assert "Error: 2 of 8 item(s) failed" in err
    assert "items/min" in err  # the progress bar's throughput
    for noise in ("INFO", "WARNING", "(raylet)", "core_worker", "Traceback"):
        assert noise not in err, err


def test_settings_that_do_not_fit_the_model_fail_once_on_ray(ray_instance, tiny_model_dir, videos, tmp_path):
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, [*_args(tiny_model_dir, videos[0], out, "--workers", 2), "--quiet",
                                 "--inner-layer", 99])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "inner_layer" in result.stderr, result.stderr
    assert out.read_text() == ""  # no error line for a mistake in the settings


def _map_workers(root: int) -> list:
    import psutil

    found = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::MapWorker"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_worker_killed_mid_run_is_retried_and_the_run_completes(
    ray_instance, tiny_model_dir, make_video, tmp_path
):
    # 8 videos for 2 workers, so that work is left when the first answer reaches the file (with the 4 of the
    # module's folder a loaded machine could finish everything before the killer saw that answer)
    folder = tmp_path / "videos"
    _folder(folder, make_video, count=8, corrupt=True)
    reference = tmp_path / "single.jsonl"
    assert runner.invoke(app, [*_args(tiny_model_dir, folder, reference), "--quiet"]).exit_code == 1
    out = tmp_path / "ray.jsonl"
    killed: list[int] = []
    done = threading.Event()

    def killer() -> None:  # once the first answer is on disk, kill every worker process (as soon as seen)
        deadline = time.monotonic() + HANG_GUARD_S
        while not done.is_set() and time.monotonic() < deadline:
            if out.exists() and b'"error": null' in out.read_bytes():
                for proc in _map_workers(os.getpid()):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                if killed:
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = runner.invoke(app, [*_args(tiny_model_dir, folder, out, "--workers", 2), "--quiet"])
    finally:
        done.set()
        thread.join(timeout=10)
    assert killed, "no Ray worker process was found to kill"  # os.kill succeeded: they were running
    assert result.exit_code == 1, result.stderr  # only the corrupt video failed
    _same_answers(_read(out), _read(reference))  # every item exactly once, the same answers


def _start(model_dir: Path, folder: Path, out: Path, quiet: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "holitom_cli", *_args(model_dir, folder, out, "--workers", 2)]
    cmd += ["--quiet"] if quiet else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="backslashreplace")  # fmt: skip


def test_driver_killed_with_sigkill_then_resumed_exactly_once(tiny_model_dir, make_video, tmp_path):
    import psutil

    videos = _folder(tmp_path / "videos", make_video, count=4, corrupt=False)
    out = tmp_path / "out.jsonl"
    proc = _start(tiny_model_dir, tmp_path / "videos", out)
    descendants: list = []
    logs: list[Path] = []
    deadline = time.monotonic() + HANG_GUARD_S
    try:
        while time.monotonic() < deadline:
            with_lines = out.exists() and out.read_bytes().count(b"\n") >= 2
            if with_lines or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1]}"
        driver = psutil.Process(proc.pid)
        descendants = driver.children(recursive=True)
        logs = [Path(f.path) for f in driver.open_files() if Path(f.path).name.startswith("holitom-ray-")]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
        # Ray stops its private instance with the driver, but may leave an idle agent or two: ours, by pid.
        _, alive = psutil.wait_procs(descendants, timeout=20)
        for leftover in alive:
            leftover.kill()
        for log in logs:  # the killed driver could not remove its log of Ray's messages
            log.unlink(missing_ok=True)
    killed = out.read_bytes()
    complete = killed.count(b"\n")
    assert 2 <= complete < 8
    # A kill in the middle of a write would leave a torn last line: simulate the worst case on top.
    with open(out, "ab") as fh:
        fh.write(b'{"schema_version": 1, "question": "What moves?", "video": {"path": "' + bytes(videos[0]))

    resumed = _start(tiny_model_dir, tmp_path / "videos", out, quiet=False)
    try:
        _, err = resumed.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        resumed.kill()
        pytest.fail("the resumed run did not finish")
    assert resumed.returncode == 0, err
    records = _read(out)  # every line valid JSON, the torn line gone
    assert _keys(records) == Counter({(str(v), q): 1 for v in videos for q in QUESTIONS})
    assert all(r["error"] is None for r in records)
    assert out.read_bytes().startswith(killed)  # the lines written before the kill, kept as they were
    assert "Cut off the incomplete last line" in err
    assert f"{8 - complete} item(s) to answer over" in err and f"{complete} already in" in err
    assert f"{8 - complete} answered, 0 failed" in err
    ours = ("Cut off", "item(s) to answer", "answered,", "items/min")
    for line in err.splitlines():  # nothing of Ray's own in the terminal: only our messages and progress
        assert any(mark in line for mark in ours) or not line.strip(), line
