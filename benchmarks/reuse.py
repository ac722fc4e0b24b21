"""Time to first token of a SECOND question about a video, against a cold first question (issue 11, item 4).

In one process, on one checkpoint and one video, side by side (``--frames``, LLaVA-OV-0.5B shapes by default):

- **A** cold, no HoliTom: decode the video + vision tower + the first question (full prefill);
- **B** cold, HoliTom (``--preset``, balanced): the same video preparation + compression + the first question;
- **C** second question, same process, HoliTom, prefix reuse on: the prepared video and its compression from
  memory, the prompt prefix's KV (layers below K) from B's answer;
- **D** the same second question with prefix reuse off (``Pipeline(adapter, reuse_prefix=False)``): C vs D
  isolates what prefix reuse does to the prefill;
- **E** second question as in a new process: a fresh PreparedVideo read from the on-disk video cache (filled
  by this run's first video preparation, in a fresh folder), no prefix state: cache load + compression + full
  prefill;
- **F+ / F-** second question without HoliTom, same process, prefix reuse on (every layer's KV from A) / off.

The video is decoded and run through the vision tower once per cold repeat (the first time through
``prepare_video_cached``, which fills the cache: the pure vision time is recorded apart from hashing and
writing the entry); A and B each get a fresh copy of that PreparedVideo (no compression, no prefix state,
no answers yet) and count its decode + vision time in their TTFT. Every arm's language-model work
(compression, prompt, prefill) is measured per run; repeats are interleaved (A, F+, F-, B, then C and D in
alternating order, then E, per repeat); A and F- (full baseline prefills, the expensive ones) and the vision
tower run only in the first ``--cold-repeats`` repeats. An untimed warm-up question pair (HoliTom) runs
first.

TTFT = video decode + vision (or cache load) + compression + prompt + prefill to the first new token; for C,
D, F the first three are 0 (reused in memory). Answers are greedy; the script checks that C, D, E give the
token ids of a cold answer to the same question (a fresh PreparedVideo, reuse off) and that F+ gives F-'s.
Weights are random (``benchmarks.e2e.ensure_checkpoint``) and copied into RAM (see e2e's docstring); model
loading is not part of any TTFT.

``python -m benchmarks.reuse --frames 32`` (bf16 on CPU; results in benchmarks/out/reuse_<shape>.{json,md}).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    timed,
    write_outputs,
)
from benchmarks.e2e import QUESTION, ensure_checkpoint, model_label, random_shapes

SECOND_QUESTION = "What color is the moving box, and in which direction does it move?"
TARGETS = {"second_question_ttft_gain": 10.0}
ARMS = {
    "A": "cold, no HoliTom: decode + vision + first question",
    "B": "cold, HoliTom: decode + vision + compression + first question",
    "C": "2nd question, same process, HoliTom, prefix reuse on",
    "D": "2nd question, same process, HoliTom, prefix reuse off",
    "E": "2nd question, new process: video cache hit, HoliTom, no prefix state",
    "F+": "2nd question, same process, no HoliTom, prefix reuse on",
    "F-": "2nd question, same process, no HoliTom, prefix reuse off",
}
PARTS = ["decode_video_s", "vision_s", "compress_s", "prompt_s", "prefill_s"]


class _RecordingPipeline:
    """What ``prepare_video_cached`` needs of a pipeline, recording the pure decode + vision time of a miss
    (``prepare_video_cached`` adds hashing and writing the entry to ``vision_s``)."""

    def __init__(self, pipe: Any) -> None:
        self.model = pipe.model
        self._pipe = pipe
        self.vision_s: float | None = None

    def prepare_video(self, *args: Any, **kwargs: Any) -> Any:
        video = self._pipe.prepare_video(*args, **kwargs)
        self.vision_s = video.vision_s
        return video


def fresh_copy(video: Any, vision_s: float) -> Any:
    """The prepared video as if just prepared: same tensors, no compression, no prefix state, no answer."""
    return dataclasses.replace(
        video, vision_s=vision_s, answers=0, source="vision", _compressed={}, _prefix=None
    )


def run_record(answer: Any) -> dict[str, Any]:
    st = answer.stats.to_dict()
    t = st["timings"]
    rec = {k: t[k] for k in PARTS}
    rec["ttft_s"] = t["decode_video_s"] + t["ttft_s"]  # the pipeline's TTFT leaves decoding out
    rec.update(
        prompt_tokens=st["prompt_tokens"],
        into_llm=st["tokens"]["into_llm"],
        after_inner=st["tokens"]["after_inner"],
        new_tokens=st["new_tokens"],
        reused=st["reused"],
        token_ids=list(answer.token_ids),
        load_1m=round(os.getloadavg()[0], 2),
    )
    return rec


def measure(args: Any, pipe: Any, video_path: Path) -> dict[str, Any]:
    """Every arm's runs (see the module docstring), the cold references and the video preparations."""
    from holitom_cli.compression import PRESETS
    from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions
    from holitom_cli.video_cache import open_cache, prepare_video_cached

    cfg = PRESETS[args.preset]
    q1, q2 = args.question, args.second_question
    options = GenerationOptions(max_new_tokens=args.new_tokens)
    sampling = SamplingOptions(frames=args.frames)
    off = Pipeline(pipe.model, reuse_prefix=False)
    cache = open_cache(False, None, str(args.video_cache), warn=lambda text: log(f"video cache: {text}"))
    if cache is None:
        raise SystemExit(f"Error: cannot use {args.video_cache} as a video cache folder")
    cache.clear()

    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}

    def note(arm: str, answer: Any) -> None:
        rec = run_record(answer)
        runs[arm].append(rec)
        log(
            f"  {arm}: TTFT {rec['ttft_s']:.2f} s (prefill {rec['prefill_s']:.2f} s), "
            f"prefix KV reused {rec['reused']['prefix_kv_tokens']} of {rec['prompt_tokens']} tokens"
        )

    preparations: list[dict[str, Any]] = []
    video = None
    vision_s = 0.0
    for rep in range(max(args.repeats, args.cold_repeats)):
        cold = rep < args.cold_repeats
        log(f"repeat {rep + 1}" + (" (cold arms too)" if cold else ""))
        if cold:
            log(f"  decoding + vision tower, {args.frames} frames")
            if rep == 0:  # fills the cache for E
                recorder = _RecordingPipeline(pipe)
                video = prepare_video_cached(recorder, video_path, sampling, cache=cache)
                vision_s = recorder.vision_s
                cache_write_s = video.vision_s - vision_s
            else:
                video = pipe.prepare_video(video_path, sampling)
                vision_s, cache_write_s = video.vision_s, None
            preparations.append(
                {"decode_video_s": video.decode_s, "vision_s": vision_s, "cache_hash_write_s": cache_write_s}
            )
            log(f"  decode {video.decode_s:.2f} s, vision {vision_s:.1f} s, {tuple(video.features.shape)}")
            if rep == 0:
                warm = fresh_copy(video, vision_s)  # untimed warm-up of the HoliTom paths, cold and warm
                pipe.ask(warm, q1, cfg, options), pipe.ask(warm, q2, cfg, options)
                log("  warm-up done")

        if cold:
            video_a = fresh_copy(video, vision_s)
            note("A", pipe.ask(video_a, q1, None, options))
        note("F+", pipe.ask(video_a, q2, None, options))
        if cold:
            note("F-", off.ask(video_a, q2, None, options))
        video_b = fresh_copy(video, vision_s)
        note("B", pipe.ask(video_b, q1, cfg, options))
        for arm, p in [("C", pipe), ("D", off)][:: 1 if rep % 2 == 0 else -1]:
            note(arm, p.ask(video_b, q2, cfg, options))
        from_disk = prepare_video_cached(pipe, video_path, sampling, cache=cache)
        if from_disk.source != "cache":
            raise SystemExit("Error: the video cache missed; E would not measure a cache hit")
        note("E", pipe.ask(from_disk, q2, cfg, options))

    log("cold references: the second question on a fresh prepared video, reuse off")
    reference = {
        "holitom": run_record(off.ask(fresh_copy(video, vision_s), q2, cfg, options)),
        # F- already is a cold answer without HoliTom: reuse off, nothing but the vision outputs shared
        "no_holitom": runs["F-"][0],
    }
    return {"runs": runs, "preparations": preparations, "reference": reference}


def summarize(measured: dict[str, Any]) -> dict[str, Any]:
    """Medians per arm, ratios vs A, answer checks, and the targets' verdicts."""
    runs, ref = measured["runs"], measured["reference"]
    rows = []
    for arm, label in ARMS.items():
        rs = runs[arm]
        if not rs:
            continue
        cold_ids = ref["no_holitom" if arm.startswith("F") else "holitom"]["token_ids"]
        row = {"arm": arm, "what": label, "runs": len(rs)}
        for k in [*PARTS, "ttft_s"]:
            row[k] = median(r[k] for r in rs)
        row["ttft_runs_s"] = [r["ttft_s"] for r in rs]
        row["prefill_runs_s"] = [r["prefill_s"] for r in rs]
        row["ttft_best_s"] = min(row["ttft_runs_s"])
        row["prefill_best_s"] = min(row["prefill_runs_s"])
        row["prefix_kv_tokens"] = [r["reused"]["prefix_kv_tokens"] for r in rs]
        row["reused_video"] = [r["reused"]["video"] for r in rs]
        row["reused_compression"] = [r["reused"]["compression"] for r in rs]
        row["prompt_tokens"] = rs[0]["prompt_tokens"]
        row["into_llm"] = rs[0]["into_llm"]
        row["after_inner"] = rs[0]["after_inner"]
        row["new_tokens"] = [r["new_tokens"] for r in rs]
        first_q = arm in ("A", "B")
        row["answer_equals_cold"] = None if first_q else all(r["token_ids"] == cold_ids for r in rs)
        row["answers_consistent"] = all(r["token_ids"] == rs[0]["token_ids"] for r in rs)
        row["load_1m"] = [r["load_1m"] for r in rs]
        rows.append(row)
    by = {r["arm"]: r for r in rows}
    base = by["A"]
    for r in rows:
        r["ttft_gain_vs_A"] = base["ttft_s"] / r["ttft_s"]
        r["ttft_best_gain_vs_A"] = base["ttft_best_s"] / r["ttft_best_s"]
    return {"rows": rows, "targets": targets(by)}


def _prefill_effect(on: dict, off: dict) -> dict[str, Any]:
    """How much prefix reuse shortens the prefill (off / on). The two arms run next to each other in every
    repeat, so the runs are compared in pairs (the load on a shared machine changes between repeats):
    "met" when the run with reuse was faster in every pair."""
    pairs = list(zip(on["prefill_runs_s"], off["prefill_runs_s"], strict=False))
    paired = [b / a for a, b in pairs]
    gain = off["prefill_s"] / on["prefill_s"]
    faster = all(r > 1 for r in paired)
    return {
        "with_reuse": on["arm"],
        "without": off["arm"],
        "prefill_gain": gain,
        "prefill_best_gain": off["prefill_best_s"] / on["prefill_best_s"],
        "prefill_saved_s": off["prefill_s"] - on["prefill_s"],
        "paired_gains": paired,
        "faster_in_every_pair": faster,
        "runs_separated": max(on["prefill_runs_s"]) < min(off["prefill_runs_s"]),
        "verdict": "met" if faster else "missed" if all(r <= 1 for r in paired) else "unclear",
    }


def targets(by: dict[str, dict]) -> dict[str, Any]:
    goal = TARGETS["second_question_ttft_gain"]
    second = []
    for arm in ("C", "E"):
        r = by[arm]
        ok = [r["ttft_gain_vs_A"] >= goal, r["ttft_best_gain_vs_A"] >= goal]
        verdict = "met" if all(ok) else "missed" if not any(ok) else "unclear"
        second.append(
            {
                "arm": arm,
                "gain": r["ttft_gain_vs_A"],
                "best_gain": r["ttft_best_gain_vs_A"],
                "verdict": verdict,
            }
        )
    prefix = [_prefill_effect(by["C"], by["D"])]
    if "F-" in by:
        prefix.append(_prefill_effect(by["F+"], by["F-"]))
    return {"second_question_ttft": second, "prefix_reuse_prefill": prefix}


# ----------------------------------------------------------------------------------------------- report
def markdown(data: dict) -> str:
    rows = data["rows"]
    prep = data["preparations"]
    parts = [
        f"Model: {data['model_label']}; {data['frames']} frames; HoliTom preset `{data['preset']}`; machine: "
        f"{describe_machine(data['machine'])}; 1-min load average at the end {data['load_avg_1m_at_end']}. "
        f"{data['new_tokens']} new tokens per answer; medians of the runs (warm arms {data['repeats']} runs, "
        f"cold A and F- {data['cold_repeats']}).",
        "",
        "Video preparation (decode + vision tower, counted in A's and B's TTFT): "
        + "; ".join(f"decode {p['decode_video_s']:.2f} s, vision {p['vision_s']:.1f} s" for p in prep)
        + (
            f"; hashing and writing the cache entry took {prep[0]['cache_hash_write_s']:.2f} s more "
            "(not counted)."
            if prep and prep[0]["cache_hash_write_s"] is not None
            else "."
        ),
        "",
    ]
    headers = [
        "arm",
        "what",
        "prompt tokens",
        "into LLM",
        "decode s",
        "vision / cache load s",
        "compress s",
        "prompt s",
        "prefill s",
        "TTFT s",
        "TTFT gain vs A",
        "best TTFT gain vs A",
        "prefix KV tokens reused",
        "answer = cold",
    ]
    table = [
        [
            r["arm"],
            r["what"],
            r["prompt_tokens"],
            r["into_llm"],
            r["decode_video_s"],
            r["vision_s"],
            r["compress_s"],
            r["prompt_s"],
            r["prefill_s"],
            r["ttft_s"],
            r["ttft_gain_vs_A"],
            r["ttft_best_gain_vs_A"],
            r["prefix_kv_tokens"][0],
            _answer_cell(r),
        ]
        for r in rows
    ]
    parts += [md_table(headers, table, digits=2), ""]
    fmt_runs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    run_headers = ["arm", "TTFT runs s", "prefill runs s", "1-min load per run"]
    run_rows = [
        [r["arm"], fmt_runs(r["ttft_runs_s"]), fmt_runs(r["prefill_runs_s"]), fmt_runs(r["load_1m"])]
        for r in rows
    ]
    parts += [md_table(run_headers, run_rows), ""]
    t = data["targets"]
    goal = TARGETS["second_question_ttft_gain"]
    parts.append(f"Targets (issue 11): second question's TTFT >= {goal:.0f}x shorter than A; prefix reuse")
    parts.append("measurably shortening the prefill of a warm question (shorter in every repeat's pair).")
    parts.append("")
    lines = [
        [
            f"TTFT gain vs A, {s['arm']} (>= {goal:.0f}x)",
            f"{s['gain']:.1f}x median / {s['best_gain']:.1f}x best",
            s["verdict"],
        ]
        for s in t["second_question_ttft"]
    ] + [
        [
            f"prefill, {p['with_reuse']} vs {p['without']} (shorter)",
            f"{p['prefill_gain']:.2f}x median / {p['prefill_best_gain']:.2f}x best, "
            f"{p['prefill_saved_s']:.2f} s saved; per repeat "
            + ", ".join(f"{g:.1f}x" for g in p["paired_gains"])
            + ("; all runs separated" if p["runs_separated"] else ""),
            p["verdict"],
        ]
        for p in t["prefix_reuse_prefill"]
    ]
    parts += [md_table(["target", "result", "verdict"], lines), ""]
    checks = ", ".join(
        f"{r['arm']} {'equal' if r['answer_equals_cold'] else 'DIFFERENT'}"
        for r in rows
        if r["answer_equals_cold"] is not None and r["arm"] != "F-"
    )
    parts.append(
        f"Answers vs a cold answer of the same question (greedy token ids; cold = a fresh PreparedVideo with "
        f"prefix reuse off, for F+ the F- answer): {checks}."
    )
    return "\n".join(parts)


def _answer_cell(row: dict) -> str:
    if row["answer_equals_cold"] is None:
        return "–"
    if row["arm"] == "F-":  # its first run is the cold reference without HoliTom
        return "reference" if row["answer_equals_cold"] else "NO (runs differ)"
    return "yes" if row["answer_equals_cold"] else "NO"


def render(path: Path) -> dict[str, Any]:
    """Recompute the summary and rewrite the markdown of an existing result JSON (nothing is measured)."""
    import json

    data = json.loads(path.read_text())
    data.update(summarize(data))
    md = markdown(data)
    write_outputs(path.parent, path.stem, data, md)
    print(md)
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="0.5b", choices=random_shapes(), metavar="SHAPE", help="%(choices)s")
    ap.add_argument(
        "--model-dir", type=Path, default=None, help="use this checkpoint instead of a random one"
    )
    ap.add_argument("--cache", type=Path, default=Path("/tmp/holitom-bench"), help="where random models go")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--preset", default="balanced", help="HoliTom preset of B, C, D, E")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the warm arms (B, C, D, E, F+)")
    ap.add_argument(
        "--cold-repeats", type=int, default=1, help="runs of the vision tower and of A and F- (full prefills)"
    )
    ap.add_argument("--new-tokens", type=int, default=8, help="exact number of generated tokens per answer")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--video", type=Path, default=None, help="default: a generated 20 s clip")
    ap.add_argument(
        "--video-cache",
        type=Path,
        default=None,
        help="video cache folder, cleared first (default: CACHE/reuse-video-cache)",
    )
    ap.add_argument("--question", default=QUESTION, help="the first question")
    ap.add_argument("--second-question", default=SECOND_QUESTION)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-materialize", action="store_true", help="keep the weights memory-mapped")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--name", default=None, help="output file stem (default reuse_<shape>)")
    ap.add_argument("--render", type=Path, default=None, help="only rewrite the markdown of this result JSON")
    args = ap.parse_args(argv)
    if args.render is not None:
        return render(args.render)

    from benchmarks.synthetic import make_test_video
    from holitom_cli.compression import PRESETS
    from holitom_cli.pipeline import Pipeline

    if args.preset not in PRESETS:
        ap.error(f"unknown preset {args.preset!r}; one of {', '.join(PRESETS)}")
    if args.repeats < 1 or args.cold_repeats < 1 or args.cold_repeats > args.repeats:
        ap.error("need 1 <= --cold-repeats <= --repeats")
    if args.frames < 1 or args.new_tokens < 1:
        ap.error("--frames and --new-tokens must be >= 1")
    if args.video is not None and not args.video.is_file():
        ap.error(f"no video file at {args.video}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.video_cache = args.video_cache or args.cache / "reuse-video-cache"
    # its own clip name: e2e rewrites bench-clip.mp4, which would change the hash between cache fill and hit
    video_path = args.video or make_test_video(args.cache / "reuse-clip.mp4", seconds=20, fps=10)
    ckpt = ensure_checkpoint(args.shape, args.model_dir, args.cache, args.dtype)
    info = machine_info("cpu")
    log(f"loading {ckpt} ({args.dtype})")
    pipe, load_s = timed(lambda: Pipeline.load(str(ckpt), device="cpu", dtype=args.dtype, offline=True))
    if not args.no_materialize:
        nbytes, copy_s = timed(lambda: materialize_weights(pipe.model.model))
        log(f"weights copied into RAM: {nbytes / 2**30:.1f} GB in {copy_s:.1f} s")
    pipe.model.model.generation_config.min_new_tokens = args.new_tokens  # random weights: no early EOS
    with torch.inference_mode():
        measured = measure(args, pipe, video_path)
    data = {
        "command": command_line(),
        "machine": info,
        "model_label": model_label(pipe.model, args.shape, args.model_dir, args.dtype),
        "checkpoint": str(ckpt),
        "dtype": args.dtype,
        "device": "cpu",
        "load_s": load_s,
        "frames": args.frames,
        "preset": args.preset,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "cold_repeats": args.cold_repeats,
        "questions": [args.question, args.second_question],
        "video": str(video_path),
        **measured,
        **summarize(measured),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    md = markdown(data)
    publish(args.out, args.name or f"reuse_{args.shape}", data, md)
    return data


if __name__ == "__main__":
    main()
