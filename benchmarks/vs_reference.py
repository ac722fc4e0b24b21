"""holitom against the official HoliTom code, side by side in one process on the same tensors.

``python -m benchmarks.vs_reference --reference PATH [--frames 32 128] [--channels 3584] [--dtype bfloat16]``

PATH is the user's own clone of https://github.com/cokeshao/HoliTom (measured at e9b2972). Nothing of it is
copied into this project: at run time this script

- **outer stage**: executes ``PATH/holitom/llava_arch.py`` with three tiny stub modules standing in for the
  ``llava.*`` names it imports at module level (constants, ``get_anyres_image_grid_shape``, print helpers;
  none is used by the functions called here), binds the methods of ``LlavaMetaForCausalLM_holitom`` to a
  dummy object and drives them the way the video branch of ``prepare_inputs_labels_for_multimodal`` does:
  normalise, adjacent cosine similarity, ``select_static_windows``, r' re-scaling,
  ``get_static_dynamic_features``, ``holitom`` per segment ("one_token" order, D = 0), concatenation;
- **inner stage**: extracts from ``PATH/holitom/modeling_qwen2.py`` the lines of
  ``Qwen2Model_holitom.forward`` from the top-k keep set to the gather of the kept states (keep set, cosine
  similarity in the model dtype, the per-token in-place averaging loop, the kept indices) and executes them
  on a hidden-state tensor holding only the visual span (the rest of that forward needs transformers 4.51).

Timing: every arm runs on the same tensors, interleaved round-robin (ours, reference, ours, ...) after a
warm-up; min and median of ``--repeats`` runs. Agreement: segments, R, r', token count, per-token features
(outer); kept indices and merged states (inner). The reference's random DPC-KNN tie noise is drawn from a
re-seeded generator before each call (it only matters with 1 or 2 clusters, spec 4.3).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import types
from collections.abc import Callable
from contextlib import contextmanager
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
    timed,
    torch_peak_alloc_bytes,
)
from benchmarks.synthetic import synthetic_features

TOKENS = 196


# ------------------------------------------------------------------------------------------ loading
@contextmanager
def _stub_llava_modules():
    """Temporarily provide ``llava.constants``, ``llava.mm_utils`` and ``llava.utils`` (names only)."""
    names = ["llava", "llava.constants", "llava.mm_utils", "llava.utils"]
    saved = {n: sys.modules.get(n) for n in names}
    pkg = types.ModuleType("llava")
    pkg.__path__ = []  # a package, so that "from llava.x import y" works
    constants = types.ModuleType("llava.constants")
    for i, name in enumerate(
        ["IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "DEFAULT_IMAGE_PATCH_TOKEN", "DEFAULT_IM_START_TOKEN"]
    ):
        setattr(constants, name, -100 - i)
    constants.DEFAULT_IM_END_TOKEN = "<im_end>"
    mm_utils = types.ModuleType("llava.mm_utils")
    mm_utils.get_anyres_image_grid_shape = lambda *a, **k: None
    utils = types.ModuleType("llava.utils")
    utils.rank0_print = utils.rank_print = lambda *a, **k: None
    sys.modules.update(
        {"llava": pkg, "llava.constants": constants, "llava.mm_utils": mm_utils, "llava.utils": utils}
    )
    try:
        yield
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod


def _reference_methods(path: Path) -> Any:
    """The outer-stage methods of the reference, bound to a dummy ``self``."""
    source = (path / "holitom" / "llava_arch.py").read_text()
    module = types.ModuleType("holitom_reference_llava_arch")
    module.__file__ = str(path / "holitom" / "llava_arch.py")
    with _stub_llava_modules():
        exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - the user's clone
    cls = module.LlavaMetaForCausalLM_holitom
    obj = types.SimpleNamespace()
    for name in (
        "cluster_dpc_knn",
        "select_static_windows",
        "merge_tokens_by_clustering",
        "merge_tokens_by_attention_density",
        "merge_tokens_by_density",
        "holitom",
        "get_static_dynamic_features",
    ):
        setattr(obj, name, types.MethodType(getattr(cls, name), obj))
    return obj


INNER_FIRST = "top_attention_rank_index = last_layer_attention_avg_last_tok_image.topk("
INNER_LAST = "hidden_states=hidden_states[:,keep_indexs,:]"


def _reference_inner_code(path: Path) -> types.CodeType:
    """The inner merge lines of ``Qwen2Model_holitom.forward``, compiled as a top-level block."""
    file = path / "holitom" / "modeling_qwen2.py"
    lines = file.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if INNER_FIRST in line)
    last = next(i for i, line in enumerate(lines) if i > first and INNER_LAST in line.replace(" ", ""))
    block = textwrap.dedent("\n".join(lines[first : last + 1]))
    return compile(block, str(file), "exec")


class Reference:
    """The official implementation, loaded from a clone at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "holitom" / "llava_arch.py").is_file():
            raise FileNotFoundError(f"{self.path} does not look like a clone of cokeshao/HoliTom")
        self.methods = _reference_methods(self.path)
        self.inner_code = _reference_inner_code(self.path)

    def outer(self, features: torch.Tensor, attention: torch.Tensor, cfg: Any, seed: int = 0) -> dict:
        """The video branch of ``prepare_inputs_labels_for_multimodal`` (one_token, D = 0, no newline)."""
        m = self.methods
        torch.manual_seed(seed)  # the DPC-KNN tie noise
        frames, num, _ = features.shape
        normed = torch.nn.functional.normalize(features, p=2, dim=-1)
        sim = torch.nn.functional.cosine_similarity(normed[:-1], normed[1:], dim=-1)
        segments, reduced = m.select_static_windows(sim, frames, cfg.tau, cfg.max_window)
        total = frames * num
        ratio = min(cfg.retain_ratio / ((total - reduced) / total), 1)
        parts = m.get_static_dynamic_features(features, attention, segments, sim, cfg.tau)
        static_feat, dynamic_feat, _, dynamic_attn, static_pos, dynamic_pos = parts
        out = []
        for i, (start, end) in enumerate(segments):
            out.append(
                m.holitom(
                    static_feat[i], dynamic_feat[i], dynamic_attn[i], static_pos[i], dynamic_pos[i],
                    end - start + 1, ratio, 0.0, cfg.beta, cfg.dpc_k, features.dtype, "one_token",
                )
            )  # fmt: skip
        return {
            "features": torch.cat(out),
            "segments": [(int(s), int(e)) for s, e in segments],
            "reduced": int(reduced),
            "ratio": ratio,
        }

    def inner(self, hidden: torch.Tensor, scores: torch.Tensor, prune_ratio: float) -> tuple:
        """The reference's merge on a span-only sequence: returns (merged (K, C), kept (K,) ascending)."""
        env = self._run_inner(hidden, scores, prune_ratio)
        return env["hidden_states"][0], env["keep_indexs"]

    def inner_joins(self, hidden: torch.Tensor, scores: torch.Tensor, prune_ratio: float) -> dict:
        """The reference's keep set and, per pruned position, the kept position it joins."""
        env = self._run_inner(hidden, scores, prune_ratio)
        kept = env["top_attention_rank_index"]
        return {
            "kept": torch.sort(kept).values,
            "pruned": env["non_topk_indices"],
            "joins": kept[env["sim_max_index"][0]],
        }

    def _run_inner(self, hidden: torch.Tensor, scores: torch.Tensor, prune_ratio: float) -> dict:
        env = {
            "torch": torch,
            "print": lambda *a, **k: None,
            "hidden_states": hidden[None].clone(),  # the loop writes in place
            "last_layer_attention_avg_last_tok_image": scores,
            "HOLITOM_image_token_start_index": 0,
            "HOLITOM_image_token_length": hidden.shape[0],
            "HOLITOM_r": prune_ratio,
            "seq_length_with_past": hidden.shape[0],
        }
        exec(self.inner_code, env)  # noqa: S102 - the user's clone
        return env


# ------------------------------------------------------------------------------------------ agreement
def outer_agreement(ours: Any, ref: dict, features: torch.Tensor, tau: float) -> dict[str, Any]:
    """Does our CompressionResult reproduce the reference's outer output?

    Plan: segments, R, r' and the token count must be equal; tokens are then compared one to one (same
    order). ``decisions_differing``: adjacent-pair "similar" decisions where our similarity (float32
    accumulation) and the reference's (computed in the input dtype) fall on different sides of tau;
    ``max_margin`` is the largest |our similarity - tau| among them (one rounding step of the input dtype
    explains it).
    """
    from holitom_cli.compression.temporal import adjacent_similarity

    ours_sim = adjacent_similarity(features)
    normed = torch.nn.functional.normalize(features, p=2, dim=-1)
    ref_sim = torch.nn.functional.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    differ = (ours_sim > tau) != (ref_sim > tau)
    plan_equal = (
        ours.segments == ref["segments"]
        and ours.reduced == ref["reduced"]
        and ours.effective_ratio == ref["ratio"]
        and ours.num_tokens == ref["features"].shape[0]
    )
    row: dict[str, Any] = {
        "plan_equal": plan_equal,
        "segments": len(ours.segments),
        "reduced": [ours.reduced, ref["reduced"]],
        "tokens": [ours.num_tokens, int(ref["features"].shape[0])],
        "decisions_differing": int(differ.sum()),
        "max_margin": float((ours_sim[differ] - tau).abs().max()) if differ.any() else 0.0,
        "max_abs_diff": None,
        "max_rel_diff": None,
    }
    if plan_equal:
        a, b = ours.features.double(), ref["features"].double()
        diff = (a - b).abs()
        row["max_abs_diff"] = float(diff.max()) if diff.numel() else 0.0
        row["max_rel_diff"] = float((diff / b.abs().clamp_min(1e-3)).max()) if diff.numel() else 0.0
    return row


def inner_agreement(ours: tuple, ref: tuple, joins_ours: torch.Tensor, joins_ref: dict) -> dict[str, Any]:
    """Kept set and joins must be equal; merged states are compared one to one."""
    merged, kept = ours
    ref_merged = ref[0]
    same_kept = torch.equal(kept, joins_ref["kept"])
    row: dict[str, Any] = {
        "kept_equal": same_kept,
        "joins_equal": same_kept and torch.equal(joins_ours, joins_ref["joins"]),
        "joins_differing": int((joins_ours != joins_ref["joins"]).sum()) if same_kept else None,
        "max_abs_diff": None,
    }
    if same_kept:
        row["max_abs_diff"] = float((merged.double() - ref_merged.double()).abs().max())
    return row


def our_joins(hidden: torch.Tensor, scores: torch.Tensor, prune_ratio: float) -> torch.Tensor:
    """Per pruned position (ascending), the kept position it joins in holitom."""
    from holitom_cli.compression.inner import inner_keep_count, merge_plan

    kept, _, target = merge_plan(hidden, scores, inner_keep_count(hidden.shape[0], prune_ratio))
    return kept[target]


# ------------------------------------------------------------------------------------------ timing
def interleaved(arms: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of every run of every arm, run round-robin (a, b, a, b, ...) after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            times[name].append(timed(fn)[1])
    return times


def summary(times: dict[str, list[float]]) -> dict[str, Any]:
    ours, ref = times["ours"], times["reference"]
    return {
        "ours_min_s": min(ours),
        "ours_median_s": median(ours),
        "ref_min_s": min(ref),
        "ref_median_s": median(ref),
        "speedup_min": min(ref) / min(ours),
        "speedup_median": median(ref) / median(ours),
        "ours_runs_s": ours,
        "ref_runs_s": ref,
    }


def inner_inputs(length: int, channels: int, dtype: torch.dtype, seed: int = 0):
    """Hidden states (L, C) with residual-stream-like structure and attention-like scores (L,)."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randn(max(1, length // 8), channels, generator=g) * 4  # shared directions
    hidden = groups[torch.randint(len(groups), (length,), generator=g)]
    hidden = hidden + torch.randn(length, channels, generator=g)
    scores = torch.softmax(torch.randn(length, generator=g) * 2, dim=0)
    return hidden.to(dtype), scores


def measure_outer(ref: Reference, frames: int, channels: int, dtype: torch.dtype, cfg: Any, args) -> dict:
    from holitom_cli.compression import compress_video_tokens

    feats, scores, cuts = synthetic_features(frames, TOKENS, channels, seed=args.seed, dtype=dtype)
    ours_fn = lambda: compress_video_tokens(feats, scores, cfg)  # noqa: E731
    ref_fn = lambda: ref.outer(feats, scores, cfg, seed=args.seed)  # noqa: E731
    times = interleaved({"ours": ours_fn, "reference": ref_fn}, args.repeats, args.warmup)
    row = {"stage": "outer", "frames": frames, "channels": channels, "dtype": str(dtype).split(".")[-1],
           "scene_cuts": len(cuts) - 1, **summary(times)}  # fmt: skip
    row.update(outer_agreement(ours_fn(), ref_fn(), feats, cfg.tau))
    if not args.no_memory:
        input_bytes = feats.numel() * feats.element_size()
        row["ours_peak_x_input"] = torch_peak_alloc_bytes(ours_fn)[1] / input_bytes
        row["ref_peak_x_input"] = torch_peak_alloc_bytes(ref_fn)[1] / input_bytes
    return row


def measure_inner(ref: Reference, length: int, channels: int, dtype: torch.dtype, args) -> dict:
    from holitom_cli.compression import merge_visual_states

    hidden, scores = inner_inputs(length, channels, dtype, seed=args.seed)
    p = args.inner_prune_ratio
    ours_fn = lambda: merge_visual_states(hidden, scores, p)  # noqa: E731
    ref_fn = lambda: ref.inner(hidden, scores, p)  # noqa: E731
    times = interleaved({"ours": ours_fn, "reference": ref_fn}, args.repeats, args.warmup)
    row = {"stage": "inner", "length": length, "channels": channels, "dtype": str(dtype).split(".")[-1],
           **summary(times)}  # fmt: skip
    row.update(
        inner_agreement(ours_fn(), ref_fn(), our_joins(hidden, scores, p), ref.inner_joins(hidden, scores, p))
    )
    return row


# ------------------------------------------------------------------------------------------ report
def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    outer = [r for r in rows if r["stage"] == "outer"]
    inner = [r for r in rows if r["stage"] == "inner"]
    ms = lambda s: 1e3 * s  # noqa: E731
    parts = [f"Machine: {describe_machine(info)}.\n"]
    if outer:
        headers = ["dtype", "C", "T", "ours min ms", "ours median ms", "ref min ms", "ref median ms",
                   "speedup (min)", "speedup (median)", "plan equal", "max abs diff", "decisions differing",
                   "ours peak x input", "ref peak x input"]  # fmt: skip
        table = [
            [r["dtype"], r["channels"], r["frames"], ms(r["ours_min_s"]), ms(r["ours_median_s"]),
             ms(r["ref_min_s"]), ms(r["ref_median_s"]), f"{r['speedup_min']:.2f}x",
             f"{r['speedup_median']:.2f}x", "yes" if r["plan_equal"] else "NO",
             "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2g}",
             _fmt_decisions(r),
             _fmt_x(r.get("ours_peak_x_input")), _fmt_x(r.get("ref_peak_x_input"))]
            for r in outer
        ]  # fmt: skip
        parts.append("**Outer stage** (`compress_video_tokens` vs the reference's video branch)\n")
        parts.append(md_table(headers, table, digits=1))
    if inner:
        headers = ["dtype", "C", "L", "ours min ms", "ours median ms", "ref min ms", "ref median ms",
                   "speedup (min)", "speedup (median)", "kept equal", "joins equal",
                   "max abs diff"]  # fmt: skip
        table = [
            [r["dtype"], r["channels"], r["length"], ms(r["ours_min_s"]), ms(r["ours_median_s"]),
             ms(r["ref_min_s"]), ms(r["ref_median_s"]), f"{r['speedup_min']:.2f}x",
             f"{r['speedup_median']:.2f}x", "yes" if r["kept_equal"] else "NO",
             "yes" if r["joins_equal"] else f"NO ({r['joins_differing']})",
             "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2g}"]
            for r in inner
        ]  # fmt: skip
        parts.append("\n**Inner merge** (`merge_visual_states` vs the reference's loop)\n")
        parts.append(md_table(headers, table, digits=1))
    return "\n".join(parts) + "\n"


def _fmt_decisions(row: dict[str, Any]) -> str:
    n = row["decisions_differing"]
    return f"{n} (all within {row['max_margin']:.1e} of tau)" if n else "0"


def _fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from holitom_cli.compression import get_preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True, help="a clone of cokeshao/HoliTom")
    ap.add_argument("--frames", type=int, nargs="*", default=[32, 128])
    ap.add_argument("--channels", type=int, nargs="+", default=[3584])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                    choices=["bfloat16", "float16", "float32"])  # fmt: skip
    ap.add_argument("--inner-lengths", type=int, nargs="*", default=[700, 6000])
    ap.add_argument("--inner-prune-ratio", type=float, default=0.5)
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per arm, interleaved")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the profiled peak-memory runs")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--name", default="vs_reference", help="output file stem")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = Reference(args.reference)
    cfg = get_preset(args.preset)
    info = machine_info("cpu")
    rows: list[dict[str, Any]] = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for channels in args.channels:
            for frames in args.frames:
                rows.append(row := measure_outer(ref, frames, channels, dtype, cfg, args))
                log(f"outer {name} C={channels} T={frames}: {row['speedup_min']:.2f}x (min), "
                    f"plan equal {row['plan_equal']}")  # fmt: skip
            for length in args.inner_lengths:
                rows.append(row := measure_inner(ref, length, channels, dtype, args))
                log(f"inner {name} C={channels} L={length}: {row['speedup_min']:.2f}x (min), "
                    f"joins equal {row['joins_equal']}")  # fmt: skip
    info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    md = markdown(rows, info)
    data = {"command": command_line(), "machine": info, "preset": args.preset, "config": cfg.to_dict(),
            "reference": str(args.reference), "rows": rows}  # fmt: skip
    publish(args.out, args.name, data, md)
    return data


if __name__ == "__main__":
    main()
