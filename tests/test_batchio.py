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
        "schema_version": 1,
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


# ------------------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-32"]
)
def test_manifests_and_questions_in_utf8_or_with_a_byte_order_mark(tmp_path, encoding):
    def encode(text: str) -> bytes:
        if encoding == "utf-16-le-bom":
            return b"\xff\xfe" + text.encode("utf-16-le")
        if encoding == "utf-16-be-bom":
            return b"\xfe\xff" + text.encode("utf-16-be")
        return text.encode(encoding)  # utf-16 / utf-32 / utf-8-sig write their own mark

    csv_file = tmp_path / "m.csv"
    csv_file.write_bytes(encode('video,question\ncafé.mp4,"Qu\'est-ce qui bouge ?"\n'))
    assert batchio.read_manifest(csv_file) == [((tmp_path / "café.mp4").resolve(), "Qu'est-ce qui bouge ?")]
    jl = tmp_path / "m.jsonl"
    jl.write_bytes(encode('{"video": "é.mp4", "question": "Wie viele?"}\n'))
    assert batchio.read_manifest(jl) == [((tmp_path / "é.mp4").resolve(), "Wie viele?")]
    q = tmp_path / "q.txt"
    q.write_bytes(encode("Что происходит?\n¿Cuántos?\n"))
    assert batchio.read_questions(q) == ["Что происходит?", "¿Cuántos?"]


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("latin1.csv", "video,question\nclip.mp4,Qu'est-ce qui se passe à la fin ?\n".encode("latin-1"),
         r"latin1\.csv is not valid UTF-8 \(line 2, column 33: byte 0xe0\)"),
        ("latin1.jsonl", '{"video": "caf\xe9.mp4"}\n'.encode("latin-1"), r"line 1, column 15: byte 0xe9"),
        ("cesu.csv", b"video,question\nclip.mp4,\xed\xa0\x80?\n", r"not valid UTF-8 \(line 2, column 10"),
        ("odd.jsonl", b"\xff\xfe" + '{"video": "a"}\n'.encode("utf-16-le") + b"\x00", r"not valid UTF-16"),
        ("q.txt", "Où ?\n".encode("latin-1"), r"questions file .*q\.txt is not valid UTF-8 \(line 1"),
    ],
)  # fmt: skip
def test_text_inputs_that_are_not_utf8_give_one_line_naming_file_line_and_encoding(
    tmp_path, name, content, needle
):
    path = tmp_path / name
    path.write_bytes(content)
    read = batchio.read_questions if name.endswith(".txt") else batchio.read_manifest
    with pytest.raises(ConfigError, match=needle) as info:
        read(path)
    assert "\n" not in info.value.message and "UTF-8" in info.value.hint


def test_json_manifest_surrogate_escapes(tmp_path):
    jl = tmp_path / "m.jsonl"
    # \udc80-\udcff stand for the bytes of a file name that is not UTF-8 (Python's surrogateescape) ...
    jl.write_text('{"video": "caf\\udce9.mp4", "question": "Q"}\n', encoding="utf-8")
    [(video, question)] = batchio.read_manifest(jl)
    assert os.fsencode(video) == os.fsencode(tmp_path.resolve()) + b"/caf\xe9.mp4" and question == "Q"
    assert batchio.path_text(video).endswith("caf\\udce9.mp4")
    # ... any other lone surrogate is not text: one line naming the line and the field.
    jl.write_text('{"video": "a.mp4"}\n{"video": "\\ud800.mp4", "question": "Q"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"m\.jsonl line 2: 'video' holds an invalid Unicode character"):
        batchio.read_manifest(jl)
    jl.write_text('{"video": "a.mp4", "question": "Why \\udce9?"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 1: 'question' holds an invalid Unicode character"):
        batchio.read_manifest(jl)
    jl.write_text('{"video": "a\\u0000.mp4"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="NUL"):
        batchio.read_manifest(jl)
    with pytest.raises(ConfigError, match="invalid Unicode"):
        batchio.build_items([(Path("/v/a.mp4"), None)], ["Why \udce9?"])


def test_find_videos_keeps_names_that_are_not_utf8(tmp_path):
    folder = os.fsencode(tmp_path)
    for raw in (b"caf\xe9.mp4", b"b.mp4", b"\xff\xfe.avi", b"notes\xe9.txt"):
        with open(folder + b"/" + raw, "wb") as fh:
            fh.write(b"x")
    found = batchio.find_videos(tmp_path, [".mp4", ".avi"])
    assert [os.fsencode(p.name) for p in found] == [b"b.mp4", b"caf\xe9.mp4", b"\xff\xfe.avi"]
    texts = [batchio.path_text(p.name) for p in found]
    assert texts == ["b.mp4", "caf\\udce9.mp4", "\\udcff\\udcfe.avi"]
    assert all(t.encode("utf-8") for t in texts)  # valid UTF-8 text, for the JSON
    # The key of an item and the key read back from its stored line are the same text.
    item = BatchItem(found[1], "Q")
    line = batchio.dumps_line({"video": {"path": batchio.path_text(item.video)}, "question": "Q",
                               "settings_hash": "h"})  # fmt: skip
    assert batchio.record_key(json.loads(line)) == batchio.item_key(item, "h")


def test_dumps_line_escapes_surrogates_so_the_line_is_valid_utf8():
    line = batchio.dumps_line({"error": "cannot open /v/caf\udce9.mp4", "k\udcff": ["\udc80"]})
    data = line.encode("utf-8")  # today: UnicodeEncodeError, a crash in the middle of a batch
    assert json.loads(data) == {"error": "cannot open /v/caf\\udce9.mp4", "k\\udcff": ["\\udc80"]}


def test_results_store_still_importable_from_batchio():
    assert batchio.ResultStore is ResultStore and batchio.OutputError.__name__ == "OutputError"
