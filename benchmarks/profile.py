"""Where does the time go? torch.profiler over the LLM part of one answer, per arm.

Runs ``Pipeline.ask`` for the baseline and the given presets twice under ``torch.profiler``: once with one new
token (prefill only) and once with ``--new-tokens`` (prefill + decode), and prints the operators that take the
most self CPU time for each, plus the share of time spent outside torch operators (Python, generate()
bookkeeping). The vision outputs are reused from ``benchmarks.e2e --save-prepared`` when present (else the
vision tower runs once here).

``python -m benchmarks.profile --model-dir /tmp/holitom-bench/ov-0.5b --frames 32 --presets fastest``
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import DEFAULT_OUT, log, materialize_weights, timed


def _prepared_path(cache: Path, model_name: str, frames: int) -> Path:
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(model_name)).name)
    return cache / f"prepared-{tag}-{frames}f.pt"


def save_prepared(video: Any, cache: Path, frames: int) -> Path:
    """Store the question-independent vision outputs of a PreparedVideo (its VisualTokens' tensors)."""
    path = _prepared_path(cache, video.model_name, frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = video.tokens
    torch.save(
        {
            "features": tokens.features,
            "saliency": tokens.saliency,
            "suffix": tokens.suffix,
            "grid": list(tokens.grid),
            "unit_times": list(tokens.unit_times),
            "frames_per_unit": tokens.frames_per_unit,
            "layout": dict(tokens.layout),
            "vision_s": video.vision_s,
            "vision_flops": video.vision_flops,
            "model_name": video.model_name,
            "indices": list(video.clip.indices),
        },
        path,
    )
    return path


def load_prepared(pipe: Any, video_path: Path, cache: Path, frames: int) -> Any:
    """A PreparedVideo from the stored vision outputs (same model, same frames), or a fresh one."""
    from holitom_cli.models.base import VisualTokens
    from holitom_cli.pipeline import PreparedVideo, SamplingOptions
    from holitom_cli.video import load_video

    path = _prepared_path(cache, pipe.model.name, frames)
    if path.is_file():
        saved = torch.load(path)
        clip = load_video(video_path, num_frames=frames)
        if (
            saved["model_name"] == pipe.model.name
            and saved["indices"] == list(clip.indices)
            and "saliency" in saved
        ):
            log(f"reusing the vision outputs stored in {path}")
            tokens = VisualTokens(
                features=saved["features"],
                saliency=saved["saliency"],
                grid=tuple(saved["grid"]),
                unit_times=saved["unit_times"],
                suffix=saved["suffix"],
                frames_per_unit=saved["frames_per_unit"],
                layout=saved["layout"],
            )
            return PreparedVideo(
                clip=clip,
                tokens=tokens,
                vision_s=saved["vision_s"],
                model_name=saved["model_name"],
                vision_flops=saved["vision_flops"],
            )
    log(f"running the vision tower on {frames} frames")
    video = pipe.prepare_video(video_path, SamplingOptions(frames=frames))
    save_prepared(video, cache, frames)
    return video


def profile_answer(
    pipe: Any, video: Any, question: str, cfg: Any, new_tokens: int, top: int
) -> dict[str, Any]:
    """Profile one answer; returns wall time, the top operators by self CPU time and the untracked share."""
    from torch.profiler import ProfilerActivity, profile

    from holitom_cli.pipeline import GenerationOptions

    options = GenerationOptions(max_new_tokens=new_tokens)
    pipe.ask(video, question, cfg, options)  # warm-up (kernels for these shapes, compression cache)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        answer, wall = timed(lambda: pipe.ask(video, question, cfg, options))
    events = prof.key_averages()
    total_self_us = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "wall_s": wall,
        "prefill_s": answer.stats.timings.prefill_s,
        "new_tokens": answer.stats.new_tokens,
        "ops_s": total_self_us / 1e6,
        "top": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in ranked],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import json

    from benchmarks.e2e import QUESTION
    from benchmarks.synthetic import make_test_video
    from holitom_cli.compression import PRESETS
    from holitom_cli.pipeline import Pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--presets", nargs="+", default=["fastest"])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--video", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/holitom-bench"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    video_path = args.video or make_test_video(args.cache / "bench-clip.mp4", seconds=20, fps=10)
    pipe = Pipeline.load(str(args.model_dir), device=args.device, dtype=args.dtype, offline=True)
    pipe.reuse_prefix = False  # profile whole prefills (the same question is asked repeatedly)
    materialize_weights(pipe.model.model)  # see benchmarks._common.materialize_weights
    pipe.model.model.generation_config.min_new_tokens = args.new_tokens  # a fixed token count
    video = load_prepared(pipe, video_path, args.cache, args.frames)
    report: dict[str, Any] = {}
    lines = []
    for name in ["baseline", *args.presets]:
        cfg = None if name == "baseline" else PRESETS[name]
        for label, n in (("prefill", 1), ("answer", args.new_tokens)):
            pipe.model.model.generation_config.min_new_tokens = n
            res = profile_answer(pipe, video, QUESTION, cfg, n, args.top)
            report[f"{name}/{label}"] = res
            lines.append(
                f"\n## {name}, {label} ({res['new_tokens']} new tokens): wall {res['wall_s']:.2f} s, "
                f"prefill {res['prefill_s']:.2f} s, torch ops {res['ops_s']:.2f} s "
                f"({100 * res['ops_s'] / res['wall_s']:.0f}% of wall)"
            )
            lines += [f"  {t['self_s']:8.3f} s  {t['calls']:6d} x  {t['op']}" for t in res["top"]]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{args.frames}f.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"profile_{args.frames}f.txt").write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
