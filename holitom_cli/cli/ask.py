"""``holitom ask VIDEO QUESTION``: stream the answer to stdout, then a report on stderr."""

from __future__ import annotations

import sys

from holitom_cli.cli.common import check_video_path, load_pipeline, prepare_with_progress
from holitom_cli.cli.options import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    CompareBaselineOpt,
    DeviceOpt,
    DtypeOpt,
    ExplainOpt,
    FpsOpt,
    FramesOpt,
    InnerLayerOpt,
    InnerPruneRatioOpt,
    JsonOpt,
    MaxFramesOpt,
    MaxNewTokensOpt,
    ModelOpt,
    NoCompressOpt,
    NoInnerOpt,
    OfflineOpt,
    PresetOpt,
    QuantizeOpt,
    QuestionArg,
    QuietOpt,
    RetainRatioOpt,
    RevisionOpt,
    TauOpt,
    TemperatureOpt,
    VerboseOpt,
    VideoArg,
)
from holitom_cli.cli.settings import build_config, sampling_options
from holitom_cli.errors import ConfigError


def ask_command(
    video: VideoArg,
    question: QuestionArg,
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
    compare_baseline: CompareBaselineOpt = False,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    max_frames: MaxFramesOpt = None,
    max_new_tokens: MaxNewTokensOpt = DEFAULT_MAX_NEW_TOKENS,
    temperature: TemperatureOpt = 0.0,
    as_json: JsonOpt = False,
    explain: ExplainOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Answer a question about a video.

    The answer streams to stdout; a report (visual tokens at each stage, FLOPs, time to first token, decode
    speed, memory) follows on stderr. With --json, stdout holds exactly one JSON object (docs/json-schema.md).

    Example: holitom ask assets/sample.mp4 "What does the red circle do?"
    """
    # Everything that can be checked without the model is checked first, so mistakes fail in a second.
    if verbose and quiet:
        raise ConfigError("--verbose and --quiet cannot be used together", hint="Pick one.")
    cfg = build_config(preset, retain_ratio, tau, inner_layer, inner_prune_ratio, no_inner, no_compress)
    if compare_baseline and cfg is None:
        raise ConfigError(
            "--compare-baseline needs compression, but --no-compress is set",
            hint="Drop --no-compress: the comparison runs the full model anyway.",
        )
    sampling = sampling_options(frames, fps, max_frames)
    from holitom_cli.pipeline import GenerationOptions, check_question

    check_question(question)

    generation = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature)
    check_video_path(video)
    gif = explain is not None and explain.suffix.lower() == ".gif"
    if explain is not None:
        from holitom_cli.render import check_output_path

        check_output_path(explain, gif=gif)

    from holitom_cli.cli.report import (
        answer_record,
        print_comparison,
        print_report,
        stderr_console,
        warm_up,
    )

    console = stderr_console()
    show = not quiet
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
    prepared = prepare_with_progress(pipe, video, sampling, console if show else None)

    if compare_baseline:
        warm_up(pipe, prepared, question, cfg)
    stream = None if as_json else _stdout_writer()
    if compare_baseline and stream is not None and show:
        console.print("[bold]HoliTom[/bold]")
    answer = pipe.ask(prepared, question, cfg, generation, on_text=stream)
    if stream is not None:
        stream("\n")
    baseline = None
    if compare_baseline:
        if stream is not None:
            stream("\n")  # a blank line between the two answers
            if show:
                console.print("[bold]Full model (no compression)[/bold]")
        baseline = pipe.ask(prepared, question, None, generation, on_text=stream)
        if stream is not None:
            stream("\n")

    merge_map = None
    if explain is not None:
        from holitom_cli.render import save_merge_map

        caption = f"{question}  ·  {pipe.model.name}  ·  " + (
            "no compression" if cfg is None else f"retain {cfg.retain_ratio:.0%}, tau {cfg.tau:.2f}"
        )
        grid = prepared.grid[0] if prepared.grid and prepared.grid[0] == prepared.grid[-1] else None
        saved = save_merge_map(
            explain,
            prepared.clip.frames,
            prepared.clip.timestamps,
            answer.compression,
            grid=grid,
            caption=caption,
            gif=gif,
        )
        merge_map = str(saved)

    record = answer_record(question, answer, prepared, baseline, merge_map)
    if as_json:
        from holitom_cli.batchio import dumps_line

        sys.stdout.write(dumps_line(record) + "\n")
        sys.stdout.flush()
    if show and not as_json:
        console.print()
        print_report(record, console, verbose=verbose)
        if baseline is not None:
            print_comparison(record, console)
        if merge_map is not None:
            console.print(f"Merge map written to {merge_map}")
    elif show and merge_map is not None:
        console.print(f"Merge map written to {merge_map}")


_CONTROL = {c: None for c in range(32) if chr(c) not in "\n\t"} | {127: None}


def _stdout_writer():
    """Write answer pieces to stdout as they come; on a terminal, control characters are dropped."""
    clean = sys.stdout.isatty()

    def write(piece: str) -> None:
        sys.stdout.write(piece.translate(_CONTROL) if clean else piece)
        sys.stdout.flush()

    return write
