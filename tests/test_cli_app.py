"""The command line without a model: help, version, small commands, settings, and error mapping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from holitom_cli import __version__
from holitom_cli.cli.app import app
from holitom_cli.cli.settings import build_config, sampling_options
from holitom_cli.compression import HoliTomConfig
from holitom_cli.errors import ConfigError
from holitom_cli.pipeline import SamplingOptions

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _run(args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def _assert_user_error(result, needle: str, code: int = 1) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("Loading ")]
    assert lines[0].startswith("Error: ") and needle in lines[0], result.stderr
    assert any(line.startswith("Hint: ") for line in lines[1:]), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# ------------------------------------------------------------------------------------------- help, version


@pytest.mark.parametrize("args", [["--help"], ["ask", "--help"], ["batch", "--help"], ["presets", "--help"]])
def test_help_does_not_import_heavy_modules(args):
    code = (
        "import sys\n"
        "from holitom_cli.cli.app import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'cv2') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, check=True
    )
    assert "Usage" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY="


def test_version_and_module_entry_point():
    result = _run(["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"holitom {__version__}"
    proc = subprocess.run(
        [sys.executable, "-m", "holitom_cli", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"holitom {__version__}"


def test_help_lists_every_command_and_option_panels():
    result = _run(["--help"])
    assert result.exit_code == 0
    for name in ("ask", "batch", "inspect", "presets", "models", "download", "env"):
        assert name in result.stdout
    ask_help = _run(["ask", "--help"]).stdout
    for panel in ("Model", "Compression", "Frames", "Generation", "Output"):
        assert f"─ {panel} " in ask_help
    for option in (
        "--model",
        "--preset",
        "--frames",
        "--fps",
        "--max-new-tokens",
        "--json",
        "--compare-baseline",
    ):
        assert option in ask_help


# ------------------------------------------------------------------------------------------- small commands


def test_presets_json_matches_the_paper_formula():
    result = _run(["presets", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"fastest", "fast", "balanced", "accurate"}
    # Independent check of the paper's numbers (spec section 8): Qwen2-7B, 32 frames x 196 tokens.
    d, m, layers = 3584, 18944, 28

    def f(n):
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m

    assert rows["fastest"]["ov7b_full_tflops"] == pytest.approx(layers * f(6272) / 1e12, abs=0.01)
    n = 32 * 20  # ceil(196 * 0.10) = 20 tokens per frame
    expected = (18 * f(n) + 10 * f(round(n * 0.5))) / 1e12
    assert rows["fastest"]["ov7b_tflops"] == pytest.approx(expected, abs=0.01)
    assert round(rows["fastest"]["ov7b_tflops"], 1) == 2.8  # the paper's table
    assert rows["fastest"]["ov7b_flops_percent"] == pytest.approx(6.9, abs=0.05)
    assert rows["fastest"]["paper_accuracy_percent"] == 99.1
    table = _run(["presets"])
    assert table.exit_code == 0 and "balanced*" in table.stdout and "2.8" in table.stdout


def test_env_reports_versions():
    result = _run(["env", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["holitom"] == __version__
    assert info["python"] == sys.version.split()[0]
    import torch

    assert info["torch"] == torch.__version__
    assert "cpu" in info["devices"]
    assert _run(["env"]).exit_code == 0


def test_models_lists_families_and_an_empty_cache(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "holitom_cli", "models", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert "llava_onevision" in data["families"] and data["cached"] == []
    assert "Supported model families" in _run(["models"]).stdout


def _fake_cache(hub: Path, repo: str, model_type: str) -> None:
    """A minimal Hugging Face cache entry: refs/main -> snapshot whose config.json links to a blob."""
    base = hub / ("models--" + repo.replace("/", "--"))
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "snapshots" / "abc123").mkdir(parents=True)
    (base / "blobs" / "e1").write_text(json.dumps({"model_type": model_type}))
    (base / "snapshots" / "abc123" / "config.json").symlink_to("../../blobs/e1")
    (base / "refs" / "main").write_text("abc123")


def test_models_lists_the_cached_models(tmp_path):
    hub = tmp_path / "hub"
    _fake_cache(hub, "acme/tiny-ov", "llava_onevision")
    _fake_cache(hub, "acme/bert", "bert")
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "holitom_cli", "models"]
    data = json.loads(
        subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, cwd=ROOT).stdout
    )
    assert {(m["repo_id"], m["supported"]) for m in data["cached"]} == {
        ("acme/tiny-ov", True),
        ("acme/bert", False),
    }
    table = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT).stdout
    assert "Models in the local cache" in table and "acme/tiny-ov" in table and "acme/bert" in table


def test_ask_offline_with_an_uncached_hub_model_is_a_clean_error(tmp_path, sample_video):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "h"), "HF_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "holitom_cli", "ask", str(sample_video), "q", "--offline", "--frames", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 1, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "not in the local cache" in error[0], proc.stderr
    assert "Hint: " in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_download_offline_without_cache_is_a_clean_error(tmp_path):
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
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: ") and "Hint: " in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_download_of_a_local_folder_does_nothing(tmp_path):
    result = _run(["download", tmp_path])
    assert result.exit_code == 0 and "nothing to download" in result.stderr


# ------------------------------------------------------------------------------------------- settings


def test_build_config_default_is_the_balanced_preset():
    assert build_config() == HoliTomConfig(retain_ratio=0.20, tau=0.80, inner=True, inner_prune_ratio=0.5)
    assert build_config("fastest") == HoliTomConfig(retain_ratio=0.10, tau=0.65)


def test_build_config_overrides():
    cfg = build_config("fast", retain_ratio=0.3, tau=0.9, inner_layer=3, inner_prune_ratio=0.25)
    assert cfg == HoliTomConfig(retain_ratio=0.3, tau=0.9, inner=True, inner_layer=3, inner_prune_ratio=0.25)
    assert build_config(no_inner=True) == HoliTomConfig(retain_ratio=0.20, tau=0.80, inner=False)
    assert build_config(no_compress=True) is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"no_compress": True, "preset": "fast"}, "--no-compress cannot be combined with --preset"),
        ({"no_compress": True, "no_inner": True}, "--no-inner"),
        ({"no_inner": True, "inner_layer": 3}, "--no-inner cannot be combined with --inner-layer"),
        ({"preset": "nope"}, "unknown preset"),
        ({"retain_ratio": 1.5}, "retain.ratio"),  # the field or its option, --retain-ratio
        ({"inner_prune_ratio": 1.0}, "inner.prune.ratio"),
    ],
)
def test_build_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        build_config(**kwargs)
    assert info.value.hint


def test_sampling_options():
    assert sampling_options() == SamplingOptions(frames=32, fps=None, max_frames=None)
    assert sampling_options(frames=8) == SamplingOptions(frames=8)
    assert sampling_options(fps=2.0, max_frames=16) == SamplingOptions(frames=None, fps=2.0, max_frames=16)
    for kwargs, needle in [
        ({"frames": 8, "fps": 1.0}, "cannot be used together"),
        ({"max_frames": 4}, "only applies together with --fps"),
        ({"fps": 0.0}, "positive"),
        ({"fps": float("nan")}, "positive"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            sampling_options(**kwargs)


# ------------------------------------------------------------------------------------------- errors


def test_errors_before_the_model_loads(tmp_path, sample_video, monkeypatch):
    from holitom_cli.pipeline import Pipeline

    def never(*a, **k):
        raise AssertionError("the model must not load when the options are wrong")

    monkeypatch.setattr(Pipeline, "load", classmethod(never))
    _assert_user_error(_run(["ask", tmp_path / "missing.mp4", "q"]), "video not found")
    _assert_user_error(_run(["ask", tmp_path, "q"]), "is a folder")
    _assert_user_error(_run(["ask", sample_video, "q", "--frames", 8, "--fps", 1]), "cannot be used together")
    _assert_user_error(_run(["ask", sample_video, "q", "-p", "nope"]), "unknown preset")
    _assert_user_error(_run(["ask", sample_video, "q", "--retain-ratio", 2]), "retain")
    _assert_user_error(_run(["ask", sample_video, "q", "--no-compress", "--tau", 0.5]), "--no-compress")
    _assert_user_error(
        _run(["ask", sample_video, "q", "--no-compress", "--compare-baseline"]), "needs compression"
    )
    _assert_user_error(_run(["ask", sample_video, "q", "--explain", tmp_path / "map.jpg"]), "merge map")
    _assert_user_error(_run(["ask", sample_video, "q", "-v", "--quiet"]), "--verbose and --quiet")
    _assert_user_error(_run(["ask", sample_video, "   "]), "question is empty")
    _assert_user_error(
        _run(["batch", sample_video, "-q", "x", "-o", tmp_path / "no" / "o.jsonl"]), "does not exist"
    )
    _assert_user_error(_run(["batch", sample_video, "-q", "x", "-o", "/proc/holitom.jsonl"]), "cannot write")
    _assert_user_error(_run(["batch", sample_video, "-o", tmp_path / "o.jsonl"]), "no question")
    _assert_user_error(
        _run(["batch", tmp_path / "none", "-q", "x", "-o", tmp_path / "o.jsonl"]), "input not found"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_user_error(_run(["batch", empty, "-q", "x", "-o", tmp_path / "o.jsonl"]), "no videos")


def test_unknown_or_unsupported_models_are_clean_errors(tmp_path, sample_video):
    _assert_user_error(_run(["ask", sample_video, "q", "-m", tmp_path / "no-such-model"]), "not found")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _assert_user_error(_run(["ask", sample_video, "q", "-m", other]), "unsupported model architecture")


@pytest.mark.parametrize(
    "args",
    [["ask", "v.mp4", "q", "--dtype", "int3"], ["ask", "v.mp4", "q", "--frames", "0"], ["ask", "v.mp4"]],
)
def test_usage_errors_exit_2(args):
    result = _run(args)
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr


def test_unexpected_failures_and_interrupts_are_mapped(sample_video, monkeypatch):
    from holitom_cli.pipeline import Pipeline

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(Pipeline, "load", classmethod(boom))
    result = _run(["ask", sample_video, "q"])
    assert result.exit_code == 1
    assert "\nError: unexpected failure (RuntimeError: kaboom)\n" in result.stderr
    assert "HOLITOM_DEBUG=1" in result.stderr and "Traceback" not in result.stderr
    monkeypatch.setenv("HOLITOM_DEBUG", "1")
    result = _run(["ask", sample_video, "q"])
    assert result.exit_code == 1 and "Traceback" in result.stderr and "kaboom" in result.stderr
    monkeypatch.delenv("HOLITOM_DEBUG")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "load", classmethod(interrupt))
    result = _run(["ask", sample_video, "q"])
    assert result.exit_code == 130 and "Interrupted." in result.stderr


def test_cli_docs_are_up_to_date():
    proc = subprocess.run(
        [sys.executable, "scripts/gen_cli_docs.py", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
