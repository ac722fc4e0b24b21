"""Video decoding and sampling (holitom_cli.video), checked against frames decoded independently."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from holitom_cli.errors import ConfigError, VideoError
from holitom_cli.limits import DEFAULT_FPS_MAX_FRAMES, MAX_FRAMES
from holitom_cli.video import VIDEO_EXTENSIONS, fps_indices, load_video, probe_video, uniform_indices


def _all_frames_rgb(path) -> list[np.ndarray]:
    """Every frame of a file, decoded with a plain read() loop (the independent reference)."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def test_uniform_sampling_matches_reference_linspace(make_video):
    path = make_video(frames=40, size=(96, 64), fps=10.0)
    clip = load_video(path, num_frames=8)
    expected = [int(i) for i in np.linspace(0, 39, 8, dtype=int)]
    assert clip.indices == expected == [0, 5, 11, 16, 22, 27, 33, 39]
    reference = _all_frames_rgb(path)
    assert clip.frames.shape == (8, 64, 96, 3) and clip.frames.dtype == np.uint8
    for k, index in enumerate(expected):
        np.testing.assert_array_equal(clip.frames[k], reference[index])
    assert clip.timestamps == pytest.approx([i / 10.0 for i in expected])
    assert clip.meta.fps == pytest.approx(10.0)
    assert clip.meta.frame_count == 40
    assert clip.meta.duration_s == pytest.approx(4.0)
    assert (clip.meta.width, clip.meta.height) == (96, 64)
    assert clip.meta.codec == "FMP4"
    assert clip.decode_s > 0


@pytest.mark.parametrize("fourcc", ["mp4v", "MJPG"])
def test_seeking_for_sparse_frames_gives_the_same_frames(make_video, monkeypatch, fourcc):
    import holitom_cli.video as video

    path = make_video(frames=40, fourcc=fourcc)
    sequential = load_video(path, num_frames=6)
    monkeypatch.setattr(
        video, "SEEK_MIN_GAP", 0
    )  # every sampling counts as sparse: frames are reached by seeking
    calls = []
    real = video._read_seeking
    monkeypatch.setattr(video, "_read_seeking", lambda p, w: calls.append(w) or real(p, w))
    seeking = load_video(path, num_frames=6)
    assert calls == [sequential.indices]
    assert seeking.indices == sequential.indices
    np.testing.assert_array_equal(seeking.frames, sequential.frames)


def test_seeking_past_a_truncated_end_falls_back(make_video, tmp_path, monkeypatch):
    import holitom_cli.video as video

    data = make_video(frames=40, fourcc="MJPG").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(video, "SEEK_MIN_GAP", 0)
    clip = load_video(cut, num_frames=8)
    decodable = _all_frames_rgb(cut)
    assert clip.meta.frame_count == len(decodable) < 40
    assert clip.indices[-1] == len(decodable) - 1


def test_frames_are_rgb(tmp_path):
    # a pure red frame written as BGR (0, 0, 255) must come back as RGB (255, 0, 0)
    path = tmp_path / "red.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 32))
    for _ in range(3):
        writer.write(np.tile(np.array([0, 0, 255], np.uint8), (32, 32, 1)))
    writer.release()
    clip = load_video(path, num_frames=2)
    pixel = clip.frames[0, 16, 16].astype(int)
    assert pixel[0] > 200 and pixel[1] < 50 and pixel[2] < 50


def test_short_video_uses_all_frames(make_video):
    path = make_video(frames=5)
    clip = load_video(path, num_frames=32)
    assert clip.indices == [0, 1, 2, 3, 4]
    assert clip.frames.shape[0] == 5


def test_fps_sampling_and_cap(make_video):
    path = make_video(frames=48, fps=12.0)
    clip = load_video(path, fps=2.0)
    assert clip.indices == list(range(0, 48, 6))  # one frame every round(12 / 2) = 6
    assert clip.timestamps == pytest.approx([i / 12 for i in range(0, 48, 6)])
    capped = load_video(path, fps=4.0, max_frames=5)  # 16 candidates > 5: uniform over the whole video
    assert capped.indices == [int(i) for i in np.linspace(0, 47, 5, dtype=int)]


def test_index_helpers_plain_loops():
    for n in (1, 7, 32, 100, 1001):
        for k in (1, 3, 32):
            got = uniform_indices(n, k)
            if n <= k:
                assert got == list(range(n))
            else:
                want = [int((n - 1) * j / (k - 1)) if k > 1 else 0 for j in range(k)]
                assert got == want
    assert fps_indices(30, 30.0, 1.0, None) == [0]
    assert fps_indices(100, 25.0, 5.0, None) == list(range(0, 100, 5))


def test_truncated_avi_is_clamped_to_decodable_frames(make_video, tmp_path):
    full = make_video(frames=40, fourcc="MJPG")
    data = full.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    decodable = _all_frames_rgb(cut)
    assert 0 < len(decodable) < 40  # premise: the container still claims 40 frames
    clip = load_video(cut, num_frames=8)
    assert clip.meta.claimed_frame_count == 40
    assert clip.meta.frame_count == len(decodable)
    expected = [int(i) for i in np.linspace(0, len(decodable) - 1, 8, dtype=int)]
    assert clip.indices == expected
    for k, index in enumerate(expected):
        np.testing.assert_array_equal(clip.frames[k], decodable[index])


def _assert_video_error(path, *words):
    with pytest.raises(VideoError) as info:
        load_video(path)
    message = str(info.value).lower()
    assert any(word in message for word in words), message
    assert info.value.hint


def test_missing_file(tmp_path):
    _assert_video_error(tmp_path / "nope.mp4", "not found")


def test_directory(tmp_path):
    _assert_video_error(tmp_path, "directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without read permission")
def test_unreadable_file(make_video):
    path = make_video(frames=3)
    path.chmod(0)
    try:
        _assert_video_error(path, "permission", "not readable")
    finally:
        path.chmod(0o644)


def test_unreadable_file_as_root(make_video, monkeypatch):
    # root bypasses file modes, so simulate the permission check failing the way a normal user sees it
    path = make_video(frames=3)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(path) else real_access(p, mode))
    _assert_video_error(path, "permission", "not readable")


def test_corrupt_random_bytes(tmp_path):
    path = tmp_path / "random.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    _assert_video_error(path, "corrupt")


def test_truncated_mp4(make_video, tmp_path):
    data = make_video(frames=30).read_bytes()
    path = tmp_path / "half.mp4"
    path.write_bytes(data[: len(data) // 2])
    _assert_video_error(path, "truncated")


def test_zero_frame_and_empty_files(tmp_path, make_video):
    zero = make_video(frames=0)
    _assert_video_error(zero, "corrupt", "no frames", "empty")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    _assert_video_error(empty, "empty")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_frames": 0},
        {"num_frames": -3},
        {"num_frames": 2.5},
        {"fps": 0},
        {"fps": -1.0},
        {"fps": float("nan")},
        {"fps": 1.0, "max_frames": 0},
    ],
)
def test_invalid_sampling_settings(sample_video, kwargs):
    with pytest.raises(ConfigError):
        load_video(sample_video, **kwargs)


def test_video_extensions():
    assert ".mp4" in VIDEO_EXTENSIONS and ".mkv" in VIDEO_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in VIDEO_EXTENSIONS)


# ----------------------------------------------------------------------------- hostile inputs (issue 9)


def _header_without_frames(make_video, tmp_path):
    """An mp4 whose container is intact (it opens, claims 24 frames) but whose frame data is zeroed."""
    data = bytearray(make_video(frames=24).read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    path = tmp_path / "header-only.mp4"
    path.write_bytes(bytes(data))
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened() and cap.get(cv2.CAP_PROP_FRAME_COUNT) == 24 and not cap.read()[0]  # premise
    cap.release()
    return path


@pytest.mark.parametrize("loader", [load_video, probe_video], ids=["load_video", "probe_video"])
def test_hostile_files_are_video_errors(loader, tmp_path, make_video):
    """Each case is refused with its own reason, never an OSError or a blocked read (FIFO)."""
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: stat() must come first
    cases = {
        "pipe (fifo)": fifo,
        "device": "/dev/null",
        "url": "https://example.com/clip.mp4",
        "too long": tmp_path / ("x" * 300 + ".mp4"),
        "no frames": _header_without_frames(make_video, tmp_path),
        "directory": tmp_path,
    }
    for words, path in cases.items():
        with pytest.raises(VideoError) as info:
            loader(path)
        message = info.value.message.lower()
        assert any(word in message for word in words.split()), (words, message)
        assert info.value.hint, words
    assert "https://example.com/clip.mp4" in _message(loader, cases["url"])  # the URL as typed, "//" kept


def _message(loader, path) -> str:
    with pytest.raises(VideoError) as info:
        loader(path)
    return info.value.message


def test_probe_video_reads_the_container(make_video):
    meta = probe_video(make_video(frames=30, fps=10.0, size=(96, 64)))
    assert (meta.frame_count, meta.width, meta.height) == (30, 96, 64)
    assert meta.fps == pytest.approx(10.0)


def test_frame_caps(make_video):
    with pytest.raises(ConfigError, match=str(MAX_FRAMES)):
        load_video(make_video(frames=3), num_frames=MAX_FRAMES + 1)
    with pytest.raises(ConfigError, match=str(MAX_FRAMES)):
        load_video(make_video(frames=3), fps=1.0, max_frames=MAX_FRAMES + 1)


def test_fps_without_max_frames_is_capped_and_each_frame_is_taken_once(make_video):
    path = make_video(frames=DEFAULT_FPS_MAX_FRAMES + 16, fps=10.0, size=(32, 32))
    clip = load_video(path, fps=1e9)  # far above the video's 10 fps
    assert clip.num_frames == DEFAULT_FPS_MAX_FRAMES
    assert len(set(clip.indices)) == len(clip.indices)
    assert clip.sampling["max_frames"] == DEFAULT_FPS_MAX_FRAMES
    every = load_video(path, fps=1e9, max_frames=MAX_FRAMES)  # room for all: every source frame, once
    assert every.indices == list(range(DEFAULT_FPS_MAX_FRAMES + 16))


def test_fps_indices_extremes():
    assert fps_indices(100, 30.0, 5e-324, None) == [0]  # video_fps / fps overflows to inf: no OverflowError
    assert fps_indices(12, 30.0, 1e9, None) == list(range(12))
    # a container claiming 10**15 frames: the candidates are counted, not listed
    huge = fps_indices(10**15, 30.0, 30.0, 64)
    assert len(huge) == 64 and huge[0] == 0 and huge[-1] == 10**15 - 1


def test_frames_of_another_size_are_resized_to_the_first(make_video, monkeypatch):
    import holitom_cli.video as video

    path = make_video(frames=8, size=(96, 64))
    real = video._read

    def mixed(source, wanted):
        frames, decoded, ended = real(source, wanted)
        frames[-1] = cv2.resize(frames[-1], (48, 32))  # a stream whose resolution changes midway
        return frames, decoded, ended

    monkeypatch.setattr(video, "_read", mixed)
    clip = load_video(path, num_frames=4)
    assert clip.frames.shape == (4, 64, 96, 3)


def test_opencv_never_sees_the_users_file_name(make_video, tmp_path, monkeypatch):
    """OpenCV opens a plain ASCII alias in a private folder that is removed afterwards."""
    import holitom_cli.video as video

    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(video.tempfile, "tempdir", str(private))
    source = tmp_path / "http:weird %d name.mp4"
    source.write_bytes(make_video(frames=6).read_bytes())
    opened: list[str] = []
    real_open = video._open
    monkeypatch.setattr(video, "_open", lambda p: opened.append(str(p)) or real_open(p))
    clip = load_video(source, num_frames=3)
    assert clip.num_frames == 3 and clip.meta.path == str(source)
    assert opened and all(name.isascii() and os.path.basename(name) == "video.mp4" for name in opened)
    assert list(private.iterdir()) == []  # the alias folder is gone
