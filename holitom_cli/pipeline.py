"""Load a model once, prepare a video once, answer many questions about it; with timings and statistics.

```python
pipe = Pipeline.load("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
video = pipe.prepare_video("clip.mp4", SamplingOptions(frames=32))   # decode + vision tower, once
answer = pipe.ask(video, "What happens?", get_preset("balanced"), GenerationOptions(), on_text=print)
answer.text, answer.stats.to_dict()
```

The decoded frames, the vision features and attention (``prepare_video``) and the outer compression
(``compress``, cached on the PreparedVideo per outer setting) do not depend on the question, so further
questions about the same video only run the language model. See docs/pipeline.md.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from holitom_cli.errors import ConfigError
from holitom_cli.stats import AnswerStats, FlopStats, InnerStats, TimingStats, TokenStats, peak_memory_bytes
from holitom_cli.video import VideoClip, load_video

__all__ = ["Answer", "GenerationOptions", "Pipeline", "PreparedVideo", "SamplingOptions"]


@dataclass(frozen=True)
class SamplingOptions:
    """Which frames to take: ``frames`` uniformly, or ``fps`` frames per second capped at ``max_frames``.

    With ``fps`` set, ``frames`` is ignored (and may be None).
    """

    frames: int | None = 32
    fps: float | None = None
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if self.frames is None and self.fps is None:
            raise ConfigError("give a number of frames or an fps", hint="e.g. --frames 32 or --fps 1")
        if self.frames is not None and (
            isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1
        ):
            raise ConfigError(f"frames must be an integer >= 1, got {self.frames!r}", hint="e.g. --frames 32")
        if self.fps is not None and (
            isinstance(self.fps, bool)
            or not isinstance(self.fps, int | float)
            or not math.isfinite(self.fps)
            or self.fps <= 0
        ):
            raise ConfigError(f"fps must be a number > 0, got {self.fps!r}", hint="e.g. --fps 1")
        if self.max_frames is not None and (
            isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1
        ):
            raise ConfigError(
                f"max_frames must be an integer >= 1, got {self.max_frames!r}", hint="e.g. --max-frames 64"
            )


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings: greedy when ``temperature`` is 0; ``top_p`` only applies when sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None  # seeds torch's RNG before sampling (reproducible answers with temperature > 0)

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(
                f"max_new_tokens must be an integer >= 1, got {n!r}", hint="e.g. --max-new-tokens 256"
            )
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"temperature must be a number >= 0, got {t!r}", hint="0 means greedy decoding")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1):
            raise ConfigError(f"top_p must be a number in (0, 1], got {p!r}", hint="e.g. --top-p 0.9")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}", hint="e.g. --seed 1234")

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


@dataclass
class PreparedVideo:
    """A decoded video and its question-independent vision outputs, reused by every question.

    clip: the decoded frames (T, H, W, 3) uint8 RGB and their metadata; tokens: the adapter's
    ``VisualTokens`` (features (T', N, C), saliency (T', N), grid (rows, cols), unit_times, suffix) over T'
    temporal units; vision_flops: FLOPs the vision side spent on them (the adapter's count).
    """

    clip: VideoClip
    tokens: Any
    vision_s: float
    model_name: str
    vision_peak_bytes: int = 0  # CUDA: peak allocated while the vision tower ran (0 on other devices)
    vision_flops: float = 0.0
    source: str = "vision"  # "vision": this process ran the vision tower; "cache": read from the video cache
    answers: int = 0  # questions answered about it so far (later ones reuse it: ``reused.video``)
    encode_s: float | None = None  # the vision tower's time when it ran (kept in a video-cache entry)
    _compressed: dict[tuple, tuple[Any, float]] = field(default_factory=dict, repr=False)
    _prefix: Any = field(default=None, repr=False)  # the language model's prefix states (PrefixStore)

    @property
    def features(self) -> Any:
        return self.tokens.features

    @property
    def attention(self) -> Any:
        """(T', N) float32 vision saliency (what HoliTom's attention selection reads)."""
        return self.tokens.saliency

    @property
    def grid(self) -> tuple[int, int]:
        return self.tokens.grid

    @property
    def num_frames(self) -> int:
        """Sampled frames T (decoded)."""
        return self.clip.num_frames

    @property
    def num_units(self) -> int:
        """Temporal units T' (LLaVA-OneVision: frames; Qwen2.5-VL: temporal patches of 2 frames)."""
        return self.tokens.num_units

    @property
    def tokens_per_unit(self) -> int:
        return self.tokens.tokens_per_unit

    @property
    def num_input_tokens(self) -> int:
        """T' N visual tokens before any merging (the suffix not included)."""
        return self.num_units * self.tokens_per_unit

    @property
    def decode_s(self) -> float:
        return self.clip.decode_s

    @property
    def path(self) -> str:
        return self.clip.meta.path


@dataclass
class Answer:
    """The generated text and its statistics (``stats.to_dict()`` is the CLI's JSON)."""

    text: str
    stats: AnswerStats
    token_ids: list[int] = field(default_factory=list)
    compression: Any = None  # the CompressionResult used, or None without HoliTom


def check_question(question: Any) -> str:
    """The question, or ConfigError when it is empty (cheap: run it before loading a model)."""
    if not isinstance(question, str) or not question.strip():
        raise ConfigError("the question is empty", hint="ask something about the video")
    return question


def context_length(model: Any) -> int | None:
    """The language model's context (the adapter's ``LanguageDims.context``), or None when unknown."""
    return model.language_dims().context


def _context_error(prompt_tokens: int, visual: int | None, max_new_tokens: int, context: int) -> ConfigError:
    video = f" ({visual:,} of them visual)" if visual is not None else ""
    return ConfigError(
        f"the prompt needs {prompt_tokens:,} tokens{video} plus --max-new-tokens {max_new_tokens:,}, "
        f"more than the model's context of {context:,} tokens",
        hint="use fewer frames (--frames), a stronger preset (-p fastest), a shorter question, "
        "or a smaller --max-new-tokens",
    )


def _without_repeats(callback: Any) -> Any:
    """``callback`` called only when its arguments change (the model may report ``(0, T)`` again)."""
    last: list[tuple] = []

    def call(*args: Any) -> None:
        if not last or last[0] != args:
            last[:] = [args]
            callback(*args)

    return call


def _outer_key(cfg: Any) -> tuple:
    return (cfg.retain_ratio, cfg.tau, cfg.beta, cfg.dpc_k, cfg.max_window)


def _sync(device: Any) -> None:
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)


class Pipeline:
    """A loaded video LLM and the HoliTom stages around it.

    ``reuse_prefix``: later questions about a PreparedVideo reuse the language model's KV of the prompt
    prefix they share with an earlier one (layers below the inner layer K; every layer without the inner
    stage), see holitom_cli.models.prefix_reuse. Answers are those of a cold run.
    """

    def __init__(self, model: Any, reuse_prefix: bool = True) -> None:
        self.model = model  # a holitom_cli.models.base.VideoAdapter (any family)
        self.reuse_prefix = reuse_prefix

    @classmethod
    def load(
        cls,
        model: str,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str | None = None,
        offline: bool = False,
    ) -> Pipeline:
        """Load a hub id or local checkpoint folder (see ``holitom_cli.models.load_model``)."""
        from holitom_cli.models import load_model

        return cls(
            load_model(
                model, revision=revision, device=device, dtype=dtype, quantize=quantize, offline=offline
            )
        )

    # ------------------------------------------------------------------------------------------- video

    def prepare_video(
        self,
        video: str | os.PathLike | VideoClip,
        sampling: SamplingOptions | None = None,
        on_progress: Any = None,
    ) -> PreparedVideo:
        """Decode ``video`` (a path, or an already decoded VideoClip) and run the vision tower once.

        ``on_progress(frames_done, frames_total)`` is called as the vision tower gets through the frames.
        """
        sampling = sampling or SamplingOptions()
        if isinstance(video, VideoClip):
            clip = video
        else:
            clip = load_video(
                video, num_frames=sampling.frames or 32, fps=sampling.fps, max_frames=sampling.max_frames
            )
        if on_progress is not None:  # the frame count is known once decoded: "0/T" before the vision tower
            on_progress = _without_repeats(on_progress)
            on_progress(0, int(clip.frames.shape[0]))
        device = self.model.device
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        meta = clip.meta
        pixels = self.model.preprocess(
            clip.frames,
            list(clip.timestamps),
            video_fps=meta.fps or None,
            total_frames=meta.frame_count or None,
        )
        tokens = self.model.encode_video(pixels, on_progress=on_progress)
        del pixels
        _sync(device)
        vision_s = time.perf_counter() - start
        on_cuda = getattr(device, "type", None) == "cuda"
        return PreparedVideo(
            clip=clip,
            tokens=tokens,
            vision_s=vision_s,
            model_name=self.model.name,
            vision_peak_bytes=peak_memory_bytes(device) if on_cuda else 0,
            vision_flops=float(self.model.vision_flops(tokens)),
            encode_s=vision_s,
        )

    def compress(self, video: PreparedVideo, cfg: Any) -> Any:
        """HoliTom's outer stage on the video's tokens: a CompressionResult, cached per outer setting."""
        return self._compress_timed(video, cfg)[0]

    def _compress_timed(self, video: PreparedVideo, cfg: Any) -> tuple[Any, float, bool]:
        from holitom_cli.compression import compress_video_tokens

        key = _outer_key(cfg)
        if key in video._compressed:
            result, seconds = video._compressed[key]
            return result, seconds, True
        _sync(self.model.device)
        start = time.perf_counter()
        result = compress_video_tokens(video.tokens.features, video.tokens.saliency, cfg)
        _sync(self.model.device)
        seconds = time.perf_counter() - start
        video._compressed[key] = (result, seconds)
        return result, seconds, False

    # ------------------------------------------------------------------------------------------- questions

    @property
    def context_length(self) -> int | None:
        """Tokens the language model can attend to (prompt + answer), or None when the config does not say."""
        return context_length(self.model)

    def check_question(self, question: str, options: GenerationOptions | None = None) -> int:
        """Cheap check before any video work: the question's prompt (one visual token) plus the answer must
        fit the context. Returns the prompt's text tokens; raises ConfigError otherwise."""
        check_question(question)
        options = options or GenerationOptions()
        text_tokens = self.model.text_tokens(question)
        context = self.context_length
        if context is not None and text_tokens + 1 + options.max_new_tokens > context:
            raise _context_error(text_tokens + 1, None, options.max_new_tokens, context)
        return text_tokens

    def ask(
        self,
        video: PreparedVideo,
        question: str,
        cfg: Any = None,
        options: GenerationOptions | None = None,
        on_text: Any = None,
        history: Any = (),
        as_first: bool = False,
    ) -> Answer:
        """Answer ``question`` about a prepared video; ``cfg`` a HoliTomConfig, or None for no compression.

        ``on_text(piece)`` receives the answer's text as it is generated. ``history``: earlier (question,
        answer) turns of a conversation about this video, put in the prompt before ``question``; empty (the
        default) asks independently of any earlier answer. ``as_first``: time this answer as the first about
        its video, i.e. count the video's stored decoding, vision and compression times although they were
        reused (comparisons between settings, where every run should carry the same video cost).
        """
        import torch

        check_question(question)
        options = options or GenerationOptions()
        if video.model_name != self.model.name:
            raise ConfigError(
                "this video was prepared with another model", hint="call prepare_video with this pipeline"
            )
        outer = self._outer(video, cfg)
        inner_layer = cfg.resolve_inner_layer(self.model.num_layers) if cfg is not None else None
        if getattr(self.model.device, "type", None) == "cuda":  # per answer; the vision peak is added below
            torch.cuda.reset_peak_memory_stats(self.model.device)
        llm_start = time.perf_counter()
        history = tuple((str(q), str(a)) for q, a in history)
        inputs = self.model.build_prompt(question, outer.span, history)
        self._check_context(inputs, options)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        result = self.model.generate(
            inputs,
            outer.span,
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            on_text=on_text,
            inner_layer=inner_layer,
            inner_prune_ratio=cfg.inner_prune_ratio if cfg is not None else 0.0,
            reuse=self._reuse(video, cfg, inner_layer),
        )
        end = time.perf_counter()
        stats = self._stats(video, cfg, options, outer, inner_layer, result, llm_start, end, as_first)
        video.answers += 1
        return Answer(result.text, stats, list(result.token_ids), outer.compression)

    # ------------------------------------------------------------------------------------------- steps

    def _reuse(self, video: PreparedVideo, cfg: Any, inner_layer: int | None) -> Any:
        """Where this answer finds and leaves its prompt prefix's state (None when reuse is off)."""
        if not self.reuse_prefix:
            return None
        from holitom_cli.models.base import PrefixReuse
        from holitom_cli.models.prefix_reuse import PrefixStore

        if video._prefix is None:
            video._prefix = PrefixStore()
        outer = _outer_key(cfg) if cfg is not None else None
        return PrefixReuse(video._prefix, (outer, inner_layer))

    def _outer(self, video: PreparedVideo, cfg: Any) -> _Outer:
        """The visual span that goes into the prompt: every token, or HoliTom's outer stage's output."""
        from holitom_cli.models.base import span_from_compression, uncompressed_span

        if cfg is None:
            return _Outer(uncompressed_span(video.tokens), None, 0.0, False, video.num_input_tokens)
        compression, seconds, reused = self._compress_timed(video, cfg)
        span = span_from_compression(video.tokens, compression)
        return _Outer(span, compression, seconds, reused, int(compression.num_after_temporal))

    def _check_context(self, inputs: Any, options: GenerationOptions) -> None:
        context = self.context_length
        prompt = int(inputs.input_ids.shape[-1])
        if context is not None and prompt + options.max_new_tokens > context:
            raise _context_error(prompt, inputs.visual_len, options.max_new_tokens, context)

    def _inner_stats(self, cfg: Any, layer: int | None, result: Any, into_llm: int) -> InnerStats | None:
        if layer is None:
            return None
        st = result.inner_stats
        before = st.visual_before if st is not None else into_llm
        after = st.visual_after if st is not None else into_llm
        kv = list(st.kv_lengths) if st is not None and st.kv_lengths is not None else None
        return InnerStats(layer, float(cfg.inner_prune_ratio), before, after, kv, int(self.model.num_layers))

    def _stats(
        self, video: PreparedVideo, cfg: Any, options: GenerationOptions, outer: _Outer,
        inner_layer: int | None, result: Any, llm_start: float, end: float, as_first: bool = False,
    ) -> AnswerStats:  # fmt: skip
        into_llm = len(outer.span)
        inner = self._inner_stats(cfg, inner_layer, result, into_llm)
        tokens = TokenStats(
            input=video.num_input_tokens,
            after_temporal=outer.after_temporal,
            into_llm=into_llm,
            after_inner=inner.visual_after if inner is not None else into_llm,
        )
        flops = self._flops(video, result.prompt_tokens - into_llm, tokens, inner, cfg, outer.compression)
        # Every part is a measured span of work done for THIS answer; ttft and total are their sums
        # (docs/pipeline.md), so total_s = decode_video_s + ttft_s + generation_s >= ttft_s always. The first
        # answer about a prepared video counts its decoding and vision tower (for a video from the cache: the
        # time the cache took); later answers reuse them and count 0, and a reused compression counts 0.
        first = video.answers == 0
        decode_s, vision_s = (video.decode_s, video.vision_s) if first or as_first else (0.0, 0.0)
        compress_s = 0.0 if outer.reused and not as_first else outer.seconds
        prompt_s = result.started_at - llm_start  # span, prompt tokens and positions, context check
        first_token_at = result.started_at + result.prefill_s
        generation_s = max(end - first_token_at, 0.0)  # the rest of the answer, after the first token
        ttft_s = vision_s + compress_s + prompt_s + result.prefill_s
        timings = TimingStats(
            decode_video_s=decode_s,
            vision_s=vision_s,
            compress_s=compress_s,
            prompt_s=prompt_s,
            prefill_s=result.prefill_s,
            ttft_s=ttft_s,
            generation_s=generation_s,
            decode_tokens_per_s=result.decode_tokens_per_s,
            total_s=decode_s + ttft_s + generation_s,
        )
        return AnswerStats(
            tokens=tokens,
            flops=flops,
            timings=timings,
            peak_memory_bytes=max(peak_memory_bytes(self.model.device), video.vision_peak_bytes),
            kv_cache_bytes=result.kv_cache_bytes,
            new_tokens=result.new_tokens,
            prompt_tokens=result.prompt_tokens,
            inner=inner,
            reused={
                "compression": outer.reused,
                "video": video.source == "cache" or not first,
                # the first answer about a video from the cache read it there; later ones reuse it in memory
                "video_source": "memory" if not first else ("cache" if video.source == "cache" else None),
                "prefix_kv_tokens": int(result.prefix_kv_tokens),
            },
            model=self.model.describe(),
            video=video_stats(video),
            holitom=cfg.to_dict() if cfg is not None else None,
            generation=options.to_dict(),
        )

    # ------------------------------------------------------------------------------------------- FLOPs

    def _language_shape(self) -> Any:
        from holitom_cli.compression import LanguageModelShape

        lm = self.model.language_dims()
        return LanguageModelShape(
            num_layers=lm.num_layers,
            hidden_size=lm.hidden_size,
            ffn_size=lm.intermediate_size,
            num_heads=lm.num_heads,
            num_kv_heads=lm.num_kv_heads,
            head_dim=lm.head_dim,
            vocab_size=lm.vocab_size,
        )

    def paper_flops(self, video: PreparedVideo, cfg: Any, compression: Any) -> tuple[float, float]:
        """LLM prefill FLOPs by the paper's formula (visual tokens only, suffix tokens excluded):
        (full model, this setting). ``cfg``/``compression`` None means no compression (both numbers are
        the full model's)."""
        from holitom_cli.compression import paper_prefill_flops

        shape = self._language_shape()
        kw = {"num_layers": shape.num_layers, "hidden_size": shape.hidden_size, "ffn_size": shape.ffn_size}
        baseline = paper_prefill_flops(**kw, visual_tokens=video.num_input_tokens)
        if cfg is None or compression is None:
            return baseline, baseline
        layer = cfg.resolve_inner_layer(shape.num_layers)
        holitom = paper_prefill_flops(
            **kw,
            visual_tokens=compression.num_tokens,
            inner_layer=layer,
            inner_prune_ratio=cfg.inner_prune_ratio if layer is not None else 0.0,
        )
        return baseline, holitom

    def _flops(
        self,
        video: PreparedVideo,
        text_tokens: int,
        tokens: TokenStats,
        inner: InnerStats | None,
        cfg: Any,
        compression: Any,
    ) -> FlopStats:
        from holitom_cli.compression import exact_prefill_flops

        shape = self._language_shape()
        full_visual = video.num_input_tokens + video.tokens.num_suffix  # the uncompressed span
        baseline = exact_prefill_flops(shape, text_tokens + full_visual)["total"]
        removed = (inner.visual_before - inner.visual_after) if inner is not None else 0
        holitom = exact_prefill_flops(
            shape, text_tokens + tokens.into_llm, removed, inner.layer if inner is not None else None
        )["total"]
        paper_baseline, paper_holitom = self.paper_flops(video, cfg, compression)
        return FlopStats(baseline, holitom, paper_baseline, paper_holitom, video.vision_flops)


@dataclass(frozen=True)
class _Outer:
    """What the outer stage gives one answer: the span, the compression (None without), its time (the
    stored one when reused), whether it came from the cache, and the token count after temporal merging."""

    span: Any
    compression: Any
    seconds: float
    reused: bool
    after_temporal: int


def video_stats(video: PreparedVideo) -> dict[str, Any]:
    """The ``video`` object of the statistics: the file's metadata, the sampled frames, the token grid."""
    tokens = video.tokens
    return {
        **video.clip.meta.to_dict(),
        "sampled_frames": video.num_frames,
        "indices": list(video.clip.indices),
        "temporal_units": tokens.num_units,
        "frames_per_unit": tokens.frames_per_unit,
        "tokens_per_unit": tokens.tokens_per_unit,
        "grid": list(tokens.grid),
        "tokens_per_frame": tokens.tokens_per_unit,  # schema 1 name: tokens per temporal unit
    }
