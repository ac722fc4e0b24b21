"""End to end, side by side in one run: baseline and every HoliTom preset on the same prepared video.

For each frame count, the video is decoded and run through the vision tower ONCE (``Pipeline.prepare_video``;
the vision stage is identical in every arm, so its time is measured once and counted in every arm's TTFT).
Then, in the same process and interleaved round-robin so machine noise hits every arm alike:

- compression: ``compress_video_tokens`` on the prepared features, median of ``--repeats`` after a warm-up
  (the pipeline caches compression per setting, so it is timed directly, outside ``ask``);
- LLM prefill and decode: ``Pipeline.ask`` with exactly ``--new-tokens`` new tokens (random weights may emit
  EOS early: the benchmark sets ``min_new_tokens`` on its own model instance's generation config), median of
  ``--repeats`` after one warm-up answer per arm;
- TTFT = video decode + vision + compression + (prompt building + prefill to the first new token);
- peak memory: torch's allocator peak during one answer above what was allocated before it (weights and the
  prepared video excluded), from ``torch.profiler`` memory events on the (untimed) warm-up answer; on CUDA
  ``torch.cuda.max_memory_allocated``; plus the process's peak RSS at the end (weights included);
- KV-cache bytes from the cache generate returns (the inner stage shortens layers >= K).

Random weights stand in for the real ones (speed does not depend on weight values); the checkpoint is built
from the real config of any family with a random-model shape, directly in the target dtype
(``python -m holitom_cli.models.random_model --shape SHAPE DIR``: LLaVA-OV ``0.5b``/``7b``/..., Qwen
``qwen2_5_vl-3b``, ``qwen3_vl-2b``, ...), then loaded like any checkpoint folder (``Pipeline.load``).

``python -m benchmarks.e2e --shape 0.5b --frames 8 32`` (add ``--device cuda`` on a GPU);
``python -m benchmarks.e2e --shape qwen2_5_vl-3b --frames 16``.
"""

from __future__ import annotations

import argparse
import os
import resource
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DEFAULT_OUT,
    command_line,
    describe_machine,
    log,
    machine_info,
    materialize_weights,
    md_table,
    median,
    publish,
    synchronize,
    timed,
    torch_peak_alloc_bytes,
    write_outputs,
)

QUESTION = "What happens in this video? Describe the main action."
TARGETS = {"compress_pct": 5.0, "prefill_speedup": 7.0, "decode_speedup": 1.3}


def random_shapes() -> list[str]:
    """Every ``--shape`` the random-model builders know (LLaVA-OV's, then every registered Qwen family's)."""
    from holitom_cli.models.random_model import SHAPES
    from holitom_cli.models.random_qwen import QWEN_SHAPES

    return [*SHAPES, *QWEN_SHAPES]


def ensure_checkpoint(shape: str, model_dir: Path | None, cache: Path, dtype: str) -> Path:
    """An existing checkpoint folder, or a random one of ``shape`` built (once) under ``cache``."""
    from holitom_cli.models.random_model import SHAPES, save_random_checkpoint
    from holitom_cli.models.random_qwen import save_random_qwen

    if model_dir is not None:
        return model_dir
    path = cache / (f"ov-{shape}-{dtype}" if shape in SHAPES else f"{shape}-{dtype}")
    if not (path / "config.json").is_file():
        log(f"building a random {shape} checkpoint in {dtype} at {path}")
        save = save_random_checkpoint if shape in SHAPES else save_random_qwen
        save(path, shape=shape, dtype=dtype)
    return path


def model_label(adapter: Any, shape: str, model_dir: Path | None, dtype: str) -> str:
    """``<family display name>-<size> shapes (random weights, dtype)``, or the folder's name with --model-dir
    when it was not built from ``--shape`` (the size is the shape name's last part: ``qwen3_vl-2b`` -> 2B)."""
    family = adapter.DISPLAY_NAME or adapter.family
    if model_dir is not None and shape not in model_dir.name:
        return f"{family} {model_dir.name} ({dtype})"
    return f"{family}-{shape.rsplit('-', 1)[-1].upper()} shapes (random weights, {dtype})"


def peak_during(fn: Any, device: str) -> tuple[Any, int]:
    """(result, peak bytes allocated by torch during ``fn`` above the bytes allocated before it)."""
    if device.startswith("cuda"):
        import torch

        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        return out, int(torch.cuda.max_memory_allocated(device) - before)
    return torch_peak_alloc_bytes(fn)


def run_frames(pipe: Any, video_path: Path, frames: int, arms: list[tuple[str, Any]], args: Any) -> dict:
    """All arms on one prepared video of ``frames`` frames."""
    from holitom_cli.compression import compress_video_tokens
    from holitom_cli.pipeline import GenerationOptions, SamplingOptions
    from holitom_cli.video import load_video

    device = args.device
    if args.reuse_prepared:  # vision outputs stored by an earlier --save-prepared run (same model, frames)
        from benchmarks.profile import load_prepared

        video = load_prepared(pipe, video_path, args.cache, frames)
    else:
        log(f"{frames} frames: decoding + vision tower (once for all arms)")
        video = pipe.prepare_video(video_path, SamplingOptions(frames=frames))
    log(f"  vision {video.vision_s:.1f} s, features {tuple(video.features.shape)}")
    if args.save_prepared:
        from benchmarks.profile import save_prepared

        save_prepared(video, args.cache, frames)
    decode_times = [video.decode_s] + [
        timed(lambda: load_video(video_path, num_frames=frames))[1] for _ in range(args.repeats - 1)
    ]

    compress: dict[str, list[float]] = {}
    for name, cfg in arms:
        if cfg is None:
            continue
        run = lambda cfg=cfg: compress_video_tokens(video.features, video.attention, cfg)  # noqa: E731
        run(), run()  # warm-up (twice: fresh memory is slow to touch the first time in this VM)
        compress[name] = [timed(run, device)[1] for _ in range(args.repeats)]

    options = GenerationOptions(max_new_tokens=args.new_tokens)
    results: dict[str, dict[str, Any]] = {name: {"runs": []} for name, _ in arms}
    for name, cfg in arms:  # warm-up answer per arm, profiled for memory (not timed)
        if args.no_memory:
            answer, peak = pipe.ask(video, args.question, cfg, options), None
        else:
            answer, peak = peak_during(lambda cfg=cfg: pipe.ask(video, args.question, cfg, options), device)
        results[name]["peak_alloc_bytes"] = peak
        results[name]["warmup_new_tokens"] = answer.stats.new_tokens
        log(f"  warm-up {name}: peak +{(peak or 0) / 2**20:.0f} MB, {answer.stats.new_tokens} new tokens")
    for rep in range(args.repeats):
        for name, cfg in arms:
            answer = pipe.ask(video, args.question, cfg, options)
            st = answer.stats.to_dict()
            t = st["timings"]
            results[name]["runs"].append(
                {
                    "prefill_s": t["prefill_s"],
                    "llm_first_token_s": t["ttft_s"] - t["vision_s"] - t["compress_s"],
                    "decode_tokens_per_s": t["decode_tokens_per_s"],
                    "new_tokens": st["new_tokens"],
                    "kv_cache_bytes": st["kv_cache_bytes"],
                    "prefix_kv_tokens": st["reused"].get("prefix_kv_tokens", 0),  # 0: a whole prefill
                    "stats": st if rep == 0 else None,
                }
            )
            log(
                f"  rep {rep + 1} {name}: prefill {t['prefill_s']:.2f} s, "
                f"decode {t['decode_tokens_per_s'] or 0:.1f} tok/s, {st['new_tokens']} new tokens"
            )

    rows = []
    decode_video_s, vision_s = median(decode_times), video.vision_s
    for name, cfg in arms:
        runs = results[name]["runs"]
        first = runs[0]["stats"]
        comp_s = median(compress[name]) if name in compress else 0.0
        llm_s = median(r["llm_first_token_s"] for r in runs)
        row = {
            "arm": name,
            "frames": frames,
            "config": cfg.to_dict() if cfg is not None else None,
            "tokens_into_llm": first["tokens"]["into_llm"],
            "tokens_after_inner": first["tokens"]["after_inner"],
            "prompt_tokens": first["prompt_tokens"],
            "decode_video_s": decode_video_s,
            "vision_s": vision_s,
            "compress_s": comp_s,
            "compress_runs_s": compress.get(name, []),
            "prefill_s": median(r["prefill_s"] for r in runs),
            "prefill_runs_s": [r["prefill_s"] for r in runs],
            "llm_first_token_s": llm_s,
            "ttft_s": decode_video_s + vision_s + comp_s + llm_s,
            "decode_tokens_per_s": median(r["decode_tokens_per_s"] for r in runs),
            "decode_runs_tokens_per_s": [r["decode_tokens_per_s"] for r in runs],
            "new_tokens": [r["new_tokens"] for r in runs],
            "prefix_kv_tokens": [r["prefix_kv_tokens"] for r in runs],
            "kv_cache_bytes": runs[-1]["kv_cache_bytes"],
            "peak_alloc_bytes": results[name]["peak_alloc_bytes"],
            "flops": first["flops"],
            "prefill_tflops": first["flops"]["holitom"] / 1e12,
            "inner": first["inner"],
        }
        rows.append(row)
    return derive({"frames": frames, "video": first["video"], "rows": rows})


def derive(block: dict) -> dict:
    """Ratios baseline / arm (medians, and best-of-runs), filled into each row of a frames block.

    Best-of (fastest prefill, highest decode rate of the runs) is reported next to the median because on a
    shared machine noise only ever adds time: the best run is the least disturbed one.
    """
    rows = block["rows"]
    for r in rows:
        r["prefill_best_s"] = min(r["prefill_runs_s"])
        rates = [x for x in r["decode_runs_tokens_per_s"] if x]
        r["decode_best_tokens_per_s"] = max(rates) if rates else None
    base = rows[0]
    nan = float("nan")
    for r in rows:
        r["prefill_speedup"] = base["prefill_s"] / r["prefill_s"]
        r["prefill_best_speedup"] = base["prefill_best_s"] / r["prefill_best_s"]
        r["ttft_speedup"] = base["ttft_s"] / r["ttft_s"]
        r["llm_ttft_speedup"] = (base["compress_s"] + base["llm_first_token_s"]) / (
            r["compress_s"] + r["llm_first_token_s"]
        )
        r["decode_speedup"] = (r["decode_tokens_per_s"] or nan) / (base["decode_tokens_per_s"] or nan)
        r["decode_best_speedup"] = (r["decode_best_tokens_per_s"] or nan) / (
            base["decode_best_tokens_per_s"] or nan
        )
        r["kv_ratio"] = base["kv_cache_bytes"] / r["kv_cache_bytes"] if r["kv_cache_bytes"] else None
        r["flops_ratio"] = r["flops"]["holitom"] / base["flops"]["holitom"]
        r["compress_pct_of_baseline_prefill"] = 100 * r["compress_s"] / base["prefill_s"]
    return block


def frames_table(block: dict) -> str:
    headers = [
        "arm",
        "tokens into LLM",
        "after inner",
        "prefill TFLOPs",
        "FLOPs vs base",
        "video decode s",
        "vision s",
        "compress s",
        "LLM prefill s",
        "TTFT s",
        "TTFT gain",
        "prefill gain",
        "decode tok/s",
        "decode gain",
        "peak MB",
        "KV MB",
        "KV gain",
        "compress % of base prefill",
    ]
    table = [
        [
            r["arm"],
            r["tokens_into_llm"],
            r["tokens_after_inner"],
            r["flops"]["holitom"] / 1e12,
            f"{100 * r['flops_ratio']:.1f}%",
            r["decode_video_s"],
            r["vision_s"],
            r["compress_s"],
            r["prefill_s"],
            r["ttft_s"],
            r["ttft_speedup"],
            r["prefill_speedup"],
            r["decode_tokens_per_s"],
            r["decode_speedup"],
            r["peak_alloc_bytes"] / 2**20 if r["peak_alloc_bytes"] is not None else None,
            r["kv_cache_bytes"] / 2**20,
            r["kv_ratio"],
            r["compress_pct_of_baseline_prefill"] if r["arm"] != "baseline" else None,
        ]
        for r in block["rows"]
    ]
    return md_table(headers, table, digits=2)


def runs_table(block: dict) -> str:
    """Every timed run, so the noise is visible, with best-of-runs ratios."""
    fmt_runs = lambda xs: ", ".join("–" if x is None else f"{x:.2f}" for x in xs)  # noqa: E731
    headers = [
        "arm",
        "prefill runs s",
        "best prefill s",
        "best prefill gain",
        "decode runs tok/s",
        "best decode tok/s",
        "best decode gain",
    ]
    table = [
        [
            r["arm"],
            fmt_runs(r["prefill_runs_s"]),
            r["prefill_best_s"],
            r["prefill_best_speedup"],
            fmt_runs(r["decode_runs_tokens_per_s"]),
            r["decode_best_tokens_per_s"],
            r["decode_best_speedup"],
        ]
        for r in block["rows"]
    ]
    return md_table(headers, table, digits=2)


def _verdict(values: list[float], target: float) -> str:
    ok = [v >= target for v in values]
    return "met" if all(ok) else "missed" if not any(ok) else "unclear"


def targets(blocks: list[dict]) -> list[dict[str, Any]]:
    """Check the issue's targets at 32 frames (or the largest frame count run) for every preset."""
    if not blocks:
        return []
    block = next((b for b in blocks if b["frames"] == 32), max(blocks, key=lambda b: b["frames"]))
    out = []
    for r in block["rows"][1:]:
        out.append(
            {
                "arm": r["arm"],
                "frames": block["frames"],
                "compress_pct_of_baseline_prefill": r["compress_pct_of_baseline_prefill"],
                "compress_ok": r["compress_pct_of_baseline_prefill"] < TARGETS["compress_pct"],
                "prefill_speedup": r["prefill_speedup"],
                "prefill_best_speedup": r["prefill_best_speedup"],
                "prefill": _verdict(
                    [r["prefill_speedup"], r["prefill_best_speedup"]], TARGETS["prefill_speedup"]
                ),
                "decode_speedup": r["decode_speedup"],
                "decode_best_speedup": r["decode_best_speedup"],
                "decode": _verdict(
                    [r["decode_speedup"], r["decode_best_speedup"]], TARGETS["decode_speedup"]
                ),
            }
        )
    return out


def markdown(data: dict) -> str:
    parts = [
        f"Model: {data['model_label']}; machine: {describe_machine(data['machine'])}; 1-min load average "
        f"at the end {data['load_avg_1m_at_end']}. {data['new_tokens']} new tokens per answer, median of "
        f"{data['repeats']} runs after a warm-up.",
        "",
    ]
    for block in data["blocks"]:
        v = block["video"]
        grid = "x".join(str(n) for n in v["grid"])
        vision_tflops = block["rows"][0]["flops"]["vision"] / 1e12
        title = (
            f"**{block['frames']} frames** ({v['temporal_units']} temporal units of {v['frames_per_unit']} "
            f"frame(s), {grid} tokens each; vision side {vision_tflops:.1f} TFLOPs)"
        )
        parts += [title, "", frames_table(block), "", runs_table(block), ""]
    if data["targets"]:
        headers = [
            "preset",
            "compress % of base prefill (<5)",
            "prefill gain, median / best (>=7)",
            "decode gain, median / best (>=1.3)",
        ]
        rows = [
            [
                t["arm"],
                f"{t['compress_pct_of_baseline_prefill']:.2f} ({'met' if t['compress_ok'] else 'missed'})",
                f"{t['prefill_speedup']:.2f}x / {t['prefill_best_speedup']:.2f}x ({t['prefill']})",
                f"{t['decode_speedup']:.2f}x / {t['decode_best_speedup']:.2f}x ({t['decode']})",
            ]
            for t in data["targets"]
        ]
        frames = data["targets"][0]["frames"]
        title = (
            f"Targets at {frames} frames:"
            if frames == 32
            else (f"Targets (defined at 32 frames; shown at {frames} frames for reference only):")
        )
        parts += [title, "", md_table(headers, rows), ""]
    return "\n".join(parts)


def chart_panels(datasets: list[dict]) -> list[Any]:
    from benchmarks.chart import Panel

    panels = []
    for data in datasets:
        for block in data["blocks"]:
            arms = [
                (
                    r["arm"],
                    {
                        "decode_video": r["decode_video_s"],
                        "vision": r["vision_s"],
                        "compression": r["compress_s"],
                        "prefill": r["llm_first_token_s"],
                    },
                )
                for r in block["rows"]
            ]
            panels.append(Panel(f"{data['model_label']}, {block['frames']} frames", arms))
    return panels


def render(args: Any) -> dict[str, Any]:
    """Recompute the derived numbers and rewrite the markdown (and chart) of an existing e2e JSON."""
    import json

    data = json.loads(args.render.read_text())
    for block in data["blocks"]:
        derive(block)
    data["targets"] = targets(data["blocks"])
    md = markdown(data)
    write_outputs(args.render.parent, args.render.stem, data, md)
    print(md)
    if args.chart is not None:
        from benchmarks.chart import draw_ttft_chart

        earlier = [json.loads(p.read_text()) for p in args.chart_with]
        draw_ttft_chart(chart_panels(earlier + [data]), args.chart, "Time to first token, by stage")
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import json

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape",
        default="0.5b",
        choices=random_shapes(),
        metavar="SHAPE",
        help="random-model shape: %(choices)s",
    )
    ap.add_argument(
        "--model-dir", type=Path, default=None, help="use this checkpoint instead of a random one"
    )
    ap.add_argument("--cache", type=Path, default=Path("/tmp/holitom-bench"), help="where random models go")
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--presets", nargs="+", default=None, help="default: every preset")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per arm after one warm-up")
    ap.add_argument("--new-tokens", type=int, default=32, help="exact number of generated tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--video", type=Path, default=None, help="default: a generated 20 s clip with scene cuts")
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    ap.add_argument(
        "--save-prepared", action="store_true", help="keep the vision outputs for benchmarks.profile"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--name", default=None, help="output file stem (default e2e_<shape>)")
    ap.add_argument("--chart", type=Path, default=None, help="write the TTFT stacked-bar PNG here")
    ap.add_argument(
        "--chart-with", type=Path, nargs="*", default=[], help="earlier e2e JSONs to add to the chart"
    )
    ap.add_argument(
        "--reuse-prepared", action="store_true", help="reuse the vision outputs of a --save-prepared run"
    )
    ap.add_argument(
        "--no-materialize", action="store_true", help="keep the weights memory-mapped (as loaded)"
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the profiled (memory) warm-up answers")
    ap.add_argument(
        "--render", type=Path, default=None, help="only re-render the tables (and --chart) from this e2e JSON"
    )
    args = ap.parse_args(argv)
    if args.render is not None:
        return render(args)

    from benchmarks.synthetic import make_test_video
    from holitom_cli.compression import PRESETS
    from holitom_cli.pipeline import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.presets or list(PRESETS)
    arms: list[tuple[str, Any]] = [("baseline", None)] + [(n, PRESETS[n]) for n in names]
    video_path = args.video or make_test_video(args.cache / "bench-clip.mp4", seconds=20, fps=10)
    ckpt = ensure_checkpoint(args.shape, args.model_dir, args.cache, args.dtype)
    info = machine_info(args.device)
    log(f"loading {ckpt} on {args.device} ({args.dtype})")
    (pipe, load_s) = timed(
        lambda: Pipeline.load(str(ckpt), device=args.device, dtype=args.dtype, offline=True)
    )
    # Every timed answer repeats one question: measure whole prefills, not the prompt-prefix reuse that later
    # questions get (benchmarks/reuse.py measures that).
    pipe.reuse_prefix = False
    if not args.no_materialize:
        (nbytes, copy_s) = timed(lambda: materialize_weights(pipe.model.model))
        log(f"weights copied into RAM: {nbytes / 2**30:.1f} GB in {copy_s:.1f} s")
    gen_cfg = pipe.model.model.generation_config
    gen_cfg.min_new_tokens = args.new_tokens  # this instance only: random weights must not stop early
    log(f"loaded in {load_s:.1f} s")

    label = model_label(pipe.model, args.shape, args.model_dir, args.dtype)
    blocks = []
    with torch.inference_mode():
        for frames in args.frames:
            blocks.append(run_frames(pipe, video_path, frames, arms, args))
    data = {
        "command": command_line(),
        "machine": info,
        "model_label": label,
        "checkpoint": str(ckpt),
        "load_s": load_s,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "question": args.question,
        "blocks": blocks,
        "targets": targets(blocks),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    md = markdown(data)
    name = args.name or f"e2e_{args.shape}"
    publish(args.out, name, data, md)
    if args.chart is not None:
        from benchmarks.chart import draw_ttft_chart

        earlier = [json.loads(p.read_text()) for p in args.chart_with]
        path = draw_ttft_chart(chart_panels(earlier + [data]), args.chart, "Time to first token, by stage")
        log(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
