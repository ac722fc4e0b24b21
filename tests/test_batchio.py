"""The batch input readers and the crash-safe JSONL store (no model involved)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from holitom_cli import batchio
from holitom_cli.batchio import BatchItem, ResultStore
from holitom_cli.errors import ConfigError


def _record(video: str, question: str, digest: str = "h1", error: str | None = None) -> dict:
    return {
        "question": question,
        "answer": None if error else f"answer to {question}",
        "video": {"path": video},
        "settings_hash": digest,
        "error": error,
    }


# ------------------------------------------------------------------------------------------- inputs


def test_find_videos_filters_extensions_and_recursion(tmp_path):
    (tmp_path / "b.MP4").write_bytes(b"x")
    (tmp_path / "a.avi").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.mp4").write_bytes(b"x")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.mkv").write_bytes(b"x")
    flat = batchio.find_videos(tmp_path, [".mp4", ".avi", ".mkv"])
    assert [p.name for p in flat] == ["a.avi", "b.MP4"]
    assert all(p.is_absolute() for p in flat)
    deep = batchio.find_videos(tmp_path, [".mp4", ".avi", ".mkv"], recursive=True)
    assert [p.relative_to(tmp_path.resolve()).as_posix() for p in deep] == ["a.avi", "b.MP4", "sub/c.mkv"]


def test_read_manifest_jsonl_and_csv_resolve_relative_to_manifest(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    jl = folder / "items.jsonl"
    jl.write_text('{"video": "a.mp4", "question": "What?"}\n\n{"video": "/abs/b.mp4"}\n', encoding="utf-8")
    assert batchio.read_manifest(jl) == [
        ((folder / "a.mp4").resolve(), "What?"),
        (Path("/abs/b.mp4"), None),
    ]
    csv_file = folder / "items.csv"
    csv_file.write_text('video,question\nx.mp4,"Is it red, or blue?"\ny.mp4,\n', encoding="utf-8")
    assert batchio.read_manifest(csv_file) == [
        ((folder / "x.mp4").resolve(), "Is it red, or blue?"),
        ((folder / "y.mp4").resolve(), None),
    ]


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("bad.jsonl", '{"video": "a.mp4"}\nnot json\n', "line 2"),
        ("novideo.csv", "file,question\na.mp4,q\n", "no 'video' column"),
        ("empty.jsonl", "\n", "no rows"),
        ("list.jsonl", "[1, 2]\n", "not a JSON object"),
        ("manifest.txt", "a.mp4\n", "unsupported manifest format"),
    ],
)
def test_read_manifest_errors(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        batchio.read_manifest(path)


def test_read_questions_skips_blank_lines(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("What happens?\n\n  How many?  \n")
    assert batchio.read_questions(path) == ["What happens?", "How many?"]
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="empty"):
        batchio.read_questions(tmp_path / "e.txt")
    with pytest.raises(ConfigError, match="cannot read"):
        batchio.read_questions(tmp_path / "missing.txt")


def test_build_items_combines_row_questions_and_extra_questions_without_duplicates():
    a, b = Path("/v/a.mp4"), Path("/v/b.mp4")
    items = batchio.build_items([(a, "Q1"), (b, None), (a, "Q1")], ["Q1", "Q2"])
    assert items == [BatchItem(a, "Q1"), BatchItem(a, "Q2"), BatchItem(b, "Q1"), BatchItem(b, "Q2")]
    with pytest.raises(ConfigError, match="no question"):
        batchio.build_items([(a, None)], [])


def test_settings_hash_is_order_independent_and_sensitive_to_values():
    h = batchio.settings_hash({"a": 1, "b": {"x": 0.5}})
    assert h == batchio.settings_hash({"b": {"x": 0.5}, "a": 1})
    assert h != batchio.settings_hash({"a": 1, "b": {"x": 0.25}})
    assert len(h) == 16 and int(h, 16) >= 0


def test_dumps_line_is_strict_single_line_json():
    line = batchio.dumps_line({"answer": "two\nlines", "x": float("nan"), "y": [float("inf"), 1.5]})
    assert "\n" not in line
    assert json.loads(line) == {"answer": "two\nlines", "x": None, "y": [None, 1.5]}


# ------------------------------------------------------------------------------------------- store


def _lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_store_appends_one_line_per_record_and_reports_done_keys(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultStore(out) as store:
        state = store.open()
        assert state.records == [] and state.dropped_lines == 0
        store.append(_record("/v/a.mp4", "Q1"))
        store.append(_record("/v/a.mp4", "Q2", error="boom"))
    assert [r["question"] for r in _lines(out)] == ["Q1", "Q2"]
    store = ResultStore(out)
    state = store.open(retry_errors=False)
    store.close()
    assert store.done_keys() == {("/v/a.mp4", "Q1", "h1"), ("/v/a.mp4", "Q2", "h1")}
    assert state.dropped_errors == 0


def test_store_retry_errors_removes_failed_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(
        "".join(json.dumps(r) + "\n" for r in [_record("/a", "Q1"), _record("/b", "Q1", error="x")])
    )
    store = ResultStore(out)
    state = store.open(retry_errors=True)
    store.close()
    assert state.dropped_errors == 1
    assert store.done_keys() == {("/a", "Q1", "h1")}
    assert [r["video"]["path"] for r in _lines(out)] == ["/a"]


@pytest.mark.parametrize("cut", [1, 10, -2, -1])
def test_store_truncates_a_torn_last_line_and_redoes_it(tmp_path, cut):
    out = tmp_path / "out.jsonl"
    good = json.dumps(_record("/a", "Q1")) + "\n"
    torn_full = json.dumps(_record("/b", "Q1")) + "\n"
    # Cut the second line anywhere before its newline (even right before it: a complete object without
    # its newline is still treated as torn, since the write of that line did not finish).
    torn = torn_full[:cut] if cut > 0 else torn_full[: len(torn_full) + cut]
    out.write_bytes((good + torn).encode())
    store = ResultStore(out)
    state = store.open()
    assert state.dropped_lines == 1
    store.append(_record("/c", "Q1"))
    store.close()
    assert out.read_text() == good + json.dumps(_record("/c", "Q1"), separators=(", ", ": ")) + "\n"
    assert store.done_keys() == {("/a", "Q1", "h1"), ("/c", "Q1", "h1")}


def test_store_removes_damaged_middle_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    lines = [json.dumps(_record("/a", "Q1")), '{"half": ', "\x00\x00", json.dumps(_record("/b", "Q1"))]
    out.write_text("\n".join(lines) + "\n")
    store = ResultStore(out)
    state = store.open()
    store.close()
    assert state.dropped_lines == 2
    assert [r["video"]["path"] for r in _lines(out)] == ["/a", "/b"]
    assert not (tmp_path / "out.jsonl.tmp").exists()


def test_store_leaves_a_clean_file_untouched(tmp_path):
    out = tmp_path / "out.jsonl"
    content = json.dumps(_record("/a", "Q1")) + "\n"
    out.write_text(content)
    before = os.stat(out).st_mtime_ns
    store = ResultStore(out)
    store.open()
    store.close()
    assert out.read_text() == content
    assert os.stat(out).st_mtime_ns == before


def test_check_writable_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ResultStore.check_writable(tmp_path / "missing" / "out.jsonl")
    with pytest.raises(ConfigError, match="is a directory"):
        ResultStore.check_writable(tmp_path)
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="cannot write"):
            ResultStore.check_writable(locked / "out.jsonl")


def test_append_before_open_is_a_programming_error(tmp_path):
    with pytest.raises(RuntimeError):
        ResultStore(tmp_path / "x.jsonl").append({})
