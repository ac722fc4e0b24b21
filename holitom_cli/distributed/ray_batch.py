"""``holitom batch --workers N`` on Ray Data: CPU tasks decode, an actor pool answers, the driver writes.

The plan (one row per video, holding all of that video's pending questions)::

    from_items(groups)                      one row per video: its path and its pending questions
      -> map(decode_row)                    CPU tasks: OpenCV decoding and frame sampling
      -> map_batches(PipelineWorker)        actor pool, one loaded Pipeline per actor: preprocessing,
                                            vision tower, HoliTom, generation for every question
      -> iter_rows() on the driver          each record written through the one ResultStore on arrival

Exactly-once: the driver is the only writer and holds the output's lock for the whole run; a record is
written (one line, fsync) when it reaches the driver, and only once per run (a duplicate from a retried task
would be dropped). A worker that dies (crash, OOM, ``kill -9``) is restarted by Ray and its video retried
(:data:`MAX_TASK_RETRIES`); what it had computed never reached the driver, so nothing is duplicated. A video
that kills its worker on every attempt is dropped by Ray Data (``max_errored_blocks=-1``) and gets error
lines, so one bad video never stops the run. A killed driver loses only what was in flight: the next run
skips every item already written (the store's resume rules) and retries failed ones.

The lines are made by the single-process batch's own functions (``holitom_cli.cli.batch.answer_video`` and
``error_record``), so they are the same. Preprocessing (resize and normalise the sampled frames) runs in the
worker, inside ``Pipeline.prepare_video``; decoding, the costly CPU part, runs in the CPU tasks.

Nothing here imports Ray at module level: ``ray`` is imported by :func:`run_on_ray` after the environment
for a private, loopback-only instance is set. The worker-side code (:func:`decode_row`,
:class:`PipelineWorker`) needs only holitom itself.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from holitom_cli.batch_store import display_name, dumps_line, record_key
from holitom_cli.distributed import RayOptions
from holitom_cli.errors import ConfigError, HolitomError, ModelError

#: Attempts after the first for a video whose worker (or decoding task) died. A video that kills its worker
#: more often than that is given up on (error lines), not retried forever.
MAX_TASK_RETRIES = 3
#: Logical CPUs of one decoding task when the workers have no GPU (they take the rest of the CPUs).
DECODE_CPUS_CPU_ONLY = 0.5


class RayRunError(HolitomError):
    """Ray itself failed (could not start or connect, or gave up on the run)."""


@dataclass
class RayOutcome:
    """What the run wrote: the counts and failure lines that ``holitom batch`` summarises."""

    answered: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    stopped: bool = False  # stopped on request (Ctrl-C) before every item had a line
    log_path: str | None = None  # where Ray's own messages went (kept when something went wrong)


# ------------------------------------------------------------------------------------------- workers


def decode_row(row: dict[str, Any], sampling: Any) -> dict[str, Any]:
    """CPU task: decode and sample one video (what ``Pipeline.prepare_video`` does first), pickled for the
    worker; a video that cannot be decoded gives its error text instead."""
    from holitom_cli.video import load_video

    path = Path(os.fsdecode(row["path"]))
    try:
        clip = load_video(
            path, num_frames=sampling.frames or 32, fps=sampling.fps, max_frames=sampling.max_frames
        )
    except Exception as exc:
        from holitom_cli.cli.batch import describe_error

        return {**row, "clip": b"", "error": display_name(describe_error(exc))}
    return {**row, "clip": pickle.dumps(clip, protocol=pickle.HIGHEST_PROTOCOL), "error": ""}


class PipelineWorker:
    """One actor of the pool: loads the pipeline once, then answers one video (all its questions) per call.

    A model that cannot be loaded, or settings that cannot fit it, make every call return one ``fatal``
    row instead of records: the driver stops the run with that error (as the single-process batch does
    before its first item) rather than writing an error line for every item.
    """

    def __init__(self, job: Any, threads: int | None = None) -> None:
        self.job = job
        self.pipe: Any = None
        self.state: dict[str, Any] = {}
        self.fatal: dict[str, Any] | None = None
        try:
            if threads:
                import torch

                torch.set_num_threads(threads)
            from holitom_cli.pipeline import Pipeline

            self.pipe = Pipeline.load(
                job.model,
                revision=job.revision,
                device=job.device,
                dtype=job.dtype,
                quantize=job.quantize,
                offline=job.offline,
            )
            if job.cfg is not None:  # settings that cannot fit this model fail the run once, not every item
                job.cfg.resolve_inner_layer(self.pipe.model.num_layers)
        except HolitomError as exc:
            kind = "config" if isinstance(exc, ConfigError) else "model"
            self.fatal = {"kind": kind, "message": exc.message, "hint": exc.hint}
        except Exception as exc:
            self.fatal = {
                "kind": "model",
                "message": f"a worker could not load {job.model} ({type(exc).__name__}: {exc})",
                "hint": "Check the model and the device of every Ray node; rerun with -v for Ray's logs.",
            }

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from holitom_cli.batchio import BatchItem, path_text
        from holitom_cli.cli.batch import answer_video, error_record

        out: dict[str, list] = {"group": [], "kind": [], "data": [], "failure": []}

        def add(group: int, kind: str, data: str, failure: str | None) -> None:
            out["group"].append(group)
            out["kind"].append(kind)
            out["data"].append(data)
            out["failure"].append(display_name(failure) if failure else "")

        for i in range(len(batch["group"])):
            group = int(batch["group"][i])
            if self.fatal is not None:
                add(group, "fatal", json.dumps(self.fatal), None)
                continue
            video = Path(os.fsdecode(batch["path"][i]))
            questions = json.loads(batch["questions"][i])
            items = [BatchItem(video, q) for q in questions]
            error = str(batch["error"][i])
            if error:  # decoding failed: the single-process batch's lines for a video that cannot be read
                label = path_text(video.name)
                for j, item in enumerate(items):
                    add(group, "record", dumps_line(error_record(self.job, item, error)),
                        f"{label}: {error}" if j == 0 else None)  # fmt: skip
                continue
            clip = pickle.loads(batch["clip"][i])
            for record, failure in answer_video(self.pipe, self.job, clip, items, self.state):
                add(group, "record", dumps_line(record), failure)
        return {
            "group": np.array(out["group"], dtype=np.int64),
            **{k: np.array(out[k], dtype=object) for k in ("kind", "data", "failure")},
        }


# ------------------------------------------------------------------------------------------- Ray session


@contextmanager
def _terminal_kept_for_us(log_path: str, console: Any) -> Iterator[None]:
    """For the run, everything written to stdout and stderr goes to ``log_path``, except ``console``'s output.

    Ray writes to the process's file descriptors from C++ (its core worker) and to ``sys.stderr`` from its
    logging handlers and warnings; none of that should reach the user's terminal without ``-v``. So file
    descriptors 1 and 2 and ``sys.stdout``/``sys.stderr`` point at the log, and ``console`` (our progress bar
    and messages) keeps writing where stderr went before: a copy of descriptor 2, or the stream that stood in
    for it (tests, embedding).
    """
    for stream in (sys.stdout, sys.stderr):
        with suppress(AttributeError, OSError, ValueError):
            stream.flush()
    original_out, original_err = sys.stdout, sys.stderr
    explicit_file = getattr(console, "_file", None)  # None: the console follows sys.stderr
    target = explicit_file if explicit_file is not None else original_err
    try:
        is_fd2 = target.fileno() == 2
    except (AttributeError, OSError, ValueError):
        is_fd2 = False
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o600)
    saved_fds = [(fd, os.dup(fd)) for fd in (1, 2)]
    mirror = None
    if is_fd2:  # the terminal, through a copy of its descriptor that survives the dup2 below
        mirror = open(  # noqa: SIM115 - closed in the finally below
            os.dup(2), "w", encoding=getattr(target, "encoding", None) or "utf-8",
            errors=getattr(target, "errors", None) or "backslashreplace", buffering=1,
        )  # fmt: skip
    log_stream = open(os.dup(log_fd), "w", encoding="utf-8", errors="backslashreplace", buffering=1)  # noqa: SIM115
    try:
        console.file = mirror if mirror is not None else target
        for fd, _ in saved_fds:
            os.dup2(log_fd, fd)
        sys.stdout = sys.stderr = log_stream
        yield
    finally:
        for stream in (log_stream, mirror):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = original_out, original_err
        console.file = explicit_file
        for fd, copy in saved_fds:
            os.dup2(copy, fd)
            os.close(copy)
        for stream in (log_stream, mirror):
            if stream is not None:
                with suppress(OSError, ValueError):
                    stream.close()
        os.close(log_fd)


def _probe(address: str) -> None:
    """Fail in seconds when a ``host:port`` cluster address does not answer (Ray retries for minutes)."""
    import socket

    text = address.strip()
    host, sep, port = text.rpartition(":")
    if text == "auto" or "://" in text or not sep or not port.isdigit():
        return  # Ray finds (or refuses) these itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except OSError as exc:
        raise RayRunError(
            f"cannot reach the Ray cluster at {text}: {exc.strerror or exc}",
            hint="Start the head node with `ray start --head` (it prints its address) and check the host and "
            "port, or drop --ray-address to run on this machine alone.",
        ) from None


def _start_ray(options: RayOptions, verbose: bool) -> tuple[Any, bool]:
    """``ray.init`` (or the Ray already initialised in this process); returns (ray module, started here)."""
    if options.address is None:
        # A private single-node instance: every Ray process listens on 127.0.0.1 only (Ray's own switch for
        # single-node clusters), and no usage statistics are sent anywhere. Must be set before ``import ray``.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data  # noqa: F401 - configures Ray Data's loggers now, while stderr points at the log

    if ray.is_initialized():  # a test or a notebook started Ray already: use it, leave it running
        return ray, False
    level = logging.INFO if verbose else logging.WARNING
    common = {"log_to_driver": verbose, "logging_level": level, "configure_logging": True}
    try:
        if options.address is None:
            ray.init(
                address="local",
                num_cpus=options.num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                **common,
            )
        else:
            _probe(options.address)
            ray.init(address=options.address.strip(), **common)
    except RayRunError:
        raise
    except Exception as exc:
        where = f"the Ray cluster at {options.address}" if options.address else "a local Ray instance"
        raise RayRunError(
            f"cannot start or reach {where}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
            hint="Start the head node with `ray start --head` and pass the address it prints, or drop "
            "--ray-address to run on this machine alone."
            if options.address
            else "Run with -v to see Ray's own messages.",
        ) from exc
    return ray, True


def plan_resources(options: RayOptions, device: str, cluster: dict[str, float]) -> dict[str, float]:
    """CPUs and GPUs per worker and per decoding task, checked against what the cluster has.

    GPU workers take 1 CPU each (host work) and decoding tasks 1 CPU; CPU-only workers share what the
    decoding tasks leave (at most 1 each, so a pool never starves decoding of CPUs).
    """
    total_cpus = float(cluster.get("CPU", 0.0))
    total_gpus = float(cluster.get("GPU", 0.0))
    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if total_gpus > 0 and device not in ("cpu", "mps") else 0.0
    if gpus > 0 and options.workers * gpus > total_gpus + 1e-9:
        raise ConfigError(
            f"--workers {options.workers} with {gpus:g} GPU each needs {options.workers * gpus:g} GPU(s), "
            f"but the Ray cluster has {total_gpus:g}",
            hint="Use fewer --workers, a fractional --gpus-per-worker (0.5: two per GPU), or more nodes.",
        )
    if total_cpus <= 0:
        raise ConfigError("the Ray cluster has no CPU", hint="Start its nodes with at least one CPU each.")
    if gpus > 0:
        worker_cpus = min(1.0, total_cpus / (options.workers + 1))
        decode_cpus = min(1.0, total_cpus - worker_cpus * options.workers)
    else:
        decode_cpus = min(DECODE_CPUS_CPU_ONLY, total_cpus / 2)
        worker_cpus = min(1.0, (total_cpus - decode_cpus) / options.workers)
    return {"worker_cpus": worker_cpus, "worker_gpus": gpus, "decode_cpus": max(decode_cpus, 0.01)}


def build_dataset(ray: Any, table: list[tuple[Path, list[str]]], job: Any, options: RayOptions,
                  resources: dict[str, float], threads: int | None = None) -> Any:  # fmt: skip
    """The Ray Data plan over ``table`` (video, its questions), one row (and one block) per video."""
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the only progress bar
    ctx.max_errored_blocks = -1  # a video that kills its worker on every retry is dropped, not the run
    ctx.execution_options.preserve_order = False  # write each answer as soon as it exists
    rows = [{"group": i, "path": os.fsencode(path), "questions": json.dumps(questions)}
            for i, (path, questions) in enumerate(table)]  # fmt: skip
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    # Bounded retries: Ray Data's own default retries a dying task forever, so a video that crashes its
    # worker every time would never let the run end. Ray 2.60-2.63 take them as extra keyword arguments
    # (deprecated there, to be removed in 2.64); where they are gone, Ray Data's defaults apply.
    ds = ds.map(
        decode_row,
        fn_kwargs={"sampling": job.sampling},
        num_cpus=resources["decode_cpus"],
        **_remote_args(ds.map, max_retries=MAX_TASK_RETRIES),
    )
    return ds.map_batches(
        PipelineWorker,
        fn_constructor_kwargs={"job": job, "threads": threads},
        batch_size=1,
        compute=ActorPoolStrategy(size=options.workers, max_tasks_in_flight_per_actor=1),
        num_cpus=resources["worker_cpus"],
        num_gpus=resources["worker_gpus"] or None,
        **_remote_args(ds.map_batches, max_restarts=-1, max_task_retries=MAX_TASK_RETRIES),
    )


def _remote_args(method: Any, **args: Any) -> dict[str, Any]:
    """``args`` if ``method`` still takes extra Ray remote arguments, else nothing."""
    import inspect

    params = inspect.signature(method).parameters.values()
    return args if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) else {}


# ------------------------------------------------------------------------------------------- driver


def _throughput_column() -> Any:
    """Items per minute since the run started (``task.fields["since"]``, a ``time.monotonic()``)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ThroughputColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            since = task.fields.get("since")
            elapsed = time.monotonic() - since if since is not None else 0.0
            if not task.completed or elapsed <= 0:
                return Text("-- items/min", style="progress.data.speed")
            return Text(f"{task.completed / elapsed * 60:.1f} items/min", style="progress.data.speed")

    return ThroughputColumn()


def _progress(console: Any, quiet: bool, redirect: bool) -> Any:
    """The single-process bar plus items/min; without -v, stray writes belong in the log, not above it."""
    from holitom_cli.cli.batch import progress_bar

    return progress_bar(
        console, quiet, (_throughput_column(),), redirect_stdout=redirect, redirect_stderr=redirect
    )


def _fatal_error(data: str) -> HolitomError:
    info = json.loads(data)
    cls = ConfigError if info.get("kind") == "config" else ModelError
    return cls(info.get("message") or "a worker failed", hint=info.get("hint"))


def lost_message(log_path: str | None) -> str:
    where = f"; Ray's messages: {log_path}" if log_path else ""
    return (
        f"a Ray worker died on this video {MAX_TASK_RETRIES + 1} times (a crash, or out of memory?); "
        f"given up{where}"
    )


def run_on_ray(
    groups: dict[Path, list[Any]],
    job: Any,
    store: Any,
    options: RayOptions,
    *,
    console: Any,
    quiet: bool = False,
    stop: Callable[[], bool] = lambda: False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> RayOutcome:
    """Answer the pending ``groups`` ({video: [BatchItem, ...]}, in input order) on Ray; write each record
    through ``store`` (an open ResultStore) as it arrives. Returns the counts for the summary.

    ``console``: where the progress bar goes (a Rich console). ``stop()`` is polled after each record
    (Ctrl-C: stop after the current item); ``on_record(record)`` is called after each line is written.
    Raises ConfigError/ModelError when the workers cannot load the model or the settings do not fit it
    (nothing is written for them), RayRunError when Ray fails. Answered items are on disk either way.
    """
    from rich.markup import escape

    from holitom_cli import batchio

    table = [(path, [item.question for item in items]) for path, items in groups.items()]
    expected = {batchio.item_key(item, job.digest): item for items in groups.values() for item in items}
    outcome = RayOutcome()
    verbose = options.verbose
    log_path = None  # with -v Ray's messages go to the terminal, so there is no log file
    if not verbose:
        fd, log_path = tempfile.mkstemp(prefix="holitom-ray-", suffix=".log")
        os.close(fd)
    outcome.log_path = log_path
    keep_log = False  # kept only when something went wrong on Ray's side
    written: set[tuple[str, str, str]] = set()

    def write(record: dict[str, Any], failure: str | None) -> None:
        store.append(record)
        written.add(record_key(record))
        if record.get("error") is None:
            outcome.answered += 1
        else:
            outcome.failed += 1
        if failure:
            outcome.failures.append(failure)
        if on_record is not None:
            on_record(record)

    ray = None
    started = False
    try:
        with (
            _terminal_kept_for_us(log_path, console) if log_path else _null(),
            _progress(console, quiet, redirect=verbose) as progress,
        ):
            workers = f"{options.workers} worker{'s' if options.workers != 1 else ''}"
            where = f"on {options.address}" if options.address else "on this machine"
            task = progress.add_task(
                escape(f"starting Ray, {workers} {where}"),
                total=len(expected),
                failed=0,
                since=time.monotonic(),
            )
            try:
                ray, started = _start_ray(options, verbose)
            except RayRunError as exc:
                if log_path is None:
                    raise
                raise RayRunError(exc.message, hint=f"{exc.hint} Ray's messages: {log_path}") from exc
            try:
                resources = plan_resources(options, job.device, ray.cluster_resources())
                threads = None
                if started and options.address is None and not resources["worker_gpus"]:
                    # CPU workers on this machine share its cores instead of each using all of them
                    cores = options.num_cpus or os.cpu_count() or 1
                    threads = max(1, cores // options.workers)
                dataset = build_dataset(ray, table, job, options, resources, threads)
                progress.update(task, description=escape(f"loading the model in {workers}"))
                for row in dataset.iter_rows():
                    if row["kind"] == "fatal":
                        raise _fatal_error(row["data"])
                    record = json.loads(row["data"])
                    key = record_key(record)
                    if key in written or key not in expected:
                        continue  # a retried task's second copy: never written twice
                    write(record, row["failure"] or None)
                    label = batchio.path_text(Path(record["video"]["path"]).name)
                    progress.update(task, advance=1, failed=outcome.failed, description=escape(label))
                    if stop():
                        outcome.stopped = True
                        break
            except HolitomError:
                raise
            except Exception as exc:
                summary = " ".join(str(exc).split())[:300]
                raise RayRunError(
                    f"the Ray run failed: {type(exc).__name__}: {summary}",
                    hint="Answered items are kept: run the same command again to continue. Ray's messages: "
                    f"{log_path}",
                ) from exc
            if not outcome.stopped:
                # Ray Data dropped these (their worker died on every attempt): error lines, retried next run.
                lost = [item for key, item in expected.items() if key not in written]
                if lost:
                    keep_log = True
                    message = lost_message(log_path)
                    from holitom_cli.cli.batch import error_record

                    for i, item in enumerate(lost):
                        label = batchio.path_text(item.video.name)
                        first = i == 0 or lost[i - 1].video != item.video
                        write(error_record(job, item, message), f"{label}: {message}" if first else None)
                        progress.update(task, advance=1, failed=outcome.failed)
            if started:
                _shutdown(ray)
                started = False
    except RayRunError:
        keep_log = True
        raise
    except (HolitomError, KeyboardInterrupt):  # the user's to fix (the model, the settings) or to decide
        raise
    except BaseException:
        keep_log = True
        raise
    finally:
        if started:  # an error above: stop the private instance without printing Ray's farewell messages
            with _terminal_kept_for_us(log_path, console) if log_path else _null():
                _shutdown(ray)
        if log_path is not None:
            try:
                empty = os.path.getsize(log_path) == 0
            except OSError:
                empty = True
            if empty or not keep_log:
                with suppress(OSError):
                    os.unlink(log_path)
                outcome.log_path = None
    return outcome


def _shutdown(ray: Any) -> None:
    with suppress(Exception):  # a broken instance: nothing more to do
        ray.shutdown()


@contextmanager
def _null() -> Iterator[None]:
    yield


__all__ = [
    "MAX_TASK_RETRIES",
    "PipelineWorker",
    "RayOutcome",
    "RayRunError",
    "build_dataset",
    "decode_row",
    "plan_resources",
    "run_on_ray",
]
