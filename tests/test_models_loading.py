"""Checkpoint resolution and loading: local folders, hub ids (offline here), errors, cache listing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from holitom_cli.errors import ConfigError, ModelError
from holitom_cli.models import (
    SUPPORTED_FAMILIES,
    download_model,
    list_cached_models,
    load_model,
    resolve_device,
    resolve_dtype,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32")


def test_load_local_folder(tiny, tiny_model_dir):
    assert tiny.family == "llava_onevision"
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    assert tiny.num_layers == 6 and tiny.tokens_per_frame == 49 and tiny.grid == (7, 7)
    assert tiny.model.config.text_config._attn_implementation == "sdpa"
    assert tiny.model.config.vision_config._attn_implementation == "sdpa"
    assert tiny.path == tiny_model_dir
    assert tiny.describe()["dtype"] == "float32"


def test_explicit_dtype(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert next(model.model.model.vision_tower.parameters()).dtype == torch.bfloat16


def test_auto_device_and_dtype_on_cpu():
    # auto picks an accelerator when there is one: the expectation follows the machine, never assumes no GPU
    if torch.cuda.is_available():
        expected = "cuda"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        expected = "mps"
    else:
        expected = "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda_ignores_emulated_bf16(monkeypatch, native, expected):
    # torch reports bf16 on pre-Ampere GPUs unless emulation is excluded: those must get fp16
    def is_bf16_supported(including_emulation=True):
        return True if including_emulation else native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_dtype("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize(
    "kwargs", [{"device": "tpu"}, {"device": "cuda"}, {"dtype": "int8"}, {"quantize": "2bit"}]
)
def test_bad_settings(tiny_model_dir, kwargs):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so device='cuda' is valid here")
    with pytest.raises(ConfigError) as info:
        load_model(str(tiny_model_dir), **kwargs)
    assert info.value.hint


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path))
    assert "bert" in str(info.value)
    assert all(name in info.value.hint for name in SUPPORTED_FAMILIES)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "nope"))


def test_damaged_weights(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError) as info:
        load_model(str(broken), dtype="float32")
    assert info.value.hint


def test_offline_hub_id_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as info:
        load_model("acme/not-downloaded", offline=True)
    assert "cache" in str(info.value)
    assert "holitom download" in info.value.hint


def test_hub_errors_become_model_errors(monkeypatch):
    from huggingface_hub import errors

    import holitom_cli.models.loading as loading

    class FakeResponse:
        status_code = 404
        headers: dict = {}
        request = None

    def fail(exc):
        def snapshot_download(*args, **kwargs):
            raise exc

        return snapshot_download

    cases = [
        (errors.RepositoryNotFoundError("missing", response=FakeResponse()), "no model named"),
        (errors.RevisionNotFoundError("missing", response=FakeResponse()), "revision"),
        (errors.LocalEntryNotFoundError("offline"), "cannot be reached"),
    ]
    import huggingface_hub

    for exc, words in cases:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail(exc))
        with pytest.raises(ModelError, match=words):
            loading.resolve_checkpoint("acme/model", revision="v1")


def test_download_model_uses_snapshot_download(monkeypatch, tiny_model_dir):
    import huggingface_hub

    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert download_model("acme/tiny-ov", revision="abc") == tiny_model_dir
    assert seen["repo_id"] == "acme/tiny-ov" and seen["revision"] == "abc"
    assert seen["local_files_only"] is False
    assert "*.safetensors" in seen["allow_patterns"] and not any("bin" in p for p in seen["allow_patterns"])


def _fake_cache_repo(root, repo_id, model_type):
    """Lay out one model repository the way huggingface_hub stores it (blobs, snapshots, refs)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    data = json.dumps({"model_type": model_type}).encode()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    snapshot = repo / "snapshots" / commit
    blob.parent.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    blob.write_bytes(data)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / "config.json")
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_list_cached_models(tmp_path):
    assert list_cached_models(tmp_path / "no-cache-here") == []
    commit = _fake_cache_repo(tmp_path, "acme/tiny-ov", "llava_onevision")
    _fake_cache_repo(tmp_path, "acme/bert", "bert")
    found = {m.repo_id: m for m in list_cached_models(tmp_path)}
    assert set(found) == {"acme/tiny-ov", "acme/bert"}
    assert found["acme/tiny-ov"].supported and not found["acme/bert"].supported
    assert found["acme/tiny-ov"].revisions == (commit[:12],)
    assert found["acme/tiny-ov"].refs == ("main",)
    assert found["acme/tiny-ov"].to_dict()["model_type"] == "llava_onevision"


# ----------------------------------------------------------------------------- hostile inputs (issue 9)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"[]", "array"),
        (b'"x"', "string"),
        (b"null", "null"),
        (b"3", "number"),
        (b"{bad", "not valid json"),
        (b"\xff\xfe\x00", "not utf-8"),
        (b"{}", "no model_type"),
        (b'{"model_type": 3}', "unsupported"),
        (b'{"model_type": ["llava_onevision"]}', "unsupported"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid json"),  # deep nesting: RecursionError in json
    ],
    ids=["list", "string", "null", "number", "invalid", "binary", "no-type", "int-type", "list-type", "deep"],
)
def test_broken_config_json_is_a_model_error(tmp_path, content, words):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path), device="cpu")
    assert words in info.value.message.lower(), info.value.message
    assert info.value.hint


def test_oversized_or_unreadable_config_json(tmp_path, monkeypatch):
    import pathlib

    import holitom_cli.models.loading as loading

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llava_onevision"}))
    monkeypatch.setattr(loading, "MAX_CONFIG_BYTES", 10)
    with pytest.raises(ModelError, match="too large"):
        loading.read_model_type(tmp_path)
    monkeypatch.undo()
    real_open = pathlib.Path.open

    def denied(self, *args, **kwargs):  # root reads any file, so simulate what other users see
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", denied)
    with pytest.raises(ModelError, match="permission denied"):
        loading.read_model_type(tmp_path)


def test_list_cached_models_survives_a_config_that_is_not_an_object(tmp_path):
    _fake_cache_repo(tmp_path, "acme/odd", "llava_onevision")
    snapshot = next((tmp_path / "models--acme--odd" / "snapshots").iterdir())
    (snapshot / "config.json").write_text("[]")  # through the symlink, into the blob
    (found,) = list_cached_models(tmp_path)
    assert found.repo_id == "acme/odd" and found.model_type is None and not found.supported


@pytest.mark.parametrize(
    "device", ["cpu:junk", "foo", "", "   ", "cuda:x", "auto:1", "cpu:1", "cuda:99999", "cuda:-1", "mps:7"]
)
def test_bad_devices_are_config_errors(device):
    with pytest.raises(ConfigError) as info:
        resolve_device(device)
    assert info.value.hint


def test_cuda_index_beyond_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="2 CUDA GPU"):
        resolve_device("cuda:99")


def test_device_names_are_case_and_space_insensitive():
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("model", ["~no-such-user-here/model", "a/" + "b" * 300])
def test_odd_model_names_are_model_errors(model):
    with pytest.raises(ModelError):
        load_model(model, device="cpu", offline=True)


def test_model_folder_with_a_non_utf8_name(tiny_model_dir, tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"model\xff")
    shutil.copytree(os.fsencode(tiny_model_dir), folder)
    with pytest.raises(ModelError, match="not valid UTF-8") as info:
        load_model(os.fsdecode(folder), device="cpu")
    assert "rename" in info.value.hint
