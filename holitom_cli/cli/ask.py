"""``holitom ask VIDEO QUESTION [QUESTION ...]``: stream each answer to stdout, then a report on stderr.

With several questions (arguments, repeated ``-q``, ``--questions FILE``) the model loads once and the video
is prepared once; the questions are answered in turn, each with its report, then a summary table. An
error on one of several questions is reported (``Error: question N: ...``) and the others are still
answered; the exit code is then 1. With one question, any error ends the command, as it always did.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from holitom_cli.cli.common import check_video_path, load_pipeline
from holitom_cli.cli.options import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_REPEATS,
    CacheDirOpt,
    CacheSizeOpt,
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
    NoCacheOpt,
    NoCompressOpt,
    NoInnerOpt,
    OfflineOpt,
    PresetOpt,
    QuantizeOpt,
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
from holitom_cli.cli.settings import build_config, check_question_text, sampling_options
from holitom_cli.errors import ConfigError, HolitomError
from holitom_cli.limits import MAX_ASK_QUESTIONS, MAX_QUESTION_CHARS

QuestionsArg = Annotated[
    list[str] | None,
    typer.Argument(
        help=f"Question(s) to ask about the video, each at most {MAX_QUESTION_CHARS:,} characters "
        "(or use -q / --questions).",
        show_default=False,
    ),
]
AskQuestionsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--question",
        "-q",
        help="A question, instead of the QUESTION arguments (handy when it starts with '-'); repeatable.",
        show_default=False,
    ),
]
AskQuestionsFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--questions",
        help="Text file (UTF-8) with one question per line, asked after the others.",
        show_default=False,
        dir_okay=False,
    ),
]


def collect_questions(
    positional: list[str] | None, option: list[str] | None, questions_file: Path | None = None
) -> list[str]:
    """The questions in order: the QUESTION arguments or the ``-q`` ones (not both), then the file's.

    Raises a usage error (exit 2) when none is given or both forms are; ConfigError for a file that cannot be
    read, too many questions, or a question that is empty, too long or not valid text (named by number when
    there are several).
    """
    if positional and option:
        raise typer.BadParameter(
            "give the questions as QUESTION arguments or with -q/--question, not both",
            param_hint="QUESTION / -q",
        )
    asked = list(positional or option or [])
    if questions_file is not None:
        from holitom_cli.batchio import read_questions

        asked += read_questions(questions_file)
    if not asked:
        raise typer.BadParameter(
            "a question is needed (QUESTION argument, -q/--question or --questions FILE)",
            param_hint="QUESTION",
        )
    if len(asked) > MAX_ASK_QUESTIONS:
        raise ConfigError(
            f"{len(asked):,} questions in one call, more than the limit of {MAX_ASK_QUESTIONS:,}",
            hint="Use holitom batch for long lists of questions (it resumes where it stopped).",
        )
    for i, text in enumerate(asked):
        name = question_name(i, len(asked))
        check_question_text(text, name)
        if not text.strip():
            raise ConfigError(f"{name} is empty", hint="Ask something about the video.")
    return asked


def question_name(index: int, count: int) -> str:
    """``the question`` when there is one, ``question 3`` (1-based) among several."""
    return "the question" if count == 1 else f"question {index + 1}"


def ask_command(
    video: VideoArg,
    questions: QuestionsArg = None,
    question_opt: AskQuestionsOpt = None,
    questions_file: AskQuestionsFileOpt = None,
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
    no_cache: NoCacheOpt = False,
    cache_size: CacheSizeOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Answer one or several questions about a video.

    The answer streams to stdout; a report (visual tokens at each stage, FLOPs, time to first token, decode
    speed, memory, what was reused) follows on stderr. With --json, stdout holds exactly one JSON object per
    question, one per line (docs/json-schema.md).

    Several questions (holitom ask v.mp4 "q1" "q2", -q repeated, or --questions FILE): the model loads once,
    the video is prepared once, and each question is answered in turn, independently of the others (answers
    on stdout separated by a blank line, each with its report, then a summary table). Every question is
    checked before the model's work starts (empty, too long, or not fitting the context on its own: the
    command stops there); an error while answering one is reported and the others are still answered; the
    exit code is then 1.

    Example: holitom ask assets/sample.mp4 "What does the red circle do?"
    """
    # Everything that can be checked without the model is checked first, so mistakes fail in a second.
    asked = collect_questions(questions, question_opt, questions_file)
    if verbose and quiet:
        raise ConfigError("--verbose and --quiet cannot be used together", hint="Pick one.")
    cfg = build_config(preset, retain_ratio, tau, inner_layer, inner_prune_ratio, no_inner, no_compress)
    if compare_baseline and cfg is None:
        raise ConfigError(
            "--compare-baseline needs compression, but --no-compress is set",
            hint="Drop --no-compress: the comparison runs the full model anyway.",
        )
    sampling = sampling_options(frames, fps, max_frames)
    generation = generation_options(max_new_tokens, temperature, top_p, seed)
    check_video_path(video)
    gif = explain is not None and explain.suffix.lower() == ".gif"
    if explain is not None:
        from holitom_cli.render import check_output_path

        check_output_path(explain, gif=gif, gif_flag=False)

    from holitom_cli.cli.report import prepare_with_progress, stderr_console

    console = stderr_console()
    show = not quiet
    cache = open_video_cache(console, quiet, no_cache, cache_size, cache_dir)  # a bad --cache-size fails here
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
    for question in asked:  # each question alone must leave room in the context
        pipe.check_question(question, generation)
    prepared = prepare_with_progress(
        pipe, video, sampling, console if show else None, prepare=cached_preparation(pipe, cache)
    )

    run = _Run(pipe, prepared, console, cfg, generation, preset, as_json, show, verbose, explain, gif)
    if len(asked) == 1:
        try:
            run.answer(asked[0], compare_baseline, repeats)
        except MapNotWritten as failed:  # the answer is out (stdout / its JSON line); the picture is not
            raise failed.cause from None
        return
    failed = run.answer_all(asked, compare_baseline, repeats)
    if failed:
        raise typer.Exit(1)


class MapNotWritten(Exception):
    """The answer was given (and printed) but its ``--explain`` picture could not be written."""

    def __init__(self, record: dict[str, Any], cause: BaseException) -> None:
        super().__init__(str(cause))
        self.record, self.cause = record, cause


class _Run:
    """Answers questions about one prepared video and prints each one's answer, JSON line and report."""

    def __init__(
        self, pipe, prepared, console, cfg, generation, preset, as_json, show, verbose, explain, gif
    ):
        self.pipe, self.prepared, self.console = pipe, prepared, console
        self.cfg, self.generation, self.preset = cfg, generation, preset
        self.as_json, self.show, self.verbose = as_json, show, verbose
        self.explain, self.gif = explain, gif
        self.interactive = show and not as_json  # the spinners: only with the Rich report (and a terminal)
        self.stream = None if as_json else stdout_writer()
        self.merge_map: str | None = None
        self.map_failed = False  # the --explain picture could not be written (tried once per call)
        self.warmed = False  # --compare-baseline: the warm-up ran (once per call)

    def answer(self, question: str, compare_baseline: bool, repeats: int) -> dict[str, Any]:
        """Answer one question: stream it, write its JSON line or print its report; the record."""
        from holitom_cli.cli.records import answer_record
        from holitom_cli.cli.report import Spinner, print_comparison, print_report

        runs = None
        if compare_baseline:
            runs = compare_runs(
                self.console, self.interactive, self.show, self.stream, self.pipe, self.prepared,
                question, self.cfg, self.generation, repeats, warm=not self.warmed,
            )  # fmt: skip
            self.warmed = True
            answer, baseline = runs.holitom[0], runs.baseline[0]
        else:
            with Spinner(self.console, "Prefilling ...", enabled=self.interactive) as spinner:
                answer = self.pipe.ask(
                    self.prepared,
                    question,
                    self.cfg,
                    self.generation,
                    on_text=spinner.until_first(self.stream),
                )
            if self.stream is not None:
                self.stream("\n")
            baseline = None

        new_map = self.merge_map is None and self.explain is not None and not self.map_failed
        map_error = None
        if new_map:  # the outer stage does not depend on the question: one picture for every answer
            try:
                self.merge_map = self._save_merge_map(question, answer)
            except Exception as exc:  # never lose the answer for the picture: say so after it
                self.map_failed, map_error, new_map = True, exc, False
        record = answer_record(
            question, answer, self.prepared, baseline, self.merge_map, preset=self.preset, runs=runs
        )
        if map_error is not None:
            record["merge_map_error"] = failure_text(map_error)[0]
        if self.as_json:
            write_json_line(record)
        if self.show and not self.as_json:
            self.console.print()
            print_report(record, self.console, verbose=self.verbose)
            if baseline is not None:
                print_comparison(record, self.console)
        if self.show and new_map:
            self.console.print(f"Merge map written to {self.merge_map}")
        if map_error is not None:
            raise MapNotWritten(record, map_error)
        return record

    def answer_all(self, asked: list[str], compare_baseline: bool, repeats: int) -> int:
        """Answer every question in turn (headers on stderr, a blank line between answers on stdout), then
        the summary table; returns the number of questions that failed."""
        from rich.markup import escape

        from holitom_cli.cli.errors import one_line, print_error
        from holitom_cli.cli.records import error_line_record
        from holitom_cli.cli.report import print_summary

        records = []
        for i, question in enumerate(asked):
            if i and self.stream is not None:
                self.stream("\n")
            if self.show and not self.as_json:
                if i:
                    self.console.print()
                header = f"[bold]Question {i + 1} of {len(asked)}:[/bold] {escape(one_line(question))}"
                self.console.print(header, highlight=False)
            try:
                records.append(self.answer(question, compare_baseline, repeats))
            except MapNotWritten as failed:  # answered; only the picture is missing
                message, hint = failure_text(failed.cause)
                print_error(f"{question_name(i, len(asked))}: {message}", hint)
                records.append({**failed.record, "error": message})
            except BrokenPipeError:
                raise
            except Exception as exc:  # reported, and the next question is still answered
                message, hint = failure_text(exc)
                print_error(f"{question_name(i, len(asked))}: {message}", hint)
                record = error_line_record(
                    question, message, self.prepared, self.pipe, self.cfg, self.generation, self.preset
                )
                records.append(record)
                if self.as_json:
                    write_json_line(record)
        failed = sum(1 for r in records if r.get("error"))
        if self.show and not self.as_json:
            self.console.print()
            print_summary(records, self.console)
        if failed:
            print_error(
                f"{failed} of {len(asked)} questions failed",
                "See the error line of each above; the other answers are complete.",
            )
        return failed

    def _save_merge_map(self, question: str, answer: Any) -> str:
        from holitom_cli.cli.inspect_cmd import save_unit_merge_map
        from holitom_cli.cli.records import preset_record
        from holitom_cli.cli.report import settings_line

        stats = answer.stats.to_dict()
        named = {"config": stats["holitom"], "preset": preset_record(self.preset, stats["holitom"]), **stats}
        caption = f"{question}  ·  {self.pipe.model.name}  ·  {settings_line(named)}"
        return str(save_unit_merge_map(self.explain, self.prepared, answer.compression, caption, self.gif))


def open_video_cache(
    console: Any, quiet: bool, no_cache: bool, cache_size: str | None, cache_dir: str | None
):
    """The video cache of ``--no-cache`` / ``--cache-size`` / ``--cache-dir`` (None when off); its warnings
    (a folder it cannot use) go to ``console`` unless ``quiet``. ConfigError for a bad --cache-size."""
    from rich.markup import escape

    from holitom_cli.video_cache import open_cache

    def warn(text: str) -> None:
        console.print(f"[yellow]Warning: {escape(text)}[/yellow]", highlight=False)

    return open_cache(no_cache, cache_size, cache_dir, warn=None if quiet else warn)


def cached_preparation(pipe: Any, cache: Any):
    """``prepare(path, sampling, on_progress=None)`` through the video cache (the pixels are decoded again
    only where a picture needs them: ``save_unit_merge_map``)."""
    from holitom_cli.video_cache import prepare_video_cached

    def prepare(path: Any, sampling: Any, on_progress: Any = None) -> Any:
        return prepare_video_cached(pipe, path, sampling, cache=cache, on_progress=on_progress)

    return prepare


def failure_text(exc: BaseException) -> tuple[str, str | None]:
    """``(message, hint)`` of a failed question, as cli/errors.py would print them (traceback with
    HOLITOM_DEBUG=1)."""
    import traceback

    from holitom_cli.cli.errors import BUG_HINT, debug_enabled

    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, HolitomError):
        return exc.message, exc.hint
    if isinstance(exc, MemoryError):
        return "out of memory", "Use fewer frames (--frames), a smaller model, or --quantize 8bit."
    summary = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f"unexpected failure ({summary})", BUG_HINT


def write_json_line(record: dict[str, Any]) -> None:
    from holitom_cli.batchio import dumps_line

    sys.stdout.write(dumps_line(record) + "\n")
    sys.stdout.flush()


def compare_runs(console, interactive, show, stream, pipe, prepared, question, cfg, generation, repeats,
                 warm=True, history=()):  # fmt: skip
    """--compare-baseline: warm-up, then full model / HoliTom interleaved ``repeats`` times.

    The first answer of each side streams to stdout (a blank line between them, labels on stderr); a spinner
    on stderr covers the warm-up, each prefill until its first token, and the silent timing repeats.
    """
    from holitom_cli.cli.records import compare_with_baseline
    from holitom_cli.cli.report import Spinner

    labels = {"baseline": "Full model (no compression)", "holitom": "HoliTom"}
    short = {"baseline": "full model", "holitom": "HoliTom"}
    state = {"spinner": Spinner(console, "Warming up ...", enabled=interactive and warm).__enter__()}

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
            pipe, prepared, question, cfg, generation, repeats, on_text=on_text, on_run=on_run, warm=warm,
            history=history,
        )  # fmt: skip
    finally:
        state["spinner"].stop()
    if stream is not None:
        stream("\n")
    return runs


_CONTROL = {c: None for c in range(32) if chr(c) not in "\n\t"} | {127: None}


def stdout_writer():
    """Write answer pieces to stdout as they come; on a terminal, control characters are dropped."""
    clean = sys.stdout.isatty()

    def write(piece: str) -> None:
        sys.stdout.write(piece.translate(_CONTROL) if clean else piece)
        sys.stdout.flush()

    return write
