"""Batch throughput (items per minute) without Ray and with 1, 2, ... Ray workers, side by side (issue 12).

Every arm is the real command (``python -m holitom_cli batch DIR -q ... -o OUT --device cpu [--workers N]``)
in its own process, on the same videos and questions, each into a fresh output file. Arms run round-robin
(single, 1 worker, 2 workers, single, ...) so that a noisy neighbour hurts them alike. For each run:

* **wall**: the whole command, Ray's start-up and model loading included; items/min = items / wall;
* **steady**: the rate between the first and the last line written (start-up excluded), from polling the
  output file's line count every 50 ms;
* the answers of every arm are compared with the single-process ones (greedy: they must be identical).

Needs the ray extra (``pip install "holitom[ray]"``) for the worker arms. Results: ``benchmarks/out/
batch_throughput.{json,md}``. Typical time on 2 cores with the defaults: ~5-10 minutes.

    python -m benchmarks.batch_throughput --videos 8 --questions 2 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    DEFAULT_OUT,
    REPO_ROOT,
    command_line,
    describe_machine,
    log,
    machine_info,
    md_table,
    median,
    publish,
)
from benchmarks.synthetic import make_test_video

QUESTIONS = [
    "What happens in the video?",
    "How many objects move?",
    "What colour is the box?",
    "Is there a scene cut?",
]


def _arm_name(workers: int) -> str:
    return "single process" if workers == 0 else f"--workers {workers}"


def run_arm(cmd: list[str], out: Path, items: int, timeout: float) -> dict[str, Any]:
    """Run one batch command; return wall time, the times lines appeared, the exit code."""
    if out.exists():
        out.unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="backslashreplace")  # fmt: skip
    seen, stamps = 0, []
    while proc.poll() is None:
        if time.monotonic() - start > timeout:
            proc.kill()
            raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}")
        lines = out.read_bytes().count(b"\n") if out.exists() else 0
        stamps.extend([time.monotonic() - start] * (lines - seen))
        seen = lines
        time.sleep(0.05)
    wall = time.monotonic() - start
    err = proc.stderr.read() if proc.stderr else ""
    lines = out.read_bytes().count(b"\n") if out.exists() else 0
    stamps.extend([wall] * (lines - seen))
    if proc.returncode != 0 or lines != items:
        raise RuntimeError(f"exit {proc.returncode}, {lines}/{items} lines: {' '.join(cmd)}\n{err[-2000:]}")
    steady = None
    if len(stamps) >= 2 and stamps[-1] > stamps[0]:
        steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) * 60
    return {"wall_s": wall, "items_per_min": items / wall * 60, "steady_items_per_min": steady,
            "first_line_s": stamps[0] if stamps else None}  # fmt: skip


def _answers(out: Path) -> dict[tuple[str, str], Any]:
    return {(r["video"]["path"], r["question"]): r["answer"] for r in map(json.loads, out.open())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="checkpoint folder (default: a random one, --shape)")
    parser.add_argument("--shape", default="tiny", help="random checkpoint shape when no --model-dir")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/holitom-bench"))
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--questions", type=int, default=2, choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0: without --workers")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    model_dir = args.model_dir
    if model_dir is None:
        from holitom_cli.models.random_model import save_random_checkpoint

        model_dir = args.cache / f"random-{args.shape}-float32"
        if not any(model_dir.glob("*.safetensors")):  # a folder left by an interrupted build has none
            log(f"building a random {args.shape} checkpoint in {model_dir}")
            save_random_checkpoint(model_dir, shape=args.shape, dtype="float32", seed=0)
    videos_dir = args.cache / f"batch_videos_{args.videos}"  # exactly --videos videos in it
    for i in range(args.videos):
        path = videos_dir / f"clip{i:03d}.mp4"
        if not path.exists():
            make_test_video(path, seconds=4.0 + i % 3, fps=10)
    questions = QUESTIONS[: args.questions]
    items = args.videos * len(questions)
    work = args.out_dir / "batch_throughput_runs"
    work.mkdir(parents=True, exist_ok=True)

    base = [sys.executable, "-m", "holitom_cli", "batch", str(videos_dir), "-m", str(model_dir),
            "--device", "cpu", "--frames", str(args.frames), "--max-new-tokens", str(args.max_new_tokens),
            "--quiet"]  # fmt: skip
    for q in questions:
        base += ["-q", q]
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in args.workers}
    answers: dict[int, dict] = {}
    for rep in range(args.repeats):
        for workers in args.workers:
            out = work / f"w{workers}.jsonl"
            cmd = [*base, "-o", str(out), *(["--workers", str(workers)] if workers else [])]
            log(f"run {rep + 1}/{args.repeats}: {_arm_name(workers)}")
            result = run_arm(cmd, out, items, args.timeout)
            log(f"  {result['wall_s']:.1f} s, {result['items_per_min']:.1f} items/min")
            runs[workers].append(result)
            answers[workers] = _answers(out)
    reference = answers.get(0) or answers[args.workers[0]]
    identical = {w: a == reference for w, a in answers.items()}

    rows = []
    for workers in args.workers:
        rs = runs[workers]
        steady = [r["steady_items_per_min"] for r in rs if r["steady_items_per_min"]]
        rows.append([_arm_name(workers), items, median(r["wall_s"] for r in rs),
                     median(r["items_per_min"] for r in rs), median(steady) if steady else None,
                     median(r["first_line_s"] for r in rs),
                     "yes" if identical[workers] else "NO"])  # fmt: skip
    info = machine_info("cpu")
    table = md_table(["arm", "items", "wall s", "items/min (wall)", "items/min (steady)", "first line s",
                      "answers = single"], rows, digits=1)  # fmt: skip
    markdown = (
        f"# Batch throughput\n\n`{command_line()}`\n\n{describe_machine(info)}\n\n"
        f"{args.videos} videos x {len(questions)} questions = {items} items, {args.frames} frames, "
        f"{args.max_new_tokens} new tokens, model {model_dir}; median of {args.repeats} run(s) per arm, "
        f"arms round-robin.\n\n{table}\n"
    )
    data = {"command": command_line(), "machine": info, "items": items, "frames": args.frames,
            "max_new_tokens": args.max_new_tokens, "model": str(model_dir), "runs":
            {_arm_name(w): r for w, r in runs.items()}, "answers_identical": {_arm_name(w): v for w, v in
            identical.items()}}  # fmt: skip
    publish(args.out_dir, "batch_throughput", data, markdown)
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
