"""The video cache (holitom_cli.video_cache, video_cache_store): the key, the entry format, atomic writes,
damaged and foreign entries, LRU eviction, sizes, the folder, and prepare_video_cached on the tiny model."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from holitom_cli import video_cache_store as store
from holitom_cli.errors import ConfigError
from holitom_cli.models.base import VisualTokens
from holitom_cli.pipeline import Pipeline, SamplingOptions
from holitom_cli.video import load_video
from holitom_cli.video_cache import (
    DEFAULT_MAX_BYTES,
    VideoCache,
    cache_key,
    default_cache_dir,
    file_id,
    model_id,
    open_cache,
    parse_size,
    prepare_video_cached,
)

# ----------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10GB", 10 * 10**9),
        ("10gb", 10 * 10**9),
        ("10G", 10 * 10**9),
        ("500M", 500 * 10**6),
        ("500 MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5KiB", 1536),
        ("800000", 800000),
        ("12B", 12),
        ("1T", 10**12),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "abc", "10XB", "-1G", "0", "0GB", "1iB", "GB", "1 G B", "1e9", "nan", "99999999999999999999TB"],
)
def test_parse_size_refuses_bad_values_with_a_hint(text):
    with pytest.raises(ConfigError) as info:
        parse_size(text)
    assert info.value.hint and "--cache-size" in info.value.hint


def test_default_cap_is_10_gb():
    assert DEFAULT_MAX_BYTES == 10 * 10**9


def test_default_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOLITOM_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("HOLITOM_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "holitom"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: only absolute paths count
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "holitom"


# ----------------------------------------------------------------------------------------------- the key


def _adapter(folder: Path, **changes) -> SimpleNamespace:
    base = dict(
        name="tiny", family="llava_onevision", dtype=torch.float32, quantize=None, device=torch.device("cpu"),
        path=folder, model=None,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **changes})


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava_onevision"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def _digest(adapter, video: Path, sampling: SamplingOptions) -> str:
    return store.key_digest(cache_key(model_id(adapter), file_id(video), sampling))


def test_key_follows_the_bytes_not_the_name(tmp_path, checkpoint):
    a, b, c = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    c.write_bytes(b"other bytes")
    adapter, sampling = _adapter(checkpoint), SamplingOptions(frames=8)
    assert _digest(adapter, a, sampling) == _digest(adapter, b, sampling)  # a renamed copy hits
    assert _digest(adapter, a, sampling) != _digest(adapter, c, sampling)
    import hashlib

    assert file_id(c).blake2b == hashlib.blake2b(b"other bytes", digest_size=32).hexdigest()


def test_key_hashes_a_large_file_in_chunks(tmp_path, monkeypatch):
    import hashlib

    from holitom_cli import video_cache

    monkeypatch.setattr(video_cache, "_CHUNK", 1000)
    data = os.urandom(10_500)
    (tmp_path / "v.mp4").write_bytes(data)
    assert file_id(tmp_path / "v.mp4").blake2b == hashlib.blake2b(data, digest_size=32).hexdigest()


def test_key_changes_with_sampling_model_and_checkpoint(tmp_path, checkpoint):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"video")
    adapter = _adapter(checkpoint)
    base = _digest(adapter, video, SamplingOptions(frames=8))
    others = {
        _digest(adapter, video, SamplingOptions(frames=9)),
        _digest(adapter, video, SamplingOptions(fps=1.0)),
        _digest(adapter, video, SamplingOptions(fps=1.0, max_frames=4)),
        _digest(_adapter(checkpoint, dtype=torch.bfloat16), video, SamplingOptions(frames=8)),
        _digest(_adapter(checkpoint, quantize="8bit"), video, SamplingOptions(frames=8)),
        _digest(_adapter(checkpoint, device=torch.device("meta")), video, SamplingOptions(frames=8)),
        _digest(_adapter(checkpoint, name="other"), video, SamplingOptions(frames=8)),
    }
    assert base not in others and len(others) == 7
    # with fps sampling, --frames is ignored, so it must not split the key
    fps = _digest(adapter, video, SamplingOptions(frames=8, fps=1.0))
    assert fps == _digest(adapter, video, SamplingOptions(frames=32, fps=1.0))
    # a checkpoint rebuilt at the same path (new weights file) misses
    (checkpoint / "model.safetensors").write_bytes(b"new weights!")
    assert _digest(adapter, video, SamplingOptions(frames=8)) != base


def test_key_changes_when_weights_are_copied_in_with_the_old_size_and_mtime(tmp_path, checkpoint):
    """``cp -p`` / ``rsync -a`` of other weights of the same size keep size and mtime; the ctime moves."""
    video = tmp_path / "v.mp4"
    video.write_bytes(b"video")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"A" * 64)
    before = weights.stat()
    first = _digest(_adapter(checkpoint), video, SamplingOptions(frames=8))
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"B" * 64)
    shutil.copy2(other, weights)  # same size; copy2 copies the mtime of ``other``...
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...set back to the old one
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert _digest(_adapter(checkpoint), video, SamplingOptions(frames=8)) != first


def test_key_names_the_hub_commit_of_a_snapshot(tmp_path):
    snapshot = tmp_path / "models--a--b" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert model_id(_adapter(snapshot))["checkpoint"]["revision"] == "0123abcd"


# ----------------------------------------------------------------------------------------------- entries


def _tokens() -> VisualTokens:
    g = torch.Generator().manual_seed(0)
    return VisualTokens(
        features=torch.randn(3, 4, 8, generator=g).to(torch.bfloat16),
        saliency=torch.rand(3, 4, generator=g),
        grid=(2, 2),
        unit_times=[0.0, 0.5, 1.0],
        suffix=torch.randn(1, 8, generator=g).to(torch.bfloat16),
        aligned={"deepstack": torch.randn(3, 4, 2, 8, generator=g)},
        layout={
            "video_grid_thw": torch.tensor([[3, 4, 4]]),
            "second_per_grid_ts": 0.25,
            "seconds": [0.1, 0.7],
        },
        frames_per_unit=2,
    )


KEY = {"format": 1, "video": {"blake2b": "ab" * 32, "size": 5}, "sampling": {"frames": 6}, "model": {"n": 1}}
CLIP = {"indices": [0, 2, 4], "timestamps": [0.0, 0.25, 0.5], "meta": {}, "sampling": {"frames": 6}}


def _build(manifest, fields):
    return manifest, VisualTokens(**fields)


def _stored(tmp_path, key=KEY, tokens=None, cap=DEFAULT_MAX_BYTES, warn=None) -> VideoCache:
    cache = VideoCache(tmp_path / "cache", cap, warn=warn)
    cache.ensure()
    assert cache.store(key, store.encode_entry(key, tokens or _tokens(), CLIP, {"model_name": "m"}))
    return cache


def _same_tokens(a: VisualTokens, b: VisualTokens) -> None:
    for name in ("features", "saliency", "suffix"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.grid == b.grid and isinstance(b.grid, tuple)
    assert a.unit_times == b.unit_times and a.frames_per_unit == b.frames_per_unit
    assert a.aligned.keys() == b.aligned.keys() and torch.equal(
        a.aligned["deepstack"], b.aligned["deepstack"]
    )
    assert torch.equal(a.layout["video_grid_thw"], b.layout["video_grid_thw"])
    assert a.layout["second_per_grid_ts"] == b.layout["second_per_grid_ts"]
    assert a.layout["seconds"] == b.layout["seconds"]


def test_entry_round_trip_keeps_every_tensor_bit_for_bit(tmp_path):
    cache = _stored(tmp_path)
    manifest, tokens = cache.load(KEY, _build)
    _same_tokens(_tokens(), tokens)
    assert manifest["clip"] == CLIP and manifest["info"] == {"model_name": "m"}
    assert cache.load({**KEY, "sampling": {"frames": 7}}, _build) is None  # another key: a plain miss


def _damage_and_load(tmp_path, damage) -> tuple[object, list[str], Path]:
    warnings: list[str] = []
    cache = _stored(tmp_path, warn=warnings.append)
    path = cache.entry_path(KEY)
    damage(path)
    return cache.load(KEY, _build), warnings, path


def _truncate_at(fraction):
    def damage(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return damage


def _flip(offset_of):
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[offset_of(data)] ^= 0x01
        path.write_bytes(bytes(data))

    return damage


def _manifest_start(data: bytes) -> int:
    return len(store.MAGIC) + 8 + 32


@pytest.mark.parametrize(
    "damage",
    [
        _truncate_at(0.0),
        _truncate_at(0.01),
        _truncate_at(0.5),
        _truncate_at(0.999),
        _flip(lambda d: 3),  # the magic
        _flip(lambda d: len(store.MAGIC)),  # the manifest's length
        _flip(lambda d: len(store.MAGIC) + 10),  # the manifest's checksum
        _flip(lambda d: d.index(b"0.25") + 2),  # a timestamp 0.25 -> 0.35: still valid JSON
        _flip(lambda d: len(d) - 1),  # the last byte of the tensors
        _flip(lambda d: len(d) // 2 + 100),  # the payload
        lambda p: p.write_bytes(p.read_bytes() + b"extra"),
        lambda p: p.write_text("not a cache file at all"),
    ],
    ids=[
        "empty",
        "head",
        "half",
        "last-byte",
        "magic",
        "length",
        "checksum",
        "manifest",
        "tail",
        "payload",
        "appended",
        "foreign-text",
    ],  # fmt: skip
)
def test_damaged_entry_is_a_miss_dropped_with_one_warning(tmp_path, damage):
    value, warnings, path = _damage_and_load(tmp_path, damage)
    assert value is None
    assert not path.exists()  # dropped: the next run rebuilds it
    assert len(warnings) == 1 and "\n" not in warnings[0] and "damaged" in warnings[0]


def test_entry_of_another_key_at_this_name_is_refused(tmp_path):
    other = {**KEY, "model": {"n": 2}}
    cache = _stored(tmp_path, key=other)
    shutil.copy(cache.entry_path(other), cache.entry_path(KEY))  # a foreign entry under KEY's name
    warnings: list[str] = []
    cache.warn = warnings.append
    assert cache.load(KEY, _build) is None and len(warnings) == 1
    assert cache.load(other, _build) is not None  # the genuine one still loads


def _rewritten(path: Path, change) -> None:
    """Change the manifest and write the entry again with valid checksums (a consistent liar)."""
    data = path.read_bytes()
    start = _manifest_start(data)
    length = int.from_bytes(data[len(store.MAGIC) : len(store.MAGIC) + 8], "little")
    manifest = json.loads(data[start : start + length])
    change(manifest)
    path.write_bytes(store.assemble(manifest, data[start + length :]))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["tensors"]["features"].update(shape=[3, 4, 9]),
        lambda m: m["tensors"]["features"].update(dtype="float16"),
        lambda m: m["tensors"].pop("suffix"),
        lambda m: m["tokens"].update(suffix=None),  # a tensor in the payload that nothing uses
        lambda m: m["tokens"].update(saliency={"$tensor": "features"}),  # a tensor used twice
        lambda m: m["tokens"].update(grid={"$tuple": [3, 3]}),  # shapes that contradict each other
        lambda m: m["tokens"].update(grid={"$evil": "os.system"}),
        lambda m: m.update(format=99),
    ],
)
def test_manifest_that_contradicts_the_payload_is_refused(tmp_path, change):
    warnings: list[str] = []
    cache = _stored(tmp_path, warn=warnings.append)
    _rewritten(cache.entry_path(KEY), change)
    assert cache.load(KEY, _build) is None and len(warnings) == 1
    assert not cache.entry_path(KEY).exists()


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["BOOM_PATH"]),))


def test_a_pickle_in_the_cache_is_never_executed(tmp_path, monkeypatch):
    boom = tmp_path / "executed"
    monkeypatch.setenv("BOOM_PATH", str(boom))
    cache = _stored(tmp_path, warn=lambda text: None)
    for payload in (pickle.dumps(_Boom()), None):
        path = cache.entry_path(KEY)
        if payload is None:
            torch.save({"x": _Boom()}, path)  # a torch.save file (a zip of pickles)
        else:
            path.write_bytes(payload)
        assert cache.load(KEY, _build) is None
    assert not boom.exists()


# ----------------------------------------------------------------------------------------------- writes


def test_a_failed_write_leaves_neither_entry_nor_temp_file(tmp_path, monkeypatch):
    warnings: list[str] = []
    cache = VideoCache(tmp_path / "cache", warn=warnings.append)
    cache.ensure()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.os, "replace", crash)
    assert not cache.store(KEY, store.encode_entry(KEY, _tokens(), CLIP, {}))
    assert sorted(p.name for p in cache.folder.iterdir()) == [store.MARKER]
    assert len(warnings) == 1 and "No space left" in warnings[0]


def test_half_written_temp_files_are_never_read_and_stale_ones_are_removed(tmp_path):
    cache = _stored(tmp_path)
    real = cache.entry_path(KEY)
    fresh = cache.folder / ".tmp-fresh.part"
    stale = cache.folder / ".tmp-stale.part"
    for temp in (fresh, stale):
        temp.write_bytes(real.read_bytes()[:100])
    old = os.stat(stale).st_mtime - store.STALE_TEMP_S - 10
    os.utime(stale, (old, old))
    assert [e.path for e in cache.entries()] == [real]
    cache.evict()
    assert fresh.exists() and not stale.exists()  # a fresh one may belong to a writer at work


def test_write_is_atomic_replace_of_a_temp_file_in_the_same_folder(tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", spy)
    cache = _stored(tmp_path)
    (src, dst), = calls  # fmt: skip
    assert src.parent == dst.parent == cache.folder and src.name.startswith(".tmp-")
    assert dst == cache.entry_path(KEY) and not src.exists()


# ----------------------------------------------------------------------------------------------- LRU


def _key(i: int) -> dict:
    return {**KEY, "sampling": {"frames": i}}


def test_lru_evicts_least_recently_used_until_under_the_cap(tmp_path):
    size = len(store.encode_entry(_key(0), _tokens(), CLIP, {"model_name": "m"}))
    cache = VideoCache(tmp_path / "cache", int(size * 2.5), warn=None)
    cache.ensure()
    for i in range(2):
        cache.store(_key(i), store.encode_entry(_key(i), _tokens(), CLIP, {"model_name": "m"}))
        os.utime(cache.entry_path(_key(i)), (1000 + i, 1000 + i))  # entry 0 older than entry 1
    assert cache.load(_key(0), _build) is not None  # a hit makes entry 0 the most recently used
    assert os.stat(cache.entry_path(_key(0))).st_mtime > 1001
    cache.store(_key(2), store.encode_entry(_key(2), _tokens(), CLIP, {"model_name": "m"}))
    assert [cache.entry_path(_key(i)).exists() for i in range(3)] == [True, False, True]
    assert cache.total_bytes() <= cache.max_bytes


def test_an_entry_bigger_than_the_cap_is_not_stored(tmp_path):
    cache = VideoCache(tmp_path / "cache", 100, warn=None)
    cache.ensure()
    assert not cache.store(KEY, store.encode_entry(KEY, _tokens(), CLIP, {}))
    assert cache.entries() == []


def test_eviction_tolerates_files_vanishing(tmp_path, monkeypatch):
    cache = _stored(tmp_path)
    ghost = store.CacheEntry(cache.folder / ("0" * 40 + ".hvc"), 10**9, 0.0)
    real = cache.entries()
    monkeypatch.setattr(VideoCache, "entries", lambda self, manifests=False: [ghost, *real])
    cache.max_bytes = 1
    cache.evict()  # the ghost is gone already: no error
    assert not cache.entry_path(KEY).exists()


# ----------------------------------------------------------------------------------------------- folder


def test_open_cache_falls_back_to_no_cache_with_one_warning(tmp_path):
    warnings: list[str] = []
    (tmp_path / "file").write_text("x")
    assert open_cache(False, None, str(tmp_path / "file"), warn=warnings.append) is None
    assert len(warnings) == 1 and "video cache off" in warnings[0]
    foreign = tmp_path / "foreign"
    (foreign / "videos").mkdir(parents=True)
    (foreign / "videos" / "thesis.tex").write_text("mine")
    assert open_cache(False, None, str(foreign), warn=warnings.append) is None
    assert len(warnings) == 2 and "not a holitom video cache folder" in warnings[1]
    assert (foreign / "videos" / "thesis.tex").read_text() == "mine"


def test_open_cache_options(tmp_path):
    assert open_cache(True, None, str(tmp_path / "c")) is None and not (tmp_path / "c").exists()
    with pytest.raises(ConfigError):
        open_cache(True, "lots", str(tmp_path / "c"))  # a bad size fails even with --no-cache
    cache = open_cache(False, "1MB", str(tmp_path / "c"))
    assert cache.max_bytes == 10**6 and cache.is_ours()


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_an_entry_that_is_not_a_regular_file_never_blocks(tmp_path, kind):
    """A FIFO at an entry's name would block open() forever; it is a damaged entry (dropped), listed
    without details, and ``load`` returns at once."""
    warnings: list[str] = []
    cache = _stored(tmp_path, warn=warnings.append)
    path = cache.entry_path(KEY)
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    assert [e.manifest for e in cache.entries(manifests=True)] == [None]  # listing does not block either
    assert cache.load(KEY, _build) is None
    if kind == "fifo":
        assert not path.exists() and len(warnings) == 1  # dropped, one warning


def test_clear_removes_only_entry_files(tmp_path):
    cache = _stored(tmp_path)
    (cache.folder / "notes.txt").write_text("keep me")
    assert cache.clear()[0] == 1
    assert sorted(p.name for p in cache.folder.iterdir()) == [store.MARKER, "notes.txt"]
    (cache.folder / store.MARKER).unlink()
    with pytest.raises(ConfigError):
        cache.clear()  # no marker: not ours


# ----------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline.load(str(tiny_model_dir), device="cpu", dtype="float32")


def test_cache_hit_equals_the_vision_tower(pipe, make_video, tmp_path):
    video = make_video(frames=12)
    sampling = SamplingOptions(frames=4)
    reference = pipe.prepare_video(video, sampling)  # the unmodified path
    cache = open_cache(False, None, str(tmp_path))
    first = prepare_video_cached(pipe, video, sampling, cache=cache)
    hit = prepare_video_cached(pipe, video, sampling, cache=cache)
    assert (first.source, hit.source) == ("vision", "cache")
    _same_tokens_loose(reference.tokens, hit.tokens)
    assert hit.clip.frames is None and hit.decode_s == 0.0
    assert hit.clip.indices == reference.clip.indices and hit.clip.timestamps == reference.clip.timestamps
    assert hit.clip.meta == reference.clip.meta and hit.clip.sampling == reference.clip.sampling
    assert hit.vision_flops == reference.vision_flops and hit.model_name == reference.model_name
    assert pipe.ask(hit, "What moves?").text == pipe.ask(reference, "What moves?").text
    with_pixels = prepare_video_cached(pipe, video, sampling, cache=cache, need_pixels=True)
    assert with_pixels.source == "cache"
    assert (with_pixels.clip.frames == load_video(video, num_frames=4).frames).all()


def _same_tokens_loose(a: VisualTokens, b: VisualTokens) -> None:
    assert torch.equal(a.features, b.features) and torch.equal(a.saliency, b.saliency)
    assert a.grid == b.grid and a.unit_times == b.unit_times
    assert (a.suffix is None) == (b.suffix is None) and (a.suffix is None or torch.equal(a.suffix, b.suffix))
    assert b.features.device == a.features.device


def test_no_cache_is_prepare_video(pipe, make_video, tmp_path):
    video = make_video(frames=12)
    prepared = prepare_video_cached(pipe, video, SamplingOptions(frames=4), cache=None)
    assert prepared.source == "vision" and prepared.clip.frames is not None


def test_a_file_changing_while_prepared_is_not_stored(pipe, make_video, tmp_path, monkeypatch):
    video = make_video(frames=12, path=tmp_path / "v.mp4")
    cache = open_cache(False, None, str(tmp_path / "c"))
    real = Pipeline.prepare_video

    def and_replace(self, path, sampling, on_progress=None):
        out = real(self, path, sampling, on_progress)
        make_video(frames=14, pattern="static", path=video)  # replaced under the same name meanwhile
        return out

    monkeypatch.setattr(Pipeline, "prepare_video", and_replace)
    prepare_video_cached(pipe, video, SamplingOptions(frames=4), cache=cache)
    assert cache.entries() == []
