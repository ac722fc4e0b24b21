"""Per-answer statistics: token counts, FLOPs, timings, memory; ``AnswerStats.to_dict()`` is the CLI's JSON.

Every field is documented in docs/pipeline.md. Times are seconds (``time.perf_counter``), sizes bytes, FLOPs
counted with one multiply-add = 2 FLOPs.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TokenStats:
    """Visual token counts at each stage of one answer.

    input: T * N pooled tokens of the sampled frames (no newline).
    after_temporal: T * N - R after HoliTom's temporal merge (= input without compression).
    into_llm: visual tokens entering the LLM, the trailing newline included (M + 1, or T * N + 1).
    after_inner: visual tokens left after the inner merge at layer K (= into_llm without the inner stage).
    """

    input: int
    after_temporal: int
    into_llm: int
    after_inner: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class FlopStats:
    """Prefill FLOPs of the language model.

    baseline / holitom: exact count of the prefill as run (all prompt tokens, GQA, SwiGLU, last-position LM
    head) without compression and with the settings used; ratio = holitom / baseline. paper_*: the paper's
    formula (visual tokens only, newline excluded; spec section 8). vision: the vision tower + projector for
    the sampled frames (the same with or without HoliTom).
    """

    baseline: float
    holitom: float
    paper_baseline: float
    paper_holitom: float
    vision: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "holitom": self.holitom,
            "ratio": _ratio(self.holitom, self.baseline),
            "paper_formula": {
                "baseline": self.paper_baseline,
                "holitom": self.paper_holitom,
                "ratio": _ratio(self.paper_holitom, self.paper_baseline),
            },
            "vision": self.vision,
        }


@dataclass(frozen=True)
class TimingStats:
    """Wall times in seconds; every part is measured, ``ttft_s`` and ``total_s`` are sums of parts.

    decode_video_s: OpenCV decoding and sampling; vision_s: preprocessing + vision tower + projector + pooling
    + attention score; compress_s: HoliTom's outer stage (0 without it); prompt_s: visual embeddings, prompt
    tokens and the context check; prefill_s: generate() call to the first new token; generation_s: first new
    token to the end of generation. ttft_s = vision_s + compress_s + prompt_s + prefill_s (for a reused video
    the stored vision and compression times are counted, so TTFT stays comparable); total_s = decode_video_s
    + ttft_s + generation_s (so total_s >= ttft_s); decode_tokens_per_s: (new tokens - 1) / time from the
    first to the last new token (None with fewer than 2 tokens).
    """

    decode_video_s: float
    vision_s: float
    compress_s: float
    prompt_s: float
    prefill_s: float
    ttft_s: float
    generation_s: float
    decode_tokens_per_s: float | None
    total_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InnerStats:
    """The inner stage of one answer: layer K (of ``num_layers``), prune ratio, visual tokens before/after,
    KV lengths."""

    layer: int
    prune_ratio: float
    visual_before: int
    visual_after: int
    kv_lengths: list[int] | None
    num_layers: int | None = None  # decoder layers of the language model ("layer 18 of 28")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AnswerStats:
    """Everything measured for one answer."""

    tokens: TokenStats
    flops: FlopStats
    timings: TimingStats
    peak_memory_bytes: int
    kv_cache_bytes: int
    new_tokens: int
    prompt_tokens: int
    inner: InnerStats | None = None
    reused: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    video: dict[str, Any] = field(default_factory=dict)
    holitom: dict[str, Any] | None = None
    generation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens.to_dict(),
            "flops": self.flops.to_dict(),
            "timings": self.timings.to_dict(),
            "peak_memory_bytes": self.peak_memory_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "inner": self.inner.to_dict() if self.inner is not None else None,
            "reused": dict(self.reused),
            "model": dict(self.model),
            "video": dict(self.video),
            "holitom": dict(self.holitom) if self.holitom is not None else None,
            "generation": dict(self.generation),
        }


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def peak_memory_bytes(device: Any = None) -> int:
    """CUDA max allocated bytes on a CUDA device, else the process's peak resident set size."""
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows: psutil knows the peak working set
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
