"""DPC-KNN: the checked float32 path against the float64 path, on the segments of synthetic videos.

For every multi-frame segment of ``benchmarks.synthetic`` videos (several seeds, frame counts, dtypes and
presets), the static tokens' means are clustered twice, side by side on the same tensor:

- ``float64``: ``exact_clusters`` (``exact_distances``, the decisions, ``nearest_centre``: the path used
  before issue 13);
- ``checked``: ``assign_clusters`` (float32 Gram matrix of the centred tokens, decisions checked against
  the error bound, close calls from float64 rows or the whole segment).

It reports how many segments give different centres or assignments (expected: none), how many settled
close calls on float64 rows, how many were recomputed whole, and the time of both paths (min of
``--repeats`` interleaved runs per segment, summed).

``python -m benchmarks.dpc_agreement [--seeds 6] [--frames 64 128] [--presets balanced fastest]
[--dtypes bfloat16 float32] [--channels 3584] [--threads 2]``
"""

from __future__ import annotations

import argparse
import time
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
    publish,
)
from benchmarks.synthetic import synthetic_features

TOKENS = 196


def segment_inputs(frames: int, channels: int, dtype: torch.dtype, seed: int, preset: str):
    """(means (n_s, C) float32, cluster count, k) of every multi-frame segment that keeps clusters."""
    from holitom_cli.compression import effective_ratio, get_preset
    from holitom_cli.compression.core import _mean_buffers, segment_means
    from holitom_cli.compression.spatial import static_cluster_count
    from holitom_cli.compression.temporal import segment_video

    cfg = get_preset(preset)
    feats, _, _ = synthetic_features(frames, TOKENS, channels, seed=seed, dtype=dtype)
    seg = segment_video(feats, cfg.tau, cfg.max_window)
    ratio = effective_ratio(cfg.retain_ratio, frames * TOKENS, seg.reduced)
    buffers = _mean_buffers(feats)
    for start, end in seg.segments:
        if end == start:
            continue
        pos = torch.nonzero(seg.static_mask((start, end))).squeeze(1)
        clusters = static_cluster_count(pos.numel(), ratio)
        if clusters:
            means = segment_means(feats, start, end, *buffers).index_select(0, pos)
            yield means, clusters, min(cfg.dpc_k, clusters)


class Counting:
    """Counts the checked path's float64 work by wrapping two functions of ``compression.dpc``."""

    def __init__(self) -> None:
        from holitom_cli.compression import dpc

        self.dpc, self.rows, self.whole = dpc, 0, 0
        self._rows, self._whole = dpc._exact_rows, dpc.exact_distances

    def __enter__(self) -> Counting:
        self.dpc._exact_rows = self._count_rows
        self.dpc.exact_distances = self._count_whole
        return self

    def __exit__(self, *_: Any) -> None:
        self.dpc._exact_rows, self.dpc.exact_distances = self._rows, self._whole

    def _count_rows(self, x, rows, cols):
        self.rows += 1
        return self._rows(x, rows, cols)

    def _count_whole(self, x):
        self.whole += 1
        return self._whole(x)


def measure(args) -> dict[str, Any]:
    from holitom_cli.compression.dpc import assign_clusters, exact_clusters

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for preset in args.presets:
            for frames in args.frames:
                for channels in args.channels:
                    row = {"dtype": dtype_name, "preset": preset, "frames": frames, "channels": channels,
                           "segments": 0, "differ": 0, "rows_settled": 0, "recomputed": 0,
                           "float64_ms": 0.0, "checked_ms": 0.0}  # fmt: skip
                    for seed in range(args.seeds):
                        for x, clusters, k in segment_inputs(frames, channels, dtype, seed, preset):
                            expected = exact_clusters(x, clusters, k)[:3]
                            with Counting() as count:
                                got = assign_clusters(x, clusters, k)[:3]
                            same = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
                            row["segments"] += 1
                            row["differ"] += int(not same)
                            row["rows_settled"] += int(count.rows > 0 and count.whole == 0)
                            row["recomputed"] += int(count.whole > 0)
                            best = [float("inf"), float("inf")]
                            for _ in range(args.repeats):  # interleaved
                                for i, fn in enumerate((exact_clusters, assign_clusters)):
                                    t = time.perf_counter()
                                    fn(x, clusters, k)
                                    best[i] = min(best[i], time.perf_counter() - t)
                            row["float64_ms"] += best[0] * 1e3
                            row["checked_ms"] += best[1] * 1e3
                    row["speedup"] = row["float64_ms"] / max(row["checked_ms"], 1e-9)
                    log(f"{dtype_name} {preset} T={frames} C={channels}: {row['segments']} segments, "
                        f"{row['differ']} differ, {row['speedup']:.2f}x")  # fmt: skip
                    rows.append(row)
    return {"rows": rows}


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    headers = ["dtype", "preset", "T", "C", "segments", "differ", "settled on float64 rows",
               "recomputed whole", "float64 ms", "checked ms", "speedup"]  # fmt: skip
    body = [[r["dtype"], r["preset"], r["frames"], r["channels"], r["segments"], r["differ"],
             r["rows_settled"], r["recomputed"], r["float64_ms"], r["checked_ms"], f"{r['speedup']:.2f}x"]
            for r in rows]  # fmt: skip
    return f"{describe_machine(machine)}\n\n{md_table(headers, body, digits=1)}\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--frames", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--channels", type=int, nargs="+", default=[3584])
    ap.add_argument("--presets", nargs="+", default=["balanced", "fastest"])
    ap.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"]
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path per segment, interleaved")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--name", default="dpc_agreement", help="output file stem")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    data = {"command": command_line(), "machine": machine, **measure(args)}
    md = markdown(data["rows"], machine)
    publish(args.out, args.name, data, md)
    return data


if __name__ == "__main__":
    main()
