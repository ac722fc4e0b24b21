"""LLaVA-OneVision (SigLIP + Qwen2) on transformers 5: preprocessing, prompt, vision features, generation.

Token layout of a video of T frames: SigLIP turns each frame into g x g patches (g = image_size / patch_size,
27 for the real checkpoints), the projector maps them to the LLM width C, bilinear pooling gives N =
ceil(g/2)^2 tokens per frame (196), and ONE ``image_newline`` embedding follows the whole video. The prompt
holds exactly as many ``<video>`` tokens as embeddings go in (T*N + 1 uncompressed, M + 1 after HoliTom's
outer stage). Generation passes the embeddings through ``mm_encoder_outputs`` (no pixels), which with
uncompressed features is exactly what ``generate(pixel_values_videos=...)`` does internally.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from holitom_cli.errors import ConfigError, ModelError
from holitom_cli.models.compat import check_transformers_version, output_cache, video_features
from holitom_cli.models.loading import VideoLanguageModel
from holitom_cli.models.noise import quiet_library_noise
from holitom_cli.models.random_model import QWEN_CHAT_TEMPLATE
from holitom_cli.models.vision_attention import ReceivedAttention

FAMILY = "llava_onevision"
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
class VisionOutput:
    """Per-frame visual tokens of one video, in the language model's width C.

    features: (T, N, C) model dtype; attention: (T, N) float32 received attention (last vision layer, pooled
    like the features); newline: (C,) the ``image_newline`` embedding appended after the video.
    """

    features: torch.Tensor
    attention: torch.Tensor
    newline: torch.Tensor
    grid: tuple[int, int]


@dataclass
class GenerationResult:
    """One generated answer with its measurements (seconds, bytes)."""

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


class _Streamer:
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
        new = text[len(self._emitted) :]  # earlier text is never re-emitted, even if its decoding changed
        self._emitted = text
        if new and self.on_text is not None:
            self.on_text(new)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LlavaOneVision(VideoLanguageModel):
    """Adapter for ``LlavaOnevisionForConditionalGeneration`` checkpoints."""

    family = FAMILY

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
        self.dtype = model.model.language_model.embed_tokens.weight.dtype
        if self.dtype not in (
            torch.float32,
            torch.bfloat16,
            torch.float16,
        ):  # quantized embeddings: use lm_head
            self.dtype = model.lm_head.weight.dtype
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
    def num_layers(self) -> int:
        return int(self.config.text_config.num_hidden_layers)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    def language_dims(self) -> dict[str, int]:
        t = self.config.text_config
        return {
            "num_layers": int(t.num_hidden_layers),
            "hidden_size": int(t.hidden_size),
            "intermediate_size": int(t.intermediate_size),
            "num_heads": int(t.num_attention_heads),
            "num_kv_heads": int(t.num_key_value_heads),
            "vocab_size": int(t.vocab_size),
        }

    def vision_dims(self) -> dict[str, int]:
        v = self.config.vision_config
        return {
            "num_layers": int(v.num_hidden_layers),
            "hidden_size": int(v.hidden_size),
            "intermediate_size": int(v.intermediate_size),
            "num_heads": int(v.num_attention_heads),
            "num_patches": self.patch_grid**2,
            "patch_size": int(v.patch_size),
            "image_size": int(v.image_size),
            "projector_dim": int(self.config.text_config.hidden_size),
            "tokens_per_frame": self.tokens_per_frame,
        }

    # ------------------------------------------------------------------------------------------- vision

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 3, S, S) pixel values in the model's dtype, on its device."""
        return self.preprocessing(frames).to(self.device, self.dtype)

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
        self, pixel_values: torch.Tensor, chunk_frames: int | None = None, on_progress: Any = None
    ) -> VisionOutput:
        """Vision tower + projector + pooling per frame, and the last vision layer's received attention.

        pixel_values: (T, 3, S, S). Frames run in chunks of ``chunk_frames`` (default: 1 on CPU, where a
        frame takes seconds and batching buys nothing, so progress moves per frame; 8 on accelerators);
        the attention score runs in chunks of 4. ``on_progress(frames_done, frames_total)`` is called once
        with 0 before the first chunk and after each chunk.
        """
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
        return VisionOutput(torch.cat(features), pooled_scores.float(), newline, self.grid)

    # ------------------------------------------------------------------------------------------- prompt

    def _render(self, question: str) -> str:
        """Chat-template text with one ``<video>`` placeholder before the question."""
        placeholder = "<video>"
        attempts = [
            [{"role": "user", "content": f"{placeholder}\n{question}"}],
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
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

    def build_prompt(self, question: str, num_visual: int) -> tuple[torch.Tensor, int]:
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
        ids = self.tokenizer(self._render(question), add_special_tokens=False)["input_ids"]
        positions = [i for i, t in enumerate(ids) if t == self.video_token_id]
        if len(positions) != 1:
            raise ModelError(
                f"the chat template produced {len(positions)} video placeholders instead of 1",
                hint="the checkpoint's tokenizer or chat template is not a LLaVA-OneVision one",
            )
        start = positions[0]
        ids = ids[:start] + [self.video_token_id] * num_visual + ids[start + 1 :]
        return torch.tensor([ids], dtype=torch.long, device=self.device), start

    # ------------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        visual_embeds: torch.Tensor,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float | None = None,
        on_text: Any = None,
        inner_layer: int | None = None,
        inner_prune_ratio: float = 0.5,
        visual_start: int | None = None,
    ) -> GenerationResult:
        """Generate an answer. visual_embeds: (M, C) visual tokens including the trailing newline.

        With ``inner_layer`` set, HoliTom's inner stage merges the visual span at that decoder layer during
        prefill.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if visual_embeds.shape[0] != int((input_ids == self.video_token_id).sum()):
            raise ValueError("the prompt's <video> tokens and the visual embeddings differ in number")
        streamer = _Streamer(self.tokenizer, on_text)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_encoder_outputs": {
                "video": BaseModelOutputWithPooling(
                    pooler_output=visual_embeds[None].to(self.device, self.dtype)
                )
            },
            "max_new_tokens": max_new_tokens,
            "streamer": streamer,
            "return_dict_in_generate": True,
            "pad_token_id": self.model.generation_config.pad_token_id or self.tokenizer.pad_token_id,
        }
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p if top_p is not None else 1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        handle = None
        if inner_layer is not None:
            from holitom_cli.models.inner_merge import attach_inner_merge

            if visual_start is None:
                raise ValueError("visual_start is needed for the inner stage")
            handle = attach_inner_merge(self.decoder, layer=inner_layer, prune_ratio=inner_prune_ratio)
            handle.arm(visual_start, int(visual_embeds.shape[0]))
        try:
            _sync(self.device)
            start = time.perf_counter()
            out = self.model.generate(**kwargs)
            _sync(self.device)
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
        kv_bytes, kv_lengths = cache_size(output_cache(out))
        del out
        return GenerationResult(
            text=streamer.text(),
            token_ids=list(streamer.ids),
            prompt_tokens=int(input_ids.shape[1]),
            started_at=start,
            prefill_s=times[0] - start,
            decode_s=times[-1] - times[0],
            kv_cache_bytes=kv_bytes,
            kv_lengths=kv_lengths,
            inner_stats=inner_stats,
        )


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


def load(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Any = None,
    quantize: str | None = None,
    name: str | None = None,
) -> LlavaOneVision:
    """Load a LLaVA-OneVision checkpoint folder with SDPA attention (never remote code)."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    check_transformers_version()
    quiet_library_noise()
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": str(device)}
    elif device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    try:
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # OSError, SafetensorError, ValueError...: all mean "this folder does not load"
        raise ModelError(
            f"could not load the checkpoint in {path}: {exc}",
            hint="the download may be incomplete: run `holitom download` again, or check the folder",
        ) from exc
    model.eval()
    return LlavaOneVision(model, tokenizer, Path(path), name or str(path), quantize)
