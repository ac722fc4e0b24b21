"""``holitom cache [list|clear]``: what the video cache holds, its size, and emptying it (docs/cache.md).

Light: no torch, no model. ``clear`` removes only the cache's own entry files, in a folder marked as ours.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any, Literal

import typer

from holitom_cli.cli.options import CacheDirOpt, CacheSizeOpt

ActionArg = Annotated[
    Literal["list", "clear"],
    typer.Argument(help="list: the cached videos, their size and the folder; clear: remove them all."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
YesFlag = Annotated[bool, typer.Option("--yes", "-y", help="clear: do not ask for confirmation.")]


def cache_command(
    action: ActionArg = "list",
    as_json: JsonFlag = False,
    yes: YesFlag = False,
    cache_dir: CacheDirOpt = None,
    cache_size: CacheSizeOpt = None,
) -> None:
    """List the video cache (prepared videos: what the vision tower made), or clear it.

    Examples: holitom cache · holitom cache list --json · holitom cache clear --yes
    """
    from holitom_cli.errors import ConfigError
    from holitom_cli.video_cache import DEFAULT_MAX_BYTES, VideoCache, default_cache_dir, parse_size

    if cache_dir is not None and not cache_dir.strip():
        raise ConfigError("--cache-dir is empty", hint="give a folder, or drop the option")
    root = default_cache_dir() if cache_dir is None else _expand(cache_dir)
    cache = VideoCache(root, parse_size(cache_size) if cache_size is not None else DEFAULT_MAX_BYTES)
    cache.check_ours()  # a folder that is not ours is neither listed nor cleared
    if action == "clear":
        _clear(cache, yes, as_json)
        return
    entries = [_row(entry) for entry in cache.entries(manifests=True)]
    entries.reverse()  # most recently used first
    total = sum(row["size_bytes"] for row in entries)
    if as_json:
        payload = {"folder": str(cache.folder), "max_bytes": cache.max_bytes, "total_bytes": total}
        typer.echo(json.dumps({**payload, "entries": entries}, indent=2))
        return
    _print_list(cache, entries, total)


def _expand(text: str) -> Any:
    from pathlib import Path

    return Path(text).expanduser()


def _row(entry: Any) -> dict[str, Any]:
    manifest = entry.manifest or {}
    info = manifest.get("info") if isinstance(manifest.get("info"), dict) else {}
    key = manifest.get("key") if isinstance(manifest.get("key"), dict) else {}
    model = key.get("model") if isinstance(key.get("model"), dict) else {}
    return {
        "file": entry.path.name,
        "video": info.get("video_name"),
        "model": info.get("model_name") or model.get("name"),
        "dtype": model.get("dtype"),
        "frames": info.get("frames"),
        "sampling": key.get("sampling"),
        "size_bytes": entry.size,
        "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(entry.last_used)),
        "vision_s": info.get("vision_s"),
        "damaged": entry.manifest is None,
    }


def _print_list(cache: Any, entries: list[dict[str, Any]], total: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from holitom_cli.cli.errors import one_line
    from holitom_cli.video_cache import format_size

    console = Console(soft_wrap=False)
    summary = (
        f"{len(entries)} cached video(s), {format_size(total)} of {format_size(cache.max_bytes)} "
        f"in {escape(one_line(str(cache.folder)))}"
    )
    if not entries:
        console.print(summary, highlight=False)
        return
    table = Table(title="Video cache (most recently used first)", title_justify="left")
    for name, justify in (("video", "left"), ("model", "left"), ("frames", "right"), ("size", "right"),
                          ("last used", "left"), ("vision time saved", "right")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in entries:
        if row["damaged"]:
            table.add_row(f"(damaged: {row['file']})", "", "", format_size(row["size_bytes"]), "", "")
            continue
        saved = f"{row['vision_s']:.1f} s" if isinstance(row["vision_s"], int | float) else ""
        table.add_row(
            escape(one_line(str(row["video"]))), escape(one_line(str(row["model"]))), str(row["frames"]),
            format_size(row["size_bytes"]), row["last_used"].replace("T", " ")[:19], saved,
        )  # fmt: skip
    console.print(table)
    console.print(summary, highlight=False)


def _clear(cache: Any, yes: bool, as_json: bool) -> None:
    from holitom_cli.errors import ConfigError
    from holitom_cli.video_cache import format_size

    entries = cache.entries()
    size = sum(e.size for e in entries)
    if not yes and entries:
        if not sys.stdin.isatty():
            raise ConfigError(
                f"clearing the video cache ({len(entries)} video(s), {format_size(size)}) needs confirmation",
                hint="add --yes to clear it without asking",
            )
        typer.confirm(
            f"Remove {len(entries)} cached video(s), {format_size(size)}, from {cache.folder}?", abort=True
        )
    count, removed = cache.clear()
    if as_json:
        typer.echo(json.dumps({"folder": str(cache.folder), "removed": count, "removed_bytes": removed}))
        return
    typer.echo(f"Removed {count} cached video(s), {format_size(removed)}, from {cache.folder}.")
