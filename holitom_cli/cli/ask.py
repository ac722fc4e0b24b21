"""``holitom ask VIDEO QUESTION``: stream the answer to stdout, then a report on stderr."""

from __future__ import annotations

import sys

import typer

from holitom_cli.cli.common import check_video_path, load_pipeline
from holitom_cli.cli.options import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_REPEATS,
    AskQuestionOpt,
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
    RepeatsOpt,
    RetainRatioOpt,
    RevisionOpt,
    SeedOpt,
    TauOpt,
    TemperatureOpt,
    TopPOpt,
    VerboseOpt,
    VideoArg,
    generation_options,
)
from holitom_cli.cli.settings import build_config, sampling_options
from holitom_cli.errors import ConfigError


def one_question(positional: str | None, option: str | None) -> str:
    """The question, given either as the QUESTION argument or with -q/--question (a usage error otherwise)."""
    if positional is not None and option is not None:
        raise typer.BadParameter(
            "give the question once: as the QUESTION argument or with -q/--question, not both",
            param_hint="QUESTION / -q",
        )
    if positional is None and option is None:
        raise typer.BadParameter(
            "a question is needed (QUESTION argument or -q/--question)", param_hint="QUESTION"
        )
    return positional if positional is not None else option


def ask_command(
    video: VideoArg,
    question: QuestionArg = None,
    question_opt: AskQuestionOpt = None,
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
    repeats: RepeatsOpt = DEFAULT_REPEATS,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    max_frames: MaxFramesOpt = None,
    max_new_tokens: MaxNewTokensOpt = DEFAULT_MAX_NEW_TOKENS,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
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
    question = one_question(question, question_opt)
    if verbose and quiet:
        raise ConfigError("--verbose and --quiet cannot be used together", hint="Pick one.")
    cfg = build_config(preset, retain_ratio, tau, inner_layer, inner_prune_ratio, no_inner, no_compress)
    if compare_baseline and cfg is None:
        raise ConfigError(
            "--compare-baseline needs compression, but --no-compress is set",
            hint="Drop --no-compress: the comparison runs the full model anyway.",
        )
    sampling = sampling_options(frames, fps, max_frames)
    from holitom_cli.pipeline import check_question

    check_question(question)

    generation = generation_options(max_new_tokens, temperature, top_p, seed)
    check_video_path(video)
    gif = explain is not None and explain.suffix.lower() == ".gif"
    if explain is not None:
        from holitom_cli.render import check_output_path

        check_output_path(explain, gif=gif)

    from holitom_cli.cli.report import (
        Spinner,
        answer_record,
        prepare_with_progress,
        preset_record,
        print_comparison,
        print_report,
        settings_line,
        stderr_console,
    )

    console = stderr_console()
    show = not quiet
    interactive = show and not as_json  # the spinners: only with the Rich report (and a terminal)
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
    if cfg is not None:  # settings that cannot fit this model fail before the video work
        cfg.resolve_inner_layer(pipe.model.num_layers)
    pipe.check_question(question, generation)  # the question alone must leave room in the context
    prepared = prepare_with_progress(pipe, video, sampling, console if show else None)

    stream = None if as_json else _stdout_writer()
    runs = None
    if compare_baseline:
        runs = _compare(
            console, interactive, show, stream, pipe, prepared, question, cfg, generation, repeats
        )
        answer, baseline = runs.holitom[0], runs.baseline[0]
    else:
        with Spinner(console, "Prefilling ...", enabled=interactive) as spinner:
            answer = pipe.ask(prepared, question, cfg, generation, on_text=spinner.until_first(stream))
        if stream is not None:
            stream("\n")
        baseline = None

    merge_map = None
    if explain is not None:
        from holitom_cli.cli.inspect_cmd import save_unit_merge_map

        stats = answer.stats.to_dict()
        named = {"config": stats["holitom"], "preset": preset_record(preset, stats["holitom"]), **stats}
        caption = f"{question}  ·  {pipe.model.name}  ·  {settings_line(named)}"
        merge_map = str(save_unit_merge_map(explain, prepared, answer.compression, caption, gif))

    record = answer_record(question, answer, prepared, baseline, merge_map, preset=preset, runs=runs)
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


def _compare(console, interactive, show, stream, pipe, prepared, question, cfg, generation, repeats):
    """--compare-baseline: warm-up, then full model / HoliTom interleaved ``repeats`` times.

    The first answer of each side streams to stdout (a blank line between them, labels on stderr); a spinner
    on stderr covers the warm-up, each prefill until its first token, and the silent timing repeats.
    """
    from holitom_cli.cli.report import Spinner, compare_with_baseline

    labels = {"baseline": "Full model (no compression)", "holitom": "HoliTom"}
    short = {"baseline": "full model", "holitom": "HoliTom"}
    state = {"spinner": Spinner(console, "Warming up ...", enabled=interactive).__enter__()}

    def on_run(index: int, kind: str) -> None:
        state["spinner"].stop()
        if index == 0:
            if stream is not None and kind == "holitom":
                stream("\n\n")  # end the first answer, then a blank line
            if stream is not None and show:
                console.print(f"[bold]{labels[kind]}[/bold]")
            text = f"Prefilling: {short[kind]} ..."
        else:
            text = f"Timing run {index + 1} of {repeats}: {short[kind]} ..."
        state["spinner"] = Spinner(console, text, enabled=interactive).__enter__()

    def on_text(kind: str, piece: str) -> None:
        state["spinner"].stop()
        if stream is not None:
            stream(piece)

    try:
        runs = compare_with_baseline(
            pipe, prepared, question, cfg, generation, repeats, on_text=on_text, on_run=on_run
        )
    finally:
        state["spinner"].stop()
    if stream is not None:
        stream("\n")
    return runs


_CONTROL = {c: None for c in range(32) if chr(c) not in "\n\t"} | {127: None}


def _stdout_writer():
    """Write answer pieces to stdout as they come; on a terminal, control characters are dropped."""
    clean = sys.stdout.isatty()

    def write(piece: str) -> None:
        sys.stdout.write(piece.translate(_CONTROL) if clean else piece)
        sys.stdout.flush()

    return write
