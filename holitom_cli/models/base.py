"""The family-neutral boundary between a video-LLM adapter and HoliTom (issue 10).

A family adapter (one module per model family) turns frames into per-unit visual tokens, and after HoliTom's
outer stage turns the kept tokens plus a question into a prompt and an answer. Everything family-specific
(preprocessing, prompt layout, positions, the decoder the inner stage hooks) stays behind these types::

    pixels = adapter.preprocess(frames (T, H, W, 3) uint8, timestamps)    # anything the adapter needs
    tokens = adapter.encode_video(pixels, on_progress=None)               # VisualTokens, per temporal unit
    span = uncompressed_span(tokens)          # or span_from_compression(tokens, compress_video_tokens(...))
    inputs = adapter.build_prompt(question, span)                         # PromptInputs
    result = adapter.generate(inputs, span, max_new_tokens=..., temperature=..., top_p=..., on_text=...,
                              inner_layer=K or None, inner_prune_ratio=r)    # GenerationResult

Shapes: T' temporal units (LLaVA-OneVision: frames; Qwen2.5-VL: temporal patches of 2 frames), N tokens per
unit on a (rows, cols) grid, C the language model's width, M tokens after compression, S suffix tokens.

``GenerationResult``, :class:`Streamer` and :func:`cache_size` duplicate ``llava_onevision``'s
``GenerationResult`` / ``_Streamer`` / ``cache_size`` field for field (that module is not edited here); the
pipeline refactor can make LLaVA import them from here.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "GenerationResult",
    "LanguageDims",
    "PromptInputs",
    "Streamer",
    "VideoAdapter",
    "VisualSpan",
    "VisualTokens",
    "cache_size",
    "span_from_compression",
    "uncompressed_span",
]


@dataclass(frozen=True)
class LanguageDims:
    """Sizes of the language model, owned by the adapter (like whisper's ``ModelDimensions``)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    context: int  # max_position_embeddings: the longest prompt + answer the checkpoint was built for


@dataclass
class VisualTokens:
    """What the vision side gives HoliTom for one video, per temporal unit.

    features: (T', N, C) model dtype. saliency: (T', N) float32, attention received in the vision encoder
    (higher = more salient). grid: (rows, cols) with rows * cols == N (row-major inside a unit).
    unit_times: T' floats, seconds (the first frame of each unit). suffix: (S, C) tokens that follow the
    video uncompressed (LLaVA-OneVision's image_newline), None when there are none (Qwen).
    aligned: other per-token tensors with leading (T', N) dims that must be merged with the same plan
    (Qwen3-VL's deepstack features); empty for LLaVA-OneVision and Qwen2.5-VL.
    layout: family facts about the whole encoded video that the prompt needs and no span can recover
    once tokens are dropped (Qwen2.5-VL: ``video_grid_thw``, ``second_per_grid_ts``); copied to every span.
    """

    features: torch.Tensor
    saliency: torch.Tensor
    grid: tuple[int, int]
    unit_times: list[float]
    suffix: torch.Tensor | None = None
    aligned: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        units, num = self.features.shape[:2]
        if self.grid[0] * self.grid[1] != num:
            raise ValueError(f"grid {self.grid} does not hold the {num} tokens of a unit")
        if tuple(self.saliency.shape) != (units, num):
            raise ValueError(f"saliency must be ({units}, {num}), got {tuple(self.saliency.shape)}")
        if len(self.unit_times) != units:
            raise ValueError(f"{len(self.unit_times)} unit times for {units} temporal units")
        for name, value in self.aligned.items():
            if tuple(value.shape[:2]) != (units, num):
                raise ValueError(
                    f"aligned[{name!r}] must lead with ({units}, {num}), got {tuple(value.shape)}"
                )

    @property
    def num_units(self) -> int:
        return int(self.features.shape[0])

    @property
    def tokens_per_unit(self) -> int:
        return int(self.features.shape[1])


@dataclass
class VisualSpan:
    """The visual tokens that go into the prompt, in output order (compressed, or all of them).

    embeds: (M, C). unit, row, col: (M,) long, the original (unit, row, col) each output token stands at (a
    temporally merged token: its segment's first unit and its cluster centre's cell); the suffix tokens, if
    any, come last with unit = row = col = -1. aligned: (M, ...) tensors merged with the same plan.
    layout: the source video's :attr:`VisualTokens.layout`.
    """

    embeds: torch.Tensor
    unit: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    aligned: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = int(self.embeds.shape[0])
        for name in ("unit", "row", "col"):
            if tuple(getattr(self, name).shape) != (m,):
                raise ValueError(f"span.{name} must be ({m},), got {tuple(getattr(self, name).shape)}")

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


@dataclass
class PromptInputs:
    """A tokenised prompt holding ``visual_len`` visual placeholders from ``visual_start`` on.

    input_ids: (1, L) long. position_ids: family-specific (Qwen2.5-VL: (3, 1, L) M-RoPE positions),
    None = the default 1-D positions. extra: anything else ``generate`` needs (Qwen: ``mm_token_type_ids``,
    ``rope_deltas``).
    """

    input_ids: torch.Tensor
    visual_start: int
    visual_len: int
    position_ids: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class GenerationResult:
    """One generated answer with its measurements (seconds, bytes); the fields of llava_onevision's."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    started_at: float  # time.perf_counter() when generate() was called
    prefill_s: float  # generate() call -> first new token (prefill + first sampling step)
    decode_s: float  # first -> last new token
    kv_cache_bytes: int
    kv_lengths: list[int]  # per decoder layer, at the end of generation
    inner_stats: Any = None  # InnerMergeStats from the inner stage, or None
    extra: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.new_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_s


# ----------------------------------------------------------------------------------------------- spans


def _grid_coords(flat: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    row = torch.div(flat, cols, rounding_mode="floor")
    return row, flat - row * cols


def _with_suffix(span: VisualSpan, suffix: torch.Tensor | None) -> VisualSpan:
    if suffix is None or suffix.shape[0] == 0:
        return span
    fill = torch.full((suffix.shape[0],), -1, dtype=torch.long, device=span.unit.device)
    return VisualSpan(
        embeds=torch.cat([span.embeds, suffix.to(span.embeds.dtype)]),
        unit=torch.cat([span.unit, fill]),
        row=torch.cat([span.row, fill]),
        col=torch.cat([span.col, fill]),
        aligned=span.aligned,
        layout=span.layout,
    )


def uncompressed_span(tokens: VisualTokens) -> VisualSpan:
    """Every token in (unit, row, col) order (then the suffix): what the unmodified model reads."""
    units, num, channels = tokens.features.shape
    device = tokens.features.device
    flat = torch.arange(units * num, device=device)  # (T'N,)
    unit = torch.div(flat, num, rounding_mode="floor")
    row, col = _grid_coords(flat - unit * num, tokens.grid[1])
    aligned = {k: v.reshape(units * num, *v.shape[2:]) for k, v in tokens.aligned.items()}
    span = VisualSpan(tokens.features.reshape(units * num, channels), unit, row, col, aligned, tokens.layout)
    return _with_suffix(span, tokens.suffix)


def span_from_compression(tokens: VisualTokens, result: Any) -> VisualSpan:
    """The span of a ``CompressionResult`` of ``compress_video_tokens(tokens.features, tokens.saliency)``.

    Each output token stands at its ``frame_index`` (here: the temporal unit) and the (row, col) of its
    ``spatial_index``. Aligned tensors need the compression's merge plan, which ``CompressionResult`` does
    not expose yet: a video with aligned tensors raises NotImplementedError instead of mixing them wrongly.
    """
    if tokens.aligned:
        raise NotImplementedError(
            "aligned per-token tensors need the compression's merge plan (not exposed by CompressionResult)"
        )
    row, col = _grid_coords(result.spatial_index.long(), tokens.grid[1])
    span = VisualSpan(result.features, result.frame_index.long(), row, col, layout=tokens.layout)
    return _with_suffix(span, tokens.suffix)


# ----------------------------------------------------------------------------------------------- generation


class Streamer:
    """A transformers streamer: decodes new tokens incrementally, calls ``on_text``, times each token."""

    def __init__(self, tokenizer: Any, on_text: Any = None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.times: list[float] = []
        self._prompt_seen = False
        self._emitted = ""

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        now = time.perf_counter()
        for token in value.reshape(-1).tolist():
            self.ids.append(int(token))
            self.times.append(now)
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _flush(self, final: bool) -> None:
        text = self.text()
        if not final and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        new = text[len(self._emitted) :]
        self._emitted = text
        if new and self.on_text is not None:
            self.on_text(new)


def cache_size(cache: Any) -> tuple[int, list[int]]:
    """(bytes held by keys and values, per-layer cached length) of a transformers cache (0, [] when None)."""
    if cache is None:
        return 0, []
    total, lengths = 0, []
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            lengths.append(0)
            continue
        total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        lengths.append(int(keys.shape[-2]))
    return total, lengths


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (timings); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- adapter


class VideoAdapter(abc.ABC):
    """What a family adapter provides at the boundary (see the module docstring for the call order).

    Class metadata: ``FAMILY`` (config.json ``model_type``), ``DEFAULT_CHECKPOINTS`` (hub ids),
    ``QUANTIZATION_SKIP`` (module-name prefixes bitsandbytes must leave unquantized).
    """

    FAMILY: str
    DEFAULT_CHECKPOINTS: tuple[str, ...] = ()
    QUANTIZATION_SKIP: tuple[str, ...] = ()

    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    @abc.abstractmethod
    def decoder(self) -> Any:
        """The language model's decoder (``.layers``) that the inner stage hooks."""

    @property
    def num_layers(self) -> int:
        return self.language_dims().num_layers

    @abc.abstractmethod
    def language_dims(self) -> LanguageDims: ...

    @abc.abstractmethod
    def preprocess(self, frames: Any, timestamps: list[float], **meta: Any) -> Any: ...

    @abc.abstractmethod
    def encode_video(self, pixels: Any, on_progress: Any = None) -> VisualTokens: ...

    @abc.abstractmethod
    def build_prompt(self, question: str, span: VisualSpan) -> PromptInputs: ...

    @abc.abstractmethod
    def generate(
        self,
        inputs: PromptInputs,
        span: VisualSpan,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float | None = None,
        on_text: Any = None,
        inner_layer: int | None = None,
        inner_prune_ratio: float = 0.5,
    ) -> GenerationResult: ...
