"""The small commands: ``presets``, ``models``, ``download`` and ``env``.

Heavy imports (torch, transformers, huggingface_hub, cv2) happen inside the command bodies.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer

from holitom_cli.cli.options import DEFAULT_MODEL, RevisionOpt

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _stdout_console():
    from rich.console import Console

    return Console(soft_wrap=False)


def preset_rows() -> list[dict[str, Any]]:
    """One dict per preset: its settings plus the paper's reference numbers (``PAPER_REFERENCE``:
    LLaVA-OneVision-7B at 32 frames, paper-formula prefill FLOPs and the reported accuracy)."""
    from holitom_cli.compression import PRESET_DESCRIPTIONS, PRESETS
    from holitom_cli.compression.reference import PAPER_REFERENCE as ref

    rows = []
    for name, cfg in PRESETS.items():
        numbers = ref.preset_numbers(cfg)
        rows.append(
            {
                "name": name,
                "description": PRESET_DESCRIPTIONS.get(name, ""),
                "config": cfg.to_dict(),
                "reference_model": f"{ref.model}, {ref.frames} frames",
                # the keys name the setting they were computed for (the paper's): LLaVA-OV-7B
                "ov7b_inner_layer": numbers["inner_layer"],
                "ov7b_tflops": numbers["tflops"],
                "ov7b_full_tflops": numbers["full_tflops"],
                "ov7b_flops_percent": numbers["flops_percent"],
                "paper_accuracy_percent": numbers["accuracy_percent"],
            }
        )
    return rows


def presets_command(as_json: JsonFlag = False) -> None:
    """Show the compression presets and what they cost.

    The numbers are the paper's reference setting, LLaVA-OneVision-7B at 32 frames: prefill FLOPs by the
    paper's formula (full model: 40.8 TFLOPs) and the paper's average accuracy over four benchmarks relative
    to the full model. For other models, measure with holitom ask --compare-baseline.
    """
    from holitom_cli.compression import DEFAULT_PRESET
    from holitom_cli.compression.reference import PAPER_REFERENCE

    rows = preset_rows()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    setting = f"{PAPER_REFERENCE.model}, {PAPER_REFERENCE.frames} frames"
    table = Table(title=f"HoliTom presets (the paper's numbers: {setting})", title_justify="left")
    for col, justify in [
        ("preset", "left"),
        ("retain", "right"),
        ("tau", "right"),
        ("inner merge", "left"),
        ("TFLOPs", "right"),
        ("of full", "right"),
        ("accuracy", "right"),
    ]:
        table.add_column(col, justify=justify)
    for row in rows:
        cfg = row["config"]
        inner = f"layer {row['ov7b_inner_layer']}, -{cfg['inner_prune_ratio']:.0%}" if cfg["inner"] else "off"
        acc = row["paper_accuracy_percent"]
        name = row["name"] + ("*" if row["name"] == DEFAULT_PRESET else "")
        table.add_row(
            name,
            f"{cfg['retain_ratio']:.0%}",
            f"{cfg['tau']:.2f}",
            inner,
            f"{row['ov7b_tflops']:.1f}",
            f"{row['ov7b_flops_percent']:.1f}%",
            f"{acc:.1f}%" if acc is not None else "-",
        )
    console = _stdout_console()
    console.print(table)
    for row in rows:
        console.print(f"  [bold]{row['name']}[/bold]: {row['description']}")
    console.print(
        f"* default. TFLOPs: the paper's prefill formula (full model: {rows[0]['ov7b_full_tflops']:.1f}). "
        "Accuracy: the paper's average over MVBench, EgoSchema, LongVideoBench and VideoMME relative to the "
        "full model. Other models: run holitom ask with --compare-baseline to measure."
    )


def models_command(as_json: JsonFlag = False) -> None:
    """List the supported model families (with their hub checkpoints) and the models in the local cache."""
    from holitom_cli.models import family_info, list_cached_models

    families = family_info()
    cached = list_cached_models()
    if as_json:
        payload = {
            "default": DEFAULT_MODEL,
            "families": [f["family"] for f in families],
            "family_details": families,
            "cached": [m.to_dict() for m in cached],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    console = _stdout_console()
    console.print(_families_table(families))
    console.print(f"Default model: {DEFAULT_MODEL}. Any local checkpoint folder of these families works too.")
    if not cached:
        console.print(
            f"No models in the local cache yet. Fetch the default with: holitom download {DEFAULT_MODEL}"
        )
        return
    console.print(_cached_table(cached))


def _families_table(families: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="Supported model families", title_justify="left")
    table.add_column("model_type")
    table.add_column("family")
    table.add_column("checkpoints")
    for info in families:
        table.add_row(info["family"], info["name"], "\n".join(info["checkpoints"]))
    return table


def _cached_table(cached: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title="Models in the local cache", title_justify="left")
    table.add_column("model")
    table.add_column("type")
    table.add_column("size", justify="right")
    table.add_column("usable")
    for entry in cached:
        table.add_row(
            entry.repo_id,
            entry.model_type or "?",
            _human_bytes(entry.size_bytes),
            "yes" if entry.supported else "no",
        )
    return table


def download_command(
    model: Annotated[str, typer.Argument(help="Hub id of the model to fetch, e.g. " + DEFAULT_MODEL)],
    revision: RevisionOpt = None,
) -> None:
    """Download a model into the local cache (with progress), so later runs work offline.

    Prints the local folder on stdout.
    """
    from holitom_cli.errors import ModelError
    from holitom_cli.models import download_model

    if Path(model).expanduser().is_dir():
        typer.echo(f"{model} is a local folder; nothing to download.", err=True)
        return
    try:
        path = download_model(model, revision=revision)
    except ModelError as exc:
        unreachable = offline_download_error(model, exc)
        if unreachable is None:
            raise
        raise unreachable from exc
    typer.echo(f"{model} is in the local cache.", err=True)
    typer.echo(str(path))


def offline_download_error(model: str, exc: Exception) -> Exception | None:
    """For ``download``, a hub that cannot be reached needs another hint than "download it first": say how
    to get online (or stop forcing offline mode), or how to use a checkpoint folder instead. None when
    ``exc`` is another kind of failure."""
    from huggingface_hub import constants, errors

    if not isinstance(exc.__cause__, errors.LocalEntryNotFoundError):
        return None
    from holitom_cli.errors import ModelError

    folder = "or copy a checkpoint folder to this machine and pass it to holitom ask --model PATH"
    if constants.HF_HUB_OFFLINE:
        return ModelError(
            f"cannot download {model}: HF_HUB_OFFLINE is set, which forbids contacting the hub",
            hint=f"run HF_HUB_OFFLINE=0 holitom download {model} (or unset HF_HUB_OFFLINE) with internet "
            f"access, {folder}",
        )
    return ModelError(
        f"cannot download {model}: the Hugging Face hub cannot be reached",
        hint="check the internet connection (and HTTPS_PROXY if you use a proxy), then run this command "
        f"again, {folder}",
    )


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions, devices and settings that matter for a bug report."""
    from holitom_cli import __version__

    info: dict[str, Any] = {
        "holitom": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for dist in (
        "torch",
        "transformers",
        "huggingface-hub",
        "tokenizers",
        "safetensors",
        "accelerate",
        "bitsandbytes",
        "opencv-python-headless",
        "opencv-python",
        "numpy",
        "pillow",
        "typer",
        "rich",
    ):
        version = _version(dist)
        if version is not None:
            info[dist] = version
    try:
        import psutil

        info["memory_total_bytes"] = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover - psutil is a dependency
        pass
    devices = ["cpu"]
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            devices += [
                f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())
            ]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append("mps")
    except ImportError:
        info["torch"] = "not installed"
    info["devices"] = devices
    from huggingface_hub import constants

    info["hf_cache"] = str(constants.HF_HUB_CACHE)
    info["hf_hub_offline"] = bool(constants.HF_HUB_OFFLINE)
    return info


def env_command(as_json: JsonFlag = False) -> None:
    """Show versions and devices (paste this into bug reports)."""
    info = environment()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in info.items():
        if key == "memory_total_bytes":
            value = _human_bytes(value)
        elif isinstance(value, list):
            value = ", ".join(value)
        table.add_row(key, str(value))
    _stdout_console().print(table)


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover
