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
