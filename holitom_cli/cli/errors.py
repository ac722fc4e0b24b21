"""One place that turns exceptions into what the user sees: ``Error: ...`` plus a hint on stderr.

* :class:`~holitom_cli.errors.HolitomError` (a failure the user can fix): message and hint, exit code 1.
* ``KeyboardInterrupt``: ``Interrupted.``, exit code 130.
* ``BrokenPipeError`` (the reader of stdout went away, e.g. ``holitom ask ... | head -c1``): nothing is
  printed, exit code 141 (128 + SIGPIPE, what a shell reports for a process killed by the broken pipe, so
  ``set -o pipefail`` scripts still see a failure); stdout is pointed at ``os.devnull`` so that Python's
  final flush cannot print "Exception ignored ... BrokenPipeError".
* anything else is a bug: a one-line summary asking for a report, exit code 1.

Set ``HOLITOM_DEBUG=1`` to also print the traceback. Usage errors (unknown option, bad value type) are left
to Typer, which prints its usage message and exits with code 2.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from holitom_cli.errors import HolitomError

DEBUG_ENV = "HOLITOM_DEBUG"
BUG_HINT = f"This looks like a bug in holitom: rerun with {DEBUG_ENV}=1 for the traceback and report it."


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


BROKEN_PIPE_EXIT = 141


def one_line(text: object) -> str:
    """``text`` on one line, printable on any terminal: whitespace runs become one space, control characters
    and undecodable bytes of file names (surrogate escapes) are shown escaped (``\\x1b``, ``\\xff``)."""
    return "".join(_printable(c) for c in " ".join(str(text).split()))


def _printable(c: str) -> str:
    if c.isprintable():
        return c
    if "\udc80" <= c <= "\udcff":  # a byte that was not UTF-8 (os.fsdecode / argv surrogateescape)
        return f"\\x{ord(c) - 0xDC00:02x}"
    return c.encode("unicode_escape", errors="backslashreplace").decode("ascii")


def print_error(message: str, hint: str | None = None) -> None:
    """``Error: message`` on one line, then ``Hint: hint`` on the next (stderr)."""
    typer.secho("Error: ", fg="red", bold=True, err=True, nl=False)
    typer.echo(one_line(message), err=True)
    if hint:
        typer.secho("Hint: ", fg="yellow", err=True, nl=False)
        typer.echo(one_line(hint), err=True)


def silence_stdout() -> None:
    """Point stdout at ``os.devnull`` (after a broken pipe): later writes and the interpreter's final flush
    then succeed silently instead of printing "Exception ignored ... BrokenPipeError"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (tests capture stdout)
        pass


def exit_code_for(exc: BaseException) -> int:
    """Report ``exc`` on stderr and return the process exit code."""
    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, BrokenPipeError):  # e.g. `holitom ask ... | head -1`: the reader left, nothing to say
        silence_stdout()
        return BROKEN_PIPE_EXIT
    if isinstance(exc, KeyboardInterrupt):
        typer.echo("Interrupted.", err=True)
        return 130
    if isinstance(exc, HolitomError):
        print_error(exc.message, exc.hint)
        return 1
    if isinstance(exc, MemoryError):
        print_error("out of memory", "Use fewer frames (--frames), a smaller model, or --quantize 8bit.")
        return 1
    summary = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    print_error(f"unexpected failure ({summary})", BUG_HINT)
    return 1
