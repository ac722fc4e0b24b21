"""Issue 9 (new-user walkthrough), command-line side: -q means --question, --repeats, --top-p/--seed, the
report names the preset and the inner layer, spinners only in the interactive report, the download hint,
and the context check before any video work."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from holitom_cli.cli import records, report
from holitom_cli.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
FRAMES, NEW = 4, 4
QUESTION = "What does the red circle do?"
runner = CliRunner()


@pytest.fixture(scope="module")
def video(make_video):
    return make_video(frames=16, size=(96, 64), fps=8.0, pattern="moving")


def ask(model_dir, *args):
    base = [
        "ask",
        *map(str, args),
        "-m",
        str(model_dir),
        "--frames",
        str(FRAMES),
        "--max-new-tokens",
        str(NEW),
    ]
    return runner.invoke(app, base)


def _json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Loading")]
    assert lines[0].startswith("Error: ") and needle in lines[0], result.stderr
    assert lines[1].startswith("Hint: ") and len(lines) == 2, result.stderr
    assert result.stdout == ""


# ------------------------------------------------------------------------------------------- finding 1


def test_dash_q_is_the_question_in_ask(tiny_model_dir, video):
    positional = _json(ask(tiny_model_dir, video, QUESTION, "--json"))
    with_q = _json(ask(tiny_model_dir, video, "-q", QUESTION, "--json"))
    assert with_q["question"] == QUESTION and with_q["answer"] == positional["answer"]
    shown = ask(tiny_model_dir, video, "-q", QUESTION)  # -q is not --quiet: the report is there
    assert shown.exit_code == 0, shown.stderr
    assert "Visual tokens" in shown.stderr and shown.stdout == positional["answer"] + "\n"


@pytest.mark.parametrize(
    "args",
    [
        ["v.mp4", QUESTION, "-q", "another question"],  # both forms
        ["v.mp4", "--frames", "2"],  # neither
        ["v.mp4", "--question", QUESTION, "-q"],  # -q needs its text
    ],
)
def test_ask_question_usage_errors_exit_2(args):
    result = runner.invoke(app, ["ask", *args])
    assert result.exit_code == 2, result.output


def test_quiet_has_no_short_form(tiny_model_dir, video, tmp_path):
    res = runner.invoke(app, ["inspect", str(video), "-o", str(tmp_path / "m.png"), "-q"])
    assert res.exit_code == 2 and "No such option" in res.output  # inspect has no question: -q is unknown
    for command in ("ask", "inspect", "batch"):
        help_text = runner.invoke(app, [command, "--help"]).stdout
        assert "--quiet" in help_text
        assert "-q " not in help_text.split("--quiet")[0].splitlines()[-1]  # not "-q" on the --quiet line
    assert "--question" in runner.invoke(app, ["ask", "--help"]).stdout


# ------------------------------------------------------------------------------------------- finding 4


def test_seed_and_top_p_reach_the_json_and_make_sampling_reproducible(tiny_model_dir, video):
    args = (video, QUESTION, "--json", "--temperature", "1.5", "--top-p", "0.9", "--seed", "11")
    first, second = _json(ask(tiny_model_dir, *args)), _json(ask(tiny_model_dir, *args))
    assert first["generation"] == {"max_new_tokens": NEW, "temperature": 1.5, "top_p": 0.9, "seed": 11}
    assert first["answer"] == second["answer"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--temperature", "1", "--top-p", "1.5"], "top_p must be a number in (0, 1]"),
        (["--temperature", "1", "--top-p", "0"], "top_p must be a number in (0, 1]"),
        (["--temperature", "1", "--seed", "-3"], "seed must be an integer >= 0"),
        (["--top-p", "0.9"], "--top-p only apply when sampling"),
        (["--seed", "5"], "--seed only apply when sampling"),
    ],
)
def test_bad_sampling_options_are_one_line_errors(tmp_path, video, extra, needle):
    # the model folder does not exist: these errors must come before it is loaded
    result = runner.invoke(app, ["ask", str(video), QUESTION, "-m", str(tmp_path / "none"), *extra])
    _one_line_error(result, needle)


# ------------------------------------------------------------------------------------------- finding 5


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        ([], "preset balanced · retain 20%, tau 0.80 · inner merge at layer 4 of 6, 50%"),
        (["-p", "fast"], "preset fast · retain 15%, tau 0.80 · inner merge at layer 4 of 6, 50%"),
        (
            ["--tau", "0.7"],
            "preset custom (from balanced) · retain 20%, tau 0.70 · inner merge at layer 4 of 6",
        ),
        (["-p", "fastest", "--inner-layer", "2"], "preset custom (from fastest) · retain 10%, tau 0.65 · "),
        (["--no-inner"], "preset custom (from balanced) · retain 20%, tau 0.80 · inner merge off"),
        (["--no-compress"], "no compression"),
    ],
)
def test_report_names_the_preset_and_the_inner_layer(tiny_model_dir, video, extra, line):
    result = ask(tiny_model_dir, video, QUESTION, *extra)
    assert result.exit_code == 0, result.stderr
    header = next(x for x in result.stderr.splitlines() if x.startswith("holitom ·"))
    assert line in header
    # the report is rendered from the same record as the JSON
    record = _json(ask(tiny_model_dir, video, QUESTION, "--json", *extra))
    assert header.endswith(report.settings_line(record))


def test_json_names_the_preset(tiny_model_dir, video):
    assert _json(ask(tiny_model_dir, video, QUESTION, "--json"))["preset"] == {
        "name": "balanced",
        "custom": False,
    }
    custom = _json(ask(tiny_model_dir, video, QUESTION, "--json", "-p", "fast", "--tau", "0.9"))
    assert custom["preset"] == {"name": "fast", "custom": True}
    assert _json(ask(tiny_model_dir, video, QUESTION, "--json", "--no-compress"))["preset"] is None
    assert _json(ask(tiny_model_dir, video, QUESTION, "--json"))["inner"]["num_layers"] == 6


def test_verbose_shows_the_inner_layer_used(tiny_model_dir, video):
    result = ask(tiny_model_dir, video, QUESTION, "-v")
    assert result.exit_code == 0, result.stderr
    row = next(x for x in result.stderr.splitlines() if x.strip().startswith("inner_layer"))
    assert "4 of 6 (automatic)" in row and "None" not in row


def test_merge_map_captions_name_the_preset_and_the_layer():
    import dataclasses

    from holitom_cli.cli.inspect_cmd import merge_map_caption
    from holitom_cli.compression import get_preset

    plain = merge_map_caption(Path("a.mp4"), "m", None, get_preset("balanced"), 0.1, 28)
    assert "preset balanced (retain 20%, tau 0.80, inner merge at layer 18 of 28, 50%)" in plain
    changed = merge_map_caption(
        Path("a.mp4"), "m", "fast", dataclasses.replace(get_preset("fast"), tau=0.7), 0.1, 28
    )
    assert "preset custom (from fast) (retain 15%, tau 0.70," in changed


def test_explain_caption_names_the_preset(tiny_model_dir, video, tmp_path, monkeypatch):
    import holitom_cli.render as render

    captions = []
    real = render.save_merge_map
    monkeypatch.setattr(
        render, "save_merge_map", lambda *a, **k: captions.append(k["caption"]) or real(*a, **k)
    )
    result = ask(tiny_model_dir, video, QUESTION, "--tau", "0.7", "--explain", tmp_path / "m.png", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert (
        "preset custom (from balanced) · retain 20%, tau 0.70 · inner merge at layer 4 of 6, 50%"
        in captions[0]
    )


def test_preset_record_from_settings():
    from holitom_cli.compression import get_preset

    balanced = get_preset("balanced").to_dict()
    assert records.preset_record(None, balanced) == {"name": "balanced", "custom": False}
    assert records.preset_record(None, get_preset("fast").to_dict()) == {"name": "fast", "custom": False}
    assert records.preset_record("accurate", balanced) == {"name": "accurate", "custom": True}
    assert records.preset_record(None, {**balanced, "beta": 0.5}) == {"name": "balanced", "custom": True}
    assert records.preset_record("fast", None) is None


# ------------------------------------------------------------------------------------------- finding 3


def test_compare_baseline_repeats_in_the_json_and_the_table(tiny_model_dir, video):
    record = _json(ask(tiny_model_dir, video, QUESTION, "--json", "--compare-baseline", "--repeats", "2"))
    up = record["speedup"]
    assert up["repeats"] == 2
    assert [len(up["runs"][side]) for side in ("baseline", "holitom")] == [2, 2]
    assert up["runs"]["holitom"][0]["ttft_s"] == record["timings"]["ttft_s"]  # the first run is the record's
    assert up["runs"]["baseline"][0]["ttft_s"] == record["baseline"]["timings"]["ttft_s"]
    for key in ("ttft", "prefill"):
        low, high = up["spread"][key]
        assert low <= up[key] <= high
    # the table is rendered from the record: medians of the runs, speed-up with its min-max spread
    out = Console(file=io.StringIO(), width=200)
    report.print_comparison(record, out)
    table = out.file.getvalue()
    assert "median of 2 interleaved runs" in table
    ttft_row = next(x for x in table.splitlines() if "time to first token" in x)
    low, high = up["spread"]["ttft"]
    assert f"{up['ttft']:.2f}x ({low:.2f}-{high:.2f}x)" in ttft_row
    runs = up["runs"]
    median_ttft = sorted(r["ttft_s"] for r in runs["holitom"])
    assert report._fmt_s(sum(median_ttft) / 2) in ttft_row  # median of two runs
    shown = ask(tiny_model_dir, video, QUESTION, "--compare-baseline", "--repeats", "2")
    assert re.search(r"time to first token .*x \(\d+\.\d\d-\d+\.\d\dx\)", shown.stderr), shown.stderr


def test_repeats_must_be_at_least_one(video):
    result = runner.invoke(app, ["ask", str(video), QUESTION, "--compare-baseline", "--repeats", "0"])
    assert result.exit_code == 2


# ------------------------------------------------------------------------------------------- finding 6


_RealSpinner = report.Spinner


class _Recorder:
    made: list[tuple[str, bool]] = []

    def __init__(self, console, text, enabled=True):
        _Recorder.made.append((text, enabled))
        self._real = _RealSpinner(console, text, enabled)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        self._real.__enter__()
        return self

    def __exit__(self, *exc):
        self._real.__exit__(*exc)


@pytest.mark.parametrize(("extra", "enabled"), [([], True), (["--json"], False), (["--quiet"], False)])
def test_prefill_spinner_only_in_the_interactive_report(tiny_model_dir, video, monkeypatch, extra, enabled):
    monkeypatch.setattr(report, "Spinner", _Recorder)
    _Recorder.made = []
    result = ask(tiny_model_dir, video, QUESTION, *extra)
    assert result.exit_code == 0, result.stderr
    assert _Recorder.made == [("Prefilling ...", enabled)]


def test_spinner_stops_at_the_first_token_and_leaves_stdout_alone():
    terminal = Console(file=io.StringIO(), force_terminal=True, width=80)
    pieces: list[str] = []
    stdout = sys.stdout
    with report.Spinner(terminal, "Prefilling ...") as spinner:
        assert spinner.active and sys.stdout is stdout  # stdout (where the answer goes) is not redirected
        write = spinner.until_first(pieces.append)
        write("Hello")
        assert not spinner.active
        write(" world")
    assert pieces == ["Hello", " world"]
    assert "Prefilling" in terminal.file.getvalue()
    not_a_terminal = Console(file=io.StringIO(), force_terminal=False)
    with report.Spinner(not_a_terminal, "Prefilling ...") as spinner:
        assert not spinner.active
    assert not_a_terminal.file.getvalue() == ""
    with report.Spinner(terminal, "x", enabled=False) as spinner:
        assert not spinner.active


def test_frame_counter_never_shows_an_unknown_total():
    from rich.progress import Progress

    with Progress(console=Console(file=io.StringIO())) as progress:
        task = progress.add_task("Reading", total=None)
        column = report._FramesColumn()
        assert column.render(progress.tasks[0]).plain == ""  # not "0/?"
        progress.update(task, total=8, completed=0)
        assert column.render(progress.tasks[0]).plain == "0/8"


def test_progress_reads_then_encodes_frames_n_of_t():
    class FakePipe:
        def prepare_video(self, video, sampling, on_progress=None):
            for done in range(5) if on_progress is not None else ():
                on_progress(done, 4)
            return "prepared"

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    assert report.prepare_with_progress(FakePipe(), Path("clip.mp4"), None, console) == "prepared"
    out = console.file.getvalue()  # first and last renders: decoding, then the vision tower's count
    assert "Reading clip.mp4" in out and "Encoding frames" in out and "4/4" in out
    assert "0/?" not in out
    silent = report.prepare_with_progress(FakePipe(), Path("clip.mp4"), None, None)
    assert silent == "prepared"


# ------------------------------------------------------------------------------------------- finding 7


def test_download_offline_hint_says_what_to_do(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "holitom_cli", "download", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    hint = next(line for line in proc.stderr.splitlines() if line.startswith("Hint: "))
    assert "HF_HUB_OFFLINE=0" in hint and "--model" in hint
    assert "download it first" not in proc.stderr  # the old, circular advice


def test_download_without_network_hint(monkeypatch):
    from huggingface_hub import constants, errors

    from holitom_cli.cli.commands import offline_download_error
    from holitom_cli.errors import ModelError

    cause = errors.LocalEntryNotFoundError("no connection")
    exc = ModelError("x is not in the local cache")
    exc.__cause__ = cause
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    err = offline_download_error("owner/name", exc)
    assert "cannot be reached" in err.message and "internet connection" in err.hint and "--model" in err.hint
    assert "holitom download" not in err.hint
    other = ModelError("gated")
    assert offline_download_error("owner/name", other) is None


# ------------------------------------------------------------------------------------------- finding 9


def test_question_that_cannot_fit_fails_before_the_video_work(tiny_model_dir, video, monkeypatch):
    import holitom_cli.pipeline as pipeline

    monkeypatch.setattr(pipeline, "context_length", lambda model: 16)

    def no_video(*args, **kwargs):
        raise AssertionError("the video must not be decoded when the question cannot fit")

    monkeypatch.setattr(pipeline.Pipeline, "prepare_video", no_video)
    result = ask(tiny_model_dir, video, QUESTION)
    _one_line_error(result, "more than the model's context of 16 tokens")
    assert "--max-new-tokens" in result.stderr


def test_video_that_cannot_fit_is_a_clean_error(tiny_model_dir, video, monkeypatch):
    import holitom_cli.pipeline as pipeline

    record = _json(ask(tiny_model_dir, video, QUESTION, "--json", "--no-compress"))
    context = record["prompt_tokens"] + NEW - 1  # the question fits, the uncompressed video does not
    monkeypatch.setattr(pipeline, "context_length", lambda model: context)
    result = ask(tiny_model_dir, video, QUESTION, "--no-compress")
    _one_line_error(result, f"more than the model's context of {context:,} tokens")
    assert f"({record['tokens']['into_llm']:,} of them visual)" in result.stderr
    compressed = ask(tiny_model_dir, video, QUESTION, "--json")  # HoliTom's shorter prompt fits
    assert compressed.exit_code == 0, compressed.stderr
