"""One place that turns exceptions into what the user sees: ``Error: ...`` plus a hint on stderr.

* :class:`~holitom_cli.errors.HolitomError` (a failure the user can fix): message and hint, exit code 1.
* ``KeyboardInterrupt``: ``Interrupted.``, exit code 130.
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


def print_error(message: str, hint: str | None = None) -> None:
    """``Error: message`` on one line, then ``Hint: hint`` on the next (stderr)."""
    first = " ".join(str(message).split())  # one line, whatever the message holds
    typer.secho("Error: ", fg="red", bold=True, err=True, nl=False)
    typer.echo(first, err=True)
    if hint:
        typer.secho("Hint: ", fg="yellow", err=True, nl=False)
        typer.echo(" ".join(str(hint).split()), err=True)


def exit_code_for(exc: BaseException) -> int:
    """Report ``exc`` on stderr and return the process exit code."""
    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, BrokenPipeError):  # e.g. `holitom ask ... | head -1`: the reader left, nothing to say
        return 141
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
