"""The inner-LLM merge hooks against the unpatched model and an independent layer-by-layer computation.

The independent computation (``reference_logits``) runs the decoder layers by hand: layers 0..K-1 on the whole
sequence with an explicit causal mask, the full eager attention probability matrix of layer K-1 (its row of
the last prompt token gives the scores), a top-k keep set, the reference's plain sequential pairwise
averaging loop, then layers K.. on the shortened sequence at the kept tokens' original positions.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from holitom_cli.errors import ConfigError, HolitomError, ModelError
from holitom_cli.models.compat import cache_keyword
from holitom_cli.models.inner_merge import InnerMergeStats, attach_inner_merge

IMPLS = ["sdpa", "eager"]
N_LAYERS, PROMPT_LEN, V_START, V_LEN = 4, 20, 3, 10
HOLE = (
    15  # a masked-out prompt position after the visual span (exercises 4-D masks under both SDPA and eager)
)


def make_model(impl: str, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    model.set_attn_implementation(impl)
    assert model.model.config._attn_implementation == impl
    return model


def prompt(seed: int = 1, length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=IMPLS)
def model(request) -> Qwen2ForCausalLM:
    return make_model(request.param)


# ------------------------------------------------------------------------------------ independent reference
def holed_mask(length: int) -> torch.Tensor:
    """(1, length) 2-D attention mask with position HOLE masked out."""
    mask = torch.ones(1, length, dtype=torch.long)
    mask[0, HOLE] = 0
    return mask


def mask_positions(mask2d: torch.Tensor) -> torch.Tensor:
    """Positions as generate derives them from a 2-D mask: count of attended tokens - 1 (0 where masked)."""
    return (mask2d.cumsum(-1) - 1).masked_fill(mask2d == 0, 0)


def additive_causal(q: int, key_ok: torch.Tensor | None = None) -> torch.Tensor:
    """(1, 1, q, q) float mask: 0 where key <= query and the key is not masked, very negative elsewhere."""
    allowed = torch.ones(q, q).tril().bool()
    if key_ok is not None:
        allowed &= key_ok.bool()[None, :]
    return torch.zeros(1, 1, q, q).masked_fill(~allowed, torch.finfo(torch.float32).min)


def run_layers(model, hidden, layer_ids, positions: torch.Tensor, key_ok=None) -> torch.Tensor:
    """Run decoder layers by hand on (1, q, C) at the given (1, q) positions, causally in index order."""
    cos_sin = model.model.rotary_emb(hidden, positions)
    mask = additive_causal(hidden.shape[1], key_ok)
    for i in layer_ids:
        hidden = model.model.layers[i](
            hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions
        )
    return hidden


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_probs(model, layer_id: int, hidden, positions: torch.Tensor, key_ok=None) -> torch.Tensor:
    """Full (H, q, q) eager causal attention probabilities of one layer for its input (1, q, C)."""
    layer = model.model.layers[layer_id]
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    x = layer.input_layernorm(hidden)[0]  # (q, C)
    q = layer.self_attn.q_proj(x).view(-1, heads, d).transpose(0, 1)  # (H, q, d)
    k = layer.self_attn.k_proj(x).view(-1, kv_heads, d).transpose(0, 1)  # (KV, q, d)
    cos, sin = model.model.rotary_emb(hidden, positions)  # (1, q, d)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k = torch.stack([k[h // (heads // kv_heads)] for h in range(heads)])  # (H, q, d)
    logits = q @ k.transpose(1, 2) / d**0.5 + additive_causal(x.shape[0], key_ok)[0]
    return torch.softmax(logits, dim=-1)


def sequential_merge(hidden: torch.Tensor, scores: torch.Tensor, prune_ratio: float):
    """top-k by score; each pruned token (ascending) averaged into its most cosine-similar kept one."""
    num = hidden.shape[0]
    keep = max(1, round(num * (1 - prune_ratio)))
    ranked = sorted(range(num), key=lambda i: (-float(scores[i]), i))
    kept = sorted(ranked[:keep])
    out = hidden.clone()
    for i in range(num):
        if i in kept:
            continue
        sims = [float(torch.cosine_similarity(hidden[i], hidden[t], dim=0)) for t in kept]
        target = kept[sims.index(max(sims))]
        out[target] = (out[target] + out[i]) / 2
    return out[kept], kept


def reference_logits(model, tokens, k: int, prune_ratio: float, prompt_len: int = PROMPT_LEN, mask2d=None):
    """No-cache logits (n', V) of ``tokens`` (1, n): first ``prompt_len`` are the prompt, the rest decoded.

    Returns the logits of the kept rows, the kept visual positions (into the span) and the (M,) scores.
    """
    n = tokens.shape[1]
    positions = torch.arange(n)[None] if mask2d is None else mask_positions(mask2d)
    key_ok = None if mask2d is None else mask2d[0]
    with torch.no_grad():
        hidden = run_layers(model, model.model.embed_tokens(tokens), range(k - 1), positions, key_ok)
        probs = attention_probs(model, k - 1, hidden, positions, key_ok)  # (H, n, n)
        scores = probs[:, prompt_len - 1, V_START : V_START + V_LEN].mean(0)  # last PROMPT token's row
        hidden = run_layers(model, hidden, [k - 1], positions, key_ok)
        merged, kept = sequential_merge(hidden[0, V_START : V_START + V_LEN], scores, prune_ratio)
        keep_full = list(range(V_START)) + [V_START + t for t in kept] + list(range(V_START + V_LEN, n))
        hidden = torch.cat([hidden[:, :V_START], merged[None], hidden[:, V_START + V_LEN :]], dim=1)
        short_ok = None if key_ok is None else key_ok[keep_full]
        hidden = run_layers(model, hidden, range(k, N_LAYERS), positions[:, keep_full], short_ok)
        return model.lm_head(model.model.norm(hidden))[0], kept, scores


def plain_logits(model, tokens: torch.Tensor, mask2d=None) -> torch.Tensor:
    extra = {} if mask2d is None else {"attention_mask": mask2d, "position_ids": mask_positions(mask2d)}
    with torch.no_grad():
        return model(tokens, use_cache=False, **extra).logits[0]


# ------------------------------------------------------------------------------------------------- tests
def test_keep_all_reproduces_unpatched_model(model) -> None:
    ids = prompt()
    expected = plain_logits(model, ids)
    with torch.no_grad():
        expected_gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    with attach_inner_merge(model.model, layer=2, prune_ratio=0.0) as handle:
        handle.arm(V_START, V_LEN)
        got = plain_logits(model, ids)
        assert handle.stats == InnerMergeStats(visual_before=V_LEN, visual_after=V_LEN, kv_lengths=None)
        handle.arm(V_START, V_LEN)
        with torch.no_grad():
            got_gen = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert handle.stats.kv_lengths == [PROMPT_LEN] * N_LAYERS
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got_gen.tolist() == expected_gen.tolist()


@pytest.mark.parametrize(("k", "holed"), [(1, False), (2, False), (3, False), (2, True)])
def test_prefill_matches_independent_computation(model, k: int, holed: bool) -> None:
    ids = prompt()
    mask2d = holed_mask(PROMPT_LEN) if holed else None
    expected, kept, scores = reference_logits(model, ids, k, 0.5, mask2d=mask2d)
    seen: dict = {}
    with attach_inner_merge(model.model, layer=k, prune_ratio=0.5) as handle:
        spy = model.model.layers[-1].register_forward_pre_hook(  # runs after ours: sees the swapped kwargs
            lambda m, a, kw: seen.update(kw), with_kwargs=True
        )
        handle.arm(V_START, V_LEN)
        got = plain_logits(model, ids, mask2d)
        spy.remove()
        assert handle.stats == InnerMergeStats(visual_before=V_LEN, visual_after=len(kept), kv_lengths=None)
    assert len(kept) == 5
    keep_full = list(range(V_START)) + [V_START + t for t in kept] + list(range(V_START + V_LEN, PROMPT_LEN))
    full_positions = torch.arange(PROMPT_LEN)[None] if mask2d is None else mask_positions(mask2d)
    assert seen["position_ids"].tolist() == full_positions[:, keep_full].tolist()  # original positions, gaps
    torch.testing.assert_close(handle.scores, scores, rtol=0, atol=1e-6)
    assert handle.kept_index.tolist() == kept
    assert got.shape == (PROMPT_LEN - V_LEN + len(kept), 300)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    # the merge really changes the result: the unmerged model's last row differs
    assert not torch.allclose(plain_logits(model, ids, mask2d)[-1], got[-1], atol=1e-3)


@pytest.mark.parametrize("style", ["generate-like", "bare", "holed"])
def test_cache_lengths_and_decode_match_recompute(model, style: str) -> None:
    ids = prompt(seed=3)
    k, removed = 2, V_LEN - round(V_LEN * 0.5)
    mask2d = holed_mask(PROMPT_LEN) if style == "holed" else torch.ones_like(ids)
    extra = {} if style == "bare" else {"attention_mask": mask2d, "position_ids": mask_positions(mask2d)}
    with attach_inner_merge(model.model, layer=k, prune_ratio=0.5) as handle, torch.no_grad():
        handle.arm(V_START, V_LEN)
        cache = DynamicCache(config=model.config)
        out = model(ids, **{cache_keyword(model): cache}, use_cache=True, **extra)
        lengths = [cache.get_seq_length(i) for i in range(N_LAYERS)]
        assert lengths == [PROMPT_LEN] * k + [PROMPT_LEN - removed] * (N_LAYERS - k)
        assert handle.stats.kv_lengths == lengths
        tokens = ids
        for step in range(3):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            tokens = torch.cat([tokens, nxt], dim=1)
            mask2d = torch.cat([mask2d, torch.ones(1, 1, dtype=torch.long)], dim=1)
            if style != "bare":  # what generate passes: the 2-D mask and absolute positions
                extra = {"attention_mask": mask2d, "position_ids": mask_positions(mask2d)[:, -1:]}
            out = model(nxt, **{cache_keyword(model): cache}, use_cache=True, **extra)
            assert [cache.get_seq_length(i) for i in range(N_LAYERS)] == [x + step + 1 for x in lengths]
            expected, _, _ = reference_logits(model, tokens, k, 0.5, mask2d=mask2d)
            torch.testing.assert_close(out.logits[0, -1], expected[-1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("holed", [False, True])
def test_generate_matches_independent_greedy_loop(model, holed: bool) -> None:
    ids = prompt(seed=5)
    mask2d = holed_mask(PROMPT_LEN) if holed else torch.ones_like(ids)
    with attach_inner_merge(model.model, layer=2, prune_ratio=0.5) as handle, torch.no_grad():
        handle.arm(V_START, V_LEN)
        got = model.generate(ids, attention_mask=mask2d, max_new_tokens=4, do_sample=False)
        assert handle.stats.kv_lengths == [PROMPT_LEN] * 2 + [PROMPT_LEN - 5] * 2
    tokens = ids
    for _ in range(4):
        logits, _, _ = reference_logits(model, tokens, 2, 0.5, mask2d=mask2d)
        tokens = torch.cat([tokens, logits[-1].argmax().view(1, 1)], dim=1)
        mask2d = torch.cat([mask2d, torch.ones(1, 1, dtype=torch.long)], dim=1)
    assert got.tolist() == tokens.tolist()


def test_layer_before_merge_stays_causal(model) -> None:
    ids = prompt()
    k = 2
    outputs: list[torch.Tensor] = []
    capture = model.model.layers[k - 1].register_forward_hook(
        lambda m, a, o: outputs.append(o.detach().clone())
    )
    try:
        plain_logits(model, ids)
        with attach_inner_merge(model.model, layer=k, prune_ratio=0.5) as handle:
            handle.arm(V_START, V_LEN)
            plain_logits(model, ids)
    finally:
        capture.remove()
    unpatched, hooked = outputs
    assert hooked.shape == unpatched.shape == (1, PROMPT_LEN, 64)
    torch.testing.assert_close(hooked, unpatched, rtol=0, atol=1e-6)  # every position, not just the last
    # the independent causal run agrees too (a bidirectional layer K-1 would not)
    with torch.no_grad():
        positions = torch.arange(PROMPT_LEN)[None]
        manual = run_layers(model, model.model.embed_tokens(ids), range(k), positions)
    torch.testing.assert_close(hooked, manual, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_remove_restores_and_unarmed_is_inert(impl: str) -> None:
    never_hooked = make_model(impl)
    hooked = make_model(impl)
    ids = prompt()
    expected = plain_logits(never_hooked, ids)
    handle = attach_inner_merge(hooked.model, layer=2, prune_ratio=0.5)
    assert torch.equal(plain_logits(hooked, ids), expected)  # unarmed: inert
    with torch.no_grad():
        assert torch.equal(
            hooked.generate(ids, max_new_tokens=4, do_sample=False),
            never_hooked.generate(ids, max_new_tokens=4, do_sample=False),
        )
    assert handle.stats is None
    handle.arm(V_START, V_LEN)
    assert plain_logits(hooked, ids).shape[0] == PROMPT_LEN - 5
    assert plain_logits(hooked, ids).shape[0] == PROMPT_LEN  # arming is consumed by one prefill
    handle.arm(V_START, V_LEN)
    handle.remove()
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in hooked.model.layers)
    assert torch.equal(plain_logits(hooked, ids), expected)
    with pytest.raises(ModelError):
        handle.arm(V_START, V_LEN)
    attach_inner_merge(hooked.model, layer=1, prune_ratio=0.5).remove()  # can attach again after remove


def test_hooking_one_instance_leaves_another_alone() -> None:
    first, second = make_model("sdpa"), make_model("sdpa")
    ids = prompt()
    expected = plain_logits(second, ids)
    with attach_inner_merge(first.model, layer=2, prune_ratio=0.5) as handle:
        handle.arm(V_START, V_LEN)
        assert torch.equal(plain_logits(second, ids), expected)
        assert handle.armed  # the other model's prefill did not consume the arming
        assert plain_logits(first, ids).shape[0] == PROMPT_LEN - 5
        assert torch.equal(plain_logits(second, ids), expected)


def test_invalid_use_raises_clear_errors() -> None:
    model = make_model("sdpa")
    for layer in (0, N_LAYERS, -1):
        with pytest.raises(ConfigError):
            attach_inner_merge(model.model, layer=layer, prune_ratio=0.5)
    for ratio in (1.0, -0.1):
        with pytest.raises(ConfigError):
            attach_inner_merge(model.model, layer=2, prune_ratio=ratio)
    with pytest.raises(ModelError, match="decoder"):
        attach_inner_merge(model.lm_head, layer=2, prune_ratio=0.5)
    with attach_inner_merge(model.model, layer=2, prune_ratio=0.5) as handle:
        with pytest.raises(ModelError, match="already"):
            attach_inner_merge(model.model, layer=2, prune_ratio=0.5)
        with pytest.raises(ConfigError):
            handle.arm(-1, 4)
        handle.arm(V_START, V_LEN)
        with pytest.raises(ModelError, match="batch size 1") as info:
            plain_logits(model, torch.cat([prompt(), prompt(seed=2)]))
        assert info.value.hint
        handle.arm(15, 10)
        with pytest.raises(ModelError, match="outside"):
            plain_logits(model, prompt())
    assert issubclass(ModelError, HolitomError)
