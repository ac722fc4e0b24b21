"""Scaling: cost of the outer compression stage alone vs video length, against the LLM prefill it saves.

For T = 8 ... 512 frames, N = 196 tokens per frame and C = 896 (LLaVA-OV-0.5B) / 3584 (LLaVA-OV-7B):

- input: synthetic features with realistic temporal redundancy (``benchmarks.synthetic``: slowly drifting
  per-position vectors with per-position noise, a moving object, random scene cuts), in the model dtype;
- compression time: ``compress_video_tokens`` with one preset, median of ``--repeats`` after a warm-up, and
  the segmentation step (similarities + gain table + dynamic programme) timed on its own;
- compression memory: peak bytes allocated by torch during one extra call, above the inputs
  (``torch.profiler`` memory events; on CUDA ``torch.cuda.max_memory_allocated``), also as a multiple of
  the input's size; time also per frame (linear scaling = a constant ms per frame);
- LLM prefill: estimated from ONE decoder layer of the real Qwen2 shape timed at a few sequence lengths
  (``benchmarks.prefill_model``), times the number of layers; baseline = T*N + 1 + text tokens, HoliTom =
  the compressed count with the inner-LLM stage at the preset's layer K.

``python -m benchmarks.scaling [--frames 8 16 32 64 128 256 512] [--channels 896 3584] [--preset balanced]
[--no-prefill] [--threads 2]`` (``--no-prefill``: the compression alone, without timing decoder layers)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (
    DEFAULT_OUT,
    command_line,
    describe_machine,
    log,
    machine_info,
    md_table,
    median,
    publish,
    synchronize,
    timed,
    torch_peak_alloc_bytes,
    write_outputs,
)
from benchmarks.prefill_model import LayerCurve, measure_layer_curve
from benchmarks.synthetic import synthetic_features

TOKENS = 196
TEXT_TOKENS = 40
SHAPE_OF_CHANNELS = {896: "0.5b", 3584: "7b"}
#: Sequence lengths at which one decoder layer is timed, per shape (the longest ones dominate the run time).
LAYER_POINTS = {"0.5b": [256, 1024, 2048, 4096, 6400], "7b": [256, 1024, 2048, 4096]}


def peak_bytes(fn: Any, device: str) -> int:
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return torch_peak_alloc_bytes(fn)[1]


def measure_compression(
    frames: int,
    channels: int,
    cfg: Any,
    repeats: int,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
    warmup: int = 2,
) -> dict[str, Any]:
    """Time and peak memory of the outer compression on synthetic (frames, 196, channels) features."""
    from holitom_cli.compression import compress_video_tokens
    from holitom_cli.compression.temporal import segment_video

    feats, scores, cuts = synthetic_features(frames, TOKENS, channels, seed=seed, dtype=dtype)
    feats, scores = feats.to(device), scores.to(device)
    run = lambda: compress_video_tokens(feats, scores, cfg)  # noqa: E731
    for _ in range(max(warmup, 1)):  # fresh memory is slow to touch the first time in this VM
        result = run()
    times = [timed(run, device)[1] for _ in range(repeats)]
    seg_times = [
        timed(lambda: segment_video(feats, cfg.tau, cfg.max_window), device)[1] for _ in range(repeats)
    ]
    peak = peak_bytes(run, device)
    return {
        "frames": frames,
        "channels": channels,
        "input_tokens": frames * TOKENS,
        "output_tokens": result.num_tokens,
        "segments": len(result.segments),
        "scene_cuts": len(cuts) - 1,
        "reduced_temporal": result.reduced,
        "compress_s": median(times),
        "segmentation_s": median(seg_times),
        "compress_runs_s": times,
        "peak_mb": peak / 2**20,
        "input_mb": feats.numel() * feats.element_size() / 2**20,
        "peak_x_input": peak / (feats.numel() * feats.element_size()),
        "ms_per_frame": 1e3 * median(times) / frames,
    }


def add_prefill(row: dict[str, Any], curve: LayerCurve, cfg: Any, text_tokens: int) -> None:
    """Attach estimated baseline / HoliTom prefill seconds and the savings to a scaling row."""
    from holitom_cli.compression import inner_keep_count

    base_tokens = row["input_tokens"] + 1 + text_tokens
    visual = row["output_tokens"] + 1
    k = cfg.resolve_inner_layer(curve.num_layers)
    after = text_tokens + inner_keep_count(visual, cfg.inner_prune_ratio) if k is not None else None
    row["prefill_baseline_s"] = curve.prefill_s(base_tokens)
    row["prefill_holitom_s"] = curve.prefill_s(text_tokens + visual, k, after)
    row["prefill_saved_s"] = row["prefill_baseline_s"] - row["prefill_holitom_s"]
    row["compress_pct_of_baseline_prefill"] = 100 * row["compress_s"] / row["prefill_baseline_s"]
    row["prefill_extrapolated"] = curve.extrapolated(base_tokens)


def _prefill_cells(r: dict[str, Any], mark: str) -> list[Any]:
    if "prefill_baseline_s" not in r:  # --no-prefill
        return ["-", "-", "-", "-"]
    return [
        f"{r['prefill_baseline_s']:,.1f}{mark}",
        r["prefill_holitom_s"],
        r["prefill_saved_s"],
        f"{r['compress_pct_of_baseline_prefill']:.3f}",
    ]


def markdown(rows: list[dict[str, Any]], curves: dict[str, LayerCurve], preset: str, info: dict) -> str:
    headers = [
        "C",
        "T",
        "tokens in",
        "tokens out",
        "segments",
        "compress ms",
        "of which segmentation ms",
        "peak MB",
        "features MB",
        "peak x input",
        "ms per frame",
        "baseline prefill s",
        "HoliTom prefill s",
        "saved s",
        "compress / baseline prefill %",
    ]
    table = []
    for r in rows:
        mark = " (extrap.)" if r.get("prefill_extrapolated") else ""
        table.append(
            [
                r["channels"],
                r["frames"],
                r["input_tokens"],
                r["output_tokens"],
                r["segments"],
                1e3 * r["compress_s"],
                1e3 * r["segmentation_s"],
                r["peak_mb"],
                r["input_mb"],
                f"{r['peak_x_input']:.2f}x" if "peak_x_input" in r else "-",
                f"{r['ms_per_frame']:.2f}" if "ms_per_frame" in r else "-",
                *_prefill_cells(r, mark),
            ]
        )
    fits = "\n".join(
        f"- {c.shape} ({c.num_layers} layers): one layer measured at "
        + ", ".join(f"{n} tok {t * 1e3:.0f} ms" for n, t in sorted(c.points.items()))
        + f"; fit t(n) = {c.coef[0] * 1e3:.1f} ms + {c.coef[1] * 1e6:.3f} us*n + {c.coef[2] * 1e9:.4f} ns*n^2"
        for c in curves.values()
    )
    return (
        f"Preset `{preset}`; machine: {describe_machine(info)}.\n\n"
        + md_table(headers, table, digits=1)
        + ("\n\nPrefill estimates (L x one measured decoder layer, fitted):\n" + fits if fits else "")
        + "\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from holitom_cli.compression import get_preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--channels", type=int, nargs="+", default=[896, 3584], choices=sorted(SHAPE_OF_CHANNELS))
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point, after one warm-up")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before timing each point")
    ap.add_argument("--layer-repeats", type=int, default=2, help="timed runs per decoder-layer point")
    ap.add_argument("--layer-points", type=int, nargs="+", default=None, help="override LAYER_POINTS")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--name", default="scaling", help="output file stem")
    ap.add_argument("--no-prefill", action="store_true", help="compression only, no decoder layers")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    ap.add_argument("--render", type=Path, default=None, help="only rewrite the markdown of this JSON")
    args = ap.parse_args(argv)
    if args.render is not None:
        import json

        data = json.loads(args.render.read_text())
        curves = {}
        for k, v in data["layer_curves"].items():
            curve = LayerCurve(v["shape"], v["num_layers"], {int(n): t for n, t in v["points"].items()})
            curve.coef = tuple(v["coef"])
            curves[k] = curve
        md = markdown(data["rows"], curves, data["preset"], data["machine"])
        write_outputs(args.render.parent, args.render.stem, data, md)
        print(md)
        return data

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = get_preset(args.preset)
    info = machine_info(args.device)
    rows: list[dict[str, Any]] = []
    curves: dict[str, LayerCurve] = {}
    for channels in args.channels:
        shape = SHAPE_OF_CHANNELS[channels]
        if not args.no_prefill:
            log(f"C={channels}: timing one {shape} decoder layer")
            points = args.layer_points or LAYER_POINTS[shape]
            curves[shape] = measure_layer_curve(shape, points, args.layer_repeats, dtype, args.device)
        for frames in args.frames:
            row = measure_compression(
                frames, channels, cfg, args.repeats, args.device, dtype, warmup=args.warmup
            )
            if shape in curves:
                add_prefill(row, curves[shape], cfg, TEXT_TOKENS)
            log(
                f"  T={frames}: {row['input_tokens']} -> {row['output_tokens']} tokens, "
                f"{row['compress_s'] * 1e3:.0f} ms ({row['ms_per_frame']:.2f} ms/frame), "
                f"peak {row['peak_x_input']:.2f}x the input"
            )
            rows.append(row)
    md = markdown(rows, curves, args.preset, info)
    data = {
        "command": command_line(),
        "machine": info,
        "preset": args.preset,
        "config": cfg.to_dict(),
        "dtype": args.dtype,
        "text_tokens": TEXT_TOKENS,
        "rows": rows,
        "layer_curves": {k: v.to_dict() for k, v in curves.items()},
    }
    publish(args.out, args.name, data, md)
    return data


if __name__ == "__main__":
    main()
