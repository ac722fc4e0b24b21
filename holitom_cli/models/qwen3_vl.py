"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) on transformers 5, at the family-neutral boundary.

Token layout of a video of T frames resized to H x W: patches of p = 16 px, two consecutive frames per
temporal patch (T' = ceil(T / 2) temporal units), and the merger maps every 2 x 2 patch cell to one LLM
token: N = (H / 32) * (W / 32) tokens per unit on a (rows, cols) grid. Deepstack: the hidden states after the
vision blocks ``deepstack_visual_indexes`` are merged the same way (one (N, C) tensor per level and unit) and
the language model adds level l to the output of its decoder layer l at the visual positions.

Prompt, as ``Qwen3VLProcessor`` writes it (transformers 5.20-5.24): the chat template's one
``<|vision_start|><|video_pad|><|vision_end|>`` has its ``<|video_pad|>`` replaced by, for every temporal
patch, ``<{t:.1f} seconds><|vision_start|>`` + N ``<|video_pad|>`` + ``<|vision_end|>`` (t: the mean time
of the patch's two frames), so the outer ``<|vision_start|>``/``<|vision_end|>`` stay around the whole
video. With compression (our choice, documented in docs/models-qwen.md): the tokens enter in the
compression's output order, each maximal run of tokens of the same unit gets that unit's
``<t seconds><|vision_start|>`` before it and ``<|vision_end|>`` after it (HoliTom's output is ordered by
unit, so every unit that keeps a token appears once, in temporal order), and a unit without tokens loses
its timestamp text too.

Positions (3-D M-RoPE, interleaved sections): the model's own ``get_rope_index`` on the UNCOMPRESSED prompt
(one (1, rows, cols) grid per temporal patch, the timestamp text between them); every output token takes
the column of the token it stands at (unit, row, col), every text token (timestamps, vision start/end
markers, the text before and after the video) keeps its column, so compression moves nothing. Decoding
continues from the last prompt position + 1 as the unmodified model does. ``generate`` passes the visual and
deepstack embeddings through ``mm_encoder_outputs`` and the positions through ``position_ids`` (4 rows: the
sequence index, then M-RoPE, as the model's own generation prepares them); with the uncompressed span this
is exactly ``generate(pixel_values_videos=..., video_grid_thw=..., mm_token_type_ids=...)``.

Inner stage: the Qwen3 decoder (``Qwen3VLTextModel``) with q/k norms, declared by :data:`INNER_RECIPE`; the
visual tokens are interleaved with text, so the stage is armed on their positions. Deepstack is added after
layers 0 .. levels-1 at the full-length visual mask, so the inner layer must be >= the number of levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from holitom_cli.errors import ConfigError, ModelError
from holitom_cli.models.base import (
    GenerationResult,
    LanguageDims,
    PromptInputs,
    Turn,
    VideoAdapter,
    VisualSpan,
    VisualTokens,
    check_turns,
    conversation,
    load_pretrained,
    run_generation,
)
from holitom_cli.models.compat import check_transformers_version, model_class, rope_index
from holitom_cli.models.inner_merge import AttentionRecipe
from holitom_cli.models.qwen3_preprocess import Qwen3Pixels, Qwen3VideoPreprocessing
from holitom_cli.models.qwen3_vision import encode_units

FAMILY = "qwen3_vl"
DISPLAY_NAME = "Qwen3-VL"
DEFAULT_CHECKPOINTS = (
    "Qwen/Qwen3-VL-2B-Instruct",
    "Qwen/Qwen3-VL-4B-Instruct",
    "Qwen/Qwen3-VL-8B-Instruct",
    "Qwen/Qwen3-VL-32B-Instruct",
)
#: Module-name prefixes bitsandbytes must leave unquantized (vision encoder, mergers, output head).
QUANTIZATION_SKIP = ("model.visual", "lm_head")
#: The decoder the inner stage hooks: Qwen3 attention, q/k RMS norms per head before RoPE.
INNER_RECIPE = AttentionRecipe(decoders=("Qwen3VLTextModel",), qk_norm=True)
_VIDEO_TYPE = 2  # mm_token_type_ids value of video placeholders (0 text, 1 image)

#: A chat template shaped like the Qwen3-VL Instruct hub template for user / assistant / system messages (no
#: default system prompt; one ``<|vision_start|><|video_pad|><|vision_end|>`` per video item); used when a
#: tokenizer has none.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def timestamp_text(seconds: float) -> str:
    """The processor's timestamp text of one temporal patch."""
    return f"<{seconds:.1f} seconds>"


def _encoder_output(embeds: torch.Tensor, deepstack: list[torch.Tensor]) -> Any:
    """``mm_encoder_outputs["video"]`` as Qwen3-VL's ``get_video_features`` returns it (one video)."""
    try:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
    except ImportError as exc:
        raise ModelError(
            "transformers has no Qwen3-VL deepstack output class: this version is not one holitom knows",
            hint='install a tested version: pip install "transformers>=5.20,<6"',
        ) from exc
    return BaseModelOutputWithDeepstackFeatures(
        pooler_output=(embeds,), deepstack_features=[(level,) for level in deepstack]
    )


class Qwen3_VL(VideoAdapter):
    """Adapter for ``Qwen3VLForConditionalGeneration`` checkpoints (batch size 1)."""

    FAMILY = FAMILY
    DISPLAY_NAME = DISPLAY_NAME
    DEFAULT_CHECKPOINTS = DEFAULT_CHECKPOINTS
    QUANTIZATION_SKIP = QUANTIZATION_SKIP
    VISUAL_INPUTS = ("mm_encoder_outputs",)  # the visual embeddings among generate's inputs
    INNER_RECIPE = INNER_RECIPE
    family = FAMILY

    def __init__(
        self, model: Any, tokenizer: Any, path: Path, name: str, quantize: str | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = Path(path)
        self.name = name
        self.quantize = quantize
        self.config = model.config
        embed = model.model.language_model.embed_tokens.weight
        self.device = embed.device
        self.dtype = (
            embed.dtype
            if embed.dtype in (torch.float32, torch.bfloat16, torch.float16)
            else (model.lm_head.weight.dtype)
        )
        self.preprocessing = Qwen3VideoPreprocessing.from_checkpoint(self.path, self.config.vision_config)
        self.video_token_id = int(self.config.video_token_id)
        self.vision_start_id = int(self.config.vision_start_token_id)
        self.vision_end_id = int(self.config.vision_end_token_id)
        self.deepstack_levels = len(self.config.vision_config.deepstack_visual_indexes or [])

    # ------------------------------------------------------------------------------------------- shapes

    @property
    def decoder(self) -> Any:
        """The ``Qwen3VLTextModel`` (``.layers``, ``.rotary_emb``) the inner stage hooks."""
        return self.model.model.language_model

    def language_dims(self) -> LanguageDims:
        t = self.config.text_config
        return LanguageDims(
            num_layers=int(t.num_hidden_layers),
            hidden_size=int(t.hidden_size),
            intermediate_size=int(t.intermediate_size),
            num_heads=int(t.num_attention_heads),
            num_kv_heads=int(t.num_key_value_heads),
            vocab_size=int(t.vocab_size),
            context=int(t.max_position_embeddings),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": FAMILY,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "quantize": self.quantize,
        }

    # ------------------------------------------------------------------------------------------- vision

    def preprocess(self, frames: np.ndarray, timestamps: list[float], **meta: Any) -> Qwen3Pixels:
        """(T, H, W, 3) uint8 RGB + the sampled frames' timestamps -> :class:`Qwen3Pixels` (on the device).

        ``meta`` (the source's ``video_fps`` / ``total_frames``) is accepted for the shared call and not
        needed: the timestamps text comes from the sampled frames' own times.
        """
        pixels = self.preprocessing(frames, timestamps)
        pixels.pixel_values_videos = pixels.pixel_values_videos.to(self.device, self.dtype)
        return pixels

    @torch.no_grad()
    def encode_video(
        self, pixels: Qwen3Pixels, on_progress: Any = None, chunk_units: int | None = None
    ) -> VisualTokens:
        """Vision encoder + mergers per temporal patch, and the last vision block's saliency.

        ``aligned["deepstack"]`` is (T', N, levels, C): merged with the same plan as the features.
        """
        grid = tuple(int(v) for v in pixels.video_grid_thw[0].tolist())
        if chunk_units is None:
            chunk_units = 1 if self.device.type == "cpu" else 8
        features, deepstack, saliency = encode_units(
            self.model.model,
            pixels.pixel_values_videos,
            grid,
            chunk_units,
            on_progress,  # type: ignore[arg-type]
        )
        merge = self.preprocessing.merge_size
        extra = {"frames_per_unit": 2} if "frames_per_unit" in VisualTokens.__dataclass_fields__ else {}
        return VisualTokens(
            features=features,
            saliency=saliency.float(),
            grid=(grid[1] // merge, grid[2] // merge),
            unit_times=list(pixels.unit_times),
            suffix=None,
            aligned={"deepstack": deepstack},
            layout={
                "video_grid_thw": pixels.video_grid_thw.clone(),
                "unit_seconds": [float(s) for s in pixels.unit_seconds],
            },
            **extra,
        )

    # ------------------------------------------------------------------------------------------- prompt

    def _render(self, question: str, history: Sequence[Turn] = ()) -> str:
        """Chat-template text with one ``<|vision_start|><|video_pad|><|vision_end|>`` before the (first)
        question; ``history``: earlier (question, answer) turns."""
        check_turns(history, self._check_question)  # no special token in an earlier turn either
        messages = conversation(question, history, lambda q: [{"type": "video"}, {"type": "text", "text": q}])
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except Exception:  # a template that does not accept this message format
                text = None
            if isinstance(text, str) and text.count(_PLACEHOLDER) == 1 and question in text:
                return text
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=QWEN3_VL_CHAT_TEMPLATE
        )

    def _check_question(self, question: str) -> None:
        if not isinstance(question, str) or not question.strip():
            raise ConfigError("the question is empty", hint="ask something about the video")
        specials = set(self.tokenizer.all_special_tokens) | {
            "<|video_pad|>",
            "<|image_pad|>",
            "<|vision_start|>",
            "<|vision_end|>",
        }
        found = sorted(tok for tok in specials if tok and tok in question)
        if found:
            raise ConfigError(
                f"the question contains the special token(s) {', '.join(found)}",
                hint="remove them: the video is inserted into the prompt automatically",
            )

    def text_tokens(self, question: str) -> int:
        """Prompt tokens without any visual token: the template with its one ``<|video_pad|>`` removed (the
        outer ``<|vision_start|>``/``<|vision_end|>`` counted; the per-unit timestamp text and markers, a
        few tokens per kept temporal patch, are not)."""
        self._check_question(question)
        return len(self.tokenizer(self._render(question), add_special_tokens=False)["input_ids"]) - 1

    def vision_flops(self, tokens: VisualTokens) -> float:
        """Vision encoder + merger + deepstack merger FLOPs for the video's temporal patches.

        One multiply-add = 2 FLOPs; patch embedding, norms, RoPE, softmax not counted. Per temporal patch of
        p = rows cols m^2 patches of width h: ``2 * 4 p h^2`` (qkv + output projection) and ``2 * 2 p h i``
        (the two-layer GELU MLP) in every block, ``2 * 2 p^2 h`` attention (every block attends to the whole
        temporal patch), and the merger plus each deepstack merger on the p / m^2 merged tokens.
        """
        cfg = self.config.vision_config
        merge, h = int(cfg.spatial_merge_size), int(cfg.hidden_size)
        rows, cols = tokens.grid
        patches = rows * cols * merge * merge
        block = 2 * 4 * patches * h * h + 2 * 2 * patches * h * int(cfg.intermediate_size)
        block += 2 * 2 * patches * patches * h
        merged_in = h * merge * merge
        merger = 2 * rows * cols * (merged_in * merged_in + merged_in * int(cfg.out_hidden_size))
        depth = int(cfg.depth)
        return float(tokens.num_units * (depth * block + (1 + self.deepstack_levels) * merger))

    def full_prompt(
        self, question: str, layout: dict[str, Any], history: Sequence[Turn] = ()
    ) -> tuple[list[int], list[int], int]:
        """The uncompressed prompt as the processor writes it.

        Returns (token ids, the index of each temporal patch's first video pad, N pads per patch). Unit u's
        text ``<t seconds><|vision_start|>`` lies between the previous unit's ``<|vision_end|>`` (for u = 0:
        the outer ``<|vision_start|>``) and its first pad; its ``<|vision_end|>`` follows its last pad.
        """
        self._check_question(question)
        t, h, w = (int(v) for v in layout["video_grid_thw"][0].tolist())
        seconds = list(layout["unit_seconds"])
        merge = self.preprocessing.merge_size
        per_unit = (h // merge) * (w // merge)
        if len(seconds) != t:
            raise ValueError(f"{len(seconds)} timestamps for {t} temporal patches")
        pads = "<|video_pad|>" * per_unit
        expansion = "".join(f"{timestamp_text(s)}<|vision_start|>{pads}<|vision_end|>" for s in seconds)
        text = self._render(question, history)
        head, tail = text.split(_PLACEHOLDER, 1)
        text = head + "<|vision_start|>" + expansion + "<|vision_end|>" + tail
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        pads = [i for i, tok in enumerate(ids) if tok == self.video_token_id]
        firsts = pads[::per_unit]
        ok = len(pads) == t * per_unit and len(firsts) == t
        for u, first in enumerate(firsts if ok else []):
            run = pads[u * per_unit : (u + 1) * per_unit]
            ok = ok and run == list(range(first, first + per_unit))
            ok = ok and ids[first - 1] == self.vision_start_id and ids[first + per_unit] == self.vision_end_id
        if not ok or ids[self._outer_start(ids, firsts)] != self.vision_start_id:
            raise ModelError(
                f"the prompt does not hold {t} temporal patches of {per_unit} video pads between "
                "<|vision_start|> and <|vision_end|>",
                hint="the checkpoint's tokenizer or chat template is not a Qwen3-VL one",
            )
        return ids, firsts, per_unit

    def _outer_start(self, ids: list[int], firsts: list[int]) -> int:
        """Index of the outer ``<|vision_start|>``: the last one before unit 0's timestamp text."""
        i = firsts[0] - 2  # before unit 0's own <|vision_start|>
        while i >= 0 and ids[i] != self.vision_start_id:
            i -= 1
        return i

    def build_prompt(self, question: str, span: VisualSpan, history: Sequence[Turn] = ()) -> PromptInputs:
        """The prompt for ``span`` (timestamps per kept unit); M-RoPE positions as in the module docstring.

        ``extra["visual_positions"]`` (M,) holds the prompt position of every visual token (in span order);
        ``visual_start`` is the first, ``visual_len`` = M.
        """
        layout = span.layout
        if "video_grid_thw" not in layout or "unit_seconds" not in layout:
            raise ValueError("the span carries no Qwen3-VL layout (was it built from encode_video's tokens?)")
        full, firsts, per_unit = self.full_prompt(question, layout, history)
        t, h, w = (int(v) for v in layout["video_grid_thw"][0].tolist())
        rows, cols = h // self.preprocessing.merge_size, w // self.preprocessing.merge_size
        unit, row, col = (x.long().cpu() for x in (span.unit, span.row, span.col))
        if len(span) == 0 or bool(
            ((unit < 0) | (unit >= t) | (row < 0) | (row >= rows) | (col < 0) | (col >= cols)).any()
        ):
            raise ValueError(f"span positions must lie on the ({t}, {rows}, {cols}) token grid, non-empty")
        full_ids = torch.tensor([full], dtype=torch.long)
        types = (full_ids == self.video_token_id).int() * _VIDEO_TYPE  # (1, L_full)
        positions, _ = rope_index(
            self.model.model, full_ids.to(self.device), types.to(self.device),
            layout["video_grid_thw"].to(self.device), None,
        )  # fmt: skip
        positions = positions.cpu()  # (3, 1, L_full)
        outer = self._outer_start(full, firsts)
        group_start = [outer + 1] + [firsts[u - 1] + per_unit + 1 for u in range(1, t)]
        visual_cols = torch.tensor(firsts)[unit] + row * cols + col  # (M,) columns of the uncompressed prompt
        keep: list[int] = list(range(outer + 1))
        visual_positions: list[int] = []
        units = unit.tolist()
        i = 0
        while i < len(units):  # one group per maximal run of the same unit, in span order
            u, j = units[i], i
            while j < len(units) and units[j] == u:
                j += 1
            keep += range(group_start[u], firsts[u])  # <t seconds><|vision_start|>
            visual_positions += range(len(keep), len(keep) + j - i)
            keep += visual_cols[i:j].tolist()
            keep.append(firsts[u] + per_unit)  # <|vision_end|>
            i = j
        keep += range(firsts[-1] + per_unit + 1, len(full))  # outer <|vision_end|>, the question, ...
        index = torch.tensor(keep)
        input_ids = full_ids.index_select(1, index)  # (1, L)
        position_ids = positions.index_select(2, index)  # (3, 1, L)
        return PromptInputs(
            input_ids=input_ids.to(self.device),
            visual_start=visual_positions[0],
            visual_len=len(span),
            position_ids=position_ids.to(self.device),
            extra={
                "mm_token_type_ids": ((input_ids == self.video_token_id).int() * _VIDEO_TYPE).to(self.device),
                "visual_positions": torch.tensor(visual_positions, dtype=torch.long),
                "rope_deltas": (position_ids.max() + 1 - input_ids.shape[1]).view(1, 1).to(self.device),
            },
        )

    # ------------------------------------------------------------------------------------------- generation

    def check_inner_layer(self, inner_layer: int) -> None:
        """ConfigError for an inner layer the deepstack injection would run after (layers < levels)."""
        if isinstance(inner_layer, int) and inner_layer < self.deepstack_levels:
            raise ConfigError(
                f"inner layer {inner_layer} lies inside Qwen3-VL's deepstack layers (the language model adds "
                f"vision features after layers 0..{self.deepstack_levels - 1} at every visual position)",
                hint=f"choose an inner layer >= {self.deepstack_levels}",
            )

    @torch.no_grad()
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
        reuse: Any = None,
    ) -> GenerationResult:
        """Generate an answer from a prompt of :meth:`build_prompt` and the span it was built for.

        With ``inner_layer`` set (>= the number of deepstack levels), HoliTom's inner stage merges the
        visual tokens at that decoder layer during prefill (kept tokens keep their M-RoPE positions).
        """
        input_ids = inputs.input_ids
        if len(span) != int((input_ids == self.video_token_id).sum()) or len(span) != inputs.visual_len:
            raise ValueError("the prompt's video pads and the span's embeddings differ in number")
        if inputs.position_ids is None:
            raise ValueError("Qwen3-VL prompts carry M-RoPE position_ids (use build_prompt)")
        deepstack = span.aligned.get("deepstack")
        if (
            deepstack is None
            or deepstack.dim() != 3
            or deepstack.shape[0] != len(span)
            or (deepstack.shape[1] != self.deepstack_levels)
        ):
            shown = None if deepstack is None else tuple(deepstack.shape)
            want = f"({len(span)}, {self.deepstack_levels}, C)"
            raise ValueError(f"the span's aligned['deepstack'] must be {want}, got {shown}")
        if inner_layer is not None:
            self.check_inner_layer(inner_layer)
        embeds = span.embeds.to(self.device, self.dtype)
        levels = [deepstack[:, i].to(self.device, self.dtype) for i in range(self.deepstack_levels)]
        length = input_ids.shape[1]
        text_row = torch.arange(length, device=self.device).view(1, 1, length)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            # (4, 1, L): the sequence index (masks), then M-RoPE; generate adds 1 per new token to every row
            "position_ids": torch.cat([text_row, inputs.position_ids.to(self.device)], dim=0),
            "mm_encoder_outputs": {"video": _encoder_output(embeds, levels)},
        }
        self.model.model.rope_deltas = None  # never continue from another prompt's cached deltas
        # the inner stage arms inputs.extra["visual_positions"] (tokens interleaved with timestamp text)
        return run_generation(
            self,
            kwargs,
            inputs,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            on_text=on_text,
            inner_layer=inner_layer,
            inner_prune_ratio=inner_prune_ratio,
            reuse=reuse,
        )


def load(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Any = None,
    quantize: str | None = None,
    name: str | None = None,
) -> Qwen3_VL:
    """Load a Qwen3-VL checkpoint folder with SDPA attention (never remote code).

    A bitsandbytes ``quantization`` config is used as given (the loader built it with this family's
    :data:`QUANTIZATION_SKIP`). On a transformers without Qwen3-VL this raises ModelError naming the version.
    """
    check_transformers_version()  # before model_class, so an old version is named as such
    model_cls = model_class("Qwen3VLForConditionalGeneration", DISPLAY_NAME)
    model, tokenizer = load_pretrained(model_cls, path, device=device, dtype=dtype, quantization=quantization)
    return Qwen3_VL(model, tokenizer, Path(path), name or str(path), quantize)
