"""``holitom batch INPUT -o out.jsonl``: many (video, question) pairs, one JSON line each, resumable.

The model loads once; each video is decoded and encoded once for all its questions. Lines are written by
:class:`holitom_cli.batch_store.ResultStore` (one write + fsync per line), so a run killed at any moment
resumes where it stopped; items that failed before are retried. The output is checked and locked before the
model loads: a file that holitom did not write, an input file, a non-regular file or a file another run is
writing is refused untouched (issue 9).

With ``--workers N`` the same items run on Ray Data (``holitom_cli.distributed.ray_batch``, issue 12): this
process still decides what to run and alone writes the output, with the same records, resume and lock rules;
:func:`answer_video` and :func:`error_record` make the lines in both cases.
"""

from __future__ import annotations

import dataclasses
import signal
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from holitom_cli.cli.common import load_pipeline
from holitom_cli.cli.options import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    PANEL_OUTPUT,
    CacheDirOpt,
    CacheSizeOpt,
    CompareBaselineOpt,
    DeviceOpt,
    DtypeOpt,
    FpsOpt,
    FramesOpt,
    InnerLayerOpt,
    InnerPruneRatioOpt,
    MaxFramesOpt,
    MaxNewTokensOpt,
    ModelOpt,
    NoCacheOpt,
    NoCompressOpt,
    NoInnerOpt,
    OfflineOpt,
    PresetOpt,
    QuantizeOpt,
    QuietLongOpt,
    RepeatsOpt,
    RetainRatioOpt,
    RevisionOpt,
    SeedOpt,
    TauOpt,
    TemperatureOpt,
    TopPOpt,
    generation_options,
)
from holitom_cli.cli.settings import build_config, check_question_text, sampling_options
from holitom_cli.errors import ConfigError, HolitomError

PANEL_INPUT = "Input"
PANEL_RAY = "Scale-out (Ray)"

InputArg = Annotated[
    Path,
    typer.Argument(
        help="A folder of videos, a manifest (.jsonl/.csv with 'video', 'question' columns) or one video.",
        show_default=False,
    ),
]
OutputOpt = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        help="JSONL file to write: a new or empty file, or one an earlier batch wrote (appended to; existing "
        "answers are skipped). Any other file is refused untouched.",
        rich_help_panel=PANEL_OUTPUT,
        show_default=False,
    ),
]
RecursiveOpt = Annotated[
    bool,
    typer.Option(
        "--recursive", "-r", help="Look for videos in sub-folders too.", rich_help_panel=PANEL_INPUT
    ),
]
QuestionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--question",
        "-q",
        help="A question to ask about every video (repeatable).",
        rich_help_panel=PANEL_INPUT,
        show_default=False,
    ),
]
QuestionsFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--questions",
        help="Text file with one question per line, asked about every video.",
        rich_help_panel=PANEL_INPUT,
        show_default=False,
        dir_okay=False,
    ),
]


WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Run on Ray Data with N workers, each holding one loaded model (needs: pip install "
        "'holitom[ray]'). Same lines, resume and exit code as without it. See docs/scale-out.md.",
        rich_help_panel=PANEL_RAY,
        show_default=False,
        min=1,
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Join a running Ray cluster (the address 'ray start --head' prints, or 'auto'); default: a "
        "private Ray instance on this machine for the run. Needs --workers.",
        rich_help_panel=PANEL_RAY,
        show_default=False,
    ),
]
GpusPerWorkerOpt = Annotated[
    float | None,
    typer.Option(
        "--gpus-per-worker",
        help="GPUs per worker, at most 1; fractions share a GPU (0.5: two workers per GPU). Default: 1 when "
        "the cluster has GPUs and --device is not cpu, else 0. Needs --workers.",
        rich_help_panel=PANEL_RAY,
        show_default=False,
        min=0.0,
        max=1.0,
    ),
]
RayVerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="With --workers: also show Ray's own log messages (kept out of the terminal otherwise).",
        rich_help_panel=PANEL_OUTPUT,
    ),
]


@dataclass(frozen=True)
class BatchJob:
    """The settings every item of one run is answered with (picklable: each Ray worker gets a copy)."""

    model: str
    revision: str | None
    device: str
    dtype: str
    quantize: str | None
    offline: bool
    cfg: Any  # HoliTomConfig, or None for --no-compress
    sampling: Any  # SamplingOptions
    generation: Any  # GenerationOptions
    compare_baseline: bool
    repeats: int
    preset: str | None
    digest: str  # settings_hash of the settings that change an answer


def describe_error(exc: BaseException) -> str:
    """The ``error`` text of an item that failed with ``exc`` (a HolitomError's own message)."""
    from holitom_cli.cli.errors import debug_enabled

    if debug_enabled():
        traceback.print_exception(exc)
    if isinstance(exc, HolitomError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def error_record(job: BatchJob, item: Any, message: str, prepared: Any = None) -> dict:
    """The line of an item that failed (``prepared``: the video, when it was prepared before the failure)."""
    from holitom_cli import batchio
    from holitom_cli.cli.records import SCHEMA_VERSION, versions, video_record

    record = {
        "schema_version": SCHEMA_VERSION,
        "question": item.question,
        "answer": None,
        "error": message,
        "model": {"name": job.model},
        "config": job.cfg.to_dict() if job.cfg is not None else None,
        "generation": job.generation.to_dict(),
        "video": video_record(prepared if prepared is not None else batchio.path_text(item.video)),
        "versions": versions(),
        "settings_hash": job.digest,
    }
    record["video"]["path"] = batchio.path_text(item.video)
    return record


def answer_video(
    pipe: Any, job: BatchJob, video: Any, items: list, state: dict, cache: Any = None
) -> Iterator[tuple[dict, str | None]]:
    """Prepare one video once, then answer its items one by one: yields ``(record, failure line or None)``.

    ``video``: its path, or an already decoded VideoClip (Ray's decoding tasks). A video that cannot be
    prepared gives an error line for every item (and one failure line). ``state`` lives as long as the
    pipeline (``warmed``: the --compare-baseline warm-up already ran). ``cache``: the video cache a path is
    prepared through (``holitom_cli.video_cache``; None: none).
    """
    from holitom_cli import batchio
    from holitom_cli.cli.records import answer_record, compare_with_baseline
    from holitom_cli.video_cache import prepare_video_cached

    label = batchio.path_text(items[0].video.name) if items else ""
    try:
        prepared = prepare_video_cached(pipe, video, job.sampling, cache=cache)
    except Exception as exc:
        message = describe_error(exc)
        for i, item in enumerate(items):
            yield error_record(job, item, message), (f"{label}: {message}" if i == 0 else None)
        return
    for item in items:
        try:
            pipe.check_question(item.question, job.generation)
            runs = None
            if job.compare_baseline:
                runs = compare_with_baseline(
                    pipe, prepared, item.question, job.cfg, job.generation, job.repeats,
                    warm=not state.get("warmed"),
                )  # fmt: skip
                state["warmed"] = True
                answer, baseline = runs.holitom[0], runs.baseline[0]
            else:
                answer = pipe.ask(prepared, item.question, job.cfg, job.generation)
                baseline = None
            record = answer_record(item.question, answer, prepared, baseline, preset=job.preset, runs=runs)
            record["video"]["path"] = batchio.path_text(item.video)
            record["error"] = None
            record["settings_hash"] = job.digest
            yield record, None
        except Exception as exc:
            record = error_record(job, item, describe_error(exc), prepared)
            yield record, f"{label} ({item.question!r}): {record['error']}"


def progress_bar(console: Any, quiet: bool, extra: tuple = (), **options: Any) -> Any:
    """The batch progress bar: item, bar, done/total, failures, the ``extra`` columns, elapsed, ETA
    (``options`` go to rich's ``Progress``; the Ray driver adds its throughput column)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        *extra,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        **options,
    )


def collect_items(input_path: Path, recursive: bool, questions: list[str]) -> list:
    """The (video, question) items described by INPUT and the questions (see ``holitom_cli.batchio``)."""
    from holitom_cli import batchio
    from holitom_cli.video import VIDEO_EXTENSIONS

    name = batchio.path_text(input_path)
    if not input_path.exists():
        raise ConfigError(
            f"input not found: {name}", hint="Pass a folder of videos or a .jsonl/.csv manifest."
        )
    if input_path.is_dir():
        videos = batchio.find_videos(input_path, VIDEO_EXTENSIONS, recursive=recursive)
        if not videos:
            raise ConfigError(
                f"no videos in {name}" + ("" if recursive else " (sub-folders not searched)"),
                hint=f"Known extensions: {' '.join(VIDEO_EXTENSIONS)}"
                + ("" if recursive else "; add --recursive to search sub-folders."),
            )
        rows = [(v, None) for v in videos]
    elif input_path.suffix.lower() in batchio.MANIFEST_SUFFIXES:
        rows = batchio.read_manifest(input_path)
    elif input_path.suffix.lower() in VIDEO_EXTENSIONS:
        rows = [(input_path.resolve(), None)]
    else:
        raise ConfigError(
            f"{name} is not a video, a folder or a manifest (unknown extension "
            f"{batchio.path_text(input_path.suffix) or 'none'})",
            hint=f"Pass a video ({' '.join(VIDEO_EXTENSIONS)}), a folder of videos or a manifest.",
        )
    items = batchio.build_items(rows, questions)
    for item in items:  # questions from files and manifests: the same bounds as -q, before the model loads
        check_question_text(item.question, f"the question {item.question[:40]!r}")
    return items


class _StopFlag:
    """First Ctrl-C: finish the current item, then stop. Second Ctrl-C: stop now (KeyboardInterrupt)."""

    def __init__(self, console: Any) -> None:
        self.requested = False
        self.console = console

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.console.print(
            "[yellow]Stopping after the current item (press Ctrl-C again to stop now).[/yellow]"
        )


@contextmanager
def _sigint(flag: _StopFlag):
    try:
        previous = signal.signal(signal.SIGINT, flag.handle)
    except ValueError:  # not the main thread: keep the default behaviour
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def batch_command(
    input_path: InputArg,
    output: OutputOpt,
    question: QuestionOpt = None,
    questions_file: QuestionsFileOpt = None,
    recursive: RecursiveOpt = False,
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
    repeats: RepeatsOpt = 3,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    max_frames: MaxFramesOpt = None,
    max_new_tokens: MaxNewTokensOpt = DEFAULT_MAX_NEW_TOKENS,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    quiet: QuietLongOpt = False,
    no_cache: NoCacheOpt = False,
    cache_size: CacheSizeOpt = None,
    cache_dir: CacheDirOpt = None,
    verbose: RayVerboseOpt = False,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
) -> None:
    """Answer questions about many videos, one JSON line per (video, question).

    Lines have the schema of 'ask --json' plus 'error' (null, or why the item failed). Re-running the same
    command skips what is already answered and retries what failed; a run interrupted at any moment (even
    killed) resumes cleanly. The exit code is 1 when any item failed.

    Example: holitom batch videos/ -q "What happens?" -q "How many people are there?" -o answers.jsonl

    On several GPUs or machines (Ray): holitom batch videos/ -q "What happens?" -o answers.jsonl --workers 4
    """
    from rich.markup import escape

    from holitom_cli import batchio
    from holitom_cli.cli.errors import print_error
    from holitom_cli.cli.report import stderr_console

    cfg = build_config(preset, retain_ratio, tau, inner_layer, inner_prune_ratio, no_inner, no_compress)
    if compare_baseline and cfg is None:
        raise ConfigError(
            "--compare-baseline needs compression, but --no-compress is set",
            hint="Drop --no-compress: the comparison runs the full model anyway.",
        )
    sampling = sampling_options(frames, fps, max_frames)
    generation = generation_options(max_new_tokens, temperature, top_p, seed)
    from holitom_cli.video_cache import open_cache, parse_size

    if cache_size is not None:
        parse_size(cache_size)  # a bad --cache-size fails before anything else
    ray_options = None
    if workers is None:
        if ray_address is not None or gpus_per_worker is not None:
            raise ConfigError("--ray-address and --gpus-per-worker need --workers", hint="e.g. --workers 2")
    else:  # checked before the output is opened: a run that cannot start leaves it untouched
        from holitom_cli.distributed import RayOptions, require_ray

        require_ray()
        ray_options = RayOptions(
            workers=workers, address=ray_address, gpus_per_worker=gpus_per_worker, verbose=verbose
        )
        ray_options.check_device(device)
    asked = list(question or [])
    if questions_file is not None:
        asked += batchio.read_questions(questions_file)
    items = collect_items(input_path, recursive, asked)
    inputs = [input_path, *([questions_file] if questions_file is not None else [])]
    inputs += list(dict.fromkeys(item.video for item in items))

    settings = {
        "model": model,
        "revision": revision,
        "dtype": dtype,
        "quantize": quantize,
        "config": cfg.to_dict() if cfg is not None else None,
        "sampling": dataclasses.asdict(sampling),
        "generation": generation.to_dict(),
        "compare_baseline": compare_baseline,
    }
    digest = batchio.settings_hash(settings)
    job = BatchJob(model, revision, device, dtype, quantize, offline, cfg, sampling, generation,
                   compare_baseline, repeats, preset, digest)  # fmt: skip
    console = stderr_console()
    out_name = escape(batchio.path_text(output))
    store = batchio.ResultStore(output)
    state = store.open(retry_errors=True, inputs=inputs)  # refused or locked: raises, file untouched
    if not quiet:
        if state.dropped_lines:
            console.print(f"[yellow]Cut off the incomplete last line of {out_name}; redoing it.[/yellow]")
        if state.invalid_lines:
            console.print(
                f"[yellow]{state.invalid_lines} damaged line(s) in {out_name} left as they are and "
                "ignored.[/yellow]"
            )
    done = store.done_keys()
    pending = [item for item in items if batchio.item_key(item, digest) not in done]
    skipped = len(items) - len(pending)
    if not pending:
        store.close()
        if not quiet:
            console.print(f"Nothing to do: all {len(items)} item(s) are already in {out_name}.")
        return

    # Group by video, keeping the input order: each video is prepared once for all its questions.
    groups: dict[Path, list] = {}
    for item in pending:
        groups.setdefault(item.video, []).append(item)

    answered = failed = 0
    failures: list[str] = []
    flag = _StopFlag(console)

    try:
        with _sigint(flag):
            if not quiet:
                console.print(
                    f"{len(pending)} item(s) to answer over {len(groups)} video(s)"
                    + (f", {skipped} already in {out_name}" if skipped else "")
                )
            if ray_options is not None:
                from holitom_cli.distributed.ray_batch import run_on_ray

                outcome = run_on_ray(groups, job, store, ray_options, console=console, quiet=quiet,
                                     stop=lambda: flag.requested)  # fmt: skip
                answered, failed = outcome.answered, outcome.failed
                failures += outcome.failures
            else:
                pipe = load_pipeline(
                    console,
                    not quiet,
                    model,
                    revision=revision,
                    device=device,
                    dtype=dtype,
                    quantize=quantize,
                    offline=offline,
                )
                if cfg is not None:  # settings that cannot fit this model fail the run once, not every item
                    cfg.resolve_inner_layer(pipe.model.num_layers)
                warn = (
                    None
                    if quiet
                    else (lambda text: console.print(f"[yellow]Warning: {escape(text)}[/yellow]"))
                )
                cache = open_cache(no_cache, cache_size, cache_dir, warn=warn)
                state: dict = {}
                with progress_bar(console, quiet) as progress:
                    task = progress.add_task("answering", total=len(pending), failed=0)
                    for path, group in groups.items():
                        if flag.requested:
                            break
                        progress.update(task, description=escape(batchio.path_text(path.name)))
                        for record, failure in answer_video(pipe, job, path, group, state, cache):
                            store.append(record)
                            if record["error"] is None:
                                answered += 1
                            else:
                                failed += 1
                            if failure:
                                failures.append(failure)
                            progress.update(task, advance=1, failed=failed)
                            if flag.requested:
                                break
    finally:
        store.close()

    remaining = len(pending) - answered - failed
    if not quiet:
        summary = f"{answered} answered, {failed} failed"
        if skipped:
            summary += f", {skipped} skipped (already done)"
        console.print(f"{summary} -> {out_name}")
        for line in failures[:10]:
            console.print(f"  [red]failed[/red] {escape(batchio.path_text(line))}", highlight=False)
        if len(failures) > 10:
            console.print(f"  ... and {len(failures) - 10} more (see the 'error' field in {out_name})")
    if remaining:
        if not quiet:
            console.print(f"Stopped with {remaining} item(s) left; run the same command again to continue.")
        raise typer.Exit(130)
    if failed:
        # Always said, even with --quiet: an exit code alone does not tell what went wrong or where to look.
        print_error(
            f"{failed} of {answered + failed} item(s) failed; their lines in "
            f"{batchio.path_text(output)} have the reason in the 'error' field",
            "Fix those videos or questions and run the same command again: answered items are skipped, "
            "failed ones are retried.",
        )
        raise typer.Exit(1)
