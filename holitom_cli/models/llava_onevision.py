"""LLaVA-OneVision (SigLIP + Qwen2) on transformers 5: preprocessing, prompt, vision features, generation.

Token layout of a video of T frames: SigLIP turns each frame into g x g patches (g = image_size / patch_size,
27 for the real checkpoints), the projector maps them to the LLM width C, bilinear pooling gives N =
ceil(g/2)^2 tokens per frame (196), and ONE ``image_newline`` embedding follows the whole video. The prompt
holds exactly as many ``<video>`` tokens as embeddings go in (T*N + 1 uncompressed, M + 1 after HoliTom's
outer stage). Generation passes the embeddings through ``mm_encoder_outputs`` (no pixels), which with
uncompressed features is exactly what ``generate(pixel_values_videos=...)`` does internally.

At the family-neutral boundary (:mod:`holitom_cli.models.base`): the temporal unit is the frame, the token
grid is (ceil(g/2), ceil(g/2)), the ``image_newline`` is the one suffix token, and positions are the
default consecutive 1-D ones (the reference's).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from holitom_cli.compression.flops import VisionShape, vision_flops
from holitom_cli.errors import ConfigError, ModelError
from holitom_cli.models.base import (
    GenerationResult,
    LanguageDims,
    PromptInputs,
    Turn,
    VideoAdapter,
    VisualSpan,
    VisualTokens,
    context_of,
    conversation,
    embeds_dtype,
    load_pretrained,
    run_generation,
)
from holitom_cli.models.compat import video_features
from holitom_cli.models.random_model import QWEN_CHAT_TEMPLATE
from holitom_cli.models.vision_attention import ReceivedAttention

FAMILY = "llava_onevision"
DISPLAY_NAME = "LLaVA-OneVision"
DEFAULT_CHECKPOINTS = (
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "llava-hf/llava-onevision-qwen2-72b-ov-hf",
)
#: Module-name prefixes bitsandbytes must leave unquantized (matched from the start of the name: a bare
#: "vision_tower" would silently match nothing).
QUANTIZATION_SKIP = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
_PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json", "processor_config.json")


class _SkipFile(Exception):
    """A preprocessor config file without image settings: try the next one."""


@dataclass(frozen=True)
class Preprocessing:
    """Resize / rescale / normalise settings from the checkpoint's saved preprocessor config."""

    size: int  # square side in pixels (= the vision tower's image_size)
    resample: int  # PIL resampling filter id (3 = bicubic)
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # the file the settings came from ("defaults" when none was found)

    @classmethod
    def from_checkpoint(cls, path: Path, image_size: int) -> Preprocessing:
        for name in _PREPROCESSOR_FILES:
            file = path / name
            if not file.is_file():
                continue
            try:
                return cls._from_file(file, name, image_size)
            except _SkipFile:
                continue
            except ModelError:
                raise
            except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
                raise ModelError(
                    f"the preprocessor config {file} is broken ({type(exc).__name__}: {exc})",
                    hint="the download may be incomplete: run `holitom download` again, or fix the file",
                ) from exc
        # SigLIP's values (LLaVA-OV): bicubic, 1/255, mean = std = 0.5 (NOT the CLIP defaults of the library).
        return cls(image_size, 3, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "defaults")

    @classmethod
    def _from_file(cls, file: Path, name: str, image_size: int) -> Preprocessing:
        """Settings from one saved config file; raises _SkipFile when it holds no image settings."""
        spec = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(spec, dict):
            raise ValueError(f"expected a JSON object, found {type(spec).__name__}")
        spec = spec.get("video_processor") or spec.get("image_processor") or spec
        if not isinstance(spec, dict) or "image_mean" not in spec:
            raise _SkipFile
        size = spec.get("size") or {}
        side = size.get("height") or size.get("shortest_edge") or image_size
        if int(side) != image_size:
            raise ModelError(
                f"{file} resizes to {side} px but the vision tower expects {image_size} px",
                hint="the checkpoint's preprocessor config does not match its model config",
            )
        normalize = spec.get("do_normalize", True)
        mean = tuple(float(v) for v in spec["image_mean"]) if normalize else (0.0, 0.0, 0.0)
        std = tuple(float(v) for v in spec.get("image_std", (1.0, 1.0, 1.0))) if normalize else (1.0,) * 3
        if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
            raise ValueError("image_mean and image_std must hold 3 values each, std > 0")
        rescale = float(spec.get("rescale_factor", 1 / 255)) if spec.get("do_rescale", True) else 1.0
        return cls(
            size=image_size,
            resample=int(spec.get("resample", 3)),
            rescale_factor=rescale,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            source=name,
        )

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 3, size, size) float32 normalised."""
        from PIL import Image

        resized = np.stack(
            [
                np.asarray(Image.fromarray(f).resize((self.size, self.size), resample=self.resample))
                for f in frames
            ]
        )  # (T, size, size, 3) uint8
        x = torch.from_numpy(resized).float() * self.rescale_factor
        x = (x - torch.tensor(self.mean)) / torch.tensor(self.std)
        return x.permute(0, 3, 1, 2).contiguous()


@dataclass
class LlavaPixels:
    """Preprocessed frames: pixel_values (T, 3, S, S) in the model's dtype and device, and their times."""

    pixel_values: torch.Tensor
    timestamps: list[float]


class LlavaOneVision(VideoAdapter):
    """Adapter for ``LlavaOnevisionForConditionalGeneration`` checkpoints (batch size 1)."""

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
        self.path = path
        self.name = name
        self.quantize = quantize
        self.config = model.config
        self.device = model.model.language_model.embed_tokens.weight.device
        self.dtype = embeds_dtype(model)
        vision = self.config.vision_config
        self.patch_grid = vision.image_size // vision.patch_size
        side = math.ceil(self.patch_grid / 2)
        self.grid = (side, side)
        self.preprocessing = Preprocessing.from_checkpoint(path, vision.image_size)
        self.video_token_id = int(self.config.video_token_id)

    # ------------------------------------------------------------------------------------------- shapes

    @property
    def decoder(self) -> Any:
        """The Qwen2Model (``.layers``, ``.rotary_emb``) the inner stage hooks."""
        return self.model.model.language_model

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

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

    def vision_shape(self) -> VisionShape:
        """SigLIP tower + the 2-layer projector, per frame."""
        v = self.config.vision_config
        width = int(self.config.text_config.hidden_size)
        return VisionShape(
            num_layers=int(v.num_hidden_layers),
            hidden_size=int(v.hidden_size),
            intermediate_size=int(v.intermediate_size),
            num_heads=int(v.num_attention_heads),
            patches=self.patch_grid**2,
            projector_in=int(v.hidden_size),
            projector_hidden=width,
            projector_out=width,
        )

    def vision_flops(self, tokens: VisualTokens) -> float:
        return vision_flops(self.vision_shape(), tokens.num_units)

    # ------------------------------------------------------------------------------------------- vision

    def preprocess(
        self, frames: np.ndarray, timestamps: list[float] | None = None, **meta: Any
    ) -> LlavaPixels:
        """(T, H, W, 3) uint8 RGB -> (T, 3, S, S) pixel values in the model's dtype, on its device.

        ``timestamps`` (seconds, default 0, 1, 2, ...) become the units' times; ``meta`` is not needed.
        """
        times = list(timestamps) if timestamps is not None else [float(i) for i in range(len(frames))]
        return LlavaPixels(self.preprocessing(frames).to(self.device, self.dtype), [float(t) for t in times])

    def _attention_layer(self) -> Any:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ModelError(
                "checkpoints that concatenate several vision layers are not supported",
                hint="use a checkpoint with a single vision_feature_layer (all LLaVA-OneVision releases)",
            )
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        # hidden_states[j] is the output of layer j - 1 (j >= 1); negative j counts from the last layer
        return layers[layer if layer < 0 else layer - 1].self_attn

    @torch.no_grad()
    def encode_video(
        self, pixels: LlavaPixels, on_progress: Any = None, chunk_frames: int | None = None
    ) -> VisualTokens:
        """Vision tower + projector + pooling per frame, and the last vision layer's received attention.

        Frames run in chunks of ``chunk_frames`` (default: 1 on CPU, where a frame takes seconds and batching
        buys nothing, so progress moves per frame; 8 on accelerators); the attention score runs in chunks of
        4. ``on_progress(frames_done, frames_total)`` is called once with 0 before the first chunk and after
        each chunk. Returns features (T, N, C), saliency (T, N) float32 (pooled like the features) and the
        ``image_newline`` (1, C) as the suffix.
        """
        pixel_values = pixels.pixel_values
        total = int(pixel_values.shape[0])
        if chunk_frames is None:
            chunk_frames = 1 if self.device.type == "cpu" else 8
        features, newline = [], None
        if on_progress is not None:
            on_progress(0, total)
        with ReceivedAttention(self._attention_layer(), chunk_frames=4) as recorder:
            for start in range(0, total, chunk_frames):
                chunk = pixel_values[start : start + chunk_frames]
                # (t*N + 1, C): the frames' tokens, then one newline
                pooled = video_features(self.model.model, chunk[None], self.tokens_per_frame)
                features.append(pooled[:-1].reshape(chunk.shape[0], self.tokens_per_frame, -1))
                newline = pooled[-1]
                if on_progress is not None:
                    on_progress(min(start + chunk_frames, total), total)
        scores = recorder.result()[..., None]  # (T, g*g, 1) float32
        pooled_scores = self.model.model.apply_pooling(scores)[..., 0]  # (T, N), bilinear like the features
        return VisualTokens(
            features=torch.cat(features),
            saliency=pooled_scores.float(),
            grid=self.grid,
            unit_times=list(pixels.timestamps),
            suffix=newline[None],
        )

    # ------------------------------------------------------------------------------------------- prompt

    def _render(self, question: str, history: Sequence[Turn] = ()) -> str:
        """Chat-template text with one ``<video>`` placeholder before the (first) question."""
        placeholder = "<video>"
        attempts = [
            conversation(question, history, lambda q: f"{placeholder}\n{q}"),
            conversation(question, history, lambda q: [{"type": "video"}, {"type": "text", "text": q}]),
        ]
        template = getattr(self.tokenizer, "chat_template", None)
        for messages in attempts if template else []:
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except Exception:  # a template that does not accept this message format
                continue
            if isinstance(text, str) and text.count(placeholder) == 1 and question in text:
                return text
        messages = attempts[0]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=QWEN_CHAT_TEMPLATE
        )

    def prompt_ids(
        self, question: str, num_visual: int, history: Sequence[Turn] = ()
    ) -> tuple[torch.Tensor, int]:
        """Token ids (1, L) with ``num_visual`` ``<video>`` tokens, and the index of the first of them."""
        if not isinstance(question, str) or not question.strip():
            raise ConfigError("the question is empty", hint="ask something about the video")
        specials = set(self.tokenizer.all_special_tokens) | {"<video>", "<image>"}
        found = sorted(tok for tok in specials if tok and tok in question)
        if found:
            raise ConfigError(
                f"the question contains the special token(s) {', '.join(found)}",
                hint="remove them: the video is inserted into the prompt automatically",
            )
        for turn in history:
            self._check_turn(turn)
        ids = self.tokenizer(self._render(question, history), add_special_tokens=False)["input_ids"]
        positions = [i for i, t in enumerate(ids) if t == self.video_token_id]
        if len(positions) != 1:
            raise ModelError(
                f"the chat template produced {len(positions)} video placeholders instead of 1",
                hint="the checkpoint's tokenizer or chat template is not a LLaVA-OneVision one",
            )
        start = positions[0]
        ids = ids[:start] + [self.video_token_id] * num_visual + ids[start + 1 :]
        return torch.tensor([ids], dtype=torch.long, device=self.device), start

    def text_tokens(self, question: str) -> int:
        return int(self.prompt_ids(question, 0)[0].shape[1])

    def _check_turn(self, turn: Turn) -> None:
        """An earlier turn must not contain the video placeholder (it would be taken for the video)."""
        if any("<video>" in str(text) or "<image>" in str(text) for text in turn):
            raise ConfigError(
                "an earlier turn of the conversation contains <video> or <image>",
                hint="turn conversation history off, or remove the placeholder",
            )

    def build_prompt(self, question: str, span: VisualSpan, history: Sequence[Turn] = ()) -> PromptInputs:
        """One ``<video>`` token per span embedding (the newline included); default 1-D positions."""
        input_ids, start = self.prompt_ids(question, len(span), history)
        return PromptInputs(input_ids=input_ids, visual_start=start, visual_len=len(span))

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

        With ``inner_layer`` set, HoliTom's inner stage merges the visual span (the newline included, as
        the reference does) at that decoder layer during prefill.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        input_ids = inputs.input_ids
        if len(span) != int((input_ids == self.video_token_id).sum()) or len(span) != inputs.visual_len:
            raise ValueError("the prompt's <video> tokens and the visual embeddings differ in number")
        embeds = span.embeds[None].to(self.device, self.dtype)  # (1, M + 1, C)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=embeds)},
        }
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
) -> LlavaOneVision:
    """Load a LLaVA-OneVision checkpoint folder with SDPA attention (never remote code).

    A bitsandbytes ``quantization`` config is used as given (the loader built it with this family's
    :data:`QUANTIZATION_SKIP`).
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    model, tokenizer = load_pretrained(
        LlavaOnevisionForConditionalGeneration, path, device=device, dtype=dtype, quantization=quantization
    )
    return LlavaOneVision(model, tokenizer, Path(path), name or str(path), quantize)
