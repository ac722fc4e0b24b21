"""The generic inner stage on a Qwen3 text decoder (q/k RMS norms per head before RoPE), issue 10.

The adapter-side declaration (``AttentionRecipe(("Qwen3Model",), qk_norm=True)``) is all a new decoder needs.
Expected values come from an independent computation written here: decoder layers run by hand with an
explicit causal mask, layer K-1's full eager attention matrix recomputed from its projections WITH the q/k
norms (its last row gives the scores), a plain sequential averaging loop, then layers K.. on the shortened
sequence at the kept tokens' original positions.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from holitom_cli.errors import ConfigError, ModelError
from holitom_cli.models.inner_merge import AttentionRecipe, attach_inner_merge

N_LAYERS, PROMPT_LEN, V_START, V_LEN, VOCAB = 4, 20, 3, 10, 300
RECIPE = AttentionRecipe(decoders=("Qwen3Model",), qk_norm=True)


def make_model(impl: str, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # q/k norm weights far from 1, so leaving the norms out changes the scores
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(torch.rand(norm.weight.shape) * 3 + 0.1)
    model.set_attn_implementation(impl)
    return model


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request) -> Qwen3ForCausalLM:
    return make_model(request.param)


def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ independent reference
def additive_causal(q: int) -> torch.Tensor:
    allowed = torch.ones(q, q).tril().bool()
    return torch.zeros(1, 1, q, q).masked_fill(~allowed, torch.finfo(torch.float32).min)


def run_layers(model, hidden, layer_ids, positions) -> torch.Tensor:
    cos_sin = model.model.rotary_emb(hidden, positions)
    for i in layer_ids:
        hidden = model.model.layers[i](
            hidden,
            attention_mask=additive_causal(hidden.shape[1]),
            position_embeddings=cos_sin,
            position_ids=positions,
        )
    return hidden


def attention_matrix(model, layer_id, hidden, positions, norms: bool = True) -> torch.Tensor:
    """(H, q, q) eager attention probabilities of one layer, q/k norms per head before RoPE."""
    layer, cfg = model.model.layers[layer_id], model.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = layer.input_layernorm(hidden)[0]  # (q, C)
    q = layer.self_attn.q_proj(x).view(-1, heads, d)
    k = layer.self_attn.k_proj(x).view(-1, kv, d)
    if norms:
        q, k = layer.self_attn.q_norm(q), layer.self_attn.k_norm(k)
    q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, q, d), (KV, q, d)
    cos, sin = model.model.rotary_emb(hidden, positions)  # (1, q, d)

    def rope(t):
        return t * cos + torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1) * sin

    q, k = rope(q), rope(k).repeat_interleave(heads // kv, dim=0)
    logits = q @ k.transpose(1, 2) / d**0.5 + additive_causal(x.shape[0])[0]
    return torch.softmax(logits, -1)


def sequential_merge(hidden, scores, prune_ratio):
    num = hidden.shape[0]
    keep = max(1, round(num * (1 - prune_ratio)))
    kept = sorted(sorted(range(num), key=lambda i: (-float(scores[i]), i))[:keep])
    out = hidden.clone()
    for i in range(num):
        if i not in kept:
            sims = [float(torch.cosine_similarity(hidden[i], hidden[t], dim=0)) for t in kept]
            target = kept[sims.index(max(sims))]
            out[target] = (out[target] + out[i]) / 2
    return out[kept], kept


SPAN = list(range(V_START, V_START + V_LEN))
#: visual tokens interleaved with text (as Qwen3-VL's timestamps interleave the temporal patches)
INTERLEAVED = [3, 4, 5, 8, 9, 10, 13, 14, 15, 16]


def reference(model, ids, k, prune, n_prompt=None, visual=SPAN):
    """(last-position logits, scores (M,), kept) of a no-cache run with the merge at layer k.

    ``visual``: ascending prompt positions of the visual tokens; the others are text and stay.
    """
    n_prompt = ids.shape[1] if n_prompt is None else n_prompt
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        hidden = run_layers(model, model.model.embed_tokens(ids), range(k - 1), positions)
        probs = attention_matrix(model, k - 1, hidden[:, :n_prompt], positions[:, :n_prompt])
        scores = probs[:, -1, visual].mean(0)
        hidden = run_layers(model, hidden, [k - 1], positions)
        merged, kept = sequential_merge(hidden[0, visual], scores, prune)
        rows = hidden[0].clone()
        rows[[visual[t] for t in kept]] = merged
        keep = [i for i in range(ids.shape[1]) if i not in visual or visual.index(i) in kept]
        hidden = run_layers(model, rows[keep][None], range(k, N_LAYERS), positions[:, keep])
        return model.lm_head(model.model.norm(hidden))[0, -1], scores, kept


# ------------------------------------------------------------------------------------ tests
def test_reference_runs_the_unpatched_model(model) -> None:
    """The hand-run layers reproduce the model itself (so the reference below is a fair one)."""
    ids = prompt()
    positions = torch.arange(PROMPT_LEN)[None]
    with torch.no_grad():
        hidden = run_layers(model, model.model.embed_tokens(ids), range(N_LAYERS), positions)
        expected = model.lm_head(model.model.norm(hidden))[0, -1]
        torch.testing.assert_close(model(ids).logits[0, -1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prefill_equals_hand_run_reference_with_qk_norms(model, k) -> None:
    ids = prompt()
    expected, scores, kept = reference(model, ids, k, 0.5)
    with attach_inner_merge(model.model, layer=k, prune_ratio=0.5, recipe=RECIPE) as handle, torch.no_grad():
        handle.arm(V_START, V_LEN)
        logits = model(ids, use_cache=False).logits[0, -1]
    torch.testing.assert_close(handle.scores, scores, atol=1e-6, rtol=1e-5)
    assert handle.kept_index.tolist() == kept
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # the norms matter: scores recomputed without them are different (this test can fail)
    positions = torch.arange(PROMPT_LEN)[None]
    with torch.no_grad():
        hidden = run_layers(model, model.model.embed_tokens(ids), range(k - 1), positions)
        plain = attention_matrix(model, k - 1, hidden, positions, norms=False)
    assert not torch.allclose(plain[:, -1, V_START : V_START + V_LEN].mean(0), scores, atol=1e-3)


@pytest.mark.parametrize("k", [1, 3])
def test_interleaved_visual_positions_equal_the_reference(model, k) -> None:
    """arm_positions: only the visual positions are scored and merged, the text between them stays."""
    ids = prompt(4)
    expected, scores, kept = reference(model, ids, k, 0.5, visual=INTERLEAVED)
    with attach_inner_merge(model.model, layer=k, prune_ratio=0.5, recipe=RECIPE) as handle, torch.no_grad():
        handle.arm_positions(INTERLEAVED)
        logits = model(ids, use_cache=True).logits[0, -1]
    torch.testing.assert_close(handle.scores, scores, atol=1e-6, rtol=1e-5)
    assert handle.kept_index.tolist() == kept and handle.stats.visual_before == len(INTERLEAVED)
    assert handle.stats.kv_lengths == [PROMPT_LEN] * k + [PROMPT_LEN - 5] * (N_LAYERS - k)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    contiguous, _, _ = reference(model, ids, k, 0.5)  # merging a contiguous span instead differs
    assert not torch.allclose(logits, contiguous, atol=1e-3)
    with attach_inner_merge(model.model, layer=k, prune_ratio=0.5, recipe=RECIPE) as handle:
        for bad in ([], [4, 3], [5, 5], [-1, 2]):
            with pytest.raises(ConfigError):
                handle.arm_positions(bad)


def test_generate_equals_greedy_loop_over_the_recompute(model) -> None:
    ids, k, steps = prompt(2), 2, 4
    greedy: list[int] = []
    for _ in range(steps):
        full = torch.cat([ids, torch.tensor([greedy], dtype=torch.long)], 1) if greedy else ids
        logits, _, _ = reference(model, full, k, 0.5, n_prompt=PROMPT_LEN)
        greedy.append(int(logits.argmax()))
    with attach_inner_merge(model.model, layer=k, prune_ratio=0.5, recipe=RECIPE) as handle, torch.no_grad():
        handle.arm(V_START, V_LEN)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, pad_token_id=0
        )
    assert out[0, PROMPT_LEN:].tolist() == greedy
    kept = handle.stats.visual_after
    assert handle.stats.kv_lengths == [PROMPT_LEN] * k + [PROMPT_LEN - (V_LEN - kept)] * (N_LAYERS - k)


def test_keep_all_equals_the_unpatched_model(model) -> None:
    ids = prompt(3)
    with torch.no_grad():
        plain = model(ids).logits
        with attach_inner_merge(model.model, layer=2, prune_ratio=0.0, recipe=RECIPE) as handle:
            handle.arm(V_START, V_LEN)
            merged = model(ids).logits
    assert torch.equal(plain, merged)


def test_recipes_are_checked_against_the_decoder() -> None:
    model = make_model("sdpa")
    with pytest.raises(ModelError, match="does not know the decoder Qwen3Model"):
        attach_inner_merge(model.model, layer=2, prune_ratio=0.5)  # the built-in recipe is Qwen2's
    with pytest.raises(ModelError, match="q_norm/k_norm that the recipe does not apply"):
        attach_inner_merge(model.model, 2, 0.5, recipe=AttentionRecipe(("Qwen3Model",), qk_norm=False))
    with pytest.raises(ModelError, match="does not know the decoder"):
        attach_inner_merge(model.model, 2, 0.5, recipe=AttentionRecipe(("Qwen3VLTextModel",), qk_norm=True))
    with pytest.raises(ValueError, match="non-empty tuple"):
        AttentionRecipe(decoders="Qwen3Model")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen2 = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1)
    ).eval()  # fmt: skip
    with pytest.raises(ModelError, match="has no q_norm/k_norm"):
        attach_inner_merge(qwen2.model, 1, 0.5, recipe=AttentionRecipe(("Qwen2Model",), qk_norm=True))
    attach_inner_merge(qwen2.model, 1, 0.5).remove()  # the built-in recipe still knows Qwen2
