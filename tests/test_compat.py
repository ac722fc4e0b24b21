"""The transformers seam (holitom_cli.models.compat) against the installed transformers.

These tests pin down what the inner stage and the LLaVA adapter rely on, so that a transformers release that
renames an internal fails here by name (5.24 moved the decoder layers' cache from ``past_key_values=`` to
``cache=``; hooks that read the old keyword silently saw no cache).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from holitom_cli.errors import ModelError
from holitom_cli.models import compat
from holitom_cli.models.base import VisualSpan


def _tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


def _captured_layer_kwargs(model: Qwen2ForCausalLM, cache: DynamicCache) -> dict:
    seen: dict = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.arange(6)[None], **{compat.cache_keyword(model): cache}, use_cache=True)
    finally:
        handle.remove()
    return seen


def test_layer_cache_finds_the_cache_the_installed_version_passes_to_decoder_layers() -> None:
    model = _tiny_qwen2()
    cache = DynamicCache(config=model.config)
    kwargs = _captured_layer_kwargs(model, cache)
    assert compat.layer_cache(kwargs) is cache
    # the keyword the model really used is the one cache_keyword reads off the layer's signature
    used = [name for name, value in kwargs.items() if value is cache]
    assert used == [compat.cache_keyword(model.model.layers[0])]


def test_cache_keyword_knows_both_spellings_and_rejects_others() -> None:
    class New(torch.nn.Module):
        def forward(self, hidden, cache=None):
            return hidden

    class Old(torch.nn.Module):
        def forward(self, hidden, past_key_values=None):
            return hidden

    class Unknown(torch.nn.Module):
        def forward(self, hidden, kv_store=None):
            return hidden

    assert compat.cache_keyword(New()) == "cache"
    assert compat.cache_keyword(Old()) == "past_key_values"
    with pytest.raises(ModelError, match="kv_store|none of"):
        compat.cache_keyword(Unknown())
    assert compat.layer_cache({"past_key_values": 1}) == 1
    assert compat.layer_cache({"cache": 2, "past_key_values": None}) == 2
    assert compat.layer_cache({"hidden_states": 3}) is None


def test_output_cache_reads_the_generate_output_field() -> None:
    model = _tiny_qwen2()
    ids = torch.arange(5)[None]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = compat.output_cache(out)
    assert cache is not None
    # 5 prompt tokens + 2 fed back (the last sampled token is never run through the model)
    assert [cache.get_seq_length(i) for i in range(2)] == [7, 7]
    assert compat.output_cache(None) is None
    assert compat.output_cache(object()) is None


def test_version_range() -> None:
    compat.check_transformers_version()  # the installed version is one we test
    compat.check_transformers_version((5, 20, 0))
    for bad in [(5, 12, 0), (5, 0, 0), (4, 57, 6), (6, 0, 0)]:
        with pytest.raises(ModelError, match="not supported"):
            compat.check_transformers_version(bad)
    assert compat._parse("5.24.0") == (5, 24, 0)
    assert compat._parse("5.25.0.dev0") == (5, 25, 0)
    assert compat._parse("5.3") == (5, 3, 0)


def test_declared_range_matches_the_seam() -> None:
    import pathlib
    import tomllib

    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("transformers")]
    assert spec.replace(" ", "") == "transformers>=" + ".".join(map(str, compat.TESTED_MIN[:2])) + ",<6"


class _OldVideoModel:
    """A get_video_features with the 5.0-5.12 signature: the first argument is called pixel_values."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.calls: list[str] = []

    def get_video_features(self, pixel_values, vision_feature_layer=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        self.calls.append("pixel_values")
        frames = pixel_values.shape[1]
        return BaseModelOutputWithPooling(pooler_output=torch.zeros(1, frames * self.tokens + self.extra, 4))

    extra = 1


def test_video_features_adapts_the_keyword_and_checks_the_token_count() -> None:
    fake = _OldVideoModel(tokens=3)
    out = compat.video_features(fake, torch.zeros(1, 2, 3, 8, 8), tokens_per_frame=3)
    assert out.shape == (7, 4) and fake.calls == ["pixel_values"]
    fake.extra = 0  # a version whose pooler_output lacks the newline must fail loudly, not shift tokens
    with pytest.raises(ModelError, match="expected 2 x 3 \\+ 1"):
        compat.video_features(fake, torch.zeros(1, 2, 3, 8, 8), tokens_per_frame=3)


def test_video_features_on_the_real_llava_class(tiny_model_dir) -> None:
    from holitom_cli.models import load_model

    vlm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    pixels = torch.zeros(1, 2, 3, vlm.preprocessing.size, vlm.preprocessing.size)
    out = compat.video_features(vlm.model.model, pixels, vlm.tokens_per_frame)
    assert out.shape == (2 * vlm.tokens_per_frame + 1, vlm.language_dims().hidden_size)
    # the last row is the model's image_newline parameter itself
    torch.testing.assert_close(out[-1], vlm.model.model.image_newline.to(out.dtype))


def test_an_armed_inner_stage_that_does_not_fire_is_an_error(tiny_model_dir, monkeypatch) -> None:
    """The 5.24 failure mode: hooks look for the cache under a keyword the layers no longer receive."""
    from holitom_cli.models import inner_merge, load_model

    vlm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    num_visual = 5
    embeds = torch.randn(num_visual, vlm.language_dims().hidden_size)
    where = torch.full((num_visual,), -1)
    span = VisualSpan(embeds, where, where, where)
    inputs = vlm.build_prompt("what happens?", span)
    ok = vlm.generate(inputs, span, max_new_tokens=2, inner_layer=2, inner_prune_ratio=0.5)
    assert ok.inner_stats.kv_lengths is not None
    monkeypatch.setattr(inner_merge, "layer_cache", lambda kwargs: None)
    with pytest.raises(ModelError, match="armed but did not run"):
        vlm.generate(inputs, span, max_new_tokens=2, inner_layer=2, inner_prune_ratio=0.5)
