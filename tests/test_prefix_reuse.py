"""Prefix reuse (issue 11 item 3): a later question about a prepared video reuses the KV of the prompt prefix
it shares with an earlier one, and its answer is token for token the cold run's.

The cold reference is a ``Pipeline(..., reuse_prefix=False)`` on a freshly prepared video: every question
prefilled whole (that path is checked against the unmodified transformers models in test_models_*). Each
family runs under SDPA and eager, without compression, with HoliTom (inner stage on) and with ``--no-inner``.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from holitom_cli.compression import get_preset
from holitom_cli.models import load_model
from holitom_cli.models.prefix_reuse import PrefixState, PrefixStore, common_prefix
from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions

FRAMES, NEW = 8, 10
QUESTIONS = [
    "what is happening in this scene?",
    "which colour is the circle?",
    "what is happening in this scene?",
]
FAMILIES = ["llava_onevision", "qwen2_5_vl", "qwen3_vl"]
IMPLS = ["sdpa", "eager"]
SETTINGS = ["none", "balanced", "no-inner"]
HAS_QWEN3 = hasattr(transformers, "Qwen3VLForConditionalGeneration")


def _setting(name: str):
    if name == "none":
        return None
    if name == "no-inner":
        return get_preset("balanced").replace(inner_layer=None)
    return get_preset(name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from holitom_cli.models.random_model import save_random_checkpoint
    from holitom_cli.models.random_qwen import save_random_qwen

    root = tmp_path_factory.mktemp("prefix-reuse")
    out = {
        "llava_onevision": save_random_checkpoint(root / "llava", shape="tiny", dtype="float32", seed=0),
        "qwen2_5_vl": save_random_qwen(root / "qwen2_5_vl", "qwen2_5_vl-tiny"),
    }
    if HAS_QWEN3:
        out["qwen3_vl"] = save_random_qwen(root / "qwen3_vl", "qwen3_vl-tiny")
    return out


@pytest.fixture(scope="module")
def clip(make_video):
    return make_video(frames=24, size=(160, 96), fps=12.0, pattern="moving")


_ADAPTERS: dict = {}


def adapter_for(checkpoints, family: str, impl: str):
    if family == "qwen3_vl" and not HAS_QWEN3:
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL")
    key = (str(checkpoints[family]), impl)
    if key not in _ADAPTERS:
        adapter = load_model(str(checkpoints[family]), device="cpu", dtype="float32")
        adapter.model.set_attn_implementation(impl)
        _ADAPTERS[key] = adapter
    return _ADAPTERS[key]


def cold_answer(adapter, video, question, cfg, history=()):
    """The whole prompt prefilled (a pipeline that neither reads nor writes the video's prefix states)."""
    pipe = Pipeline(adapter, reuse_prefix=False)
    return pipe.ask(video, question, cfg, GenerationOptions(max_new_tokens=NEW), history=history)


def _inner(answer):
    inner = answer.stats.inner
    return None if inner is None else (inner.visual_before, inner.visual_after, inner.kv_lengths)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_later_questions_reuse_the_prefix_and_answer_as_a_cold_run(checkpoints, clip, family, impl, setting):
    adapter = adapter_for(checkpoints, family, impl)
    cfg = _setting(setting)
    pipe = Pipeline(adapter)
    video = pipe.prepare_video(clip, SamplingOptions(frames=FRAMES))
    warm = [pipe.ask(video, q, cfg, GenerationOptions(max_new_tokens=NEW)) for q in QUESTIONS]
    cold = [cold_answer(adapter, video, q, cfg) for q in QUESTIONS]
    for w, c in zip(warm, cold, strict=True):
        assert w.token_ids == c.token_ids
        assert w.text == c.text
        assert _inner(w) == _inner(c)
        assert w.stats.tokens == c.stats.tokens
        assert c.stats.reused["prefix_kv_tokens"] == 0
    reused = [w.stats.reused["prefix_kv_tokens"] for w in warm]
    assert reused[0] == 0 and warm[0].stats.reused["video"] is False
    span = pipe._outer(video, cfg).span
    for i in (1, 2):
        inputs = adapter.build_prompt(QUESTIONS[i], span)
        ids, n = inputs.input_ids[0], int(inputs.input_ids.shape[1])
        first = adapter.build_prompt(QUESTIONS[0], span).input_ids[0]
        # the longest common prefix with the first prompt, capped to leave two tokens to run
        assert reused[i] == min(common_prefix(first, ids), n - 2)
        assert reused[i] >= int(inputs.visual_start) + int(inputs.visual_len) > 0
        assert warm[i].stats.reused["video"] is True


@pytest.mark.parametrize("family", FAMILIES)
def test_a_warm_prefill_runs_only_the_tokens_after_the_prefix(checkpoints, clip, family):
    adapter = adapter_for(checkpoints, family, "sdpa")
    cfg = get_preset("balanced")
    pipe = Pipeline(adapter)
    video = pipe.prepare_video(clip, SamplingOptions(frames=FRAMES))
    pipe.ask(video, QUESTIONS[0], cfg, GenerationOptions(max_new_tokens=2))
    seen: list[int] = []
    layer0 = adapter.decoder.layers[0]
    hook = layer0.register_forward_pre_hook(
        lambda m, a, k: seen.append(int((a[0] if a else k["hidden_states"]).shape[1])), with_kwargs=True
    )
    try:
        answer = pipe.ask(video, QUESTIONS[1], cfg, GenerationOptions(max_new_tokens=2))
    finally:
        hook.remove()
    prompt = answer.stats.prompt_tokens
    assert seen[0] == prompt - answer.stats.reused["prefix_kv_tokens"] < prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_a_conversation_reuses_the_video_prefix(checkpoints, clip, family):
    adapter = adapter_for(checkpoints, family, "sdpa")
    cfg = get_preset("balanced")
    pipe = Pipeline(adapter)
    video = pipe.prepare_video(clip, SamplingOptions(frames=FRAMES))
    first = pipe.ask(video, QUESTIONS[0], cfg, GenerationOptions(max_new_tokens=NEW))
    history = [(QUESTIONS[0], first.text)]
    follow = pipe.ask(video, "and then?", cfg, GenerationOptions(max_new_tokens=NEW), history=history)
    cold = cold_answer(adapter, video, "and then?", cfg, history=history)
    assert follow.token_ids == cold.token_ids
    assert follow.stats.reused["prefix_kv_tokens"] > 0
    assert follow.stats.prompt_tokens > first.stats.prompt_tokens  # the earlier turn is in the prompt


def test_reuse_off_reuses_nothing(checkpoints, clip):
    adapter = adapter_for(checkpoints, "llava_onevision", "sdpa")
    pipe = Pipeline(adapter, reuse_prefix=False)
    video = pipe.prepare_video(clip, SamplingOptions(frames=FRAMES))
    answers = [pipe.ask(video, q, None, GenerationOptions(max_new_tokens=2)) for q in QUESTIONS[:2]]
    assert [a.stats.reused["prefix_kv_tokens"] for a in answers] == [0, 0]
    assert video._prefix is None


# ------------------------------------------------------------------------------------------- the store


def _state(ids, visual_end=3):
    kv = [(torch.zeros(1, 1, len(ids), 2), torch.zeros(1, 1, len(ids), 2))]
    return PrefixState(ids=torch.tensor(ids), kv=kv, visual_end=visual_end)


def test_common_prefix():
    assert common_prefix(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])) == 2
    assert common_prefix(torch.tensor([1, 2]), torch.tensor([1, 2, 3])) == 2
    assert common_prefix(torch.tensor([9]), torch.tensor([1])) == 0
    assert common_prefix(torch.tensor([], dtype=torch.long), torch.tensor([1])) == 0


def test_store_lookup_needs_the_whole_video_and_leaves_two_tokens():
    store = PrefixStore()
    store.save(("a",), _state([1, 2, 3, 4, 5, 6]))
    assert store.lookup(("b",), torch.tensor([1, 2, 3, 4, 9]), 3) is None  # another setting
    state, n = store.lookup(("a",), torch.tensor([1, 2, 3, 4, 9, 9]), 3)
    assert n == 4 and state.ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert store.lookup(("a",), torch.tensor([1, 2, 3, 4, 5, 6]), 3)[1] == 4  # same prompt: n - 2
    assert store.lookup(("a",), torch.tensor([1, 2, 7, 4, 5, 6]), 3) is None  # differs inside the video
    assert store.lookup(("a",), torch.tensor([1, 2, 3, 4]), 3) is None  # would leave one token to run


def test_store_keeps_the_most_recent_settings():
    store = PrefixStore(capacity=2)
    for key in ("a", "b", "c"):
        store.save((key,), _state([1, 2, 3, 4, 5]))
    assert len(store) == 2 and store.lookup(("a",), torch.tensor([1, 2, 3, 4, 5, 6]), 3) is None
    assert store.lookup(("c",), torch.tensor([1, 2, 3, 4, 5, 6]), 3) is not None
    assert _state([1, 2]).nbytes == 2 * 2 * 2 * 4
