"""The JSON record of one answer (docs/json-schema.md), and the interleaved runs of ``--compare-baseline``.

:func:`answer_record` builds the object from a pipeline ``Answer`` and its ``PreparedVideo``;
:func:`compare_with_baseline` answers with and without compression; :func:`speedups` derives the ratios.
The Rich report (holitom_cli/cli/report.py) renders these records, so it shows exactly what the JSON holds.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from typing import Any

SCHEMA_VERSION = 1


@cache
def versions() -> dict[str, str | None]:
    """Versions of holitom, Python and the libraries that shape an answer."""
    from holitom_cli import __version__

    out: dict[str, str | None] = {"holitom": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "opencv-python-headless"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def video_record(video: Any) -> dict[str, Any]:
    """The ``video`` object of the JSON record from a ``PreparedVideo`` (or a bare path on failure)."""
    if isinstance(video, str):
        return {"path": video, "frame_indices": None, "timestamps": None, "fps": None, "duration": None}
    clip = video.clip
    meta = clip.meta
    return {
        "path": meta.path,
        "frame_indices": [int(i) for i in clip.indices],
        "timestamps": [round(float(t), 6) for t in clip.timestamps],
        "fps": meta.fps,
        "duration": meta.duration_s,
        "width": meta.width,
        "height": meta.height,
        "codec": meta.codec,
        "frame_count": meta.frame_count,
        "temporal_units": video.num_units,
        "frames_per_unit": video.tokens.frames_per_unit,
        "tokens_per_unit": video.tokens_per_unit,
        "grid": list(video.grid),
        "tokens_per_frame": video.tokens_per_unit,  # schema 1's name for the tokens of one temporal unit
    }


def _answer_part(answer: Any, video: Any = None) -> dict[str, Any]:
    stats = answer.stats.to_dict()
    return {
        "answer": answer.text,
        "tokens": stats["tokens"],
        "flops": stats["flops"],
        "timings": stats["timings"],
        "peak_memory_bytes": stats["peak_memory_bytes"],
        "kv_cache_bytes": stats.get("kv_cache_bytes"),
        "new_tokens": stats.get("new_tokens"),
        "prompt_tokens": stats.get("prompt_tokens"),
        "inner": stats.get("inner"),
        "reused": reused_record(stats, video),
    }


def reused_record(stats: dict[str, Any], video: Any = None) -> dict[str, Any]:
    """The ``reused`` object: what this answer did not compute again (docs/json-schema.md).

    ``compression``, ``video``, ``prefix_kv_tokens`` and ``video_source`` (``"cache"``, ``"memory"``, or
    null when the video was not reused) come from the pipeline's statistics; ``vision_s_saved`` (the vision
    tower's time when the video was prepared, kept in a video-cache entry too, minus what this answer spent
    on the video, i.e. a cache hit's read time; null when the video was not reused) from the PreparedVideo.
    """
    reused = dict(stats.get("reused") or {})
    out: dict[str, Any] = {
        "compression": bool(reused.pop("compression", False)),
        "video": bool(reused.pop("video", False)),
        "prefix_kv_tokens": int(reused.pop("prefix_kv_tokens", 0) or 0),
        "video_source": reused.pop("video_source", None),
        **reused,
    }
    encoded = getattr(video, "encode_s", None)  # what the vision tower took when it ran
    spent = float((stats.get("timings") or {}).get("vision_s") or 0.0)  # a cache hit's read time
    saved = out["video"] and encoded is not None
    out["vision_s_saved"] = max(float(encoded) - spent, 0.0) if saved else None
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den:
        return None
    return num / den


def ask_with(pipe: Any, prepared: Any, question: str, cfg: Any, generation: Any, on_text: Any = None,
             history: Any = (), **options: Any) -> Any:  # fmt: skip
    """``pipe.ask``, with the earlier ``(question, answer)`` turns of a conversation when there are any."""
    if history:
        options["history"] = tuple(history)
    return pipe.ask(prepared, question, cfg, generation, on_text=on_text, **options)


def warm_up(pipe: Any, prepared: Any, question: str, cfg: Any, history: Any = ()) -> None:
    """One short answer (1 new token, compressed) so one-time start-up costs fall on neither compared run."""
    from holitom_cli.pipeline import GenerationOptions

    ask_with(pipe, prepared, question, cfg, GenerationOptions(max_new_tokens=1), history=history)


@dataclass
class Comparison:
    """The runs of ``--compare-baseline``: ``baseline[i]`` ran just before ``holitom[i]``."""

    holitom: list[Any] = field(default_factory=list)
    baseline: list[Any] = field(default_factory=list)

    @property
    def repeats(self) -> int:
        return min(len(self.holitom), len(self.baseline))


def compare_with_baseline(
    pipe: Any,
    prepared: Any,
    question: str,
    cfg: Any,
    generation: Any,
    repeats: int = 3,
    on_text: Any = None,
    on_run: Any = None,
    warm: bool = True,
    history: Any = (),
) -> Comparison:
    """Answer ``repeats`` times without and with compression, interleaved (full model, HoliTom, ...).

    A one-token warm-up answer runs first (``warm=False`` skips it, e.g. when it ran for an earlier item), so
    one-time start-up costs fall on neither side. ``on_text(kind, piece)`` streams the first answer of each
    side (``kind`` is ``"baseline"`` or ``"holitom"``); ``on_run(index, kind)`` is called before every run.
    ``history``: earlier ``(question, answer)`` turns, the same for every run (``holitom chat``).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        from holitom_cli.errors import ConfigError

        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}", hint="e.g. --repeats 3")
    if warm:
        warm_up(pipe, prepared, question, cfg, history)
    # Every run is timed as the first question about a fresh video (the stored vision and compression times
    # counted, no prompt prefix reused), so the two sides differ only by HoliTom, as in the paper's TTFT.
    cold = type(pipe)(pipe.model, reuse_prefix=False)
    runs = Comparison()
    for i in range(repeats):
        for kind, setting, answers in (("baseline", None, runs.baseline), ("holitom", cfg, runs.holitom)):
            if on_run is not None:
                on_run(i, kind)
            stream = None
            if i == 0 and on_text is not None:
                stream = lambda piece, kind=kind: on_text(kind, piece)  # noqa: E731
            answers.append(
                ask_with(cold, prepared, question, setting, generation, stream, history, as_first=True)
            )
    return runs


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def _run_timings(answer: Any) -> dict[str, Any]:
    t = answer.stats.to_dict()["timings"]
    return {key: t[key] for key in ("ttft_s", "prefill_s", "decode_tokens_per_s")}


def speedups(
    record: dict[str, Any], baseline: dict[str, Any], runs: Comparison | None = None
) -> dict[str, Any]:
    """Full model / HoliTom for times and FLOPs, HoliTom / full model for decode speed (> 1 = faster).

    With ``runs`` (several interleaved pairs), each ratio is the median of the per-pair ratios, with their
    ``spread`` ``[min, max]``; without, the one pair ``record`` / ``baseline``.
    """
    if runs is not None and runs.repeats:
        pairs = [
            (_run_timings(b), _run_timings(h))
            for b, h in zip(runs.baseline[: runs.repeats], runs.holitom[: runs.repeats], strict=True)
        ]
    else:
        pick = ("ttft_s", "prefill_s", "decode_tokens_per_s")
        pairs = [({k: baseline["timings"][k] for k in pick}, {k: record["timings"][k] for k in pick})]
    ratios: dict[str, list[float]] = {"ttft": [], "prefill": [], "decode_tokens_per_s": []}
    for b, h in pairs:
        for key, value in (
            ("ttft", _ratio(b["ttft_s"], h["ttft_s"])),
            ("prefill", _ratio(b["prefill_s"], h["prefill_s"])),
            ("decode_tokens_per_s", _ratio(h["decode_tokens_per_s"], b["decode_tokens_per_s"])),
        ):
            if value is not None:
                ratios[key].append(value)
    return {
        **{key: _median(values) for key, values in ratios.items()},
        "prefill_flops": _ratio(baseline["flops"]["holitom"], record["flops"]["holitom"]),
        "repeats": len(pairs),
        "spread": {key: _spread(values) for key, values in ratios.items()},
        "runs": {"baseline": [b for b, _ in pairs], "holitom": [h for _, h in pairs]},
    }


def preset_record(preset: str | None, config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``{"name": ..., "custom": ...}``: the preset the settings start from, and whether options changed it.

    ``preset`` is the name given (None: the default, or the preset the settings equal exactly); ``config`` the
    settings in effect (``HoliTomConfig.to_dict()``), None without compression.
    """
    if config is None:
        return None
    from holitom_cli.compression import DEFAULT_PRESET, PRESETS

    name = preset
    if name is None:
        name = next((n for n, cfg in PRESETS.items() if cfg.to_dict() == config), DEFAULT_PRESET)
    base = PRESETS.get(name)
    return {"name": name, "custom": base is None or base.to_dict() != config}


def answer_record(
    question: str,
    answer: Any,
    video: Any,
    baseline: Any = None,
    merge_map: str | None = None,
    *,
    preset: str | None = None,
    runs: Comparison | None = None,
) -> dict[str, Any]:
    """The JSON record of one answer (docs/json-schema.md).

    ``answer``/``baseline``: pipeline ``Answer`` objects (with and without compression); ``video``: the
    ``PreparedVideo`` they were computed from; ``preset``: the ``--preset`` given (None: default);
    ``runs``: every run of ``--compare-baseline`` (``answer``/``baseline`` default to the first of each).
    """
    if runs is not None and runs.repeats:
        answer = answer if answer is not None else runs.holitom[0]
        baseline = baseline if baseline is not None else runs.baseline[0]
    stats = answer.stats.to_dict()
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "question": question,
        **_answer_part(answer, video),
        "model": stats["model"],
        "preset": preset_record(preset, stats["holitom"]),
        "config": stats["holitom"],
        "generation": stats.get("generation"),
        "video": video_record(video),
        "versions": versions(),
    }
    if merge_map is not None:
        record["merge_map"] = merge_map
    if baseline is not None:
        record["baseline"] = _answer_part(baseline, video)
        record["speedup"] = speedups(record, record["baseline"], runs)
    return record


def error_line_record(
    question: str, message: str, video: Any, pipe: Any, cfg: Any, generation: Any, preset: str | None = None
) -> dict[str, Any]:
    """The JSON line of one of several questions that failed: ``answer`` null, ``error`` the message, and the
    settings and video it was asked with (no measurements)."""
    config = cfg.to_dict() if cfg is not None else None
    return {
        "schema_version": SCHEMA_VERSION,
        "question": question,
        "answer": None,
        "error": message,
        "model": pipe.model.describe(),
        "preset": preset_record(preset, config),
        "config": config,
        "generation": generation.to_dict(),
        "video": video_record(video),
        "versions": versions(),
    }
