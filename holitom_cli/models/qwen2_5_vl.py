"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) on transformers 5, at the family-neutral boundary.

Token layout of a video of T frames resized to H x W: patches of p = 14 px, two consecutive frames per
temporal patch (T' = ceil(T / 2) temporal units, the last frame repeated for an odd T), and the merger maps
every 2 x 2 patch cell to one LLM token: N = (H / 28) * (W / 28) tokens per unit on a non-square
(rows, cols) grid. The prompt comes from the chat template: ``<|vision_start|>`` + one ``<|video_pad|>`` per
visual token + ``<|vision_end|>``.

Positions (3-D M-RoPE, sections temporal / height / width): the model's own ``get_rope_index`` is run on
the UNCOMPRESSED prompt (T' N video pads); every output visual token takes the column of the token it stands
at (its unit, row, col), the text before the video keeps its positions, and the text after the video keeps
the positions it has in the uncompressed prompt (so compression moves nothing). Decoding continues from the
last prompt position + 1, as the unmodified model does. Generation passes the visual embeddings through
``mm_encoder_outputs`` and these positions through ``position_ids`` (no pixels): with the uncompressed span
this is exactly ``generate(pixel_values_videos=..., video_grid_thw=..., second_per_grid_ts=...)``.

HoliTom's temporal unit is the temporal patch; saliency: see :mod:`holitom_cli.models.qwen_vision`.
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
    context_of,
    conversation,
    embeds_dtype,
    load_pretrained,
    run_generation,
)
from holitom_cli.models.compat import rope_index
from holitom_cli.models.qwen_preprocess import QwenPixels, QwenVideoPreprocessing
from holitom_cli.models.qwen_vision import encode_units, vision_encoder_flops

FAMILY = "qwen2_5_vl"
DISPLAY_NAME = "Qwen2.5-VL"
DEFAULT_CHECKPOINTS = (
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "Qwen/Qwen2.5-VL-72B-Instruct",
)
#: Module-name prefixes bitsandbytes must leave unquantized (vision encoder + merger, output head).
QUANTIZATION_SKIP = ("model.visual", "lm_head")
_VIDEO_TYPE = 2  # mm_token_type_ids value of video placeholders (0 text, 1 image)

#: The Qwen2-VL / Qwen2.5-VL chat template (as on the hub): default system prompt, one
#: ``<|vision_start|><|video_pad|><|vision_end|>`` per video item; used when a tokenizer has no template.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


class Qwen2_5_VL(VideoAdapter):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration`` checkpoints (batch size 1)."""

    FAMILY = FAMILY
    DISPLAY_NAME = DISPLAY_NAME
    DEFAULT_CHECKPOINTS = DEFAULT_CHECKPOINTS
    QUANTIZATION_SKIP = QUANTIZATION_SKIP
    VISUAL_INPUTS = ("mm_encoder_outputs",)  # the visual embeddings among generate's inputs

    def __init__(
        self, model: Any, tokenizer: Any, path: Path, name: str, quantize: str | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = Path(path)
        self.name = name
        self.quantize = quantize
        self.config = model.config
        self.device = model.model.language_model.embed_tokens.weight.device
        self.dtype = embeds_dtype(model)
        self.preprocessing = QwenVideoPreprocessing.from_checkpoint(self.path, self.config.vision_config)
        self.video_token_id = int(self.config.video_token_id)
        self.vision_start_id = int(self.config.vision_start_token_id)
        self.vision_end_id = int(self.config.vision_end_token_id)

    # ------------------------------------------------------------------------------------------- shapes

    @property
    def decoder(self) -> Any:
        """The ``Qwen2_5_VLTextModel`` (``.layers``, ``.rotary_emb``) the inner stage hooks."""
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
            context=context_of(t),
        )

    def vision_flops(self, tokens: VisualTokens) -> float:
        """Vision encoder + merger FLOPs for the video's temporal patches (window attention counted per
        window, see :func:`~holitom_cli.models.qwen_vision.vision_encoder_flops`)."""
        rows, cols = tokens.grid
        return vision_encoder_flops(self.config.vision_config, tokens.num_units, rows, cols)

    # ------------------------------------------------------------------------------------------- vision

    def preprocess(
        self,
        frames: np.ndarray,
        timestamps: list[float],
        *,
        video_fps: float | None = None,
        total_frames: int | None = None,
    ) -> QwenPixels:
        """(T, H, W, 3) uint8 RGB + timestamps -> :class:`QwenPixels` (patches on the model's device).

        ``video_fps`` / ``total_frames`` of the source give qwen-vl-utils' ``sample_fps``; without them the
        timestamps' spacing does.
        """
        pixels = self.preprocessing(frames, timestamps, video_fps=video_fps, total_frames=total_frames)
        pixels.pixel_values_videos = pixels.pixel_values_videos.to(self.device, self.dtype)
        return pixels

    @torch.no_grad()
    def encode_video(
        self, pixels: QwenPixels, on_progress: Any = None, chunk_units: int | None = None
    ) -> VisualTokens:
        """Vision encoder + merger per temporal patch, and the last full-attention block's saliency.

        ``chunk_units`` temporal patches run per encoder call (default 1 on CPU, where progress then moves
        per unit, 8 on accelerators); ``on_progress(units_done, units_total)``.
        """
        grid = tuple(int(v) for v in pixels.video_grid_thw[0].tolist())
        if chunk_units is None:
            chunk_units = 1 if self.device.type == "cpu" else 8
        features, saliency = encode_units(
            self.model.model,
            pixels.pixel_values_videos,
            grid,
            chunk_units,
            on_progress,  # type: ignore[arg-type]
        )
        merge = self.preprocessing.merge_size
        return VisualTokens(
            features=features,
            saliency=saliency.float(),
            grid=(grid[1] // merge, grid[2] // merge),
            unit_times=list(pixels.unit_times),
            suffix=None,
            frames_per_unit=self.preprocessing.temporal_patch_size,
            layout={
                "video_grid_thw": pixels.video_grid_thw.clone(),
                "second_per_grid_ts": float(pixels.second_per_grid_ts),
            },
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
            messages, tokenize=False, add_generation_prompt=True, chat_template=QWEN_VL_CHAT_TEMPLATE
        )

    def _check_question(self, question: str) -> None:
        if not isinstance(question, str) or not question.strip():
            raise ConfigError("the question is empty", hint="ask something about the video")
        specials = set(self.tokenizer.all_special_tokens) | {
            "<|video_pad|>",
            "<|image_pad|>",
            "<|vision_start|>",
        }
        found = sorted(tok for tok in specials if tok and tok in question)
        if found:
            raise ConfigError(
                f"the question contains the special token(s) {', '.join(found)}",
                hint="remove them: the video is inserted into the prompt automatically",
            )

    def text_tokens(self, question: str) -> int:
        """Prompt tokens without the video pads (``<|vision_start|>``/``<|vision_end|>`` included)."""
        self._check_question(question)
        return len(self.tokenizer(self._render(question), add_special_tokens=False)["input_ids"]) - 1

    def full_prompt(
        self, question: str, layout: dict[str, Any], history: Sequence[Turn] = ()
    ) -> tuple[list[int], int, int]:
        """The uncompressed prompt: (token ids with every video pad, index of the first pad, pad count)."""
        self._check_question(question)
        ids = self.tokenizer(self._render(question, history), add_special_tokens=False)["input_ids"]
        pads = [i for i, t in enumerate(ids) if t == self.video_token_id]
        if (
            len(pads) != 1
            or ids[pads[0] - 1] != self.vision_start_id
            or ids[pads[0] + 1] != self.vision_end_id
        ):
            raise ModelError(
                f"the chat template produced {len(pads)} video placeholders instead of one "
                "<|vision_start|><|video_pad|><|vision_end|>",
                hint="the checkpoint's tokenizer or chat template is not a Qwen2.5-VL one",
            )
        t, h, w = (int(v) for v in layout["video_grid_thw"][0].tolist())
        merge = self.preprocessing.merge_size
        count = t * (h // merge) * (w // merge)
        start = pads[0]
        return ids[:start] + [self.video_token_id] * count + ids[start + 1 :], start, count

    def build_prompt(self, question: str, span: VisualSpan, history: Sequence[Turn] = ()) -> PromptInputs:
        """The prompt with ``len(span)`` video pads; M-RoPE positions as described in the module docstring."""
        layout = span.layout
        if "video_grid_thw" not in layout or "second_per_grid_ts" not in layout:
            raise ValueError(
                "the span carries no Qwen2.5-VL layout (was it built from encode_video's tokens?)"
            )
        full, start, count = self.full_prompt(question, layout, history)
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
            layout["video_grid_thw"].to(self.device), layout["second_per_grid_ts"],
        )  # fmt: skip
        positions = positions.cpu()  # (3, 1, L_full)
        visual_cols = start + (unit * rows + row) * cols + col  # (M,) columns of the uncompressed prompt
        keep = torch.cat([torch.arange(start), visual_cols, torch.arange(start + count, len(full))])
        ids = full[:start] + [self.video_token_id] * len(span) + full[start + count :]
        input_ids = torch.tensor([ids], dtype=torch.long)
        position_ids = positions.index_select(2, keep)  # (3, 1, L)
        return PromptInputs(
            input_ids=input_ids.to(self.device),
            visual_start=start,
            visual_len=len(span),
            position_ids=position_ids.to(self.device),
            extra={
                "mm_token_type_ids": ((input_ids == self.video_token_id).int() * _VIDEO_TYPE).to(self.device),
                "rope_deltas": (position_ids.max() + 1 - input_ids.shape[1]).view(1, 1).to(self.device),
            },
        )

    # ------------------------------------------------------------------------------------------- generation

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

        With ``inner_layer`` set, HoliTom's inner stage merges the visual span at that decoder layer during
        prefill (kept tokens keep their M-RoPE positions).
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        input_ids = inputs.input_ids
        if len(span) != int((input_ids == self.video_token_id).sum()) or len(span) != inputs.visual_len:
            raise ValueError("the prompt's video pads and the span's embeddings differ in number")
        if inputs.position_ids is None:
            raise ValueError("Qwen2.5-VL prompts carry M-RoPE position_ids (use build_prompt)")
        embeds = span.embeds.to(self.device, self.dtype)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": inputs.position_ids,  # (3, 1, L); generate adds 1 per new token
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=(embeds,))},
        }
        self.model.model.rope_deltas = None  # never continue from another prompt's cached deltas
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
) -> Qwen2_5_VL:
    """Load a Qwen2.5-VL checkpoint folder with SDPA attention (never remote code).

    A bitsandbytes ``quantization`` config is used as given (``load_model`` built it with this family's
    :data:`QUANTIZATION_SKIP`).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, tokenizer = load_pretrained(
        Qwen2_5_VLForConditionalGeneration, path, device=device, dtype=dtype, quantization=quantization
    )
    return Qwen2_5_VL(model, tokenizer, Path(path), name or str(path), quantize)
