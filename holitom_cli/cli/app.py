"""The ``holitom`` Typer application: registers every command and maps errors to exit codes.

Importing this module must stay cheap: command modules import torch, transformers and cv2 only inside their
command bodies, so ``holitom --help`` answers at once.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperCommand, TyperGroup

from holitom_cli import __version__
from holitom_cli.cli.errors import BROKEN_PIPE_EXIT, exit_code_for, silence_stdout


class _HolitomGroup(TyperGroup):
    """Runs a command and turns any exception into ``Error: ...`` plus a hint (see cli/errors.py)."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException, SystemExit):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            ctx.exit(exit_code_for(exc))


class _HolitomCommand(TyperCommand):
    """A command whose raw values pass the bounds of ``holitom_cli.limits`` before its body runs (questions,
    --max-new-tokens: see ``settings.check_command_inputs``), so an oversized input fails before any work."""

    def invoke(self, ctx):  # type: ignore[override]
        from holitom_cli.cli.settings import check_command_inputs

        check_command_inputs(ctx.params)
        return super().invoke(ctx)


app = typer.Typer(
    name="holitom",
    cls=_HolitomGroup,
    help="Ask questions about videos with video LLMs, made fast by HoliTom token merging.",
    epilog="Set HOLITOM_DEBUG=1 to see tracebacks. Docs: docs/cli.md",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"holitom {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Show the version and exit.", callback=_version_callback, is_eager=True
    ),
) -> None:
    """Ask questions about videos with video LLMs, made fast by HoliTom token merging."""


def _register() -> None:
    from holitom_cli.cli import ask, batch, cache_cmd, chat, commands, inspect_cmd

    app.command("ask", no_args_is_help=True, cls=_HolitomCommand)(ask.ask_command)
    app.command("chat", no_args_is_help=True, cls=_HolitomCommand)(chat.chat_command)
    app.command("batch", no_args_is_help=True, cls=_HolitomCommand)(batch.batch_command)
    app.command("inspect", no_args_is_help=True, cls=_HolitomCommand)(inspect_cmd.inspect_command)
    app.command("presets")(commands.presets_command)
    app.command("models")(commands.models_command)
    app.command("download", no_args_is_help=True)(commands.download_command)
    app.command("env")(commands.env_command)
    app.command("cache")(cache_cmd.cache_command)


_register()


def main() -> None:
    """Console-script entry point.

    A broken stdout pipe outside a command (``holitom --help | head -c1``) ends quietly with exit code 141,
    as it does inside one (cli/errors.py).
    """
    try:
        app()
    except BrokenPipeError:
        silence_stdout()
        sys.exit(BROKEN_PIPE_EXIT)
