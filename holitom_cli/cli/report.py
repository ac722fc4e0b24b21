"""What ``ask`` and ``batch`` output: the JSON record of one answer, and the Rich report on stderr.

:func:`answer_record` builds the object documented in docs/json-schema.md from a pipeline ``Answer`` and its
``PreparedVideo``; :func:`print_report` and :func:`print_comparison` render records (plain dicts), so the
report shows exactly what the JSON holds.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import metadata
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

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
        "tokens_per_frame": video.tokens_per_frame,
    }


def _answer_part(answer: Any) -> dict[str, Any]:
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
    }


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den:
        return None
    return num / den


def warm_up(pipe: Any, prepared: Any, question: str, cfg: Any) -> None:
    """One short answer (1 new token, compressed) so one-time start-up costs fall on neither compared run."""
    from holitom_cli.pipeline import GenerationOptions

    pipe.ask(prepared, question, cfg, GenerationOptions(max_new_tokens=1))


def speedups(record: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """Full model / HoliTom for times and FLOPs, HoliTom / full model for decode speed (> 1 = faster)."""
    t, b = record["timings"], baseline["timings"]
    return {
        "ttft": _ratio(b["ttft_s"], t["ttft_s"]),
        "prefill": _ratio(b["prefill_s"], t["prefill_s"]),
        "decode_tokens_per_s": _ratio(t["decode_tokens_per_s"], b["decode_tokens_per_s"]),
        "prefill_flops": _ratio(baseline["flops"]["holitom"], record["flops"]["holitom"]),
    }


def answer_record(
    question: str, answer: Any, video: Any, baseline: Any = None, merge_map: str | None = None
) -> dict[str, Any]:
    """The JSON record of one answer (docs/json-schema.md).

    ``answer``/``baseline``: pipeline ``Answer`` objects (with and without compression); ``video``: the
    ``PreparedVideo`` they were computed from.
    """
    stats = answer.stats.to_dict()
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "question": question,
        **_answer_part(answer),
        "model": stats["model"],
        "config": stats["holitom"],
        "generation": stats.get("generation"),
        "video": video_record(video),
        "versions": versions(),
    }
    if merge_map is not None:
        record["merge_map"] = merge_map
    if baseline is not None:
        record["baseline"] = _answer_part(baseline)
        record["speedup"] = speedups(record, record["baseline"])
    return record


# ------------------------------------------------------------------------------------------- Rich report


@contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """Switch off the progress bars of transformers and huggingface-hub (for --quiet), then restore them."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)  # messages stay on one line


def _fmt_flops(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOPs"


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} tok/s"


def token_table(record: dict[str, Any]) -> Table:
    tok = record["tokens"]
    total = tok["input"] or 1
    table = Table(title="Visual tokens", title_justify="left", show_edge=False)
    table.add_column("stage")
    table.add_column("tokens", justify="right")
    table.add_column("of input", justify="right")
    inner = record.get("inner")
    rows = [
        ("sampled frames", tok["input"]),
        ("after temporal merge", tok["after_temporal"]),
        ("into the LLM (+ newline)", tok["into_llm"]),
        (
            f"after inner merge (layer {inner['layer']})" if inner else "after inner merge (off)",
            tok["after_inner"],
        ),
    ]
    for name, value in rows:
        table.add_row(name, f"{value:,}", f"{100 * value / total:.1f}%")
    return table


def flops_table(record: dict[str, Any]) -> Table:
    fl = record["flops"]
    paper = fl.get("paper_formula") or {}
    table = Table(title="Prefill FLOPs (language model)", title_justify="left", show_edge=False)
    table.add_column("count")
    table.add_column("full model", justify="right")
    table.add_column("this run", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("saving", justify="right")
    for name, part in (("exact", fl), ("paper formula", paper)):
        if not part:
            continue
        ratio = part.get("ratio")
        table.add_row(
            name,
            _fmt_flops(part.get("baseline")),
            _fmt_flops(part.get("holitom")),
            "-" if ratio is None else f"{100 * ratio:.1f}%",
            "-" if ratio is None else f"{100 * (1 - ratio):.1f}%",
        )
    return table


def timing_table(record: dict[str, Any]) -> Table:
    t = record["timings"]
    table = Table(title="Time", title_justify="left", show_edge=False)
    table.add_column("stage")
    table.add_column("time", justify="right")
    other = t["ttft_s"] - t["vision_s"] - t["compress_s"] - t["prefill_s"]
    table.add_row("video decode (not in TTFT)", _fmt_s(t["decode_video_s"]))
    table.add_row("vision tower", _fmt_s(t["vision_s"]))
    table.add_row("HoliTom compression", _fmt_s(t["compress_s"]))
    table.add_row("prompt building", _fmt_s(max(other, 0.0)))
    table.add_row("LLM prefill", _fmt_s(t["prefill_s"]))
    table.add_row("[bold]time to first token[/bold]", f"[bold]{_fmt_s(t['ttft_s'])}[/bold]")
    table.add_row("decode speed", _fmt_rate(t["decode_tokens_per_s"]))
    table.add_row("peak memory", _fmt_bytes(record.get("peak_memory_bytes")))
    return table


def print_report(record: dict[str, Any], console: Console, verbose: bool = False) -> None:
    """Tokens, FLOPs and timings of one answer, on ``console`` (stderr)."""
    from rich.columns import Columns

    model = record.get("model") or {}
    cfg = record.get("config")
    video = record.get("video") or {}
    frames = len(video.get("frame_indices") or [])
    if cfg is None:
        setting = "no compression"
    else:
        inner = "on" if cfg["inner"] else "off"
        setting = f"retain {cfg['retain_ratio']:.0%}, tau {cfg['tau']:.2f}, inner merge {inner}"
    where = f"{model.get('device', '?')}, {model.get('dtype', '?')}"
    name = escape(str(model.get("name", "?")))
    console.print(f"[bold]holitom[/bold] · {name} ({escape(where)}) · {frames} frames · {setting}")
    console.print(Columns([token_table(record), timing_table(record)], padding=(0, 4)))
    console.print(flops_table(record))
    if verbose:
        settings = Table(title="Settings", title_justify="left", show_edge=False, show_header=False)
        settings.add_column()
        settings.add_column()
        for key, value in (cfg or {}).items():
            settings.add_row(key, str(value))
        for key, value in (record.get("generation") or {}).items():
            settings.add_row(key, str(value))
        settings.add_row("frame indices", str(video.get("frame_indices")))
        inner = record.get("inner") or {}
        if inner.get("kv_lengths"):
            settings.add_row("KV cache lengths", str(inner["kv_lengths"]))
        settings.add_row("KV cache", _fmt_bytes(record.get("kv_cache_bytes")))
        console.print(settings)


def print_comparison(record: dict[str, Any], console: Console) -> None:
    """Side-by-side table: full model vs HoliTom on the same frames, with speed-ups."""
    base = record["baseline"]
    up = record["speedup"]
    table = Table(title="Full model vs HoliTom (same frames)", title_justify="left", show_edge=False)
    table.add_column("")
    table.add_column("full model", justify="right")
    table.add_column("HoliTom", justify="right")
    table.add_column("speed-up", justify="right")
    bt, ht = base["timings"], record["timings"]
    table.add_row(
        "visual tokens into the LLM",
        f"{base['tokens']['into_llm']:,}",
        f"{record['tokens']['into_llm']:,}",
        "",
    )
    table.add_row(
        "prefill FLOPs",
        _fmt_flops(base["flops"]["holitom"]),
        _fmt_flops(record["flops"]["holitom"]),
        _fmt_x(up["prefill_flops"]),
    )
    table.add_row("vision tower", _fmt_s(bt["vision_s"]), _fmt_s(ht["vision_s"]), "")
    table.add_row("compression", _fmt_s(bt["compress_s"]), _fmt_s(ht["compress_s"]), "")
    table.add_row("LLM prefill", _fmt_s(bt["prefill_s"]), _fmt_s(ht["prefill_s"]), _fmt_x(up["prefill"]))
    table.add_row("time to first token", _fmt_s(bt["ttft_s"]), _fmt_s(ht["ttft_s"]), _fmt_x(up["ttft"]))
    table.add_row(
        "decode speed",
        _fmt_rate(bt["decode_tokens_per_s"]),
        _fmt_rate(ht["decode_tokens_per_s"]),
        _fmt_x(up["decode_tokens_per_s"]),
    )
    table.add_row(
        "KV cache", _fmt_bytes(base.get("kv_cache_bytes")), _fmt_bytes(record.get("kv_cache_bytes")), ""
    )
    console.print(table)
