"""``holitom chat VIDEO``: ask question after question about one prepared video, at a prompt.

The model loads once and the video is prepared once (through the video cache); every line is then a
question (answered on stdout, a one-line report on stderr) or a command (``/help``). Questions are
independent of each other unless ``/history on``. On a terminal the prompt has line editing and a history
file (Python's ``readline``, when available); otherwise lines are read from stdin, so a session can be
scripted: ``printf 'What happens?\\n/quit\\n' | holitom chat v.mp4``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from holitom_cli.cli.common import check_video_path, load_pipeline
from holitom_cli.cli.options import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_REPEATS,
    CacheDirOpt,
    CacheSizeOpt,
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
    QuietOpt,
    RepeatsOpt,
    RetainRatioOpt,
    RevisionOpt,
    SeedOpt,
    TauOpt,
    TemperatureOpt,
    TopPOpt,
    VideoArg,
    generation_options,
)
from holitom_cli.cli.settings import build_config, check_question_text, sampling_options
from holitom_cli.errors import ConfigError

PROMPT = "> "
HISTORY_FILE = "chat_history"  # in the holitom cache folder (video_cache.default_cache_dir)
HISTORY_LINES = 1000
NO_COMPRESSION = ("none", "off")  # /preset none: the unmodified model

HELP = """Type a question about the video, or a command:
  /preset [NAME]      show the settings, or switch to a preset (fastest, fast, balanced, accurate, none)
  /compare [QUESTION] answer with and without compression side by side (the last question if none given)
  /explain FILE       save the merge map of the current settings (PNG, or GIF if FILE ends in .gif)
  /history on|off     pass the earlier questions and answers to the model (a conversation), or not
  /help               this text
  /quit               end the session (also Ctrl-D; Ctrl-C stops an answer, or ends at the prompt)"""


def chat_command(
    video: VideoArg,
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
    repeats: RepeatsOpt = DEFAULT_REPEATS,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    max_frames: MaxFramesOpt = None,
    max_new_tokens: MaxNewTokensOpt = DEFAULT_MAX_NEW_TOKENS,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    no_cache: NoCacheOpt = False,
    cache_size: CacheSizeOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Ask questions about one video at a prompt: the video is prepared once, each answer reuses it.

    Each line is a question (the answer streams to stdout, then a one-line report on stderr: tokens, time
    to first token, what was reused) or a command: /preset [NAME], /compare [QUESTION], /explain FILE,
    /history on|off, /help, /quit. Questions are answered independently of each other until /history on,
    which starts a conversation (the earlier questions and answers go into each prompt) until /history off.
    /preset none runs the unmodified model; /compare (with --repeats) is ask --compare-baseline for the last
    question, or the next one. Ctrl-C stops an answer; at the prompt, Ctrl-C or Ctrl-D ends the session
    (exit code 0). When stdin is not a terminal, lines are read from it, so a session can be scripted.

    Example: holitom chat assets/sample.mp4 -p fast
    """
    cfg = build_config(preset, retain_ratio, tau, inner_layer, inner_prune_ratio, no_inner, no_compress)
    sampling = sampling_options(frames, fps, max_frames)
    generation = generation_options(max_new_tokens, temperature, top_p, seed)
    check_video_path(video)

    from holitom_cli.cli.ask import cached_preparation, open_video_cache
    from holitom_cli.cli.report import prepare_with_progress, stderr_console

    console = stderr_console()
    show = not quiet
    cache = open_video_cache(console, quiet, no_cache, cache_size, cache_dir)
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
    prepared = prepare_with_progress(
        pipe, video, sampling, console if show else None, prepare=cached_preparation(pipe, cache)
    )
    session = ChatSession(pipe, prepared, video, console, cfg, preset, generation, repeats, show)
    try:  # from here on, Ctrl-C outside an answer or a command ends the session like /quit
        if show:
            console.print(
                f"Ready: {prepared.num_frames} frames of {video.name} · {session.settings_text()}. "
                "Type a question, /help for the commands, /quit to end.",
                markup=False,
                highlight=False,
            )
        session.run(line_reader(console))
    except KeyboardInterrupt:
        console.print()


def line_reader(console: Any) -> Callable[[], str | None]:
    """A function returning the next line (None at the end): with ``readline`` line editing and a history
    file when stdin is a terminal, else plain lines of stdin (scripts, tests). Ctrl-C while reading ends
    the session like the end of input."""
    if not sys.stdin.isatty():

        def read_stdin() -> str | None:
            try:
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                return None
            return line.rstrip("\r\n") if line else None

        return read_stdin

    _setup_readline()
    on_stdout = sys.stdout.isatty()

    def read_terminal() -> str | None:
        try:
            if on_stdout:
                return input(PROMPT)
            sys.stderr.write(PROMPT)  # stdout is redirected: keep it for the answers
            sys.stderr.flush()
            return input()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return None

    return read_terminal


def _setup_readline() -> None:
    """Line editing and a history file under the holitom cache folder; nothing if readline is missing."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input()
        return
    import atexit

    from holitom_cli.video_cache import default_cache_dir

    path = default_cache_dir() / HISTORY_FILE
    with contextlib.suppress(OSError, ValueError):
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


class ChatSession:
    """The state of one chat: the prepared video, the settings in effect, the conversation."""

    def __init__(self, pipe, prepared, video, console, cfg, preset, generation, repeats, show) -> None:
        self.pipe, self.prepared, self.video, self.console = pipe, prepared, video, console
        self.cfg, self.preset = cfg, preset
        self.generation, self.repeats, self.show = generation, repeats, show
        self.history_on = False
        self.turns: list[tuple[str, str]] = []  # (question, answer) since /history on
        self.last: tuple[str, tuple[tuple[str, str], ...]] | None = None  # last question and its history
        self.compare_next = False
        self.warmed = False  # /compare's warm-up ran

    # ------------------------------------------------------------------------------------------- loop

    def run(self, read: Callable[[], str | None]) -> None:
        """Read and handle lines until /quit or the end of input."""
        while True:
            line = read()
            if line is None:
                return
            if not self.handle(line.strip()):
                return

    def handle(self, line: str) -> bool:
        """One line: a command or a question. False when the session should end."""
        from holitom_cli.cli.errors import print_error
        from holitom_cli.errors import HolitomError

        if not line:
            self.say("Type a question about the video, or /help for the commands.")
            return True
        try:
            if line.startswith("/"):
                return self.command(line)
            self.question(line)
        except HolitomError as exc:
            print_error(exc.message, exc.hint)
        except KeyboardInterrupt:  # Ctrl-C during a command (e.g. /explain): back to the prompt
            self.say("(stopped)")
        return True

    def command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name in ("/help", "/?"):
            self.say(HELP)
        elif name == "/preset":
            self.set_preset(arg)
        elif name == "/compare":
            self.compare(arg)
        elif name == "/explain":
            self.explain(arg)
        elif name == "/history":
            self.set_history(arg)
        else:
            raise ConfigError(f"unknown command {name}", hint="Type /help for the commands.")
        return True

    def say(self, text: str) -> None:
        """A message of the session on stderr (even with --quiet: it answers a command)."""
        self.console.print(text, markup=False, highlight=False)

    # ------------------------------------------------------------------------------------------- commands

    def settings_text(self) -> str:
        from holitom_cli.cli.records import preset_record
        from holitom_cli.cli.report import settings_line

        if self.cfg is None:
            return "no compression"
        config = self.cfg.to_dict()
        layer = self.cfg.resolve_inner_layer(self.pipe.model.num_layers)
        inner = None
        if layer is not None:
            inner = {
                "layer": layer,
                "num_layers": self.pipe.model.num_layers,
                "prune_ratio": config["inner_prune_ratio"],
            }
        return settings_line({"config": config, "preset": preset_record(self.preset, config), "inner": inner})

    def set_preset(self, name: str) -> None:
        if not name:
            self.say(f"Settings: {self.settings_text()}")
            return
        from holitom_cli.compression import get_preset

        if name.lower() in NO_COMPRESSION:
            self.cfg, self.preset = None, None
        else:
            cfg = get_preset(name.lower())  # ConfigError listing the presets
            cfg.resolve_inner_layer(self.pipe.model.num_layers)
            self.cfg, self.preset = cfg, name.lower()
        self.say(f"Settings: {self.settings_text()}")

    def set_history(self, arg: str) -> None:
        value = arg.lower()
        if value in ("on", "off"):
            self.history_on = value == "on"
            self.turns = []
        elif value:
            raise ConfigError(f"/history takes on or off, not {arg!r}", hint="e.g. /history on")
        state = "on: earlier questions and answers are passed to the model" if self.history_on else "off"
        self.say(f"Conversation history {state}.")

    def explain(self, arg: str) -> None:
        if not arg:
            raise ConfigError("/explain needs a file name", hint="e.g. /explain merge-map.png")
        from holitom_cli.cli.inspect_cmd import merge_map_caption, save_unit_merge_map
        from holitom_cli.render import check_output_path

        path = Path(arg).expanduser()
        gif = path.suffix.lower() == ".gif"
        check_output_path(path, gif=gif, gif_flag=False)
        result = self.pipe.compress(self.prepared, self.cfg) if self.cfg is not None else None
        full, ours = self.pipe.paper_flops(self.prepared, self.cfg, result)
        model = self.pipe.model
        caption = merge_map_caption(
            self.video, model.name, self.preset, self.cfg, ours / full, model.num_layers
        )
        saved = save_unit_merge_map(path, self.prepared, result, caption, gif)
        self.say(f"Merge map written to {saved}")

    def compare(self, arg: str) -> None:
        if self.cfg is None:
            raise ConfigError(
                "/compare needs compression, but it is off", hint="Switch it on first, e.g. /preset balanced"
            )
        if arg:
            self.question(arg, compare=True)
        elif self.last is not None:
            question, history = self.last
            self._answer(question, history, compare=True, remember=False)
        else:
            self.compare_next = True
            self.say("The next question will be answered with and without compression.")

    # ------------------------------------------------------------------------------------------- questions

    def question(self, text: str, compare: bool = False) -> None:
        check_question_text(text)
        history = tuple(self.turns) if self.history_on else ()
        compare = (compare or self.compare_next) and self.cfg is not None  # /preset none since: no comparison
        self.compare_next = False
        self._answer(text, history, compare=compare, remember=True)

    def _answer(self, question: str, history: tuple, compare: bool, remember: bool) -> None:
        """Answer ``question`` (streamed), print its report line; Ctrl-C stops it and keeps the session."""
        from holitom_cli.cli.ask import compare_runs, failure_text, stdout_writer
        from holitom_cli.cli.errors import print_error
        from holitom_cli.cli.records import answer_record, ask_with
        from holitom_cli.cli.report import Spinner, compact_line, print_comparison
        from holitom_cli.errors import HolitomError

        self.pipe.check_question(question, self.generation)
        stream = stdout_writer()
        started = False

        def on_text(piece: str) -> None:
            nonlocal started
            started = True
            stream(piece)

        runs = None
        try:
            if compare:
                runs = compare_runs(
                    self.console, self.show, self.show, on_text, self.pipe, self.prepared, question, self.cfg,
                    self.generation, self.repeats, warm=not self.warmed, history=history,
                )  # fmt: skip
                self.warmed = True
                answer, baseline = runs.holitom[0], runs.baseline[0]
            else:
                with Spinner(self.console, "Prefilling ...", enabled=self.show) as spinner:
                    answer = ask_with(
                        self.pipe, self.prepared, question, self.cfg, self.generation,
                        spinner.until_first(on_text), history,
                    )  # fmt: skip
                stream("\n")
                baseline = None
        except KeyboardInterrupt:
            if started:
                stream("\n")
            self.say("(answer stopped)")
            return
        except HolitomError:
            if started:
                stream("\n")
            raise
        except BrokenPipeError:
            raise
        except Exception as exc:  # a bug in one answer: say so, keep the session
            if started:
                stream("\n")
            print_error(*failure_text(exc))
            return
        self.last = (question, history)
        if remember and self.history_on:
            self.turns.append((question, answer.text))
        record = answer_record(question, answer, self.prepared, baseline, preset=self.preset, runs=runs)
        if self.show:
            if baseline is not None:
                print_comparison(record, self.console)
            self.console.print(compact_line(record), markup=False, highlight=False)
