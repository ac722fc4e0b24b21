"""Ray is optional (issue 12): nothing imports it without --workers, and --workers without it is one line.

None of these tests needs Ray installed; the ones that run Ray are in tests/test_batch_ray.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from holitom_cli.cli.app import app
from holitom_cli.distributed import RAY_EXTRA, RayOptions, require_ray
from holitom_cli.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _no_ray(monkeypatch) -> None:
    """Make ``ray`` look uninstalled, whether or not it is."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "ray" else real(name, *a, **k))  # fmt: skip


def test_plain_batch_and_help_never_import_ray(tiny_model_dir, sample_video, tmp_path):
    out = tmp_path / "out.jsonl"
    code = (
        "import sys\n"
        "from holitom_cli.cli.app import app\n"
        "for args in (['--help'], ['batch', '--help'], sys.argv[1:]):\n"
        "    try:\n        app(args)\n"
        "    except SystemExit as e:\n        assert e.code == 0, (args, e.code)\n"
        "print('RAY=' + ','.join(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))\n"
    )
    args = ["batch", str(sample_video), "-q", "What?", "-o", str(out), "-m", str(tiny_model_dir),
            "--device", "cpu", "--frames", "2", "--max-new-tokens", "1", "--quiet"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "RAY="
    assert out.read_text().count("\n") == 1  # the batch really ran


def test_workers_without_ray_is_one_line_naming_the_extra(monkeypatch, sample_video, tmp_path):
    _no_ray(monkeypatch)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["batch", str(sample_video), "-q", "What?", "-o", str(out), "--workers", "2"])
    assert result.exit_code == 1
    assert result.stderr == f"Error: --workers needs Ray, which is not installed: {RAY_EXTRA}\n"
    assert not out.exists()  # refused before the output is opened


def test_require_ray_names_the_extra(monkeypatch):
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError, match=r'pip install "holitom\[ray\]"'):
        require_ray()


def test_ray_options_need_workers_and_valid_values(sample_video, tmp_path):
    out = tmp_path / "out.jsonl"
    base = ["batch", str(sample_video), "-q", "What?", "-o", str(out)]
    result = runner.invoke(app, [*base, "--ray-address", "auto"])
    assert result.exit_code == 1 and "need --workers" in result.stderr
    result = runner.invoke(app, [*base, "--gpus-per-worker", "0.5"])
    assert result.exit_code == 1 and "need --workers" in result.stderr
    assert runner.invoke(app, [*base, "--workers", "0"]).exit_code == 2  # Typer's range check
    assert runner.invoke(app, [*base, "--workers", "2", "--gpus-per-worker", "2"]).exit_code == 2
    if importlib.util.find_spec("ray") is not None:  # the device check comes after the Ray check
        result = runner.invoke(app, [*base, "--workers", "2", "--device", "cuda:1"])
        assert result.exit_code == 1 and "Ray gives each worker" in result.stderr
    assert not out.exists()
    with pytest.raises(ConfigError, match="at most 1"):
        RayOptions(workers=2, gpus_per_worker=2)
    with pytest.raises(ConfigError, match="integer >= 1"):
        RayOptions(workers=0)
    with pytest.raises(ConfigError, match="needs a GPU device"):
        RayOptions(workers=2, gpus_per_worker=0.5).check_device("cpu")
    with pytest.raises(ConfigError, match="Ray gives each worker"):
        RayOptions(workers=2).check_device("cuda:1")
    RayOptions(workers=2, gpus_per_worker=0.5).check_device("cuda")


def test_plan_resources():
    from holitom_cli.distributed.ray_batch import plan_resources

    # CPU only, this machine: two workers and one decoding task fit in 2 CPUs; no GPU asked.
    plan = plan_resources(RayOptions(workers=2), "cpu", {"CPU": 2.0})
    assert plan["worker_gpus"] == 0 and plan["worker_cpus"] * 2 + plan["decode_cpus"] <= 2.0
    # GPUs in the cluster: one per worker by default, fractions share one, too many is refused at once.
    assert plan_resources(RayOptions(workers=4), "auto", {"CPU": 32.0, "GPU": 4.0})["worker_gpus"] == 1.0
    shared = plan_resources(RayOptions(workers=4, gpus_per_worker=0.5), "cuda", {"CPU": 8.0, "GPU": 2.0})
    assert shared["worker_gpus"] == 0.5
    assert plan_resources(RayOptions(workers=2), "cpu", {"CPU": 8.0, "GPU": 2.0})["worker_gpus"] == 0.0
    with pytest.raises(ConfigError, match="has 2"):
        plan_resources(RayOptions(workers=3), "cuda", {"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(ConfigError, match="has 0"):
        plan_resources(RayOptions(workers=1, gpus_per_worker=1), "cuda", {"CPU": 8.0})


def test_an_unreachable_cluster_fails_at_once():
    import socket

    from holitom_cli.distributed.ray_batch import RayRunError, _probe

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RayRunError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        _probe(f"127.0.0.1:{port}")
    _probe("auto")  # left to Ray


def test_ray_output_goes_to_the_log_and_ours_to_the_terminal(tmp_path):
    """What Ray writes (C++ to the descriptors, Python to sys.stderr) lands in the log; the console keeps
    writing to the real stderr."""
    log = tmp_path / "ray.log"
    code = (
        "import os, sys\n"
        "from rich.console import Console\n"
        "from holitom_cli.distributed.ray_batch import _terminal_kept_for_us\n"
        "console = Console(stderr=True)\n"
        f"with _terminal_kept_for_us({str(log)!r}, console):\n"
        "    os.write(2, b'from C++\\n')\n"
        "    os.write(1, b'C++ stdout\\n')\n"
        "    print('python stderr', file=sys.stderr)\n"
        "    print('python stdout')\n"
        "    console.print('ours')\n"
        "console.print('ours again')\n"
        "print('after', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["ours", "ours again", "after"]
    assert proc.stdout == ""
    assert log.read_text().splitlines() == ["from C++", "C++ stdout", "python stderr", "python stdout"]
