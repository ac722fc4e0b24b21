"""Steps shared by the commands that load a model and read a video (ask, batch, inspect).

Heavy imports (the pipeline, torch) happen inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from holitom_cli.errors import VideoError


def check_video_path(video: Path) -> None:
    """Cheap checks before the model loads, so that a bad video fails in a second, not after the model loaded.

    The path must be a regular, readable file (never a URL, a folder, a FIFO or a device: ``stat`` first, so
    nothing blocks) that OpenCV opens and decodes one frame of (``holitom_cli.video.probe_video``). Raises
    VideoError with a hint otherwise.
    """
    from holitom_cli.video import probe_video

    try:
        is_dir = video.is_dir()
    except OSError:  # e.g. a name too long for the file system: probe_video says which
        is_dir = False
    if is_dir:
        raise VideoError(
            f"{video} is a folder, not a video file",
            hint="To ask about every video in it, use holitom batch.",
        )
    probe_video(video)


def load_pipeline(console: Any, show: bool, model: str, **load_options: Any) -> Any:
    """``Pipeline.load`` with a plain "Loading ..." line on stderr (not a spinner: the download and loading
    bars of huggingface-hub and transformers may follow); ``show=False`` switches those bars off too."""
    from rich.markup import escape

    from holitom_cli.cli.errors import one_line
    from holitom_cli.cli.report import library_progress_bars
    from holitom_cli.pipeline import Pipeline

    if show:
        console.print(f"Loading {escape(one_line(model))} ...", highlight=False)
    with library_progress_bars(show):
        return Pipeline.load(model, **load_options)


def prepare_with_progress(pipe: Any, video: Path, sampling: Any, console: Any) -> Any:
    """Decode the video and run the vision tower, with a progress bar over the frames on stderr
    (``console=None``: silently)."""
    if console is None:
        return pipe.prepare_video(video, sampling)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"Reading {video.name}", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, description="Encoding frames", completed=done, total=total)

        return pipe.prepare_video(video, sampling, on_progress=on_progress)
