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

Class metadata an adapter declares (the CLI and the loader read it, so they hold no family knowledge):
``FAMILY`` (config.json ``model_type``), ``DISPLAY_NAME``, ``DEFAULT_CHECKPOINTS`` (hub ids),
``QUANTIZATION_SKIP`` (module-name prefixes bitsandbytes leaves unquantized). :func:`run_generation` is the
generation loop every adapter shares (streaming, sampling settings, the inner stage, timings, cache size).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
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
    "context_of",
    "run_generation",
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
    context: int | None  # max_position_embeddings: the longest prompt + answer; None = unknown (unchecked)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def context_of(config: Any) -> int | None:
    """A text config's ``max_position_embeddings`` when it is a positive integer, else None."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass
class VisualTokens:
    """What the vision side gives HoliTom for one video, per temporal unit.

    features: (T', N, C) model dtype. saliency: (T', N) float32, attention received in the vision encoder
    (higher = more salient). grid: (rows, cols) with rows * cols == N (row-major inside a unit).
    unit_times: T' floats, seconds (the first frame of each unit). frames_per_unit: sampled frames per
    temporal unit (1 for LLaVA-OneVision, 2 for Qwen2.5-VL: unit u starts at frame u * frames_per_unit).
    suffix: (S, C) tokens that follow the video uncompressed (LLaVA-OneVision's image_newline), None when
    there are none (Qwen).
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
    frames_per_unit: int = 1

    def __post_init__(self) -> None:
        units, num = self.features.shape[:2]
        if self.frames_per_unit < 1:
            raise ValueError(f"frames_per_unit must be >= 1, got {self.frames_per_unit}")
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

    @property
    def num_suffix(self) -> int:
        """S, the tokens that follow the video uncompressed (0 when there are none)."""
        return 0 if self.suffix is None else int(self.suffix.shape[0])

    @property
    def unit_frames(self) -> list[int]:
        """The sampled frame each temporal unit starts at (the frame a picture of the unit shows)."""
        return [u * self.frames_per_unit for u in range(self.num_units)]


@dataclass
class VisualSpan:
    """The visual tokens that go into the prompt, in output order (compressed, or all of them).

    embeds: (M, C). unit, row, col: (M,) long, the original (unit, row, col) each output token stands at (a
    temporally merged token: its segment's first unit and its cluster centre's cell); the suffix tokens, if
    any, come last with unit = row = col = -1. aligned: (M, ...) tensors merged with the same plan, for the
    M visual tokens before the suffix (the suffix has no aligned values).
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
    prefix_kv_tokens: int = 0  # prompt positions whose KV came from an earlier prompt (prefix reuse)

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
    ``spatial_index``; every aligned tensor is merged with the compression's plan (``result.plan.apply``),
    exactly as the features were.
    """
    row, col = _grid_coords(result.spatial_index.long(), tokens.grid[1])
    aligned = {name: result.plan.apply(value) for name, value in tokens.aligned.items()}
    span = VisualSpan(result.features, result.frame_index.long(), row, col, aligned, layout=tokens.layout)
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


#: One earlier turn of a conversation: (question, answer).
Turn = tuple[str, str]


def conversation(question: str, history: Sequence[Turn], first: Callable[[str], Any]) -> list[dict[str, Any]]:
    """Chat messages for ``question`` after the earlier ``history`` turns: the video sits in the first user
    turn (``first(text)`` builds that turn's content), every later turn is plain text.

    Without history this is the single user message every adapter used before; with it the prompt up to the
    end of the video is the same as the first question's, so the language model's prefix can be reused.
    """
    turns = [*((str(q), str(a)) for q, a in history), (question, None)]
    messages: list[dict[str, Any]] = []
    for i, (q, a) in enumerate(turns):
        messages.append({"role": "user", "content": first(q) if i == 0 else q})
        if a is not None:
            messages.append({"role": "assistant", "content": a})
    return messages


def check_turns(history: Sequence[Turn], check: Callable[[str], Any]) -> None:
    """``check(text)`` on every non-blank question and answer of earlier turns (an adapter's special-token
    check: an earlier turn must not smuggle a video placeholder into the prompt)."""
    for turn in history:
        for text in turn:
            if str(text).strip():
                check(str(text))


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


def sampling_kwargs(temperature: float, top_p: float | None) -> dict[str, Any]:
    """``generate`` settings: greedy for temperature 0, else sampling with ``top_p`` (1.0 when None)."""
    if temperature and temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p if top_p is not None else 1.0}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@dataclass(frozen=True)
class PrefixReuse:
    """Where an answer may find, and leaves, its prompt prefix's state: a ``PrefixStore`` (one per prepared
    video) and the key of this answer's visual span setting and inner layer."""

    store: Any
    key: tuple


def visual_end(inputs: PromptInputs) -> int:
    """One past the prompt position of the last visual token."""
    positions = inputs.extra.get("visual_positions")
    if positions is not None:
        return int(torch.as_tensor(positions).max()) + 1
    return int(inputs.visual_start) + int(inputs.visual_len)


def run_generation(
    adapter: VideoAdapter,
    kwargs: dict[str, Any],
    inputs: PromptInputs,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    on_text: Any,
    inner_layer: int | None,
    inner_prune_ratio: float,
    reuse: PrefixReuse | None = None,
) -> GenerationResult:
    """``adapter.model.generate(**kwargs, ...)`` with a streamer, the sampling settings and, with
    ``inner_layer`` set, HoliTom's inner stage armed on ``inputs``' visual span (removed afterwards).

    ``kwargs`` holds the family's model inputs (ids, mask, embeddings, positions). With ``reuse``, a prompt
    that starts like the one whose state is stored runs only its remaining tokens (the family's
    ``VISUAL_INPUTS`` dropped: the video lies in the reused part), and a prompt that cannot reuse one stores
    its own (see holitom_cli.models.prefix_reuse). Raises ModelError when the inner stage was armed but did
    not run (a transformers version that calls the layers differently).
    """
    from holitom_cli.errors import ModelError
    from holitom_cli.models.compat import cache_keyword, output_cache, prefilled_cache

    streamer = Streamer(adapter.tokenizer, on_text)
    model = adapter.model
    kwargs = {
        **kwargs,
        "max_new_tokens": max_new_tokens,
        "streamer": streamer,
        "return_dict_in_generate": True,
        "pad_token_id": model.generation_config.pad_token_id or adapter.tokenizer.pad_token_id,
        **sampling_kwargs(temperature, top_p),
    }
    handle = None
    if inner_layer is not None:
        from holitom_cli.models.inner_merge import attach_inner_merge

        recipe = getattr(adapter, "INNER_RECIPE", None)  # the family's decoder classes and q/k norms
        handle = attach_inner_merge(
            adapter.decoder, layer=inner_layer, prune_ratio=inner_prune_ratio, recipe=recipe
        )
        positions = inputs.extra.get("visual_positions")  # visual tokens interleaved with text (Qwen3-VL)
        if positions is None:
            handle.arm(inputs.visual_start, inputs.visual_len)
        else:
            handle.arm_positions(torch.sort(torch.as_tensor(positions)).values)
    found = None
    if reuse is not None:
        found = reuse.store.lookup(reuse.key, inputs.input_ids[0], visual_end(inputs))
    if found is not None:  # a warm prompt: its first P positions' KV (layers < K, or all) come from the store
        state, reused = found
        kwargs = {k: v for k, v in kwargs.items() if k not in adapter.VISUAL_INPUTS}
        prefix_kv = [(k[:, :, :reused], v[:, :, :reused]) for k, v in state.kv]
        kwargs[cache_keyword(model)] = prefilled_cache(model.config, prefix_kv)
        if handle is not None:
            handle.use_prefix(state, reused)
    elif reuse is not None and handle is not None:
        handle.capture()
    try:
        sync(adapter.device)
        start = time.perf_counter()
        out = model.generate(**kwargs)
        sync(adapter.device)
        end = time.perf_counter()
    finally:
        inner_stats = handle.stats if handle is not None else None
        if handle is not None:
            handle.remove()
    if handle is not None and (inner_stats is None or inner_stats.kv_lengths is None):
        # The hooks were armed but did not see the prefill (or its cache): a transformers change in how
        # decoder layers are called. Never report "nothing removed" for a stage that did not run.
        raise ModelError(
            "the inner merge was armed but did not run during prefill",
            hint="this transformers version calls the decoder layers in a way holitom does not know: "
            'install a tested one (pip install "transformers>=5.20,<6"), or use --no-inner',
        )
    times = streamer.times or [end]
    cache = output_cache(out)
    kv_bytes, kv_lengths = cache_size(cache)
    if reuse is not None and found is None:
        _save_prefix(adapter, reuse, inputs, cache, handle, inner_layer)
    del out, cache
    return GenerationResult(
        text=streamer.text(),
        token_ids=list(streamer.ids),
        prompt_tokens=int(inputs.input_ids.shape[1]),
        started_at=start,
        prefill_s=times[0] - start,
        decode_s=times[-1] - times[0],
        kv_cache_bytes=kv_bytes,
        kv_lengths=kv_lengths,
        inner_stats=inner_stats,
        prefix_kv_tokens=found[1] if found is not None else 0,
    )


def _save_prefix(
    adapter: VideoAdapter,
    reuse: PrefixReuse,
    inputs: PromptInputs,
    cache: Any,
    handle: Any,
    layer: int | None,
) -> None:
    """Store what this cold prompt leaves for later prompts that start like it (nothing if incomplete)."""
    from holitom_cli.models.compat import cache_prefix
    from holitom_cli.models.prefix_reuse import PrefixState

    n = int(inputs.input_ids.shape[1])
    kv = cache_prefix(cache, layer if layer is not None else adapter.num_layers, n)
    if not kv:
        return
    state = PrefixState(ids=inputs.input_ids[0].detach().clone(), kv=kv, visual_end=visual_end(inputs))
    if handle is not None:
        captured = handle.captured or {}
        if any(captured.get(k) is None for k in ("hidden_in", "hidden_out", "rope")):
            return  # the hooks did not see this prefill whole: store nothing rather than half a state
        state.hidden_in, state.hidden_out = captured["hidden_in"], captured["hidden_out"]
        state.rope, state.position_ids = captured["rope"], captured.get("position_ids")
    reuse.store.save(reuse.key, state)


def load_pretrained(
    model_cls: Any, path: Any, *, device: torch.device, dtype: torch.dtype, quantization: Any
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a checkpoint folder: SDPA attention, never remote code, eval mode.

    ``quantization`` is a bitsandbytes config built by the loader with the family's ``QUANTIZATION_SKIP``.
    Every adapter's ``load`` goes through here, after the transformers version check.
    """
    from transformers import AutoTokenizer

    from holitom_cli.errors import ModelError
    from holitom_cli.models.compat import check_transformers_version
    from holitom_cli.models.noise import quiet_library_noise

    check_transformers_version()
    quiet_library_noise()
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if quantization is not None or device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    try:
        model = model_cls.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # OSError, SafetensorError, ValueError...: all mean "this folder does not load"
        raise ModelError(
            f"could not load the checkpoint in {path}: {exc}",
            hint="the download may be incomplete: run `holitom download` again, or check the folder",
        ) from exc
    model.eval()
    return model, tokenizer


def embeds_dtype(model: Any) -> torch.dtype:
    """The dtype visual embeddings go in: the input embeddings', or ``lm_head``'s when those are quantized."""
    embed = model.get_input_embeddings().weight
    if embed.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return embed.dtype
    return model.lm_head.weight.dtype


# ----------------------------------------------------------------------------------------------- adapter


class VideoAdapter(abc.ABC):
    """What a family adapter provides at the boundary (see the module docstring for the call order).

    Class metadata: ``FAMILY`` (config.json ``model_type``), ``DISPLAY_NAME`` (for people),
    ``DEFAULT_CHECKPOINTS`` (hub ids), ``QUANTIZATION_SKIP`` (module-name prefixes, matched from the start
    of the name, that bitsandbytes must leave unquantized). Instances set ``model``, ``tokenizer``, ``name``,
    ``device``, ``dtype`` and ``quantize``.
    """

    FAMILY: str
    DISPLAY_NAME: str = ""
    DEFAULT_CHECKPOINTS: tuple[str, ...] = ()
    QUANTIZATION_SKIP: tuple[str, ...] = ()
    #: ``generate`` inputs that carry the visual embeddings, dropped when the video lies in a reused prefix.
    VISUAL_INPUTS: tuple[str, ...] = ()

    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    quantize: str | None = None

    @property
    def family(self) -> str:
        return self.FAMILY

    @property
    @abc.abstractmethod
    def decoder(self) -> Any:
        """The language model's decoder (``.layers``) that the inner stage hooks."""

    @property
    def num_layers(self) -> int:
        return self.language_dims().num_layers

    def describe(self) -> dict[str, Any]:
        """The ``model`` object of the statistics and the JSON record."""
        return {
            "name": self.name,
            "family": self.FAMILY,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "quantize": self.quantize,
        }

    @abc.abstractmethod
    def language_dims(self) -> LanguageDims: ...

    @abc.abstractmethod
    def vision_flops(self, tokens: VisualTokens) -> float:
        """FLOPs of the vision side (encoder + projector/merger) for the video ``tokens`` came from."""

    @abc.abstractmethod
    def text_tokens(self, question: str) -> int:
        """Tokens of the prompt for ``question`` without any visual token (validates the question)."""

    @abc.abstractmethod
    def preprocess(self, frames: Any, timestamps: list[float], **meta: Any) -> Any:
        """Frames (T, H, W, 3) uint8 RGB -> what :meth:`encode_video` takes. ``meta``: ``video_fps``,
        ``total_frames`` of the source (None when unknown); an adapter uses what it needs."""

    @abc.abstractmethod
    def encode_video(self, pixels: Any, on_progress: Any = None) -> VisualTokens: ...

    @abc.abstractmethod
    def build_prompt(self, question: str, span: VisualSpan, history: Sequence[Turn] = ()) -> PromptInputs:
        """The prompt for ``question`` with ``span`` in the first user turn; ``history`` holds earlier
        (question, answer) turns of a conversation (see :func:`conversation`)."""

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
        reuse: PrefixReuse | None = None,
    ) -> GenerationResult:
        """Generate the answer; ``reuse``: where to find and leave the prompt prefix's state."""
