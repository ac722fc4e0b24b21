"""``holitom inspect VIDEO -o merge-map.png``: draw what HoliTom merged, without asking a question.

HoliTom's outer stage (segmentation, temporal merge, spatial merge) does not depend on the question, so the
picture shows exactly the visual tokens ``ask`` would feed the LLM with the same model, frames and settings.
stdout gets the output path only; the summary goes to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from holitom_cli.cli.common import check_video_path, load_pipeline
from holitom_cli.cli.options import (
    DEFAULT_MODEL,
    PANEL_OUTPUT,
    CacheDirOpt,
    CacheSizeOpt,
    DeviceOpt,
    DtypeOpt,
    FpsOpt,
    FramesOpt,
    InnerLayerOpt,
    InnerPruneRatioOpt,
    MaxFramesOpt,
    ModelOpt,
    NoCacheOpt,
    NoCompressOpt,
    NoInnerOpt,
    OfflineOpt,
    PresetOpt,
    QuantizeOpt,
    QuietOpt,
    RetainRatioOpt,
    RevisionOpt,
    TauOpt,
    VideoArg,
)
from holitom_cli.cli.settings import build_config, sampling_options

OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Picture to write: a .png (default merge-map.png), or a .gif with --gif.",
        rich_help_panel=PANEL_OUTPUT,
        show_default=False,
        dir_okay=False,
    ),
]
GifOpt = Annotated[
    bool,
    typer.Option(
        "--gif", help="Write an animated GIF, one picture per sampled frame.", rich_help_panel=PANEL_OUTPUT
    ),
]


def inspect_command(
    video: VideoArg,
    output: OutputOpt = None,
    gif: GifOpt = False,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    offline: OfflineOpt = False,
    preset: PresetOpt = None,
    retain_ratio: RetainRatioOpt = None,
    tau: TauOpt = None,
    inner_layer: InnerLayerOpt = None,
    inner_prune_ratio: InnerPruneRatioOpt = None,
    no_inner: NoInnerOpt = False,
    no_compress: NoCompressOpt = False,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    max_frames: MaxFramesOpt = None,
    quiet: QuietOpt = False,
    no_cache: NoCacheOpt = False,
    cache_size: CacheSizeOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Draw what HoliTom merged: a contact sheet of the sampled frames with the token grid over them.

    Outlined cells are the per-frame tokens kept for the LLM; cells shaded in a segment's colour were merged
    over the frames of that segment (shown on its first frame, darkened on the others); dots mark the static
    tokens kept as cluster centres; lightly dimmed cells were dropped. See docs/inspect.md.

    Example: holitom inspect assets/sample.mp4 -o merge-map.png --preset fast
    """
    # Everything that can be checked without the model is checked first.
    cfg = build_config(preset, retain_ratio, tau, inner_layer, inner_prune_ratio, no_inner, no_compress)
    sampling = sampling_options(frames, fps, max_frames)
    if output is None:
        output = Path("merge-map.gif" if gif else "merge-map.png")
    gif = gif or output.suffix.lower() == ".gif"
    from holitom_cli.render import check_output_path

    check_video_path(video)
    check_output_path(output, gif=gif)
    from holitom_cli.video_cache import open_cache, parse_size, prepare_video_cached

    if cache_size is not None:
        parse_size(cache_size)  # a bad --cache-size fails before the model loads

    from holitom_cli.cli.report import prepare_with_progress, stderr_console

    console = stderr_console()
    show = not quiet
    cache = open_cache(no_cache, cache_size, cache_dir, warn=None if quiet else _warn(console))
    pipe = load_pipeline(
        console,
        show,
        model,
        revision=revision,
        device=device,
        dtype=dtype,
        quantize=quantize,
        offline=offline,
    )

    def prepare(path: Any, sampling: Any, on_progress: Any = None) -> Any:  # the picture needs the pixels
        return prepare_video_cached(
            pipe, path, sampling, cache=cache, on_progress=on_progress, need_pixels=True
        )

    prepared = prepare_with_progress(pipe, video, sampling, console if show else None, prepare=prepare)
    result = pipe.compress(prepared, cfg) if cfg is not None else None

    full, ours = pipe.paper_flops(prepared, cfg, result)
    flops = ours / full
    caption = merge_map_caption(video, pipe.model.name, preset, cfg, flops, pipe.model.num_layers)
    saved = save_unit_merge_map(output, prepared, result, caption, gif)
    if show:
        print_summary(console, prepared, result, flops, saved)
    typer.echo(str(saved))


def _warn(console: Any) -> Any:
    from rich.markup import escape

    return lambda text: console.print(f"[yellow]Warning: {escape(text)}[/yellow]", highlight=False)


def save_unit_merge_map(output: Path, prepared: Any, result: Any, caption: str, gif: bool) -> Path:
    """The merge map of a prepared video: one tile per temporal unit (its first frame, at the unit's time)
    with the unit's rows x cols token grid. Used by ``inspect`` and ``ask --explain``."""
    from holitom_cli.render import save_merge_map

    tokens = prepared.tokens
    pixels = prepared.clip.frames
    if pixels is None:  # a video from the video cache comes without pixels: decode its frames again
        from holitom_cli.video import load_video

        s = prepared.clip.sampling
        pixels = load_video(
            prepared.path, num_frames=s.get("frames") or 32, fps=s.get("fps"), max_frames=s.get("max_frames")
        ).frames
    frames = pixels[tokens.unit_frames]  # (T', H, W, 3)
    unit = "frame" if tokens.frames_per_unit == 1 else "unit"
    if tokens.frames_per_unit > 1:
        caption = (
            f"{caption}\none tile per temporal unit of {tokens.frames_per_unit} frames (its first frame)"
        )
    return save_merge_map(
        output, frames, tokens.unit_times, result, grid=tokens.grid, caption=caption, gif=gif, unit=unit
    )


def merge_map_caption(
    video: Path, model_name: str, preset: str | None, cfg: Any, flops: float, num_layers: int
) -> str:
    """First caption line of the picture: the video, the model, the settings and the FLOPs ratio."""
    if cfg is None:
        return f"{video.name}  ·  {model_name}  ·  no compression"
    from holitom_cli.cli.records import preset_record

    named = preset_record(preset, cfg.to_dict())
    label = f"custom (from {named['name']})" if named["custom"] else named["name"]
    layer = cfg.resolve_inner_layer(num_layers)
    inner = (
        f"inner merge at layer {layer} of {num_layers}, {cfg.inner_prune_ratio:.0%}"
        if layer is not None
        else "inner merge off"
    )
    settings = f"retain {cfg.retain_ratio:.0%}, tau {cfg.tau:.2f}, {inner}"
    return (
        f"{video.name}  ·  {model_name}  ·  preset {label} ({settings})  ·  "
        f"LLM prefill FLOPs {flops:.1%} of the full model (paper formula)"
    )


def print_summary(console: Any, prepared: Any, result: Any, flops: float, saved: Path) -> None:
    from rich.table import Table

    units, per_unit = prepared.num_units, prepared.tokens_per_unit
    table = Table(title="Merge map", title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows, cols = prepared.grid
    per = prepared.tokens.frames_per_unit
    if per == 1:
        table.add_row("frames", f"{prepared.num_frames} sampled, {per_unit} tokens each ({rows}x{cols})")
    else:
        table.add_row(
            "frames",
            f"{prepared.num_frames} sampled = {units} temporal units of {per} frames, "
            f"{per_unit} tokens each ({rows}x{cols})",
        )
    if result is None:
        table.add_row("tokens", f"{units * per_unit}, all kept (compression off)")
    else:
        multi = sum(1 for s, e in result.segments if e > s)
        static = int(result.is_static.sum())
        table.add_row("segments", f"{len(result.segments)} ({multi} merged over several frames)")
        table.add_row(
            "tokens",
            f"{result.num_input} -> {result.num_after_temporal} after temporal merging -> "
            f"{result.num_tokens} to the LLM ({static} static, {result.num_tokens - static} per-frame)",
        )
        table.add_row("LLM FLOPs", f"{flops:.1%} of the full model")
    table.add_row("picture", str(saved))
    console.print(table)
