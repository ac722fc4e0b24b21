"""Reuse the language model's work on the prompt prefix (system text + video) across questions.

The prompt of every question about one video starts with the same tokens: the template's system turn, the
video's tokens, the text before the question. Under causal attention the keys and values of those tokens do
not depend on what follows, in any layer. HoliTom's inner stage changes that from layer K on: its merge at K
depends on the last token's attention, i.e. on the question. So what is reusable is

* without the inner stage: every layer's KV of the common prefix;
* with the inner stage at layer K: the KV of layers 0..K-1 of the prefix, plus the prefix's hidden states at
  the input of layer K-1 (to recompute the last query's attention scores over the whole prompt) and at the
  input of layer K (to merge and run layers K.. on the whole shortened prompt), and the prefix's rotary
  embeddings and position ids. The question's tokens then run through layers 0..K-1 against the cached
  prefix, the merge at K happens on the full prompt exactly as in a cold prefill, and layers K.. run on the
  merged sequence from an empty cache (see ``InnerMergeHandle.use_prefix``).

A :class:`PrefixStore` lives on one prepared video. Each answer looks up the state saved for the same visual
span and inner layer (``key``); the reusable length is the longest common prefix of the stored prompt's token
ids and the new ones, as long as it covers every visual token and leaves at least two tokens to run (the
last token's query is what the inner stage scores with, and a one-token pass would look like a decode
step). The first question, and any question whose prompt differs before the end of the video, runs cold and
saves its state for the next.

Nothing here knows a model family: the adapter lists the model inputs that carry the visual embeddings
(``VISUAL_INPUTS``), which a warm run drops, since the uncached tokens hold no visual token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["PrefixState", "PrefixStore", "common_prefix"]


@dataclass
class PrefixState:
    """What one cold prefill of a prompt of n tokens leaves for later prompts sharing its start.

    ids: (n,) the prompt's token ids. kv: per layer < ``len(kv)`` the (keys, values) of the whole prompt,
    each (1, KV heads, >= n, d) (only the first n positions are used). visual_end: one past the last visual
    token's position. With the inner stage (layer K = ``len(kv)``): hidden_in (1, n, C) the input of layer
    K-1, hidden_out (1, n, C) its output, rope (cos, sin) each (1, n, d), position_ids (..., n) or None.
    """

    ids: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    visual_end: int
    hidden_in: torch.Tensor | None = None
    hidden_out: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.kv for t in pair]
        tensors += [t for t in (self.hidden_in, self.hidden_out, self.position_ids) if t is not None]
        tensors += list(self.rope or ())
        return sum(t.numel() * t.element_size() for t in tensors)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(int(a.numel()), int(b.numel()))
    if n == 0:
        return 0
    differ = (a[:n].cpu() != b[:n].cpu()).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


_LEFT_TO_RUN = 2  # prompt tokens a warm prefill always runs itself


class PrefixStore:
    """The prefix states of one prepared video, keyed by (visual span setting, inner layer), a few kept."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._states: OrderedDict[tuple, PrefixState] = OrderedDict()

    def lookup(self, key: tuple, ids: torch.Tensor, visual_end: int) -> tuple[PrefixState, int] | None:
        """(state, P) when ``ids`` (n,) can reuse P >= ``visual_end`` positions of the state saved for
        ``key`` (P <= n - 2); None otherwise."""
        state = self._states.get(key)
        if state is None:
            return None
        ids = ids.reshape(-1)
        reusable = min(common_prefix(state.ids, ids), int(ids.numel()) - _LEFT_TO_RUN)
        if reusable < max(visual_end, state.visual_end) or reusable < 1:
            return None
        self._states.move_to_end(key)
        return state, reusable

    def save(self, key: tuple, state: PrefixState) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def clear(self) -> None:
        self._states.clear()

    def __len__(self) -> int:
        return len(self._states)
