"""``holitom batch -o`` refuses every output that is not its own file, in a real process (issue 9).

Each case runs ``python -m holitom_cli batch`` and checks: exit 1, one ``Error: ...`` line and a hint, no
traceback, the file byte for byte as it was, nothing stray in its folder, and no hang (a FIFO or a pipe as
output must be refused, not opened for writing). None of these cases loads the model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD_S = 300  # not a timing assertion: only keeps a hang from blocking the suite forever


def _cmd(model_dir: Path, *args: object) -> list[str]:
    return [sys.executable, "-m", "holitom_cli", "batch", *map(str, args), "-m", str(model_dir),
            "--device", "cpu", "--frames", "4", "--max-new-tokens", "3", "--quiet"]  # fmt: skip


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's holitom_cli, whatever the cwd
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, encoding="utf-8",
                              errors="backslashreplace", timeout=HANG_GUARD_S,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"batch hung: {cmd}")


def _assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("Error: "), result.stderr
    assert needle in lines[0], result.stderr
    assert sum(line.startswith("Error:") for line in lines) == 1
    assert len(lines) > 1 and lines[1].startswith("Hint: "), result.stderr
    assert "Traceback" not in result.stderr and "looks like a bug" not in result.stderr
    assert result.stdout == ""


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    for p in sorted(folder.iterdir()):
        st = os.lstat(p)
        out[p.name] = (p.read_bytes() if p.is_file() else b"", st.st_ino, st.st_mtime_ns)
    return out


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("input-video", "is the same file as the input"),
        ("manifest", "is the same file as the input"),
        ("questions-file", "is the same file as the input"),
        ("other-video", "is not a holitom batch output file"),
        ("readme", "is not a holitom batch output file"),
        ("foreign-jsonl", "is not a holitom batch output file"),
        ("ask-json", "is not a holitom batch output file"),
    ],
)
def test_an_existing_file_that_is_not_our_output_is_refused_untouched(
    tiny_model_dir, sample_video, tmp_path, case, needle
):
    folder = tmp_path / "data"
    folder.mkdir()
    video = folder / "clip.mp4"
    shutil.copyfile(sample_video, video)
    (folder / "manifest.csv").write_text("video,question\nclip.mp4,What is red?\n")
    (folder / "questions.txt").write_text("What moves?\n")
    (folder / "other.mp4").write_bytes(video.read_bytes())
    (folder / "README.md").write_text("# Notes\n\nThese lines must survive.\n")
    (folder / "labels.jsonl").write_text('{"id": 1, "label": "cat"}\n{"id": 2, "label": "dog"}\n')
    (folder / "answer.json").write_text(
        '{"schema_version": 1, "question": "Q", "answer": "A", "video": {"path": "/x.mp4"}}\n'
    )
    inp, extra = folder / "manifest.csv", ["--questions", folder / "questions.txt"]
    out = {
        "input-video": video,
        "manifest": folder / "manifest.csv",
        "questions-file": folder / "questions.txt",
        "other-video": folder / "other.mp4",
        "readme": folder / "README.md",
        "foreign-jsonl": folder / "labels.jsonl",
        "ask-json": folder / "answer.json",
    }[case]
    if case == "input-video":
        inp, extra = video, ["-q", "What?"]
    before = _snapshot(folder)
    result = _run(_cmd(tiny_model_dir, inp, *extra, "-o", out))
    _assert_one_line_error(result, needle)
    assert _snapshot(folder) == before  # byte for byte, same inode, same mtime, nothing added


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("dash", "cannot write to standard output"),
        ("dev-stdout", "is a pipe"),
        ("dev-null", "is a device"),
        ("fifo", "is a pipe"),
        ("process-substitution", "is a pipe"),
        ("directory", "is a directory"),
        ("long-name", "name too long"),
        ("missing-folder", "does not exist"),
    ],
)
def test_outputs_that_are_not_regular_files_are_refused_without_hanging(
    tiny_model_dir, sample_video, tmp_path, case, needle
):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "existing-dir").mkdir()
    if case == "fifo":
        os.mkfifo(folder / "out.fifo")  # opened for writing, this would block until a reader comes
    out = {
        "dash": "-",
        "dev-stdout": "/dev/stdout",  # stdout is a pipe here, as in `holitom batch ... -o /dev/stdout | jq`
        "dev-null": os.devnull,
        "fifo": folder / "out.fifo",
        "directory": folder / "existing-dir",
        "long-name": folder / ("a" * 300 + ".jsonl"),
        "missing-folder": folder / "nope" / "out.jsonl",
        "process-substitution": None,
    }[case]
    before = _snapshot(folder)
    if case == "process-substitution":
        cmd = " ".join(f"'{c}'" for c in _cmd(tiny_model_dir, sample_video, "-q", "What?"))
        if shutil.which("bash") is None:
            pytest.skip("bash is needed for a process substitution")
        result = _run(["bash", "-c", f"exec {cmd} -o >(cat > /dev/null)"])  # -o /dev/fd/63
    else:
        result = _run(_cmd(tiny_model_dir, sample_video, "-q", "What?", "-o", out), cwd=folder)
    _assert_one_line_error(result, needle)
    if case in ("dash", "dev-stdout", "dev-null", "fifo", "process-substitution"):
        assert "regular file" in result.stderr.splitlines()[1]
    assert _snapshot(folder) == before  # e.g. no file named "-" was created


def test_an_unwritable_folder_gives_one_line(tiny_model_dir, sample_video, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes anywhere a permission bit forbids: use a read-only file system
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here (root, but: {done.stderr.strip()})")
        mounted = True
    else:
        ro.chmod(0o500)
    try:
        result = _run(_cmd(tiny_model_dir, sample_video, "-q", "What?", "-o", ro / "out.jsonl"))
        _assert_one_line_error(result, "cannot write to")
        assert os.listdir(ro) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        else:
            ro.chmod(0o700)
