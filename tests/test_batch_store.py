"""The batch output store (issue 9, "the output file is sacred"), without a model.

Only its own output is appended to or repaired, a refused file is left byte for byte as it was, only a torn
last line is ever cut (in place: the inode never changes), one run at a time holds the file, and a failed
write (ENOSPC, EIO) leaves valid JSONL and a clear error.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from holitom_cli import batch_store
from holitom_cli.batch_store import OutputError, ResultStore, is_batch_record


def _record(video: str, question: str, digest: str = "h1", error: str | None = None) -> dict:
    return {
        "schema_version": 1,
        "question": question,
        "answer": None if error else f"answer to {question}",
        "video": {"path": video},
        "settings_hash": digest,
        "error": error,
    }


def _line(record: dict) -> bytes:
    return (batch_store.dumps_line(record) + "\n").encode()


def _lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _snapshot(path: Path) -> tuple[bytes, int, int]:
    st = os.stat(path)
    return path.read_bytes(), st.st_ino, st.st_mtime_ns


# A line as written by the current release (d4e4c74) for a failed item: must stay recognised.
RELEASED_ERROR_LINE = (
    '{"schema_version": 1, "question": "What moves?", "answer": null, "error": "cannot decode broken.mp4", '
    '"model": {"name": "/m"}, "config": {"retain_ratio": 0.2, "tau": 0.8}, '
    '"generation": {"max_new_tokens": 3}, '
    '"video": {"path": "/v/broken.mp4", "frame_indices": null, "timestamps": null, "fps": null, '
    '"duration": null}, "versions": {"holitom": "0.1.0"}, "settings_hash": "0123456789abcdef"}\n'
)


# ------------------------------------------------------------------------------------------- appending


def test_append_writes_one_line_per_record_and_reports_done_keys(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultStore(out) as store:
        state = store.open()
        assert state.records == [] and state.dropped_lines == 0
        store.append(_record("/v/a.mp4", "Q1"))
        store.append(_record("/v/a.mp4", "Q2", error="boom"))
    assert [r["question"] for r in _lines(out)] == ["Q1", "Q2"]
    store = ResultStore(out)
    store.open(retry_errors=False)
    store.close()
    assert store.done_keys() == {("/v/a.mp4", "Q1", "h1"), ("/v/a.mp4", "Q2", "h1")}


def test_failed_items_are_retried_but_their_lines_never_deleted(tmp_path):
    out = tmp_path / "out.jsonl"
    original = _line(_record("/a", "Q1")) + _line(_record("/b", "Q1", error="x"))
    out.write_bytes(original)
    store = ResultStore(out)
    state = store.open(retry_errors=True)
    assert state.failed_before == 1
    assert store.done_keys() == {("/a", "Q1", "h1")}  # /b is to be redone
    assert out.read_bytes() == original  # nothing removed
    store.append(_record("/b", "Q1"))  # the retry's line is appended: the last line of an item counts
    store.close()
    assert out.read_bytes().startswith(original)
    store = ResultStore(out)
    assert store.open().failed_before == 0
    store.close()
    assert store.done_keys() == {("/a", "Q1", "h1"), ("/b", "Q1", "h1")}


def test_a_line_written_by_the_released_version_is_recognised(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(RELEASED_ERROR_LINE)
    assert is_batch_record(json.loads(RELEASED_ERROR_LINE))
    with ResultStore(out) as store:
        state = store.open()
        store.append(_record("/v/broken.mp4", "What moves?", digest="0123456789abcdef"))
    assert state.failed_before == 1 and out.read_text().startswith(RELEASED_ERROR_LINE)


def test_schema_version_is_written_first_so_a_torn_first_line_is_recognisable(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultStore(out) as store:
        store.open()
        store.append({"question": "Q", "video": {"path": "/a"}, "settings_hash": "h", "error": None,
                      "schema_version": 1})  # fmt: skip
    assert out.read_bytes().startswith(batch_store.RECORD_PREFIX)


# ------------------------------------------------------------------------------------------- repairs


@pytest.mark.parametrize("cut", [1, 10, -2])
def test_a_torn_last_line_is_cut_off_in_place(tmp_path, cut):
    out = tmp_path / "out.jsonl"
    good = _line(_record("/a", "Q1"))
    torn_full = _line(_record("/b", "Q1"))
    torn = torn_full[:cut] if cut > 0 else torn_full[: len(torn_full) + cut]
    out.write_bytes(good + torn)
    inode = os.stat(out).st_ino
    store = ResultStore(out)
    state = store.open()
    assert state.dropped_lines == 1
    store.append(_record("/c", "Q1"))
    store.close()
    assert out.read_bytes() == good + _line(_record("/c", "Q1"))
    assert os.stat(out).st_ino == inode  # truncated in place: a concurrent writer could never be orphaned
    assert store.done_keys() == {("/a", "Q1", "h1"), ("/c", "Q1", "h1")}
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_a_complete_last_record_without_its_newline_is_kept_and_completed(tmp_path):
    out = tmp_path / "out.jsonl"
    content = _line(_record("/a", "Q1")) + _line(_record("/b", "Q1"))[:-1]
    out.write_bytes(content)
    store = ResultStore(out)
    state = store.open()
    store.close()
    assert state.completed_lines == 1 and state.dropped_lines == 0
    assert out.read_bytes() == content + b"\n"
    assert store.done_keys() == {("/a", "Q1", "h1"), ("/b", "Q1", "h1")}


def test_only_a_torn_first_line_of_ours_is_cut_to_an_empty_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(_line(_record("/a", "Q1"))[:40])
    with ResultStore(out) as store:
        assert store.open().dropped_lines == 1
    assert out.read_bytes() == b""


def test_damaged_lines_before_the_end_are_left_as_they_are(tmp_path):
    out = tmp_path / "out.jsonl"
    content = _line(_record("/a", "Q1")) + b'{"half": \n\x00\x00\n{"other": "program"}\n' + _line(
        _record("/b", "Q1")
    )
    out.write_bytes(content)
    before = _snapshot(out)
    store = ResultStore(out)
    state = store.open()
    store.close()
    assert state.invalid_lines == 3 and state.dropped_lines == 0
    assert _snapshot(out) == before  # not even rewritten
    assert store.done_keys() == {("/a", "Q1", "h1"), ("/b", "Q1", "h1")}


def test_a_planted_tmp_symlink_is_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "out.jsonl.tmp")
    out = tmp_path / "out.jsonl"
    out.write_bytes(_line(_record("/a", "Q1")) + b"garbage\n" + _line(_record("/b", "Q1"))[:30])
    with ResultStore(out) as store:
        store.open()
        store.append(_record("/c", "Q1"))
    assert victim.read_text() == "precious\n"
    assert os.readlink(tmp_path / "out.jsonl.tmp") == str(victim)
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.jsonl.tmp", "victim.txt"]


def test_a_clean_file_is_not_touched(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(_line(_record("/a", "Q1")))
    before = _snapshot(out)
    store = ResultStore(out)
    store.open()
    store.close()
    assert _snapshot(out) == before


# ------------------------------------------------------------------------------------------- refusals


FOREIGN = {
    "video.mp4": b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(256)) * 8,
    "manifest.csv": b"video,question\nclip0.mp4,What is red?\n",
    "README.md": b"# My notes\n\nDo not lose these lines.\n",
    "other.jsonl": b'{"id": 1, "label": "cat"}\n{"id": 2, "label": "dog"}\n',
    "ask.jsonl": b'{"schema_version": 1, "question": "Q", "answer": "A", "video": {"path": "/a.mp4"}}\n',
    "blank.jsonl": b"\n\n",
    "one-line.txt": b"no newline at the end",
    "torn-foreign.jsonl": b'{"id": 1, "label": "c',
    "nul.bin": b"\x00" * 100,
    "array.jsonl": b"[1, 2, 3]\n",
    "later-ours.jsonl": b"header\n" + _line(_record("/a", "Q1")),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_a_file_that_is_not_our_output_is_refused_untouched(tmp_path, name):
    out = tmp_path / name
    out.write_bytes(FOREIGN[name])
    os.utime(out, ns=(1_000_000_000, 1_000_000_000))
    before = _snapshot(out)
    store = ResultStore(out)
    with pytest.raises(OutputError, match="is not a holitom batch output file") as info:
        store.open()
    assert "\n" not in info.value.message and "new file" in info.value.hint
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == [name]
    with pytest.raises(RuntimeError):
        store.append(_record("/a", "Q"))  # nothing was opened


def test_an_empty_file_and_a_new_file_are_fine(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    for name in ("empty.jsonl", "new.jsonl"):
        with ResultStore(tmp_path / name) as store:
            assert store.open().records == []
            store.append(_record("/a", "Q1"))
        assert len(_lines(tmp_path / name)) == 1


def test_an_output_that_is_one_of_the_inputs_is_refused(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"")  # even an empty one (that would be "fine" otherwise)
    link = tmp_path / "link.jsonl"
    os.symlink(manifest, link)
    hard = tmp_path / "hard.jsonl"
    os.link(manifest, hard)
    for out in (manifest, link, hard):
        with pytest.raises(OutputError, match="is the same file as the input"):
            ResultStore(out).open(inputs=[tmp_path / "video.mp4", manifest])
    assert manifest.read_bytes() == b""


@pytest.mark.parametrize("kind", ["dash", "dir", "fifo", "devnull", "missing-folder", "long-name"])
def test_paths_that_cannot_be_an_output_give_one_line_and_never_block(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "out.fifo"
        os.mkfifo(path)  # opening it for writing would block until a reader comes: it must not be opened
    else:
        path = {
            "dash": Path("-"),
            "dir": tmp_path,
            "devnull": Path(os.devnull),
            "missing-folder": tmp_path / "missing" / "out.jsonl",
            "long-name": tmp_path / ("x" * 300 + ".jsonl"),
        }[kind]
    needle = {
        "dash": "standard output",
        "dir": "is a directory",
        "fifo": "is a pipe",
        "devnull": "is a device",
        "missing-folder": "does not exist",
        "long-name": "name too long",
    }[kind]
    with pytest.raises(OutputError, match=needle) as info:
        ResultStore(path).open()
    assert "\n" not in info.value.message and info.value.hint
    if kind in ("dash", "fifo", "devnull"):
        assert "regular file" in info.value.hint
    assert not Path("-").exists()


# ------------------------------------------------------------------------------------------- lock


def test_a_second_store_on_the_same_file_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out.jsonl"
    first = ResultStore(out)
    first.open()
    first.append(_record("/a", "Q1"))
    before = out.read_bytes()
    with pytest.raises(OutputError, match=rf"being written by another holitom batch \(pid {os.getpid()}\)"):
        ResultStore(tmp_path / "." / "out.jsonl").open()  # another name for the same file
    assert out.read_bytes() == before
    first.append(_record("/b", "Q1"))
    first.close()
    with ResultStore(out) as again:  # released on close
        assert len(again.open().records) == 2
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]  # no lock file left behind


# ------------------------------------------------------------------------------------------- write failures


@pytest.mark.parametrize(
    ("err", "where", "message"),
    [
        (errno.ENOSPC, "write", "no space left on device writing"),
        (errno.EIO, "write", "input/output error writing"),
        (errno.EIO, "fsync", "input/output error writing"),
        (errno.EDQUOT, "write", "disk quota exceeded writing"),
    ],
)
def test_a_failed_write_leaves_the_last_complete_line_and_says_why(
    tmp_path, monkeypatch, err, where, message
):
    out = tmp_path / "out.jsonl"
    store = ResultStore(out)
    store.open()
    store.append(_record("/a", "Q1"))
    before = out.read_bytes()
    real_write, real_fsync = os.write, os.fsync
    calls = []

    def failing_write(fd, data):
        if fd != store._fd:
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 1:  # the disk fills in the middle of the line: half of it lands
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(err, os.strerror(err))

    def failing_fsync(fd):
        if fd == store._fd:
            raise OSError(err, os.strerror(err))
        return real_fsync(fd)

    with monkeypatch.context() as m:
        if where == "write":
            m.setattr(batch_store.os, "write", failing_write)
        else:
            m.setattr(batch_store.os, "fsync", failing_fsync)
        with pytest.raises(OutputError, match=message) as info:
            store.append(_record("/b", "Q1", error=None))
    assert f"writing {out}" in info.value.message and "run the same command again" in info.value.hint
    assert out.read_bytes() == before  # the partial line is gone, the complete one is kept
    assert _lines(out)[0]["video"]["path"] == "/a"
    store.append(_record("/c", "Q1"))  # the store still works once the disk has room again
    store.close()
    assert [r["video"]["path"] for r in _lines(out)] == ["/a", "/c"]
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]
