"""HoliTom's inner-LLM stage (spec section 5) as removable forward pre-hooks on one decoder instance.

The stage works on any Llama-style decoder (``.layers`` of pre-norm layers taking ``hidden_states``,
``position_embeddings=(cos, sin)`` of shape (B, n, head_dim), ``attention_mask``, ``position_ids`` and the
cache) whose attention is ``q_proj``/``k_proj`` (optional biases), optional per-head ``q_norm``/``k_norm``
applied before RoPE (Qwen3), rotate-half RoPE, grouped KV heads and ``scaling``. Which decoder classes are
known, and whether their attention has q/k norms, is declared by an :class:`AttentionRecipe`: the built-in
one (``QWEN2_RECIPE``, ``SUPPORTED_DECODERS``) covers ``Qwen2Model`` (LLaVA-OneVision's language model, 1-D
RoPE) and ``Qwen2_5_VLTextModel`` / ``Qwen2VLTextModel`` (Qwen2.5-VL / Qwen2-VL, 3-D M-RoPE); a family
adapter passes its own (``attach_inner_merge(decoder, K, r, recipe=AttentionRecipe(("Qwen3VLTextModel",),
qk_norm=True))``), so a new family needs no change here. A decoder class named by no recipe raises, and so
does a layer whose attention has q/k norms the recipe does not apply (or lacks those it names), so an
unknown decoder fails loudly instead of scoring with the wrong attention. M-RoPE decoders hand every layer
the same ``(cos, sin)`` with the sections already interleaved, so gathering the kept columns of
``(cos, sin)`` keeps every kept token at its original 1-D or 3-D position; ``position_ids`` (3|4, B, n) or
(B, n) are gathered on their last axis.

Usage (batch size 1)::

    handle = attach_inner_merge(decoder, layer=K, prune_ratio=r)   # decoder: a Qwen2Model (has .layers)
    handle.arm(visual_start, visual_len)    # the next prefill merges prompt span [start, start + len)
    handle.arm_positions(positions)         # or: visual tokens at these ascending prompt positions (visual
                                            # tokens interleaved with text, e.g. Qwen3-VL's timestamps)
    model.generate(...)                     # or a forward with use_cache=True, then decode steps
    handle.capture()                        # optional: keep what a later prompt with the same start reuses
    handle.captured                         # {hidden_in, hidden_out, rope, position_ids} of that prefill
    handle.use_prefix(state, P)             # optional: the next prefill runs only tokens >= P (the cache
                                            # holds layers < K of [0, P)), see holitom_cli.models.prefix_reuse
    handle.stats                            # InnerMergeStats of the last merging prefill, or None
    handle.scores, handle.kept_index        # (M,) scores and (M',) kept span positions of that prefill
    handle.remove()                         # the model then behaves exactly as before

How it works, per forward pass (all hooks are ``register_forward_pre_hook(..., with_kwargs=True)`` on the
layer modules of this one decoder, plus one forward hook on the last layer that only reads cache lengths):

* layer K-1, armed prefill (query length > 1): before the layer runs, recompute the attention probabilities
  of the LAST query token over all keys from the layer's own ``input_layernorm``, ``q_proj``, ``k_proj``
  (with biases), ``q_norm``/``k_norm`` per head (recipes with ``qk_norm``), the RoPE ``(cos, sin)`` passed
  to the layer, repeated KV heads, ``scaling`` and the mask
  row of the last query if a 4-D mask exists; mean over heads, restricted to the visual span -> (M,) scores.
  The layer itself runs untouched, i.e. causally (deliberate fix: the reference runs layer K-1 without a
  causal mask in prefill, see docs/inner-stage.md). One query row: cheap, and works with SDPA.
* layer K: ``merge_visual_states(hidden_visual, scores, prune_ratio)`` (holitom_cli.compression) folds the
  pruned visual tokens into the kept ones; the kept rows of ``hidden_states``, ``(cos, sin)``,
  ``position_ids`` and the rows/columns of a 4-D mask (eager) are gathered, so layers K..L-1 run on the
  shortened sequence with the kept tokens at their ORIGINAL RoPE positions.
* layers > K: the same shortened kwargs are swapped in.
* a prefill after ``use_prefix(state, P)`` (prefix reuse): the cache holds layers 0..K-1 of positions
  [0, P) and the forward runs only positions [P, n). At layer K-1 the scores are computed over the whole
  prompt from ``state``'s stored layer K-1 input of [0, P) and its rotary embeddings, joined to this pass's
  rows; at layer K the stored output of layer K-1 for [0, P) is joined likewise, and the merge, the gathers
  and layers K.. run on the whole prompt exactly as in a cold prefill (layers >= K start from an empty cache;
  their mask is the full causal one: None under SDPA as in a cold prefill, an explicit one under eager).
* decode steps: layers >= K hold a shorter ``DynamicCache`` entry. Positions of new tokens come from the
  2-D attention mask (generate) or from layer 0's cache length (plain forward), i.e. stay absolute. A 4-D
  mask (eager, or SDPA with padding) is sized from layer 0's cache length; for layers >= K its columns are
  gathered as ``[kept prefill positions] + [all positions after the prefill]``.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch

from holitom_cli.compression import merge_visual_states
from holitom_cli.errors import ConfigError, ModelError
from holitom_cli.models.compat import cache_keyword, layer_cache

__all__ = [
    "QWEN2_RECIPE",
    "SUPPORTED_DECODERS",
    "AttentionRecipe",
    "InnerMergeHandle",
    "InnerMergeStats",
    "attach_inner_merge",
]

_SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclasses.dataclass(frozen=True)
class AttentionRecipe:
    """What an adapter declares about its decoder so the last-query scores are recomputed correctly.

    decoders: class names (``type(decoder).__name__``) this recipe is for; any other class raises.
    qk_norm: the attention applies ``self_attn.q_norm`` / ``self_attn.k_norm`` (RMS norms over head_dim)
        to every head's query and key after the projections and before RoPE (Qwen3, Qwen3-VL). The layers
        are checked: norms present without ``qk_norm``, or missing with it, raise ``ModelError``.
    """

    decoders: tuple[str, ...]
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.decoders, str) or not self.decoders:
            raise ValueError("AttentionRecipe.decoders must be a non-empty tuple of class names")


#: The built-in recipe: Qwen2 attention (q/k/v biases, no q/k norms), 1-D RoPE or M-RoPE (cos, sin).
QWEN2_RECIPE = AttentionRecipe(decoders=("Qwen2Model", "Qwen2_5_VLTextModel", "Qwen2VLTextModel"))
#: Decoder classes known without an adapter-provided recipe.
SUPPORTED_DECODERS = QWEN2_RECIPE.decoders
# Decoders that currently carry an InnerMergeHandle (two handles on one decoder would merge twice).
_ACTIVE: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


@dataclasses.dataclass(frozen=True)
class InnerMergeStats:
    """What the last merging prefill did.

    visual_before: M, visual tokens entering layer K.
    visual_after: visual tokens leaving the merge (``round(M * (1 - r))``, at least 1).
    kv_lengths: per-layer KV-cache length right after that prefill (layers < K hold the full prompt,
        layers >= K hold ``visual_before - visual_after`` fewer entries), or None without a cache.
    """

    visual_before: int
    visual_after: int
    kv_lengths: list[int] | None = None


@dataclasses.dataclass
class _Record:
    """Bookkeeping of one merged prefill, needed to slice 4-D masks of later decode steps."""

    cache: weakref.ref | None  # the Cache object the prefill wrote to (None: no cache)
    keep_full: torch.Tensor  # (n',) long, ascending positions of the prompt kept at layers >= K
    full_len: int  # n, the prompt length before the merge


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class InnerMergeHandle:
    """Hooks of one decoder; see :func:`attach_inner_merge`. Also a context manager (``remove`` on exit)."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        layer: int,
        prune_ratio: float,
        recipe: AttentionRecipe = QWEN2_RECIPE,
    ) -> None:
        self.decoder = decoder
        self.layer = layer
        self.prune_ratio = prune_ratio
        self.recipe = recipe
        self.stats: InnerMergeStats | None = None
        self.scores: torch.Tensor | None = None  # (M,) float32 scores of the last merging prefill
        self.kept_index: torch.Tensor | None = None  # (M',) long, kept positions into that visual span
        self._span: torch.Tensor | None = None  # armed (M,) ascending prompt positions of the visual tokens
        # (scores (M,), positions, n, (PrefixState, P) or None, the joined positions or None)
        self._pending: tuple | None = None
        self._swap: dict[str, Any] | None = None  # kwargs for layers > K in the current forward
        self._swap_len: int | None = None
        self._record: _Record | None = None
        self._fill_kv_lengths = False
        self._capture = False
        self.captured: dict[str, Any] | None = None  # what the last captured prefill left (see capture())
        self._prefix: tuple[Any, int] | None = None  # (PrefixState, P) for the next prefill
        layers = decoder.layers
        self._hooks = [
            layers[layer - 1].register_forward_pre_hook(self._score_hook, with_kwargs=True),
            layers[layer].register_forward_pre_hook(self._merge_hook, with_kwargs=True),
        ]
        self._hooks += [
            layers[i].register_forward_pre_hook(self._swap_hook, with_kwargs=True)
            for i in range(layer + 1, len(layers))
        ]
        self._hooks.append(layers[-1].register_forward_hook(self._after_last_hook, with_kwargs=True))

    # ------------------------------------------------------------------ public
    def arm(self, visual_start: int, visual_len: int) -> None:
        """Merge span ``[visual_start, visual_start + visual_len)`` of the next prefill (query length > 1)."""
        if not self._hooks:
            raise ModelError("this inner-merge handle was removed", hint="attach a new handle to the decoder")
        if int(visual_start) < 0 or int(visual_len) < 1:
            raise ConfigError(
                f"invalid visual span start={visual_start} length={visual_len}",
                hint="the start must be >= 0 and the length >= 1",
            )
        self._span = torch.arange(int(visual_start), int(visual_start) + int(visual_len))

    def arm_positions(self, positions: Any) -> None:
        """Merge the visual tokens at these prompt positions (ascending, distinct) of the next prefill.

        For prompts whose visual tokens are interleaved with text (Qwen3-VL puts a timestamp before each
        temporal patch): only these positions are scored, merged and shortened; the text between them stays.
        ``arm(start, length)`` is ``arm_positions(range(start, start + length))``.
        """
        if not self._hooks:
            raise ModelError("this inner-merge handle was removed", hint="attach a new handle to the decoder")
        index = torch.as_tensor(positions, dtype=torch.long).reshape(-1).cpu()
        if index.numel() < 1 or int(index.min()) < 0 or bool((index[1:] <= index[:-1]).any()):
            raise ConfigError(
                f"invalid visual positions ({index.numel()} given)",
                hint="give at least one position, ascending, distinct, >= 0",
            )
        self._span = index

    def disarm(self) -> None:
        """Forget an armed span (and a prefix) that has not been used yet."""
        self._span = None
        self._prefix = None

    def capture(self) -> None:
        """Let the next merging prefill keep, in ``captured``, the inputs of layers K-1 and K (1, n, C) and
        the rotary embeddings and position ids of the whole prompt: what ``use_prefix`` needs later."""
        self._capture = True
        self.captured = None

    def use_prefix(self, state: Any, length: int) -> None:
        """The next armed prefill runs positions [length, n) only, its cache holding layers 0..K-1 of
        [0, length): ``state`` (a ``PrefixState`` saved from a prompt with the same first ``length`` tokens)
        supplies the rest. The armed visual positions must all be < ``length``."""
        if state.hidden_in is None or state.hidden_out is None or state.rope is None:
            raise ModelError("this prefix state was saved without the inner stage's hidden states")
        if not 1 <= int(length) <= int(state.hidden_in.shape[1]):
            raise ConfigError(
                f"prefix length {length} outside the saved prompt of {state.hidden_in.shape[1]}"
            )
        self._prefix = (state, int(length))

    @property
    def armed(self) -> bool:
        return self._span is not None

    def remove(self) -> None:
        """Remove every hook and forget all state; the decoder then behaves exactly as before."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._span = self._pending = self._swap = self._record = self._prefix = None
        _ACTIVE.discard(self.decoder)

    def __enter__(self) -> InnerMergeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ hooks
    def _score_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Layer K-1: last-query attention over the visual span (prefill only, once armed)."""
        self._pending = None
        hidden = _hidden_from(args, kwargs)  # (B, n, C): input of layer K-1
        if self._span is None or hidden.shape[1] <= 1:
            return None
        _check_batch(hidden)
        positions = self._span
        prefix, self._prefix = self._prefix, None
        self._span = None  # one prefill consumes the armed span (and the prefix)
        reused = prefix[1] if prefix is not None else 0
        joined: dict[str, Any] | None = None  # the whole prompt's rotary embeddings (every layer gets them)
        if prefix is not None:  # the whole prompt's layer K-1 input and rotary embeddings: stored + this pass
            state, _ = prefix
            hidden = torch.cat([state.hidden_in[:, :reused].to(hidden.dtype), hidden], dim=1)
            joined = _joined_positions(kwargs, state, reused, hidden.shape[1])
            kwargs = {**kwargs, **joined}
        n = hidden.shape[1]
        if int(positions[-1]) >= n or (prefix is not None and int(positions[-1]) >= reused):
            start, end = int(positions[0]), int(positions[-1]) + 1
            raise ModelError(
                f"visual span [{start}, {end}) lies outside the prompt of {n} tokens",
                hint="arm the handle with the span of the visual tokens in the prompt being prefilled",
            )
        cache = layer_cache(kwargs)
        if cache is not None:
            if getattr(cache, "is_compileable", False):
                raise ModelError(
                    "the inner merge needs a DynamicCache (layers >= K hold fewer tokens)",
                    hint="do not use a static or compiled cache together with the inner merge",
                )
            if cache.get_seq_length(self.layer - 1) != reused or cache.get_seq_length(self.layer) != 0:
                raise ModelError(
                    "the inner merge needs the whole prompt in one prefill (the cache was not empty)",
                    hint="start from an empty cache when the inner merge is armed",
                )
        elif prefix is not None:
            raise ModelError("a reused prefix needs the cache that holds it")
        # Deliberate difference from the reference: it asks layer K-1 for attention weights, which under SDPA
        # falls back to eager attention WITHOUT the causal mask, so its layer K-1 runs bidirectionally in
        # prefill. Here the layer runs untouched (causal); only the last query's row is recomputed aside.
        if self._capture:
            rope = _rope_pair(kwargs, n)
            self.captured = {
                "hidden_in": hidden.detach(),
                "rope": rope,
                "position_ids": kwargs.get("position_ids"),
            }
        scores = _last_query_attention(module, hidden, kwargs, self.recipe.qk_norm)  # (n,)
        positions = positions.to(scores.device)
        self._pending = (scores.index_select(0, positions), positions, n, prefix, joined)
        return None

    def _merge_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Layer K: merge and shorten (prefill), or slice a 4-D mask for the shorter cache (decode)."""
        self._swap = self._swap_len = None
        self._fill_kv_lengths = False
        hidden = _hidden_from(args, kwargs)  # (B, n, C): output of layer K-1
        pending, self._pending = self._pending, None
        if pending is not None and pending[3] is not None:  # a reused prefix: join its layer K-1 output
            state, reused = pending[3]
            if hidden.shape[1] + reused == pending[2]:
                hidden = torch.cat([state.hidden_out[:, :reused].to(hidden.dtype), hidden], dim=1)
                kwargs = {**kwargs, **pending[4]}  # joined at layer K-1: the same for layer K
                kwargs["attention_mask"] = _full_causal_mask(kwargs.get("attention_mask"), pending[2], self)
                return self._merge(args, kwargs, hidden, *pending[:3], whole=True)
        if pending is not None and hidden.shape[1] == pending[2]:
            return self._merge(args, kwargs, hidden, *pending[:3])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            new_mask = self._decode_mask(mask, hidden.shape[1], layer_cache(kwargs))
            if new_mask is not mask:
                self._swap, self._swap_len = {"attention_mask": new_mask}, hidden.shape[1]
                return args, {**kwargs, "attention_mask": new_mask}
        return None

    def _swap_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Layers > K: use the shortened kwargs prepared at layer K in this same forward pass."""
        if self._swap is None or _hidden_from(args, kwargs).shape[1] != self._swap_len:
            return None
        return args, {**kwargs, **self._swap}

    def _after_last_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """End of a forward pass: drop its swapped kwargs; after a merging prefill, record cache lengths."""
        self._swap = self._swap_len = None
        if not self._fill_kv_lengths:
            return None
        self._fill_kv_lengths = False
        cache = layer_cache(kwargs)
        if cache is not None and self.stats is not None:
            lengths = [int(cache.get_seq_length(i)) for i in range(len(self.decoder.layers))]
            self.stats = dataclasses.replace(self.stats, kv_lengths=lengths)
        return None

    # ------------------------------------------------------------------ work
    def _merge(
        self,
        args: tuple,
        kwargs: dict,
        hidden: torch.Tensor,
        scores: torch.Tensor,
        positions: torch.Tensor,
        n: int,
        whole: bool = False,
    ) -> tuple[tuple, dict] | None:
        """Merge at layer K. ``whole``: ``hidden`` and ``kwargs`` cover the whole prompt although this pass
        ran fewer tokens (a reused prefix), so layers >= K must get them even when nothing is removed."""
        _check_batch(hidden)
        if self._capture:
            self._capture = False
            if self.captured is not None:
                self.captured["hidden_out"] = hidden.detach()
        device = hidden.device
        positions = positions.to(device)
        num = int(positions.numel())
        merged, kept = merge_visual_states(
            hidden[0].index_select(0, positions), scores, self.prune_ratio
        )  # (k,C),(k,)
        keep = int(kept.numel())
        self.stats = InnerMergeStats(visual_before=num, visual_after=keep)
        self.scores, self.kept_index = scores.detach(), kept.detach()
        self._fill_kv_lengths = True
        if keep == num and not whole:  # nothing removed: leave every tensor untouched (bit-exact)
            self._record = None
            return None
        kept_pos = positions.index_select(0, kept.to(device))  # (k,) prompt positions of the kept tokens
        keep_mask = torch.ones(n, dtype=torch.bool, device=device)
        keep_mask[positions] = False
        keep_mask[kept_pos] = True  # True = kept at layers >= K (text and the kept visual tokens)
        keep_full = torch.nonzero_static(keep_mask, size=n - num + keep).squeeze(1)  # (n',) ascending, kept
        new_hidden = hidden[0].index_select(0, keep_full)  # (n', C)
        if keep < num:  # (a whole prompt with nothing removed keeps its rows as they are)
            new_hidden[torch.searchsorted(keep_full, kept_pos)] = merged.to(new_hidden.dtype)
        new_hidden = new_hidden[None]  # (1, n', C)
        swap: dict[str, Any] = {}
        cos, sin = _rope_pair(kwargs, n)  # (1, n, d) each (M-RoPE: sections already interleaved)
        swap["position_embeddings"] = (cos.index_select(-2, keep_full), sin.index_select(-2, keep_full))
        if kwargs.get("position_ids") is not None:  # (1, n) or M-RoPE (3|4, 1, n): gather the last axis
            swap["position_ids"] = kwargs["position_ids"].index_select(-1, keep_full)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:  # (1, 1, n, n): keep rows and columns
            swap["attention_mask"] = mask.index_select(2, keep_full).index_select(3, keep_full)
        elif mask is not None:
            raise ModelError(
                f"unsupported attention mask of type {type(mask).__name__} for the inner merge",
                hint=f"load the model with attn_implementation in {_SUPPORTED_ATTENTION}",
            )
        elif whole:  # SDPA: the full causal mask is None, as in a cold prefill; every later layer gets None
            swap["attention_mask"] = None
        cache = layer_cache(kwargs)
        self._record = _Record(weakref.ref(cache) if cache is not None else None, keep_full, n)
        if keep == num:
            self._record = None  # layers >= K hold as many positions as layer 0: decode masks fit as they are
        self._swap, self._swap_len = swap, int(keep_full.numel())
        args, kwargs = _with_hidden(args, kwargs, new_hidden)
        return args, {**kwargs, **swap}

    def _decode_mask(self, mask: torch.Tensor, q_len: int, cache: Any) -> torch.Tensor:
        """Columns of a layer-0-sized 4-D mask (1, 1|H, q, kv0) that the shorter layers >= K attend to."""
        if cache is None:
            return mask
        expected = int(cache.get_seq_length(self.layer)) + q_len  # kv length of layer K after its update
        if mask.shape[-1] == expected:
            return mask
        record = self._record
        if (
            record is None
            or record.cache is None
            or record.cache() is not cache
            or mask.shape[-1] - expected != record.full_len - record.keep_full.numel()
        ):
            raise ModelError(
                f"attention mask of length {mask.shape[-1]} does not fit layer {self.layer}'s cache "
                f"of {expected - q_len} tokens",
                hint="continue decoding with the cache of the merged prefill, or remove the hooks",
            )
        after = torch.arange(record.full_len, mask.shape[-1], device=mask.device)
        cols = torch.cat([record.keep_full.to(mask.device), after])  # (expected,)
        return mask.index_select(3, cols)


def _check_batch(hidden: torch.Tensor) -> None:
    if hidden.shape[0] != 1:
        raise ModelError(
            f"the inner merge supports batch size 1 only, got a batch of {hidden.shape[0]}",
            hint="ask about one video at a time",
        )


def _joined_positions(kwargs: dict, state: Any, reused: int, n: int) -> dict[str, Any]:
    """``position_embeddings`` (and ``position_ids``) of the whole prompt of n tokens: the stored ones of
    [0, reused) followed by this pass's ones of [reused, n)."""
    cos, sin = _rope_pair(kwargs, n - reused)
    stored_cos, stored_sin = state.rope
    out: dict[str, Any] = {
        "position_embeddings": (
            torch.cat([stored_cos[:, :reused].to(cos.dtype), cos], dim=1),
            torch.cat([stored_sin[:, :reused].to(sin.dtype), sin], dim=1),
        )
    }
    ids = kwargs.get("position_ids")
    if ids is not None:
        if state.position_ids is None:
            raise ModelError("the reused prefix was saved without the position ids this pass carries")
        out["position_ids"] = torch.cat([state.position_ids[..., :reused].to(ids.device), ids], dim=-1)
    return out


def _full_causal_mask(mask: Any, n: int, handle: InnerMergeHandle) -> Any:
    """The mask a cold prefill of n tokens gives every layer, from this pass's (1, 1, q, n) one: None under
    SDPA (its causal path), else a (1, 1, n, n) causal mask of the same kind (bool, or additive float)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ModelError(f"unsupported attention mask of type {type(mask).__name__} for a reused prefix")
    if getattr(handle.decoder.config, "_attn_implementation", None) == "sdpa":
        return None
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()[None, None]
    if mask.dtype == torch.bool:
        return causal
    full = torch.zeros(1, 1, n, n, dtype=mask.dtype, device=mask.device)
    return full.masked_fill(~causal, torch.finfo(mask.dtype).min)


def _rope_pair(kwargs: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's ``(cos, sin)``, checked to be (B, n, head_dim) each; ModelError for any other layout."""
    pair = kwargs.get("position_embeddings")
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or any(not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[1] != n for t in pair)
    ):
        shapes = [tuple(t.shape) for t in pair] if isinstance(pair, (tuple, list)) else type(pair).__name__
        raise ModelError(
            f"the decoder layer got rotary embeddings of shape {shapes}, expected (cos, sin) of (B, {n}, d)",
            hint="this transformers version passes positions to the decoder layers in a way holitom does "
            "not know",
        )
    return pair[0], pair[1]


def _last_query_attention(
    layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, qk_norm: bool = False
) -> torch.Tensor:
    """Softmax attention of the last query of ``layer`` over all n keys, mean over heads.

    Args:
        layer: a decoder layer (``input_layernorm``, ``self_attn.{q,k}_proj``, with ``qk_norm`` also
            ``self_attn.{q,k}_norm``).
        hidden: (1, n, C) input of that layer.
        kwargs: the layer's call kwargs: ``position_embeddings`` (cos, sin) each (1, n, d), optional 4-D
            ``attention_mask`` (1, 1|H, n, n), bool (True = attend) or additive float.
        qk_norm: apply the attention's ``q_norm`` / ``k_norm`` to each head (model dtype, as the layer
            does) before RoPE.

    Returns:
        (n,) float32 probabilities (they sum to 1 over the keys the last query may see).
    """
    attn = layer.self_attn
    d = attn.head_dim
    x = layer.input_layernorm(hidden)  # (1, n, C)
    q = attn.q_proj(x[:, -1:]).view(1, 1, -1, d)  # (1, 1, H, d)
    k = attn.k_proj(x).view(1, x.shape[1], -1, d)  # (1, n, KV, d)
    if qk_norm:  # per head over head_dim, before RoPE (Qwen3)
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # (1, H, 1, d), (1, KV, n, d)
    cos, sin = (t.float()[:, None] for t in _rope_pair(kwargs, hidden.shape[1]))  # (1, 1, n, d)
    q = q * cos[:, :, -1:] + _rotate_half(q) * sin[:, :, -1:]
    k = k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)  # (1, H, n, d)
    logits = (q @ k.transpose(2, 3)) * attn.scaling  # (1, H, 1, n)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        row = mask[:, :, -1:, :]  # (1, 1|H, 1, n) the last query's mask row
        is_bool = row.dtype == torch.bool
        logits = logits.masked_fill(~row, float("-inf")) if is_bool else logits + row.float()
    probs = torch.softmax(logits, dim=-1)  # (1, H, 1, n)
    return probs[0, :, 0].mean(dim=0)  # (n,)


def _check_attention(layers: Any, recipe: AttentionRecipe) -> None:
    """ModelError unless every layer has the attention parts the score recompute reads, per ``recipe``."""
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj", "head_dim", "scaling", "num_key_value_groups")
        missing = [n for n in needed if attn is None or getattr(attn, n, None) is None]
        if getattr(layer, "input_layernorm", None) is None:
            missing.insert(0, "input_layernorm")
        if missing:
            raise ModelError(
                f"decoder layer {i} ({type(layer).__name__}) lacks {', '.join(missing)}: the inner merge "
                "cannot recompute its attention scores",
                hint="this decoder's attention is not a layout holitom knows",
            )
        norms = [getattr(attn, n, None) is not None for n in ("q_norm", "k_norm")]
        if recipe.qk_norm and not all(norms):
            raise ModelError(
                f"the recipe applies q/k norms but decoder layer {i}'s attention has no q_norm/k_norm",
                hint="pass an AttentionRecipe with qk_norm=False for this decoder",
            )
        if not recipe.qk_norm and any(norms):
            raise ModelError(
                f"decoder layer {i}'s attention has q_norm/k_norm that the recipe does not apply "
                "(the scores would be wrong)",
                hint="the adapter must pass AttentionRecipe(..., qk_norm=True) for this decoder",
            )


def attach_inner_merge(
    decoder: torch.nn.Module,
    layer: int,
    prune_ratio: float,
    *,
    recipe: AttentionRecipe | None = None,
) -> InnerMergeHandle:
    """Hook HoliTom's inner merge into one decoder instance (other instances are unaffected).

    Args:
        decoder: the decoder (``.layers``, ``.config``), e.g. ``model.model`` of a Qwen2ForCausalLM or
            ``model.model.language_model`` of LLaVA-OneVision, or ``model.model.language_model`` (a
            ``Qwen2_5_VLTextModel``) of Qwen2.5-VL.
        layer: K, the first layer that runs on the shortened sequence, ``1 <= K < num_layers``.
        prune_ratio: fraction of the visual span removed at layer K, in [0, 1) (0 keeps every token).
        recipe: the adapter's declaration of its decoder classes and attention (q/k norms); None: the
            built-in :data:`QWEN2_RECIPE`. The decoder's class must be one the recipe names.

    Returns:
        An :class:`InnerMergeHandle`: inert until ``arm`` is called; ``remove()`` restores the decoder.
    """
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "config"):
        raise ModelError(
            f"{type(decoder).__name__} is not a decoder with .layers",
            hint="pass the Qwen2Model (model.model; model.model.language_model for LLaVA-OneVision)",
        )
    recipe = QWEN2_RECIPE if recipe is None else recipe
    if not isinstance(recipe, AttentionRecipe):
        raise TypeError(f"recipe must be an AttentionRecipe, got {type(recipe).__name__}")
    if type(decoder).__name__ not in recipe.decoders:
        raise ModelError(
            f"the inner merge does not know the decoder {type(decoder).__name__}",
            hint=f"supported decoders: {', '.join(recipe.decoders)} (an adapter declares others with "
            "attach_inner_merge(..., recipe=AttentionRecipe(...)))",
        )
    num_layers = len(layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
        raise ConfigError(
            f"inner layer must be an integer in [1, {num_layers - 1}], got {layer!r}",
            hint=f"this language model has {num_layers} layers; choose K between 1 and {num_layers - 1}",
        )
    if not 0.0 <= float(prune_ratio) < 1.0:
        raise ConfigError(
            f"inner prune ratio must be in [0, 1), got {prune_ratio!r}",
            hint="use e.g. 0.5 (the paper's value)",
        )
    config = decoder.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _SUPPORTED_ATTENTION:
        raise ModelError(
            f"the inner merge supports attention implementations {_SUPPORTED_ATTENTION}, not {impl!r}",
            hint="load the model with attn_implementation='sdpa' (or 'eager')",
        )
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        raise ModelError(
            "the inner merge does not support sliding-window attention layers",
            hint="use a checkpoint with use_sliding_window=false (all Qwen2 LLaVA-OneVision models)",
        )
    _check_attention(layers, recipe)
    cache_keyword(layers[0])  # fails loudly on a decoder layer whose cache keyword this version lacks
    if decoder in _ACTIVE:
        raise ModelError(
            "this decoder already has inner-merge hooks attached",
            hint="call remove() on the existing handle before attaching a new one",
        )
    handle = InnerMergeHandle(decoder, layer, float(prune_ratio), recipe)
    _ACTIVE.add(decoder)
    return handle
