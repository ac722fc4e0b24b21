"""The Rich report on stderr, progress and spinners.

:func:`print_report` and :func:`print_comparison` render the records of holitom_cli/cli/records.py (plain
dicts: the JSON of docs/json-schema.md), so the report shows exactly what the JSON holds.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import ProgressColumn
from rich.table import Table
from rich.text import Text

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
        ("before merging", tok["input"]),
        ("after temporal merge", tok["after_temporal"]),
        ("into the LLM", tok["into_llm"]),
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
    prompt = t.get("prompt_s")
    if prompt is None:
        prompt = max(t["ttft_s"] - t["vision_s"] - t["compress_s"] - t["prefill_s"], 0.0)
    table.add_row("video decode (not in TTFT)", _fmt_s(t["decode_video_s"]))
    table.add_row("vision tower", _fmt_s(t["vision_s"]))
    table.add_row("HoliTom compression", _fmt_s(t["compress_s"]))
    table.add_row("prompt building", _fmt_s(prompt))
    table.add_row("LLM prefill", _fmt_s(t["prefill_s"]))
    table.add_row("[bold]time to first token[/bold]", f"[bold]{_fmt_s(t['ttft_s'])}[/bold]")
    if t.get("generation_s") is not None:
        table.add_row("rest of the answer", _fmt_s(t["generation_s"]))
    if t.get("total_s") is not None:
        table.add_row("total", _fmt_s(t["total_s"]))
    table.add_row("decode speed", _fmt_rate(t["decode_tokens_per_s"]))
    table.add_row("peak memory", _fmt_bytes(record.get("peak_memory_bytes")))
    return table


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def settings_line(record: dict[str, Any]) -> str:
    """``preset balanced · retain 20%, tau 0.80 · inner merge at layer 18 of 28, 50%``, or ``no compression``.

    Read from the record alone: ``preset``, ``config`` and ``inner`` (the layer actually used).
    """
    cfg = record.get("config")
    if cfg is None:
        return "no compression"
    preset = record.get("preset") or {}
    name = str(preset.get("name", "?"))
    label = f"custom (from {name})" if preset.get("custom") else name
    inner = record.get("inner")
    if inner:
        of = f" of {inner['num_layers']}" if inner.get("num_layers") else ""
        inner_text = f"inner merge at layer {inner['layer']}{of}, {inner['prune_ratio']:.0%}"
    elif cfg.get("inner"):
        inner_text = f"inner merge {cfg.get('inner_prune_ratio', 0):.0%}"
    else:
        inner_text = "inner merge off"
    return f"preset {label} · retain {cfg['retain_ratio']:.0%}, tau {cfg['tau']:.2f} · {inner_text}"


def print_report(record: dict[str, Any], console: Console, verbose: bool = False) -> None:
    """Tokens, FLOPs and timings of one answer, on ``console`` (stderr)."""
    from rich.columns import Columns

    model = record.get("model") or {}
    cfg = record.get("config")
    video = record.get("video") or {}
    frames = len(video.get("frame_indices") or [])
    where = f"{model.get('device', '?')}, {model.get('dtype', '?')}"
    name = escape(str(model.get("name", "?")))
    console.print(
        f"[bold]holitom[/bold] · {name} ({escape(where)}) · {_plural(frames, 'frame')} · "
        + escape(settings_line(record))
    )
    console.print(Columns([token_table(record), timing_table(record)], padding=(0, 4)))
    console.print(flops_table(record))
    reused = reused_text(record)
    if reused:
        console.print(f"Reused: {escape(reused)}", highlight=False)
    if verbose:
        inner = record.get("inner") or {}
        settings = Table(title="Settings", title_justify="left", show_edge=False, show_header=False)
        settings.add_column()
        settings.add_column()
        preset = record.get("preset")
        if preset:
            settings.add_row(
                "preset", f"custom (from {preset['name']})" if preset["custom"] else preset["name"]
            )
        for key, value in (cfg or {}).items():
            if key == "inner_layer" and inner:  # show the layer used, not "None" for automatic
                of = f" of {inner['num_layers']}" if inner.get("num_layers") else ""
                value = f"{inner['layer']}{of}" + (" (automatic)" if value is None else "")
            settings.add_row(key, str(value))
        for key, value in (record.get("generation") or {}).items():
            settings.add_row(key, str(value))
        settings.add_row("frame indices", str(video.get("frame_indices")))
        if inner.get("kv_lengths"):
            settings.add_row("KV cache lengths", str(inner["kv_lengths"]))
        settings.add_row("KV cache", _fmt_bytes(record.get("kv_cache_bytes")))
        settings.add_row("total time", _fmt_s((record.get("timings") or {}).get("total_s")))
        console.print(settings)


def reused_text(record: dict[str, Any], short: bool = False) -> str:
    """What the answer took from earlier work and what that saved, from ``record["reused"]``; "" if nothing.

    ``the prepared video from memory (vision tower not run: 2.31 s saved) · KV of 812 of 832 prompt
    positions from an earlier question (layers below the inner layer 18) · ...``; ``short``:
    ``video (memory), 812 KV, ...``.
    """
    reused = record.get("reused") or {}
    parts = []
    if reused.get("video"):
        source = reused.get("video_source") or "memory"
        saved = reused.get("vision_s_saved")
        if short:
            parts.append(f"video ({source})")
        elif source == "cache":
            read = (record.get("timings") or {}).get("vision_s")  # 0 once the entry is in memory
            took = f"; read in {_fmt_s(read)}" if read else ""
            parts.append(f"the prepared video from the video cache (vision tower not run{took})")
        elif saved is not None:
            parts.append(f"the prepared video from memory (vision tower not run: {_fmt_s(saved)} saved)")
        else:
            parts.append("the prepared video from memory (vision tower not run)")
    kv = reused.get("prefix_kv_tokens") or 0
    if kv:
        if short:
            parts.append(f"{kv:,} KV")
        else:
            prompt = record.get("prompt_tokens")
            of = f" of {prompt:,}" if prompt and prompt >= kv else ""
            inner = record.get("inner")
            layers = f"layers below the inner layer {inner['layer']}" if inner else "every layer"
            parts.append(f"KV of {kv:,}{of} prompt positions from an earlier question ({layers})")
    if reused.get("compression"):
        parts.append("compression" if short else "HoliTom's outer stage (compression)")
    return (", " if short else " · ").join(parts)


def compact_line(record: dict[str, Any]) -> str:
    """One line for ``holitom chat``: tokens, time to first token, decode speed, what was reused."""
    tok = record["tokens"]
    t = record["timings"]
    parts = [
        f"{tok['into_llm']:,} of {tok['input']:,} visual tokens into the LLM",
        f"{record.get('prompt_tokens', 0):,} prompt tokens",
        f"TTFT {_fmt_s(t['ttft_s'])}",
        _fmt_rate(t["decode_tokens_per_s"]),
        settings_line(record),
    ]
    reused = reused_text(record, short=True)
    if reused:
        parts.append(f"reused: {reused}")
    return " · ".join(parts)


def print_summary(records: list[dict[str, Any]], console: Console, width: int = 48) -> None:
    """The table after several questions: question, visual tokens into the LLM, TTFT, what was reused."""
    from holitom_cli.cli.errors import one_line

    table = Table(title="Summary", title_justify="left", show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("question")
    table.add_column("tokens into LLM", justify="right")
    table.add_column("TTFT", justify="right")
    table.add_column("reused")
    for i, record in enumerate(records, 1):
        question = one_line(record.get("question", ""))
        if len(question) > width:
            question = question[: width - 3] + "..."
        if record.get("error"):
            error = one_line(record["error"])
            table.add_row(str(i), escape(question), "-", "-", escape(f"failed: {error}"))
            continue
        table.add_row(
            str(i),
            escape(question),
            f"{record['tokens']['into_llm']:,}",
            _fmt_s(record["timings"]["ttft_s"]),
            escape(reused_text(record, short=True) or "-"),
        )
    console.print(table)


def _median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt_speedup(up: dict[str, Any], key: str) -> str:
    text = _fmt_x(up.get(key))
    spread = (up.get("spread") or {}).get(key)
    if spread and (up.get("repeats") or 1) > 1:
        text += f" ({spread[0]:.2f}-{spread[1]:.2f}x)"
    return text


def print_comparison(record: dict[str, Any], console: Console) -> None:
    """Side-by-side table: full model vs HoliTom on the same frames, with speed-ups.

    Times are the medians over ``speedup.runs``; speed-ups the median per-pair ratio and its min-max spread.
    """
    base = record["baseline"]
    up = record["speedup"]
    n = up.get("repeats") or 1
    runs = up.get("runs") or {"baseline": [base["timings"]], "holitom": [record["timings"]]}
    title = "Full model vs HoliTom (same frames" + (
        f"; median of {n} interleaved runs each, speed-up spread min-max)" if n > 1 else "; one run each)"
    )
    table = Table(title=title, title_justify="left", show_edge=False)
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
    b_runs, h_runs = runs["baseline"], runs["holitom"]
    table.add_row(
        "LLM prefill",
        _fmt_s(_median_of(b_runs, "prefill_s")),
        _fmt_s(_median_of(h_runs, "prefill_s")),
        _fmt_speedup(up, "prefill"),
    )
    table.add_row(
        "time to first token",
        _fmt_s(_median_of(b_runs, "ttft_s")),
        _fmt_s(_median_of(h_runs, "ttft_s")),
        _fmt_speedup(up, "ttft"),
    )
    table.add_row(
        "decode speed",
        _fmt_rate(_median_of(b_runs, "decode_tokens_per_s")),
        _fmt_rate(_median_of(h_runs, "decode_tokens_per_s")),
        _fmt_speedup(up, "decode_tokens_per_s"),
    )
    table.add_row(
        "KV cache", _fmt_bytes(base.get("kv_cache_bytes")), _fmt_bytes(record.get("kv_cache_bytes")), ""
    )
    console.print(table)


# ------------------------------------------------------------------------------------------- progress


class _FramesColumn(ProgressColumn):
    """``n/T`` once the total is known; nothing before (never ``0/?``)."""

    def render(self, task: Any) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)}", style="progress.download")


def prepare_with_progress(
    pipe: Any, video: Any, sampling: Any, console: Console | None, prepare: Any = None
) -> Any:
    """Decode the video and run the vision tower with a progress line on ``console`` (None: silently).

    ``Reading NAME`` with a spinner while OpenCV decodes, then ``Encoding frames n/T`` with a bar: the
    pipeline reports ``(0, T)`` as soon as the frames are decoded, then the vision tower's progress.
    ``prepare(video, sampling, on_progress=...)``: what prepares it (default ``pipe.prepare_video``; the
    commands pass the video cache's).
    """
    prepare = prepare if prepare is not None else pipe.prepare_video
    if console is None:
        return prepare(video, sampling)
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        _FramesColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"Reading {escape(getattr(video, 'name', str(video)))}", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, description="Encoding frames", completed=done, total=total)

        return prepare(video, sampling, on_progress=on_progress)


class Spinner:
    """A transient spinner on ``console`` (stderr) while the model works, e.g. until the first token streams.

    ``enabled=False`` (``--json``, ``--quiet``) or a console that is not a terminal: nothing is drawn. Unlike
    ``Console.status`` it never redirects stdout, where the answer streams. Use as a context manager;
    :meth:`until_first` wraps a text callback so that the spinner stops before the first piece is written.
    """

    def __init__(self, console: Console, text: str, enabled: bool = True) -> None:
        self._live = None
        if enabled and console.is_terminal:
            from rich.live import Live
            from rich.spinner import Spinner as RichSpinner

            self._live = Live(
                RichSpinner("dots", text=text),
                console=console,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
                refresh_per_second=12.5,
            )

    @property
    def active(self) -> bool:
        return self._live is not None and self._live.is_started

    def __enter__(self) -> Spinner:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def update(self, text: str) -> None:
        if self._live is not None:
            from rich.spinner import Spinner as RichSpinner

            self._live.update(RichSpinner("dots", text=text))

    def stop(self) -> None:
        live, self._live = self._live, None
        if live is not None and live.is_started:
            live.stop()

    def until_first(self, on_text: Any) -> Any:
        """``on_text`` that stops the spinner first (``on_text`` None: pieces are only used to stop it)."""

        def write(piece: str) -> None:
            self.stop()
            if on_text is not None:
                on_text(piece)

        return write
