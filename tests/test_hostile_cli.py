"""Hostile inputs on the real command line (issue 9): ``python -m holitom_cli ...`` as a subprocess.

The promise: every bad input gives one ``Error: ...`` line plus a ``Hint: ...`` line and exit code 1 (usage
errors: Typer's usage message, exit code 2), never a traceback, a signal or a hang; inputs that can be checked
without the model are refused before it loads (no "Loading ..." line). The subprocess ``timeout`` only turns
a hang into a failure; no test asserts on time. Option ranges are checked in-process
(test_hostile_options.py): only what involves the process itself (files, argv bytes, signals, pipes) runs as
a subprocess here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 300


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("HOLITOM_DEBUG", None)
    return env


def _holitom(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "holitom_cli", *[a if isinstance(a, bytes) else str(a) for a in args]],
        capture_output=True,
        cwd=cwd,
        env=_env(),
        timeout=HANG_GUARD_S,
    )


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _assert_no_crash(proc: subprocess.CompletedProcess) -> str:
    err = _text(proc.stderr)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {err}"
    for bad in ("Traceback", "unexpected failure", "Exception ignored", "looks like a bug"):
        assert bad not in err, err
    return err


def _assert_user_error(proc: subprocess.CompletedProcess, *words: str, before_model: bool = True) -> str:
    """Exit 1, one ``Error:`` line naming one of ``words``, then a ``Hint:`` line; nothing on stdout."""
    err = _assert_no_crash(proc)
    assert proc.returncode == 1, err
    assert proc.stdout == b"", _text(proc.stdout)
    lines = err.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
    assert len(errors) == 1, err
    message = lines[errors[0]]
    assert any(word.lower() in message.lower() for word in words), message
    assert errors[0] + 1 < len(lines) and lines[errors[0] + 1].startswith("Hint: "), err
    if before_model:
        assert "Loading" not in err, f"refused only after the model started loading: {err}"
    return message


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_video):
    """Hostile video files, all in one folder (the subprocesses run there)."""
    import cv2

    folder = tmp_path_factory.mktemp("hostile")
    good = make_video(frames=12, size=(64, 48))
    data = good.read_bytes()
    (folder / "ok.mp4").write_bytes(data)
    (folder / "notes.txt").write_text("not a video\n" * 50)
    (folder / "half.mp4").write_bytes(data[: len(data) // 3])
    header_only = bytearray(data)  # the container opens and claims 12 frames, none decodes
    at = header_only.find(b"mdat")
    size = int.from_bytes(header_only[at - 4 : at], "big")
    header_only[at + 4 : at - 4 + size] = bytes(size - 8)
    (folder / "header-only.mp4").write_bytes(bytes(header_only))
    writer = cv2.VideoWriter(str(folder / "zero.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 12, (64, 48))
    writer.release()  # a container with no frames at all
    os.mkfifo(folder / "pipe.mp4")
    (folder / "folder.mp4").mkdir()
    with open(os.path.join(os.fsencode(folder), b"clip\xff.mp4"), "wb") as handle:  # not valid UTF-8
        handle.write(data)
    return folder


# Cases refused before the model loads: (arguments after "ask", words one of which the Error line holds).
BEFORE_MODEL = {
    "url": (["https://example.com/clip.mp4", "q"], ["URLs are not supported"]),
    "text-file": (["notes.txt", "q"], ["cannot open", "not a supported video"]),
    "truncated": (["half.mp4", "q"], ["corrupt", "truncated"]),
    "header-only": (["header-only.mp4", "q"], ["no frames"]),
    "zero-frames": (["zero.mp4", "q"], ["corrupt", "no frames"]),
    "fifo": (["pipe.mp4", "q"], ["FIFO"]),
    "device": (["/dev/null", "q"], ["device"]),
    "directory": (["folder.mp4", "q"], ["folder"]),
    "long-name": (["x" * 300 + ".mp4", "q"], ["too long"]),
    "non-utf8-question": (["ok.mp4", b"what\xff?"], ["UTF-8"]),
}


@pytest.mark.parametrize("case", list(BEFORE_MODEL), ids=list(BEFORE_MODEL))
def test_refused_before_the_model_loads(case, files, tiny_model_dir):
    args, words = BEFORE_MODEL[case]
    proc = _holitom(["ask", *args, "--model", tiny_model_dir, "--device", "cpu"], files)
    _assert_user_error(proc, *words)


@pytest.mark.parametrize(
    ("config", "device", "words"),
    [
        ("[]", "cpu", ["array"]),
        ('{"model_type": null}', "cpu", ["model_type"]),
        (None, "cpu:junk", ["unknown device"]),
        (None, "cuda:99", ["cuda"]),
    ],
    ids=["config-list", "config-no-type", "device-junk", "device-cuda-99"],
)
def test_broken_checkpoints_and_devices(config, device, words, files, tiny_model_dir, tmp_path):
    """Refused while the model loads (after the video check), as a one-line error, not an internal one."""
    if device == "cuda:99":
        import torch

        if torch.cuda.device_count() > 99:
            pytest.skip("this machine really has a GPU number 99")
    model = tiny_model_dir
    if config is not None:
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text(config)
    proc = _holitom(["ask", "ok.mp4", "q", "--model", model, "--device", device], files)
    _assert_user_error(proc, *words, before_model=False)


def test_video_name_that_is_not_utf8_is_answered(files, tiny_model_dir):
    """OpenCV segfaulted (signal 11) on such names; the answer now comes as for any other file."""
    args = ["ask", b"clip\xff.mp4", "What happens?", "--model", tiny_model_dir, "--device", "cpu"]
    proc = _holitom([*args, "--max-new-tokens", "2", "--quiet"], files)
    err = _assert_no_crash(proc)
    assert proc.returncode == 0, err
    assert proc.stdout.strip(), "no answer on stdout"


def test_broken_pipe_exits_quietly(files, tiny_model_dir):
    """The reader of stdout is gone before the answer streams: no message at all, exit code 141."""
    command = [sys.executable, "-m", "holitom_cli", "ask", "ok.mp4", "What happens?"]
    command += ["--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "4", "--quiet"]
    proc = subprocess.Popen(command, cwd=files, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # every write to stdout now fails with EPIPE
    try:
        err = proc.stderr.read()
        code = proc.wait(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    assert code == 141, _text(err)
    ours = [line for line in _text(err).splitlines() if not line.startswith("[transformers]")]
    assert ours == [], _text(err)  # (a transformers deprecation warning is not ours to silence)
